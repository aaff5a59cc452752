"""The zero-code path: an application with no resilience code, run under the OTel launcher.

    pip install 'otel-raptor[requests]'          # brings opentelemetry-distro and the launcher
    OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY=0.05 opentelemetry-instrument python examples/app.py

``opentelemetry-instrument`` loads ``RaptorInstrumentor`` (entry point ``raptor``), which hooks
``requests`` and starts the error-recovery monitor; every export (metrics, the
``raptor.recovery`` spans, the monitor's ``raptor.alert.*`` / ``raptor.insight`` log events)
goes where the standard ``OTEL_*`` variables say. Run plainly (``python examples/app.py``) the
app instruments itself with quick retries, so it shows the same thing without the launcher.

The workload: a loopback server whose ``/catalog`` fails once per call and then answers (the
retries recover), and whose ``/stock`` is down (503 for good: the retries never help). At the
end the app prints what the monitor saw; with ``OTEL_PYTHON_RAPTOR_MONITOR_*`` variables the
alerts and insights come within seconds (docs/analytics.md), by default over minutes.
"""

from __future__ import annotations

import os
import time

import requests
from _loopback import LoopbackServer

from otel_raptor import RaptorInstrumentor, get_error_recovery_monitor


def main() -> None:
    instrumentor = RaptorInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:  # run without the launcher
        instrumentor.instrument(retry={"base_delay": 0.05, "max_delay": 0.2})
    wait_s = float(os.environ.get("APP_WAIT_FOR_INSIGHTS", "3"))
    session = requests.Session()
    with LoopbackServer() as catalog, LoopbackServer() as stock:
        statuses = []
        for _ in range(6):
            catalog.script("/catalog", 503, 200)
            statuses.append(session.get(catalog.url("/catalog"), timeout=5).status_code)
        stock.script("/stock", 503)
        for _ in range(6):
            try:
                statuses.append(session.get(stock.url("/stock"), timeout=5).status_code)
            except requests.exceptions.ConnectionError as error:  # an open breaker, say
                statuses.append(type(error).__name__)  # type: ignore[arg-type]
        print(f"statuses seen by the app: {statuses}")
        print(
            f"requests that reached the servers: /catalog {catalog.hits['/catalog']},"
            f" /stock {stock.hits['/stock']}"
        )
        monitor = get_error_recovery_monitor()
        deadline = time.monotonic() + wait_s
        while not monitor.analytics.insights() and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, service in monitor.get_current_metrics()["services"].items():
            print(
                f"{name}: {service['recoveries']} recoveries, success rate"
                f" {service['success_rate']:.0%}, {service['errors']} failed attempts"
            )
        for alert in monitor.get_active_alerts():
            print(f"alert [{alert.severity}] {alert.name}: {alert.message}")
        for insight in monitor.analytics.insights():
            print(f"insight {insight.kind}: {insight.summary}")
            print(f"  -> {insight.recommendation}")


if __name__ == "__main__":
    main()
