"""The one-line path: an app that sets up the SDK itself and calls ``instrument()``.

``python manual_client.py URL AFTER_URL`` builds a ``TracerProvider`` (``BatchSpanProcessor``
+ ``OTLPSpanExporter``) and a ``MeterProvider`` (``PeriodicExportingMetricReader`` +
``OTLPMetricExporter``), both configured by the standard ``OTEL_*`` variables, notes every
function the integrations hook, and then:

1. ``RaptorInstrumentor().instrument(tracer_provider=..., meter_provider=..., retry=...,
   breaker=..., asyncio_timeouts=True)``;
2. against ``URL`` (scripted by the test: 503, 503, 200, 503, 200, 503, 200): a requests GET
   ``/requests``, an httpx GET ``/httpx`` and an httpx ``AsyncClient`` GET ``/async``, each
   recovered by retries; and one ``asyncio.wait_for`` that times out; then it flushes the
   metrics once (so the gauges are read while instrumented);
3. ``uninstrument()``, then checks that every hooked function is the very object it was
   before ``instrument()``;
4. against ``AFTER_URL`` (answering 503): one GET with requests and one with httpx, which must
   now reach the server once each and produce no raptor telemetry, and another
   ``wait_for`` timeout;
5. shuts both providers down (flushing them) and prints ``RESULT <json>``.
"""

from __future__ import annotations

import asyncio
import asyncio.tasks
import json
import sys
from typing import Any

import httpx
import requests
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_raptor import CircuitBreakerConfig, RaptorInstrumentor, RetryPolicy


def hooked() -> dict[str, tuple[object, str]]:
    """Every (owner, attribute) an integration may replace, by a readable name."""
    targets: dict[str, tuple[object, str]] = {
        "requests.Session.request": (requests.Session, "request"),
        "requests.Session.send": (requests.Session, "send"),
        "httpx.Client.send": (httpx.Client, "send"),
        "httpx.AsyncClient.send": (httpx.AsyncClient, "send"),
        "asyncio.wait_for": (asyncio, "wait_for"),
        "asyncio.tasks.wait_for": (asyncio.tasks, "wait_for"),
        "asyncio.BaseEventLoop.call_exception_handler": (
            asyncio.BaseEventLoop,
            "call_exception_handler",
        ),
    }
    from asyncio import timeouts

    targets["asyncio.timeouts.Timeout.__aexit__"] = (timeouts.Timeout, "__aexit__")
    return targets


def snapshot() -> dict[str, object]:
    # The owner's own attribute: getattr on a class would bind descriptors anew each time.
    return {name: vars(owner)[attribute] for name, (owner, attribute) in hooked().items()}


async def timed_out() -> bool:
    try:
        await asyncio.wait_for(asyncio.sleep(5), timeout=0.01)
    except TimeoutError:
        return True
    return False


async def async_get(url: str) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(url)).status_code


def main() -> None:
    base, after = sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/")
    resource = Resource.create()  # OTEL_SERVICE_NAME
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
    )
    tracer = tracer_provider.get_tracer("manual_client")
    before = snapshot()

    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        retry=RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.05, jitter="none"),
        breaker=CircuitBreakerConfig(failure_threshold=5, recovery_timeout=0.3),
        asyncio_timeouts=True,  # record the wait_for timeout below (off by default)
    )
    hooked_now = sorted(name for name, value in snapshot().items() if value is not before[name])
    result: dict[str, Any] = {"hooked": hooked_now}
    with tracer.start_as_current_span("app instrumented"):
        with requests.Session() as session:
            result["requests"] = session.get(base + "/requests", timeout=5).status_code
        with httpx.Client(timeout=5) as client:
            result["httpx"] = client.get(base + "/httpx").status_code
        result["async"] = asyncio.run(async_get(base + "/async"))
        result["timed_out"] = asyncio.run(timed_out())
    # Export once while instrumented: the gauges are read, the counters' totals are pinned.
    result["flushed"] = meter_provider.force_flush()

    instrumentor.uninstrument()
    now = snapshot()
    result["not_restored"] = sorted(
        name for name, value in now.items() if value is not before[name]
    )

    with tracer.start_as_current_span("app uninstrumented"):
        result["after_requests"] = requests.get(after + "/after-requests", timeout=5).status_code
        with httpx.Client(timeout=5) as client:
            result["after_httpx"] = client.get(after + "/after-httpx").status_code
        result["after_timed_out"] = asyncio.run(timed_out())

    tracer_provider.shutdown()
    meter_provider.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
