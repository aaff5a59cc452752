"""Predictive failure prevention: a background sampler, forecasts, alarms and prevention actions.

:class:`PredictiveFailure` samples resources on a daemon thread (never on the event loop),
keeps a sliding window per resource, forecasts each with :func:`otel_raptor.core.forecast.forecast`
and feeds an :class:`~otel_raptor.core.prediction.Alarm` with hysteresis. When an alarm is
raised (or escalates, or clears) it publishes ``FailurePredicted`` on the runtime's bus, calls
the alert callbacks, and, on a raise, runs the prevention actions registered for that resource
whose minimum severity is met and whose cooldown has passed; each run publishes
``PreventionActionRun`` with its outcome (``ok``, ``failed``, ``skipped``).

Built-in actions (``PredictorOptions.builtin_actions``, on by default):

* ``memory_cleanup`` (``memory``, ``process_memory``; from ``medium``): asks the memory
  controller for a cleanup at the matching level: ``medium`` → ``standard``, ``high`` →
  ``critical``, ``critical`` → ``emergency``. The cleanup is the ``memory_cleanup`` callable
  given to the constructor, else the process-wide controller of
  ``otel_raptor.runtime.memory`` when that module provides one; without either the action is
  ``skipped``.
* ``gc_collect`` (``memory``, ``process_memory``; from ``high``): ``gc.collect()``.
* ``shed_load`` (every resource; ``critical`` only): asks the runtime to multiply its
  retry-budget ratio by ``shed_factor`` for ``shed_duration_s`` (``Runtime.shed_load``: the
  factor ends by itself, and the configured ratio is never rewritten), so retries stop
  amplifying load while the resource is short.

Threads and processes: ``start_monitoring`` returns at once; the thread is a daemon, stopped by
``stop_monitoring()`` and at interpreter exit (``atexit``), and restarted with fresh state in a
forked child (``os.register_at_fork``). No callback or action runs on the monitor thread: a
sync one runs in a daemon worker thread the monitor waits for at most 30 s, then abandons
(still running; counted as failed, reported once); async ones run on the loop that called
``start_monitoring`` (``run_coroutine_threadsafe``), or on a private loop when there is none,
and are cancelled after 30 s (and then abandoned, never waited for) and counted as failed.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import gc
import inspect
import math
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psutil

from otel_raptor.core.classification import Severity
from otel_raptor.core.events import FailurePredicted, PreventionActionRun
from otel_raptor.core.forecast import Forecast, forecast
from otel_raptor.core.prediction import (
    Alarm,
    AlarmOptions,
    Cleared,
    Raised,
    ResourceSnapshot,
    is_integer,
    is_number,
)
from otel_raptor.errors import ConfigError
from otel_raptor.runtime._bounded import BoundExceeded, run_bounded
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.forksafe import LockBox, after_fork_in_child, register_lock
from otel_raptor.runtime.memory import get_memory_controller
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.sampler import ResourceSample, ResourceSampler
from otel_raptor.runtime.state import Runtime, get_runtime

__all__ = [
    "DEFAULT_RESOURCES",
    "RESOURCES",
    "AlertCallback",
    "PredictiveFailure",
    "PredictorOptions",
    "PreventionAction",
    "ResourcePrediction",
    "Sampler",
    "get_predictive_failure",
    "readings",
]

#: Every resource the predictor can forecast (bounded: these are metric attribute values).
RESOURCES: Final = ("memory", "process_memory", "disk", "file_descriptors", "cpu")
#: Forecast by default. CPU is sampled and reported, but a busy CPU is not a failure.
DEFAULT_RESOURCES: Final = ("memory", "process_memory", "disk", "file_descriptors")

_RANK: Final = {Severity.LOW: 0, Severity.MEDIUM: 1, Severity.HIGH: 2, Severity.CRITICAL: 3}
_CLEANUP_LEVEL: Final = {
    Severity.LOW: "standard",
    Severity.MEDIUM: "standard",
    Severity.HIGH: "critical",
    Severity.CRITICAL: "emergency",
}
_MEMORY_RESOURCES: Final = ("memory", "process_memory")
# How long start_monitoring() waits for the first sample at most (seconds).
_FIRST_SAMPLE_TIMEOUT_S = 5.0
# How long an async callback or action may run, on whichever loop (seconds, real time); past
# it, it is cancelled and abandoned (never waited for) and counts as failed.
_ASYNC_TIMEOUT_S: Final = 30.0
# How long the monitor waits for a sync callback or action (seconds, real time): past it, the
# call is abandoned in its worker thread (a thread cannot be cancelled) and counts as failed.
_SYNC_TIMEOUT_S: Final = 30.0
# How long a sync call still gets once stop_monitoring() cut the wait for it short (seconds).
_STOP_GRACE_S: Final = 0.1
# Sync calls abandoned and still running, at most: beyond, new ones are skipped rather than
# leaving one more thread behind for every prediction (a callback that always hangs).
_MAX_OVERRUNNING: Final = 4
# The interval is a wait timeout: above threading.TIMEOUT_MAX the wait raises OverflowError in
# the monitor thread; and a resource sampled less than daily is not being watched.
_MAX_INTERVAL_S: Final = 86400.0
# Samples a series keeps at most beyond ``window``, to cover the horizon at a short interval:
# closer samples are thinned (the forecast subsamples to MAX_POINTS anyway).
_SERIES_POINTS: Final = 1000

#: Called with each ``FailurePredicted`` (raised, escalated or cleared); may be ``async``.
AlertCallback = Callable[[FailurePredicted], object]
#: A prevention action: called with the prediction that triggered it; may be ``async``.
PreventionAction = Callable[[FailurePredicted], object]


class Sampler(Protocol):
    """Anything that reads a :class:`ResourceSample` (tests pass scripted ones)."""

    def sample(self) -> ResourceSample: ...


def _number(
    key: str,
    value: object,
    *,
    low: float,
    allowed: str,
    strict: bool = True,
    high: float = math.inf,
) -> None:
    if not is_number(value) or (value <= low if strict else value < low) or value > high:  # type: ignore[operator]  # is_number checked it
        raise ConfigError(key, value, allowed)


def _interval(key: str, value: object) -> None:
    _number(key, value, low=0, high=_MAX_INTERVAL_S, allowed=f"seconds in (0, {_MAX_INTERVAL_S:g}]")


@dataclass(frozen=True, slots=True, kw_only=True)
class PredictorOptions:
    """Settings of the predictor; bad values raise ``ConfigError`` naming the field.

    ``interval_s`` (in (0, 86400], default 30): seconds between samples. ``horizon_s`` (> 0,
    default 1800): how far ahead the forecast looks. ``window`` (integer 3-1000, default 60):
    samples per resource the forecast uses at least (30 minutes at the default interval);
    the series also keeps every sample of the last ``horizon_s`` (a trend is only trusted
    over a span as long as the horizon, so a shorter interval must not shorten it), thinned
    to about 1000 samples; beyond 120 the forecast subsamples them. ``min_samples`` (integer
    3..window, default 30): samples needed before an alarm may be raised.
    ``raise_threshold`` (0.8), ``clear_threshold`` (0.4), ``min_confidence`` (0.5),
    ``clear_after`` (3), ``clear_margin`` (1.5): see
    :class:`~otel_raptor.core.prediction.AlarmOptions`. ``resources``: which of
    :data:`RESOURCES` to forecast (default :data:`DEFAULT_RESOURCES`). ``action_cooldown_s``
    (>= 0, default 300): minimum seconds between two runs of one action for one resource.
    ``shed_duration_s`` (> 0, default 300) and ``shed_factor`` (in (0, 1), default 0.5): how
    long and how much ``shed_load`` tightens the retry budget. ``builtin_actions`` (default
    True): register the built-in actions.
    """

    interval_s: float = 30.0
    horizon_s: float = 1800.0
    window: int = 60
    min_samples: int = 30
    raise_threshold: float = 0.8
    clear_threshold: float = 0.4
    min_confidence: float = 0.5
    clear_after: int = 3
    clear_margin: float = 1.5
    resources: tuple[str, ...] = DEFAULT_RESOURCES
    action_cooldown_s: float = 300.0
    shed_duration_s: float = 300.0
    shed_factor: float = 0.5
    builtin_actions: bool = True

    def __post_init__(self) -> None:
        _interval("prediction.interval_s", self.interval_s)
        for key, value, low, high in (
            ("prediction.window", self.window, 3, 1000),
            ("prediction.min_samples", self.min_samples, 3, self.window),
        ):
            if not is_integer(value) or not low <= value <= high:
                raise ConfigError(key, value, f"an integer in [{low}, {high}]")
        self.alarm_options()  # validates the alarm's fields
        given: object = self.resources  # typed, but callers pass anything
        if isinstance(given, str) or not all(r in RESOURCES for r in self.resources):
            raise ConfigError("prediction.resources", self.resources, f"a subset of {RESOURCES}")
        _number(
            "prediction.action_cooldown_s",
            self.action_cooldown_s,
            low=0,
            allowed="seconds >= 0",
            strict=False,
        )
        _number("prediction.shed_duration_s", self.shed_duration_s, low=0, allowed="seconds > 0")
        _number("prediction.shed_factor", self.shed_factor, low=0, allowed="a number in (0, 1)")
        if self.shed_factor >= 1:
            raise ConfigError("prediction.shed_factor", self.shed_factor, "a number in (0, 1)")
        flag: object = self.builtin_actions  # typed bool, but callers pass anything
        if not isinstance(flag, bool):
            # "no" or "false" from an environment would be truthy: the cache clearing and
            # load shedding the caller turned off would run.
            raise ConfigError("prediction.builtin_actions", flag, "True or False")

    def alarm_options(self) -> AlarmOptions:
        return AlarmOptions(
            horizon_s=self.horizon_s,
            raise_threshold=self.raise_threshold,
            clear_threshold=self.clear_threshold,
            min_confidence=self.min_confidence,
            clear_after=self.clear_after,
            clear_margin=self.clear_margin,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourcePrediction:
    """The latest evaluation of one resource: its reading, limit, forecast and alarm."""

    resource: str
    value: float
    limit: float
    forecast: Forecast
    alarm: bool
    severity: Severity | None


def readings(sample: ResourceSample) -> dict[str, tuple[float, float]]:
    """``(value, limit)`` of each resource in ``sample`` that has a limit.

    ``memory``: effective usage and limit (bytes); ``process_memory``: RSS and the process's
    limit (bytes); ``disk``: the fullest configured mount's used fraction of what an
    unprivileged writer can fill (``DiskUsage.ratio``: root-reserved blocks left out), limit 1;
    ``file_descriptors``: open fds and the soft ``RLIMIT_NOFILE``; ``cpu``: system CPU as a
    fraction, limit 1.
    """
    out: dict[str, tuple[float, float]] = {
        "memory": (float(sample.memory_current), float(sample.memory_limit)),
        "process_memory": (float(sample.process_rss), float(sample.process_memory_limit)),
        "cpu": (sample.cpu_percent / 100.0, 1.0),
    }
    if sample.disks:
        out["disk"] = (max(d.ratio for d in sample.disks), 1.0)
    if sample.open_fds is not None and sample.fd_limit:
        out["file_descriptors"] = (float(sample.open_fds), float(sample.fd_limit))
    return out


# eq=False: hashed by identity, the key of its cooldown (two actions may share a name).
@dataclass(slots=True, eq=False)
class _Action:
    name: str
    fn: PreventionAction
    min_severity: Severity
    cooldown_s: float | None


class _Skip(Exception):
    """An action had nothing to do (recorded as ``skipped``): ``reason`` is one of
    :data:`~otel_raptor.core.events.SKIP_REASONS`, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Overran(TimeoutError):
    """A sync callback or action ran past its bound; abandoned, still running in its thread."""

    def __init__(self, timeout: float, *, stopped: bool = False) -> None:
        why = "monitoring stopped" if stopped else f"it ran for {timeout:g} s"
        super().__init__(
            f"a sync prediction callback or action was abandoned ({why}); it goes on running "
            "in its worker thread"
        )


