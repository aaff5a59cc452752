"""``otel-raptor report --prometheus``: a fleet report from a real Prometheus, fed by the plugin,
that matches the in-process monitor's own report number for number.

Real guards recover, fail, exhaust a retry budget and open a breaker against four services
(the fake clock makes the backoff sleeps instant and their durations exact); the telemetry
sink and the monitor's telemetry record on an SDK ``MeterProvider`` read by the Python
Prometheus exporter; a private ``prometheus`` scrapes it every second. The command line then
asks that Prometheus and its JSON is compared with ``monitor.report()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from otel_raptor.__main__ import main
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import CircuitOpenError
from otel_raptor.fleet import PrometheusClient, fleet_report
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.monitoring import MonitorTelemetry
from otel_raptor.telemetry.sink import TelemetrySink
from tests.e2e.test_monitoring_configs import DIRECT_JOB, direct_relabel_configs, require_tool
from tests.e2e.test_prometheus import Telemetry, _MetricsEndpoint, _Prometheus
from tests.support.clock import FakeClock
from tests.support.services import require_module

pytestmark = pytest.mark.timeout(90)

DEADLINE_S = 40.0

#: The numbers both reports must agree on, per service.
COMPARED = (
    "recoveries",
    "recovered",
    "fallback",
    "failed",
    "rejected",
    "budget_exhausted",
    "success_rate",
    "recovery_time_p50_s",
    "recovery_time_p95_s",
    "recovery_time_mean_s",
    "errors",
    "attempts",
    "attempts_mean",
    "retries",
    "budget_refusals",
    "breaker_trips",
    "rejections",
    "learned_futile",
    "succeeded_without_retry",
    "succeeded_with_retry",
    "failed_with_retry",
    "failed_without_retry",
)


class Flaky:
    """Fails ``failures`` times with ``error``, then answers."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionResetError) -> None:
        self.left = failures
        self.error = error

    def __call__(self) -> str:
        if self.left > 0:
            self.left -= 1
            raise self.error(f"connection to 10.0.0.{self.left}:5432 reset after {self.left}s")
        return "ok"


class Conflict(Exception):
    """Not retryable: classified as a client error, given up at once."""


def _workload(runtime: Runtime) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.5, max_delay=8.0, jitter="none")
    # orders: recovers after 1, 2 or 3 failures (0.5 s, 1.5 s, 3.5 s of backoff).
    orders = Guard("orders.internal:443", runtime=runtime, retry=policy, breaker=False)
    for failures in (1, 1, 2, 2, 2, 3, 1, 3, 2, 1, 3, 3):
        assert orders.call(Flaky(failures)) == "ok"
    # search: recovers once, gives up once after every retry (4 attempts).
    search = Guard("search.internal:443", runtime=runtime, retry=policy, breaker=False)
    assert search.call(Flaky(1, TimeoutError)) == "ok"
    with pytest.raises(TimeoutError):
        search.call(Flaky(10, TimeoutError))
    # carts: a client error is not retried; a fallback answers another one.
    carts = Guard("carts.internal:443", runtime=runtime, retry=policy, breaker=False)
    for _ in range(3):
        with pytest.raises(Conflict):
            carts.call(Flaky(1, Conflict))
    assert (
        Guard(
            "carts.internal:443",
            runtime=runtime,
            retry=0,
            breaker=False,
            fallback=lambda e: "cached",
        ).call(Flaky(1, Conflict))
        == "cached"
    )
    # payments: refuses everything; the breaker opens and rejects.
    payments = Guard(
        "payments.internal:443",
        runtime=runtime,
        retry=policy,
        breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=600.0),
    )
    with pytest.raises(ConnectionRefusedError):  # the breaker opens during its retries
        payments.call(Flaky(100, ConnectionRefusedError))
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            payments.call(Flaky(100, ConnectionRefusedError))


