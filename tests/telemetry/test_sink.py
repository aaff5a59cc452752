"""Events in, metrics and spans out: the sink against the SDK's in-memory reader/exporter."""

from __future__ import annotations

import ast
import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from otel_raptor._version import __version__
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import (
    BreakerTransitioned,
    CallRejected,
    ErrorClassified,
    MemoryCleanupFinished,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.errors import ConfigError
from otel_raptor.runtime import forksafe, safety
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.instruments import RECOVERY_DURATION_BUCKETS, SCHEMA_URL
from otel_raptor.telemetry.sink import MAX_EVENTS_PER_CALL, MAX_PENDING_CALLS, TelemetrySink
from tests.support.clock import FakeClock

CONNECTION = Classification(
    category=ErrorCategory.CONNECTION,
    severity=Severity.HIGH,
    retryable=True,
    error_type="requests.exceptions.ConnectionError",
)
RATE_LIMITED = Classification(
    category=ErrorCategory.RATE_LIMIT,
    severity=Severity.MEDIUM,
    retryable=True,
    error_type="429",
    status_code=429,
)


@dataclass
class Harness:
    runtime: Runtime
    clock: FakeClock
    sink: TelemetrySink
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        if data is None:
            return {}
        found: dict[str, Metric] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """Value (or histogram point) by attribute set, for one metric."""
        metric = self.metrics().get(name)
        if metric is None:
            return {}
        out: dict[frozenset[tuple[str, Any]], Any] = {}
        for point in metric.data.data_points:
            key = frozenset((point.attributes or {}).items())
            out[key] = point if isinstance(point, HistogramDataPoint) else point.value  # type: ignore[union-attr]  # no exponential histograms here
        return out

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("test")


def attrs(**values: Any) -> frozenset[tuple[str, Any]]:
    return frozenset((key.replace("__", "."), value) for key, value in values.items())


def make_harness(**sink_options: Any) -> Harness:
    clock = FakeClock()
    runtime = Runtime(clock=clock)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = TelemetrySink(
        runtime=runtime,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        **sink_options,
    )
    return Harness(runtime, clock, sink, reader, exporter, tracer_provider, meter_provider)


@pytest.fixture(autouse=True)
def _fresh_safety_net() -> Iterator[None]:
    safety._reset_for_tests()
    yield
    safety._reset_for_tests()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = make_harness()
    harness.sink.install()
    yield harness
    harness.sink.uninstall()
    harness.meter_provider.shutdown()
    harness.tracer_provider.shutdown()


def trip(breaker: CircuitBreaker) -> None:
    """Drive ``breaker`` open with consecutive counted failures (default threshold: 5)."""
    for _ in range(breaker.config.failure_threshold):
        breaker.record_failure(breaker.acquire(), 0.01, CONNECTION)
    assert breaker.state is CircuitState.OPEN


# --------------------------------------------------------------------------- per event


def test_error_classified_counts_an_error(h: Harness) -> None:
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 2))
    h.runtime.bus.publish(ErrorClassified("api", RATE_LIMITED, 1))

    assert h.metrics()["raptor.errors"].unit == "{error}"
    assert h.points("raptor.errors") == {
        attrs(
            raptor__service="db",
            raptor__error__category="connection",
            raptor__error__severity="high",
            error__type="requests.exceptions.ConnectionError",
        ): 2,
        attrs(
            raptor__service="api",
            raptor__error__category="rate_limit",
            raptor__error__severity="medium",
            error__type="429",
        ): 1,
    }
    assert h.spans() == ()  # nothing until the call ends


def test_retry_scheduled_counts_a_retry(h: Harness) -> None:
    h.runtime.bus.publish(RetryScheduled("db", 1, 0.25, CONNECTION, Strategy.RECONNECT))

    assert h.metrics()["raptor.retries"].unit == "{retry}"
    assert h.points("raptor.retries") == {
        attrs(
            raptor__service="db",
            raptor__error__category="connection",
            raptor__recovery__strategy="reconnect",
        ): 1
    }


def test_budget_exhausted_is_counted(h: Harness) -> None:
    h.runtime.bus.publish(RetryBudgetExhausted("db", CONNECTION))

    assert h.metrics()["raptor.retry_budget.exhausted"].unit == "{retry}"
    assert h.points("raptor.retry_budget.exhausted") == {
        attrs(raptor__service="db", raptor__error__category="connection"): 1
    }


def test_breaker_transition_counts_and_marks_the_current_span(h: Harness) -> None:
    with h.tracer().start_as_current_span("GET /orders"):
        h.runtime.bus.publish(
            BreakerTransitioned(
                "db",
                CircuitState.CLOSED,
                CircuitState.OPEN,
                TransitionReason.FAILURE_RATE,
                open_for_s=30.0,
            )
        )
    h.runtime.bus.publish(  # no current span: metrics only
        BreakerTransitioned(
            "db",
            CircuitState.OPEN,
            CircuitState.HALF_OPEN,
            TransitionReason.RECOVERY_TIMEOUT_ELAPSED,
        )
    )

    assert h.metrics()["raptor.circuit_breaker.transitions"].unit == "{transition}"
    assert h.points("raptor.circuit_breaker.transitions") == {
        attrs(
            raptor__circuit_breaker__name="db",
            raptor__circuit_breaker__from_state="closed",
            raptor__circuit_breaker__to_state="open",
            raptor__circuit_breaker__transition__reason="failure_rate",
        ): 1,
        attrs(
            raptor__circuit_breaker__name="db",
            raptor__circuit_breaker__from_state="open",
            raptor__circuit_breaker__to_state="half_open",
            raptor__circuit_breaker__transition__reason="recovery_timeout_elapsed",
        ): 1,
    }
    (parent,) = h.spans()
    (event,) = parent.events
    assert event.name == "raptor.circuit_breaker.transition"
    assert dict(event.attributes or {}) == {
        "raptor.circuit_breaker.name": "db",
        "raptor.circuit_breaker.from_state": "closed",
        "raptor.circuit_breaker.to_state": "open",
        "raptor.circuit_breaker.transition.reason": "failure_rate",
        "raptor.circuit_breaker.open_duration": 30.0,
    }


