"""The two drivers of the attempt loop, one sync and one async, and what they share.

:func:`run_sync` and :func:`run_async` are every guarded call's entry: ``@resilient``,
``Guard.call``/``call_async`` and every integration (the recovery engine enters through
:func:`recover_sync`/:func:`recover_async`, after its first attempt already failed;
``CircuitBreaker.call_sync``/``call`` are one attempt through a breaker, without the loop).
Each first tries the **fast path**, inline: the breaker is closed and the downstream is not
cooling down, so the call runs once, its success is recorded (one short lock, or none while
the breaker is quiet) and its result is returned unchanged. No event, no metric, no
allocation of ours.

Anything else (the first attempt failed, the breaker is not closed, a cooldown is running)
goes to the pure :class:`~otel_raptor.core.attempts.AttemptLoop`, which says what to do next;
the driver's loop does it. What an integration adds (a result that is a failure, what to hand
back on giving up, its refusal type, how to apply a timeout, how to release a failing result
before a resend) comes from :class:`CallHooks`: the integration kit's seam.

Our own bugs never reach the caller: if the loop or a hook fails, that is reported once
(``report_internal_error``) and the call ends as it would have without us: the last error is
raised, the last result returned, or (before any attempt) the call simply runs. A bug met
recording a success (on either path) also makes the call's breaker stop judging
(:meth:`~otel_raptor.runtime.breaker.CircuitBreaker.stop_judging`): counting failures without
the successes between them, it would open on a downstream that answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any, Final, Protocol

from otel_raptor.core.attempts import AttemptLoop, LoopSpec, Refusal, RefusalKind, Step
from otel_raptor.core.breaker import BreakerCore, Permit
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import CircuitOpenError, ThrottledError
from otel_raptor.runtime.clock import Clock
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.safety import report_internal_error

__all__ = [
    "CALL_PERMIT",
    "CLOSED",
    "NO_RESULT",
    "CallHooks",
    "CallPlan",
    "Fallback",
    "FallbackDeclined",
    "ScopeFactory",
    "TimeoutKwargHooks",
    "count_success",
    "current_attempt",
    "current_resend",
    "is_async_callable",
    "recover_async",
    "recover_sync",
    "resume_async",
    "resume_sync",
    "run_async",
    "run_sync",
    "warn_async_fallback",
]

#: A fallback: given the last error (or the refusal), what the caller gets instead. It may
#: return an awaitable in async calls.
Fallback = Callable[[BaseException], Any]


class FallbackDeclined(Exception):
    """Raised by a fallback that has nothing to offer for this call (no cached response, no
    failover that answered): the call then ends as it would have without a fallback, and is
    reported so (not as a fallback).

    ``answer``, when given, takes the place of the call's last error or refusal as what the
    caller gets (handed to the hooks' ``give_up`` like a last error): what a downstream the
    fallback reached answered (a failover URL that an unsafe request may have reached, whose
    answer is truer than the primary's "never sent" refusal).
    """

    def __init__(self, answer: Exception | None = None) -> None:
        super().__init__()
        self.answer = answer


class ScopeFactory(Protocol):
    """Opens the telemetry scope of one recovering call (``Runtime.recovery_scope``)."""

    def __call__(self, service: str, started: float) -> AbstractContextManager[None]: ...


class _Scopes(Protocol):
    @property
    def recovery_scope(self) -> ScopeFactory: ...


_CALL: Final = Permit.CALL
_CLOSED: Final = CircuitState.CLOSED
_ATTEMPT: Final = Step.ATTEMPT
_SLEEP: Final = Step.SLEEP
_FALLBACK: Final = Step.FALLBACK
_GIVE_UP: Final = Step.GIVE_UP
_REFUSE: Final = Step.REFUSE
_DONE: Final = Step.DONE

#: No result: the first attempt raised.
_NO_RESULT: Final = object()

#: What an integration with its own copy of :func:`run_sync`'s fast path needs to make one
#: (one place where a function call per request was a measurable share of the overhead:
#: httpx's ``Client.send``): the "no result" marker :func:`resume_sync` takes when the first
#: attempt raised, the breaker's closed state, and the permit a fast-path success records.
NO_RESULT: Final = _NO_RESULT
CLOSED: Final = _CLOSED
CALL_PERMIT: Final = _CALL

# The attempt in flight in this context, and which resend of a request it is: set by the
# slow path only (a retry), so a first attempt costs nothing. The resend ordinal is set only by
# calls whose hooks send requests (:attr:`CallHooks.resends_requests`), and is 0 in a retry of
# anything else: the HTTP calls a retried function makes are not resends of a request.
_ATTEMPT_IN_FLIGHT: ContextVar[tuple[int, int]] = ContextVar("otel_raptor_attempt", default=(1, 0))


def current_attempt() -> int:
    """The number of the attempt in flight in this context: 1 outside a retry, 2 during the
    first retry, and so on."""
    return _ATTEMPT_IN_FLIGHT.get()[0]


def current_resend() -> int:
    """The ordinal of the request resend in flight in this context (1 = its first retry), or
    0: telemetry's ``http.request.resend_count``. Only a retry of a call whose hooks send a
    request (an HTTP integration's) counts; a retry of a guarded function that makes HTTP
    calls does not make them resends."""
    return _ATTEMPT_IN_FLIGHT.get()[1]


# Async fallback functions already reported for a sync call (by name and service): each is
# reported once. Bounded, since the names come from the application.
_MAX_WARNED: Final = 256
_warned: set[str] = set()
_warned_box = LockBox()
_logger = logging.getLogger("otel_raptor")


def _callable_name(function: object) -> str:
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


def warn_async_fallback(function: object, service: str) -> None:
    """Say once per function and service that an async fallback function was passed over on
    a sync call (a fallback may serve sync and async calls alike: it is no mistake in the
    configuration, but a sync call cannot await it). Never raises."""
    try:
        name = _callable_name(function)
        key = f"{name} {service}"
        with _warned_box.lock:
            if key in _warned:
                return
            if len(_warned) >= _MAX_WARNED:
                _warned.clear()
            _warned.add(key)
        _logger.warning(
            "otel_raptor: the fallback %s of %s is an async function, so it serves async "
            "calls only; sync calls to %s end as they would without a fallback",
            name,
            service,
            service,
        )
    except Exception as bug:  # noqa: BLE001 - a warning is not worth breaking the call
        report_internal_error("drive.async_fallback_warning", bug)


def is_async_callable(func: object) -> bool:
    """Whether calling ``func`` gives a coroutine (an ``async def``, or an object whose
    ``__call__`` is one), as far as can be told without calling it."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an object whose __call__ is async
    )


class CallHooks:
    """What differs between kinds of call (the integration kit's seam).

    The defaults fit a plain function: results never fail, giving up raises the last error,
    a refusal is a :class:`~otel_raptor.errors.CircuitOpenError` or
    :class:`~otel_raptor.errors.ThrottledError`, and attempt timeouts are not applied (the
    async driver applies them, with ``asyncio.timeout`` (``asyncio.wait_for`` before 3.11), when
    ``applies_timeouts`` is false).
    Subclasses override what their library needs; every hook runs on the slow path only,
    except :attr:`failure_of`.
    """

    __slots__ = ()

    #: ``result -> failure or None``: a result that counts as a failure (an HTTP 503) comes
    #: back wrapped in an exception that :meth:`give_up` turns back into the result. ``None``
    #: (the default): results never fail, and the fast path checks nothing.
    failure_of: Callable[[Any], Exception | None] | None = None

    #: ``(failure, args) -> bool``: whether a failure of the call (made with positional
    #: arguments ``args``) happened at another downstream than the call's own, such as an
    #: HTTP redirect hop to another origin. It is classified and retried as usual, but it
    #: counts toward no breaker (as a live refusal does): the call's own downstream answered.
    #: Failure path only; ``None`` (the default): every failure is the call's downstream's.
    elsewhere: Callable[[BaseException, tuple[Any, ...]], bool] | None = None

    #: Whether :meth:`attempt_kwargs` applies the attempt timeout itself.
    applies_timeouts: bool = False

    #: ``(failure, classification) -> classification``: what the integration knows about a
    #: failure better than the classifier can (asyncpg's own statement timeout arrives as a
    #: bare ``TimeoutError``). Failure path only; ``None`` (the default): as classified.
    refine: Callable[[BaseException, Classification], Classification] | None = None

    #: Whether the async driver may bound an attempt (``asyncio.timeout``) when the hooks
    #: do not apply the timeout themselves. ``False`` for calls whose library has timeouts of
    #: its own that mean something (a database's statement timeout): cutting those calls off
    #: from outside would cancel a blocking command the caller asked to wait, and do so only
    #: for async callers, since nothing can do the same to a sync call.
    wait_for_attempts: bool = True

    #: ``(timeout_error, args) -> error``: what an attempt of the call (made with positional
    #: arguments ``args``) that the async driver cut off at its attempt timeout raises instead
    #: of the cut-off's ``TimeoutError``: the library's own timeout, so that its
    #: ``except`` clauses keep working. Only the driver's own cut-off is converted, never a
    #: ``TimeoutError`` the call raised itself. ``None`` (the default): the ``TimeoutError``.
    timed_out: Callable[[BaseException, tuple[Any, ...]], BaseException] | None = None

    #: Whether an attempt after the first is a resend of a request (``http.request.resend_count``
    #: on the client spans started during it): HTTP integrations' hooks say so.
    resends_requests: bool = False

    #: ``(failure, args) -> bool``: whether a failure of the call (made with positional
    #: arguments ``args``) is no verdict on the downstream nor on the call, such as a client
    #: connection pool refusing to hand out a connection. The call then ends at once, as a
    #: cancelled one does (nothing counted, retried or published; a probe's slot given back),
    #: and the failure is raised unchanged. It runs first on every failure, so it may also
    #: mark the failure for :attr:`replay_after`. Failure path only; ``None`` (the default):
    #: every failure is judged.
    unjudged: Callable[[Exception, tuple[Any, ...]], bool] | None = None

    #: ``(args, kwargs) -> bool``: whether a call (made with positional arguments ``args``
    #: and keyword arguments ``kwargs``, which it must not change) that meets
    #: a breaker that is not closed runs as it would without raptor, neither refused nor
    #: admitted as a probe, and with nothing counted, retried or published: a call that waits
    #: as long as its caller asked (a Redis ``BLPOP``) would hold a half-open breaker's probe
    #: slot for that long, refusing every other call meanwhile. Asked only off the fast path
    #: (an open or half-open breaker, a cooldown), and before the first attempt of an async
    #: call whose attempts the driver bounds (``wait_for``): an unguarded call is not cut off
    #: at the attempt timeout either. ``None`` (the default): never.
    unguarded: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None

    #: Whether a sync call of this kind made on an event loop's thread sleeps there (its
    #: backoff, a ``Retry-After``). ``True`` for what the app guards itself (``Guard.call``,
    #: ``@resilient``: its own choice of a sync call); integrations, which hook library calls
    #: the app never asked to wait, say ``False``: the call then ends unslept (see
    #: :meth:`~otel_raptor.core.attempts.AttemptLoop.cannot_wait`), since a sleep would stall
    #: every task of the loop.
    sleeps_on_event_loop: bool = True

    #: ``(failure, classification, args) -> bool``: whether the call (made with positional
    #: arguments ``args``) may be sent again after *this* failure, for integrations whose
    #: replay safety depends on how far the call got (a database statement the server rolled
    #: back may be replayed, one whose outcome is unknown may not). It can only narrow the
    #: plan's replay safety and runs on the failure path only. ``None`` (the default): the
    #: plan's replay safety holds for every failure.
    replay_after: Callable[[BaseException, Classification, tuple[Any, ...]], bool] | None = None

    #: ``(failure, args) -> seconds or None``: when (the runtime clock's monotonic seconds)
    #: the connection a call (made with positional arguments ``args``) ran on was opened, if
    #: known (``failure``: for a driver whose arguments do not lead to the connection, its
    #: traceback may). Asked only for an *unconfirmed* failure (a lost connection) or a
    #: ``connection`` one, whose classification then carries it as ``opened_at``: a
    #: connection the server ended before it could idle confirms the outage, and a failure
    #: counted on a connection just opened takes back its connect's success (a proxy
    #: answered it; see ``otel_raptor.core.breaker``).
    #: Failure path only; ``None`` (the default): never known.
    opened: Callable[[BaseException, tuple[Any, ...]], float | None] | None = None

    def give_up(self, failure: BaseException) -> Any:
        """What the caller gets when recovery ends with ``failure``: it is raised."""
        raise failure

    def refusal(self, refusal: Refusal) -> BaseException:
        """The exception for a call refused without an attempt."""
        return _plain_refusal(refusal)

    def attempt_kwargs(
        self, kwargs: dict[str, Any], timeout: float | None, attempt: int
    ) -> dict[str, Any]:
        """The keyword arguments of attempt number ``attempt`` (1 = the first), whose
        timeout is ``timeout`` seconds (``None``: none)."""
        return kwargs

    def discard(self, failure: BaseException) -> Awaitable[None] | None:
        """Release what a failed attempt left (an open response) before the next one; may
        return an awaitable, which the async driver awaits."""
        return None


class TimeoutKwargHooks(CallHooks):
    """Plain functions that take their timeout as a keyword argument ``key``: each attempt
    gets the loop's timeout there. The caller's own value wins on the first attempt; on
    retries the loop's (which ``timeout_adjust`` lengthens after timeouts) wins when there is
    one."""

    __slots__ = ("key",)

    applies_timeouts = True

    def __init__(self, key: str) -> None:
        self.key = key

    def attempt_kwargs(
        self, kwargs: dict[str, Any], timeout: float | None, attempt: int
    ) -> dict[str, Any]:
        if timeout is None or (attempt == 1 and self.key in kwargs):
            return kwargs
        return {**kwargs, self.key: timeout}


_PLAIN: Final = CallHooks()


class CallPlan:
    """How one kind of call is guarded: its route, loop spec, hooks and fallback. Built once
    (per guard, per integration policy) and shared by every call of that kind.

    ``runtime`` supplies the telemetry scope (read at each use, so a sink installed later is
    seen); ``clock`` the time and the sleeps; ``rnd`` the jitter.
    """

    __slots__ = (
        "_scopes",
        "breaker",
        "budget",
        "clock",
        "core",
        "downstream",
        "failure_of",
        "fallback",
        "first_kwargs",
        "hooks",
        "monotonic",
        "rnd",
        "route",
        "spec",
        "wait_for",
    )

    def __init__(
        self,
        route: Route,
        spec: LoopSpec,
        *,
        runtime: _Scopes,
        clock: Clock,
        hooks: CallHooks = _PLAIN,
        fallback: Fallback | None = None,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self.route = route
        # Read on every call: cached here (none of them is ever replaced).
        self.downstream = route.downstream
        self.budget = route.downstream.budget
        self.breaker = route.breaker
        self.core = None if route.breaker is None else route.breaker._core
        self.spec = spec
        self.hooks = hooks
        self.fallback = fallback
        self.clock = clock
        self.monotonic = clock.monotonic
        self.rnd = rnd
        self._scopes = runtime
        self.failure_of = hooks.failure_of
        timed = spec.first_timeout is not None
        #: Whether the first attempt's kwargs need the hooks (a timeout to apply).
        self.first_kwargs = timed and hooks.applies_timeouts
        #: Whether the async driver bounds each attempt (``asyncio.timeout``; see ``_within``).
        self.wait_for = timed and not hooks.applies_timeouts and hooks.wait_for_attempts

    def scope(self, started: float) -> AbstractContextManager[None]:
        """The telemetry scope of a call that started recovering (never raises)."""
        try:
            return _SafeScope(self._scopes.recovery_scope(self.route.service, started))
        except Exception as bug:  # noqa: BLE001 - telemetry must not break the call
            report_internal_error("drive.recovery_scope", bug)
            return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the drivers


def run_sync(
    plan: CallPlan,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    fallback: Fallback | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` under ``plan`` (see the module docstring). ``fallback``
    overrides the plan's for this call."""
    core = plan.core
    start = plan.monotonic()
    if (core is None or core._state is _CLOSED) and start >= plan.downstream.cooldown_until:
        # The fast path, inlined (this is every successful call's whole cost).
        call_kwargs = _first_kwargs(plan, kwargs) if plan.first_kwargs else kwargs
        try:
            result = fn(*args, **call_kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below
            failure: BaseException | None = exc
            result = _NO_RESULT
        else:
            failure_of = plan.failure_of
            failure = None
            if failure_of is not None:
                try:
                    failure = failure_of(result)
                except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                    report_internal_error("drive.failure_of", bug)
            if failure is None:
                try:
                    plan.budget._calls += 1  # RetryBudget.record_call, inlined
                    if core is not None and not (core.quiet and start < core._next_check):
                        plan.breaker.record_success_since(_CALL, start)  # type: ignore[union-attr]
                except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                    report_internal_error("drive.record_success", bug)
                    if core is not None:  # it would count failures only: see stop_judging
                        plan.breaker.stop_judging()  # type: ignore[union-attr]
                return result
        # Outside the ``except`` block, so that re-raising a later attempt's error does not
        # chain this one onto it as its ``__context__``.
        return resume_sync(plan, fn, args, kwargs, start, failure, result, fallback)
    runner = _new_runner(plan, fallback, start, args, kwargs)
    if runner is None:
        return fn(*args, **kwargs)  # as without us
    return _drive_sync(runner, fn, args, kwargs)


def count_success(plan: CallPlan, core: BreakerCore | None, start: float, where: str) -> None:
    """Count the success of a call admitted on an integration's copy of the fast path (a
    *fast lane*: see ``DbTarget``), started at ``start`` with ``core`` the breaker's state
    read then, as :func:`run_sync`'s fast path does. Never raises: our bug is reported as
    ``where`` and the breaker stops judging (it would count failures only)."""
    try:
        plan.budget._calls += 1  # RetryBudget.record_call, inlined
        if core is not None and not (core.quiet and start < core._next_check):
            plan.breaker.record_success_since(_CALL, start)  # type: ignore[union-attr]
    except Exception as bug:  # noqa: BLE001 - never lose the caller's result
        report_internal_error(where, bug)
        if core is not None:
            plan.breaker.stop_judging()  # type: ignore[union-attr]


def resume_sync(
    plan: CallPlan,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    start: float,
    failure: BaseException | None,
    result: Any = NO_RESULT,
    fallback: Fallback | None = None,
) -> Any:
    """The loop, after a first attempt made on the fast path (started at ``start``) failed
    with ``failure``: an exception, or ``result``, a result that ``failure_of`` made a
    failure of. For :func:`run_sync` and for an integration's own copy of its fast path (see
    :data:`NO_RESULT`); the next attempts call ``fn(*args, **kwargs)``."""
    runner = _new_runner(plan, fallback, start, args, kwargs, failure, result=result)
    if runner is None:
        return _without_us(failure, result)
    return _drive_sync(runner, fn, args, kwargs)


async def run_async(
    plan: CallPlan,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    fallback: Fallback | None = None,
) -> Any:
    """:func:`run_sync` for coroutine functions: sleeps never block the loop, and attempt
    timeouts the hooks do not apply are applied with ``asyncio.timeout``. Cancellation from
    outside propagates at once and is never counted as a failure."""
    core = plan.core
    start = plan.monotonic()
    if (core is None or core._state is _CLOSED) and start >= plan.downstream.cooldown_until:
        # The fast path, inlined as in run_sync (a frame per helper was a fifth of its cost).
        try:
            if plan.first_kwargs or plan.wait_for:
                result = await _first_attempt(plan, fn, args, kwargs)
            else:
                result = await fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure: BaseException | None = exc
            result = _NO_RESULT
        else:
            failure_of = plan.failure_of
            failure = None
            if failure_of is not None:
                try:
                    failure = failure_of(result)
                except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                    report_internal_error("drive.failure_of", bug)
            if failure is None:
                try:
                    plan.budget._calls += 1  # RetryBudget.record_call, inlined
                    if core is not None and not (core.quiet and start < core._next_check):
                        plan.breaker.record_success_since(_CALL, start)  # type: ignore[union-attr]
                except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                    report_internal_error("drive.record_success", bug)
                    if core is not None:  # it would count failures only: see stop_judging
                        plan.breaker.stop_judging()  # type: ignore[union-attr]
                return result
        return await resume_async(plan, fn, args, kwargs, start, failure, result, fallback)
    runner = _new_runner(plan, fallback, start, args, kwargs)
    if runner is None:
        return await fn(*args, **kwargs)  # as without us
    return await _drive_async(runner, fn, args, kwargs)


async def resume_async(
    plan: CallPlan,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    start: float,
    failure: BaseException | None,
    result: Any = NO_RESULT,
    fallback: Fallback | None = None,
) -> Any:
    """:func:`resume_sync` for coroutine functions: the loop after a first attempt made on
    :func:`run_async`'s fast path (or an integration's inlined copy of it) failed."""
    runner = _new_runner(plan, fallback, start, args, kwargs, failure, result=result)
    if runner is None:
        return _without_us(failure, result)
    return await _drive_async(runner, fn, args, kwargs)


def recover_sync(
    plan: CallPlan,
    error: BaseException,
    started: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    observe: Callable[[AttemptLoop], None] | None = None,
) -> Any:
    """Recover from ``error``, the failure of a first attempt that ran outside any guard and
    started at ``started`` (the recovery engine): retry ``fn`` as the plan says.
    ``observe`` is handed the loop when the call ends (attempts, strategy, outcome)."""
    runner = _new_runner(plan, None, started, args, kwargs or {}, error, observe)
    if runner is None:
        raise error
    return _drive_sync(runner, fn, args, kwargs or {})


async def recover_async(
    plan: CallPlan,
    error: BaseException,
    started: float,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    observe: Callable[[AttemptLoop], None] | None = None,
) -> Any:
    """:func:`recover_sync` for coroutine functions."""
    runner = _new_runner(plan, None, started, args, kwargs or {}, error, observe)
    if runner is None:
        raise error
    return await _drive_async(runner, fn, args, kwargs or {})


def _new_runner(
    plan: CallPlan,
    fallback: Fallback | None,
    started: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    failure: BaseException | None = None,
    observe: Callable[[AttemptLoop], None] | None = None,
    result: Any = _NO_RESULT,
) -> _Runner | None:
    """A :class:`_Runner`, or ``None`` (our bug, reported): the call then ends as without us."""
    try:
        return _Runner(plan, fallback, started, args, kwargs, failure, observe, result)
    except Exception as bug:  # noqa: BLE001 - never break the caller's call
        report_internal_error("drive.runner", bug)
        return None


def _without_us(failure: BaseException | None, result: Any) -> Any:
    """How a first attempt that ended with ``failure`` ends without us: its failing result
    (which ``failure_of`` wrapped in ``failure``) is returned, its exception raised."""
    if result is not _NO_RESULT or failure is None:
        return result
    raise failure


def _first_kwargs(plan: CallPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The first attempt's keyword arguments, with its timeout applied by the hooks; as the
    caller gave them if the hooks fail (our bug must not stop the call)."""
    try:
        return plan.hooks.attempt_kwargs(kwargs, plan.spec.first_timeout, 1)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("drive.attempt_kwargs", bug)
        return kwargs


def _first_attempt(
    plan: CallPlan, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: Any
) -> Awaitable[Any]:
    """The fast path's attempt, bounded by the first attempt's timeout when the hooks do not
    apply it themselves, unless the hooks say the call is unguarded (it runs as without us,
    as it does through a breaker that is not closed: an app served in the process)."""
    if plan.first_kwargs:
        kwargs = _first_kwargs(plan, kwargs)
    if plan.wait_for and not _is_unguarded(plan.hooks, args, kwargs):
        return _within(fn(*args, **kwargs), plan.spec.first_timeout, plan.hooks, args)
    return fn(*args, **kwargs)


def _is_unguarded(hooks: CallHooks, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """The hooks' ``unguarded(args, kwargs)``; ``False`` (guarded, as without the hook) when
    there is none or it fails (our bug, reported)."""
    unguarded = hooks.unguarded
    if unguarded is None:
        return False
    try:
        return bool(unguarded(args, kwargs))
    except Exception as bug:  # noqa: BLE001 - guarded, as without the hook
        report_internal_error("drive.unguarded", bug)
        return False


#: ``asyncio.timeout`` (Python 3.11+), or ``None``.
_timeout: Callable[[float | None], Any] | None = getattr(asyncio, "timeout", None)


async def _within(
    awaitable: Awaitable[Any], timeout: float | None, hooks: CallHooks, args: tuple[Any, ...]
) -> Any:
    """``awaitable`` cut off after ``timeout`` seconds; the cut-off, and only the cut-off,
    raises the hooks' ``timed_out`` error.

    ``asyncio.timeout`` where there is one (3.11+) and a task to cancel: the attempt runs in
    the caller's task, as it would without us. ``asyncio.wait_for`` on 3.11 runs it in a task
    of its own and, when the caller is cancelled just as that task finishes, returns its
    result and drops the cancellation (CPython gh-86296): a worker loop of guarded calls would
    then never stop on ``task.cancel()``."""
    raised_itself = False

    async def attempt() -> Any:
        nonlocal raised_itself
        try:
            return await awaitable
        except TimeoutError:
            raised_itself = True
            raise

    try:
        if _timeout is None or asyncio.current_task() is None:
            return await asyncio.wait_for(attempt(), timeout)
        async with _timeout(timeout):
            try:
                return await awaitable
            except TimeoutError:
                raised_itself = True
                raise
    except TimeoutError as error:
        convert = hooks.timed_out
        if raised_itself or convert is None:
            raise
        try:
            replacement = convert(error, args)
        except Exception as bug:  # noqa: BLE001 - keep the TimeoutError
            report_internal_error("drive.timed_out", bug)
            replacement = error
        if replacement is error:
            raise
        raise replacement from error


def _on_event_loop() -> bool:
    """Whether an asyncio event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _drive_sync(
    runner: _Runner,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    step = runner.step
    try:
        while True:
            if step is _ATTEMPT:
                runner.discard()
                try:
                    result = fn(*args, **runner.attempt_kwargs(kwargs))
                except BaseException as exc:  # noqa: BLE001 - the loop decides
                    step = runner.on_error(exc)
                else:
                    step = runner.on_result(result)
            elif step is _SLEEP:
                if not runner.plan.hooks.sleeps_on_event_loop and _on_event_loop():
                    # A library call hooked on a loop's thread: sleeping here would stall
                    # every task of the loop (for a Retry-After, seconds). It ends unslept.
                    step = runner.cannot_wait()
                    continue
                try:
                    runner.plan.clock.sleep(runner.loop.delay)
                except BaseException:
                    runner.discard()  # interrupted: the failing result will never be resent
                    raise
                step = runner.slept()
            elif step is _DONE:
                return runner.result
            elif step is _FALLBACK:
                return runner.fallback_sync()
            elif step is _REFUSE:
                step = runner.refuse()
            else:
                return runner.finish()
    finally:
        runner.close()


async def _drive_async(
    runner: _Runner,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    step = runner.step
    try:
        while True:
            if step is _ATTEMPT:
                try:
                    # Inside the try: cancelled while releasing the last failing result, the
                    # attempt ends unmade, and a probe slot it was admitted with is given back.
                    await runner.discard_async()
                    result = await runner.timed(fn(*args, **runner.attempt_kwargs(kwargs)))
                except BaseException as exc:  # noqa: BLE001 - the loop decides
                    step = runner.on_error(exc)
                else:
                    step = runner.on_result(result)
            elif step is _SLEEP:
                try:
                    await runner.plan.clock.sleep_async(runner.loop.delay)
                except BaseException:
                    # Cancelled mid-backoff: release the failing response (its pooled
                    # connection) that the next attempt would have released.
                    await runner.discard_async()
                    raise
                step = runner.slept()
            elif step is _DONE:
                return runner.result
            elif step is _FALLBACK:
                return await runner.fallback_async()
            elif step is _REFUSE:
                step = runner.refuse()
            else:
                return runner.finish()
    finally:
        runner.close()


# ------------------------------------------------------------------- what both drivers share


class _Runner:
    """One slow-path call: the loop, the last failure or result, the telemetry scope. Every
    call into the loop or the hooks is guarded: on our bug the runner turns *passive* and the
    call ends as it would have without us."""

    __slots__ = (
        "_args",
        "_attempt_token",
        "_fallback",
        "_kwargs",
        "_made",
        "_no_verdict",
        "_observe",
        "_passive",
        "_refused",
        "_scope",
        "failure",
        "loop",
        "plan",
        "result",
        "step",
    )

    def __init__(
        self,
        plan: CallPlan,
        fallback: Fallback | None,
        started: float,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failure: BaseException | None = None,
        observe: Callable[[AttemptLoop], None] | None = None,
        result: Any = _NO_RESULT,
    ) -> None:
        """A slow-path call with positional arguments ``args`` and keyword arguments
        ``kwargs`` (read by the hooks' ``unguarded`` only) that started at ``started``:
        its first attempt (made on the fast path) ended with ``failure``, or (``None``) it has
        not been admitted yet; ``result``, when that failure is a failing result the hooks'
        ``failure_of`` wrapped, is that result. ``step`` is what the driver does first."""
        self.plan = plan
        self._observe = observe
        self._args = args
        self._kwargs = kwargs
        self.loop = AttemptLoop(plan.spec, plan.route, started=started, rnd=plan.rnd)
        self._fallback = fallback if fallback is not None else plan.fallback
        self._passive = False
        self._scope: AbstractContextManager[None] | None = None
        self._attempt_token: Any = None
        self._no_verdict: BaseException | None = None
        self._refused: BaseException | None = None
        self.failure: BaseException | None = None
        made = result is not _NO_RESULT
        self.result: Any = result if made else None
        #: The failure ``failure_of`` made of ``result`` (the call's last outcome was a result).
        self._made: BaseException | None = failure if made else None
        self.step = self.admit(started) if failure is None else self.first_failed(failure, started)

    # --- entering the loop ----------------------------------------------------------------------

    def admit(self, now: float) -> Step:
        if _is_unguarded(self.plan.hooks, self._args, self._kwargs):
            self._passive = True
            return _ATTEMPT
        try:
            return self.loop.admit(now)
        except Exception as bug:  # noqa: BLE001
            return self._bug("drive.admit", bug, _ATTEMPT)

    def first_failed(self, failure: BaseException | None, started: float) -> Step:
        """The first attempt (admitted on the fast path, so with a plain CALL permit), which
        started at ``started``, ended with ``failure``."""
        self.failure = failure
        if not isinstance(failure, Exception) or self._unjudged(failure):
            return _GIVE_UP  # cancellation and friends (or None): never ours to count or retry
        self._open_scope()
        try:
            classification = self._classify(failure)
            return self.loop.first_failed(
                _CALL,
                started,
                classification,
                self.plan.monotonic(),
                error=failure,
                replay_safe=self._replay_after(failure, classification),
            )
        except Exception as bug:  # noqa: BLE001
            return self._bug("drive.failed", bug, _GIVE_UP)

    # --- an attempt -----------------------------------------------------------------------------

    def attempt_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        loop = self.loop
        attempt = loop.attempts + 1
        if attempt > 1:
            resend = attempt - 1 if self.plan.hooks.resends_requests else 0
            self._attempt_token = _ATTEMPT_IN_FLIGHT.set((attempt, resend))
        if self._passive:
            return kwargs
        try:
            return self.plan.hooks.attempt_kwargs(kwargs, loop.timeout, attempt)
        except Exception as bug:  # noqa: BLE001
            self._bug("drive.attempt_kwargs", bug, _ATTEMPT)
            return kwargs

    def timed(self, awaitable: Awaitable[Any]) -> Awaitable[Any]:
        timeout = self.loop.timeout
        if timeout is None or not self.plan.wait_for or self._passive:
            return awaitable
        return _within(awaitable, timeout, self.plan.hooks, self._args)

    def on_error(self, exc: BaseException) -> Step:
        self._end_attempt()
        self.failure = exc
        if self._passive:
            return _GIVE_UP
        if not isinstance(exc, Exception) or self._unjudged(exc):
            try:
                return self.loop.cancelled()
            except Exception as bug:  # noqa: BLE001
                return self._bug("drive.cancelled", bug, _GIVE_UP)
        return self._failed(exc)

    def on_result(self, result: Any) -> Step:
        self._end_attempt()
        self.result = result
        if self._passive:
            return _DONE
        failure_of = self.plan.failure_of
        try:
            failure = None if failure_of is None else failure_of(result)
        except Exception as bug:  # noqa: BLE001
            return self._bug("drive.failure_of", bug, _DONE)
        if failure is not None:
            self.failure = self._made = failure
            return self._failed(failure)
        try:
            return self.loop.succeeded(self.plan.monotonic())
        except Exception as bug:  # noqa: BLE001 - never change a successful result
            step = self._bug("drive.succeeded", bug, _DONE)
            # Whether the breaker saw this success is unknown: one that misses successes
            # while it counts failures opens on a downstream that answers (rule 0).
            breaker = self.plan.breaker
            if breaker is not None:
                breaker.stop_judging()
            return step

    def slept(self) -> Step:
        if self._passive:
            return _ATTEMPT if self.failure is None else _GIVE_UP
        try:
            return self.loop.slept(self.plan.monotonic())
        except Exception as bug:  # noqa: BLE001
            return self._bug("drive.slept", bug, _ATTEMPT if self.failure is None else _GIVE_UP)

    def cannot_wait(self) -> Step:
        unslept = _ATTEMPT if self.failure is None else _GIVE_UP
        if self._passive:
            return unslept
        try:
            return self.loop.cannot_wait(self.plan.monotonic())
        except Exception as bug:  # noqa: BLE001
            return self._bug("drive.cannot_wait", bug, unslept)

    def discard(self) -> None:
        failure = self.failure
        if failure is None or self._passive:
            return
        try:
            self.plan.hooks.discard(failure)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.discard", bug)

    async def discard_async(self) -> None:
        failure = self.failure
        if failure is None or self._passive:
            return
        try:
            pending = self.plan.hooks.discard(failure)
            if pending is not None:
                await pending
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.discard", bug)

    # --- the end ----------------------------------------------------------------------------------

    def finish(self) -> Any:
        """GIVE_UP or REFUSE: raise the last error, hand back the last failing result, or
        raise the refusal."""
        failure = self.failure
        if failure is None:
            refusal = self.loop.refusal
            if refusal is not None and not self._passive:
                refused = self._refused
                raise refused if refused is not None else self._refusal_error(refusal)
            return self.result
        if not isinstance(failure, Exception) or failure is self._no_verdict:
            if failure is self._made:
                return self.result  # a failing result nobody judged: as without us
            raise failure
        # Passive too: a failing result (an HTTP 503) is wrapped in an exception of ours,
        # and the hooks give back what the call would have ended with without us.
        try:
            return self.plan.hooks.give_up(failure)
        except Exception as raised:  # the hook's own answer (the failure), or our bug
            if raised is failure:
                raise
            report_internal_error("drive.give_up", raised)
        # Outside the ``except`` block: the caller's error keeps its own context.
        if failure is self._made:
            return self.result  # the failing result itself, as without us
        raise failure

    def refuse(self) -> Step:
        """REFUSE: a call refused before any attempt ends with the hooks' refusal error (the
        library's fail-fast error), built here. Should building it fail (our bug, reported),
        the call runs once, as without us."""
        refusal = self.loop.refusal
        if self.failure is not None or refusal is None or self._passive:
            return _GIVE_UP  # a later attempt refused: the last failure is the answer
        try:
            self._refused = self.plan.hooks.refusal(refusal)
        except Exception as bug:  # noqa: BLE001 - the call runs, as without us
            return self._bug("drive.refusal", bug, _ATTEMPT)
        return _GIVE_UP

    def fallback_sync(self) -> Any:
        fallback = self._fallback
        error = self._fallback_error()
        if fallback is None:
            return self._no_fallback()
        answer: Exception | None = None
        try:
            value = fallback(error)
        except FallbackDeclined as declined:
            answer = declined.answer
        except Exception as failure:  # not BaseException: a cancelled call has no verdict
            _chain(failure, error)
            self._fallback_finished(ok=False)
            raise
        else:
            if not inspect.iscoroutine(value):
                self._fallback_finished(ok=True)
                return value
            # An async fallback on a sync call: its coroutine would reach the caller as the
            # result, never run. Guard(fallback=) serves call() and call_async() alike, so
            # this is found out only here, and the call ends as it would without it.
            value.close()
            warn_async_fallback(fallback, self.plan.route.service)
        # Outside the ``except`` block: the error the caller gets keeps its own context.
        return self._declined(answer)

    async def fallback_async(self) -> Any:
        fallback = self._fallback
        error = self._fallback_error()
        if fallback is None:
            return self._no_fallback()
        try:
            value = fallback(error)
            # Any awaitable, not only coroutines and futures: ``lambda e: session.get(url)``
            # (aiohttp) returns one that is neither, and the caller awaits our call, not it.
            if inspect.isawaitable(value):
                value = await value
        except FallbackDeclined as declined:
            answer = declined.answer
        except Exception as failure:  # not BaseException: a cancelled call has no verdict
            _chain(failure, error)
            self._fallback_finished(ok=False)
            raise
        else:
            self._fallback_finished(ok=True)
            return value
        return self._declined(answer)  # outside the ``except`` block, as in fallback_sync

    def close(self) -> None:
        self._end_attempt()
        if self._passive:
            # The loop was told nothing since our bug: a probe slot it holds is never freed
            # otherwise, and a half-open breaker would refuse every call for ever.
            try:
                self.loop.abandon()
            except Exception as bug:  # noqa: BLE001
                report_internal_error("drive.abandon", bug)
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.__exit__(None, None, None)
        if self._observe is not None:
            self._observe(self.loop)

    # --- internals --------------------------------------------------------------------------------

    def _failed(self, failure: Exception) -> Step:
        self._open_scope()
        try:
            classification = self._classify(failure)
            return self.loop.failed(
                classification,
                self.plan.monotonic(),
                error=failure,
                replay_safe=self._replay_after(failure, classification),
            )
        except Exception as bug:  # noqa: BLE001 - our bug must not change the app's error
            return self._bug("drive.failed", bug, _GIVE_UP)

    def _unjudged(self, failure: Exception) -> bool:
        judge = self.plan.hooks.unjudged
        if judge is None:
            return False
        try:
            unjudged = judge(failure, self._args)
        except Exception as bug:  # noqa: BLE001 - judged, as without the hook
            report_internal_error("drive.unjudged", bug)
            return False
        if unjudged:
            self._no_verdict = failure
        return unjudged

    def _classify(self, failure: BaseException) -> Classification:
        classification = self.plan.route.classify(failure)
        hooks = self.plan.hooks
        if hooks.refine is not None:
            classification = hooks.refine(failure, classification)
        elsewhere = hooks.elsewhere
        if (
            elsewhere is not None
            and not classification.live_refusal
            and elsewhere(failure, self._args)
        ):
            classification = dataclasses.replace(classification, live_refusal=True)
        opened = hooks.opened
        if opened is not None and (
            classification.unconfirmed or classification.category is ErrorCategory.CONNECTION
        ):
            try:
                opened_at = opened(failure, self._args)
            except Exception as bug:  # noqa: BLE001 - unknown, as without the hook
                report_internal_error("drive.opened", bug)
                opened_at = None
            if opened_at is not None:
                classification = dataclasses.replace(classification, opened_at=opened_at)
        return classification

    def _replay_after(self, failure: BaseException, classification: Classification) -> bool | None:
        judge = self.plan.hooks.replay_after
        if judge is None or not self.plan.spec.replay_safe:
            return None
        return judge(failure, classification, self._args)

    def _no_fallback(self) -> Any:
        # A plan that promised a fallback, called without one: our bug, not the caller's.
        report_internal_error("drive.no_fallback", RuntimeError("a fallback plan without one"))
        return self._declined()

    def _declined(self, answer: Exception | None = None) -> Any:
        try:
            self.loop.fallback_declined(self.plan.monotonic())
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.fallback_declined", bug)
        if answer is not None and not self._passive:
            self.failure = answer
        return self.finish()

    def _fallback_error(self) -> BaseException:
        failure = self.failure
        if failure is not None:
            return failure
        refusal = self.loop.refusal
        assert refusal is not None  # FALLBACK comes after a failure or a refusal
        return self._refusal_error(refusal)

    def _refusal_error(self, refusal: Refusal) -> BaseException:
        try:
            return self.plan.hooks.refusal(refusal)
        except Exception as bug:  # noqa: BLE001 - keep the plain refusal
            report_internal_error("drive.refusal", bug)
            return _plain_refusal(refusal)

    def _fallback_finished(self, *, ok: bool) -> None:
        try:
            self.loop.fallback_finished(ok=ok, now=self.plan.monotonic())
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.fallback_finished", bug)

    def _open_scope(self) -> None:
        if self._scope is None and not self._passive:
            scope = self.plan.scope(self.loop.started)
            scope.__enter__()
            self._scope = scope

    def _end_attempt(self) -> None:
        token, self._attempt_token = self._attempt_token, None
        if token is not None:
            _ATTEMPT_IN_FLIGHT.reset(token)

    def _bug(self, where: str, bug: Exception, step: Step) -> Step:
        report_internal_error(where, bug)
        self._passive = True
        return step


def _plain_refusal(refusal: Refusal) -> BaseException:
    """Raptor's own exception for ``refusal`` (the default hooks')."""
    if refusal.kind is RefusalKind.THROTTLED:
        return ThrottledError(refusal.name, refusal.retry_after)
    return CircuitOpenError(refusal.name, refusal.retry_after)


def _chain(failure: BaseException, error: BaseException) -> None:
    """Show ``error`` as the context of the fallback's ``failure``, as ``except: fallback()``
    would have (the fallback runs outside the ``except`` block, so Python does not); never
    makes a cycle, never replaces a context the failure has."""
    if failure is error or failure.__context__ is not None:
        return
    seen = error
    for _ in range(64):  # a bounded walk: a chain can be long, or (badly made) cyclic
        if seen is failure:
            return
        if seen.__context__ is None:
            failure.__context__ = error
            return
        seen = seen.__context__


class _SafeScope:
    """Enters and exits a telemetry scope without letting its errors reach the caller."""

    __slots__ = ("_inner",)

    def __init__(self, inner: AbstractContextManager[None]) -> None:
        self._inner = inner

    def __enter__(self) -> None:
        try:
            self._inner.__enter__()
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.recovery_scope.enter", bug)
            self._inner = contextlib.nullcontext()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._inner.__exit__(*exc_info)  # type: ignore[arg-type]  # re-raised by the caller
        except Exception as bug:  # noqa: BLE001
            report_internal_error("drive.recovery_scope.exit", bug)
