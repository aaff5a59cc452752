"""The error-recovery monitor and the error analytics, fed by the runtime's event bus.

:class:`ErrorRecoveryMonitor` subscribes to ``runtime.bus`` when it is built, so every guarded
call, integration and recovery feeds it with no code in the application. What it does:

* **Real-time recovery metrics** over the last ``evaluation_window`` (5 min), per service and
  overall: success rate, recovery time p50/p95/mean, error frequency per minute, attempts,
  by strategy (``get_current_metrics()``).
* **Threshold alerts** (the seed's numbers, ``MonitorConfig``) with Prometheus' lifecycle:
  pending, firing, resolved; a cooldown; auto-resolve; minimum volumes
  (``core.alerts``). ``get_active_alerts()``; callbacks (sync or async) on firing/resolved.
* **Reports** every ``report_interval`` (1 h), covering the period since the previous one
  (``report()`` gives the current period so far; ``reports()`` the finished ones).
* **Analytics** (:class:`ErrorAnalytics`, ``get_error_analytics()``): error patterns
  (fingerprints of normalised messages, a space-saving top-N per service), trends with EWMA
  baselines and three detectors, recovery effectiveness by strategy and category, the
  strategies the learner abandoned, and insights with recommendations.

Cost on the application's call path: the bus hands each event to :meth:`_on_event`, which
appends ``(time, event)`` to a bounded deque, nothing more (the success path publishes no event,
so it costs nothing at all). Everything else, from reading the exception's message to the
fingerprint, the sketch, the windows and the detectors, happens on the monitor's own daemon
thread (``otel-raptor-monitor``), which drains the deque every second (sooner when it fills),
or in whichever thread asks for a result. An exception waits in the deque until then, so it
lives at most that long beyond its call. A monitor whose thread was not started processes its
queue itself every ``4096`` events (in the publishing thread); past ``QUEUE_LIMIT`` queued
events (a thread that cannot keep up) the oldest are dropped and counted.

Time comes from ``runtime.clock``, so tests drive everything with a fake clock and
:meth:`ErrorRecoveryMonitor.tick`. Memory is bounded whatever the traffic: windows are rings of
slices, the report period's rows and the sketches are capped per key, the insights and the
finished reports are capped in number. Thread-safe (one lock, never held while calling out),
asyncio-friendly (async callbacks run on the loop that started monitoring, else on the
monitor's own callback thread, never waited for and cancelled after 10 s; that thread stops
with ``close()`` or when the monitor is garbage-collected, and none starts once it is closed)
and fork-safe (the child gets fresh locks and, if the parent was monitoring, its own thread).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import inspect
import math
import re
import threading
import weakref
from array import array
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, TypeAlias

from otel_raptor.config.monitor import MonitorConfig
from otel_raptor.core.alerts import (
    Alert,
    AlertKey,
    AlertNotification,
    AlertOptions,
    AlertRule,
    AlertSeverity,
    AlertState,
    AlertTracker,
    Comparison,
)
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import (
    BreakerTransitioned,
    CallRejected,
    ErrorClassified,
    Event,
    MemoryPressureChanged,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.fingerprint import MAX_MESSAGE_CHARS, fingerprint, normalize_message
from otel_raptor.core.insights import (
    Insight,
    InsightBook,
    breaker_flapping,
    budget_exhausted,
    error_rise,
    error_spike,
    futile_retries,
    recovery_slowing,
    strategy_abandoned,
    success_declining,
)
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.recovery_stats import (
    F_BREAKER_OPENS,
    F_BUDGET_REFUSALS,
    F_DURATION_SUM,
    F_ERRORS,
    F_LEARNED_FUTILE,
    F_OUTCOMES,
    F_RECOVERIES,
    F_REJECTIONS,
    F_RESULTS,
    F_RETRIES,
    F_TIMED,
    ROW_FIELDS,
    RecoverySummary,
    ResultKind,
    add_recovery,
    summarize,
)
from otel_raptor.core.recovery_stats import (
    judged as judged_recoveries,
)
from otel_raptor.core.reports import (
    AbandonedStrategy,
    ErrorPattern,
    MonitorReport,
    ServiceReport,
    StrategyEffectiveness,
)
from otel_raptor.core.sketch import SpaceSaving
from otel_raptor.core.states import CircuitState
from otel_raptor.core.timeseries import SlicedCounters
from otel_raptor.core.trends import AnomalyKind, SeriesKind, TrendOptions, TrendSeries
from otel_raptor.errors import ConfigError
from otel_raptor.runtime._bounded import BoundExceeded, run_bounded
from otel_raptor.runtime.forksafe import LockBox, after_fork_in_child, register_lock
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import Runtime, get_runtime

__all__ = [
    "AlertCallback",
    "ErrorAnalytics",
    "ErrorRecoveryMonitor",
    "MonitorListener",
    "QUEUE_LIMIT",
    "RULE_BREAKER_OPEN",
    "RULE_ERROR_FREQUENCY",
    "RULE_MEMORY_USAGE",
    "RULE_RECOVERY_TIME",
    "RULE_SUCCESS_RATE",
    "TrendState",
    "get_error_analytics",
    "get_error_recovery_monitor",
    "process_monitor",
    "set_error_recovery_monitor",
]

#: Events queued for the monitor thread at most; past it the oldest are dropped (counted).
QUEUE_LIMIT: Final = 65_536
#: Queued events that wake the monitor thread before its next second.
_HIGH_WATER: Final = 4096
#: How often the monitor thread drains the queue (seconds, real time).
_FLUSH_S: Final = 1.0
#: Slices of the recent-data ring per evaluation window (and the ring holds 20 % more).
_SLICES_PER_WINDOW: Final = 30
#: Distinct (service, strategy, category) keys per ring slice and in a report period.
_MAX_KEYS_PER_SLICE: Final = 1024
_MAX_PERIOD_KEYS: Final = 4096
#: Error patterns kept per service (space-saving counters), and services with a sketch.
_MIN_SKETCH: Final = 32
_MAX_SKETCHES: Final = 512
#: Entries of the (error type, category, message) -> fingerprint cache.
_FINGERPRINT_CACHE: Final = 4096
#: Trend series at most, and intervals caught up at most after a long pause.
_MAX_SERIES: Final = 2048
_MAX_CATCH_UP: Final = 120
#: Finished reports kept at most (whatever ``metrics_retention`` says).
_MAX_REPORTS: Final = 48
#: Share of retried calls that recover at or below which retrying is called futile.
_FUTILE_RATE: Final = 0.05
#: Breaker trips in one evaluation window that make it flapping.
_FLAPPING_TRIPS: Final = 3
#: How long an async alert callback may run (seconds, real time); past it, it is cancelled
#: and reported. Nobody waits for it: the thread that delivers the alert hands it over.
_ASYNC_TIMEOUT_S: Final = 10.0
#: Async callbacks queued or running on the monitor's own callback loop at most: past it new
#: ones are dropped and reported (a callback that blocks that loop's thread must not make the
#: rest pile up).
_MAX_PENDING_CALLBACKS: Final = 256
#: On ``close()``, how long the async callbacks still queued or running get to finish, then
#: to end once cancelled (seconds each); ``close()`` waits three times as long at most.
_CALLBACK_CLOSE_S: Final = 1.0
#: What ``error_type`` of the seed's API may be (docs/telemetry.md: an exception class or an
#: HTTP status code): a dotted name (``httpx.ConnectTimeout``; ``<locals>`` as in a
#: ``__qualname__``) or three digits (``503``), at most ``_MAX_ERROR_TYPE`` characters. It
#: becomes the ``error.type`` attribute of metrics and spans: never a message (rule 5).
_ERROR_TYPE: Final = re.compile(
    r"(?:[^\W\d]\w*|<locals>)(?:\.(?:[^\W\d]\w*|<locals>))*|[1-5][0-9][0-9]"
)
_MAX_ERROR_TYPE: Final = 128
_ERROR_TYPE_ALLOWED: Final = (
    f"an exception class name ('TimeoutError', 'httpx.ConnectTimeout') or an HTTP status code"
    f" ('503'), at most {_MAX_ERROR_TYPE} characters; not a message"
)

#: Rule names: the ``alertname`` of the same rules in ``collector/rules/``.
RULE_RECOVERY_TIME: Final = "RaptorRecoveryTimeHigh"
RULE_SUCCESS_RATE: Final = "RaptorRecoverySuccessRateLow"
RULE_ERROR_FREQUENCY: Final = "RaptorErrorFrequencyHigh"
RULE_MEMORY_USAGE: Final = "RaptorMemoryUsageHigh"
#: A breaker is open (or half-open, probing): its calls are refused at once. The success
#: rate leaves refusals out, so during an outage this is the rule that says so.
RULE_BREAKER_OPEN: Final = "RaptorCircuitBreakerOpen"

_Key: TypeAlias = "tuple[str, str, str]"  # (service, strategy or "", category or "")
_OVERFLOW: Final[_Key] = ("other", "", "other")
_ZERO_ROW: Final = array("d", bytes(8 * ROW_FIELDS))
_WATCHED: Final = frozenset(
    {
        ErrorClassified,
        RetryScheduled,
        RetryBudgetExhausted,
        BreakerTransitioned,
        CallRejected,
        RecoveryFinished,
        MemoryPressureChanged,
    }
)
_SUCCESS_OUTCOMES: Final = frozenset({Outcome.RECOVERED.value, Outcome.FALLBACK.value})
#: Rules judged once per evaluation from a reading of their own, not per service's summary.
_NOT_PER_SERVICE: Final = frozenset({"memory_usage", "breaker_open"})

#: ``fn(alert)``: called when an alert starts firing (its notification was sent) and when it
#: resolves; ``alert.state`` says which. May be ``async``.
AlertCallback: TypeAlias = "Callable[[Alert], object]"


class MonitorListener(Protocol):
    """Receives what the monitor concludes (the telemetry layer is one). Called from the
    thread that processed the events, never with the monitor's lock held; a listener that
    raises is reported once and skipped."""

    def on_recoveries(self, finished: Sequence[RecoveryFinished]) -> None: ...

    def on_alert(self, notification: AlertNotification) -> None: ...

    def on_insight(self, insight: Insight) -> None: ...

    def on_report(self, report: MonitorReport) -> None: ...


@dataclass(frozen=True, slots=True)
class _Pattern:
    error_type: str
    category: str
    template: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendState:
    """One trend series as it stands: ``metric`` (``errors`` per interval, mean
    ``recovery_time`` in seconds, or ``failure_ratio``), its ``baseline`` and ``recent`` level,
    and the deviation ``score`` of the recent level (standard deviations)."""

    metric: str
    service: str
    category: str
    baseline: float
    recent: float
    score: float
    intervals: int


def _message(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ is the app's, not a reason to fail
        return ""
    return text[:MAX_MESSAGE_CHARS]


def _type_name(error: BaseException) -> str:
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _rules(config: MonitorConfig) -> tuple[AlertRule, ...]:
    warning, critical = AlertSeverity.WARNING, AlertSeverity.CRITICAL
    volume = float(config.min_recoveries)
    return (
        AlertRule(
            name=RULE_RECOVERY_TIME,
            severity=warning,
            metric="recovery_time_p95",
            comparison=Comparison.ABOVE,
            threshold=config.recovery_time_warning,
            min_volume=volume,
        ),
        AlertRule(
            name=RULE_RECOVERY_TIME,
            severity=critical,
            metric="recovery_time_p95",
            comparison=Comparison.ABOVE,
            threshold=config.recovery_time_critical,
            min_volume=volume,
        ),
        AlertRule(
            name=RULE_SUCCESS_RATE,
            severity=warning,
            metric="success_rate",
            comparison=Comparison.BELOW,
            threshold=config.success_rate_warning,
            min_volume=volume,
        ),
        AlertRule(
            name=RULE_SUCCESS_RATE,
            severity=critical,
            metric="success_rate",
            comparison=Comparison.BELOW,
            threshold=config.success_rate_critical,
            min_volume=volume,
        ),
        AlertRule(
            name=RULE_ERROR_FREQUENCY,
            severity=warning,
            metric="error_frequency",
            comparison=Comparison.ABOVE,
            threshold=config.error_frequency,
        ),
        AlertRule(
            name=RULE_BREAKER_OPEN,
            severity=critical,
            metric="breaker_open",
            comparison=Comparison.ABOVE,
            threshold=0.0,
        ),
        AlertRule(
            name=RULE_MEMORY_USAGE,
            severity=warning,
            metric="memory_usage",
            comparison=Comparison.ABOVE,
            threshold=config.memory_usage,
        ),
    )


def _metric(rule: AlertRule, summary: RecoverySummary) -> tuple[float | None, float]:
    """The value a rule reads from a service's summary, and the volume behind it."""
    if rule.metric == "recovery_time_p95":
        return summary.recovery_time_p95_s, float(summary.timed)
    if rule.metric == "success_rate":
        rate = summary.success_rate
        return (None if rate is None else 100.0 * rate), float(summary.judged)
    return summary.error_frequency_per_min, float(summary.errors)


