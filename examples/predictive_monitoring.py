"""Predictive monitoring: sample resources, forecast their exhaustion, act before it happens.

    python examples/predictive_monitoring.py

The predictor samples this process (CPU, memory against the cgroup-aware limit, file
descriptors, threads, error rates from the event bus) on a daemon thread. Right after
``start_monitoring`` it already holds a first sample. Failing calls to a loopback server,
guarded by ``@resilient``, show up in its error rates.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from _loopback import LoopbackServer

import otel_raptor
from otel_raptor import FailurePredicted, resilient
from otel_raptor.predict import forecast


def on_prediction(prediction: FailurePredicted) -> None:
    state = "cleared" if prediction.cleared else f"raised ({prediction.severity})"
    print(f"  alarm {state}: {prediction.resource} p={prediction.probability:.2f}")


async def main() -> None:
    predictor = otel_raptor.get_predictive_failure()
    predictor.add_alert_callback(on_prediction)
    await predictor.start_monitoring(interval=30)
    metrics = predictor.get_current_metrics()  # a first sample is already there
    print(
        f"process RSS {metrics['process_rss'] / 2**20:.1f} MiB,"
        f" {metrics['threads']} threads, {metrics['open_fds']} open file descriptors"
    )
    for resource, ratio in sorted(dict(metrics["utilization"]).items()):  # type: ignore[call-overload]
        print(f"  {resource:<18} {ratio:6.1%} of its limit")

    with LoopbackServer() as server:

        @resilient(service="catalog", retry=0, breaker=False)
        def fetch(path: str) -> dict[str, object]:
            with urllib.request.urlopen(server.url(path), timeout=5) as response:
                return dict(json.load(response))

        failures = 0
        for _ in range(20):
            try:
                fetch("/down")
            except urllib.error.HTTPError:
                failures += 1
        predictor.tick()  # one more sample now, rather than in 30 s
        rates = dict(predictor.get_current_metrics()["error_rates"])  # type: ignore[call-overload]
        shown = ", ".join(f"{name} {rate:.1f}/s" for name, rate in rates.items())
        print(f"{failures} failed calls to {server.url('')}; errors since the last sample: {shown}")

    # The forecast behind an alarm: a leak of 0.15 MiB/s watched for five minutes (a sample
    # every 10 s), 100 MiB limit. A trend seen for less than the horizon is weak evidence
    # (docs/prediction.md): the same leak watched for one minute gives p=0.13, no alarm.
    trend = forecast([(t, 40.0 + 0.15 * t) for t in range(0, 300, 10)], limit=100.0, horizon=300)
    print(
        f"forecast of a leak: runs out in {trend.time_to_exhaustion_s:.0f} s,"
        f" p={trend.probability:.2f} within 5 min, confidence {trend.confidence:.2f}"
    )
    for resource, prediction in sorted(predictor.get_predictions().items()):
        spec = ",.0f" if prediction.limit > 1 else ".3f"  # disk is a fraction of 1
        print(
            f"  {resource:<18} value {prediction.value:{spec}} of {prediction.limit:,.0f},"
            f" alarm={prediction.alarm}"
        )
    predictor.stop_monitoring()


if __name__ == "__main__":
    asyncio.run(main())