def test_call_rejected_counts_and_marks_the_current_span(h: Harness) -> None:
    with h.tracer().start_as_current_span("job"):
        h.runtime.bus.publish(CallRejected("db", CircuitState.OPEN, 12.5))
        h.runtime.bus.publish(CallRejected("db", CircuitState.OPEN, None))  # held open by hand

    assert h.metrics()["raptor.circuit_breaker.rejections"].unit == "{call}"
    assert h.points("raptor.circuit_breaker.rejections") == {
        attrs(raptor__circuit_breaker__name="db", raptor__circuit_breaker__state="open"): 2
    }
    (parent,) = h.spans()
    assert [dict(e.attributes or {}) for e in parent.events] == [
        {
            "raptor.circuit_breaker.name": "db",
            "raptor.circuit_breaker.state": "open",
            "raptor.circuit_breaker.retry_after": 12.5,
        },
        {"raptor.circuit_breaker.name": "db", "raptor.circuit_breaker.state": "open"},
    ]
    assert {e.name for e in parent.events} == {"raptor.circuit_breaker.rejection"}


def test_a_failed_recovery_is_counted_timed_and_traced_with_its_events(h: Harness) -> None:
    bus = h.runtime.bus
    with h.tracer().start_as_current_span("GET /orders") as parent:
        bus.publish(ErrorClassified("db", CONNECTION, 1))
        bus.publish(RetryScheduled("db", 1, 0.1, CONNECTION, Strategy.RECONNECT))
        bus.publish(ErrorClassified("db", RATE_LIMITED, 2))
        bus.publish(RetryScheduled("db", 2, 0.4, RATE_LIMITED, Strategy.RECONNECT))
        bus.publish(ErrorClassified("db", CONNECTION, 3))
        bus.publish(
            RecoveryFinished(
                service="db",
                strategy=Strategy.RECONNECT,
                outcome=Outcome.FAILED,
                attempts=3,
                duration_s=1.5,
                category="connection",
                give_up_reason="attempts_exhausted",
            )
        )

    assert h.points("raptor.recoveries") == {
        attrs(
            raptor__service="db",
            raptor__error__category="connection",
            raptor__recovery__strategy="reconnect",
            raptor__recovery__outcome="failed",
            raptor__recovery__give_up_reason="attempts_exhausted",
        ): 1
    }
    assert h.metrics()["raptor.recoveries"].unit == "{recovery}"
    assert h.metrics()["raptor.recovery.duration"].unit == "s"
    (point,) = h.points("raptor.recovery.duration").items()
    key, histogram = point
    assert key == attrs(
        raptor__service="db",
        raptor__recovery__strategy="reconnect",
        raptor__recovery__outcome="failed",
    )
    assert (histogram.count, histogram.sum) == (1, 1.5)
    assert tuple(histogram.explicit_bounds) == RECOVERY_DURATION_BUCKETS
    assert histogram.bucket_counts[RECOVERY_DURATION_BUCKETS.index(1.0) + 1] == 1  # (1, 2.5]

    recovery, parent_span = h.spans()
    assert parent_span.name == "GET /orders"
    assert recovery.name == "raptor.recovery"
    assert recovery.kind is SpanKind.INTERNAL
    assert recovery.parent is not None
    assert recovery.parent.span_id == parent.get_span_context().span_id
    assert dict(recovery.attributes or {}) == {
        "raptor.service": "db",
        "raptor.error.category": "connection",
        "raptor.recovery.strategy": "reconnect",
        "raptor.recovery.outcome": "failed",
        "raptor.recovery.attempts": 3,
        "raptor.recovery.give_up_reason": "attempts_exhausted",
        "error.type": "requests.exceptions.ConnectionError",  # the last attempt's error
    }
    assert recovery.status.status_code is StatusCode.ERROR
    assert recovery.status.description == "attempts_exhausted"
    assert recovery.end_time is not None
    assert recovery.start_time is not None
    assert recovery.end_time - recovery.start_time == 1_500_000_000
    assert [e.name for e in recovery.events] == [
        "raptor.error",
        "raptor.retry",
        "raptor.error",
        "raptor.retry",
        "raptor.error",
    ]
    assert dict(recovery.events[0].attributes or {}) == {
        "raptor.recovery.attempt": 1,
        "raptor.error.category": "connection",
        "raptor.error.severity": "high",
        "error.type": "requests.exceptions.ConnectionError",
    }
    assert dict(recovery.events[3].attributes or {}) == {
        "raptor.recovery.attempt": 2,
        "raptor.retry.delay": 0.4,
        "raptor.error.category": "rate_limit",
        "raptor.recovery.strategy": "reconnect",
    }
    timestamps = [e.timestamp for e in recovery.events]
    assert timestamps == sorted(timestamps)
    assert all(recovery.start_time <= t <= recovery.end_time for t in timestamps)
    assert parent_span.events == ()  # per-call events are on the recovery span only
    scope = recovery.instrumentation_scope
    assert scope is not None
    assert (scope.name, scope.version, scope.schema_url) == ("otel_raptor", __version__, SCHEMA_URL)