def _alert_message(
    rule: AlertRule, service: str, value: float | None, volume: float, window: float
) -> str:
    minutes = f"{window / 60:g} min"
    if value is None:  # nothing to measure: say so rather than print a made-up 0
        if rule.metric == "memory_usage":
            return f"memory use is unknown (threshold {rule.threshold:g} %)"
        unit = "s" if rule.metric == "recovery_time_p95" else "%"
        return (
            f"no recoveries at {service} to measure over the last {minutes}"
            f" (threshold {rule.threshold:g} {unit})"
        )
    if rule.metric == "recovery_time_p95":
        return (
            f"p95 recovery time of {service} is {value:.1f} s (threshold {rule.threshold:g} s)"
            f" over the last {minutes}, {volume:.0f} recoveries"
        )
    if rule.metric == "success_rate":
        return (
            f"{value:.0f} % of the recoveries at {service} succeed (threshold"
            f" {rule.threshold:g} %) over the last {minutes}, {volume:.0f} recoveries"
        )
    if rule.metric == "breaker_open":
        if value:
            return f"the circuit breaker {service} is open: calls to it are refused at once"
        return f"the circuit breaker {service} is closed"
    if rule.metric == "error_frequency":
        return (
            f"{service} fails {value:.1f} times a minute (threshold {rule.threshold:g})"
            f" over the last {minutes}"
        )
    return f"memory use is {value:.0f} % of the effective limit (threshold {rule.threshold:g} %)"


