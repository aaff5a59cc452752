"""The event sink: runtime events in, OpenTelemetry metrics, spans and span events out.

Metrics: each event adds to its counter (``instruments.py`` lists them); breaker state, health,
adaptive threshold and retry-budget tokens are observable gauges read from runtime snapshots
only when a reader collects, so the call path pays nothing for them.

Traces. When a guarded call's first attempt fails, the attempt loop's driver opens a
*recovery scope* (``Runtime.recovery_scope``, which ``install()`` points at
:meth:`TelemetrySink.recovery_scope`): a ``raptor.recovery`` INTERNAL span that starts when
the first attempt started and is current while the retries run, so each retry's own client
span (the contrib requests/httpx instrumentations) is its child; the first attempt's client
span, which ended before anyone knew recovery was needed, is its preceding sibling. Starting
a span for every call would cost the success path as much as a tracing instrumentation does;
starting it on the first failure costs the success path nothing. Inside the scope the call's
events go straight onto that span, and ``RecoveryFinished`` sets its outcome, status and
``error.type``.

Outside a scope (a call refused before any attempt, or a sink used without ``install``)
events arrive after the fact, so the ``raptor.recovery`` span is built when the
logical call's ``RecoveryFinished`` arrives: it starts ``duration_s`` before that moment (the
first attempt's start) and ends then, as an INTERNAL child of whatever span is current in the
caller (the loop publishes synchronously, in the caller's context). The call's own events
(``raptor.error`` per failed attempt, ``raptor.retry`` per scheduled retry,
``raptor.retry_budget.exhausted``) are buffered until then and land on that span with their
original timestamps, so the span tells the whole story even when the app has no span of its
own. Breaker events (``raptor.circuit_breaker.transition``, ``.rejection``) describe a shared
component rather than one call: they go on the span current when they happen, if it records.

The buffer is per sink and per execution context (a ``ContextVar`` holding immutable tuples:
a task's buffer is never shared with the tasks it starts), keyed by service, and bounded:
at most 8 calls and 32 events per call (the oldest are dropped). A call's first failure
(``attempt == 1``) starts a fresh entry, so a call abandoned without ``RecoveryFinished``
(cancelled) leaves nothing behind but one stale entry, replaced by the next call.

Everything is exception-safe: a failing provider, exporter or instrument is reported once via
``report_internal_error`` and never raised into the publisher.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import math
import operator
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Final, NamedTuple, TypeAlias

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

from otel_raptor.core.breaker import BreakerSnapshot
from otel_raptor.core.events import (
    SKIP_REASONS,
    BreakerTransitioned,
    CallRejected,
    ErrorClassified,
    Event,
    FailurePredicted,
    MemoryCleanupFinished,
    MemoryPressureChanged,
    PreventionActionRun,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import CircuitOpenError, ThrottledError
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.safety import internal_error_counts, report_internal_error
from otel_raptor.runtime.state import Runtime, get_runtime
from otel_raptor.telemetry.attributes import (
    DEFAULT_MAX_BREAKERS,
    DEFAULT_MAX_SERVICES,
    OTHER_ERROR_TYPE,
    BoundedValues,
    MetricAttributes,
)
from otel_raptor.telemetry.instruments import (
    ATTR_BREAKER_FROM_STATE,
    ATTR_BREAKER_NAME,
    ATTR_BREAKER_OPEN_DURATION,
    ATTR_BREAKER_RETRY_AFTER,
    ATTR_BREAKER_STATE,
    ATTR_BREAKER_TO_STATE,
    ATTR_BREAKER_TRANSITION_REASON,
    ATTR_DB_RESPONSE_STATUS_CODE,
    ATTR_DB_SYSTEM_NAME,
    ATTR_ERROR_CATEGORY,
    ATTR_ERROR_SEVERITY,
    ATTR_ERROR_TYPE,
    ATTR_INTERNAL_SITE,
    ATTR_MEMORY_BYTES_FREED,
    ATTR_MEMORY_CLEANUP_LEVEL,
    ATTR_MEMORY_CLEANUP_TRIGGER,
    ATTR_MEMORY_ENTRIES_EVICTED,
    ATTR_MEMORY_PRESSURE_LEVEL,
    ATTR_PREDICTION_CONFIDENCE,
    ATTR_PREDICTION_PROBABILITY,
    ATTR_PREDICTION_SEVERITY,
    ATTR_PREDICTION_STATE,
    ATTR_PREDICTION_TIME_TO_EXHAUSTION,
    ATTR_PREVENTION_ACTION,
    ATTR_PREVENTION_OUTCOME,
    ATTR_PREVENTION_SKIP_REASON,
    ATTR_RECOVERY_ATTEMPT,
    ATTR_RECOVERY_ATTEMPTS,
    ATTR_RECOVERY_GIVE_UP_REASON,
    ATTR_RECOVERY_OUTCOME,
    ATTR_RECOVERY_STRATEGY,
    ATTR_RESOURCE,
    ATTR_RETRY_DELAY,
    ATTR_SERVICE,
    EVENT_BREAKER_REJECTION,
    EVENT_BREAKER_TRANSITION,
    EVENT_ERROR,
    EVENT_RETRY,
    EVENT_RETRY_BUDGET_EXHAUSTED,
    INSTRUMENTATION_NAME,
    INSTRUMENTATION_VERSION,
    METRIC_BREAKER_FAILURE_RATE_THRESHOLD,
    METRIC_BREAKER_HEALTH,
    METRIC_BREAKER_STATE,
    METRIC_INTERNAL_ERRORS,
    METRIC_MEMORY_PRESSURE,
    METRIC_MEMORY_PRESSURE_LEVEL,
    METRIC_PREDICTION_PROBABILITY,
    METRIC_PREDICTION_TIME_TO_EXHAUSTION,
    METRIC_RESOURCE_UTILIZATION,
    METRIC_RETRY_BUDGET_TOKENS,
    SCHEMA_URL,
    SPAN_MEMORY_CLEANUP,
    SPAN_PREDICTION,
    SPAN_RECOVERY,
    GaugeCallback,
    Instruments,
    InstrumentSpec,
    create_gauges,
    create_instruments,
)

__all__ = [
    "MAX_EVENTS_PER_CALL",
    "MAX_PENDING_CALLS",
    "TelemetrySink",
]

#: Calls per execution context whose span events are buffered at once.
MAX_PENDING_CALLS: Final = 8
#: Span events buffered per call; past it the oldest are dropped.
MAX_EVENTS_PER_CALL: Final = 32

_SpanEvent: TypeAlias = "tuple[str, Mapping[str, AttributeValue], int]"

_ERROR_OUTCOMES: Final = frozenset({Outcome.FAILED, Outcome.REJECTED, Outcome.BUDGET_EXHAUSTED})
_CIRCUIT_OPEN_TYPE: Final = f"{CircuitOpenError.__module__}.{CircuitOpenError.__qualname__}"
_THROTTLED_TYPE: Final = f"{ThrottledError.__module__}.{ThrottledError.__qualname__}"
_STATES: Final = tuple((state, state.value) for state in CircuitState)
_INTERNAL: Final = SpanKind.INTERNAL
_PRESSURE_LEVELS: Final = ("normal", "warning", "critical", "emergency")
_OTHER: Final = "other"
_NS_PER_S: Final = 1_000_000_000
# A recovery cannot take longer than this (about 116 days); beyond, the duration is junk.
_MAX_DURATION_S: Final = 1e7

_time_ns = time.time_ns

# ``Classification.code`` holds an errno's name for OS errors: never a database's answer.
_ERRNO_NAMES: Final = frozenset(errno.errorcode.values())


class _Pending(NamedTuple):
    """The span events of one logical call not yet finished (immutable: see module doc).

    A named tuple rather than a frozen dataclass: it is rebuilt on every buffered event, and
    a frozen dataclass's ``__init__`` costs several times more."""

    service: str
    events: tuple[_SpanEvent, ...]
    error_type: str | None