def test_a_recovered_call_is_not_an_error(h: Harness) -> None:
    h.runtime.bus.publish(ErrorClassified("api", RATE_LIMITED, 1))
    h.runtime.bus.publish(RetryScheduled("api", 1, 2.0, RATE_LIMITED, Strategy.RATE_LIMIT_BACKOFF))
    h.runtime.bus.publish(
        RecoveryFinished(
            "api", Strategy.RATE_LIMIT_BACKOFF, Outcome.RECOVERED, 2, 2.1, "rate_limit"
        )
    )

    assert h.points("raptor.recoveries") == {
        attrs(
            raptor__service="api",
            raptor__error__category="rate_limit",
            raptor__recovery__strategy="rate_limit_backoff",
            raptor__recovery__outcome="recovered",
        ): 1
    }
    (recovery,) = h.spans()  # no current span: a root span
    assert recovery.parent is None
    assert recovery.status.status_code is StatusCode.UNSET
    assert "error.type" not in (recovery.attributes or {})
    assert "raptor.recovery.give_up_reason" not in (recovery.attributes or {})
    assert [e.name for e in recovery.events] == ["raptor.error", "raptor.retry"]


@pytest.mark.parametrize(
    ("outcome", "reason", "expected_type"),
    [
        (Outcome.BUDGET_EXHAUSTED, "budget_exhausted", "requests.exceptions.ConnectionError"),
        (Outcome.REJECTED, "breaker_rejected", "requests.exceptions.ConnectionError"),
    ],
)
def test_given_up_after_attempts_reports_the_apps_last_error(
    h: Harness, outcome: Outcome, reason: str, expected_type: str
) -> None:
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    h.runtime.bus.publish(RetryBudgetExhausted("db", CONNECTION))
    h.runtime.bus.publish(
        RecoveryFinished("db", Strategy.RECONNECT, outcome, 1, 0.2, "connection", reason)
    )
    (recovery,) = h.spans()
    assert recovery.status.status_code is StatusCode.ERROR
    assert (recovery.attributes or {})["error.type"] == expected_type
    assert [e.name for e in recovery.events] == ["raptor.error", "raptor.retry_budget.exhausted"]


def test_a_call_refused_at_once_reports_circuit_open_and_no_stale_events(h: Harness) -> None:
    # A call abandoned earlier in this context (cancelled: no RecoveryFinished) left events.
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    h.runtime.bus.publish(
        RecoveryFinished(
            "db", Strategy.FAIL_FAST, Outcome.REJECTED, 0, 0.0, "unavailable", "breaker_rejected"
        )
    )
    (recovery,) = h.spans()
    assert (recovery.attributes or {})["error.type"] == "otel_raptor.errors.CircuitOpenError"
    assert (recovery.attributes or {})["raptor.recovery.attempts"] == 0
    assert recovery.events == ()


def test_a_call_refused_by_a_cooldown_reports_throttled(h: Harness) -> None:
    h.runtime.bus.publish(
        RecoveryFinished(
            "db", Strategy.FAIL_FAST, Outcome.REJECTED, 0, 0.0, "rate_limit", "throttled"
        )
    )
    (recovery,) = h.spans()
    assert (recovery.attributes or {})["error.type"] == "otel_raptor.errors.ThrottledError"


def test_a_fallback_is_not_an_error(h: Harness) -> None:
    h.runtime.bus.publish(
        RecoveryFinished(
            "db", Strategy.FAILOVER, Outcome.FALLBACK, 0, 0.0, "unavailable", "breaker_rejected"
        )
    )
    (recovery,) = h.spans()
    assert recovery.status.status_code is StatusCode.UNSET
    assert "error.type" not in (recovery.attributes or {})


def test_a_new_call_discards_the_events_of_an_abandoned_one(h: Harness) -> None:
    bus = h.runtime.bus
    bus.publish(ErrorClassified("db", CONNECTION, 1))
    bus.publish(RetryScheduled("db", 1, 0.1, CONNECTION, Strategy.RECONNECT))
    # ...cancelled here: no RecoveryFinished. The next call to db starts afresh.
    bus.publish(ErrorClassified("db", RATE_LIMITED, 1))
    bus.publish(
        RecoveryFinished(
            "db", Strategy.FAIL_FAST, Outcome.FAILED, 1, 0.0, "rate_limit", "not_retryable"
        )
    )
    (recovery,) = h.spans()
    assert [(e.name, (e.attributes or {})["raptor.error.category"]) for e in recovery.events] == [
        ("raptor.error", "rate_limit")
    ]
    assert (recovery.attributes or {})["error.type"] == "429"


