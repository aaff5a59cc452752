"""The recovery engine: given an error that already happened, choose a strategy and run it.

``handle_error(error, context)`` classifies ``error``, picks a strategy and runs it:

====================== =====================================================================
strategy               what it does
====================== =====================================================================
rate_limit_backoff     retry ``retry_func`` after backoff, never before ``Retry-After``
retry_with_backoff     retry ``retry_func`` with exponential backoff and full jitter
timeout_adjust         retry with a longer timeout (``retry_func`` must take ``timeout=``;
                       otherwise it is a plain retry)
reconnect              call ``reconnect_func`` (if given) before each retry
auth_refresh           call the service's registered refresher, then retry once
failover               return ``fallback_func(error)`` (or ``fallback_func()``)
fail_fast              give the error back at once
====================== =====================================================================

The strategy follows the category (:func:`otel_raptor.core.recovery.default_strategy`); then the
learner may swap a specialised retry for a plain one that has recovered better on this service,
tries the other one when the chosen one has proved futile (so that it can earn a record at
all), and skips retries altogether for a (service, category) where both have stopped
recovering, but for its probes (see :mod:`otel_raptor.core.learning`). When retries give up,
are futile or impossible, a ``fallback_func`` turns the result into a failover.

Context keys (the seed's, plus a few): ``service_name`` (str, default ``"default"``),
``max_retries`` (int >= 0), ``retry_func`` (zero-argument callable, sync or async),
``fallback_func`` (callable taking the error, or no argument), ``reconnect_func``,
``auth_refresh_func``, ``timeout`` (seconds, the base for ``timeout_adjust``), ``idempotent``
(bool, default ``True``: passing ``retry_func`` is the opt-in to repeat it) and ``critical``.
Other keys are ignored, so a context can carry the caller's own data.
"""

from __future__ import annotations

import inspect
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from otel_raptor.core.attempts import AttemptLoop, LoopSpec
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.classification import Classification
from otel_raptor.core.classify import ClassifyContext
from otel_raptor.core.recovery import Strategy, default_strategy
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.classifying import classify as default_classify
from otel_raptor.runtime.downstream import ClassifyFunction, Route
from otel_raptor.runtime.drive import (
    CallHooks,
    CallPlan,
    TimeoutKwargHooks,
    is_async_callable,
    recover_async,
    recover_sync,
)
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.guard import _is_name, _shared
from otel_raptor.runtime.state import Runtime, get_runtime

__all__ = [
    "ErrorRecoveryEngine",
    "RecoveryResult",
    "ResilientClient",
    "get_production_error_recovery",
    "get_resilient_client",
]

_RETRY_FAMILY = frozenset(
    {
        Strategy.RATE_LIMIT_BACKOFF,
        Strategy.RETRY_WITH_BACKOFF,
        Strategy.TIMEOUT_ADJUST,
        Strategy.RECONNECT,
    }
)


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    """How ``handle_error`` ended.

    ``attempts`` counts every attempt, the original failure included (a failure recovered by
    the first retry reports 2). ``value`` is what the retry or fallback returned;
    ``error`` the last error when ``success`` is false.
    """

    success: bool
    strategy: Strategy
    attempts: int
    duration_s: float
    classification: Classification
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    service: str
    classification: Classification
    strategy: Strategy
    retry_func: Callable[..., Any] | None
    fallback: Callable[[BaseException], Any] | None
    refresher: Callable[[], Any] | None
    reconnect: Callable[[], Any] | None
    policy: RetryPolicy
    timeout: float | None
    replay_safe: bool
    critical: bool


#: Services an engine keeps an auth refresher for, by the name the app registered (not
#: folded past ``max_services``: a folded service still finds its own refresher).
MAX_AUTH_REFRESHERS: Final = 4096


