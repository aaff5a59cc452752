"""Thread- and asyncio-safe circuit breakers, and the bounded registry that names them.

``CircuitBreaker`` wraps the pure ``otel_raptor.core.breaker.BreakerCore`` with one
``threading.Lock``, held only around the core's arithmetic: never across the wrapped call, a
sleep or publishing an event. State changes are published as ``BreakerTransitioned`` after the
lock is released, so a subscriber may call back into the breaker.

Admission through a CLOSED breaker reads the state without the lock (a single attribute read
never blocks): a call admitted just as another thread trips the breaker is one that would have
been admitted a moment earlier anyway, and its outcome is not counted against the new state.
A successful call through a closed breaker therefore takes the lock once, to record the result,
or not at all while the breaker is quiet (``BreakerCore.quiet``: a window full of successes,
nothing due), since recording it would change nothing.

Every lock here is registered with :mod:`otel_raptor.runtime.forksafe`: taken before
``os.fork`` (so the child sees whole state) and fresh in the child. A forked child forgets
the probes in flight at the fork: they run in threads it does not have.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, ParamSpec, TypeVar, overload

from otel_raptor.core.breaker import (
    BreakerCore,
    BreakerSnapshot,
    CircuitBreakerConfig,
    Permit,
)
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.events import BreakerTransitioned, CallRejected, Event, EventSink
from otel_raptor.core.states import CircuitState, Transition
from otel_raptor.errors import CircuitOpenError, ConfigError
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.forksafe import after_fork_in_child, register_lock
from otel_raptor.runtime.safety import report_internal_error

__all__ = ["OTHER_BREAKER", "BreakerRegistry", "CircuitBreaker", "Classifier"]

P = ParamSpec("P")
T = TypeVar("T")

#: Turns a failure into a ``Classification``; the breaker only uses its ``category``.
Classifier = Callable[[BaseException], Classification]

#: The breaker that names beyond a registry's ``max_breakers`` share.
OTHER_BREAKER: Final = "other"

_CALL: Final = Permit.CALL
_REJECTED: Final = Permit.REJECTED
_CLOSED: Final = CircuitState.CLOSED
_DEFAULT_CONFIG: Final = CircuitBreakerConfig()

_logger = logging.getLogger("otel_raptor")


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class CircuitBreaker:
    """A named circuit breaker, safe to share between threads and asyncio tasks.

    ``config`` defaults to ``CircuitBreakerConfig()``. ``clock`` supplies monotonic time,
    ``sink`` receives ``BreakerTransitioned`` and ``CallRejected`` events (``None``: none are
    published), ``rnd`` returns floats in [0, 1) for the open-duration jitter and
    ``classifier`` turns a failure into a ``Classification`` for ``call_sync``/``call``
    (default: ``otel_raptor.runtime.classifying.classify``).

    Low level (the attempt loop, through ``otel_raptor.runtime.downstream.Route``):
    ``acquire`` → run the call → exactly one of ``record_success``, ``record_failure`` or
    ``release`` with the permit. High level: ``call_sync(fn, ...)`` and ``await call(fn, ...)``,
    one attempt each, no retries.
    """

    __slots__ = (
        "__weakref__",
        "_classifier",
        "_core",
        "_lock",
        "_monotonic",
        "_name",
        "_sink",
    )

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        sink: EventSink | None = None,
        rnd: Callable[[], float] = random.random,
        classifier: Classifier | None = None,
    ) -> None:
        if not _is_name(name):
            raise ConfigError("breaker.name", name, "a non-empty string")
        if config is None:
            config = _DEFAULT_CONFIG
        elif not isinstance(config, CircuitBreakerConfig):
            raise ConfigError("breaker.config", config, "a CircuitBreakerConfig or None")
        self._name = name
        # Bound once: for the system clock this is ``time.monotonic`` itself, one C call.
        self._monotonic = clock.monotonic
        self._sink = sink
        self._classifier = classifier if classifier is not None else classify
        self._lock = threading.Lock()
        self._core = BreakerCore(config, now=self._monotonic(), rnd=rnd)
        register_lock(self, "_lock")
        after_fork_in_child(self, CircuitBreaker._after_fork_in_child)

    # --- low level ----------------------------------------------------------------------

    def acquire(self, now: float | None = None) -> Permit:
        """Ask to run one call (at ``now``, default the breaker's clock). Never raises:
        ``Permit.REJECTED`` means do not run it (then ``raise breaker.reject_error()``)."""
        core = self._core
        if core._state is _CLOSED:  # lock-free, as in call_sync
            return _CALL
        if now is None:
            now = self._monotonic()
        with self._lock:
            permit, transition = core.acquire(now)
        if transition is not None:
            self._publish_transition(transition)
        return permit

    def reject_error(self) -> CircuitOpenError:
        """Build the ``CircuitOpenError`` for a refused call and publish ``CallRejected``."""
        return CircuitOpenError(self._name, self.reject())

    def reject(self, now: float | None = None) -> float | None:
        """Publish ``CallRejected`` for a refused call; return the seconds until a call would
        be admitted (``None`` when held open by hand)."""
        if now is None:
            now = self._monotonic()
        core = self._core
        with self._lock:
            state = core.state
            retry_after = core.retry_after(now)
        self._publish(CallRejected(self._name, state, retry_after))
        return retry_after

    def record_success(self, permit: Permit, duration: float, now: float | None = None) -> None:
        """The call admitted with ``permit`` succeeded after ``duration`` seconds."""
        if now is None:
            now = self._monotonic()
        lock = self._lock
        lock.acquire()
        try:
            transition = self._core.on_success(permit, now, duration)
        finally:
            lock.release()
        if transition is not None:
            self._publish_transition(transition)

    def record_success_since(self, permit: Permit, start: float) -> None:
        """``record_success`` for a call that started at ``start`` (the breaker's clock):
        one clock read instead of two, for the guard's hot path."""
        end = self._monotonic()
        lock = self._lock
        lock.acquire()
        try:
            transition = self._core.on_success(permit, end, end - start)
        finally:
            lock.release()
        if transition is not None:
            self._publish_transition(transition)

    def record_failure(
        self,
        permit: Permit,
        duration: float,
        classification: Classification | ErrorCategory,
        now: float | None = None,
        *,
        retry: bool = False,
        live_refusal: bool = False,
        unconfirmed: bool = False,
        opened_at: float | None = None,
    ) -> None:
        """The call admitted with ``permit`` failed after ``duration`` seconds, classified as
        ``classification`` (its category, ``live_refusal``, ``unconfirmed`` and ``opened_at``
        matter here; a category will do, with the others given apart). ``retry``: a later
        attempt of a call that failed already (see
        :meth:`BreakerCore.on_failure <otel_raptor.core.breaker.BreakerCore.on_failure>`)."""
        if isinstance(classification, ErrorCategory):
            category = classification
        else:
            category = classification.category
            live_refusal = live_refusal or classification.live_refusal
            unconfirmed = unconfirmed or classification.unconfirmed
            if opened_at is None:
                opened_at = classification.opened_at
        self._record_failure(
            permit,
            duration,
            category,
            now,
            retry=retry,
            live_refusal=live_refusal,
            unconfirmed=unconfirmed,
            opened_at=opened_at,
        )

    def health_check(self, *, passed: bool, now: float | None = None) -> Transition | None:
        """Report an active health check of the downstream (see
        ``BreakerCore.on_health_check``); returns (and publishes) the transition, if any."""
        if now is None:
            now = self._monotonic()
        with self._lock:
            transition = self._core.on_health_check(passed=passed, now=now)
        if transition is not None:
            self._publish_transition(transition)
        return transition

    def stop_judging(self) -> None:
        """Recording a success through this breaker failed (our bug, reported by the caller):
        stop judging the downstream, since the breaker would otherwise go on counting its
        failures without the successes between them and open on a downstream that answers.
        The breaker closes (publishing the transition if it was not closed, reason
        ``bookkeeping_failed``), admits every call and counts nothing until :meth:`reset`
        or :meth:`force_open`; said once in the log. Never raises. See
        :meth:`BreakerCore.stop_judging <otel_raptor.core.breaker.BreakerCore.stop_judging>`.
        """
        try:
            now = self._monotonic()
            core = self._core
            with self._lock:
                if core.forced_open:
                    return  # held open by hand: nothing is judged while it is held
                # Again too when it already stopped: a late outcome may have made it unquiet,
                # and callers would meet the failing bookkeeping on every success.
                first = core.judging
                transition = core.stop_judging(now)
            if not first:
                return
            _logger.warning(
                "otel_raptor: the circuit breaker %r could not record a success (an internal "
                "error, logged apart); it stops judging: closed, it admits every call and "
                "counts no failure until reset() or force_open()",
                self._name,
            )
        except Exception as bug:  # noqa: BLE001 - runs in our callers' except blocks
            report_internal_error("breaker.stop_judging", bug)
            return
        if transition is not None:
            self._publish_transition(transition)

    def release(self, permit: Permit) -> None:
        """The call admitted with ``permit`` ended without a verdict (cancelled, interrupted):
        nothing is counted; a probe gives its slot back."""
        if permit is _CALL:
            return
        with self._lock:
            self._core.release(permit)

    # --- high level ---------------------------------------------------------------------

    def call_sync(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` through the breaker and return its result unchanged.

        Raises ``CircuitOpenError`` without calling ``fn`` when refused. An ``Exception`` from
        ``fn`` is classified, recorded and re-raised unchanged; a ``BaseException`` that is not
        an ``Exception`` (``KeyboardInterrupt``, ``CancelledError``...) is re-raised without
        counting. No retries: for those, use a ``Guard`` with this breaker.
        """
        permit = self._admit()
        start = self._monotonic()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._ended(permit, start, exc)
            raise
        self._succeeded(permit, start)
        return result

    @overload
    async def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def call(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Like ``call_sync``, for coroutine functions or functions returning an awaitable
        (awaited) as well as plain functions. ``asyncio.CancelledError`` gives the permit back
        and is re-raised; it never counts as a failure."""
        permit = self._admit()
        start = self._monotonic()
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            self._ended(permit, start, exc)
            raise
        self._succeeded(permit, start)
        return result

    def _admit(self) -> Permit:
        # Lock-free admission while CLOSED (see the module docstring). ``_state`` rather than
        # the ``state`` property: a property read costs more than the rest of this check.
        if self._core._state is _CLOSED:
            return _CALL
        try:
            permit = self.acquire()
            if permit is not _REJECTED:
                return permit
            refusal = self.reject_error()
        except Exception as bug:  # noqa: BLE001 - the call runs, as without us
            report_internal_error("breaker.admit", bug)
            return _CALL
        raise refusal

    def _succeeded(self, permit: Permit, start: float) -> None:
        try:
            core = self._core
            if permit is _CALL and core.quiet and start < core._next_check:
                return  # a success through a quiet breaker changes nothing: no lock
            self.record_success_since(permit, start)
        except Exception as exc:  # noqa: BLE001 - our bug must not lose the caller's result
            report_internal_error("breaker.record_success", exc)
            self.stop_judging()

    def _ended(self, permit: Permit, start: float, exc: BaseException) -> None:
        # Runs while the caller's exception propagates: nothing here may replace it.
        if isinstance(exc, Exception):
            self._failed(permit, self._monotonic() - start, exc)
        else:
            self._release_safely(permit)

    # --- reading and manual control -----------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> CircuitBreakerConfig:
        return self._core.config

    @property
    def judging(self) -> bool:
        """Whether the breaker judges the downstream (``False`` once :meth:`stop_judging`
        ran, until :meth:`reset` or :meth:`force_open`)."""
        return self._core.judging

    @property
    def state(self) -> CircuitState:
        """The current state (an OPEN breaker turns HALF_OPEN on the first call after its
        open duration, not by itself)."""
        return self._core.state

    @property
    def health_score(self) -> int:
        """0-100; see ``BreakerCore.health_score``."""
        now = self._monotonic()
        with self._lock:
            return self._core.health_score(now)

    def snapshot(self) -> BreakerSnapshot:
        """A consistent read of the breaker."""
        now = self._monotonic()
        with self._lock:
            return self._core.snapshot(now)

    def try_snapshot(self) -> BreakerSnapshot | None:
        """:meth:`snapshot`, or ``None`` when the breaker's lock is busy: for gauges, whose
        callbacks run inside the metrics SDK's collection lock. Waiting there on our lock,
        while a fork's preparation holds it, would fork the child with the SDK's lock held
        for ever (its metrics would never export again)."""
        now = self._monotonic()
        lock = self._lock
        if not lock.acquire(blocking=False):
            return None
        try:
            return self._core.snapshot(now)
        finally:
            lock.release()

    def force_open(self) -> Transition | None:
        """Hold the breaker open until ``force_close`` or ``reset``; refusals then carry
        ``retry_after=None``. Returns (and publishes) the transition, if any."""
        now = self._monotonic()
        with self._lock:
            transition = self._core.force_open(now)
        if transition is not None:
            self._publish_transition(transition)
        return transition

    def force_close(self) -> Transition | None:
        """Close the breaker now. Returns (and publishes) the transition, if any."""
        now = self._monotonic()
        with self._lock:
            transition = self._core.force_close(now)
        if transition is not None:
            self._publish_transition(transition)
        return transition

    def reset(self) -> Transition | None:
        """Back to a new breaker's state (closed, empty window, no learned baseline).
        Returns (and publishes) the transition, if any."""
        now = self._monotonic()
        with self._lock:
            transition = self._core.reset(now)
        if transition is not None:
            self._publish_transition(transition)
        return transition

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._name!r}, state={self._core.state.value})"

    # --- internals ----------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        # Probes in flight at the fork run in the parent's other threads: in the child their
        # outcomes never come, and a half-open breaker would refuse every call for ever.
        self._core.forget_probes()
        # Lost connections held unconfirmed were the parent's: a failure of the child's own
        # must not count them.
        self._core.forget_unconfirmed()

    def _record_failure(
        self,
        permit: Permit,
        duration: float,
        category: ErrorCategory,
        now: float | None = None,
        *,
        retry: bool = False,
        live_refusal: bool = False,
        unconfirmed: bool = False,
        opened_at: float | None = None,
    ) -> None:
        if now is None:
            now = self._monotonic()
        with self._lock:
            transition = self._core.on_failure(
                permit,
                now,
                duration,
                category,
                retry=retry,
                live_refusal=live_refusal,
                unconfirmed=unconfirmed,
                opened_at=opened_at,
            )
        if transition is not None:
            self._publish_transition(transition)

    def _failed(self, permit: Permit, duration: float, exc: Exception) -> None:
        # Runs while the caller's exception propagates: nothing here may replace it.
        try:
            live_refusal = unconfirmed = False
            try:
                classification = self._classifier(exc)
                category = classification.category
                live_refusal = getattr(classification, "live_refusal", False) is True
                unconfirmed = getattr(classification, "unconfirmed", False) is True
            except Exception as error:  # noqa: BLE001 - a broken classifier must not hide exc
                report_internal_error("breaker.classify", error)
                category = ErrorCategory.UNKNOWN
            self._record_failure(
                permit, duration, category, live_refusal=live_refusal, unconfirmed=unconfirmed
            )
        except Exception as error:  # noqa: BLE001
            report_internal_error("breaker.record_failure", error)

    def _release_safely(self, permit: Permit) -> None:
        try:
            self.release(permit)
        except Exception as error:  # noqa: BLE001
            report_internal_error("breaker.release", error)

    def _publish_transition(self, transition: Transition) -> None:
        self._publish(
            BreakerTransitioned(
                self._name,
                transition.from_state,
                transition.to_state,
                transition.reason,
                transition.open_for,
            )
        )

    def _publish(self, event: Event) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink.publish(event)
        except Exception as error:  # noqa: BLE001 - a sink must not break a call
            report_internal_error("breaker.publish", error)


class BreakerRegistry:
    """Circuit breakers by name, created on first use and bounded in number.

    ``get`` is one dict lookup once a name exists; creating takes a lock. At most
    ``max_breakers`` (default 1000, an integer >= 1) named breakers are created; after that,
    every new name gets the single shared breaker named ``"other"`` (``OTHER_BREAKER``, with the
    registry's default config), so names of unbounded cardinality (hosts, tenants) cannot grow
    memory or metric series without limit. Existing names keep their own breakers.

    ``config`` is the default config for new breakers; the one given to ``get`` is used only
    when that call creates the breaker (:meth:`forget` one to have the next ``get`` create it
    afresh). ``clock``, ``sink``, ``rnd`` and ``classifier`` are passed to every breaker.
    """

    __slots__ = (
        "__weakref__",
        "_breakers",
        "_classifier",
        "_clock",
        "_config",
        "_lock",
        "_max",
        "_other",
        "_overflow",
        "_rnd",
        "_sink",
    )

    def __init__(
        self,
        *,
        max_breakers: int = 1000,
        config: CircuitBreakerConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        sink: EventSink | None = None,
        rnd: Callable[[], float] = random.random,
        classifier: Classifier | None = None,
    ) -> None:
        if not _is_positive_int(max_breakers):
            raise ConfigError("breaker.max_breakers", max_breakers, "an integer >= 1")
        self._max = max_breakers
        self._config = config if config is not None else _DEFAULT_CONFIG
        self._clock = clock
        self._sink = sink
        self._rnd = rnd
        self._classifier = classifier
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}
        # ``_other``: the shared breaker while the registry is full (the fast path's check);
        # ``_overflow``: the same breaker, kept once made, so that those who hold it stay
        # visible and share it with whoever overflows later, even after room was made.
        self._other: CircuitBreaker | None = None
        self._overflow: CircuitBreaker | None = None
        register_lock(self, "_lock")

    @property
    def max_breakers(self) -> int:
        return self._max

    def set_max_breakers(self, max_breakers: int) -> None:
        """Change the cap (an integer >= 1). Names that have a breaker keep it; with room again,
        new names get breakers of their own rather than the shared ``"other"``."""
        if not _is_positive_int(max_breakers):
            raise ConfigError("breaker.max_breakers", max_breakers, "an integer >= 1")
        with self._lock:
            self._max = max_breakers
            if len(self._breakers) < max_breakers:
                self._other = None

    def get(self, name: str, config: CircuitBreakerConfig | None = None) -> CircuitBreaker:
        """The breaker for ``name``, created with ``config`` (or the default) if new."""
        breaker = self._breakers.get(name)
        if breaker is not None:
            return breaker
        return self._create(name, config)

    def _create(self, name: str, config: CircuitBreakerConfig | None) -> CircuitBreaker:
        # ``_other`` is set only once the registry is full, and only ``forget`` unsets it.
        other = self._other
        if other is not None:
            return other
        if name == OTHER_BREAKER and self._overflow is not None:
            return self._overflow  # a name folded elsewhere (the runtime's services)
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is not None:
                return breaker
            if len(self._breakers) < self._max:
                breaker = self._new(name, config if config is not None else self._config)
                self._breakers[name] = breaker
                return breaker
            other = self._overflow or self._breakers.get(OTHER_BREAKER)
            if other is None:
                other = self._new(OTHER_BREAKER, self._config)
            self._overflow = self._other = other
            return other

    def _new(self, name: str, config: CircuitBreakerConfig) -> CircuitBreaker:
        return CircuitBreaker(
            name,
            config,
            clock=self._clock,
            sink=self._sink,
            rnd=self._rnd,
            classifier=self._classifier,
        )

    def forget(self, breaker: CircuitBreaker) -> bool:
        """Drop ``breaker``, so that the next ``get`` of its name creates a new one with the
        config given then; ``False`` when its name holds another breaker (or none) by now.
        Whoever holds ``breaker`` keeps using it: it is only no longer shared."""
        with self._lock:
            if breaker is self._overflow or self._breakers.get(breaker.name) is not breaker:
                return False
            del self._breakers[breaker.name]
            if len(self._breakers) < self._max:
                self._other = None  # room again: new names get breakers of their own
            return True

    def items(self) -> list[tuple[str, CircuitBreaker]]:
        """Every breaker by name (a copy), the shared ``"other"`` last if it exists. Takes no
        lock (gauges call it; see :meth:`CircuitBreaker.try_snapshot`): copying a dict of
        ``str`` keys runs no Python code, so no other thread can change it half-way."""
        items = list(self._breakers.items())
        other = self._overflow
        if other is not None and OTHER_BREAKER not in self._breakers:
            items.append((OTHER_BREAKER, other))
        return items

    def reset_all(self) -> None:
        """``reset()`` every breaker (each publishes its own transition)."""
        for _, breaker in self.items():
            breaker.reset()

    def __len__(self) -> int:
        return len(self._breakers) + (
            1 if self._overflow is not None and OTHER_BREAKER not in self._breakers else 0
        )
