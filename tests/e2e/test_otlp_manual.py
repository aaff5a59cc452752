"""The one-line path: ``RaptorInstrumentor().instrument(tracer_provider=..., meter_provider=...)``.

``tests/e2e/apps/manual_client.py`` sets up the SDK itself (``BatchSpanProcessor`` +
``OTLPSpanExporter``, ``PeriodicExportingMetricReader`` + ``OTLPMetricExporter``, both sending
OTLP/HTTP to an in-test receiver), instruments, makes requests/httpx/httpx-async calls that
recover and one ``asyncio.wait_for`` that times out, flushes the metrics, uninstruments, checks
in-process that every hooked function is the very object it was before, makes the same kinds
of calls again, and shuts the providers down. The tests assert on what the receiver decoded,
and that an export backend refusing everything changes nothing for the app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.recovery import Outcome
from otel_raptor.integrations.asyncio import SERVICE as ASYNCIO_SERVICE
from otel_raptor.telemetry.instruments import (
    ATTR_BREAKER_NAME,
    ATTR_ERROR_CATEGORY,
    ATTR_RECOVERY_ATTEMPTS,
    ATTR_RECOVERY_OUTCOME,
    ATTR_SERVICE,
    INSTRUMENTATION_NAME,
    INSTRUMENTATION_VERSION,
    METRIC_BREAKER_STATE,
    METRIC_ERRORS,
    METRIC_RECOVERIES,
    METRIC_RETRIES,
    SPAN_RECOVERY,
)
from tests.e2e.otlp_receiver import (
    OTLPReceiver,
    contract_violations,
    raptor_attribute_values,
    raptor_telemetry,
)
from tests.support.faulty_http import FaultyHTTPServer, ok, status
from tests.support.services import require_module

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "e2e" / "apps" / "manual_client.py"

#: ``/requests`` 503, 503, 200; ``/httpx`` 503, 200; ``/async`` 503, 200 (in that order).
SCRIPT = (status(503), status(503), ok(), status(503), ok(), status(503), ok())
#: What the app prints in every run, whatever happens to its telemetry.
EXPECTED = {
    "requests": 200,
    "httpx": 200,
    "async": 200,
    "timed_out": True,
    "not_restored": [],
    "after_requests": 503,
    "after_httpx": 503,
    "after_timed_out": True,
}
#: Everything the integrations hook on this Python (the app reports what changed).
HOOKED = {
    "requests.Session.request",
    "httpx.Client.send",
    "httpx.AsyncClient.send",
    "asyncio.wait_for",
    "asyncio.BaseEventLoop.call_exception_handler",
}


@dataclass
class ManualRun:
    result: dict[str, Any]
    stderr: str
    origin: str
    after_origin: str
    server: FaultyHTTPServer
    after: FaultyHTTPServer
    receiver: OTLPReceiver


def run_manual(
    *,
    extra_env: dict[str, str] | None = None,
    prepare: Callable[[OTLPReceiver], None] | None = None,
) -> ManualRun:
    require_module("requests")
    require_module("httpx")
    receiver = OTLPReceiver().start()
    server = FaultyHTTPServer(SCRIPT).start()
    after = FaultyHTTPServer(default=status(503)).start()
    origin, after_origin = f"http://{server.authority}", f"http://{after.authority}"
    try:
        if prepare is not None:
            prepare(receiver)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(receiver.env("manual-client"))
        env.update(extra_env or {})
        completed = subprocess.run(
            [sys.executable, str(APP), server.url("/"), after.url("/")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
    finally:
        server.stop()
        after.stop()
        receiver.stop()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout + completed.stderr
    assert receiver.errors == []
    return ManualRun(
        json.loads(lines[0].removeprefix("RESULT ")),
        completed.stderr,
        origin,
        after_origin,
        server,
        after,
        receiver,
    )


@pytest.fixture(scope="module")
def manual() -> ManualRun:
    return run_manual()


def test_the_app_gets_the_same_answers_with_fewer_failures(manual: ManualRun) -> None:
    assert {k: v for k, v in manual.result.items() if k in EXPECTED} == EXPECTED
    assert manual.server.count("GET", "/requests") == 3
    assert manual.server.count("GET", "/httpx") == 2
    assert manual.server.count("GET", "/async") == 2


def test_instrument_hooked_and_uninstrument_restored_every_function(manual: ManualRun) -> None:
    assert set(manual.result["hooked"]) >= HOOKED
    # Each hooked function is the very object it was before instrument() (identity).
    assert manual.result["not_restored"] == []


def test_after_uninstrument_calls_are_plain(manual: ManualRun) -> None:
    # A 503 reached the server once per call: nothing retried it.
    assert manual.after.count("GET", "/after-requests") == 1
    assert manual.after.count("GET", "/after-httpx") == 1
    assert manual.after.count() == 2


def test_the_instrumented_calls_arrive_as_documented(manual: ManualRun) -> None:
    receiver = manual.receiver
    assert contract_violations(receiver) == []
    spans = [s for s in receiver.spans() if s.name == SPAN_RECOVERY.name]
    [app] = [s for s in receiver.spans() if s.name == "app instrumented"]
    assert len(spans) == 3
    assert {s.parent_span_id for s in spans} == {app.span_id}
    assert sorted(s.attributes[ATTR_RECOVERY_ATTEMPTS] for s in spans) == [2, 2, 3]
    assert {s.attributes[ATTR_SERVICE] for s in spans} == {manual.origin}
    assert {s.attributes[ATTR_RECOVERY_OUTCOME] for s in spans} == {Outcome.RECOVERED.value}
    assert {(s.scope_name, s.scope_version) for s in spans} == {
        (INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION)
    }
    service = {ATTR_SERVICE: manual.origin}
    recovered = receiver.last(
        METRIC_RECOVERIES.name, **service, **{ATTR_RECOVERY_OUTCOME: Outcome.RECOVERED.value}
    )
    assert recovered is not None
    assert recovered.value == 3
    retries = receiver.last(METRIC_RETRIES.name, **service)
    assert retries is not None
    assert retries.value == 4
    # The gauges were read at the flush while instrumented.
    closed = receiver.last(
        METRIC_BREAKER_STATE.name,
        **{ATTR_BREAKER_NAME: manual.origin, "raptor.circuit_breaker.state": "closed"},
    )
    assert closed is not None
    assert closed.value == 1


def test_an_asyncio_timeout_is_a_classified_error(manual: ManualRun) -> None:
    errors = manual.receiver.series(METRIC_ERRORS.name)
    timeouts = [p for p in errors.values() if p.attributes[ATTR_SERVICE] == ASYNCIO_SERVICE]
    assert [p.attributes[ATTR_ERROR_CATEGORY] for p in timeouts] == [ErrorCategory.TIMEOUT.value]
    # Cumulative: the second timeout, after uninstrument(), did not add to it.
    assert timeouts[0].value == 1


def test_nothing_after_uninstrument_reaches_raptor_telemetry(manual: ManualRun) -> None:
    values = raptor_attribute_values(manual.receiver)
    assert manual.origin in values  # the instrumented calls are there: the check is not vacuous
    assert manual.after_origin not in values
    [after_span] = [s for s in manual.receiver.spans() if s.name == "app uninstrumented"]
    in_that_trace = [s.name for s in manual.receiver.spans() if s.trace_id == after_span.trace_id]
    assert in_that_trace == ["app uninstrumented"]
    assert not [e for e in after_span.events if e.name.startswith("raptor.")]


def test_a_failing_export_backend_never_breaks_the_app(manual: ManualRun) -> None:
    """Every export answered 503: the app exits 0 with the same results."""
    failing = run_manual(
        # Give up an export after 0.5 s rather than back off for the default 10 s.
        extra_env={"OTEL_EXPORTER_OTLP_TIMEOUT": "0.5"},
        prepare=lambda receiver: receiver.fail(),
    )
    assert {k: v for k, v in failing.result.items() if k in EXPECTED} == EXPECTED
    assert failing.result["hooked"] == manual.result["hooked"]
    assert failing.server.count() == manual.server.count() == 7
    hits = failing.receiver.hits
    assert {hit.signal for hit in hits} == {"traces", "metrics"}
    assert {hit.status for hit in hits} == {503}
    assert raptor_telemetry(failing.receiver) == []  # refused, so nothing was stored
    assert "Traceback" not in failing.stderr
