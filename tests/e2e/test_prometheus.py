"""End to end with a real Prometheus: raptor telemetry in, series and alerts out.

A real ``Guard`` fails against a downstream until its breaker opens; a real ``TelemetrySink``
records that on an SDK ``MeterProvider`` read by the Python Prometheus exporter
(``opentelemetry-exporter-prometheus``), served from a loopback HTTP endpoint. A private
``prometheus`` (temporary storage, 127.0.0.1 only, killed at the end) scrapes it with the
direct-scrape job of ``collector/prometheus.yml`` (its relabelling included) and evaluates
``collector/rules/raptor-alerts.yml`` with every ``for:`` shortened to 2 s. The test then asks
Prometheus' HTTP API for the series, their labels and the alerts.

Without ``prometheus`` or the exporter the tests skip, or fail under
``RAPTOR_REQUIRE_SERVICES=1`` (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import (
    FailurePredicted,
    MemoryCleanupFinished,
    MemoryPressureChanged,
    PreventionActionRun,
    RetryBudgetExhausted,
)
from otel_raptor.core.prediction import ResourceSnapshot
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import CircuitOpenError
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.instruments import INSTRUMENTS, InstrumentKind
from otel_raptor.telemetry.monitoring import MonitorTelemetry
from otel_raptor.telemetry.sink import TelemetrySink
from tests.e2e.test_monitoring_configs import (
    DIRECT_JOB,
    RULES,
    STANDARD_LABELS,
    direct_relabel_configs,
    known_series,
    load_yaml,
    prometheus_label,
    prometheus_series,
    require_tool,
)
from tests.support.clock import FakeClock
from tests.support.services import require_module

pytestmark = pytest.mark.timeout(60)

DOWN = "payments.internal:443"  # refuses every connection: its breaker opens
FLAKY = "search.internal:443"  # fails once, then answers
#: The application's service.name, and so its `job` (collector/prometheus.yml's direct job
#: sets it with a target label: that exporter writes none).
APP = "raptor-e2e"
#: How long the test waits for Prometheus to start, scrape and fire (seconds).
DEADLINE_S = 25.0
#: `for:` of every rule in the test's copy of the rules (evaluated every second).
SHORT_FOR = "2s"


@dataclass
class Telemetry:
    #: The Prometheus text exposition of the metrics as they are now.
    exposition: Callable[[], bytes]


def _refused() -> None:
    raise ConnectionRefusedError(111, "Connection refused")


class _FailsOnce:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"


def _broken_subscriber(event: object) -> None:
    raise RuntimeError("a bug in a bus subscriber")


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Real raptor telemetry, after a workload that produces every instrument."""
    require_module("opentelemetry.exporter.prometheus")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)],
        resource=Resource.create({"service.name": APP}),
    )
    # No retry-budget floor beyond the first token: the second retry to DOWN is refused.
    clock = FakeClock()
    runtime = Runtime(clock=clock, budget_ratio=0.0, budget_min_retries_per_second=1.0)
    sink = TelemetrySink(runtime=runtime, meter_provider=provider, tracer_provider=TracerProvider())
    sink.install()
    # The error-recovery monitor and its instruments; memory at 90 % of the limit makes its
    # memory alert fire (a notification), budget refusals below make an insight.
    monitor = ErrorRecoveryMonitor({"alert_for": 0}, runtime=runtime, memory_reader=lambda: 0.9)
    monitoring = MonitorTelemetry(monitor, meter_provider=provider)
    monitoring.install()
    try:
        policy = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.01, jitter="none")
        flaky = Guard(FLAKY, runtime=runtime, retry=policy)
        assert flaky.call(_FailsOnce()) == "ok"
        down = Guard(
            DOWN,
            runtime=runtime,
            retry=policy,
            breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=600.0),
        )
        for _ in range(2):
            with pytest.raises(ConnectionRefusedError):
                down.call(_refused)
        with pytest.raises(CircuitOpenError):
            down.call(_refused)
        # The predictor's side, published as the predictor and the memory controller do. Below
        # the alert thresholds (probability 0.8, critical pressure): only the breaker alerts.
        bus = runtime.bus
        bus.publish(
            FailurePredicted(
                resource="process_memory",
                probability=0.85,
                time_to_exhaustion_s=900.0,
                confidence=0.9,
                severity=Severity.HIGH,
            )
        )
        bus.publish(PreventionActionRun("process_memory", "memory_cleanup", "ok", 0.01))
        bus.publish(MemoryCleanupFinished("critical", "prediction", 1 << 20, 10, 0.01))
        bus.publish(MemoryPressureChanged("warning", "normal", 0.72))
        runtime.resource_snapshot = lambda: ResourceSnapshot(
            utilization={"process_memory": 0.7},
            time_to_exhaustion_s={"process_memory": 900.0},
            probability={"process_memory": 0.3},
            memory_pressure=0.72,
        )
        unavailable = Classification(ErrorCategory.UNAVAILABLE, Severity.MEDIUM, True, "503")
        for _ in range(10):  # as many refusals as make an insight
            bus.publish(RetryBudgetExhausted("quota.internal:443", unavailable))
        # A bug of ours, met where the bus meets it: a subscriber that raises.
        unsubscribe = bus.subscribe(_broken_subscriber)
        bus.publish(MemoryPressureChanged("normal", "warning", 0.5))
        unsubscribe()
        clock.advance(60)
        monitor.tick()
        yield Telemetry(exposition=lambda: generate_latest(registry))
    finally:
        monitoring.uninstall()
        monitor.close()
        sink.uninstall()
        provider.shutdown()


