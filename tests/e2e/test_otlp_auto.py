"""Zero-code: ``opentelemetry-instrument python app.py`` with the real OTLP/HTTP exporter.

Each test runs ``tests/e2e/apps/flaky_client.py`` (an app with no resilience or telemetry code
beyond one span per call) under ``opentelemetry-instrument`` against a scripted
``faulty_http`` server, with the SDK's OTLP/HTTP exporters pointed at an in-test
:class:`~tests.e2e.otlp_receiver.OTLPReceiver`, and asserts on what the receiver decoded. The
app simply returns: the SDK's ``atexit`` shutdown flushes both providers.

The script the server plays: ``/recover`` 503, 503, 200 (recovered by two retries);
``/outage`` 503, 503, 503 (retries give up; one call's 503s alone are no outage); ``/outage``
again, 503 (``tripped``: the second call failing in a row opens the breaker, which refuses
its retry); ``/outage`` once more (refused by the open breaker, never reaching the server);
and, after the breaker's recovery timeout, ``/healed`` 200 (the half-open probe closes it).

The SDK configurator. ``opentelemetry-instrument`` configures the SDK only through an
``opentelemetry_configurator`` entry point: ``opentelemetry-distro``'s, which otel-raptor
depends on.

Everything the tests need beyond the test extra skips with its reason, or fails under
``RAPTOR_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.retry import GiveUpReason
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.integrations._http import RESEND_COUNT_ATTRIBUTE
from otel_raptor.telemetry.instruments import (
    ATTR_BREAKER_FROM_STATE,
    ATTR_BREAKER_NAME,
    ATTR_BREAKER_STATE,
    ATTR_BREAKER_TO_STATE,
    ATTR_BREAKER_TRANSITION_REASON,
    ATTR_ERROR_CATEGORY,
    ATTR_ERROR_TYPE,
    ATTR_RECOVERY_ATTEMPT,
    ATTR_RECOVERY_ATTEMPTS,
    ATTR_RECOVERY_GIVE_UP_REASON,
    ATTR_RECOVERY_OUTCOME,
    ATTR_RECOVERY_STRATEGY,
    ATTR_SERVICE,
    EVENT_BREAKER_REJECTION,
    EVENT_BREAKER_TRANSITION,
    EVENT_ERROR,
    EVENT_RETRY,
    METRIC_BREAKER_FAILURE_RATE_THRESHOLD,
    METRIC_BREAKER_HEALTH,
    METRIC_BREAKER_REJECTIONS,
    METRIC_BREAKER_STATE,
    METRIC_BREAKER_TRANSITIONS,
    METRIC_ERRORS,
    METRIC_RECOVERIES,
    METRIC_RECOVERY_DURATION,
    METRIC_RETRIES,
    METRIC_RETRY_BUDGET_EXHAUSTED,
    METRIC_RETRY_BUDGET_TOKENS,
    SPAN_RECOVERY,
)
from tests.e2e.otlp_receiver import (
    OTLPReceiver,
    ReceivedSpan,
    contract_violations,
    raptor_attribute_values,
    raptor_telemetry,
)
from tests.support.faulty_http import Action, FaultyHTTPServer, ok, status
from tests.support.services import require_module, services_required

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "e2e" / "apps" / "flaky_client.py"
CLIENTS = ("requests", "httpx", "httpx-async")
#: The client library each app variant needs, and the contrib instrumentation tracing it.
LIBRARY = {"requests": "requests", "httpx": "httpx", "httpx-async": "httpx"}
CONTRIB = {
    "requests": "opentelemetry.instrumentation.requests",
    "httpx": "opentelemetry.instrumentation.httpx",
    "httpx-async": "opentelemetry.instrumentation.httpx",
}

#: The instruments this app's story (recover, give up, open, refuse, heal) must produce.
HTTP_INSTRUMENTS = (
    METRIC_ERRORS,
    METRIC_RETRIES,
    METRIC_RECOVERIES,
    METRIC_RECOVERY_DURATION,
    METRIC_BREAKER_TRANSITIONS,
    METRIC_BREAKER_REJECTIONS,
    METRIC_BREAKER_STATE,
    METRIC_BREAKER_HEALTH,
    METRIC_BREAKER_FAILURE_RATE_THRESHOLD,
    METRIC_RETRY_BUDGET_TOKENS,
)
SCRIPT: tuple[Action, ...] = (
    status(503),
    status(503),
    ok("recovered"),
    status(503),
    status(503),
    status(503),
    status(503),
)
BREAKER_RECOVERY_TIMEOUT_S = 0.3
#: Fast retries, a breaker that opens on the third consecutive failure and closes on the
#: first successful probe; the rest are defaults.
RAPTOR_ENV = {
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES": "2",
    "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY": "0.01",
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY": "0.05",
    "OTEL_PYTHON_RAPTOR_RETRY_JITTER": "none",
    "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD": "3",
    "OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT": str(BREAKER_RECOVERY_TIMEOUT_S),
    "OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD": "1",
}
#: Longer than the recovery timeout with its +10 % jitter, and than one metric export
#: interval (500 ms), so that the state gauge is read at least once while the breaker is open.
BREAKER_WAIT_S = 0.8


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if services_required():
        pytest.fail(f"{reason} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def launcher() -> Path:
    path = Path(sys.executable).with_name("opentelemetry-instrument")
    _require(path.exists(), f"{path} is not installed (opentelemetry-instrumentation)")
    return path


@pytest.fixture(scope="module")
def configurator_path() -> str | None:
    """No ``PYTHONPATH`` entry is needed: otel-raptor depends on opentelemetry-distro, whose
    configurator the launcher uses (tests/e2e/test_fresh_venv.py proves it in a new venv)."""
    assert any(True for _ in entry_points(group="opentelemetry_configurator"))
    return None


@dataclass
class AppRun:
    """One finished run of the app: its results, and the (stopped) server and receiver."""

    client: str
    origin: str  # the downstream's name in raptor telemetry: ``scheme://host:port``
    results: list[dict[str, Any]]
    returncode: int
    stdout: str
    stderr: str
    server: FaultyHTTPServer
    receiver: OTLPReceiver
    seconds: float

    def spans_named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.receiver.spans() if span.name == name]

    def app_span(self, phase: str) -> ReceivedSpan:
        [span] = self.spans_named(f"app {phase}")
        return span

    def recovery_span(self, phase: str) -> ReceivedSpan:
        """The ``raptor.recovery`` span under the app span of ``phase``."""
        parent = self.app_span(phase)
        spans = [
            s for s in self.spans_named(SPAN_RECOVERY.name) if s.parent_span_id == parent.span_id
        ]
        assert len(spans) == 1, (phase, spans)
        return spans[0]


def run_app(
    client: str,
    launcher: Path,
    configurator_path: str | None,
    *,
    extra_env: dict[str, str] | None = None,
    prepare: Callable[[OTLPReceiver], None] | None = None,
) -> AppRun:
    require_module(LIBRARY[client])
    receiver = OTLPReceiver().start()
    server = FaultyHTTPServer(SCRIPT).start()
    origin = f"http://{server.authority}"
    try:
        if prepare is not None:
            prepare(receiver)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(receiver.env(f"flaky-{client}"))
        env.update(RAPTOR_ENV)
        env.update(extra_env or {})
        if configurator_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (configurator_path, env.get("PYTHONPATH", "")) if p
            )
        command = [str(launcher), sys.executable, str(APP), server.url("/"), "--client", client]
        command += ["--breaker-wait", str(BREAKER_WAIT_S)]
        started = time.monotonic()
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=45, check=False
        )
        seconds = time.monotonic() - started
    finally:
        server.stop()
        receiver.stop()
    results: list[dict[str, Any]] = []
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            results = json.loads(line.removeprefix("RESULT "))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert results, f"the app printed no RESULT line:\n{completed.stdout}{completed.stderr}"
    assert receiver.errors == []
    return AppRun(
        client,
        origin,
        results,
        completed.returncode,
        completed.stdout,
        completed.stderr,
        server,
        receiver,
        seconds,
    )


@pytest.fixture(scope="module", params=CLIENTS)
def run(request: pytest.FixtureRequest, launcher: Path, configurator_path: str | None) -> AppRun:
    return run_app(request.param, launcher, configurator_path)


def _total(run: AppRun, name: str, **attributes: Any) -> float:
    """Sum of the latest value of every series of ``name`` whose attributes include these."""
    return sum(
        point.value
        for point in run.receiver.series(name).values()
        if all(point.attributes.get(k) == v for k, v in attributes.items())
    )


# ------------------------------------------------------------------------- the app itself


def test_the_app_recovers_fails_fast_and_heals(run: AppRun) -> None:
    recover, outage, tripped, rejected, healed = run.results
    assert recover == {"phase": "recover", "status": 200}
    assert outage == {"phase": "outage", "status": 503}  # the last response, as the caller's
    assert tripped == {"phase": "tripped", "status": 503}
    assert rejected["phase"] == "rejected"
    assert rejected["library_connection_error"] is True  # caught by the library's own except
    assert rejected["circuit_open"] is True
    assert healed == {"phase": "healed", "status": 200}
    assert run.server.count("GET", "/recover") == 3
    assert run.server.count("GET", "/outage") == 4  # the refused call never reached it
    assert run.server.count("GET", "/healed") == 1
    assert run.server.count() == 8


# ------------------------------------------------------------------------------------ spans


def test_every_raptor_span_metric_and_event_is_in_the_contract(run: AppRun) -> None:
    assert contract_violations(run.receiver) == []


def test_recovered_call_is_one_recovery_span_with_an_event_per_attempt(run: AppRun) -> None:
    span = run.recovery_span("recover")
    assert span.kind == "INTERNAL"
    assert span.status == "UNSET"
    assert span.trace_id == run.app_span("recover").trace_id
    assert dict(span.attributes) == {
        ATTR_SERVICE: run.origin,
        ATTR_ERROR_CATEGORY: ErrorCategory.UNAVAILABLE.value,
        ATTR_RECOVERY_STRATEGY: Strategy.RETRY_WITH_BACKOFF.value,
        ATTR_RECOVERY_OUTCOME: Outcome.RECOVERED.value,
        ATTR_RECOVERY_ATTEMPTS: 3,
        "server.address": "127.0.0.1",
        "server.port": int(run.origin.rpartition(":")[2]),
    }
    assert span.event_names() == [EVENT_ERROR.name, EVENT_RETRY.name] * 2
    errors = [e.attributes for e in span.events if e.name == EVENT_ERROR.name]
    assert [e[ATTR_RECOVERY_ATTEMPT] for e in errors] == [1, 2]
    assert {e[ATTR_ERROR_TYPE] for e in errors} == {"503"}
    retries = [e.attributes for e in span.events if e.name == EVENT_RETRY.name]
    assert [e[ATTR_RECOVERY_ATTEMPT] for e in retries] == [1, 2]


def test_exhausted_call_records_the_failure_and_the_breaker_opening(run: AppRun) -> None:
    span = run.recovery_span("outage")
    assert span.status == "ERROR"
    assert span.attributes[ATTR_RECOVERY_OUTCOME] == Outcome.FAILED.value
    assert span.attributes[ATTR_RECOVERY_ATTEMPTS] == 3
    assert span.attributes[ATTR_RECOVERY_GIVE_UP_REASON] == GiveUpReason.ATTEMPTS_EXHAUSTED.value
    assert span.attributes[ATTR_ERROR_TYPE] == "503"
    assert span.event_names().count(EVENT_ERROR.name) == 3
    assert EVENT_BREAKER_TRANSITION.name not in span.event_names()  # one call is no outage
    # The next call's failure is the second call failing in a row: the breaker opens, and
    # refuses that call's retry (a call stopped mid-way by the breaker is `rejected`); the
    # caller gets its 503.
    span = run.recovery_span("tripped")
    assert span.status == "ERROR"
    assert span.attributes[ATTR_RECOVERY_OUTCOME] == Outcome.REJECTED.value
    assert span.attributes[ATTR_RECOVERY_ATTEMPTS] == 1
    assert span.attributes[ATTR_RECOVERY_GIVE_UP_REASON] == "breaker_rejected"
    assert span.attributes[ATTR_ERROR_TYPE] == "503"
    [opened] = [e.attributes for e in span.events if e.name == EVENT_BREAKER_TRANSITION.name]
    assert opened[ATTR_BREAKER_NAME] == run.origin
    assert opened[ATTR_BREAKER_FROM_STATE] == CircuitState.CLOSED.value
    assert opened[ATTR_BREAKER_TO_STATE] == CircuitState.OPEN.value
    assert opened[ATTR_BREAKER_TRANSITION_REASON] == TransitionReason.CONSECUTIVE_FAILURES.value
    assert span.event_names().count(EVENT_ERROR.name) == 1


def test_refused_call_is_a_rejected_recovery_span(run: AppRun) -> None:
    span = run.recovery_span("rejected")
    assert span.status == "ERROR"
    assert span.attributes[ATTR_RECOVERY_OUTCOME] == Outcome.REJECTED.value
    assert span.attributes[ATTR_RECOVERY_ATTEMPTS] == 0
    assert span.attributes[ATTR_RECOVERY_GIVE_UP_REASON] == "breaker_rejected"
    assert span.attributes[ATTR_ERROR_TYPE] == "otel_raptor.errors.CircuitOpenError"
    # The rejection itself is an event on the span current when it happened: the app's.
    [rejection] = [
        e.attributes
        for e in run.app_span("rejected").events
        if e.name == EVENT_BREAKER_REJECTION.name
    ]
    assert rejection[ATTR_BREAKER_NAME] == run.origin
    assert rejection[ATTR_BREAKER_STATE] == CircuitState.OPEN.value


def test_the_probe_half_opens_and_closes_the_breaker(run: AppRun) -> None:
    transitions = [
        (e.attributes[ATTR_BREAKER_FROM_STATE], e.attributes[ATTR_BREAKER_TO_STATE])
        for e in run.app_span("healed").events
        if e.name == EVENT_BREAKER_TRANSITION.name
    ]
    assert transitions == [("open", "half_open"), ("half_open", "closed")]
    # A call that needed no recovery has no raptor.recovery span.
    healed = run.app_span("healed")
    assert not [s for s in run.spans_named(SPAN_RECOVERY.name) if s.trace_id == healed.trace_id]


def test_retries_are_client_spans_under_the_recovery_span(run: AppRun) -> None:
    """With the contrib instrumentation (loaded by opentelemetry-instrument too), the first
    attempt's HTTP client span precedes ``raptor.recovery`` under the app's span; each retry's
    client span is a child of ``raptor.recovery``."""
    require_module(CONTRIB[run.client])
    app = run.app_span("recover")
    recovery = run.recovery_span("recover")
    clients = sorted(
        (s for s in run.receiver.spans() if s.kind == "CLIENT" and s.trace_id == app.trace_id),
        key=lambda s: s.start_time_unix_nano,
    )
    assert len(clients) == 3, clients
    first, *retries = clients
    assert first.parent_span_id == app.span_id
    assert [s.parent_span_id for s in retries] == [recovery.span_id] * 2
    assert all(recovery.start_time_unix_nano <= s.start_time_unix_nano for s in retries)
    assert all(s.end_time_unix_nano <= recovery.end_time_unix_nano for s in retries)


def test_resent_attempts_carry_the_resend_count(run: AppRun) -> None:
    """The instrumentor adds ``ResendCountSpanProcessor`` to the SDK tracer provider that
    opentelemetry-instrument set up: the contrib client span of each resend says which."""
    require_module(CONTRIB[run.client])
    app = run.app_span("recover")
    clients = sorted(
        (s for s in run.receiver.spans() if s.kind == "CLIENT" and s.trace_id == app.trace_id),
        key=lambda s: s.start_time_unix_nano,
    )
    assert [s.attributes.get(RESEND_COUNT_ATTRIBUTE) for s in clients] == [None, 1, 2]


# ---------------------------------------------------------------------------------- metrics


def test_the_documented_metrics_arrive_with_their_values(run: AppRun) -> None:
    arrived = {name for name in run.receiver.metrics() if name.startswith("raptor.")}
    # Every HTTP-resilience instrument; others in the contract may arrive too (the contract
    # test above checks them), but not the one this script never triggers: an empty budget.
    assert arrived >= {spec.name for spec in HTTP_INSTRUMENTS}
    assert METRIC_RETRY_BUDGET_EXHAUSTED.name not in arrived
    service = {ATTR_SERVICE: run.origin}
    assert _total(run, METRIC_ERRORS.name, **service) == 6  # 2 + 3 + 1 failed attempts
    assert _total(run, METRIC_ERRORS.name, **service, **{ATTR_ERROR_TYPE: "503"}) == 6
    # 2 + 2, and the one the tripped call scheduled before the breaker refused it.
    assert _total(run, METRIC_RETRIES.name, **service) == 5
    by_outcome = {
        outcome: _total(run, METRIC_RECOVERIES.name, **service, **{ATTR_RECOVERY_OUTCOME: outcome})
        for outcome in ("recovered", "failed", "rejected", "fallback", "budget_exhausted")
    }
    assert by_outcome == {
        "recovered": 1,
        "failed": 1,
        "rejected": 2,  # the call the breaker stopped mid-way, and the one it refused
        "fallback": 0,
        "budget_exhausted": 0,
    }
    durations = run.receiver.series(METRIC_RECOVERY_DURATION.name).values()
    assert sum(p.count for p in durations) == 4
    assert all(p.explicit_bounds == METRIC_RECOVERY_DURATION.bucket_boundaries for p in durations)
    recovered = run.receiver.last(
        METRIC_RECOVERY_DURATION.name, **{ATTR_RECOVERY_OUTCOME: "recovered"}
    )
    assert recovered is not None
    assert 0.01 + 0.02 <= recovered.value < 5  # at least the two backoff delays, in seconds


def test_breaker_metrics_tell_the_story(run: AppRun) -> None:
    breaker = {ATTR_BREAKER_NAME: run.origin}
    transitions = {
        (
            p.attributes[ATTR_BREAKER_FROM_STATE],
            p.attributes[ATTR_BREAKER_TO_STATE],
            p.attributes[ATTR_BREAKER_TRANSITION_REASON],
        ): p.value
        for p in run.receiver.series(METRIC_BREAKER_TRANSITIONS.name).values()
        if p.attributes[ATTR_BREAKER_NAME] == run.origin
    }
    assert transitions == {
        ("closed", "open", TransitionReason.CONSECUTIVE_FAILURES.value): 1,
        ("open", "half_open", TransitionReason.RECOVERY_TIMEOUT_ELAPSED.value): 1,
        ("half_open", "closed", TransitionReason.PROBES_SUCCEEDED.value): 1,
    }
    assert _total(run, METRIC_BREAKER_REJECTIONS.name, **breaker) == 2  # a retry, a call
    assert _total(run, METRIC_BREAKER_REJECTIONS.name, **breaker, **{ATTR_BREAKER_STATE: "open"})
    # The gauge's last reading, at the final collection: closed.
    state = {
        p.attributes[ATTR_BREAKER_STATE]: p.value
        for p in run.receiver.series(METRIC_BREAKER_STATE.name).values()
        if p.attributes[ATTR_BREAKER_NAME] == run.origin
    }
    assert state == {"closed": 1, "open": 0, "half_open": 0}
    # Read every 500 ms, it saw the breaker open at least once (open for BREAKER_WAIT_S).
    states_seen = {
        p.attributes[ATTR_BREAKER_STATE]
        for p in run.receiver.metrics()[METRIC_BREAKER_STATE.name]
        if p.value == 1 and p.attributes[ATTR_BREAKER_NAME] == run.origin
    }
    assert states_seen >= {"open", "closed"}
    health = run.receiver.last(METRIC_BREAKER_HEALTH.name, **breaker)
    assert health is not None
    assert 0 <= health.value <= 100
    threshold = run.receiver.last(METRIC_BREAKER_FAILURE_RATE_THRESHOLD.name, **breaker)
    assert threshold is not None
    assert 0 < threshold.value <= 1
    tokens = run.receiver.last(METRIC_RETRY_BUDGET_TOKENS.name, **{ATTR_SERVICE: run.origin})
    assert tokens is not None
    assert tokens.value >= 0


# ----------------------------------------------------- the exporter and the off switch


def test_the_exporters_own_requests_are_never_guarded(
    launcher: Path, configurator_path: str | None
) -> None:
    """The receiver refuses the first trace export with a 503. Were raptor hooking the
    exporter's requests, it would retry that POST at once (retries of non-idempotent calls are
    switched on here), count it against a breaker named after the receiver and say so in its
    telemetry. Instead the same bytes come back only after the exporter's own backoff (about
    1 s), and the receiver's origin appears nowhere in raptor telemetry."""
    run = run_app(
        "requests",
        launcher,
        configurator_path,
        extra_env={
            "OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT": "true",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "5",
        },
        prepare=lambda receiver: receiver.fail("traces", times=1),
    )
    hits = [hit for hit in run.receiver.hits if hit.signal == "traces"]
    refused = [hit for hit in hits if hit.status == 503]
    assert len(refused) == 1
    same_batch = [hit for hit in hits if hit.digest == refused[0].digest]
    assert [hit.status for hit in same_batch] == [503, 200]
    # The exporter's first backoff is 1 s with +-20 % jitter; raptor's would be 10 ms.
    assert same_batch[1].arrived_at - same_batch[0].arrived_at >= 0.7
    receiver_origin = f"127.0.0.1:{run.receiver.port}"
    values = raptor_attribute_values(run.receiver)
    assert run.origin in values  # the app's downstream is there: the check is not vacuous
    assert not [value for value in values if receiver_origin in value]
    assert run.results[0] == {"phase": "recover", "status": 200}


def test_disabled_instrumentation_sends_no_raptor_telemetry(
    launcher: Path, configurator_path: str | None
) -> None:
    run = run_app(
        "requests",
        launcher,
        configurator_path,
        extra_env={"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "raptor"},
    )
    # Without raptor each call meets the next scripted answer once, failures included.
    assert [r.get("status") for r in run.results] == [503, 503, 200, 503, 503]
    assert run.server.count() == 5
    assert raptor_telemetry(run.receiver) == []
    # ...while the app's own spans did arrive: the receiver was listening.
    assert {s.name for s in run.receiver.spans()} >= {f"app {p}" for p in ("recover", "healed")}
