"""A WSGI app for ``gunicorn --preload``: the SDK and raptor set up once, in the master.

``gunicorn --preload tests.e2e.apps.gunicorn_app:app`` imports this module in the master
before it forks any worker, so everything below runs there, once: a ``TracerProvider``
(``BatchSpanProcessor`` + ``OTLPSpanExporter``) and a ``MeterProvider``
(``PeriodicExportingMetricReader`` + ``OTLPMetricExporter``), both configured by the standard
``OTEL_*`` variables, then ``RaptorInstrumentor().instrument(...)`` (raptor's settings from
``OTEL_PYTHON_RAPTOR_*``). If ``GUNICORN_APP_WARMUP`` names a URL, the master also GETs it
once (an app that checks its downstream at start-up): a retried call recorded before any fork.

Nothing is done per worker: the SDK gives each forked process its own ``service.instance.id``
and restarts its export threads there, and raptor puts its own locks and threads right.

Routes (every answer is JSON with the worker's ``pid``):

* ``/call?path=/x``: GET ``$DOWNSTREAM_URL/x`` with requests inside a span ``handle``; answers
  the downstream's status, or ``503`` with the raptor error's class name (``CircuitOpenError``)
  or the requests exception's name;
* ``/redis``: one ``PING`` through an instrumented redis-py client (``$REDIS_URL``);
* ``/state``: this worker's breakers (name -> state), its thread names, its parent's pid;
* ``/flush``: force-flush both providers (after ``?sleep=S`` seconds).

Each route first sleeps ``?hold=S`` seconds (default 0): concurrent requests then land on
different sync workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import requests
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_raptor import RaptorError, RaptorInstrumentor
from otel_raptor.runtime.state import get_runtime

DOWNSTREAM = os.environ["DOWNSTREAM_URL"].rstrip("/")
REDIS_URL = os.environ.get("REDIS_URL", "")

# No service.instance.id given: the SDK draws one per process, and draws again in a forked
# child, so each worker's telemetry is its own (as gunicorn's workers are distinct instances).
resource = Resource.create()
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
reader = PeriodicExportingMetricReader(OTLPMetricExporter())
meter_provider = MeterProvider(
    resource=resource,
    metric_readers=[reader],
)
tracer = tracer_provider.get_tracer("gunicorn_app")


def _guard_the_sdks_metric_locks() -> None:
    """Work around two SDK defects (opentelemetry-sdk 1.45): neither the reader's
    ``_export_lock`` nor the meter provider's collection lock (its measurement consumer's
    ``_lock``, held while the gauge callbacks run) is renewed in a forked child. A worker forked
    while the master's reader thread was collecting or exporting inherits that lock held, for
    good: its metrics are never exported again and its ``force_flush`` and ``shutdown`` block
    forever. So both are taken before a fork (waiting for a collection in flight), released
    after it in the master and made anew in the worker. (This hook runs before raptor's own,
    registered earlier: ``before`` hooks run in reverse order.) ``GUNICORN_APP_SDK_WORKAROUND=0``
    turns it off, to see the defects."""
    if os.environ.get("GUNICORN_APP_SDK_WORKAROUND", "1") == "0":
        return
    consumer: Any = meter_provider._measurement_consumer
    owners: list[tuple[Any, str]] = [(consumer, "_lock"), (reader, "_export_lock")]
    held: list[Any] = []

    def before() -> None:
        for owner, name in owners:
            lock = getattr(owner, name)
            if lock.acquire(timeout=5):
                held.append(lock)

    def in_parent() -> None:
        while held:
            held.pop().release()

    def in_child() -> None:
        held.clear()
        for owner, name in owners:
            setattr(owner, name, threading.Lock())

    os.register_at_fork(before=before, after_in_parent=in_parent, after_in_child=in_child)


_guard_the_sdks_metric_locks()

RaptorInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)

# Imported after instrument(): the deferred integration installs itself on this import.
import redis  # noqa: E402

_redis: Any = None
_session = requests.Session()

if os.environ.get("GUNICORN_APP_WARMUP"):
    with contextlib.suppress(requests.RequestException):
        requests.get(os.environ["GUNICORN_APP_WARMUP"], timeout=5)


def _call(query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
    path = query.get("path", ["/"])[0]
    with tracer.start_as_current_span("handle", attributes={"app.pid": os.getpid()}):
        try:
            response = _session.get(DOWNSTREAM + path, timeout=3)
        except RaptorError as error:
            return 503, {"error": type(error).__name__}
        except requests.RequestException as error:
            return 503, {"error": type(error).__name__}
    return response.status_code, {"status": response.status_code}


def _redis_ping() -> tuple[int, dict[str, Any]]:
    global _redis  # noqa: PLW0603 - one client per worker, made after the fork
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    with tracer.start_as_current_span("handle redis", attributes={"app.pid": os.getpid()}):
        return 200, {"ping": bool(_redis.ping())}


def _state() -> tuple[int, dict[str, Any]]:
    breakers = {name: b.state.value for name, b in get_runtime().breakers.items()}
    threads = sorted(t.name for t in threading.enumerate())
    return 200, {"breakers": breakers, "threads": threads, "ppid": os.getppid()}


def _flush(query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
    time.sleep(float(query.get("sleep", ["0"])[0]))
    return 200, {
        "traces": tracer_provider.force_flush(5000),
        "metrics": meter_provider.force_flush(5000),
    }


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    time.sleep(float(query.get("hold", ["0"])[0]))
    route = environ.get("PATH_INFO", "/")
    if route == "/call":
        code, body = _call(query)
    elif route == "/redis":
        code, body = _redis_ping()
    elif route == "/state":
        code, body = _state()
    elif route == "/flush":
        code, body = _flush(query)
    else:
        code, body = 404, {}
    body["pid"] = os.getpid()
    payload = json.dumps(body).encode()
    start_response(
        f"{code} X", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]