def test_the_python_exporter_writes_the_translated_names(telemetry: Telemetry) -> None:
    # The real exporter agrees with tests/e2e/test_monitoring_configs.py's translation in
    # everything but `_ratio`, which it does not add to gauges of unit "1" (the collector does;
    # the direct-scrape job's relabelling restores it).
    from prometheus_client.parser import text_string_to_metric_families

    samples = [
        sample
        for family in text_string_to_metric_families(telemetry.exposition().decode())
        for sample in family.samples
        if sample.name.startswith("raptor_")
    ]
    expected = {
        name for spec in INSTRUMENTS for name in prometheus_series(spec, ratio_suffix=False)
    }
    assert {sample.name for sample in samples} == expected
    labels_of = {
        name: {prometheus_label(key) for key in spec.attributes} | STANDARD_LABELS | {"le"}
        for spec in INSTRUMENTS
        for name in prometheus_series(spec, ratio_suffix=False)
    }
    for sample in samples:
        assert set(sample.labels) <= labels_of[sample.name], sample
    gauges = [spec for spec in INSTRUMENTS if spec.kind is InstrumentKind.OBSERVABLE_GAUGE]
    assert "raptor_circuit_breaker_state" in {
        name for spec in gauges for name in prometheus_series(spec, ratio_suffix=False)
    }