@pytest.fixture
def fed() -> Iterator[tuple[Telemetry, ErrorRecoveryMonitor, Runtime]]:
    require_module("opentelemetry.exporter.prometheus")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)],
        resource=Resource.create({"service.name": "raptor-fleet"}),
    )
    runtime = Runtime(clock=FakeClock())
    sink = TelemetrySink(runtime=runtime, meter_provider=provider, tracer_provider=TracerProvider())
    sink.install()
    monitor = ErrorRecoveryMonitor(runtime=runtime, memory_reader=lambda: None)
    telemetry = MonitorTelemetry(monitor, meter_provider=provider)
    telemetry.install()
    try:
        _workload(runtime)
        monitor.tick()  # the monitor's own counters are recorded on its thread: flush them
        yield Telemetry(exposition=lambda: generate_latest(registry)), monitor, runtime
    finally:
        telemetry.uninstall()
        monitor.close()
        sink.uninstall()
        provider.shutdown()


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["report", *args])
    return status, out.getvalue()


def test_the_fleet_report_from_prometheus_matches_the_process_report(
    fed: tuple[Telemetry, ErrorRecoveryMonitor, Runtime], tmp_path: Path
) -> None:
    telemetry, monitor, _ = fed
    ours = monitor.report().as_dict()
    total = ours["overall"]["recoveries"]
    binary = require_tool("prometheus")
    deadline = time.monotonic() + DEADLINE_S
    with _MetricsEndpoint(telemetry) as endpoint:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": DIRECT_JOB,
                    "static_configs": [{"targets": [endpoint.address]}],
                    "metric_relabel_configs": direct_relabel_configs(),
                }
            ],
        }
        with _Prometheus(binary, tmp_path, config) as prometheus:
            prometheus.wait_ready(deadline)
            # Wait until both the sink's and the monitor's counters have been scraped.
            prometheus.wait_for(f"sum(raptor_recoveries_total) == {total}", deadline)
            prometheus.wait_for(f"sum(raptor_recovery_results_total) == {total}", deadline)
            url = f"http://127.0.0.1:{prometheus.port}"
            status, out = _cli("--prometheus", url, "--range", "10m", "--format", "json")
            text_status, text = _cli("--prometheus", url, "--range", "10m")
            one_status, one = _cli(
                "--prometheus", url, "--service", "search.internal:443", "--format", "json"
            )
            direct = fleet_report(PrometheusClient(url), range_s=600.0)
    assert (status, text_status, one_status) == (0, 0, 0)
    theirs: dict[str, Any] = json.loads(out)
    assert theirs["source"] == "prometheus"
    assert (
        set(theirs["services"])
        == set(ours["services"])
        == {
            "orders.internal:443",
            "search.internal:443",
            "carts.internal:443",
            "payments.internal:443",
        }
    )
    for name, service in ours["services"].items():
        fleet = theirs["services"][name]
        for key in COMPARED:
            mine, other = service[key], fleet[key]
            if isinstance(mine, float):
                assert other == pytest.approx(mine, rel=1e-9), (name, key)
            else:
                assert other == mine, (name, key)
        assert fleet["errors_by_category"] == service["errors_by_category"], name
        # The fleet's "patterns" are error types; the process's patterns of the same type
        # add up to them.
        by_type: dict[str, int] = {}
        for pattern in service["top_patterns"]:
            by_type[pattern["error_type"]] = (
                by_type.get(pattern["error_type"], 0) + pattern["count"]
            )
        assert {p["error_type"]: p["count"] for p in fleet["top_patterns"]} == by_type, name
    for key in COMPARED:
        if isinstance(ours["overall"][key], float):
            assert theirs["overall"][key] == pytest.approx(ours["overall"][key]), key
        else:
            assert theirs["overall"][key] == ours["overall"][key], key
    # Effectiveness by strategy and category: the four kinds agree too.
    kinds = (
        "succeeded_without_retry",
        "succeeded_with_retry",
        "failed_with_retry",
        "failed_without_retry",
    )

    def table(report: dict[str, Any]) -> dict[tuple[str, str, str], tuple[int, ...]]:
        return {
            (row["service"], row["strategy"], row["category"]): tuple(row[k] for k in kinds)
            for row in report["effectiveness"]
        }

    assert table(theirs) == table(ours)
    # The workload was what the test says: every outcome and a breaker trip are in there.
    assert ours["overall"]["recovered"] == 13
    assert ours["overall"]["rejected"] == 4
    assert ours["overall"]["breaker_trips"] == 1
    assert ours["services"]["orders.internal:443"]["recovery_time_p95_s"] is not None
    # The text form and the one-service form come from the same numbers.
    assert "orders.internal:443" in text
    assert "(all)" in text
    assert set(json.loads(one)["services"]) == {"search.internal:443"}
    assert direct.as_dict()["overall"] == theirs["overall"]


