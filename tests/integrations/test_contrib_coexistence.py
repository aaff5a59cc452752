"""Raptor with the contrib requests/httpx instrumentations, in both load orders.

Each attempt must be its own HTTP client span (the contrib span), the retries children of the
``raptor.recovery`` span, and resends marked ``http.request.resend_count`` (by
:class:`ResendCountSpanProcessor`: the contrib instrumentations, 0.66b2, do not set it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_raptor.config import RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import RESEND_COUNT_ATTRIBUTE, ResendCountSpanProcessor
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink
from tests.support.faulty_http import FaultyHTTPServer, ok, status

ORIGINALS = {
    "Session.request": requests.Session.request,
    "Session.send": requests.Session.send,
    "Client.send": httpx.Client.send,
    "AsyncClient.send": httpx.AsyncClient.send,
    "HTTPTransport.handle_request": httpx.HTTPTransport.handle_request,
    "AsyncHTTPTransport.handle_async_request": httpx.AsyncHTTPTransport.handle_async_request,
}


def current_originals() -> dict[str, Any]:
    return {
        "Session.request": requests.Session.request,
        "Session.send": requests.Session.send,
        "Client.send": httpx.Client.send,
        "AsyncClient.send": httpx.AsyncClient.send,
        "HTTPTransport.handle_request": httpx.HTTPTransport.handle_request,
        "AsyncHTTPTransport.handle_async_request": httpx.AsyncHTTPTransport.handle_async_request,
    }


def get_with_requests(url: str) -> int:
    return requests.get(url).status_code


def get_with_httpx(url: str) -> int:
    with httpx.Client() as client:
        return client.get(url).status_code


def get_with_httpx_async(url: str) -> int:
    async def send() -> int:
        async with httpx.AsyncClient() as client:
            return (await client.get(url)).status_code

    return asyncio.run(send())


CLIENTS: dict[str, tuple[Callable[[str], int], Any, Any]] = {
    "requests": (get_with_requests, RequestsInstrumentor, RequestsIntegration),
    "httpx": (get_with_httpx, HTTPXClientInstrumentor, HttpxIntegration),
    "httpx-async": (get_with_httpx_async, HTTPXClientInstrumentor, HttpxIntegration),
}


class Setup:
    def __init__(self, exporter: InMemorySpanExporter, provider: TracerProvider) -> None:
        self.exporter = exporter
        self.provider = provider
        self.undo: list[Callable[[], None]] = []

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]


@pytest.fixture
def setup() -> Iterator[Setup]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(ResendCountSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    state = Setup(exporter, provider)
    yield state
    for undo in reversed(state.undo):
        undo()
    assert current_originals() == ORIGINALS


def instrument(setup: Setup, client: str, order: str) -> None:
    _, contrib_class, raptor_class = CLIENTS[client]
    runtime = Runtime()
    sink = TelemetrySink(
        runtime=runtime,
        tracer_provider=setup.provider,
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
    )
    sink.install()
    setup.undo.append(sink.uninstall)
    settings = IntegrationSettings(
        runtime=runtime,
        config=RaptorConfig(
            retry=RetryPolicy(base_delay=0.01, max_delay=0.02),
            breaker=CircuitBreakerConfig(failure_threshold=10),
        ),
    )
    contrib = contrib_class()
    raptor = raptor_class()

    def load_contrib() -> None:
        contrib.instrument(tracer_provider=setup.provider)
        setup.undo.append(contrib.uninstrument)

    def load_raptor() -> None:
        raptor.install(settings)
        setup.undo.append(raptor.uninstall)

    first, second = (
        (load_contrib, load_raptor)
        if order == "contrib-first"
        else (
            load_raptor,
            load_contrib,
        )
    )
    first()
    second()


@pytest.mark.parametrize("order", ["contrib-first", "raptor-first"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_each_attempt_is_its_own_client_span_under_the_recovery_span(
    setup: Setup, client: str, order: str
) -> None:
    instrument(setup, client, order)
    get = CLIENTS[client][0]
    tracer = setup.provider.get_tracer("test")
    with FaultyHTTPServer([status(503), status(503), ok("third time")]) as server:
        with tracer.start_as_current_span("handler") as handler:
            assert get(server.url("/api")) == 200
        assert server.count() == 3

    attempts = [s for s in setup.spans() if s.kind is SpanKind.CLIENT]
    assert len(attempts) == 3
    assert [(s.attributes or {}).get(RESEND_COUNT_ATTRIBUTE) for s in attempts] == [None, 1, 2]
    statuses = [
        (s.attributes or {}).get(
            "http.status_code", (s.attributes or {}).get("http.response.status_code")
        )
        for s in attempts
    ]
    assert statuses == [503, 503, 200]
    (recovery,) = setup.spans("raptor.recovery")
    assert (recovery.attributes or {})["raptor.recovery.outcome"] == "recovered"
    handler_id = handler.get_span_context().span_id
    assert recovery.parent is not None
    assert recovery.parent.span_id == handler_id
    # The first attempt ran before anything had failed; the retries ran inside the recovery.
    assert attempts[0].parent is not None
    assert attempts[0].parent.span_id == handler_id
    for retry in attempts[1:]:
        assert retry.parent is not None
        assert retry.parent.span_id == recovery.context.span_id


@pytest.mark.parametrize("client", list(CLIENTS))
def test_the_contrib_instrumentations_do_not_set_resend_count_themselves(client: str) -> None:
    """What we observed (0.66b2): without our processor, no resend is marked."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, contrib_class, raptor_class = CLIENTS[client]
    contrib, raptor = contrib_class(), raptor_class()
    contrib.instrument(tracer_provider=provider)
    raptor.install(
        IntegrationSettings(
            runtime=Runtime(), config=RaptorConfig(retry=RetryPolicy(base_delay=0.01))
        )
    )
    try:
        with FaultyHTTPServer([status(503), ok()]) as server:
            assert CLIENTS[client][0](server.url("/")) == 200
    finally:
        raptor.uninstall()
        contrib.uninstrument()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert all(RESEND_COUNT_ATTRIBUTE not in (s.attributes or {}) for s in spans)
    assert current_originals() == ORIGINALS