def test_buffered_events_are_bounded_per_call_keeping_the_newest(h: Harness) -> None:
    bus = h.runtime.bus
    bus.publish(ErrorClassified("db", CONNECTION, 1))
    for attempt in range(1, 51):
        bus.publish(RetryScheduled("db", attempt, 0.0, CONNECTION, Strategy.RECONNECT))
    bus.publish(
        RecoveryFinished("db", Strategy.RECONNECT, Outcome.RECOVERED, 51, 1.0, "connection")
    )
    (recovery,) = h.spans()
    assert len(recovery.events) == MAX_EVENTS_PER_CALL
    attempts = [(e.attributes or {})["raptor.recovery.attempt"] for e in recovery.events]
    assert attempts == list(range(51 - MAX_EVENTS_PER_CALL, 51))


def test_pending_calls_are_bounded_per_context(h: Harness) -> None:
    bus = h.runtime.bus
    services = [f"svc{i}" for i in range(MAX_PENDING_CALLS + 3)]
    for service in services:
        bus.publish(ErrorClassified(service, CONNECTION, 1))
    for service in services:
        bus.publish(
            RecoveryFinished(
                service,
                Strategy.RECONNECT,
                Outcome.FAILED,
                1,
                0.1,
                "connection",
                "attempts_exhausted",
            )
        )
    with_events = [(s.attributes or {})["raptor.service"] for s in h.spans() if s.events]
    assert with_events == services[-MAX_PENDING_CALLS:]  # the oldest three were dropped
    assert len(h.spans()) == len(services)  # every call still gets its span


def test_concurrent_asyncio_tasks_keep_their_own_events(h: Harness) -> None:
    bus = h.runtime.bus

    async def call(classification: Classification, delay: float) -> None:
        bus.publish(ErrorClassified("db", classification, 1))
        await asyncio.sleep(0)
        bus.publish(RetryScheduled("db", 1, delay, classification, Strategy.RECONNECT))
        await asyncio.sleep(0)
        bus.publish(
            RecoveryFinished(
                "db", Strategy.RECONNECT, Outcome.RECOVERED, 2, delay, classification.category.value
            )
        )

    async def main() -> None:
        # The parent has an entry for db too; the tasks inherit a copy, never share it.
        bus.publish(ErrorClassified("db", CONNECTION, 1))
        await asyncio.gather(call(CONNECTION, 0.1), call(RATE_LIMITED, 0.2))
        bus.publish(
            RecoveryFinished(
                "db", Strategy.RECONNECT, Outcome.FAILED, 1, 0.3, "connection", "not_retryable"
            )
        )

    asyncio.run(main())
    by_category = {
        (s.attributes or {})["raptor.error.category"]: [
            (e.name, (e.attributes or {})["raptor.error.category"]) for e in s.events
        ]
        for s in h.spans()
        if (s.attributes or {})["raptor.recovery.outcome"] == "recovered"
    }
    assert by_category == {
        "connection": [("raptor.error", "connection"), ("raptor.retry", "connection")],
        "rate_limit": [("raptor.error", "rate_limit"), ("raptor.retry", "rate_limit")],
    }
    (parent_call,) = [
        s for s in h.spans() if (s.attributes or {})["raptor.recovery.outcome"] == "failed"
    ]
    assert [e.name for e in parent_call.events] == ["raptor.error"]


def test_a_task_spawned_during_a_recovery_keeps_its_events_off_the_ended_span(
    h: Harness,
) -> None:
    # A task created inside the recovery scope inherits its context, and with it the live
    # recovery span. Once that call had ended, the task's own failed call still added its
    # events to the ended span (the SDK drops them with a warning) and its span had none.
    bus = h.runtime.bus
    release = asyncio.Event()

    async def spawned() -> None:
        await release.wait()
        bus.publish(ErrorClassified("db", RATE_LIMITED, 1))
        bus.publish(
            RecoveryFinished(
                "db", Strategy.RETRY_WITH_BACKOFF, Outcome.FAILED, 1, 0.1, "rate_limit", "x"
            )
        )

    async def main() -> None:
        with h.sink.recovery_scope("db", h.clock.monotonic()):
            task = asyncio.ensure_future(spawned())
            bus.publish(ErrorClassified("db", CONNECTION, 1))
            bus.publish(
                RecoveryFinished(
                    "db", Strategy.RETRY_WITH_BACKOFF, Outcome.RECOVERED, 2, 0.2, "connection"
                )
            )
        release.set()
        await task

    asyncio.run(main())
    events = {
        (s.attributes or {})["raptor.recovery.outcome"]: [
            (e.attributes or {})["raptor.error.category"] for e in s.events
        ]
        for s in h.spans()
    }
    assert events == {"recovered": ["connection"], "failed": ["rate_limit"]}