# ----------------------------------------------------------------- the real Prometheus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _MetricsEndpoint:
    """``GET /metrics`` on 127.0.0.1, answering with the current exposition."""

    def __init__(self, telemetry: Telemetry) -> None:
        exposition = telemetry.exposition

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _MetricsEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Prometheus:
    def __init__(self, binary: str, directory: Path, config: dict[str, Any]) -> None:
        self.port = _free_port()
        self.config_file = directory / "prometheus.json"  # JSON is YAML
        self.config_file.write_text(json.dumps(config), encoding="utf-8")
        self.log = directory / "prometheus.log"
        self.command = [
            binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Prometheus:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        pytest.fail(f"prometheus did not get ready:\n{self.output()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for(self, promql: str, deadline: float, minimum: int = 1) -> list[dict[str, Any]]:
        while time.monotonic() < deadline:
            result = self.query(promql)
            if len(result) >= minimum:
                return result
            time.sleep(0.2)
        pytest.fail(f"no result for {promql} in time; prometheus said:\n{self.output()}")


def _short_rules(directory: Path) -> Path:
    """The alert rules with every `for:` set to SHORT_FOR."""
    text, count = re.subn(
        r"^(\s+)for: \S+$", rf"\g<1>for: {SHORT_FOR}", RULES.read_text(encoding="utf-8"), flags=re.M
    )
    assert count >= 5
    path = directory / "rules.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_real_prometheus_scrapes_raptor_metrics_and_fires_the_breaker_alert(
    telemetry: Telemetry, tmp_path: Path
) -> None:
    binary = require_tool("prometheus")
    rules = _short_rules(tmp_path)
    deadline = time.monotonic() + DEADLINE_S
    with _MetricsEndpoint(telemetry) as endpoint:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules.name],
            "scrape_configs": [
                {
                    "job_name": DIRECT_JOB,
                    # One target group per application, `job` its service.name: the
                    # recipe of collector/prometheus.yml's commented example.
                    "static_configs": [{"targets": [endpoint.address], "labels": {"job": APP}}],
                    "metric_relabel_configs": direct_relabel_configs(),
                }
            ],
        }
        with _Prometheus(binary, tmp_path, config) as prometheus:
            prometheus.wait_ready(deadline)
            firing = prometheus.wait_for(
                'ALERTS{alertname="RaptorCircuitBreakerOpen", alertstate="firing"}', deadline
            )
            low_health = prometheus.wait_for(
                'ALERTS{alertname="RaptorCircuitBreakerHealthLow", alertstate="firing"}', deadline
            )
            series = prometheus.query('{__name__=~"raptor_.+"}')
            state = prometheus.query(
                'raptor_circuit_breaker_state_ratio{raptor_circuit_breaker_state="open"} == 1'
            )
            transitions = prometheus.query("raptor_circuit_breaker_transitions_total")
            recoveries = prometheus.query(
                "sum by (raptor_recovery_outcome) (raptor_recoveries_total)"
            )
            buckets = prometheus.query(
                "raptor_recovery_duration_seconds_bucket"
                '{le="+Inf", raptor_recovery_outcome="recovered"}'
            )
            loaded_rules = prometheus.get("/api/v1/rules")

    # The breaker alert, with the labels its rule keeps.
    assert [alert["metric"] for alert in firing] == [
        {
            "__name__": "ALERTS",
            "alertname": "RaptorCircuitBreakerOpen",
            "alertstate": "firing",
            "job": APP,
            "raptor_circuit_breaker_name": DOWN,
            "severity": "critical",
        }
    ]
    # Health 50 (one failure in two calls) fires for the closed breaker; the open one
    # (health 0) is left to the breaker alert.
    assert [alert["metric"]["raptor_circuit_breaker_name"] for alert in low_health] == [FLAKY]

    # Every instrument arrived under its translated name, with only its own labels.
    known = known_series()
    names = {item["metric"]["__name__"] for item in series}
    assert names == {name for spec in INSTRUMENTS for name in prometheus_series(spec)}
    for item in series:
        labels = set(item["metric"]) - {"__name__"}
        assert labels <= known[item["metric"]["__name__"]].labels, item["metric"]
        assert item["metric"]["job"] == APP
    assert [(i["metric"]["raptor_circuit_breaker_name"], i["value"][1]) for i in state] == [
        (DOWN, "1")
    ]
    assert len(transitions) == 1
    transition = transitions[0]["metric"]
    assert transition["raptor_circuit_breaker_name"] == DOWN
    assert transition["raptor_circuit_breaker_from_state"] == "closed"
    assert transition["raptor_circuit_breaker_to_state"] == "open"
    assert transition["raptor_circuit_breaker_transition_reason"] == "consecutive_failures"
    assert transitions[0]["value"][1] == "1"
    assert {item["metric"]["raptor_recovery_outcome"]: item["value"][1] for item in recoveries} == {
        "recovered": "1",
        "budget_exhausted": "2",
        "rejected": "1",
    }
    assert [(b["metric"]["raptor_service"], b["value"][1]) for b in buckets] == [(FLAKY, "1")]

    # Prometheus' own YAML parser read the rules as tests/e2e/test_monitoring_configs.py's
    # reader does.
    ours = {rule["alert"]: rule for group in load_yaml(rules)["groups"] for rule in group["rules"]}
    theirs = {
        rule["name"]: rule
        for group in loaded_rules["data"]["groups"]
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }
    assert set(ours) == set(theirs)
    for name, rule in ours.items():
        assert theirs[name]["labels"] == rule["labels"], name
        assert theirs[name]["annotations"] == rule["annotations"], name
        assert theirs[name]["duration"] == (2 if "for" in rule else 0), name