def test_a_process_that_stopped_during_the_range_still_counts(
    fed: tuple[Telemetry, ErrorRecoveryMonitor, Runtime], tmp_path: Path
) -> None:
    # A deploy or a scale-in ends processes: their series go stale, and an instant query at
    # the end of the range no longer sees them. What they did within the range still counts.
    telemetry, monitor, _ = fed
    ours = monitor.report().as_dict()["overall"]
    total = ours["recoveries"]
    binary = require_tool("prometheus")
    deadline = time.monotonic() + DEADLINE_S
    endpoint = _MetricsEndpoint(telemetry)
    with endpoint:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": DIRECT_JOB,
                    "static_configs": [{"targets": [endpoint.address]}],
                    "metric_relabel_configs": direct_relabel_configs(),
                }
            ],
        }
        with _Prometheus(binary, tmp_path, config) as prometheus:
            prometheus.wait_ready(deadline)
            prometheus.wait_for(f"sum(raptor_recoveries_total) == {total}", deadline)
            prometheus.wait_for(f"sum(raptor_recovery_results_total) == {total}", deadline)
            # The process is gone (closing it twice, here and on leaving the block, is fine).
            endpoint.__exit__(None, None, None)
            prometheus.wait_for("absent(raptor_recoveries_total)", deadline)
            prometheus.wait_for("absent(raptor_errors_total)", deadline)
            report = fleet_report(PrometheusClient(f"http://127.0.0.1:{prometheus.port}"))
    theirs = report.as_dict()["overall"]
    for key in ("recoveries", "recovered", "rejected", "errors", "retries", "breaker_trips"):
        assert theirs[key] == ours[key], key
    assert theirs["recoveries"] > 0


def test_only_raptor_alerts_are_listed_as_firing(tmp_path: Path) -> None:
    # A Prometheus shared with other teams fires their alerts too (kube-prometheus' Watchdog
    # fires for ever): they are not raptor's and must not fill its report.
    binary = require_tool("prometheus")
    rules = {
        "groups": [
            {
                "name": "mixed",
                "rules": [
                    {"alert": "Watchdog", "expr": "vector(1)"},
                    {
                        "alert": "RaptorCircuitBreakerOpen",
                        "expr": "vector(1)",
                        "labels": {"raptor_circuit_breaker_name": "payments.internal:443"},
                    },
                ],
            }
        ]
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.json"],
    }
    deadline = time.monotonic() + DEADLINE_S
    with _Prometheus(binary, tmp_path, config) as prometheus:
        prometheus.wait_ready(deadline)
        prometheus.wait_for('ALERTS{alertstate="firing"}', deadline, minimum=2)
        report = fleet_report(PrometheusClient(f"http://127.0.0.1:{prometheus.port}"))
    assert [(a.name, a.service) for a in report.active_alerts] == [
        ("RaptorCircuitBreakerOpen", "payments.internal:443")
    ]
    # What the report selects by: every alert raptor ships is named Raptor*.
    shipped = Path(__file__).parents[2] / "collector" / "rules"
    names = re.findall(r"^\s*- alert: (\S+)$", _rules_text(shipped), flags=re.M)
    assert names
    assert all(name.startswith("Raptor") for name in names), names


def _rules_text(directory: Path) -> str:
    return "".join(
        path.read_text(encoding="utf-8")
        for path in sorted(directory.glob("*.yml"))
        if not path.name.endswith(".test.yml")
    )


def test_an_unreachable_prometheus_is_one_line_and_exit_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["report", "--prometheus", "http://127.0.0.1:9", "--range", "5m"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("otel-raptor report: cannot query Prometheus at http://127.0.0.1:9")
    assert err.count("\n") == 1


@pytest.mark.parametrize("bad", ["5 minutes", "0s", "-1h", "1h30"])
def test_a_bad_range_is_a_usage_error(bad: str) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["report", "--prometheus", "http://127.0.0.1:9", "--range", bad])
    assert raised.value.code == 2