def test_a_recovery_scope_that_fails_to_enter_leaves_nothing_behind(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The span was started and made the live recovery before the context attach failed; no
    # exit followed, so it never ended and later calls' events landed on it.
    from opentelemetry import context as otel_context

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("attach failed")

    with monkeypatch.context() as patch:
        patch.setattr(otel_context, "attach", broken)
        scope = h.sink.recovery_scope("db", h.clock.monotonic())
        with pytest.raises(RuntimeError, match="attach failed"):
            scope.__enter__()
    assert [s.name for s in h.spans()] == ["raptor.recovery"]  # ended, not left open
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    h.runtime.bus.publish(
        RecoveryFinished("db", Strategy.RECONNECT, Outcome.RECOVERED, 2, 0.2, "connection")
    )
    spans = h.spans()
    assert len(spans) == 2
    assert [e.name for e in spans[1].events] == ["raptor.error"]


def test_threads_keep_their_own_events(h: Harness) -> None:
    bus = h.runtime.bus
    barrier = threading.Barrier(2)

    def call(classification: Classification) -> None:
        bus.publish(ErrorClassified("db", classification, 1))
        barrier.wait()
        bus.publish(RetryScheduled("db", 1, 0.1, classification, Strategy.RECONNECT))
        barrier.wait()
        bus.publish(
            RecoveryFinished(
                "db", Strategy.RECONNECT, Outcome.RECOVERED, 2, 0.1, classification.category.value
            )
        )

    threads = [threading.Thread(target=call, args=(c,)) for c in (CONNECTION, RATE_LIMITED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    spans = h.spans()
    assert len(spans) == 2
    for span in spans:
        category = (span.attributes or {})["raptor.error.category"]
        assert [(e.attributes or {})["raptor.error.category"] for e in span.events] == [
            category,
            category,
        ]


def test_unknown_events_are_ignored(h: Harness) -> None:
    @dataclass(frozen=True)
    class FailurePredicted:
        service: str

    h.sink.publish(FailurePredicted("db"))  # type: ignore[arg-type]  # a future event type
    assert h.metrics().get("raptor.errors") is None
    assert h.spans() == ()


def test_a_bad_duration_is_recorded_as_zero(h: Harness) -> None:
    h.runtime.bus.publish(
        RecoveryFinished(
            "db",
            Strategy.RECONNECT,
            Outcome.FAILED,
            1,
            float("nan"),
            "connection",
            "attempts_exhausted",
        )
    )
    ((_, histogram),) = h.points("raptor.recovery.duration").items()
    assert histogram.sum == 0.0
    (recovery,) = h.spans()
    assert recovery.start_time == recovery.end_time


# ------------------------------------------------------------------------------ gauges


def test_gauges_read_breaker_and_budget_snapshots(h: Harness) -> None:
    db = h.runtime.breakers.get("db")
    h.runtime.breakers.get("cache")
    trip(db)
    assert h.runtime.withdraw(h.runtime.downstream("db"), h.clock.monotonic())

    state = h.points("raptor.circuit_breaker.state")
    assert state == {
        attrs(raptor__circuit_breaker__name="db", raptor__circuit_breaker__state="closed"): 0,
        attrs(raptor__circuit_breaker__name="db", raptor__circuit_breaker__state="open"): 1,
        attrs(raptor__circuit_breaker__name="db", raptor__circuit_breaker__state="half_open"): 0,
        attrs(raptor__circuit_breaker__name="cache", raptor__circuit_breaker__state="closed"): 1,
        attrs(raptor__circuit_breaker__name="cache", raptor__circuit_breaker__state="open"): 0,
        attrs(raptor__circuit_breaker__name="cache", raptor__circuit_breaker__state="half_open"): 0,
    }
    assert h.points("raptor.circuit_breaker.health") == {
        attrs(raptor__circuit_breaker__name="db"): 0,
        attrs(raptor__circuit_breaker__name="cache"): 100,
    }
    assert h.points("raptor.circuit_breaker.failure_rate_threshold") == {
        attrs(raptor__circuit_breaker__name="db"): 0.5,
        attrs(raptor__circuit_breaker__name="cache"): 0.5,
    }
    tokens = h.runtime.budget_tokens()["db"]
    assert h.points("raptor.retry_budget.tokens") == {attrs(raptor__service="db"): tokens}
    metrics = h.metrics()
    assert [
        metrics[n].unit
        for n in (
            "raptor.circuit_breaker.state",
            "raptor.circuit_breaker.health",
            "raptor.circuit_breaker.failure_rate_threshold",
            "raptor.retry_budget.tokens",
        )
    ] == ["1", "%", "1", "{token}"]
    # The trip came through the bus: the transition was counted too.
    assert h.points("raptor.circuit_breaker.transitions") == {
        attrs(
            raptor__circuit_breaker__name="db",
            raptor__circuit_breaker__from_state="closed",
            raptor__circuit_breaker__to_state="open",
            raptor__circuit_breaker__transition__reason="consecutive_failures",
        ): 1
    }


def test_gauges_never_wait_on_our_locks(h: Harness) -> None:
    # The metrics SDK runs gauge callbacks inside its collection lock. A callback waiting on
    # one of our locks while a fork's preparation holds it (forksafe acquires them all) would
    # fork the child with the SDK's lock held: its metrics would never export again. Here the
    # locks are held by this thread, as the forking thread holds them.
    db = h.runtime.breakers.get("db")
    h.runtime.breakers.get("cache")
    h.runtime.downstream("db")
    held = [db._lock, h.runtime.downstream("db")._lock, h.runtime.breakers._lock]
    for lock in held:
        lock.acquire()
    try:
        collected: list[dict[str, Metric]] = []
        collector = threading.Thread(target=lambda: collected.append(h.metrics()), daemon=True)
        collector.start()
        collector.join(timeout=5)
        assert not collector.is_alive(), "a gauge waited on a lock held across a fork"
    finally:
        for lock in held:
            lock.release()
    (metrics,) = collected
    # The busy breaker and downstream sit this reading out; the others are read.
    health = metrics["raptor.circuit_breaker.health"].data.data_points
    assert [dict(p.attributes or {}) for p in health] == [{"raptor.circuit_breaker.name": "cache"}]
    assert h.points("raptor.circuit_breaker.health") == {
        attrs(raptor__circuit_breaker__name="db"): 100,
        attrs(raptor__circuit_breaker__name="cache"): 100,
    }


def test_events_are_written_to_the_sdk_under_a_lock_a_fork_waits_for(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The metrics SDK does not replace its instruments' locks in a forked child: a fork that
    # catches one of our threads inside a recording leaves that instrument locked there for
    # ever (seen: 21 of 100 children of a busy process). Recording holds a lock that forksafe
    # takes before every fork, so a fork waits for the recording in flight.
    held_while_recording: list[bool] = []
    counter = h.sink._instruments.errors
    add = counter.add

    def spying_add(*args: Any, **kwargs: Any) -> None:
        lock = h.sink._recording
        free_elsewhere = threading.Thread(
            target=lambda: held_while_recording.append(not lock.acquire(blocking=False))
        )
        free_elsewhere.start()
        free_elsewhere.join()
        add(*args, **kwargs)

    monkeypatch.setattr(counter, "add", spying_add)
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    assert held_while_recording == [True]
    assert any(ref() is h.sink and name == "_recording" for ref, name in forksafe._locks), (
        "the recording lock is not taken before a fork"
    )


def test_half_open_health_is_capped(h: Harness) -> None:
    db = h.runtime.breakers.get("db")
    trip(db)
    h.clock.advance(db.config.max_recovery_timeout + 1)
    db.acquire()  # the probe turns it half-open
    assert db.state is CircuitState.HALF_OPEN
    assert (
        h.points("raptor.circuit_breaker.state")[
            attrs(raptor__circuit_breaker__name="db", raptor__circuit_breaker__state="half_open")
        ]
        == 1
    )
    assert (
        h.points("raptor.circuit_breaker.health")[attrs(raptor__circuit_breaker__name="db")] <= 50
    )


def test_a_failing_gauge_reports_nothing_and_logs_once(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = h.runtime.breakers.get("db")

    def broken() -> Any:
        raise RuntimeError("snapshot failed")

    monkeypatch.setattr(CircuitBreaker, "try_snapshot", lambda self: broken())
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        points = h.points("raptor.circuit_breaker.health")
        h.points("raptor.circuit_breaker.health")
    assert points == {}
    assert h.points("raptor.circuit_breaker.state")  # the other gauges still report
    messages = [r.getMessage() for r in caplog.records]
    assert sum("raptor.circuit_breaker.health" in m for m in messages) == 1
    assert breaker.state is CircuitState.CLOSED


def test_uninstall_stops_events_and_silences_the_gauges(h: Harness) -> None:
    h.runtime.breakers.get("db")
    assert h.points("raptor.circuit_breaker.state")
    h.sink.uninstall()
    assert not h.sink.installed
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    assert h.points("raptor.errors") == {}
    assert h.points("raptor.circuit_breaker.state") == {}


def test_a_sink_installed_after_another_reports_through_the_same_gauges(h: Harness) -> None:
    h.sink.uninstall()
    runtime = Runtime(clock=FakeClock())
    runtime.breakers.get("other-db")
    second = TelemetrySink(
        runtime=runtime, tracer_provider=h.tracer_provider, meter_provider=h.meter_provider
    )
    second.install()
    second.install()  # idempotent
    try:
        assert h.points("raptor.circuit_breaker.health") == {
            attrs(raptor__circuit_breaker__name="other-db"): 100
        }
    finally:
        second.uninstall()


def test_install_is_idempotent(h: Harness) -> None:
    h.sink.install()
    h.runtime.bus.publish(ErrorClassified("db", CONNECTION, 1))
    assert list(h.points("raptor.errors").values()) == [1]


# ------------------------------------------------------------------------- cardinality


def test_services_beyond_the_cap_fold_into_other() -> None:
    harness = make_harness(max_services=3)
    for index in range(10):
        harness.sink.publish(ErrorClassified(f"host{index}:443", CONNECTION, 1))
    services = sorted(dict(key)["raptor.service"] for key in harness.points("raptor.errors"))
    assert services == ["host0:443", "host1:443", "host2:443", "other"]
    assert sum(harness.points("raptor.errors").values()) == 10
    # Spans carry the real name: it creates no time series.
    harness.sink.publish(
        RecoveryFinished(
            "host9:443", Strategy.FAIL_FAST, Outcome.FAILED, 1, 0.0, "connection", "not_retryable"
        )
    )
    (span,) = harness.spans()
    assert (span.attributes or {})["raptor.service"] == "host9:443"


def test_breaker_names_beyond_the_cap_fold_into_other() -> None:
    harness = make_harness(max_breakers=2)
    for index in range(5):
        harness.sink.publish(CallRejected(f"b{index}", CircuitState.OPEN, 1.0))
    assert sorted(
        dict(k)["raptor.circuit_breaker.name"]
        for k in harness.points("raptor.circuit_breaker.rejections")
    ) == ["b0", "b1", "other"]


def test_error_types_beyond_the_cap_become_semconv_other() -> None:
    harness = make_harness()
    for index in range(200):
        classification = Classification(
            category=ErrorCategory.UNKNOWN,
            severity=Severity.LOW,
            retryable=False,
            error_type=f"app.Error{index}",
        )
        harness.sink.publish(ErrorClassified("db", classification, 1))
    types = {dict(key)["error.type"] for key in harness.points("raptor.errors")}
    assert len(types) == 129
    assert "_OTHER" in types
    assert (
        harness.points("raptor.errors")[
            attrs(
                raptor__service="db",
                raptor__error__category="unknown",
                raptor__error__severity="low",
                error__type="_OTHER",
            )
        ]
        == 200 - 128
    )


def test_bad_caps_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.max_services"):
        TelemetrySink(runtime=Runtime(), max_services=0)


# ---------------------------------------------------------------------- exception safety


class _Exploding:
    """Any attribute access returns a callable that raises."""

    def __getattr__(self, name: str) -> Any:
        def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"broken {name}")

        return explode


class ExplodingInstrumentsMeterProvider(NoOpMeterProvider):
    """A meter provider whose instruments raise on every record."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        class Meter:
            def __getattr__(self, name: str) -> Any:
                return lambda *a, **k: _Exploding()

        return Meter()


class ExplodingTracerProvider(trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return _Exploding()


class BrokenProvider(NoOpMeterProvider):
    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no meter for you")


ALL_EVENTS = (
    ErrorClassified("db", CONNECTION, 1),
    RetryScheduled("db", 1, 0.1, CONNECTION, Strategy.RECONNECT),
    RetryBudgetExhausted("db", CONNECTION),
    BreakerTransitioned(
        "db", CircuitState.CLOSED, CircuitState.OPEN, TransitionReason.FAILURE_RATE
    ),
    CallRejected("db", CircuitState.OPEN, 1.0),
    RecoveryFinished("db", Strategy.RECONNECT, Outcome.FAILED, 1, 0.1, "connection", "deadline"),
)


def test_a_meter_provider_that_raises_on_record_never_reaches_the_publisher(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime(clock=FakeClock())
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = TelemetrySink(
        runtime=runtime,
        tracer_provider=tracer_provider,
        meter_provider=ExplodingInstrumentsMeterProvider(),
    )
    sink.install()
    seen: list[object] = []
    runtime.bus.subscribe(seen.append)  # a later subscriber still gets every event
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        for event in ALL_EVENTS:
            runtime.bus.publish(event)
    assert seen == list(ALL_EVENTS)
    (recovery,) = exporter.get_finished_spans()  # tracing still works
    assert [e.name for e in recovery.events] == [
        "raptor.error",
        "raptor.retry",
        "raptor.retry_budget.exhausted",
    ]
    assert any("telemetry.metrics" in r.getMessage() for r in caplog.records)
    sink.uninstall()


def test_a_tracer_that_raises_never_reaches_the_publisher() -> None:
    harness = make_harness()
    sink = TelemetrySink(
        runtime=harness.runtime,
        tracer_provider=ExplodingTracerProvider(),
        meter_provider=harness.meter_provider,
    )
    for event in ALL_EVENTS:
        sink.publish(event)
    assert list(harness.points("raptor.errors").values()) == [1]  # metrics still work


def test_a_provider_that_cannot_make_a_meter_degrades_to_no_op(
    caplog: pytest.LogCaptureFixture,
) -> None:
    safety._reset_for_tests()
    runtime = Runtime()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        sink = TelemetrySink(runtime=runtime, meter_provider=BrokenProvider())
        sink.install()
        for event in ALL_EVENTS:
            sink.publish(event)  # never raises
        sink.uninstall()
    assert type(sink._meter).__name__ == "NoOpMeter"
    assert type(sink._instruments.errors).__name__ == "NoOpCounter"
    assert "telemetry.meter" in caplog.text  # reported once, not raised
    assert not sink.installed


def test_gauges_survive_a_runtime_that_raises(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Mapping[str, float]:
        raise RuntimeError("budget read failed")

    monkeypatch.setattr(h.runtime, "budget_tokens", broken)
    assert h.points("raptor.retry_budget.tokens") == {}


# ------------------------------------------------------------------------- end to end


def test_a_guarded_call_produces_the_documented_telemetry(h: Harness) -> None:
    failures = [ConnectionError("refused"), ConnectionError("refused")]

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    def classify(exc: BaseException, *, context: object = None) -> Classification:
        return CONNECTION

    guard = Guard(
        "db",
        retry=RetryPolicy(max_retries=3, base_delay=0.1),
        runtime=h.runtime,
        classifier=classify,
        rnd=lambda: 0.5,
    )
    with h.tracer().start_as_current_span("handler"):
        assert guard.call(flaky) == "ok"

    assert sum(h.points("raptor.errors").values()) == 2
    assert sum(h.points("raptor.retries").values()) == 2
    (outcome,) = [dict(k)["raptor.recovery.outcome"] for k in h.points("raptor.recoveries")]
    assert outcome == "recovered"
    recovery = next(s for s in h.spans() if s.name == "raptor.recovery")
    assert [e.name for e in recovery.events] == [
        "raptor.error",
        "raptor.retry",
        "raptor.error",
        "raptor.retry",
    ]
    assert (recovery.attributes or {})["raptor.recovery.attempts"] == 3


# ------------------------------------------------------------------------------- cost


def test_publishing_a_retry_is_cheap(h: Harness) -> None:
    """The failure path's cost, printed with ``-s``; asserted only loosely (shared CI)."""
    event = RetryScheduled("db", 1, 0.1, CONNECTION, Strategy.RECONNECT)
    publish = h.sink.publish
    publish(ErrorClassified("db", CONNECTION, 1))
    rounds = 2000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            publish(event)
        best = min(best, (time.perf_counter() - start) / rounds)
    print(f"\nRetryScheduled through the sink (SDK meter): {best * 1e6:.1f} us")
    assert best < 1e-3


_GLOBAL_PROVIDERS_SCRIPT = """
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink

runtime = Runtime()
runtime.breakers.get("db")
first = TelemetrySink(runtime=runtime)  # before any provider is set
first.install()
first.uninstall()
sink = TelemetrySink(runtime=runtime)
sink.install()

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)

c = Classification(ErrorCategory.TIMEOUT, Severity.LOW, True, "TimeoutError")
runtime.bus.publish(ErrorClassified("db", c, 1))
runtime.bus.publish(
    RecoveryFinished("db", Strategy.FAIL_FAST, Outcome.FAILED, 1, 0.1, "timeout", "deadline")
)
names = sorted(
    m.name
    for rm in reader.get_metrics_data().resource_metrics
    for sm in rm.scope_metrics
    for m in sm.metrics
)
print(names)
print([s.name for s in exporter.get_finished_spans()])
"""


def test_global_providers_set_after_install_are_picked_up() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _GLOBAL_PROVIDERS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    names, spans = result.stdout.splitlines()
    assert ast.literal_eval(names) == [
        "raptor.circuit_breaker.failure_rate_threshold",
        "raptor.circuit_breaker.health",
        "raptor.circuit_breaker.state",
        "raptor.errors",
        "raptor.recoveries",
        "raptor.recovery.duration",
    ]
    assert spans == "['raptor.recovery']"


def test_a_span_export_in_one_thread_holds_no_other_threads_call() -> None:
    # Ending a span exports it with a SimpleSpanProcessor; the sink did that under the lock
    # every publish takes, so a memory cleanup's span stuck exporting (a collector that does
    # not answer) held every event loop's guarded call on its failure path until it ended.
    release = threading.Event()
    exporting = threading.Event()

    class StuckExporter(InMemorySpanExporter):
        def export(self, spans: Any) -> Any:
            if any(span.name == "raptor.memory.cleanup" for span in spans):
                exporting.set()
                release.wait(10)
            return super().export(spans)

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(StuckExporter()))
    runtime = Runtime()
    sink = TelemetrySink(
        runtime=runtime, tracer_provider=tracer_provider, meter_provider=NoOpMeterProvider()
    )
    sink.install()
    cleanup = MemoryCleanupFinished("standard", "scheduled", 0, 0, 0.1)
    stuck = threading.Thread(target=runtime.publish, args=(cleanup,))
    stuck.start()
    try:
        assert exporting.wait(5)
        guard = Guard("svc", retry=RetryPolicy(max_retries=1, base_delay=0.0), runtime=runtime)
        finished: list[str] = []

        def loop_thread() -> None:
            async def main() -> None:
                for _ in range(5):
                    failed = False

                    async def flaky() -> str:
                        nonlocal failed
                        if not failed:
                            failed = True
                            raise ConnectionResetError(104, "reset")
                        return "ok"

                    finished.append(await guard.call_async(flaky))  # publishes 3 events

            asyncio.run(main())

        loops = [threading.Thread(target=loop_thread) for _ in range(3)]
        for started in loops:
            started.start()
        for started in loops:
            started.join(timeout=5)
        assert finished == ["ok"] * 15  # all done while the export was still stuck
    finally:
        release.set()
        stuck.join(timeout=10)
        sink.uninstall()


# --- raptor.internal.errors -------------------------------------------------------------


def test_internal_errors_count_every_bug_by_site_while_the_log_says_it_once(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("a bug in a subscriber")

    h.runtime.bus.subscribe(broken)
    guard = Guard("payments", runtime=h.runtime, retry=RetryPolicy(base_delay=0.01, jitter="none"))
    attempts = 0

    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts % 2:
            raise TimeoutError
        return "ok"

    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        for _ in range(3):
            assert guard.call(flaky) == "ok"  # the app's result, unchanged
    site = f"event subscriber {broken.__qualname__}"
    logged = [r for r in caplog.records if site in r.getMessage()]
    assert len(logged) == 1
    counted = h.points("raptor.internal.errors")
    assert counted == {
        attrs(raptor__internal__site=site): counted[attrs(raptor__internal__site=site)]
    }
    # Each failed call publishes several events, each of which met the bug.
    assert counted[attrs(raptor__internal__site=site)] >= 3
    metric = h.metrics()["raptor.internal.errors"]
    assert metric.unit == "{error}"
    assert metric.data.is_monotonic  # type: ignore[union-attr]  # a Sum


def test_internal_errors_stay_within_256_sites_and_never_go_back(h: Harness) -> None:
    assert h.points("raptor.internal.errors") == {}
    for number in range(300):
        safety.report_internal_error(f"site {number}")
    first = h.points("raptor.internal.errors")
    assert len(first) == 257
    assert first[attrs(raptor__internal__site="site 0")] == 1
    assert first[attrs(raptor__internal__site="other")] == 44
    assert attrs(raptor__internal__site="site 299") not in first
    safety.report_internal_error("site 0")
    safety.report_internal_error("site 298")
    second = h.points("raptor.internal.errors")
    assert second[attrs(raptor__internal__site="site 0")] == 2
    assert second[attrs(raptor__internal__site="other")] == 45
    assert all(second[key] >= value for key, value in first.items())
