"""Prediction and memory events in, spans and metrics out (SDK in-memory reader/exporter)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_raptor.core.classification import Severity
from otel_raptor.core.events import (
    FailurePredicted,
    MemoryCleanupFinished,
    MemoryPressureChanged,
    PreventionActionRun,
)
from otel_raptor.core.prediction import ResourceSnapshot
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink
from tests.support.clock import FakeClock


class Harness:
    def __init__(self) -> None:
        self.runtime = Runtime(clock=FakeClock())
        self.reader = InMemoryMetricReader()
        self.exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.sink = TelemetrySink(
            runtime=self.runtime,
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[self.reader]),
        )
        self.sink.install()

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        data = self.reader.get_metrics_data()
        out: dict[frozenset[tuple[str, Any]], Any] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            key = frozenset((point.attributes or {}).items())
                            out[key] = point.value  # type: ignore[union-attr]  # no histograms here
        return out


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.sink.uninstall()


def test_a_prediction_becomes_a_span_and_a_count(h: Harness) -> None:
    h.runtime.bus.publish(
        FailurePredicted(
            resource="process_memory",
            probability=0.9,
            time_to_exhaustion_s=600.0,
            confidence=0.8,
            severity=Severity.HIGH,
        )
    )
    h.runtime.bus.publish(
        FailurePredicted(
            resource="process_memory",
            probability=0.1,
            time_to_exhaustion_s=None,
            confidence=0.9,
            severity=Severity.HIGH,
            cleared=True,
        )
    )
    assert h.points("raptor.predictions") == {
        frozenset(
            {("raptor.resource", "process_memory"), ("raptor.prediction.severity", "high")}
        ): 1
    }
    raised, cleared = h.exporter.get_finished_spans()
    assert raised.name == "raptor.prediction"
    assert raised.kind is SpanKind.INTERNAL
    assert dict(raised.attributes or {}) == {
        "raptor.resource": "process_memory",
        "raptor.prediction.state": "raised",
        "raptor.prediction.severity": "high",
        "raptor.prediction.probability": 0.9,
        "raptor.prediction.time_to_exhaustion": 600.0,
        "raptor.prediction.confidence": 0.8,
    }
    assert raised.start_time == raised.end_time
    assert (cleared.attributes or {})["raptor.prediction.state"] == "cleared"
    assert "raptor.prediction.time_to_exhaustion" not in (cleared.attributes or {})


def test_prevention_actions_are_counted_by_outcome(h: Harness) -> None:
    for outcome in ("ok", "ok"):
        h.runtime.bus.publish(PreventionActionRun("memory", "gc_collect", outcome, 0.01))
    h.runtime.bus.publish(PreventionActionRun("memory", "gc_collect", "skipped", 0.0, "cooldown"))
    assert h.points("raptor.prevention.actions") == {
        frozenset(
            {
                ("raptor.resource", "memory"),
                ("raptor.prevention.action", "gc_collect"),
                ("raptor.prevention.outcome", "ok"),
            }
        ): 2,
        frozenset(
            {
                ("raptor.resource", "memory"),
                ("raptor.prevention.action", "gc_collect"),
                ("raptor.prevention.outcome", "skipped"),
                ("raptor.prevention.skip_reason", "cooldown"),
            }
        ): 1,
    }


def test_a_cleanup_becomes_a_span_that_started_earlier_and_counts_bytes(h: Harness) -> None:
    h.runtime.bus.publish(MemoryCleanupFinished("emergency", "prediction", 200 << 20, 5000, 0.25))
    h.runtime.bus.publish(MemoryCleanupFinished("standard", "scheduled", -4096, 0, 0.01))
    level = "raptor.memory.cleanup.level"
    assert h.points("raptor.memory.cleanups") == {
        frozenset({(level, "emergency"), ("raptor.memory.cleanup.trigger", "prediction")}): 1,
        frozenset({(level, "standard"), ("raptor.memory.cleanup.trigger", "scheduled")}): 1,
    }
    assert h.points("raptor.memory.freed") == {
        frozenset({(level, "emergency")}): 200 << 20,
        frozenset({(level, "standard")}): 0,  # RSS grew: nothing freed, never negative
    }
    span, _ = h.exporter.get_finished_spans()
    assert span.name == "raptor.memory.cleanup"
    assert span.end_time is not None
    assert span.start_time is not None
    assert span.end_time - span.start_time == 250_000_000
    assert dict(span.attributes or {}) == {
        level: "emergency",
        "raptor.memory.cleanup.trigger": "prediction",
        "raptor.memory.cleanup.bytes_freed": 200 << 20,
        "raptor.memory.cleanup.entries_evicted": 5000,
    }


def test_resource_gauges_read_the_runtime_snapshot(h: Harness) -> None:
    assert h.points("raptor.resource.utilization") == {}
    assert h.points("raptor.memory.pressure") == {}
    h.runtime.resource_snapshot = lambda: ResourceSnapshot(
        utilization={"memory": 0.5, "cpu": 0.25},
        time_to_exhaustion_s={"memory": 1200.0},
        probability={"memory": 0.3},
        memory_pressure=0.5,
    )
    res = "raptor.resource"
    assert h.points("raptor.resource.utilization") == {
        frozenset({(res, "memory")}): 0.5,
        frozenset({(res, "cpu")}): 0.25,
    }
    assert h.points("raptor.prediction.time_to_exhaustion") == {
        frozenset({(res, "memory")}): 1200.0
    }
    assert h.points("raptor.prediction.probability") == {frozenset({(res, "memory")}): 0.3}
    assert h.points("raptor.memory.pressure") == {frozenset(): 0.5}


def test_pressure_changes_drive_the_level_gauge_and_the_fallback_ratio(h: Harness) -> None:
    assert h.points("raptor.memory.pressure.level") == {}
    h.runtime.bus.publish(MemoryPressureChanged("critical", "warning", 0.87))
    key = "raptor.memory.pressure.level"
    assert h.points(key) == {
        frozenset({(key, "normal")}): 0,
        frozenset({(key, "warning")}): 0,
        frozenset({(key, "critical")}): 1,
        frozenset({(key, "emergency")}): 0,
    }
    assert h.points("raptor.memory.pressure") == {frozenset(): 0.87}


def test_memory_pressure_is_the_running_controllers_ratio_not_the_last_level_change(
    h: Harness,
) -> None:
    # The gauge the server-side RaptorMemoryUsageHigh (> 0.75) reads. With the memory
    # controller running and no predictor, it reported the ratio of the last level change:
    # 0.72 at the crossing into `warning` (70 %), and still 0.72 at 84 %, where the
    # in-process monitor (which reads the controller's live ratio) was firing.
    from otel_raptor.runtime.memory import MemoryLimit, SimpleMemoryController

    usage = [0.60]
    limit = 1 << 30
    controller = SimpleMemoryController(
        runtime=h.runtime,
        clock=h.runtime.clock,
        auto_cleanup=False,
        limit_reader=lambda: MemoryLimit(limit, "cgroup", int(usage[0] * limit)),
    )
    assert h.points("raptor.memory.pressure") == {}  # not running: nothing to read
    controller.start()
    try:
        assert h.points("raptor.memory.pressure") == {frozenset(): pytest.approx(0.60)}
        usage[0] = 0.72
        controller.check()  # normal -> warning: a MemoryPressureChanged at 0.72
        usage[0] = 0.84
        controller.check()  # still warning: no event
        assert h.points("raptor.memory.pressure") == {frozenset(): pytest.approx(0.84)}
        # A predictor's snapshot, when there is one, still comes first.
        h.runtime.resource_snapshot = lambda: ResourceSnapshot(memory_pressure=0.5)
        assert h.points("raptor.memory.pressure") == {frozenset(): 0.5}
    finally:
        controller.stop()
    h.runtime.resource_snapshot = ResourceSnapshot
    # Stopped: the last level change's ratio, as before.
    assert h.points("raptor.memory.pressure") == {frozenset(): pytest.approx(0.72)}