class ErrorRecoveryMonitor:
    """Recovery metrics, threshold alerts, reports and error analytics (see the module doc).

    ``config``: a :class:`~otel_raptor.config.monitor.MonitorConfig`, the seed's mapping
    (``MonitorConfig.from_mapping``) or ``None`` for the defaults; a bad value raises
    ``ConfigError``. ``runtime``: whose bus feeds the monitor and whose clock it reads
    (default: the process-wide runtime). ``memory_reader``: returns memory use over the
    effective limit (0 to 1) or ``None`` when unknown, read at each evaluation (default: the
    predictor's snapshot while it monitors, else the process-wide memory controller).

    The monitor subscribes to the bus at once; :meth:`start` adds the background thread that
    processes events, evaluates the alerts every ``evaluation_interval`` and emits a report
    every ``report_interval``. :meth:`close` unsubscribes and stops it.
    """

    def __init__(
        self,
        config: MonitorConfig | Mapping[str, object] | None = None,
        *,
        runtime: Runtime | None = None,
        memory_reader: Callable[[], float | None] | None = None,
    ) -> None:
        if config is None:
            config = MonitorConfig()
        elif not isinstance(config, MonitorConfig):
            config = MonitorConfig.from_mapping(config)
        if memory_reader is not None and not callable(memory_reader):
            # It would fail at every evaluation instead, and the memory alert never fire.
            raise ConfigError(
                "monitor.memory_reader", memory_reader, "a callable returning a ratio, or None"
            )
        self._config = config
        self._runtime = runtime if runtime is not None else get_runtime()
        self._clock = self._runtime.clock
        self._monotonic = self._clock.monotonic
        self._memory_reader = memory_reader
        self._queue: collections.deque[tuple[float, Event]] = collections.deque(maxlen=QUEUE_LIMIT)
        self.dropped = 0
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        after_fork_in_child(self, ErrorRecoveryMonitor._after_fork_in_child)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wanted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop thread for async callbacks when the application runs no loop: started on
        # first use (never once closed), guarded by its own lock (never held while calling
        # out), stopped by close() or when the monitor is garbage-collected.
        self._callback_lock = threading.Lock()
        register_lock(self, "_callback_lock")
        self._callback_loop: _CallbackLoop | None = None
        self._callbacks_closed = False
        self._callbacks: tuple[AlertCallback, ...] = ()
        self._listeners: tuple[MonitorListener, ...] = ()
        self._rules = _rules(config)
        self._handlers: dict[type, Callable[[float, Any, list[RecoveryFinished]], None]] = {
            ErrorClassified: self._on_error,
            RetryScheduled: self._on_retry,
            RetryBudgetExhausted: self._on_budget,
            BreakerTransitioned: self._on_transition,
            CallRejected: self._on_rejection,
            RecoveryFinished: self._on_recovery,
            MemoryPressureChanged: self._on_memory,
        }
        self._reset_state()
        self._unsubscribe: Callable[[], None] | None = self._runtime.bus.subscribe(self._on_event)
        self.analytics = ErrorAnalytics(self)
        _live.add(self)

    def _reset_state(self) -> None:
        config = self._config
        now = self._monotonic()
        width = config.evaluation_window / _SLICES_PER_WINDOW
        self._window: SlicedCounters[_Key] = SlicedCounters(
            width_s=width,
            slices=_SLICES_PER_WINDOW + _SLICES_PER_WINDOW // 5,
            fields=ROW_FIELDS,
            max_keys=_MAX_KEYS_PER_SLICE,
            overflow=_OVERFLOW,
        )
        self._period: dict[_Key, array[float]] = {}
        self._period_started = now
        self._period_started_wall = self._clock.wall()
        self._patterns: dict[str, SpaceSaving[str, _Pattern]] = {}
        self._fingerprints: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._alerts = AlertTracker(
            AlertOptions(
                for_s=config.alert_for,
                resolve_after_s=config.alert_resolve_after,
                cooldown_s=config.alert_cooldown,
                auto_resolve=config.auto_resolve_alerts,
            )
        )
        self._alerts_fired: collections.Counter[str] = collections.Counter()
        self._insights = InsightBook(
            ttl_s=max(config.report_interval, 600.0),
            repeat_after_s=config.report_interval,
            max_per_minute=config.insights_per_minute,
        )
        self._trend_options = TrendOptions(min_volume=float(config.min_errors))
        self._trends: dict[tuple[str, str, str], TrendSeries] = {}
        step = config.trend_interval
        self._trend_next = (math.floor(now / step) + 1) * step
        self._intervals = 0
        self._last_evaluation = -math.inf
        self._memory_ratio: float | None = None
        keep = max(1, min(_MAX_REPORTS, int(config.metrics_retention // config.report_interval)))
        self._reports: collections.deque[MonitorReport] = collections.deque(maxlen=keep)

    # --- configuration ----------------------------------------------------------------------

    def _reconfigure(self, config: MonitorConfig) -> None:
        """Apply ``config``: its rules and windows, with what was recorded so far dropped
        (it was counted against the old windows). Callbacks, listeners, the thread and the
        subscription stay."""
        with self._lock:
            self._config = config
            self._rules = _rules(config)
            self._reset_state()

    @property
    def config(self) -> MonitorConfig:
        return self._config

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def rules(self) -> tuple[AlertRule, ...]:
        """The alert rules, built from the config's thresholds."""
        return self._rules

    def add_alert_callback(self, fn: AlertCallback) -> None:
        """Call ``fn(alert)`` when an alert fires (and its notification is sent) and when it
        resolves (``alert.state``). Sync or async; one that raises is reported once and
        skipped. A sync callback runs in the thread that delivers the alert (the monitor's,
        or one reading alerts). An async one is handed over and not waited for: it runs on
        the loop of the delivering thread, else on the loop that called
        :meth:`start_monitoring` or :meth:`record_recovery_attempt`, else on the monitor's
        own loop thread (``otel-raptor-monitor-callbacks``, started on first use); after 10 s
        it is cancelled and reported."""
        if not callable(fn):
            raise ConfigError("monitor.alert_callback", fn, "a callable taking an Alert")
        with self._lock:
            self._callbacks = (*self._callbacks, fn)

    def add_listener(self, listener: MonitorListener) -> Callable[[], None]:
        """Add ``listener`` (see :class:`MonitorListener`); returns a function removing it."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._lock:
                self._listeners = tuple(item for item in self._listeners if item is not listener)

        return remove

    # --- the call path ---------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """The bus subscriber: queue the event with its time, nothing else (the call path)."""
        if type(event) not in _WATCHED:
            return
        queue = self._queue
        if len(queue) >= QUEUE_LIMIT:
            self.dropped += 1  # approximate under races; it only says "it overflowed"
        queue.append((self._monotonic(), event))
        if len(queue) >= _HIGH_WATER:
            if self._thread is not None:
                self._wake.set()
            else:  # not started: nobody else drains, and queued exceptions must not pile up
                self.tick()

    # --- the seed's recording API --------------------------------------------------------------

    async def record_recovery_attempt(
        self,
        error_type: str,
        recovery_time: float,
        success: bool,
        strategy: str | Strategy,
        context: Mapping[str, object] | None = None,
        *,
        attempts: int | None = None,
        category: str | ErrorCategory | None = None,
    ) -> None:
        """Record a recovery made outside the guard (the seed's API).

        ``error_type``: the error's name, an exception class (``TimeoutError``,
        ``httpx.ConnectTimeout``) or an HTTP status code (``503``), at most 128 characters
        (it becomes the ``error.type`` attribute of metrics and spans, so a message such as
        ``str(error)`` raises ``ConfigError``); ``recovery_time``: how long the recovery
        took, in **milliseconds**; ``success``: whether it recovered; ``strategy``: a
        ``Strategy`` value; ``context``: ``{"service": ...}`` (or ``service_name``; default
        ``default``). ``attempts`` defaults to 2 (one failure, one successful or failed
        retry), 1 for ``fail_fast`` and ``failover``; ``category`` (an ``ErrorCategory``
        value) defaults to what the error's name says (``classify`` of the built-in
        exception of that name, else ``unknown``). A bad argument raises ``ConfigError``
        naming it. It is published on the runtime's bus as the guard would publish it (an
        ``ErrorClassified`` per failed attempt, then a ``RecoveryFinished``), so telemetry
        counts it too.
        """
        self._remember_loop()
        self.record_recovery_attempt_sync(
            error_type,
            recovery_time,
            success,
            strategy,
            context,
            attempts=attempts,
            category=category,
        )

    def record_recovery_attempt_sync(
        self,
        error_type: str,
        recovery_time: float,
        success: bool,
        strategy: str | Strategy,
        context: Mapping[str, object] | None = None,
        *,
        attempts: int | None = None,
        category: str | ErrorCategory | None = None,
    ) -> None:
        """The synchronous twin of :meth:`record_recovery_attempt`."""
        name_given: object = error_type  # typed str, but callers pass anything
        if (
            not isinstance(name_given, str)
            or len(name_given) > _MAX_ERROR_TYPE
            or _ERROR_TYPE.fullmatch(name_given) is None
        ):
            # Shown as a template: a message given here by mistake (``str(error)``) may carry a
            # password, and the error would carry it on into the caller's logs.
            shown = normalize_message(name_given) if isinstance(name_given, str) else name_given
            raise ConfigError("error_type", shown, _ERROR_TYPE_ALLOWED)
        duration: object = recovery_time
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not 0 <= duration < math.inf
        ):
            raise ConfigError("recovery_time", recovery_time, "milliseconds >= 0")
        try:
            chosen = Strategy(strategy)
        except ValueError:
            allowed = ", ".join(s.value for s in Strategy)
            raise ConfigError("strategy", strategy, f"one of {allowed}") from None
        count: object = attempts  # typed, but callers pass anything
        if count is None:
            attempts = 1 if chosen in (Strategy.FAIL_FAST, Strategy.FAILOVER) else 2
        elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError("attempts", attempts, "an integer >= 0")
        else:
            attempts = count
        if category is None:
            found = _category(error_type)
        else:
            try:
                found = ErrorCategory(category)
            except (ValueError, TypeError):
                allowed = ", ".join(c.value for c in ErrorCategory)
                raise ConfigError("category", category, f"one of {allowed}") from None
        name = (context or {}).get("service") or (context or {}).get("service_name")
        service = self._runtime.service(str(name) if name else "default")
        classification = Classification(
            category=found,
            severity=Severity.MEDIUM,
            retryable=chosen is not Strategy.FAIL_FAST,
            error_type=error_type,
        )
        outcome = Outcome.RECOVERED if success else Outcome.FAILED
        # One ErrorClassified per failed attempt, as the guard publishes them: all of them
        # failed, or all but the last; at least the one that made recovery necessary.
        failed = max(1, attempts - 1 if success else attempts)
        events: tuple[Event, ...] = (
            *(ErrorClassified(service, classification, n) for n in range(1, failed + 1)),
            RecoveryFinished(
                service=service,
                strategy=chosen,
                outcome=outcome,
                attempts=attempts,
                duration_s=float(recovery_time) / 1000.0,
                category=found.value,
                give_up_reason="" if success else "attempts_exhausted",
            ),
        )
        subscribed = self._unsubscribe is not None
        for event in events:
            if not subscribed:  # closed: still count it here
                self._on_event(event)
            self._runtime.bus.publish(event)

    # --- reading -------------------------------------------------------------------------------

    def get_current_metrics(self) -> dict[str, Any]:
        """The last ``evaluation_window`` seconds: ``{"window_s", "overall": {...},
        "services": {name: {..., "by_strategy": {strategy: {...}}}}, "active_alerts",
        "dropped_events"}``, each summary with ``success_rate`` (0-1), ``recovery_time_p50_s``
        / ``_p95_s`` / ``_mean_s``, ``error_frequency_per_min``, ``attempts``,
        ``attempts_mean``, the outcome counts and the four kinds (see
        ``core.recovery_stats``)."""
        now = self._sync(evaluate=True)
        window = self._config.evaluation_window
        with self._lock:
            rows = self._window.window(now, window)
            active = len(self._alerts.firing())
        services: dict[str, array[float]] = {}
        strategies: dict[tuple[str, str], array[float]] = {}
        overall = array("d", _ZERO_ROW)
        for (service, strategy, _), row in rows.items():
            _add_row(services.setdefault(service, array("d", _ZERO_ROW)), row)
            _add_row(overall, row)
            if strategy:
                _add_row(strategies.setdefault((service, strategy), array("d", _ZERO_ROW)), row)
        by_service: dict[str, Any] = {}
        for service, row in sorted(services.items()):
            entry: dict[str, Any] = summarize(row, window).as_dict()
            entry["by_strategy"] = {
                strategy: summarize(srow, window).as_dict()
                for (name, strategy), srow in sorted(strategies.items())
                if name == service
            }
            by_service[service] = entry
        return {
            "window_s": window,
            "overall": summarize(overall, window).as_dict(),
            "services": by_service,
            "active_alerts": active,
            "dropped_events": self.dropped,
        }

    def get_active_alerts(self, *, include_pending: bool = False) -> list[Alert]:
        """The firing alerts (and the pending ones with ``include_pending``), evaluated now.
        ``since`` and ``active_since`` are wall-clock seconds (Unix epoch)."""
        self._sync(evaluate=True)
        with self._lock:
            alerts = self._alerts.active() if include_pending else self._alerts.firing()
        return [self._public(alert) for alert in alerts]

    def resolve_alert(self, name: str, severity: str, service: str = "") -> bool:
        """Resolve a firing alert by hand (with ``auto_resolve_alerts`` off, the only way);
        ``True`` when there was one."""
        now = self._sync(evaluate=False)
        with self._lock:
            notification = self._alerts.resolve(AlertKey(name, severity, service), now)
        if notification is None:
            return False
        self._deliver([], [notification])
        return True

    def report(self) -> MonitorReport:
        """The report of the current period (since the last ``raptor.report``, or since the
        monitor started) up to now."""
        now = self._sync(evaluate=True)
        with self._lock:
            return self._build_report(now, self._clock.wall())

    def reports(self) -> list[MonitorReport]:
        """The finished periodic reports still kept (oldest first; see ``metrics_retention``)."""
        with self._lock:
            return list(self._reports)

    def alert_counts(self) -> dict[tuple[str, str], int]:
        """Firing alerts by (name, severity), with 0 for every rule not firing: what the
        ``raptor.alerts.active`` gauge reports. Cheap: no processing, one lock, never waited
        for: empty when the lock is busy (the gauge skips one reading), since a gauge that
        waits on our lock inside the metrics SDK's collection can fork a child with the
        SDK's lock held (see ``CircuitBreaker.try_snapshot``)."""
        counts = {(rule.name, rule.severity.value): 0 for rule in self._rules}
        lock = self._lock
        if not lock.acquire(blocking=False):
            return {}
        try:
            for alert in self._alerts.firing():
                key = (alert.name, alert.severity)
                counts[key] = counts.get(key, 0) + 1
        finally:
            lock.release()
        return counts

    # --- processing ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Process the queued events, then advance the trends, insights and report period and
        evaluate the alerts when due, and deliver what came of it. The monitor thread calls
        this every second; tests call it after moving their clock. Never raises."""
        try:
            self._sync(evaluate=False)
        except Exception as error:  # noqa: BLE001 - the monitor must outlive our own bugs
            report_internal_error("monitor.tick", error)

    flush = tick

    def _sync(self, *, evaluate: bool) -> float:
        now = self._monotonic()
        notices: list[object] = []
        with self._lock:
            finished = self._drain(notices)
            self._advance(now, notices)
            if evaluate or now - self._last_evaluation >= self._config.evaluation_interval:
                self._evaluate(now, notices)
        self._deliver(finished, notices)
        return now

    def _drain(self, notices: list[object]) -> list[RecoveryFinished]:
        finished: list[RecoveryFinished] = []
        queue = self._queue
        handlers = self._handlers
        interval = self._config.report_interval
        for _ in range(len(queue)):
            try:
                now, event = queue.popleft()
            except IndexError:
                break
            if now - self._period_started >= interval:
                self._roll_period(now, notices)  # the event belongs to the next period
            try:
                handlers[type(event)](now, event, finished)
            except Exception as error:  # noqa: BLE001 - one bad event must not stop the rest
                report_internal_error("monitor.event", error)
        return finished

    def _rows(self, key: _Key, now: float) -> tuple[array[float] | None, array[float]]:
        period = self._period.get(key)
        if period is None:
            if len(self._period) >= _MAX_PERIOD_KEYS:
                key = _OVERFLOW
                period = self._period.get(key)
            if period is None:
                period = self._period[key] = array("d", _ZERO_ROW)
        return self._window.row(key, now), period

    def _count(self, key: _Key, now: float, field: int) -> None:
        recent, period = self._rows(key, now)
        if recent is not None:
            recent[field] += 1
        period[field] += 1

    def _on_error(self, now: float, event: ErrorClassified, out: list[RecoveryFinished]) -> None:
        classification = event.classification
        category = classification.category.value
        service = event.service
        self._count((service, "", category), now, F_ERRORS)
        error = event.error
        error_type = classification.error_type or (_type_name(error) if error else "unknown")
        message = _message(error) if error is not None else ""
        cache_key = (error_type, category, message)
        found = self._fingerprints.get(cache_key)
        if found is None:
            template = normalize_message(message)
            found = (fingerprint(error_type, category, template), template)
            if len(self._fingerprints) >= _FINGERPRINT_CACHE:
                self._fingerprints.clear()  # crude, but bounded and rare
            self._fingerprints[cache_key] = found
        sketch = self._patterns.get(service)
        if sketch is None:
            if len(self._patterns) >= _MAX_SKETCHES:
                service = _OVERFLOW[0]
                sketch = self._patterns.get(service)
            if sketch is None:
                capacity = max(_MIN_SKETCH, 4 * self._config.top_patterns)
                sketch = self._patterns[service] = SpaceSaving(capacity)
        sketch.offer(found[0], _Pattern(error_type, category, found[1]))

    def _on_retry(self, now: float, event: RetryScheduled, out: list[RecoveryFinished]) -> None:
        key = (event.service, event.strategy.value, event.classification.category.value)
        self._count(key, now, F_RETRIES)

    def _on_budget(
        self, now: float, event: RetryBudgetExhausted, out: list[RecoveryFinished]
    ) -> None:
        key = (event.service, "", event.classification.category.value)
        self._count(key, now, F_BUDGET_REFUSALS)

    def _on_transition(
        self, now: float, event: BreakerTransitioned, out: list[RecoveryFinished]
    ) -> None:
        if event.to_state is CircuitState.OPEN:
            self._count((event.breaker, "", ""), now, F_BREAKER_OPENS)

    def _on_rejection(self, now: float, event: CallRejected, out: list[RecoveryFinished]) -> None:
        self._count((event.breaker, "", ""), now, F_REJECTIONS)

    def _on_recovery(
        self, now: float, event: RecoveryFinished, out: list[RecoveryFinished]
    ) -> None:
        key = (event.service, event.strategy.value, event.category)
        recent, period = self._rows(key, now)
        # Only a call given up at its first attempt was refused a retry: a probe the learner
        # let through retried (attempts >= 2) before it gave up.
        futile = event.give_up_reason == "learned_futile" and event.attempts == 1
        outcome = event.outcome.value
        for row in (recent, period):
            if row is not None:
                add_recovery(
                    row,
                    outcome,
                    event.attempts,
                    event.duration_s,
                    learned_futile=futile,
                    give_up_reason=event.give_up_reason,
                )
        out.append(event)

    def _on_memory(
        self, now: float, event: MemoryPressureChanged, out: list[RecoveryFinished]
    ) -> None:
        self._memory_ratio = event.usage_ratio

    # --- trends, insights and the report period (under the lock) --------------------------

    def _advance(self, now: float, notices: list[object]) -> None:
        config = self._config
        step = config.trend_interval
        if now >= self._trend_next:
            behind = math.floor((now - self._trend_next) / step) + 1
            if behind > _MAX_CATCH_UP:  # a long pause: what it missed is gone from the ring
                self._trend_next += (behind - _MAX_CATCH_UP) * step
                self._intervals += behind - _MAX_CATCH_UP
            while now >= self._trend_next:
                end = self._trend_next
                self._trend_interval(end - step, end, notices)
                self._trend_next = end + step
                self._intervals += 1
        if now - self._period_started >= config.report_interval:
            self._roll_period(now, notices)

    def _roll_period(self, now: float, notices: list[object]) -> None:
        """Close the report period that ended before ``now``: report it, start the next."""
        interval = self._config.report_interval
        end = self._period_started + interval
        wall = self._clock.wall() - (self._monotonic() - end)
        report = self._build_report(end, wall)
        self._reports.append(report)
        notices.append(report)
        self._period = {}
        self._patterns = {}
        self._alerts_fired = collections.Counter()
        periods = math.floor((now - self._period_started) / interval)
        self._period_started += periods * interval
        self._period_started_wall = wall + (periods - 1) * interval

    def _trend_interval(self, start: float, end: float, notices: list[object]) -> None:
        rows = self._window.between(start, end)
        services: dict[str, array[float]] = {}
        errors: dict[tuple[str, str], float] = {}
        for (service, strategy, category), row in rows.items():
            _add_row(services.setdefault(service, array("d", _ZERO_ROW)), row)
            if not strategy and category:
                errors[(service, category)] = errors.get((service, category), 0.0) + row[F_ERRORS]
        found: list[Insight] = []
        options = self._trend_options
        # Errors per (service, category): counts, zeros included.
        for key, series in list(self._trends.items()):
            metric, service, category = key
            if metric != "errors":
                continue
            value = errors.pop((service, category), 0.0)
            anomalies = series.observe(value, value)
            if value == 0:
                series.idle += 1
                if series.idle > 2 * options.baseline_intervals and series.baseline < 0.05:
                    del self._trends[key]
            for anomaly in anomalies:
                found.append(self._error_insight(service, category, anomaly, end))
        for (service, category), value in errors.items():
            if len(self._trends) >= _MAX_SERIES:
                break
            series = TrendSeries(SeriesKind.COUNT, options, history=self._intervals)
            self._trends[("errors", service, category)] = series
            for anomaly in series.observe(value, value):
                found.append(self._error_insight(service, category, anomaly, end))
        # Recovery time and failure ratio per service: levels, only with enough volume.
        minimum = options.min_volume
        for service, row in services.items():
            timed = row[F_TIMED]
            judged = judged_recoveries(row)
            levels = (
                ("recovery_time", row[F_DURATION_SUM] / timed if timed else 0.0, timed),
                ("failure_ratio", 1.0 - _successes(row) / judged if judged else 0.0, judged),
            )
            for metric, value, volume in levels:
                key = (metric, service, "")
                level = self._trends.get(key)
                if volume < minimum:
                    if level is not None:
                        level.skip()
                    continue
                if level is None:
                    if len(self._trends) >= _MAX_SERIES:
                        continue
                    level = self._trends[key] = TrendSeries(SeriesKind.LEVEL, options)
                for anomaly in level.observe(value, volume):
                    found.append(self._level_insight(metric, service, anomaly, end))
        found.extend(self._effectiveness_insights(end))
        for insight in found:
            announced = self._insights.add(insight, end)
            if announced is not None:
                notices.append(announced)

    def _recent_service(self, service: str, now: float) -> RecoverySummary:
        row = array("d", _ZERO_ROW)
        for key, part in self._window.window(now, self._config.evaluation_window).items():
            if key[0] == service:
                _add_row(row, part)
        return summarize(row, self._config.evaluation_window)

    def _error_insight(self, service: str, category: str, anomaly: Any, now: float) -> Insight:
        step = self._config.trend_interval
        per_minute = 60.0 / step
        if anomaly.kind is AnomalyKind.SPIKE:
            return error_spike(
                service=service,
                category=category,
                per_minute=anomaly.value * per_minute,
                baseline_per_minute=anomaly.baseline * per_minute,
                ratio=anomaly.ratio,
                score=anomaly.score,
                window_s=step,
                recovery_p95_s=self._recent_service(service, now).recovery_time_p95_s,
                now=now,
            )
        return error_rise(
            service=service,
            category=category,
            per_minute=anomaly.value * per_minute,
            baseline_per_minute=anomaly.baseline * per_minute,
            ratio=anomaly.ratio,
            minutes=anomaly.intervals * step / 60.0,
            now=now,
        )

    def _level_insight(self, metric: str, service: str, anomaly: Any, now: float) -> Insight:
        recent = self._recent_service(service, now)
        categories = self._recent_categories(service, now)
        total = sum(categories.values())
        if metric == "recovery_time":
            timeouts = categories.get(ErrorCategory.TIMEOUT.value, 0.0)
            return recovery_slowing(
                service=service,
                mean_s=anomaly.value,
                reference_s=anomaly.baseline,
                ratio=anomaly.ratio,
                p95_s=recent.recovery_time_p95_s,
                timeout_share=timeouts / total if total else 0.0,
                now=now,
            )
        top = max(categories, key=lambda c: categories[c]) if categories else ""
        return success_declining(
            service=service,
            failure_ratio=anomaly.value,
            reference_ratio=anomaly.baseline,
            top_category=top,
            now=now,
        )

    def _recent_categories(self, service: str, now: float) -> dict[str, float]:
        counts: dict[str, float] = {}
        for (name, strategy, category), row in self._window.window(
            now, self._config.evaluation_window
        ).items():
            if name == service and not strategy and category:
                counts[category] = counts.get(category, 0.0) + row[F_ERRORS]
        return counts

    def _effectiveness_insights(self, now: float) -> list[Insight]:
        window = self._config.evaluation_window
        minimum = self._config.min_errors
        found: list[Insight] = []
        services: dict[str, array[float]] = {}
        for (service, strategy, category), row in self._window.window(now, window).items():
            _add_row(services.setdefault(service, array("d", _ZERO_ROW)), row)
            if not strategy:
                continue
            ok = row[F_RESULTS[ResultKind.SUCCEEDED_WITH_RETRY]]
            retried = ok + row[F_RESULTS[ResultKind.FAILED_WITH_RETRY]]
            if retried >= minimum and ok <= _FUTILE_RATE * retried:
                found.append(
                    futile_retries(
                        service=service,
                        category=category,
                        strategy=strategy,
                        error_type=self._top_error_type(service, category),
                        retried=round(retried),
                        succeeded=round(ok),
                        window_s=window,
                        now=now,
                    )
                )
            refused = row[F_LEARNED_FUTILE]
            if refused >= 1:
                period = self._period.get((service, strategy, category), _ZERO_ROW)
                period_ok = period[F_RESULTS[ResultKind.SUCCEEDED_WITH_RETRY]]
                period_retried = period_ok + period[F_RESULTS[ResultKind.FAILED_WITH_RETRY]]
                found.append(
                    strategy_abandoned(
                        service=service,
                        category=category,
                        strategy=strategy,
                        refused=round(refused),
                        succeeded=round(period_ok),
                        retried=round(period_retried),
                        now=now,
                    )
                )
        for service, row in services.items():
            if row[F_BUDGET_REFUSALS] >= minimum:
                found.append(
                    budget_exhausted(
                        service=service,
                        refused=round(row[F_BUDGET_REFUSALS]),
                        retries=round(row[F_RETRIES]),
                        window_s=window,
                        now=now,
                    )
                )
            if row[F_BREAKER_OPENS] >= _FLAPPING_TRIPS:
                found.append(
                    breaker_flapping(
                        service=service,
                        trips=round(row[F_BREAKER_OPENS]),
                        window_s=window,
                        now=now,
                    )
                )
        return found

    def _top_error_type(self, service: str, category: str) -> str:
        sketch = self._patterns.get(service)
        if sketch is None:
            return ""
        for hitter in sketch.top():
            if hitter.payload.category == category:
                return hitter.payload.error_type
        return ""

    # --- alerts (under the lock) -------------------------------------------------------------

    def _evaluate(self, now: float, notices: list[object]) -> None:
        self._last_evaluation = now
        window = self._config.evaluation_window
        services: dict[str, array[float]] = {}
        for (service, _, _), row in self._window.window(now, window).items():
            _add_row(services.setdefault(service, array("d", _ZERO_ROW)), row)
        tracked = {key.service for key in self._alerts.keys() if key.service}  # noqa: SIM118 - a method, not a dict
        for service in sorted(set(services) | tracked):
            summary = summarize(services.get(service, _ZERO_ROW), window)
            for rule in self._rules:
                if rule.metric in _NOT_PER_SERVICE:
                    continue
                value, volume = _metric(rule, summary)
                self._judge(rule, service, value, volume, window, now, notices)
        memory = self._read_memory()
        percent = None if memory is None else 100.0 * memory
        open_breakers = self._open_breakers()
        for rule in self._rules:
            if rule.metric == "memory_usage":
                self._judge(rule, "", percent, 1.0, window, now, notices)
            elif rule.metric == "breaker_open":
                watched = {
                    key.service
                    for key in self._alerts.keys()  # noqa: SIM118 - a method, not a dict
                    if key.name == rule.name
                }
                for name in sorted(open_breakers | watched):
                    is_open = 1.0 if name in open_breakers else 0.0
                    self._judge(rule, name, is_open, 1.0, window, now, notices)

    def _open_breakers(self) -> set[str]:
        """The breakers of the runtime that are not closed now (held open by hand too),
        read from the registry rather than from transitions, so that a breaker that opened
        before the monitor started is seen as well."""
        return {
            name
            for name, breaker in self._runtime.breakers.items()
            if breaker.state is not CircuitState.CLOSED
        }

    def _judge(
        self,
        rule: AlertRule,
        service: str,
        value: float | None,
        volume: float,
        window: float,
        now: float,
        notices: list[object],
    ) -> None:
        breached = rule.breached(value, volume)
        shown = 0.0 if value is None else value
        notification = self._alerts.evaluate(
            AlertKey(rule.name, rule.severity.value, service),
            breached=breached,
            value=shown,
            threshold=rule.threshold,
            message=_alert_message(rule, service or "the process", value, volume, window),
            now=now,
        )
        if notification is not None:
            if notification.state is AlertState.FIRING:
                self._alerts_fired[rule.name] += 1
            notices.append(notification)

    def _read_memory(self) -> float | None:
        try:
            if self._memory_reader is not None:
                return self._memory_reader()
            snapshot = self._runtime.resource_snapshot()
            if snapshot.memory_pressure is not None:
                return snapshot.memory_pressure
            from otel_raptor.runtime.memory import get_memory_controller  # noqa: PLC0415

            ratio, _ = get_memory_controller().usage_ratio()
            return ratio
        except Exception as error:  # noqa: BLE001 - an unreadable gauge is not an alert
            report_internal_error("monitor.memory", error)
            return self._memory_ratio

    # --- reports (under the lock) -------------------------------------------------------------

    def _build_report(self, now: float, wall: float) -> MonitorReport:
        duration = max(now - self._period_started, 1e-9)
        services: dict[str, array[float]] = {}
        categories: dict[str, dict[str, int]] = {}
        overall = array("d", _ZERO_ROW)
        effectiveness: list[StrategyEffectiveness] = []
        abandoned: list[AbandonedStrategy] = []
        for (service, strategy, category), row in sorted(self._period.items()):
            _add_row(services.setdefault(service, array("d", _ZERO_ROW)), row)
            _add_row(overall, row)
            if not strategy and category and row[F_ERRORS]:
                by_category = categories.setdefault(service, {})
                by_category[category] = by_category.get(category, 0) + round(row[F_ERRORS])
            if strategy and row[F_RECOVERIES]:
                summary = summarize(row, duration)
                effectiveness.append(
                    StrategyEffectiveness(
                        service=service,
                        strategy=strategy,
                        category=category,
                        recoveries=summary.recoveries,
                        succeeded_without_retry=summary.succeeded_without_retry,
                        succeeded_with_retry=summary.succeeded_with_retry,
                        failed_with_retry=summary.failed_with_retry,
                        failed_without_retry=summary.failed_without_retry,
                        attempts_mean=summary.attempts_mean,
                        recovery_time_mean_s=summary.recovery_time_mean_s,
                    )
                )
            if strategy and row[F_LEARNED_FUTILE]:
                ok = row[F_RESULTS[ResultKind.SUCCEEDED_WITH_RETRY]]
                abandoned.append(
                    AbandonedStrategy(
                        service=service,
                        category=category,
                        strategy=strategy,
                        refused=round(row[F_LEARNED_FUTILE]),
                        retried=round(ok + row[F_RESULTS[ResultKind.FAILED_WITH_RETRY]]),
                        succeeded=round(ok),
                    )
                )
        reports = {
            service: ServiceReport(
                service=service,
                summary=summarize(row, duration),
                top_patterns=self._top_patterns(service, row[F_ERRORS]),
                errors_by_category=categories.get(service, {}),
            )
            for service, row in services.items()
        }
        return MonitorReport(
            started_at=self._period_started_wall,
            ended_at=wall,
            overall=summarize(overall, duration),
            services=reports,
            effectiveness=tuple(effectiveness),
            abandoned=tuple(abandoned),
            alerts_fired=dict(self._alerts_fired),
            active_alerts=tuple(self._public(a) for a in self._alerts.firing()),
            insights=tuple(self._insights.current(now)),
        )

    def _top_patterns(self, service: str, errors: float) -> tuple[ErrorPattern, ...]:
        sketch = self._patterns.get(service)
        if sketch is None:
            return ()
        return tuple(
            ErrorPattern(
                fingerprint=hitter.key,
                error_type=hitter.payload.error_type,
                category=hitter.payload.category,
                template=hitter.payload.template,
                count=hitter.count,
                error=hitter.error,
                share=hitter.count / errors if errors else 0.0,
            )
            for hitter in sketch.top(self._config.top_patterns)
        )

    def _public(self, alert: Alert) -> Alert:
        """``alert`` with wall-clock times (the tracker keeps monotonic ones)."""
        offset = self._clock.wall() - self._monotonic()
        return replace(alert, since=alert.since + offset, active_since=alert.active_since + offset)

    # --- delivery (never under the lock) ----------------------------------------------------

    def _deliver(self, finished: list[RecoveryFinished], notices: list[object]) -> None:
        if not finished and not notices:
            return
        listeners = self._listeners
        if finished:
            for listener in listeners:
                _safely("monitor.listener", listener.on_recoveries, finished)
        for notice in notices:
            if isinstance(notice, AlertNotification):
                public = AlertNotification(notice.state, self._public(notice.alert))
                for listener in listeners:
                    _safely("monitor.listener", listener.on_alert, public)
                for callback in self._callbacks:
                    self._call(callback, public.alert)
            elif isinstance(notice, Insight):
                for listener in listeners:
                    _safely("monitor.listener", listener.on_insight, notice)
            elif isinstance(notice, MonitorReport):
                for listener in listeners:
                    _safely("monitor.listener", listener.on_report, notice)

    def _call(self, fn: AlertCallback, alert: Alert) -> None:
        try:
            result = fn(alert)
        except Exception as error:  # noqa: BLE001 - user code must not stop the monitor
            report_internal_error("monitor.alert_callback", error)
            return
        if inspect.iscoroutine(result):
            self._run_coroutine(result)

    def _run_coroutine(self, coro: Coroutine[Any, Any, object]) -> None:
        """Hand an async callback's coroutine over to a loop and return at once: the loop
        running in this thread, else the application's (``start_monitoring``), else the
        monitor's own callback loop. Whichever runs it cancels it after ``_ASYNC_TIMEOUT_S``
        and reports what went wrong, so no delivering thread (the monitor's, or the
        application's reading alerts) ever waits for it, and concurrent deliveries each
        get their turn."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:  # on a loop's thread: never block it
            running.create_task(_bounded(coro))
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            bounded = _bounded(coro)
            try:
                asyncio.run_coroutine_threadsafe(bounded, loop)
                return
            except RuntimeError:  # closed since we looked: our own loop runs it
                bounded.close()
        with self._callback_lock:
            own = self._callback_loop
            if self._callbacks_closed:
                own = None
            elif own is None or not own.alive:
                own = self._callback_loop = _CallbackLoop(self)
        if own is None:  # closed: a thread started now would outlive the monitor
            coro.close()  # never started: no "never awaited" warning
            report_internal_error("monitor.alert_callback.closed")
            return
        if not own.submit(coro):
            coro.close()  # never started: no "never awaited" warning
            report_internal_error("monitor.alert_callback.backlog")

    def _remember_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # not on a loop: keep the one we had
            self._loop = asyncio.get_running_loop()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start_monitoring(self) -> None:
        """:meth:`start`, remembering the running loop for async callbacks."""
        self._remember_loop()
        self.start()

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        self._wanted = True
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="otel-raptor-monitor", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread (waiting ``timeout`` seconds); still subscribed."""
        self._wanted = False
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the monitor no longer listens to the bus)."""
        return self._unsubscribe is None

    def close(self) -> None:
        """Stop the thread and unsubscribe from the bus; what was recorded stays readable."""
        self.stop(timeout=1.0)
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        with self._callback_lock:
            self._callbacks_closed = True
            own, self._callback_loop = self._callback_loop, None
        if own is not None:
            own.close(3 * _CALLBACK_CLOSE_S)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self, stop: threading.Event) -> None:
        wake = self._wake
        while not stop.is_set():
            wake.wait(_FLUSH_S)
            wake.clear()
            if stop.is_set():
                break
            self.tick()

    def _after_fork_in_child(self) -> None:
        # The locks are fresh already (forksafe); the threads and the loops are the parent's.
        # So are the events queued, the counts and the alerts: kept, the child reported the
        # parent's numbers again and resolved the parent's incidents a second time.
        self._queue.clear()
        self.dropped = 0
        self._reset_state()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None  # the parent's thread does not exist here
        self._loop = None  # nor does the parent's event loop
        own, self._callback_loop = self._callback_loop, None
        if own is not None:  # nor its callback thread (a new one starts on first use)
            own.forget()
        if self._wanted:
            self.start()


class ErrorAnalytics:
    """The analytics side of a monitor: patterns, trends, effectiveness, insights.

    Get the process-wide one with :func:`get_error_analytics`; every method processes the
    queued events first, so it answers with everything published so far.
    """

    __slots__ = ("_monitor",)

    def __init__(self, monitor: ErrorRecoveryMonitor) -> None:
        self._monitor = monitor

    def insights(self) -> list[Insight]:
        """The current insights (found within the last hour or report interval), newest
        first."""
        monitor = self._monitor
        now = monitor._sync(evaluate=False)
        with monitor._lock:
            return monitor._insights.current(now)

    def patterns(
        self, service: str | None = None, limit: int = 10
    ) -> dict[str, list[ErrorPattern]]:
        """The top ``limit`` error patterns of each service (or of ``service``) in the current
        report period, most frequent first."""
        monitor = self._monitor
        monitor._sync(evaluate=False)
        with monitor._lock:
            errors: dict[str, float] = {}
            for (name, strategy, _), row in monitor._period.items():
                if not strategy:
                    errors[name] = errors.get(name, 0.0) + row[F_ERRORS]
            names = [service] if service is not None else sorted(monitor._patterns)
            result: dict[str, list[ErrorPattern]] = {}
            for name in names:
                sketch = monitor._patterns.get(name)
                if sketch is None:
                    continue
                total = errors.get(name, 0.0)
                result[name] = [
                    ErrorPattern(
                        fingerprint=h.key,
                        error_type=h.payload.error_type,
                        category=h.payload.category,
                        template=h.payload.template,
                        count=h.count,
                        error=h.error,
                        share=h.count / total if total else 0.0,
                    )
                    for h in sketch.top(limit)
                ]
            return result

    def effectiveness(self) -> list[StrategyEffectiveness]:
        """Recovery effectiveness per (service, strategy, category) in the current period."""
        return list(self._monitor.report().effectiveness)

    def abandoned_strategies(self) -> list[AbandonedStrategy]:
        """The strategies the learner stopped using in the current period, and why."""
        return list(self._monitor.report().abandoned)

    def trends(self) -> list[TrendState]:
        """Every trend series: errors per interval by (service, category), and each service's
        mean recovery time and failure ratio."""
        monitor = self._monitor
        monitor._sync(evaluate=False)
        with monitor._lock:
            return [
                TrendState(
                    metric=metric,
                    service=service,
                    category=category,
                    baseline=series.baseline,
                    recent=series.recent,
                    score=series.score(series.recent),
                    intervals=series.intervals,
                )
                for (metric, service, category), series in sorted(monitor._trends.items())
            ]


# --- helpers ----------------------------------------------------------------------------------


def _add_row(into: array[float], row: Sequence[float]) -> None:
    for index in range(ROW_FIELDS):
        value = row[index]
        if value:
            into[index] += value


def _successes(row: Sequence[float]) -> float:
    return row[F_OUTCOMES[Outcome.RECOVERED.value]] + row[F_OUTCOMES[Outcome.FALLBACK.value]]


def _safely(where: str, fn: Callable[[Any], object], argument: object) -> None:
    try:
        fn(argument)
    except Exception as error:  # noqa: BLE001 - a listener must not stop the monitor
        report_internal_error(where, error)


def _report_callback_error(error: BaseException) -> None:
    report_internal_error("monitor.alert_callback", error)


async def _bounded(coro: Coroutine[Any, Any, object]) -> None:
    """Run an async alert callback for at most ``_ASYNC_TIMEOUT_S`` (read now, so tests can
    shorten it), then cancel it; report a failure or a timeout (each logged once), never
    raise. The callback runs as a task of its own (``run_bounded``): one that ignores its
    cancellation holds neither this wrapper nor the loop."""
    error = await run_bounded(
        coro, _ASYNC_TIMEOUT_S, what="an async alert callback", late=_report_callback_error
    )
    if isinstance(error, BoundExceeded):
        report_internal_error("monitor.alert_callback.timeout", error)
    elif error is not None:
        _report_callback_error(error)


class _CallbackLoop:
    """An event loop on a daemon thread of its own (``otel-raptor-monitor-callbacks``) that
    runs a monitor's async alert callbacks when the application runs no loop.

    Whichever thread delivers an alert submits the coroutine and returns at once, so two
    threads delivering at the same time both get their callbacks run (one shared loop driven
    by ``run_until_complete`` from each thread lost one of them), and a callback that never
    ends is cancelled by ``_bounded`` instead of freezing the monitor's thread. At most
    ``_MAX_PENDING_CALLBACKS`` are queued or running.

    It stops when ``owner`` (its monitor) is garbage-collected, as :meth:`close` does without
    waiting: a monitor dropped without ``close()`` must not leave its thread and its loop's
    file descriptors behind. Hence it never refers to its monitor, nor does its thread. After
    a fork the child drops this object (its thread is gone; :meth:`forget`) and makes a new
    one on first use; its lock is therefore not registered with ``forksafe``.
    """

    __slots__ = ("_lock", "_pending", "_reaper", "loop", "thread")

    def __init__(self, owner: object) -> None:
        self._lock = threading.Lock()
        self._pending = 0
        self.loop = asyncio.new_event_loop()
        # Holds this object (not the owner) until the owner dies or close() runs. Not at exit:
        # the thread is a daemon, and stopping it then would only race the shutdown.
        self._reaper = weakref.finalize(owner, self.close, 0.0)
        self._reaper.atexit = False
        self.thread = threading.Thread(
            target=self._serve, name="otel-raptor-monitor-callbacks", daemon=True
        )
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, object]) -> bool:
        """Schedule ``coro`` (bounded by ``_bounded``); ``False`` when the backlog is full or
        the loop has closed, and then ``coro`` was not started."""
        with self._lock:
            if self._pending >= _MAX_PENDING_CALLBACKS:
                return False
            self._pending += 1
        bounded = _bounded(coro)
        try:
            future = asyncio.run_coroutine_threadsafe(bounded, self.loop)
        except RuntimeError:  # closed meanwhile (a racing close())
            bounded.close()
            self._finished(None)
            return False
        future.add_done_callback(self._finished)
        return True

    def _finished(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def forget(self) -> None:
        """In a forked child: the thread and the loop are the parent's, so there is nothing
        to stop when the monitor dies (writing to the loop's wake-up socket, shared with the
        parent, would wake the parent's loop)."""
        self._reaper.detach()

    def close(self, timeout: float) -> None:
        """Stop the loop (cancelling what still runs) and wait ``timeout`` seconds for the
        thread."""
        self._reaper.detach()  # the owner's death has nothing left to stop
        with contextlib.suppress(RuntimeError):  # closed already
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def _serve(self) -> None:
        loop = self.loop
        try:
            loop.run_forever()
        finally:
            try:
                # Stopped by close(): what was handed over gets a last moment to finish (no
                # alert is lost to a close right after it fired), then is cancelled.
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_CALLBACK_CLOSE_S))
                pending = {task for task in pending if not task.done()}
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_CALLBACK_CLOSE_S))
            except Exception as error:  # noqa: BLE001 - a daemon thread must end quietly
                report_internal_error("monitor.callback_loop", error)
            finally:
                loop.close()


