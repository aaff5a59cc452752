"""Performance monitoring: recovery metrics, threshold alerts, a report and the analytics.

    python examples/performance_monitoring.py

Calls to a loopback server go through a guard (``Guard`` here, or any integration under
``RaptorInstrumentor``): ``/catalog`` fails once then answers, ``/down`` answers 503 for good.
The monitor is fed by the event bus with no code of its own; one recovery made by hand is
recorded with the seed's ``record_recovery_attempt``. The thresholds are tightened so that an
alert fires within the few seconds this example runs (the defaults are the seed's: recovery
time 5 s / 10 s, success rate 80 % / 60 %, ...).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from _loopback import LoopbackServer

from otel_raptor import Alert, ErrorRecoveryMonitor, Guard, RetryPolicy

MONITOR_CONFIG = {
    "alert_thresholds": {
        "recovery_time": {"warning": 0.05, "critical": 2.0},  # seconds (p95)
        "success_rate": {"warning": 80, "critical": 60},  # percent
        "error_frequency": 10,  # failed attempts a minute
        "memory_usage": 75,  # percent of the effective limit
    },
    "alert_cooldown": 300,
    "report_interval": 3600,
    "metrics_retention": 86400,
    "auto_resolve_alerts": True,
    "alert_for": 0,  # fire at once (default: after 60 s)
    "min_recoveries": 5,  # enough for this example (default 20)
}


def on_alert(alert: Alert) -> None:
    print(f"  ALERT {alert.state}: [{alert.severity}] {alert.name}: {alert.message}")


async def main() -> None:
    monitor = ErrorRecoveryMonitor(MONITOR_CONFIG)
    monitor.add_alert_callback(on_alert)
    with LoopbackServer() as server:
        policy = RetryPolicy(max_retries=2, base_delay=0.05, max_delay=0.2)
        guard = Guard(server.origin, retry=policy, breaker=False)

        def fetch(path: str) -> dict[str, object]:
            with urllib.request.urlopen(server.url(path), timeout=5) as response:
                return dict(json.load(response))

        for _ in range(8):
            server.script("/catalog", 503, 200)
            guard.call(fetch, "/catalog")
        for _ in range(4):
            try:
                guard.call(fetch, "/down")
            except Exception as error:  # noqa: BLE001 - an example: show what happened
                last = error
        print(f"last error from /down: {last}")
        # A recovery made elsewhere, recorded with the seed's API (recovery_time in ms).
        started = time.perf_counter()
        server.script("/prices", 503, 200)
        for _ in range(2):
            try:
                fetch("/prices")
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.05)
        await monitor.record_recovery_attempt(
            error_type="503",
            recovery_time=(time.perf_counter() - started) * 1000,
            success=True,
            strategy="retry_with_backoff",
            context={"service": "prices"},
        )

    metrics = monitor.get_current_metrics()
    for name, service in metrics["services"].items():
        p95 = service["recovery_time_p95_s"]
        print(
            f"{name}: {service['recoveries']} recoveries, success"
            f" {service['success_rate']:.0%}, p95 {p95 * 1000:.0f} ms,"
            f" {service['error_frequency_per_min']:.1f} errors/min,"
            f" {service['attempts_mean']:.2f} attempts per call"
        )
    active = monitor.get_active_alerts()
    print(f"{len(active)} alert(s) firing: {sorted((a.name, a.severity) for a in active)}")
    report = monitor.report()
    for name, service in report.services.items():
        for pattern in service.top_patterns[:2]:
            print(
                f"  pattern at {name}: {pattern.count}x {pattern.error_type}"
                f" {pattern.template!r} ({pattern.category})"
            )
    for row in report.effectiveness:
        print(
            f"  {row.strategy} on {row.category} at {row.service}:"
            f" {row.succeeded_with_retry} recovered with retry,"
            f" {row.failed_with_retry} failed with retry"
        )
    for insight in monitor.analytics.insights():
        print(f"  insight: {insight.summary} -> {insight.recommendation}")
    print(json.dumps(report.as_dict()["overall"], indent=None)[:200] + " ...")
    monitor.close()


if __name__ == "__main__":
    asyncio.run(main())