class PredictiveFailure:
    """Samples resources, forecasts their exhaustion, alerts and acts before it happens.

    ``options``: :class:`PredictorOptions`. ``sampler``: what to read (default: a
    :class:`ResourceSampler` of this process, counting errors from ``runtime.bus``, built
    when monitoring starts). ``runtime``: where events go and whose retry budget
    ``shed_load`` tightens (default: the process-wide one). ``memory_cleanup``: called with
    a level (``standard``, ``critical``, ``emergency``) by the ``memory_cleanup`` action; may
    be ``async``.
    """

    def __init__(
        self,
        options: PredictorOptions | None = None,
        *,
        sampler: Sampler | None = None,
        runtime: Runtime | None = None,
        clock: Clock = SYSTEM_CLOCK,
        memory_cleanup: Callable[[str], object] | None = None,
    ) -> None:
        # Checked now: each of these would only fail later, on the monitor thread, where the
        # failure is reported and monitoring (or the action) silently does nothing.
        given: object = options  # typed, but callers pass anything (a mapping, as elsewhere)
        if given is not None and not isinstance(given, PredictorOptions):
            raise ConfigError(
                "prediction.options", given, "a PredictorOptions (PredictorOptions(**mapping))"
            )
        if sampler is not None and not callable(getattr(sampler, "sample", None)):
            raise ConfigError("prediction.sampler", sampler, "an object with sample(), or None")
        if memory_cleanup is not None and not callable(memory_cleanup):
            raise ConfigError(
                "prediction.memory_cleanup", memory_cleanup, "a callable taking a level, or None"
            )
        self._options = options or PredictorOptions()
        self._runtime = runtime if runtime is not None else get_runtime()
        self._clock = clock
        self._sampler = sampler
        self._own_sampler = sampler is None
        self._memory_cleanup = memory_cleanup
        self._lock = threading.Lock()
        self._callbacks: tuple[AlertCallback, ...] = ()
        self._actions: dict[str, tuple[_Action, ...]] = {}
        # Sync calls abandoned at their bound and still running; and the waits for calls in
        # flight, which stop_monitoring() cuts short.
        self._overrunning = 0
        self._waits: set[threading.Event] = set()
        self._reset_state()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first_sample = threading.Event()
        self._interval = self._options.interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._private_loop: asyncio.AbstractEventLoop | None = None
        # One thread at a time drives the private loop (a second run_until_complete on a
        # running loop fails, and its coroutine would be lost).
        self._private_lock = threading.Lock()
        if self._options.builtin_actions:
            self._add_builtin_actions()
        _live.add(self)
        register_lock(self, "_lock")
        register_lock(self, "_private_lock")
        after_fork_in_child(self, PredictiveFailure._after_fork_in_child)

    def _reset_state(self) -> None:
        # A hard cap; _append keeps the series far shorter at ordinary intervals.
        most = max(self._options.window, _SERIES_POINTS) + 2
        self._series: dict[str, collections.deque[tuple[float, float]]] = {
            r: collections.deque(maxlen=most) for r in self._options.resources
        }
        alarm_options = self._options.alarm_options()
        self._alarms = {r: Alarm(alarm_options) for r in self._options.resources}
        self._predictions: dict[str, ResourcePrediction] = {}
        self._latest: ResourceSample | None = None
        # action -> when it last ran, and at which severity's rank. Keyed by the action itself,
        # not its label: two lambdas, or an app's own ``shed_load``, are two actions.
        self._last_run: dict[_Action, tuple[float, int]] = {}

    # --- configuration ------------------------------------------------------------------

    @property
    def options(self) -> PredictorOptions:
        return self._options

    @property
    def monitoring(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def add_alert_callback(self, fn: AlertCallback) -> None:
        """Call ``fn(prediction)`` on every raise, escalation and clear (sync or async).

        A callback that raises is reported once and skipped; it never stops monitoring."""
        if not callable(fn):
            raise ConfigError("prediction.alert_callback", fn, "a callable")
        with self._lock:
            self._callbacks = (*self._callbacks, fn)

    def add_prevention_action(
        self,
        resource: str,
        fn: PreventionAction,
        *,
        min_severity: Severity | str = Severity.HIGH,
        name: str | None = None,
        cooldown_s: float | None = None,
    ) -> None:
        """Run ``fn(prediction)`` (sync or async) when an alarm on ``resource`` (one of
        :data:`RESOURCES`) is raised at ``min_severity`` or above (default ``high``).

        ``name`` (default: the function's name) labels the ``PreventionActionRun`` events
        only: each registered action has a cooldown of its own, whatever its label.
        ``cooldown_s`` (>= 0) overrides ``action_cooldown_s`` for this action. An action that
        raises is recorded as ``failed``.
        """
        if resource not in RESOURCES:
            raise ConfigError("prediction.action.resource", resource, f"one of {RESOURCES}")
        if not callable(fn):
            raise ConfigError("prediction.action.fn", fn, "a callable")
        try:
            severity = Severity(min_severity)
        except ValueError:
            raise ConfigError(
                "prediction.action.min_severity",
                min_severity,
                "one of low, medium, high, critical",
            ) from None
        if cooldown_s is not None:
            _number("prediction.action.cooldown_s", cooldown_s, low=0, allowed=">= 0", strict=False)
        label = name or getattr(fn, "__name__", None) or type(fn).__name__
        action = _Action(str(label), fn, severity, cooldown_s)
        with self._lock:
            self._actions[resource] = (*self._actions.get(resource, ()), action)

    def _add_builtin_actions(self) -> None:
        for resource in _MEMORY_RESOURCES:
            self.add_prevention_action(
                resource, self._cleanup_memory, min_severity=Severity.MEDIUM, name="memory_cleanup"
            )
            self.add_prevention_action(
                resource, _collect_garbage, min_severity=Severity.HIGH, name="gc_collect"
            )
        for resource in RESOURCES:
            self.add_prevention_action(
                resource, self._shed_load, min_severity=Severity.CRITICAL, name="shed_load"
            )

    def use_memory_controller(self, controller: object) -> None:
        """Let the ``memory_cleanup`` action call ``controller.cleanup(level,
        trigger="prediction")`` (a ``SimpleMemoryController``, or anything with ``cleanup`` or
        an async ``manual_cleanup``)."""
        self._memory_cleanup = _controller_cleanup(controller)

    # --- lifecycle ----------------------------------------------------------------------

    async def start_monitoring(self, interval: float | None = None) -> None:
        """Start sampling every ``interval`` seconds (default ``options.interval_s``) on a
        daemon thread. Returns once the first sample is taken (the sampler runs in that
        thread, so the loop keeps running meanwhile; at most 5 s), so that
        :meth:`get_current_metrics` has something to say at once. Async callbacks will run on
        the calling loop. Calling it while monitoring only updates the loop and the interval."""
        first = self.start(interval, loop=asyncio.get_running_loop(), wait=False)
        await asyncio.to_thread(first.wait, _FIRST_SAMPLE_TIMEOUT_S)

    def start(
        self,
        interval: float | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        wait: bool = True,
    ) -> threading.Event:
        """The synchronous twin of :meth:`start_monitoring`, for code without a loop; with
        ``wait`` (the default) it too returns once the first sample is taken (at most 5 s).
        Returns an event set once that first sample is taken."""
        if interval is not None:
            _interval("prediction.interval_s", interval)
            self._interval = float(interval)
        if loop is not None:
            self._loop = loop
        with self._lock:
            first = self._first_sample
            if not self.monitoring:
                if self._sampler is None:
                    try:
                        self._sampler = ResourceSampler(bus=self._runtime.bus, clock=self._clock)
                    except (psutil.Error, OSError) as error:
                        # The machine will not let us read this process: no predictions,
                        # but the app that asked for them goes on.
                        report_internal_error("prediction.sampler: process unreadable", error)
                        first.set()
                        return first
                self._stop = threading.Event()
                first = self._first_sample = threading.Event()
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._stop, first),
                    name="otel-raptor-predictor",
                    daemon=True,
                )
                self._runtime.resource_snapshot = self.snapshot
                self._thread.start()
        if wait:
            first.wait(_FIRST_SAMPLE_TIMEOUT_S)
        return first

    def stop_monitoring(self, timeout: float = 5.0) -> None:
        """Stop the sampler thread (waiting up to ``timeout`` seconds for it), restore a
        shed retry budget, and stop reporting resource gauges. Idempotent."""
        self._stop.set()
        with self._lock:
            waits = list(self._waits)
        for waiting in waits:  # the monitor stops waiting for a callback in flight
            waiting.set()
        thread, self._thread = self._thread, None
        # From a callback or action the monitor waits for, joining the monitor would only
        # make it give up on the caller.
        calling = getattr(_in_call, "active", False)
        if thread is not None and thread is not threading.current_thread() and not calling:
            thread.join(timeout)
        if self._runtime.resource_snapshot == self.snapshot:
            self._runtime.resource_snapshot = _empty_snapshot
        if self._own_sampler:
            # Ours counts failed attempts from the bus: unsubscribed, or it goes on taking its
            # lock on every failure for nobody. The next start makes a new one.
            _close_sampler(self._sampler)
            self._sampler = None
        self._restore_budget()
        private, self._private_loop = self._private_loop, None
        if private is not None and not private.is_running():
            private.close()

    def _run(self, stop: threading.Event, first: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except psutil.NoSuchProcess:
                report_internal_error("prediction.sampler: watched process is gone")
                return
            except Exception as error:  # noqa: BLE001 - the monitor must outlive our bugs
                report_internal_error("prediction.tick", error)
            finally:
                first.set()  # taken, or failed: either way nobody should wait for it longer
            stop.wait(self._interval)

    # --- one evaluation -----------------------------------------------------------------

    def tick(self) -> list[FailurePredicted]:
        """Sample once, forecast, evaluate the alarms, then publish, alert and act.

        The monitor thread calls it every interval; tests call it directly. Returns the
        predictions published by this tick (raises, escalations and clears)."""
        sampler = self._sampler
        if sampler is None:
            sampler = self._sampler = ResourceSampler(bus=self._runtime.bus, clock=self._clock)
        sample = sampler.sample()
        now = sample.timestamp
        options = self._options
        current = readings(sample)
        published: list[FailurePredicted] = []
        with self._lock:
            self._latest = sample
            for resource in options.resources:
                reading = current.get(resource)
                if reading is None:
                    continue
                value, limit = reading
                series = self._series[resource]
                self._append(series, now, value)
                fc = forecast(series, limit, horizon=options.horizon_s)
                alarm = self._alarms[resource]
                previous = alarm.severity
                result = alarm.evaluate(fc) if len(series) >= options.min_samples else None
                self._predictions[resource] = ResourcePrediction(
                    resource=resource,
                    value=value,
                    limit=limit,
                    forecast=fc,
                    alarm=alarm.raised,
                    severity=alarm.severity,
                )
                if isinstance(result, Raised):
                    published.append(_prediction(resource, fc, result.severity, cleared=False))
                elif isinstance(result, Cleared):
                    severity = previous or Severity.MEDIUM
                    published.append(_prediction(resource, fc, severity, cleared=True))
        for prediction in published:
            self._runtime.bus.publish(prediction)
            for callback in self._callbacks:
                self._call(callback, prediction, on_done=_report_callback_failure)
            if not prediction.cleared:
                self._run_actions(prediction, now)
            elif not any(p.alarm for p in self._predictions.values()):
                self._restore_budget()  # the shedding ends with the last raised prediction
        return published

    def _append(
        self, series: collections.deque[tuple[float, float]], now: float, value: float
    ) -> None:
        """Add a sample: keep ``window`` samples, and beyond them every sample of the last
        ``horizon_s``, so the trend spans the horizon whatever the interval (the forecast's
        span factor caps the confidence of a shorter one, and a 5 s interval with a 60-sample
        window would never raise). Samples closer than ``2 x horizon_s / _SERIES_POINTS`` are
        thinned: the newest replaces its predecessor while that one is that close to the one
        before it, so however short the interval, about ``_SERIES_POINTS`` samples remain."""
        options = self._options
        spacing = 2.0 * options.horizon_s / _SERIES_POINTS
        if len(series) >= 2 and now - series[-2][0] < spacing:
            series[-1] = (now, value)
        else:
            series.append((now, value))
        cutoff = now - options.horizon_s
        while len(series) > options.window and series[0][0] <= cutoff:
            series.popleft()

    def _run_actions(self, prediction: FailurePredicted, now: float) -> None:
        for action in self._actions.get(prediction.resource, ()):
            cooldown = (
                self._options.action_cooldown_s if action.cooldown_s is None else action.cooldown_s
            )
            rank = _RANK[prediction.severity]
            with self._lock:
                last = self._last_run.get(action)
            # An escalation runs the action again within its cooldown: a memory cleanup at
            # ``critical`` is a stronger one than the ``standard`` run of a minute ago.
            if rank < _RANK[action.min_severity] or (
                last is not None and now - last[0] < cooldown and rank <= last[1]
            ):
                reason = "below_severity" if rank < _RANK[action.min_severity] else "cooldown"
                self._record(prediction.resource, action.name, "skipped", 0.0, reason)
                continue
            this_run = (now, rank)
            with self._lock:
                self._last_run[action] = this_run
            started = self._clock.monotonic()

            def done(
                error: BaseException | None,
                resource: str = prediction.resource,
                action: _Action = action,
                started: float = started,
                this_run: tuple[float, int] = this_run,
                previous: tuple[float, int] | None = last,
            ) -> None:
                reason = ""
                if error is None:
                    outcome = "ok"
                elif isinstance(error, _Skip):
                    outcome, reason = "skipped", error.reason
                    # It did nothing (a controller in its cooldown, nothing to clean with): it
                    # must not hold back the next raise or escalation.
                    self._unclaim(action, this_run, previous)
                else:
                    outcome = "failed"
                    report_internal_error(f"prediction.action {action.name}", error)
                duration = self._clock.monotonic() - started
                self._record(resource, action.name, outcome, duration, reason)

            self._call(action.fn, prediction, on_done=done)

    def _unclaim(
        self, action: _Action, this_run: tuple[float, int], previous: tuple[float, int] | None
    ) -> None:
        with self._lock:
            if self._last_run.get(action) is not this_run:
                return  # a later run, or a reset, took the slot since
            if previous is None:
                del self._last_run[action]
            else:
                self._last_run[action] = previous

    def _record(
        self, resource: str, action: str, outcome: str, duration: float, skip_reason: str = ""
    ) -> None:
        self._runtime.bus.publish(
            PreventionActionRun(
                resource=resource,
                action=action,
                outcome=outcome,
                duration_s=max(0.0, duration),
                skip_reason=skip_reason,
            )
        )

    def _call(
        self,
        fn: Callable[[FailurePredicted], object],
        prediction: FailurePredicted,
        *,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        """Run ``fn`` (sync in a worker thread, async on the right loop), bounded, and report
        how it ended."""
        result: object
        failed: BaseException | None
        if inspect.iscoroutinefunction(fn):
            # Calling it only makes the coroutine: none of its code runs yet.
            try:
                result, failed = fn(prediction), None
            except Exception as error:  # noqa: BLE001 - user code must not stop the monitor
                result, failed = None, error
        else:
            result, failed = self._run_sync(fn, prediction)
        if failed is not None:
            on_done(failed)
            return
        if not inspect.iscoroutine(result):
            on_done(None)
            return
        self._run_coroutine(result, on_done)

    def _run_sync(
        self, fn: Callable[[FailurePredicted], object], prediction: FailurePredicted
    ) -> tuple[object, BaseException | None]:
        """Run a sync callback or action in a daemon worker thread and wait for it at most
        ``_SYNC_TIMEOUT_S`` (read now, so tests can shorten it), or until
        ``stop_monitoring``: one that blocks (a webhook without a timeout) must not stop the
        monitoring. Past that it is abandoned: a thread cannot be cancelled, so it goes on
        running, and what it raises when it ends is reported then. Returns what it returned
        and what it raised."""
        with self._lock:
            if self._overrunning >= _MAX_OVERRUNNING:
                return None, _Skip(
                    "overrunning", f"{self._overrunning} earlier calls are still running"
                )
        call = _SyncCall(fn, prediction)
        with self._lock:
            self._waits.add(call.wake)
        try:
            try:
                threading.Thread(
                    target=call.run, name="otel-raptor-prediction-call", daemon=True
                ).start()
            except RuntimeError as error:  # out of threads: the call fails, the monitor goes on
                return None, error
            if call.wake.wait(_SYNC_TIMEOUT_S) and not call.ended.is_set():
                # Woken by stop_monitoring(): a callback that stopped the monitoring itself
                # ends a moment later, and is no overrun.
                call.ended.wait(_STOP_GRACE_S)
        finally:
            with self._lock:
                self._waits.discard(call.wake)
        if not call.abandon(self._after_overrun):
            return call.result, call.error
        with self._lock:
            self._overrunning += 1
        return None, _Overran(_SYNC_TIMEOUT_S, stopped=self._stop.is_set())

    def _after_overrun(self, result: object, error: BaseException | None) -> None:
        """An abandoned sync call ended at last (in its worker thread)."""
        with self._lock:
            self._overrunning = max(0, self._overrunning - 1)
        if inspect.iscoroutine(result):
            result.close()  # too late to run it: its bound is long past
        if error is not None:
            _report_late(error)

    def _run_coroutine(
        self,
        coro: Coroutine[Any, Any, object],
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        """Run an async callback or action on the loop running in this thread (not waited
        for), else on the app's loop (``start_monitoring``), else on the private loop, and
        call ``on_done`` with how it ended. Every path bounds it with ``run_bounded`` (the
        monitor's bound): past ``_ASYNC_TIMEOUT_S`` (read now, so tests can shorten it) it is
        cancelled and abandoned, never waited for, so one that swallows its cancellation
        holds neither the predictor's thread nor the private loop."""
        timeout = _ASYNC_TIMEOUT_S

        def bounded() -> Coroutine[Any, Any, BaseException | None]:
            return run_bounded(
                coro, timeout, what="an async prediction callback or action", late=_report_late
            )

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:  # called on a loop's thread: never block it
            task = running.create_task(bounded())
            task.add_done_callback(lambda t: on_done(None if t.cancelled() else t.result()))
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            handed = bounded()
            try:
                future = asyncio.run_coroutine_threadsafe(handed, loop)
            except RuntimeError:  # closed since we looked: the private loop runs it
                handed.close()  # never started, and ``coro`` with it
            else:
                on_done(_wait_for_app_loop(future, timeout))
                return
        outcome: BaseException | None
        try:
            with self._private_lock:
                private = self._private_loop
                if private is None or private.is_closed():
                    private = self._private_loop = asyncio.new_event_loop()
                # Returns at the bound: a task cut off there stays behind on this loop,
                # cancelled, and ends (or not) whenever the loop runs again.
                outcome = private.run_until_complete(bounded())
        except Exception as error:  # noqa: BLE001
            outcome = error
        on_done(outcome)

    # --- built-in actions ---------------------------------------------------------------

    def _cleanup_memory(self, prediction: FailurePredicted) -> object:
        level = _CLEANUP_LEVEL[prediction.severity]
        cleanup = self._memory_cleanup or _default_memory_cleanup()
        if cleanup is None:
            raise _Skip("no_controller", "no memory controller")
        result = cleanup(level)
        if inspect.iscoroutine(result):
            return _unless_skipped(result)
        _raise_if_skipped(result)
        return result

    def _shed_load(self, prediction: FailurePredicted) -> None:
        # The runtime owns the budget shape: shedding is a temporary factor on top of it, held
        # in this predictor's name, that ends by itself, so there is nothing to restore here.
        self._runtime.shed_load(
            self._options.shed_factor, self._options.shed_duration_s, owner=self
        )

    def _restore_budget(self) -> None:
        """On ``stop_monitoring``, and when no prediction is raised any more: end the
        shedding this predictor started (the app's own goes on)."""
        try:
            self._runtime.stop_shedding(owner=self)
        except Exception as error:  # noqa: BLE001
            report_internal_error("prediction.shed_load stop", error)

    # --- reading ------------------------------------------------------------------------

    def get_current_metrics(self) -> dict[str, object]:
        """The latest sample as a plain dict (empty before the first), plus ``utilization``:
        usage over limit per resource."""
        sample = self._latest
        if sample is None:
            return {}
        out = dataclasses.asdict(sample)
        out["error_rates"] = dict(sample.error_rates)
        out["utilization"] = {
            r: value / limit for r, (value, limit) in readings(sample).items() if limit > 0
        }
        return out

    def get_predictions(self) -> dict[str, ResourcePrediction]:
        """The latest evaluation of each forecast resource."""
        with self._lock:
            return dict(self._predictions)

    def snapshot(self) -> ResourceSnapshot:
        """What the resource gauges report (installed as ``Runtime.resource_snapshot``)."""
        sample = self._latest
        if sample is None:
            return _empty_snapshot()
        # No lock: gauges call this (see CircuitBreaker.try_snapshot), and copying a dict's
        # values runs no Python code, so no other thread can change it half-way.
        predictions = tuple(self._predictions.values())
        return ResourceSnapshot(
            utilization={
                r: value / limit for r, (value, limit) in readings(sample).items() if limit > 0
            },
            time_to_exhaustion_s={
                p.resource: p.forecast.time_to_exhaustion_s
                for p in predictions
                if p.forecast.time_to_exhaustion_s is not None
            },
            probability={p.resource: p.forecast.probability for p in predictions},
            # The memory controller's figure, which its pressure levels and the monitor's
            # memory alert are about; the machine's is ``utilization["memory"]``.
            memory_pressure=sample.pressure_ratio,
        )

    # --- fork ---------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        # The lock is fresh already (forksafe); the thread, the loop and the history are the
        # parent's.
        was_running = self._thread is not None
        self._thread = None
        self._stop = threading.Event()
        self._overrunning = 0  # the parent's worker threads do not exist here
        self._waits = set()
        self._loop = None  # the parent's loop does not run here
        self._private_loop = None
        if self._own_sampler:
            _close_sampler(self._sampler)  # off this process's bus (a copy of the parent's)
            self._sampler = None  # it watched the parent's pid
        self._reset_state()  # the parent's history says nothing about this process
        self._first_sample = threading.Event()
        if was_running:
            self.start(wait=False)  # never block a fork handler


def _prediction(
    resource: str, fc: Forecast, severity: Severity, *, cleared: bool
) -> FailurePredicted:
    return FailurePredicted(
        resource=resource,
        probability=fc.probability,
        time_to_exhaustion_s=fc.time_to_exhaustion_s,
        confidence=fc.confidence,
        severity=severity,
        cleared=cleared,
    )


def _wait_for_app_loop(
    future: concurrent.futures.Future[BaseException | None], timeout: float
) -> BaseException | None:
    """Wait for ``run_bounded`` on the app's loop: it returns at the bound, unless that loop
    is too busy to even start it; then cancel it there (which cancels the coroutine) rather
    than leave it to run unbounded."""
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return BoundExceeded("an async prediction callback or action", timeout)
    except Exception as error:  # noqa: BLE001 - e.g. cancelled by the app's loop closing
        return error


# Set in the worker thread of a sync callback or action.
_in_call = threading.local()


class _SyncCall:
    """One sync callback or action, run in a worker thread that the monitor waits for."""

    __slots__ = ("_arg", "_fn", "_lock", "_on_late", "_state", "ended", "error", "result", "wake")

    def __init__(self, fn: Callable[[FailurePredicted], object], arg: FailurePredicted) -> None:
        self._fn = fn
        self._arg = arg
        self._lock = threading.Lock()
        self._state = "running"  # then "ended", or "abandoned" by the monitor
        self._on_late: Callable[[object, BaseException | None], None] | None = None
        self.result: object = None
        self.error: BaseException | None = None
        self.ended = threading.Event()
        # Set when it ends, and by stop_monitoring() to end the monitor's wait early.
        self.wake = threading.Event()

    def run(self) -> None:
        _in_call.active = True  # this thread runs this call only
        result: object = None
        error: BaseException | None = None
        try:
            result = self._fn(self._arg)
        except BaseException as caught:  # noqa: BLE001 - reported by the monitor, not this thread
            error = caught
        with self._lock:
            abandoned = self._state == "abandoned"
            self._state = "ended"
            self.result, self.error = result, error
        self.ended.set()
        self.wake.set()
        if abandoned and self._on_late is not None:
            self._on_late(result, error)

    def abandon(self, on_late: Callable[[object, BaseException | None], None]) -> bool:
        """Give up on it unless it has ended; ``on_late`` is called when it does end."""
        with self._lock:
            if self._state == "ended":
                return False
            self._state = "abandoned"
            self._on_late = on_late
            return True


def _raise_if_skipped(result: object) -> None:
    """A ``CleanupResult`` whose ``skipped`` says the controller did nothing (its cooldown,
    ``auto_cleanup`` off, the learner's back-off, a cleanup still running) is no ``ok``."""
    reason = getattr(result, "skipped", "")
    if isinstance(reason, str) and reason:
        raise _Skip("controller_declined", f"memory controller: {reason}")


async def _unless_skipped(coro: Coroutine[Any, Any, object]) -> object:
    result = await coro
    _raise_if_skipped(result)
    return result


def _report_late(error: BaseException) -> None:
    # What a callback or action cut off at its bound raised on its way out (``on_done`` has
    # reported the timeout already).
    report_internal_error("prediction.async.after_timeout", error)


def _report_callback_failure(error: BaseException | None) -> None:
    if error is not None:
        report_internal_error("prediction.alert_callback", error)


def _collect_garbage(prediction: FailurePredicted) -> None:
    gc.collect()


def _default_memory_cleanup() -> Callable[[str], object] | None:
    """The process-wide memory controller's cleanup."""
    return _controller_cleanup(get_memory_controller())


def _controller_cleanup(controller: object) -> Callable[[str], object]:
    """``controller.cleanup(level, trigger="prediction")`` (the synchronous cleanup of
    ``SimpleMemoryController``), else ``controller.manual_cleanup(level)``."""
    sync = getattr(controller, "cleanup", None)
    if callable(sync):
        return lambda level: sync(level, trigger="prediction")
    manual = getattr(controller, "manual_cleanup", None)
    if callable(manual):
        return manual  # type: ignore[no-any-return]  # getattr of an unknown object
    raise ConfigError("prediction.memory_controller", controller, "an object with cleanup()")


def _close_sampler(sampler: Sampler | None) -> None:
    """Stop a sampler of ours counting bus events (an app's sampler is the app's)."""
    if isinstance(sampler, ResourceSampler):
        try:
            sampler.close()
        except Exception as error:  # noqa: BLE001 - stopping must go on
            report_internal_error("prediction.sampler close", error)


def _empty_snapshot() -> ResourceSnapshot:
    return ResourceSnapshot()


_live: weakref.WeakSet[PredictiveFailure] = weakref.WeakSet()
_default: PredictiveFailure | None = None
_default_box = LockBox()


def get_predictive_failure() -> PredictiveFailure:
    """The process-wide predictor (created on first use, with default options, watching
    this process and reporting to the process-wide runtime)."""
    global _default  # noqa: PLW0603 - the one process-wide default, created lazily
    predictor = _default
    if predictor is None:
        with _default_box.lock:
            if _default is None:
                _default = PredictiveFailure()
            predictor = _default
    return predictor


def _stop_all() -> None:
    for predictor in list(_live):
        try:
            predictor.stop_monitoring(timeout=1.0)
        except Exception as error:  # noqa: BLE001 - interpreter exit must go on
            report_internal_error("prediction.atexit", error)


atexit.register(_stop_all)