_CATEGORY_WORDS: Final = (
    ("ratelimit", ErrorCategory.RATE_LIMIT),
    ("rate_limit", ErrorCategory.RATE_LIMIT),
    ("429", ErrorCategory.RATE_LIMIT),
    ("timeout", ErrorCategory.TIMEOUT),
    ("timedout", ErrorCategory.TIMEOUT),
    ("dns", ErrorCategory.DNS),
    ("connection", ErrorCategory.CONNECTION),
    ("connect", ErrorCategory.CONNECTION),
    ("ssl", ErrorCategory.TLS),
    ("tls", ErrorCategory.TLS),
    ("auth", ErrorCategory.AUTHENTICATION),
    ("503", ErrorCategory.UNAVAILABLE),
    ("unavailable", ErrorCategory.UNAVAILABLE),
    ("5", ErrorCategory.SERVER_ERROR),
)


def _category(error_type: str) -> ErrorCategory:
    """What an error's name says about its category: ``classify`` of the built-in exception
    of that name when there is one, else words in the name, else ``unknown``."""
    import builtins  # noqa: PLC0415 - only this rarely used function needs it

    from otel_raptor.runtime.classifying import classify  # noqa: PLC0415 - avoid a cycle

    cls = getattr(builtins, error_type, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return classify(cls()).category
        except Exception:  # noqa: BLE001 - an odd constructor: fall back to the name
            pass
    lowered = error_type.lower().replace("-", "").replace(" ", "")
    for word, category in _CATEGORY_WORDS:
        if word == "5":
            if len(lowered) == 3 and lowered.isdigit() and lowered.startswith("5"):
                return category
        elif word in lowered:
            return category
    return ErrorCategory.UNKNOWN


# --- the process-wide monitor ------------------------------------------------------------------

_live: weakref.WeakSet[ErrorRecoveryMonitor] = weakref.WeakSet()
_default: ErrorRecoveryMonitor | None = None
_default_box = LockBox()


def get_error_recovery_monitor() -> ErrorRecoveryMonitor:
    """The process-wide monitor, fed by the process-wide runtime and running (created and
    started on first use; ``RaptorInstrumentor`` starts it too). If the process-wide runtime
    was replaced, a monitor for the new one replaces the old monitor (which is closed)."""
    monitor = process_monitor()
    monitor.start()
    return monitor


def process_monitor(config: MonitorConfig | None = None) -> ErrorRecoveryMonitor:
    """The process-wide monitor, not started: created on first use, replaced (the old one
    closed) when it was closed or the process-wide runtime changed, and reconfigured in place
    (what it recorded starts afresh) when ``config`` differs from its config."""
    global _default  # noqa: PLW0603 - the one process-wide monitor, created lazily
    runtime = get_runtime()
    with _default_box.lock:
        monitor = _default
        if monitor is None or monitor.closed or monitor.runtime is not runtime:
            if monitor is not None:
                monitor.close()
            monitor = _default = ErrorRecoveryMonitor(config, runtime=runtime)
        elif config is not None and monitor.config != config:
            # In place, not replaced: an app that took this monitor before instrument() (at
            # import time, as the README does) and added its alert callbacks would be left
            # holding a closed monitor that no alert ever reaches.
            monitor._reconfigure(config)
    return monitor


def set_error_recovery_monitor(monitor: ErrorRecoveryMonitor | None) -> ErrorRecoveryMonitor | None:
    """Make ``monitor`` the process-wide one (``None``: a new one on next use); returns the
    previous one (not closed: that is the caller's call)."""
    global _default
    with _default_box.lock:
        previous, _default = _default, monitor
    return previous


def get_error_analytics() -> ErrorAnalytics:
    """The analytics of the process-wide monitor (see :class:`ErrorAnalytics`)."""
    return get_error_recovery_monitor().analytics


def _stop_all() -> None:
    for monitor in list(_live):
        monitor.stop(timeout=1.0)


atexit.register(_stop_all)