def _clean_duration(value: float) -> float:
    if not math.isfinite(value) or value < 0.0:
        return 0.0
    return min(value, _MAX_DURATION_S)


class TelemetrySink:
    """Turns ``runtime``'s events into spans, span events and metrics.

    ``runtime`` defaults to the process-wide ``get_runtime()``; ``tracer_provider`` and
    ``meter_provider`` default to the global providers (resolved when first used, so a
    provider set later is picked up). ``max_services`` and ``max_breakers`` (integers >= 1,
    default 256) cap the distinct names in metric attributes; the excess is reported as
    ``other``.

    ``publish(event)`` records one event (call it directly, or ``install()`` to subscribe to
    ``runtime.bus``). ``install()`` also registers the observable gauges; ``uninstall()``
    unsubscribes and silences the gauges (OpenTelemetry cannot unregister an instrument).
    Neither ``publish`` nor the gauge callbacks ever raise.
    """

    __slots__ = (
        "__weakref__",
        "_active",
        "_attrs",
        "_ending",
        "_handlers",
        "_hub",
        "_installed",
        "_instruments",
        "_lock",
        "_memory_level",
        "_memory_ratio",
        "_meter",
        "_meter_provider",
        "_names",
        "_pending",
        "_recording",
        "_runtime",
        "_tracer",
        "_unsubscribe",
    )

    def __init__(
        self,
        *,
        runtime: Runtime | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        max_services: int = DEFAULT_MAX_SERVICES,
        max_breakers: int = DEFAULT_MAX_BREAKERS,
    ) -> None:
        self._runtime = runtime if runtime is not None else get_runtime()
        self._attrs = MetricAttributes(
            max_services=max_services,
            max_breakers=max_breakers,
            describe=self._runtime.description,
        )
        self._meter_provider = meter_provider
        self._tracer = _tracer(tracer_provider)
        self._meter = _meter(meter_provider)
        self._instruments = _instruments(self._meter)
        self._pending: contextvars.ContextVar[tuple[_Pending, ...]] = contextvars.ContextVar(
            "otel_raptor_pending_recoveries", default=()
        )
        self._active: contextvars.ContextVar[_LiveRecovery | None] = contextvars.ContextVar(
            "otel_raptor_live_recovery", default=None
        )
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        # Held while an event is written to the SDK. The metrics SDK's locks are not replaced
        # in a forked child: a fork that caught a thread of ours inside one (recording a
        # counter) would leave that instrument locked in the child for ever. Registered, it is
        # taken before a fork, so the fork waits for a recording in flight to finish. Reentrant:
        # a handler may publish.
        self._recording = threading.RLock()
        register_lock(self, "_recording")
        # The spans a publish in this thread ended, ended for real once it lets go of
        # ``_recording``: ending one exports it with a SimpleSpanProcessor, and an export
        # (seconds, to a collector that does not answer) must not hold every other thread's
        # and event loop's publish (a guarded call's failure path) behind our lock.
        self._ending = threading.local()
        self._installed = False
        self._unsubscribe: Callable[[], None] | None = None
        self._hub: _GaugeHub | None = None
        self._names = _ResourceNames()
        # The latest MemoryPressureChanged: the level gauge, and the ratio when neither a
        # predictor nor a running memory controller provides a fresher one.
        self._memory_level: str | None = None
        self._memory_ratio: float | None = None
        # Dispatch by exact type: one dict lookup, no isinstance chain.
        self._handlers: dict[type, Callable[..., None]] = {
            ErrorClassified: self._on_error_classified,
            RetryScheduled: self._on_retry_scheduled,
            RetryBudgetExhausted: self._on_budget_exhausted,
            BreakerTransitioned: self._on_transition,
            CallRejected: self._on_rejection,
            RecoveryFinished: self._on_recovery_finished,
            FailurePredicted: self._on_failure_predicted,
            PreventionActionRun: self._on_prevention_action,
            MemoryPressureChanged: self._on_memory_pressure,
            MemoryCleanupFinished: self._on_memory_cleanup,
        }

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Subscribe to ``runtime.bus`` and register the gauges. Idempotent; never raises."""
        with self._lock:
            if self._installed:
                return
            try:
                self._unsubscribe = self._runtime.bus.subscribe(self.publish)
                self._runtime.recovery_scope = self.recovery_scope
                self._hub = _hub_for(self._meter_provider)
                self._hub.add(self)
                self._installed = True
            except Exception as error:  # noqa: BLE001 - telemetry must not stop the app
                report_internal_error("telemetry.install", error)
                self._detach()

    def uninstall(self) -> None:
        """Unsubscribe from the bus; the gauges report nothing for this sink from now on."""
        with self._lock:
            self._installed = False
            self._detach()

    def _detach(self) -> None:
        if self._runtime.recovery_scope == self.recovery_scope:
            self._runtime.recovery_scope = _no_scope
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        hub, self._hub = self._hub, None
        try:
            if unsubscribe is not None:
                unsubscribe()
            if hub is not None:
                hub.remove(self)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.uninstall", error)

    def recovery_scope(self, service: str, started: float) -> AbstractContextManager[None]:
        """The ``raptor.recovery`` span of one logical call, current while it recovers.

        ``started`` is when the first attempt started, on the runtime's monotonic clock.
        """
        return _RecoveryScope(self, service, started)

    # --- events -------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Record ``event``. Unknown event types are ignored. Never raises."""
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        local = self._ending
        outermost = getattr(local, "spans", None) is None  # a handler may publish
        if outermost:
            local.spans = []
        try:
            with self._recording:
                handler(event)
        except Exception as error:  # noqa: BLE001 - the publisher is the app's call path
            report_internal_error("telemetry.publish", error)
        finally:
            if outermost:
                spans, local.spans = local.spans, None
                for span, end_time in spans:
                    try:
                        span.end(end_time=end_time)
                    except Exception as error:  # noqa: BLE001
                        report_internal_error("telemetry.trace", error)

    __call__ = publish

    def _end(self, span: Span, end_time: int) -> None:
        """End ``span`` at ``end_time`` once this thread's publish lets go of ``_recording``
        (at once outside a publish)."""
        spans = getattr(self._ending, "spans", None)
        if spans is None:
            span.end(end_time=end_time)
        else:
            spans.append((span, end_time))

    def _db_status_code(self, service: str, code: str | None) -> str | None:
        """The failure's ``db.response.status_code``: its SQLSTATE, MySQL error number or SQLite
        error name, for a database downstream only (an errno name is no database's answer)."""
        if code is None or code in _ERRNO_NAMES or code.startswith("EAI_"):
            return None
        if ATTR_DB_SYSTEM_NAME not in self._runtime.description(service):
            return None
        return code

    def _on_error_classified(self, event: ErrorClassified) -> None:
        classification = event.classification
        attrs = self._attrs
        category = classification.category.value
        severity = classification.severity.value
        status = self._db_status_code(event.service, classification.code)
        try:
            self._instruments.errors.add(
                1,
                attrs.errors(
                    attrs.service(event.service),
                    category,
                    severity,
                    attrs.error_type(classification.error_type),
                    None if status is None else attrs.db_status_code(status),
                ),
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        span_event: dict[str, AttributeValue] = {
            ATTR_RECOVERY_ATTEMPT: event.attempt,
            ATTR_ERROR_CATEGORY: category,
            ATTR_ERROR_SEVERITY: severity,
            ATTR_ERROR_TYPE: classification.error_type,
        }
        if status is not None:
            span_event[ATTR_DB_RESPONSE_STATUS_CODE] = status
        self._buffer(
            event.service,
            EVENT_ERROR.name,
            span_event,
            classification.error_type,
            restart=event.attempt <= 1,
        )

    def _on_retry_scheduled(self, event: RetryScheduled) -> None:
        classification = event.classification
        attrs = self._attrs
        category = classification.category.value
        strategy = event.strategy.value
        try:
            self._instruments.retries.add(
                1, attrs.retries(attrs.service(event.service), category, strategy)
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        self._buffer(
            event.service,
            EVENT_RETRY.name,
            {
                ATTR_RECOVERY_ATTEMPT: event.attempt,
                ATTR_RETRY_DELAY: event.delay_s,
                ATTR_ERROR_CATEGORY: category,
                ATTR_RECOVERY_STRATEGY: strategy,
            },
            classification.error_type,
        )

    def _on_budget_exhausted(self, event: RetryBudgetExhausted) -> None:
        classification = event.classification
        attrs = self._attrs
        category = classification.category.value
        try:
            self._instruments.retry_budget_exhausted.add(
                1, attrs.retry_budget_exhausted(attrs.service(event.service), category)
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        self._buffer(
            event.service,
            EVENT_RETRY_BUDGET_EXHAUSTED.name,
            {ATTR_ERROR_CATEGORY: category},
            classification.error_type,
        )

    def _on_transition(self, event: BreakerTransitioned) -> None:
        attrs = self._attrs
        from_state = event.from_state.value
        to_state = event.to_state.value
        reason = event.reason.value
        try:
            self._instruments.breaker_transitions.add(
                1, attrs.transitions(attrs.breaker(event.breaker), from_state, to_state, reason)
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        try:
            span = trace.get_current_span()
            if span.is_recording():
                attributes: dict[str, AttributeValue] = {
                    ATTR_BREAKER_NAME: event.breaker,
                    ATTR_BREAKER_FROM_STATE: from_state,
                    ATTR_BREAKER_TO_STATE: to_state,
                    ATTR_BREAKER_TRANSITION_REASON: reason,
                }
                if event.open_for_s is not None:
                    attributes[ATTR_BREAKER_OPEN_DURATION] = event.open_for_s
                span.add_event(EVENT_BREAKER_TRANSITION.name, attributes)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    def _on_rejection(self, event: CallRejected) -> None:
        attrs = self._attrs
        state = event.state.value
        try:
            self._instruments.breaker_rejections.add(
                1, attrs.rejections(attrs.breaker(event.breaker), state)
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        try:
            span = trace.get_current_span()
            if span.is_recording():
                attributes: dict[str, AttributeValue] = {
                    ATTR_BREAKER_NAME: event.breaker,
                    ATTR_BREAKER_STATE: state,
                }
                if event.retry_after_s is not None:
                    attributes[ATTR_BREAKER_RETRY_AFTER] = event.retry_after_s
                span.add_event(EVENT_BREAKER_REJECTION.name, attributes)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    def _on_recovery_finished(self, event: RecoveryFinished) -> None:
        attrs = self._attrs
        strategy = event.strategy.value
        outcome = event.outcome.value
        duration = _clean_duration(event.duration_s)
        try:
            service = attrs.service(event.service)
            instruments = self._instruments
            instruments.recoveries.add(
                1,
                attrs.recoveries(
                    service,
                    attrs.category(event.category),
                    strategy,
                    outcome,
                    attrs.give_up_reason(event.give_up_reason) if event.give_up_reason else "",
                ),
            )
            instruments.recovery_duration.record(
                duration, attrs.recovery_duration(service, strategy, outcome)
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        try:
            self._emit_recovery_span(event, strategy, outcome, duration)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    # --- prediction and memory (rare events: plain dicts, no attribute cache) ------------

    def _on_failure_predicted(self, event: FailurePredicted) -> None:
        resource = self._names.resource(event.resource)
        severity = event.severity.value
        if not event.cleared:
            try:
                self._instruments.predictions.add(
                    1, {ATTR_RESOURCE: resource, ATTR_PREDICTION_SEVERITY: severity}
                )
            except Exception as error:  # noqa: BLE001
                report_internal_error("telemetry.metrics", error)
        attributes: dict[str, AttributeValue] = {
            ATTR_RESOURCE: event.resource,
            ATTR_PREDICTION_STATE: "cleared" if event.cleared else "raised",
            ATTR_PREDICTION_SEVERITY: severity,
            ATTR_PREDICTION_PROBABILITY: event.probability,
            ATTR_PREDICTION_CONFIDENCE: event.confidence,
        }
        tte = event.time_to_exhaustion_s
        if tte is not None and math.isfinite(tte):
            attributes[ATTR_PREDICTION_TIME_TO_EXHAUSTION] = tte
        try:
            # A prediction is an instant: a zero-length span, a child of whatever is current.
            now = _time_ns()
            span = self._tracer.start_span(
                SPAN_PREDICTION.name, kind=_INTERNAL, attributes=attributes, start_time=now
            )
            self._end(span, now)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    def _on_prevention_action(self, event: PreventionActionRun) -> None:
        names = self._names
        try:
            attributes = {
                ATTR_RESOURCE: names.resource(event.resource),
                ATTR_PREVENTION_ACTION: names.action(event.action),
                ATTR_PREVENTION_OUTCOME: names.outcome(event.outcome),
            }
            if event.skip_reason:
                attributes[ATTR_PREVENTION_SKIP_REASON] = names.skip_reason(event.skip_reason)
            self._instruments.prevention_actions.add(1, attributes)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)

    def _on_memory_pressure(self, event: MemoryPressureChanged) -> None:
        self._memory_level = self._names.pressure_level(event.level)
        if math.isfinite(event.usage_ratio):
            self._memory_ratio = event.usage_ratio

    def _on_memory_cleanup(self, event: MemoryCleanupFinished) -> None:
        names = self._names
        level = names.cleanup_level(event.level)
        trigger = names.trigger(event.trigger)
        freed = max(0, int(event.bytes_freed))
        try:
            instruments = self._instruments
            instruments.memory_cleanups.add(
                1, {ATTR_MEMORY_CLEANUP_LEVEL: level, ATTR_MEMORY_CLEANUP_TRIGGER: trigger}
            )
            instruments.memory_freed.add(freed, {ATTR_MEMORY_CLEANUP_LEVEL: level})
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.metrics", error)
        try:
            # Published when the cleanup has finished: the span starts duration_s earlier.
            end = _time_ns()
            start = end - int(_clean_duration(event.duration_s) * _NS_PER_S)
            span = self._tracer.start_span(
                SPAN_MEMORY_CLEANUP.name,
                kind=_INTERNAL,
                attributes={
                    ATTR_MEMORY_CLEANUP_LEVEL: event.level,
                    ATTR_MEMORY_CLEANUP_TRIGGER: event.trigger,
                    ATTR_MEMORY_BYTES_FREED: freed,
                    ATTR_MEMORY_ENTRIES_EVICTED: max(0, int(event.entries_evicted)),
                },
                start_time=start,
            )
            self._end(span, end)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    # --- the recovery span --------------------------------------------------------------

    def _buffer(
        self,
        service: str,
        name: str,
        attributes: Mapping[str, AttributeValue],
        error_type: str | None,
        *,
        restart: bool = False,
    ) -> None:
        live = self._active.get()
        # ``finished``: a task spawned during a recovery inherits its context, and with it
        # this span, which may have ended since; its events then belong to a call of its own.
        if live is not None and live.service == service and not live.finished:
            try:
                if error_type:
                    live.error_type = error_type
                live.span.add_event(name, attributes)
            except Exception as error:  # noqa: BLE001
                report_internal_error("telemetry.trace", error)
            return
        try:
            var = self._pending
            entries = var.get()
            span_event: _SpanEvent = (name, attributes, _time_ns())
            for index, entry in enumerate(entries):
                if entry.service == service:
                    if restart:
                        entries = entries[:index] + entries[index + 1 :]
                        break
                    events = entry.events
                    if len(events) >= MAX_EVENTS_PER_CALL:
                        events = events[len(events) - MAX_EVENTS_PER_CALL + 1 :]
                    updated = _Pending(
                        service, (*events, span_event), error_type or entry.error_type
                    )
                    var.set((*entries[:index], updated, *entries[index + 1 :]))
                    return
            if len(entries) >= MAX_PENDING_CALLS:
                entries = entries[len(entries) - MAX_PENDING_CALLS + 1 :]
            var.set((*entries, _Pending(service, (span_event,), error_type)))
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.trace", error)

    def _take(self, service: str) -> _Pending | None:
        var = self._pending
        entries = var.get()
        for index, entry in enumerate(entries):
            if entry.service == service:
                var.set(entries[:index] + entries[index + 1 :])
                return entry
        return None

    def _emit_recovery_span(
        self, event: RecoveryFinished, strategy: str, outcome: str, duration: float
    ) -> None:
        live = self._active.get()
        if live is not None and live.service == event.service and not live.finished:
            self._finish_live(live, event, strategy, outcome)
            return
        pending = self._take(event.service)
        end = _time_ns()
        start = end - int(duration * _NS_PER_S)
        failed = event.outcome in _ERROR_OUTCOMES
        attributes: dict[str, AttributeValue] = {
            **self._runtime.description(event.service),
            ATTR_SERVICE: event.service,
            ATTR_ERROR_CATEGORY: event.category,
            ATTR_RECOVERY_STRATEGY: strategy,
            ATTR_RECOVERY_OUTCOME: outcome,
            ATTR_RECOVERY_ATTEMPTS: event.attempts,
        }
        if event.give_up_reason:
            attributes[ATTR_RECOVERY_GIVE_UP_REASON] = event.give_up_reason
        # An entry left by a call that made no attempt is stale (its call was abandoned).
        if pending is not None and event.attempts <= 0:
            pending = None
        if failed:
            if pending is not None and pending.error_type:
                attributes[ATTR_ERROR_TYPE] = pending.error_type
            elif event.outcome is Outcome.REJECTED:
                # Refused without an attempt: by a breaker, or by a downstream's cooldown.
                attributes[ATTR_ERROR_TYPE] = (
                    _THROTTLED_TYPE if event.give_up_reason == "throttled" else _CIRCUIT_OPEN_TYPE
                )
            else:
                attributes[ATTR_ERROR_TYPE] = OTHER_ERROR_TYPE
        span = self._tracer.start_span(
            SPAN_RECOVERY.name, kind=_INTERNAL, attributes=attributes, start_time=start
        )
        try:
            if span.is_recording():
                if pending is not None:
                    for name, event_attributes, timestamp in pending.events:
                        # Never before the span: with a test clock the two clocks differ.
                        span.add_event(name, event_attributes, timestamp=max(timestamp, start))
                if failed:
                    span.set_status(Status(StatusCode.ERROR, event.give_up_reason or outcome))
        finally:
            self._end(span, end)

    def _finish_live(
        self, live: _LiveRecovery, event: RecoveryFinished, strategy: str, outcome: str
    ) -> None:
        live.finished = True
        span = live.span
        if not span.is_recording():
            return
        attributes: dict[str, AttributeValue] = {
            ATTR_ERROR_CATEGORY: event.category,
            ATTR_RECOVERY_STRATEGY: strategy,
            ATTR_RECOVERY_OUTCOME: outcome,
            ATTR_RECOVERY_ATTEMPTS: event.attempts,
        }
        if event.give_up_reason:
            attributes[ATTR_RECOVERY_GIVE_UP_REASON] = event.give_up_reason
        if event.outcome in _ERROR_OUTCOMES:
            attributes[ATTR_ERROR_TYPE] = live.error_type or OTHER_ERROR_TYPE
            span.set_status(Status(StatusCode.ERROR, event.give_up_reason or outcome))
        span.set_attributes(attributes)

    # --- gauges (called by the hub, at collection time) -------------------------------

    def _observe_breaker_state(self) -> list[Observation]:
        attrs = self._attrs
        observations = []
        for name, breaker in self._runtime.breakers.items():
            folded = attrs.breaker(name)
            current = breaker.state
            for state, value in _STATES:
                observations.append(
                    Observation(1 if state is current else 0, attrs.breaker_state(folded, value))
                )
        return observations

    def _observe_breaker_health(self) -> list[Observation]:
        return self._observe_snapshots(lambda snapshot: snapshot.health_score)

    def _observe_failure_rate_threshold(self) -> list[Observation]:
        return self._observe_snapshots(lambda snapshot: snapshot.effective_failure_rate_threshold)

    def _observe_snapshots(self, read: Callable[[BreakerSnapshot], float]) -> list[Observation]:
        """``read`` of every breaker's snapshot. Never waits on a raptor lock
        (``try_snapshot``): a breaker busy at this instant is left out of one reading."""
        attrs = self._attrs
        observations = []
        for name, breaker in self._runtime.breakers.items():
            snapshot = breaker.try_snapshot()
            if snapshot is not None:
                observations.append(
                    Observation(read(snapshot), attrs.breaker_only(attrs.breaker(name)))
                )
        return observations

    def _observe_budget_tokens(self) -> list[Observation]:
        attrs = self._attrs
        return [
            Observation(tokens, attrs.service_only(attrs.service(service)))
            for service, tokens in self._runtime.budget_tokens().items()
        ]

    def _observe_internal_errors(self) -> list[Observation]:
        # Process-wide, as the safety net is: every sink reads the same counts.
        return [
            Observation(count, {ATTR_INTERNAL_SITE: site})
            for site, count in internal_error_counts().items()
        ]

    def _observe_utilization(self) -> list[Observation]:
        snapshot = self._runtime.resource_snapshot()
        resource = self._names.resource
        return [
            Observation(value, {ATTR_RESOURCE: resource(name)})
            for name, value in snapshot.utilization.items()
        ]

    def _observe_time_to_exhaustion(self) -> list[Observation]:
        snapshot = self._runtime.resource_snapshot()
        resource = self._names.resource
        return [
            Observation(value, {ATTR_RESOURCE: resource(name)})
            for name, value in snapshot.time_to_exhaustion_s.items()
            if math.isfinite(value)
        ]

    def _observe_probability(self) -> list[Observation]:
        snapshot = self._runtime.resource_snapshot()
        resource = self._names.resource
        return [
            Observation(value, {ATTR_RESOURCE: resource(name)})
            for name, value in snapshot.probability.items()
        ]

    def _observe_memory_pressure(self) -> list[Observation]:
        runtime = self._runtime
        ratio = runtime.resource_snapshot().memory_pressure
        if ratio is None:
            # The running memory controller's ratio now; the last level change's is stale
            # for as long as the level holds (0.72 at the crossing into warning, still 0.72
            # at 84 %, where RaptorMemoryUsageHigh should fire).
            ratio = runtime.memory_ratio()
        if ratio is None or not math.isfinite(ratio):
            ratio = self._memory_ratio
        return [] if ratio is None else [Observation(ratio)]

    def _observe_memory_pressure_level(self) -> list[Observation]:
        current = self._memory_level
        if current is None:
            return []
        levels = _PRESSURE_LEVELS if current in _PRESSURE_LEVELS else (*_PRESSURE_LEVELS, current)
        return [
            Observation(1 if level == current else 0, {ATTR_MEMORY_PRESSURE_LEVEL: level})
            for level in levels
        ]


class _ResourceNames:
    """Caps on the free-string values of the prediction and memory attributes."""

    __slots__ = (
        "action",
        "cleanup_level",
        "outcome",
        "pressure_level",
        "resource",
        "skip_reason",
        "trigger",
    )

    def __init__(self) -> None:
        self.resource = BoundedValues(16, _OTHER)
        self.action = BoundedValues(32, _OTHER)
        self.outcome = BoundedValues(3, _OTHER)
        self.skip_reason = BoundedValues(len(SKIP_REASONS), _OTHER)
        self.pressure_level = BoundedValues(4, _OTHER)
        self.cleanup_level = BoundedValues(3, _OTHER)
        self.trigger = BoundedValues(4, _OTHER)


_Observer: TypeAlias = "Callable[[TelemetrySink], list[Observation]]"
_Merge: TypeAlias = "Callable[[list[Observation]], list[Observation]]"
_AttributeSet: TypeAlias = "frozenset[tuple[str, AttributeValue]]"


def _attribute_set(observation: Observation) -> _AttributeSet:
    return frozenset((observation.attributes or {}).items())


def _keeping(prefer: Callable[[float, float], bool]) -> _Merge:
    """One observation per attribute set: of several, the one whose value ``prefer(new,
    kept)`` picks (the first of equals)."""

    def merge(observations: list[Observation]) -> list[Observation]:
        kept: dict[_AttributeSet, Observation] = {}
        for observation in observations:
            key = _attribute_set(observation)
            found = kept.get(key)
            if found is None or prefer(observation.value, found.value):
                kept[key] = observation
        return list(kept.values())

    return merge


def _one_hot(label: str, ranks: Mapping[AttributeValue, float], unknown: float) -> _Merge:
    """For a gauge with one point per value of ``label``, the current one 1: one point per
    attribute set, and among the sets that differ only in ``label``, exactly one 1, for the
    highest-ranked value reported current (``ranks``; ``unknown`` for a value not in it)."""

    def merge(observations: list[Observation]) -> list[Observation]:
        groups: dict[_AttributeSet, dict[AttributeValue, Observation]] = {}
        current: dict[_AttributeSet, AttributeValue] = {}
        for observation in observations:
            attributes = observation.attributes or {}
            value = attributes.get(label, "")
            group = frozenset(attributes.items()) - {(label, value)}
            points = groups.get(group)
            if points is None:
                points = groups[group] = {}
            points.setdefault(value, observation)
            if observation.value == 1:
                best = current.get(group)
                if best is None or ranks.get(value, unknown) > ranks.get(best, unknown):
                    current[group] = value
        merged = []
        for group, points in groups.items():
            winner = current.get(group)
            for value, observation in points.items():
                one = 1 if value == winner else 0
                merged.append(
                    observation
                    if observation.value == one
                    else Observation(one, observation.attributes)
                )
        return merged

    return merge


# Readings that land on one attribute set in one collection (names folded into ``other`` by
# a sink whose cap is below its runtime's, resources past their cap, or two sinks on one
# meter provider reporting the same name) must be merged: the SDK keeps only the last
# observation of a set, so a closed ``other`` read after an open breaker folded into it would
# hide the open one. Each gauge keeps the reading that keeps its alert truthful.
# The worst state: an open breaker shows, whatever shares its name (RaptorCircuitBreakerOpen).
_worst_state: Final = _one_hot(
    ATTR_BREAKER_STATE,
    {CircuitState.CLOSED.value: 0, CircuitState.HALF_OPEN.value: 1, CircuitState.OPEN.value: 2},
    0,
)
# The worst level; one outside the four (a publisher's own) ranks above normal, below alarms.
_worst_pressure_level: Final = _one_hot(
    ATTR_MEMORY_PRESSURE_LEVEL, {level: rank for rank, level in enumerate(_PRESSURE_LEVELS)}, 0.5
)
# Health, budget tokens and time to exhaustion alarm when low: the lowest is the one in trouble.
_lowest: Final = _keeping(operator.lt)
# Utilization, probability and memory pressure alarm when high. A failure-rate threshold is
# only ever raised from the configured one (by the adaptive baseline): the highest shows how
# far any breaker sharing the name has been loosened, where a dashboard looks for it.
_highest: Final = _keeping(operator.gt)


class _GaugeHub:
    """The gauges of one meter provider, shared by every sink installed on it.

    An SDK meter ignores a second registration of an instrument name (and its callbacks), so
    a sink installed after another was uninstalled would otherwise report no gauge at all.
    The first install registers the gauges once; each callback then asks every installed
    sink, skipping (and reporting) one that fails, and merges the readings that share an
    attribute set into one.
    """

    __slots__ = ("__weakref__", "_lock", "_registered", "_sinks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        self._sinks: tuple[TelemetrySink, ...] = ()
        self._registered = False

    def add(self, sink: TelemetrySink) -> None:
        with self._lock:
            if sink not in self._sinks:
                self._sinks = (*self._sinks, sink)
            if self._registered:
                return
            self._registered = True
        try:
            create_gauges(sink._meter, self._callbacks())
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.gauges", error)

    def remove(self, sink: TelemetrySink) -> None:
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def _callbacks(self) -> dict[InstrumentSpec, GaugeCallback]:
        return {
            METRIC_BREAKER_STATE: self._callback(
                METRIC_BREAKER_STATE.name, TelemetrySink._observe_breaker_state, _worst_state
            ),
            METRIC_BREAKER_HEALTH: self._callback(
                METRIC_BREAKER_HEALTH.name, TelemetrySink._observe_breaker_health, _lowest
            ),
            METRIC_BREAKER_FAILURE_RATE_THRESHOLD: self._callback(
                METRIC_BREAKER_FAILURE_RATE_THRESHOLD.name,
                TelemetrySink._observe_failure_rate_threshold,
                _highest,
            ),
            METRIC_RETRY_BUDGET_TOKENS: self._callback(
                METRIC_RETRY_BUDGET_TOKENS.name, TelemetrySink._observe_budget_tokens, _lowest
            ),
            METRIC_INTERNAL_ERRORS: self._callback(
                METRIC_INTERNAL_ERRORS.name, TelemetrySink._observe_internal_errors, _highest
            ),
            METRIC_RESOURCE_UTILIZATION: self._callback(
                METRIC_RESOURCE_UTILIZATION.name, TelemetrySink._observe_utilization, _highest
            ),
            METRIC_PREDICTION_TIME_TO_EXHAUSTION: self._callback(
                METRIC_PREDICTION_TIME_TO_EXHAUSTION.name,
                TelemetrySink._observe_time_to_exhaustion,
                _lowest,
            ),
            METRIC_PREDICTION_PROBABILITY: self._callback(
                METRIC_PREDICTION_PROBABILITY.name, TelemetrySink._observe_probability, _highest
            ),
            METRIC_MEMORY_PRESSURE: self._callback(
                METRIC_MEMORY_PRESSURE.name, TelemetrySink._observe_memory_pressure, _highest
            ),
            METRIC_MEMORY_PRESSURE_LEVEL: self._callback(
                METRIC_MEMORY_PRESSURE_LEVEL.name,
                TelemetrySink._observe_memory_pressure_level,
                _worst_pressure_level,
            ),
        }

    def _callback(self, name: str, observe: _Observer, merge: _Merge) -> GaugeCallback:
        where = f"telemetry.gauge {name}"

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            observations: list[Observation] = []
            for sink in self._sinks:
                if not sink._installed:
                    continue
                try:
                    observations.extend(observe(sink))
                except Exception as error:  # noqa: BLE001 - a gauge must not fail a collection
                    report_internal_error(where, error)
            try:
                return merge(observations)
            except Exception as error:  # noqa: BLE001
                report_internal_error(where, error)
                return []

        return callback


class _GlobalProvider:
    """The key of the hub for the global meter provider, whichever object it is now."""


# The global provider can be set once only; until then a proxy stands in, whose gauges the
# SDK takes over. So every sink on "the global provider" shares one hub, set or not.
_GLOBAL_PROVIDER: Final = _GlobalProvider()
_hubs_box = LockBox()
_hubs: weakref.WeakKeyDictionary[object, _GaugeHub] = weakref.WeakKeyDictionary()


def _hub_for(provider: MeterProvider | None) -> _GaugeHub:
    key: object = provider
    if provider is None or provider is metrics.get_meter_provider():
        key = _GLOBAL_PROVIDER
    with _hubs_box.lock:
        try:
            hub = _hubs.get(key)
            if hub is None:
                hub = _hubs[key] = _GaugeHub()
        except TypeError:  # a provider that cannot be weakly referenced: not shared
            hub = _GaugeHub()
    return hub


def _tracer(provider: TracerProvider | None) -> Tracer:
    try:
        return trace.get_tracer(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            tracer_provider=provider,
            schema_url=SCHEMA_URL,
        )
    except Exception as error:  # noqa: BLE001 - a broken provider must not stop the app
        report_internal_error("telemetry.tracer", error)
        return trace.NoOpTracer()


def _meter(provider: MeterProvider | None) -> Meter:
    try:
        return metrics.get_meter(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            meter_provider=provider,
            schema_url=SCHEMA_URL,
        )
    except Exception as error:  # noqa: BLE001
        report_internal_error("telemetry.meter", error)
        return metrics.NoOpMeter(INSTRUMENTATION_NAME)


def _instruments(meter: Meter) -> Instruments:
    try:
        return create_instruments(meter)
    except Exception as error:  # noqa: BLE001
        report_internal_error("telemetry.instruments", error)
        return create_instruments(metrics.NoOpMeter(INSTRUMENTATION_NAME))


def _no_scope(service: str, started: float) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class _LiveRecovery:
    """The span of a recovery in progress, and what the sink learned about it so far."""

    __slots__ = ("error_type", "finished", "service", "span")

    def __init__(self, span: Span, service: str) -> None:
        self.span = span
        self.service = service
        self.error_type: str | None = None
        self.finished = False


class _RecoveryScope:
    """Starts the ``raptor.recovery`` span and makes it current; ends it on exit."""

    __slots__ = ("_context_token", "_live", "_live_token", "_service", "_sink", "_started")

    def __init__(self, sink: TelemetrySink, service: str, started: float) -> None:
        self._sink = sink
        self._service = service
        self._started = started

    def __enter__(self) -> None:
        sink = self._sink
        now_ns = _time_ns()
        waited = _clean_duration(sink._runtime.clock.monotonic() - self._started)
        span = sink._tracer.start_span(
            SPAN_RECOVERY.name,
            kind=_INTERNAL,
            attributes={**sink._runtime.description(self._service), ATTR_SERVICE: self._service},
            start_time=now_ns - int(waited * _NS_PER_S),
        )
        self._live = _LiveRecovery(span, self._service)
        self._live_token = sink._active.set(self._live)
        try:
            self._context_token = otel_context.attach(trace.set_span_in_context(span))
        except BaseException:
            # No exit will follow a failed enter: undo it, or the span never ends and stays
            # the caller's live recovery, taking the events of later calls.
            sink._active.reset(self._live_token)
            self._live.finished = True
            span.end()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            otel_context.detach(self._context_token)
            self._sink._active.reset(self._live_token)
        finally:
            # Unfinished means abandoned (cancelled, interrupted): the span still ends.
            self._live.finished = True
            self._live.span.end()
