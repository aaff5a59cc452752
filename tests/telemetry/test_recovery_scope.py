"""The guard's retries run inside a live ``raptor.recovery`` span (the recovery scope)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from otel_raptor import Guard, RetryPolicy
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink


@pytest.fixture
def setup() -> Iterator[tuple[Runtime, TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    runtime = Runtime()
    sink = TelemetrySink(
        runtime=runtime, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    sink.install()
    yield runtime, tracer_provider, exporter
    sink.uninstall()
    assert runtime.recovery_scope.__name__ == "_no_scope"


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_retry_attempts_are_children_of_the_recovery_span(
    setup: tuple[Runtime, TracerProvider, InMemorySpanExporter],
) -> None:
    runtime, tracer_provider, exporter = setup
    tracer = tracer_provider.get_tracer("client")
    attempts = 0

    def call() -> str:
        nonlocal attempts
        attempts += 1
        with tracer.start_as_current_span("GET"):  # stands in for the contrib client span
            if attempts < 3:
                raise ConnectionResetError(104, "reset")
            return "ok"

    guard = Guard("api", retry=RetryPolicy(base_delay=0.001), breaker=False, runtime=runtime)
    with tracer.start_as_current_span("request handler") as parent:
        assert guard.call(call) == "ok"
    spans = exporter.get_finished_spans()
    (recovery,) = by_name(spans, "raptor.recovery")
    gets = by_name(spans, "GET")
    assert len(gets) == 3
    assert recovery.parent is not None
    assert recovery.parent.span_id == parent.get_span_context().span_id
    # the first attempt ended before recovery began: a sibling; the retries are children
    assert gets[0].parent is not None
    assert gets[0].parent.span_id == parent.get_span_context().span_id
    for retry in gets[1:]:
        assert retry.parent is not None
        assert retry.parent.span_id == recovery.context.span_id
    assert recovery.start_time is not None
    assert gets[0].start_time is not None
    assert recovery.start_time <= gets[0].start_time + 1_000_000  # starts with attempt one
    assert recovery.attributes is not None
    assert recovery.attributes["raptor.recovery.outcome"] == "recovered"
    assert recovery.attributes["raptor.recovery.attempts"] == 3
    names = [e.name for e in recovery.events]
    assert names.count("raptor.retry") == 2
    assert names.count("raptor.error") == 2
    assert recovery.status.status_code is StatusCode.UNSET


def test_a_failed_recovery_marks_its_span_as_an_error(
    setup: tuple[Runtime, TracerProvider, InMemorySpanExporter],
) -> None:
    runtime, _, exporter = setup
    guard = Guard("api", retry=RetryPolicy(max_retries=1, base_delay=0.001), runtime=runtime)

    def always() -> None:
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        guard.call(always)
    (recovery,) = by_name(exporter.get_finished_spans(), "raptor.recovery")
    assert recovery.status.status_code is StatusCode.ERROR
    assert recovery.attributes is not None
    assert recovery.attributes["error.type"] == "TimeoutError"
    assert recovery.attributes["raptor.recovery.give_up_reason"] == "attempts_exhausted"


async def test_async_recoveries_get_their_own_spans(
    setup: tuple[Runtime, TracerProvider, InMemorySpanExporter],
) -> None:
    runtime, _, exporter = setup
    guard = Guard("api", retry=RetryPolicy(base_delay=0.001), breaker=False, runtime=runtime)

    async def flaky(state: list[int]) -> int:
        state.append(1)
        if len(state) == 1:
            raise ConnectionResetError(104, "reset")
        return len(state)

    results = await asyncio.gather(*(guard.call_async(flaky, []) for _ in range(5)))
    assert results == [2] * 5
    recoveries = by_name(exporter.get_finished_spans(), "raptor.recovery")
    assert len(recoveries) == 5
    for span in recoveries:
        assert span.attributes is not None
        assert span.attributes["raptor.recovery.attempts"] == 2
        assert [e.name for e in span.events].count("raptor.retry") == 1
