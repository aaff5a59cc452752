"""The monitor's conclusions as OpenTelemetry data, read back from the SDK's in-memory exporter
and reader: log-record events with event names, counters, and the alerts gauge."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.runtime.monitor import RULE_MEMORY_USAGE, ErrorRecoveryMonitor
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.instruments import (
    ATTR_ALERT_NAME,
    ATTR_ALERT_SEVERITY,
    ATTR_ALERT_STATE,
    ATTR_INSIGHT_EVIDENCE,
    ATTR_INSIGHT_KIND,
    INSTRUMENTATION_NAME,
    LOG_EVENTS,
    METRIC_ALERT_NOTIFICATIONS,
    METRIC_ALERTS_ACTIVE,
    METRIC_INSIGHTS,
    METRIC_RECOVERY_ATTEMPTS_MADE,
    METRIC_RECOVERY_RESULTS,
)
from otel_raptor.telemetry.monitoring import MonitorTelemetry
from tests.support.clock import FakeClock


@dataclass
class Setup:
    runtime: Runtime
    clock: FakeClock
    monitor: ErrorRecoveryMonitor
    telemetry: MonitorTelemetry
    logs: InMemoryLogRecordExporter
    reader: InMemoryMetricReader
    memory: list[float]

    def events(self) -> list[Any]:
        return [record.log_record for record in self.logs.get_finished_logs()]

    def points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], float]] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes), p.value) for p in metric.data.data_points]
        return found


@pytest.fixture
def setup(clock: FakeClock) -> Iterator[Setup]:
    runtime = Runtime(clock=clock)
    memory = [0.1]
    monitor = ErrorRecoveryMonitor(
        {"alert_for": 0, "alert_resolve_after": 0, "report_interval": 600},
        runtime=runtime,
        memory_reader=lambda: memory[0],
    )
    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    reader = InMemoryMetricReader()
    telemetry = MonitorTelemetry(
        monitor, logger_provider=logger_provider, meter_provider=MeterProvider([reader])
    )
    telemetry.install()
    yield Setup(runtime, clock, monitor, telemetry, logs, reader, memory)
    telemetry.uninstall()
    monitor.close()


def test_alerts_are_log_events_a_counter_and_a_gauge(setup: Setup) -> None:
    setup.memory[0] = 0.9
    setup.monitor.get_active_alerts()
    [firing] = setup.events()
    assert firing.event_name == "raptor.alert.firing"
    assert firing.severity_number is SeverityNumber.WARN
    assert firing.body == "memory use is 90 % of the effective limit (threshold 75 %)"
    assert dict(firing.attributes) == {
        ATTR_ALERT_NAME: RULE_MEMORY_USAGE,
        ATTR_ALERT_SEVERITY: "warning",
        "raptor.alert.value": pytest.approx(90.0),
        "raptor.alert.threshold": 75.0,
    }
    # The record's time is when the alert started firing, on the wall clock.
    assert firing.timestamp == int(setup.clock.wall() * 1e9)
    active = {
        (a[ATTR_ALERT_NAME], a[ATTR_ALERT_SEVERITY]): v
        for a, v in setup.points(METRIC_ALERTS_ACTIVE.name)
    }
    assert active[(RULE_MEMORY_USAGE, "warning")] == 1
    assert active[("RaptorRecoveryTimeHigh", "critical")] == 0
    setup.memory[0] = 0.1
    setup.clock.advance(60)
    setup.monitor.get_active_alerts()
    names = [e.event_name for e in setup.events()]
    assert names == ["raptor.alert.firing", "raptor.alert.resolved"]
    notifications = {
        a[ATTR_ALERT_STATE]: v for a, v in setup.points(METRIC_ALERT_NOTIFICATIONS.name)
    }
    assert notifications == {"firing": 1, "resolved": 1}
    assert {v for _, v in setup.points(METRIC_ALERTS_ACTIVE.name)} == {0}


def test_recoveries_are_counted_by_kind_and_attempts(setup: Setup) -> None:
    bus = setup.runtime.bus
    for outcome, attempts in ((Outcome.RECOVERED, 3), (Outcome.FAILED, 1), (Outcome.FAILED, 4)):
        bus.publish(
            RecoveryFinished(
                service="api",
                strategy=Strategy.RETRY_WITH_BACKOFF,
                outcome=outcome,
                attempts=attempts,
                duration_s=1.0,
                category="server_error",
            )
        )
    setup.monitor.tick()
    results = {
        a["raptor.recovery.result"]: v for a, v in setup.points(METRIC_RECOVERY_RESULTS.name)
    }
    assert results == {"succeeded_with_retry": 1, "failed_without_retry": 1, "failed_with_retry": 1}
    attempts = {
        a["raptor.recovery.outcome"]: v for a, v in setup.points(METRIC_RECOVERY_ATTEMPTS_MADE.name)
    }
    assert attempts == {"recovered": 3, "failed": 5}


def test_an_insight_is_a_log_event_with_its_evidence(setup: Setup) -> None:
    bus = setup.runtime.bus
    error = Classification(ErrorCategory.TIMEOUT, Severity.LOW, True, "TimeoutError")
    for minute in range(31):
        for _ in range(60 if minute == 30 else 10):
            bus.publish(ErrorClassified("search", error, 1))
        setup.clock.advance(60)
        setup.monitor.tick()
    [insight] = [e for e in setup.events() if e.event_name == "raptor.insight"]
    assert insight.attributes[ATTR_INSIGHT_KIND] == "error_spike"
    assert insight.attributes["raptor.service"] == "search"
    assert insight.attributes["raptor.error.category"] == "timeout"
    assert json.loads(insight.attributes[ATTR_INSIGHT_EVIDENCE])["errors_per_minute"] == 60
    assert str(insight.body).startswith("timeout errors at search rose")
    [(attributes, count)] = setup.points(METRIC_INSIGHTS.name)
    assert attributes == {ATTR_INSIGHT_KIND: "error_spike", "raptor.service": "search"}
    assert count == 1


def test_the_report_is_a_json_log_event_every_interval(setup: Setup) -> None:
    setup.runtime.bus.publish(
        RecoveryFinished(
            service="api",
            strategy=Strategy.RECONNECT,
            outcome=Outcome.RECOVERED,
            attempts=2,
            duration_s=0.3,
            category="connection",
        )
    )
    setup.clock.advance(600)
    setup.monitor.tick()
    [report] = [e for e in setup.events() if e.event_name == "raptor.report"]
    body = json.loads(str(report.body))
    assert body["services"]["api"]["recoveries"] == 1
    assert body["duration_s"] == 600
    assert report.attributes["raptor.report.duration"] == 600


def test_every_event_name_is_declared(setup: Setup) -> None:
    declared = {spec.name for spec in LOG_EVENTS}
    setup.memory[0] = 0.9
    setup.monitor.get_active_alerts()
    setup.clock.advance(600)
    setup.monitor.tick()
    names = {e.event_name for e in setup.events()}
    assert names
    assert names <= declared
    scopes = {record.instrumentation_scope.name for record in setup.logs.get_finished_logs()}
    assert scopes == {INSTRUMENTATION_NAME}


def test_a_broken_logger_provider_never_breaks_the_monitor(clock: FakeClock) -> None:
    class Broken(LoggerProvider):
        def get_logger(self, *args: object, **kwargs: object) -> Any:
            raise RuntimeError("no logs today")

    monitor = ErrorRecoveryMonitor(
        {"alert_for": 0}, runtime=Runtime(clock=clock), memory_reader=lambda: 0.99
    )
    telemetry = MonitorTelemetry(monitor, logger_provider=Broken(), meter_provider=MeterProvider())
    telemetry.install()
    assert [a.name for a in monitor.get_active_alerts()] == [RULE_MEMORY_USAGE]
    telemetry.uninstall()
    monitor.close()


def test_two_monitors_on_one_provider_add_up_their_alerts(clock: FakeClock) -> None:
    # Each monitor reports 0 for every rule it is not firing: the gauge must show the other
    # monitor's firing alert, not whichever reading came last.
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader])
    memories = ([0.9], [0.1], [0.9])
    monitors = [
        ErrorRecoveryMonitor(
            {"alert_for": 0, "alert_resolve_after": 0, "report_interval": 600},
            runtime=Runtime(clock=clock),
            memory_reader=lambda memory=memory: memory[0],  # type: ignore[misc]
        )
        for memory in memories
    ]
    telemetries = [MonitorTelemetry(m, meter_provider=provider) for m in monitors]
    for telemetry in telemetries:
        telemetry.install()
    try:
        for monitor in monitors:
            monitor.get_active_alerts()

        def active() -> dict[tuple[str, str], float]:
            data = reader.get_metrics_data()
            assert data is not None
            return {
                (p.attributes[ATTR_ALERT_NAME], p.attributes[ATTR_ALERT_SEVERITY]): p.value
                for resource in data.resource_metrics
                for scope in resource.scope_metrics
                for metric in scope.metrics
                if metric.name == METRIC_ALERTS_ACTIVE.name
                for p in metric.data.data_points
            }

        assert active()[(RULE_MEMORY_USAGE, "warning")] == 2
        telemetries[2].uninstall()  # an uninstalled monitor no longer counts
        assert active()[(RULE_MEMORY_USAGE, "warning")] == 1
    finally:
        for telemetry, monitor in zip(telemetries, monitors, strict=True):
            telemetry.uninstall()
            monitor.close()