class ErrorRecoveryEngine:
    """Recovers from errors that already happened; see the module docstring."""

    def __init__(
        self,
        *,
        policy: RetryPolicy | Mapping[str, Any] | None = None,
        runtime: Runtime | None = None,
        classifier: ClassifyFunction | None = None,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        if isinstance(policy, Mapping):
            policy = RetryPolicy.from_mapping(policy)
        elif policy is not None and not isinstance(policy, RetryPolicy):
            raise ConfigError("policy", policy, "a RetryPolicy, a mapping of its fields, or None")
        if runtime is not None and not isinstance(runtime, Runtime):
            raise ConfigError("runtime", runtime, "a Runtime, or None (the process's)")
        if classifier is not None and not callable(classifier):
            raise ConfigError("classifier", classifier, "a callable taking the error, or None")
        if not callable(rnd):
            raise ConfigError("rnd", rnd, "a callable returning a float in [0, 1)")
        self.policy = policy if policy is not None else RetryPolicy()
        self._runtime = runtime if runtime is not None else get_runtime()
        self._classify: ClassifyFunction = classifier or default_classify
        self._rnd = rnd
        self._refreshers: dict[str, Callable[[], Any]] = {}

    def register_auth_refresher(self, service: str, refresher: Callable[[], Any]) -> None:
        """Make ``refresher`` (sync or async) renew ``service``'s credentials on a 401."""
        if not _is_name(service):
            raise ConfigError("service", service, "a non-empty string")
        if not callable(refresher):
            raise ConfigError("auth_refresher", refresher, "a callable taking no argument")
        if service not in self._refreshers and len(self._refreshers) >= MAX_AUTH_REFRESHERS:
            raise ConfigError(
                "service",
                service,
                f"one of at most {MAX_AUTH_REFRESHERS} services with an auth refresher "
                "(replace a refresher by registering its service again)",
            )
        self._refreshers[service] = refresher

    async def handle_error(
        self, error: BaseException, context: Mapping[str, Any] | None = None
    ) -> RecoveryResult:
        """Recover from ``error``; awaits async callables, sleeps without blocking the loop."""
        if not isinstance(error, Exception):
            raise error  # cancellation is never recovered from, nor swallowed
        plan = self._plan(error, context, is_async=True)
        run = self._run(plan, is_async=True)
        try:
            value = await recover_async(
                run.call_plan,
                error,
                run.started,
                _as_async(run.fn),
                (),
                run.kwargs,
                observe=run.observe,
            )
        except Exception as last:  # noqa: BLE001 - the result carries it
            return run.result(error=last)
        return run.result(value=value)

    def handle_error_sync(
        self, error: BaseException, context: Mapping[str, Any] | None = None
    ) -> RecoveryResult:
        """The synchronous twin of :meth:`handle_error` (callables must be sync)."""
        if not isinstance(error, Exception):
            raise error
        plan = self._plan(error, context, is_async=False)
        run = self._run(plan, is_async=False)
        try:
            value = recover_sync(
                run.call_plan, error, run.started, run.fn, (), run.kwargs, observe=run.observe
            )
        except Exception as last:  # noqa: BLE001 - the result carries it
            return run.result(error=last)
        return run.result(value=value)

    # ------------------------------------------------------------------ plan

    def _plan(
        self, error: Exception, context: Mapping[str, Any] | None, *, is_async: bool
    ) -> _Plan:
        ctx = dict(context or {})
        name = _str(ctx, "service_name", "default")
        service = self._runtime.service(name)  # ``other`` past ``max_services``
        critical = _bool(ctx, "critical", False)
        retry_func = _callable(ctx, "retry_func", is_async=is_async)
        fallback = _fallback(_callable(ctx, "fallback_func", is_async=is_async))
        reconnect = _callable(ctx, "reconnect_func", is_async=is_async)
        refresher = _callable(ctx, "auth_refresh_func", is_async=is_async)
        if refresher is None:
            # By the name it was registered under: a folded name must still find its own
            # refresher (and never another folded service's).
            refresher = self._refreshers.get(name)
            if refresher is not None and not is_async and is_async_callable(refresher):
                raise ConfigError(
                    "auth_refresher", refresher, "a plain function for handle_error_sync"
                )
        policy = self.policy
        if "max_retries" in ctx:
            max_retries = ctx["max_retries"]
            if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
                raise ConfigError("context.max_retries", max_retries, "an integer >= 0")
            policy = replace(policy, max_retries=max_retries)
        timeout = ctx.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise ConfigError("context.timeout", timeout, "a number of seconds > 0, or None")
        classification = self._classify(
            error, context=ClassifyContext(service=service, critical=critical)
        )
        category = classification.category.value
        strategy = default_strategy(category, retryable=classification.retryable)
        if strategy in _RETRY_FAMILY:
            if retry_func is None or policy.max_retries == 0:
                strategy = Strategy.FAIL_FAST
            else:
                candidates: tuple[Strategy, ...] = (strategy,)
                if strategy is not Strategy.RETRY_WITH_BACKOFF:
                    candidates = (strategy, Strategy.RETRY_WITH_BACKOFF)
                strategy = self._learned_strategy(service, category, candidates)
        elif strategy is Strategy.AUTH_REFRESH and (refresher is None or retry_func is None):
            strategy = Strategy.FAIL_FAST
        if strategy is Strategy.FAIL_FAST and fallback is not None:
            strategy = Strategy.FAILOVER
        return _Plan(
            service=service,
            classification=classification,
            strategy=strategy,
            retry_func=retry_func,
            fallback=fallback,
            refresher=refresher,
            reconnect=reconnect,
            policy=policy,
            timeout=float(timeout) if timeout is not None else None,
            replay_safe=_bool(ctx, "idempotent", True),
            critical=critical,
        )

    def _learned_strategy(
        self, service: str, category: str, candidates: tuple[Strategy, ...]
    ) -> Strategy:
        """The candidate that has recovered best here, unless the learner has found it futile;
        then the next candidate it has not (so an alternative gets tried at all, and its
        record can make it the best), and ``fail_fast`` when every one is. The learner is
        asked once per candidate and call: its answer may be the probe it grants now and then
        to a futile one, which the attempt loop does not ask for again."""
        runtime = self._runtime
        best = runtime.best_strategy(service, category, candidates)
        for strategy in (best, *(c for c in candidates if c is not best)):
            if runtime.should_retry(service, category, strategy):
                return strategy
        return Strategy.FAIL_FAST

    def _run(self, plan: _Plan, *, is_async: bool) -> _Run:
        """How the plan's strategy runs on the attempt loop: every strategy is a loop whose
        first attempt (``error``) already failed.

        Retries run ``retry_func`` (after ``reconnect_func``, for ``reconnect``; with a
        lengthening ``timeout=`` for ``timeout_adjust`` when it takes one). ``auth_refresh`` is
        one retry, after the refresher, of a failure that is not retryable as it stands.
        ``failover`` and ``fail_fast`` make no attempt: the loop gives up at once, to the
        fallback or with the error.
        """
        strategy = plan.strategy
        policy = plan.policy
        fn: Callable[..., Any] = _raise_again
        kwargs: dict[str, Any] = {}
        hooks = CallHooks()
        if strategy in _RETRY_FAMILY:
            fn = plan.retry_func or _raise_again
            if strategy is Strategy.TIMEOUT_ADJUST and _takes_timeout(fn):
                base = plan.timeout or policy.attempt_timeout or 30.0
                policy = replace(policy, attempt_timeout=base)
                hooks = TimeoutKwargHooks("timeout")
                kwargs["timeout"] = base
            if strategy is Strategy.RECONNECT and plan.reconnect is not None:
                fn = _reconnect_then(plan.reconnect, fn, is_async=is_async)
        elif strategy is Strategy.AUTH_REFRESH:
            assert plan.refresher is not None
            assert plan.retry_func is not None
            fn = _reconnect_then(plan.refresher, plan.retry_func, is_async=is_async)
            policy = replace(policy, max_retries=1, base_delay=0.0, max_delay=0.0, jitter="none")
        else:
            policy = RetryPolicy.NONE
        route = Route(
            self._runtime.downstream(plan.service),
            None,
            self._runtime,
            self._classify,
            critical=plan.critical,
        )
        spec = LoopSpec.of(
            policy,
            replay_safe=plan.replay_safe,
            has_fallback=plan.fallback is not None,
            fixed_strategy=strategy,
            learner_asked=strategy in _RETRY_FAMILY,  # _learned_strategy asked for these
            force_retryable=strategy is Strategy.AUTH_REFRESH,
        )
        call_plan = CallPlan(
            route,
            spec,
            runtime=self._runtime,
            clock=self._runtime.clock,
            hooks=hooks,
            fallback=plan.fallback,
            rnd=self._rnd,
        )
        return _Run(plan, call_plan, fn, kwargs, self._runtime.clock.monotonic())


class _Run:
    """One ``handle_error``: the plan, the loop's plan, and what the loop reported."""

    __slots__ = ("call_plan", "fn", "kwargs", "loop", "plan", "started")

    def __init__(
        self,
        plan: _Plan,
        call_plan: CallPlan,
        fn: Callable[..., Any],
        kwargs: dict[str, Any],
        started: float,
    ) -> None:
        self.plan = plan
        self.call_plan = call_plan
        self.fn = fn
        self.kwargs = kwargs
        self.started = started
        self.loop: AttemptLoop | None = None

    def observe(self, loop: AttemptLoop) -> None:
        self.loop = loop

    def result(self, *, value: Any = None, error: BaseException | None = None) -> RecoveryResult:
        loop = self.loop
        plan = self.plan
        clock = self.call_plan.clock
        return RecoveryResult(
            success=error is None,
            strategy=loop.strategy if loop is not None else plan.strategy,
            attempts=loop.attempts if loop is not None else 1,
            duration_s=clock.monotonic() - self.started,
            classification=(
                loop.classification
                if loop is not None and loop.classification is not None
                else plan.classification
            ),
            value=value,
            error=error,
        )


class ResilientClient:
    """Named circuit breakers for code that calls its dependencies by hand.

    ``add_circuit_breaker(name, config)`` returns a breaker with ``await breaker.call(fn, ...)``
    and ``breaker.call_sync(fn, ...)``; adding a name twice returns the existing breaker
    (its config must match). Names past the runtime's ``max_services`` share its ``other``
    breaker and are kept (and listed) only as ``other``.
    """

    def __init__(self, runtime: Runtime | None = None) -> None:
        if runtime is not None and not isinstance(runtime, Runtime):
            raise ConfigError("runtime", runtime, "a Runtime, or None (the process's)")
        self._runtime = runtime if runtime is not None else get_runtime()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        register_lock(self, "_lock")

    def add_circuit_breaker(
        self, name: str, config: CircuitBreakerConfig | Mapping[str, Any] | None = None
    ) -> CircuitBreaker:
        if not _is_name(name):
            raise ConfigError("name", name, "a non-empty string")
        if isinstance(config, Mapping):
            config = CircuitBreakerConfig.from_mapping(config)
        with self._lock:
            existing = self._breakers.get(name)
            if existing is not None:
                if config is not None and config != existing.config:
                    raise ConfigError(
                        f"circuit_breakers.{name}", config, "the config it was first added with"
                    )
                return existing
            breaker = self._runtime.breakers.get(name, config)
            if config is not None:
                # The runtime's breaker of that name may exist already (a guard's, an
                # integration's, another client's): its config would be kept without a word.
                _shared(breaker, config, name)
            # A name folded into the runtime's shared breaker (past ``max_services``) is not
            # kept: names made per call would grow this map for ever. It is listed as ``other``.
            self._breakers[breaker.name] = breaker
            return breaker

    def get_circuit_breaker(self, name: str) -> CircuitBreaker | None:
        return self._breakers.get(name)

    @property
    def circuit_breakers(self) -> dict[str, CircuitBreaker]:
        return dict(self._breakers)


_singletons = LockBox()
_engine: ErrorRecoveryEngine | None = None
_client: ResilientClient | None = None


def get_production_error_recovery() -> ErrorRecoveryEngine:
    """The process-wide recovery engine, with the default policy."""
    global _engine  # noqa: PLW0603 - a lazily created process-wide singleton
    with _singletons.lock:
        if _engine is None:
            _engine = ErrorRecoveryEngine()
        return _engine


def get_resilient_client() -> ResilientClient:
    """The process-wide :class:`ResilientClient`."""
    global _client  # noqa: PLW0603 - a lazily created process-wide singleton
    with _singletons.lock:
        if _client is None:
            _client = ResilientClient()
        return _client


# --------------------------------------------------------------------- helpers


def _str(ctx: Mapping[str, Any], key: str, default: str) -> str:
    value = ctx.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"context.{key}", value, "a non-empty string")
    return value


