"""The guard: a breaker check, the call, and on failure classification and the retry loop.

A successful call through a closed breaker costs one breaker ``acquire``, two clock reads, one
``record_success`` (one short lock) and one budget increment: no event, no allocation, no
metric call. Everything else happens on the failure path, where the wrapped call has already
cost far more than our bookkeeping.

What the caller sees is what the call would have done without us, only less often a failure:
the return value is the same object, and when recovery gives up the last exception the
wrapped call raised is raised again, unchanged. A refusal by an open breaker raises
:class:`~otel_raptor.errors.CircuitOpenError` (or calls the fallback). Cancellation,
``KeyboardInterrupt`` and ``SystemExit`` are never retried, never counted as a failure and
never swallowed.

Should our own bookkeeping fail, it is reported once (``otel_raptor`` logger) and the call
proceeds as if the guard were not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import replace
from typing import Any, Protocol, TypeAlias, TypeVar, cast

from otel_raptor.core.breaker import CircuitBreakerConfig, Permit
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.classify import REPEAT_THRESHOLD, ClassifyContext
from otel_raptor.core.events import (
    ErrorClassified,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome, Strategy, default_strategy
from otel_raptor.core.retry import GiveUp, RetryPolicy, adjusted_timeout
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.classifying import classify as default_classify
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import Runtime, get_runtime

__all__ = ["BreakerSpec", "ClassifyFunction", "Guard", "RetrySpec"]

T = TypeVar("T")

#: What ``retry=`` accepts: a policy, the seed's dict shape, a number of retries, or
#: ``False``/``0`` for none. ``None`` means the default policy.
RetrySpec: TypeAlias = RetryPolicy | Mapping[str, Any] | int | bool | None
#: What ``breaker=`` accepts: a config, the seed's dict shape, a breaker, ``True``/``None``
#: (a breaker with the default config, shared by every guard of the service) or ``False``.
BreakerSpec: TypeAlias = CircuitBreakerConfig | Mapping[str, Any] | CircuitBreaker | bool | None


class ClassifyFunction(Protocol):
    def __call__(
        self, exc: BaseException, *, context: ClassifyContext | None = None
    ) -> Classification: ...


_REJECTED = Permit.REJECTED
_CALL = Permit.CALL
_CLOSED = CircuitState.CLOSED
_LEARNED_FUTILE = "learned_futile"
_BREAKER_REJECTED = "breaker_rejected"


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _retry_policy(spec: RetrySpec) -> RetryPolicy:
    if spec is None or spec is True:
        return RetryPolicy()
    if spec is False:
        return RetryPolicy(max_retries=0)
    if isinstance(spec, RetryPolicy):
        return spec
    if isinstance(spec, int):
        return RetryPolicy(max_retries=spec)
    if isinstance(spec, Mapping):
        return RetryPolicy.from_mapping(spec)
    raise ConfigError("retry", spec, "a RetryPolicy, a mapping, an int, a bool or None")


def _breaker(spec: BreakerSpec, service: str, runtime: Runtime) -> CircuitBreaker | None:
    if spec is False:
        return None
    if isinstance(spec, CircuitBreaker):
        return spec
    if spec is None or spec is True:
        return runtime.breakers.get(service)
    if isinstance(spec, CircuitBreakerConfig):
        return runtime.breakers.get(service, spec)
    if isinstance(spec, Mapping):
        return runtime.breakers.get(service, CircuitBreakerConfig.from_mapping(spec))
    raise ConfigError(
        "breaker", spec, "a CircuitBreakerConfig, a mapping, a CircuitBreaker, a bool or None"
    )


class _Recovery:
    """The state of one logical call once it has failed (allocated on the failure path only)."""

    __slots__ = (
        "attempts",
        "classification",
        "fixed_strategy",
        "give_up_reason",
        "outcome",
        "started",
        "strategy",
    )

    def __init__(self, started: float, fixed_strategy: Strategy | None = None) -> None:
        self.started = started
        self.fixed_strategy = fixed_strategy
        self.attempts = 0
        self.classification: Classification | None = None
        self.strategy = Strategy.FAIL_FAST
        self.outcome = Outcome.FAILED
        self.give_up_reason = ""


class Guard:
    """Runs calls to one service with a circuit breaker and a retry policy.

    ``service`` names the downstream: its breaker, retry budget and learned statistics are
    shared by every guard of that name. ``replay_safe`` says whether the guarded operation may
    be repeated without duplicating a side effect; when ``False`` nothing is ever retried
    (the breaker still applies). ``fallback`` is called with the last error when recovery
    gives up or the breaker refuses, and its result is returned instead. ``timeout_kwarg``
    names a keyword argument of the guarded function that takes a timeout in seconds: the
    guard then fills it with the policy's per-attempt timeout (bounded by the deadline) and
    lengthens it on retries after a timeout (the ``timeout_adjust`` strategy).
    ``critical`` raises the severity of this service's failures by one level.
    """

    __slots__ = (
        "_breaker",
        "_budget",
        "_classify",
        "_clock",
        "_critical",
        "_fallback",
        "_monotonic",
        "_policy",
        "_replay_safe",
        "_rnd",
        "_runtime",
        "_timed",
        "_timeout_kwarg",
        "service",
    )

    def __init__(
        self,
        service: str = "default",
        *,
        retry: RetrySpec = None,
        breaker: BreakerSpec = None,
        fallback: Callable[[BaseException], Any] | None = None,
        replay_safe: bool = True,
        timeout_kwarg: str | None = None,
        critical: bool = False,
        runtime: Runtime | None = None,
        classifier: ClassifyFunction | None = None,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        if not _is_name(service):
            raise ConfigError("service", service, "a non-empty string")
        if fallback is not None and not callable(fallback):
            raise ConfigError("fallback", fallback, "a callable taking the error, or None")
        runtime = runtime if runtime is not None else get_runtime()
        self._runtime = runtime
        self.service = runtime.service(service)
        self._policy = _retry_policy(retry)
        self._breaker = _breaker(breaker, self.service, runtime)
        self._timed = self._policy.attempt_timeout is not None or self._policy.deadline is not None
        self._fallback = fallback
        self._replay_safe = bool(replay_safe)
        self._timeout_kwarg = timeout_kwarg
        self._critical = bool(critical)
        self._classify: ClassifyFunction = classifier or default_classify
        self._clock = runtime.clock
        self._monotonic = runtime.clock.monotonic
        self._budget = runtime.budget(self.service)
        self._rnd = rnd

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self._breaker

    # ------------------------------------------------------------------ sync

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` under the guard (sync; see :meth:`call_async`)."""
        breaker = self._breaker
        # Admission through a closed breaker is one attribute read, as in
        # CircuitBreaker.call_sync; anything else goes through acquire().
        if breaker is None or breaker._core._state is _CLOSED:
            permit = _CALL
        else:
            permit = breaker.acquire()
            if permit is _REJECTED:
                return cast("T", self._rejected_sync(breaker))
        if self._timeout_kwarg is not None:
            kwargs = self._attempt_kwargs(None, kwargs)
        self._budget._calls += 1  # RetryBudget.record_call, inlined: the hot path
        start = self._monotonic()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handled below, outside this block
            failure = exc
        else:
            if breaker is not None:
                breaker.record_success_since(permit, start)
            return result
        # Outside the ``except`` block, so that re-raising a later attempt's error does not
        # chain the first one onto it as ``__context__``.
        return self._recover_sync(failure, permit, start, fn, args, kwargs)

    def bind(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` guarded: a function that behaves as ``lambda *a, **k: self.call(fn, *a, **k)``.

        ``@resilient`` uses it: with ``fn`` and the guard's parts bound in a closure, the
        success path saves a call frame and the re-packing of the arguments.
        """
        breaker = self._breaker
        budget = self._budget
        monotonic = self._monotonic
        if self._timeout_kwarg is not None:
            return functools.partial(self.call, fn)  # rare: not worth a second fast path
        recover = self._recover_sync
        rejected = self._rejected_sync

        def guarded(*args: Any, **kwargs: Any) -> T:
            if breaker is None or breaker._core._state is _CLOSED:
                permit = _CALL
            else:
                permit = breaker.acquire()
                if permit is _REJECTED:
                    return rejected(breaker)  # type: ignore[no-any-return]
            budget._calls += 1
            start = monotonic()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handled below, outside this block
                failure = exc
            else:
                if breaker is not None:
                    breaker.record_success_since(permit, start)
                return result
            return recover(failure, permit, start, fn, args, kwargs)

        return guarded

    def _recover_sync(
        self,
        exc: BaseException,
        permit: Permit,
        start: float,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        recovery: _Recovery | None = None,
    ) -> T:
        if recovery is None:
            recovery = _Recovery(start)
        with self._scope(recovery):
            return self._retry_sync(recovery, exc, permit, start, fn, args, kwargs)

    def _retry_sync(
        self,
        recovery: _Recovery,
        exc: BaseException,
        permit: Permit,
        start: float,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        while True:
            delay = self._after_failure(recovery, exc, permit, start)
            if delay is None:
                return cast("T", self._give_up_sync(recovery, exc))
            self._clock.sleep(delay)
            permit = self._acquire_retry(recovery)
            if permit is _REJECTED:
                return cast("T", self._give_up_sync(recovery, exc))
            attempt_kwargs = self._attempt_kwargs(recovery, kwargs)
            start = self._monotonic()
            try:
                result = fn(*args, **attempt_kwargs)
            except BaseException as next_exc:  # noqa: BLE001 - classified on the next turn
                exc = next_exc
                continue
            self._after_success(recovery, permit, start)
            return result

    def _give_up_sync(self, recovery: _Recovery, exc: BaseException) -> Any:
        if self._fallback is not None and isinstance(exc, Exception):
            recovery.strategy = Strategy.FAILOVER
            try:
                value = self._fallback(exc)
            except BaseException:
                self._fallback_failed(recovery)
                raise
            recovery.outcome = Outcome.FALLBACK
            self._finish(recovery)
            return value
        self._finish(recovery)
        raise exc

    def _fallback_failed(self, recovery: _Recovery) -> None:
        """The fallback raised: the call failed after all (its error reaches the caller)."""
        if recovery.outcome is not Outcome.BUDGET_EXHAUSTED:
            recovery.outcome = Outcome.FAILED
        recovery.give_up_reason = "fallback_failed"
        self._finish(recovery)

    def _rejected_sync(self, breaker: CircuitBreaker | None) -> Any:
        error = self._rejection(breaker)
        if self._fallback is None:
            self._report_rejection(Outcome.REJECTED)
            raise error
        try:
            value = self._fallback(error)
        except BaseException:
            self._report_rejection(Outcome.FAILED)
            raise
        self._report_rejection(Outcome.FALLBACK)
        return value

    # ----------------------------------------------------------------- async

    async def call_async(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` under the guard; sleeps never block the loop.

        With a per-attempt timeout in the policy each attempt runs under
        ``asyncio.wait_for``. Cancellation from outside propagates at once.
        """
        breaker = self._breaker
        if breaker is None or breaker._core._state is _CLOSED:
            permit = _CALL
        else:
            permit = breaker.acquire()
            if permit is _REJECTED:
                return cast("T", await self._rejected_async(breaker))
        if self._timeout_kwarg is not None:
            kwargs = self._attempt_kwargs(None, kwargs)
        self._budget._calls += 1
        start = self._monotonic()
        try:
            if self._timed:
                result = await self._attempt_async(None, fn, args, kwargs)
            else:
                result = await fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handled below, outside this block
            failure = exc
        else:
            if breaker is not None:
                breaker.record_success_since(permit, start)
            return result
        return await self._recover_async(failure, permit, start, fn, args, kwargs)

    async def _attempt_async(
        self,
        recovery: _Recovery | None,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        timeout = self._attempt_timeout(recovery)
        if timeout is None:
            return await fn(*args, **kwargs)
        return await asyncio.wait_for(fn(*args, **kwargs), timeout)

    async def _recover_async(
        self,
        exc: BaseException,
        permit: Permit,
        start: float,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        recovery: _Recovery | None = None,
    ) -> T:
        if recovery is None:
            recovery = _Recovery(start)
        with self._scope(recovery):
            return await self._retry_async(recovery, exc, permit, start, fn, args, kwargs)

    async def _retry_async(
        self,
        recovery: _Recovery,
        exc: BaseException,
        permit: Permit,
        start: float,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        while True:
            delay = self._after_failure(recovery, exc, permit, start)
            if delay is None:
                return cast("T", await self._give_up_async(recovery, exc))
            await self._clock.sleep_async(delay)
            permit = self._acquire_retry(recovery)
            if permit is _REJECTED:
                return cast("T", await self._give_up_async(recovery, exc))
            attempt_kwargs = self._attempt_kwargs(recovery, kwargs)
            start = self._monotonic()
            try:
                result = await self._attempt_async(recovery, fn, args, attempt_kwargs)
            except BaseException as next_exc:  # noqa: BLE001 - classified on the next turn
                exc = next_exc
                continue
            self._after_success(recovery, permit, start)
            return result

    async def _give_up_async(self, recovery: _Recovery, exc: BaseException) -> Any:
        if self._fallback is not None and isinstance(exc, Exception):
            recovery.strategy = Strategy.FAILOVER
            try:
                value = await _maybe_await(self._fallback(exc))
            except BaseException:
                self._fallback_failed(recovery)
                raise
            recovery.outcome = Outcome.FALLBACK
            self._finish(recovery)
            return value
        self._finish(recovery)
        raise exc

    async def _rejected_async(self, breaker: CircuitBreaker | None) -> Any:
        error = self._rejection(breaker)
        if self._fallback is None:
            self._report_rejection(Outcome.REJECTED)
            raise error
        try:
            value = await _maybe_await(self._fallback(error))
        except BaseException:
            self._report_rejection(Outcome.FAILED)
            raise
        self._report_rejection(Outcome.FALLBACK)
        return value

    # ------------------------------------------------- shared failure path

    def _scope(self, recovery: _Recovery) -> ContextManager[None]:
        """The telemetry scope of this recovery; a failing scope is reported and skipped."""
        try:
            return _SafeScope(self._runtime.recovery_scope(self.service, recovery.started))
        except Exception as bug:  # noqa: BLE001 - telemetry must not break the call
            report_internal_error("guard.recovery_scope", bug)
            return contextlib.nullcontext()

    def _after_failure(
        self, recovery: _Recovery, exc: BaseException, permit: Permit, start: float
    ) -> float | None:
        """Book a failed attempt; the delay before the next one, or ``None`` to give up."""
        recovery.attempts += 1
        if not isinstance(exc, Exception):
            # Cancellation, KeyboardInterrupt, SystemExit: not the downstream's fault, and
            # never ours to retry or swallow.
            self._release(permit)
            recovery.strategy, recovery.outcome = Strategy.FAIL_FAST, Outcome.FAILED
            recovery.give_up_reason = "cancelled"
            recovery.classification = None
            return None
        try:
            return self._plan_retry(recovery, exc, permit, start)
        except Exception as bug:  # noqa: BLE001 - our bug must not change the app's error
            report_internal_error("guard.after_failure", bug)
            recovery.give_up_reason = "internal_error"
            return None

    def _plan_retry(
        self, recovery: _Recovery, exc: Exception, permit: Permit, start: float
    ) -> float | None:
        now = self._monotonic()
        breaker = self._breaker
        context = ClassifyContext(
            service=self.service,
            critical=self._critical,
            breaker_open=breaker is not None and breaker.state is not CircuitState.CLOSED,
        )
        classification = self._classify(exc, context=context)
        recent = self._runtime.note_failure(self.service, classification.category.value)
        if recent >= REPEAT_THRESHOLD:  # repeated failures are worse: classify with the count
            context = replace(context, recent_occurrences=recent)
            classification = self._classify(exc, context=context)
        recovery.classification = classification
        if breaker is not None:
            breaker.record_failure(permit, now - start, classification)
        bus = self._runtime.bus
        bus.publish(ErrorClassified(self.service, classification, recovery.attempts, exc))
        category = classification.category.value
        strategy = recovery.fixed_strategy or default_strategy(
            category, retryable=classification.retryable
        )
        recovery.strategy = strategy
        decision = self._policy.decide(
            attempt=recovery.attempts,
            elapsed=now - recovery.started,
            classification=classification,
            replay_safe=self._replay_safe,
            rnd=self._rnd,
        )
        if isinstance(decision, GiveUp):
            recovery.give_up_reason = decision.reason.value
            if recovery.attempts == 1 and recovery.fixed_strategy is None:
                recovery.strategy = Strategy.FAIL_FAST
            return None
        runtime = self._runtime
        if not runtime.should_retry(self.service, category, strategy):
            recovery.give_up_reason = _LEARNED_FUTILE
            return None
        if not runtime.withdraw_retry(self.service):
            recovery.outcome = Outcome.BUDGET_EXHAUSTED
            recovery.give_up_reason = "budget_exhausted"
            bus.publish(RetryBudgetExhausted(self.service, classification))
            return None
        bus.publish(
            RetryScheduled(
                self.service, recovery.attempts, decision.delay, classification, strategy
            )
        )
        return decision.delay

    def _acquire_retry(self, recovery: _Recovery) -> Permit:
        breaker = self._breaker
        if breaker is None:
            return Permit.CALL
        permit = breaker.acquire()
        if permit is _REJECTED:
            # The breaker opened while we were retrying: stop, and surface the app's own
            # last error rather than our refusal.
            recovery.outcome = Outcome.REJECTED
            recovery.give_up_reason = _BREAKER_REJECTED
            breaker.reject_error()  # publishes CallRejected
        return permit

    def _after_success(self, recovery: _Recovery, permit: Permit, start: float) -> None:
        try:
            if self._breaker is not None:
                self._breaker.record_success_since(permit, start)
            recovery.attempts += 1
            recovery.outcome = Outcome.RECOVERED
            recovery.give_up_reason = ""
            self._finish(recovery)
        except Exception as bug:  # noqa: BLE001 - never change a successful result
            report_internal_error("guard.after_success", bug)

    def _finish(self, recovery: _Recovery) -> None:
        try:
            classification = recovery.classification
            if classification is None:
                return  # cancelled: the call was abandoned, not failed
            category = classification.category.value
            if recovery.attempts > 1 and recovery.outcome in (Outcome.RECOVERED, Outcome.FAILED):
                self._runtime.record_outcome(
                    self.service,
                    category,
                    recovery.strategy,
                    recovered=recovery.outcome is Outcome.RECOVERED,
                )
            self._runtime.bus.publish(
                RecoveryFinished(
                    service=self.service,
                    strategy=recovery.strategy,
                    outcome=recovery.outcome,
                    attempts=recovery.attempts,
                    duration_s=self._monotonic() - recovery.started,
                    category=category,
                    give_up_reason=recovery.give_up_reason,
                )
            )
        except Exception as bug:  # noqa: BLE001 - reporting must not change the outcome
            report_internal_error("guard.finish", bug)

    def _rejection(self, breaker: CircuitBreaker | None) -> BaseException:
        """The refusal to raise (building it publishes ``CallRejected``)."""
        assert breaker is not None  # only a breaker can reject
        return breaker.reject_error()

    def _report_rejection(self, outcome: Outcome) -> None:
        """Publish how a call refused by the breaker ended, once its fallback (if any) ran."""
        try:
            self._runtime.bus.publish(
                RecoveryFinished(
                    service=self.service,
                    strategy=Strategy.FAILOVER if self._fallback else Strategy.FAIL_FAST,
                    outcome=outcome,
                    attempts=0,
                    duration_s=0.0,
                    category=ErrorCategory.UNAVAILABLE.value,
                    give_up_reason=_BREAKER_REJECTED if outcome is not Outcome.FALLBACK else "",
                )
            )
        except Exception as bug:  # noqa: BLE001
            report_internal_error("guard.rejection", bug)

    def _release(self, permit: Permit) -> None:
        if self._breaker is not None:
            try:
                self._breaker.release(permit)
            except Exception as bug:  # noqa: BLE001
                report_internal_error("guard.release", bug)

    # -------------------------------------------------------------- timeouts

    def _attempt_timeout(self, recovery: _Recovery | None) -> float | None:
        policy = self._policy
        elapsed = 0.0 if recovery is None else self._monotonic() - recovery.started
        attempt = 1 if recovery is None else recovery.attempts + 1
        timeout = policy.timeout_for_attempt(attempt, elapsed)
        if (
            timeout is not None
            and recovery is not None
            and recovery.strategy is Strategy.TIMEOUT_ADJUST
            and policy.attempt_timeout is not None
        ):
            remaining = None if policy.deadline is None else policy.deadline - elapsed
            timeout = adjusted_timeout(policy.attempt_timeout, recovery.attempts, cap=remaining)
        return timeout

    def _attempt_kwargs(self, recovery: _Recovery | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        key = self._timeout_kwarg
        if key is None:
            return kwargs
        if recovery is None and key in kwargs:
            return kwargs  # the caller chose the first attempt's timeout
        if recovery is not None and recovery.strategy is Strategy.TIMEOUT_ADJUST:
            base = kwargs.get(key) or self._policy.attempt_timeout
            if isinstance(base, (int, float)) and base > 0:
                elapsed = self._monotonic() - recovery.started
                deadline = self._policy.deadline
                cap = None if deadline is None else max(0.001, deadline - elapsed)
                return {**kwargs, key: adjusted_timeout(float(base), recovery.attempts, cap=cap)}
            return kwargs
        if key in kwargs:
            return kwargs
        timeout = self._attempt_timeout(recovery)
        return kwargs if timeout is None else {**kwargs, key: timeout}


class _SafeScope:
    """Enters and exits a telemetry scope without letting its errors reach the caller."""

    __slots__ = ("_inner",)

    def __init__(self, inner: ContextManager[None]) -> None:
        self._inner = inner

    def __enter__(self) -> None:
        try:
            self._inner.__enter__()
        except Exception as bug:  # noqa: BLE001
            report_internal_error("guard.recovery_scope.enter", bug)
            self._inner = contextlib.nullcontext()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._inner.__exit__(*exc_info)  # type: ignore[arg-type]  # re-raised by the with
        except Exception as bug:  # noqa: BLE001
            report_internal_error("guard.recovery_scope.exit", bug)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value