def _bool(ctx: Mapping[str, Any], key: str, default: bool) -> bool:
    value = ctx.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"context.{key}", value, "True or False")
    return value


def _callable(ctx: Mapping[str, Any], key: str, *, is_async: bool) -> Callable[..., Any] | None:
    value = ctx.get(key)
    if value is not None and not callable(value):
        raise ConfigError(f"context.{key}", value, "a callable or None")
    if value is not None and not is_async and is_async_callable(value):
        # handle_error_sync cannot await it: its coroutine would be taken for a result.
        raise ConfigError(
            f"context.{key}", value, "a plain function for handle_error_sync (use handle_error)"
        )
    return value


def _fallback(func: Callable[..., Any] | None) -> Callable[[BaseException], Any] | None:
    """Accept the seed's zero-argument fallbacks as well as ones that take the error."""
    if func is None:
        return None
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature (some builtins): assume it takes the error
        return func
    try:
        signature.bind(None)
    except TypeError:
        try:
            signature.bind()
        except TypeError:
            # Called with neither, it would fail with a TypeError of its own in place of the
            # error being recovered from.
            raise ConfigError(
                "context.fallback_func", func, "a callable taking the error, or no argument"
            ) from None
        return lambda _error: func()
    return func


def _takes_timeout(func: Callable[..., Any] | None) -> bool:
    if func is None:
        return False
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "timeout" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _raise_again(*args: Any, **kwargs: Any) -> Any:
    """The attempt function of strategies that make no attempt (never called)."""
    raise RuntimeError("a strategy without attempts made one")


def _reconnect_then(
    first: Callable[[], Any], then: Callable[..., Any], *, is_async: bool
) -> Callable[..., Any]:
    """``first()`` (reconnect, refresh credentials), then ``then(...)``: each attempt."""
    if is_async:

        async def both_async(*args: Any, **kwargs: Any) -> Any:
            await _maybe_await(first())
            return await _maybe_await(then(*args, **kwargs))

        return both_async

    def both(*args: Any, **kwargs: Any) -> Any:
        first()
        return then(*args, **kwargs)

    return both


def _as_async(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        return await _maybe_await(func(*args, **kwargs))

    return call


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
