"""The guard: one downstream's breaker, retry policy and fallback around a function.

``Guard.call``, ``call_async`` and ``bind`` (which ``@resilient`` uses) all run the same
attempt loop through the two drivers of :mod:`otel_raptor.runtime.drive`: a successful call
through a closed breaker costs one clock read, one lock-free state check and, unless the
breaker is quiet (``BreakerCore.quiet``), one short lock to record the success; no event, no
allocation, no metric call. Everything else happens on the failure path, where the wrapped
call has already cost far more than our bookkeeping.

What the caller sees is what the call would have done without us, only less often a failure:
the return value is the same object, and when recovery gives up the last exception the
wrapped call raised is raised again, unchanged. A refusal by an open breaker raises
:class:`~otel_raptor.errors.CircuitOpenError` (or calls the fallback); a call that would have
to wait out a downstream's ``Retry-After`` cooldown for longer than its policy allows
(``max_retry_after``, else the larger of ``max_delay`` and 5 s, and the deadline) raises
:class:`~otel_raptor.errors.ThrottledError`. Cancellation, ``KeyboardInterrupt`` and
``SystemExit`` are never retried, never counted as a failure and never swallowed.

Should our own bookkeeping fail, it is reported once (``otel_raptor`` logger) and the call
proceeds as if the guard were not there.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields
from inspect import CO_COROUTINE, CO_ITERABLE_COROUTINE
from typing import Any, TypeAlias, TypeVar

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.breaker import CircuitBreakerConfig
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
    run_async,
    run_sync,
)
from otel_raptor.runtime.health import HealthCheck
from otel_raptor.runtime.state import OTHER_SERVICE, Runtime, get_runtime

__all__ = ["BreakerSpec", "ClassifyFunction", "Guard", "RetrySpec"]

_logger = logging.getLogger("otel_raptor")

T = TypeVar("T")
# ``async def`` functions, and generator-based coroutines (``@types.coroutine``).
_COROUTINE_FLAGS = CO_COROUTINE | CO_ITERABLE_COROUTINE

#: What ``retry=`` accepts: a policy, the seed's dict shape, a number of retries, or
#: ``False``/``0`` for none. ``None`` means the default policy.
RetrySpec: TypeAlias = RetryPolicy | Mapping[str, Any] | int | bool | None
#: What ``breaker=`` accepts: a config, the seed's dict shape, a breaker, ``True``/``None``
#: (a breaker with the default config, shared by every guard of the service) or ``False``.
BreakerSpec: TypeAlias = CircuitBreakerConfig | Mapping[str, Any] | CircuitBreaker | bool | None


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


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
        return _shared(runtime.breakers.get(service, spec), spec, service)
    if isinstance(spec, Mapping):
        config = CircuitBreakerConfig.from_mapping(spec)
        return _shared(runtime.breakers.get(service, config), config, service)
    raise ConfigError(
        "breaker", spec, "a CircuitBreakerConfig, a mapping, a CircuitBreaker, a bool or None"
    )


def _shared(breaker: CircuitBreaker, config: CircuitBreakerConfig, service: str) -> CircuitBreaker:
    """``breaker``, the service's shared one, unless it exists already with another config:
    that config would be ignored without a word. (A name folded into the shared ``other``
    breaker, past ``max_services``, is no conflict: it never had a breaker of its own.)"""
    existing = breaker.config
    if breaker.name == service and service != OTHER_SERVICE and existing != config:
        names = [
            f.name for f in fields(config) if getattr(config, f.name) != getattr(existing, f.name)
        ]
        raise ConfigError(
            "breaker",
            {name: getattr(config, name) for name in names},
            f"what service {service!r}'s breaker, which exists already, has: "
            + ", ".join(f"{name}={getattr(existing, name)!r}" for name in names)
            + " (or another service name)",
        )
    return breaker


class Guard:
    """Runs calls to one service with a circuit breaker and a retry policy.

    ``service`` names the downstream: its breaker, retry budget, ``Retry-After`` cooldown and
    learned statistics are shared by every guard of that name. ``replay_safe`` says whether
    the guarded operation may be repeated without duplicating a side effect; when ``False``
    nothing is ever retried (the breaker still applies). ``fallback`` is called with the last
    error when recovery gives up or the breaker refuses, and its result is returned instead.
    ``timeout_kwarg`` names a keyword argument of the guarded function that takes a timeout in
    seconds: the guard then fills it with the policy's per-attempt timeout (bounded by the
    deadline) and lengthens it on retries after a timeout (the ``timeout_adjust`` strategy).
    Async calls without it run each attempt under ``asyncio.wait_for`` when the policy has an
    attempt timeout or a deadline. ``critical`` raises the severity of this service's
    failures by one level. ``health_check`` (a callable returning ``True`` when the service
    is healthy; it must bound its own duration) is run every ``health_check_interval`` while
    the breaker is open, and closes it after ``success_threshold`` passes in a row, without
    waiting for a call to probe it.
    """

    __slots__ = ("_plan", "_runtime", "service")

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
        health_check: HealthCheck | None = None,
    ) -> None:
        if not _is_name(service):
            raise ConfigError("service", service, "a non-empty string")
        if fallback is not None and not callable(fallback):
            raise ConfigError("fallback", fallback, "a callable taking the error, or None")
        # An async check's coroutine is truthy: it would pass every check, closing the
        # breaker of a downstream that is still down.
        check: object = health_check  # typed, but callers pass anything
        if check is not None and (not callable(check) or is_async_callable(check)):
            raise ConfigError(
                "health_check",
                health_check,
                "a plain (not async) callable returning a bool, or None",
            )
        if timeout_kwarg is not None and not _is_name(timeout_kwarg):
            raise ConfigError("timeout_kwarg", timeout_kwarg, "a keyword argument's name, or None")
        # Flags decide whether a call may be replayed: "false" must not read as True.
        if not isinstance(replay_safe, bool):
            raise ConfigError("replay_safe", replay_safe, "a bool")
        if not isinstance(critical, bool):
            raise ConfigError("critical", critical, "a bool")
        if classifier is not None and not callable(classifier):
            raise ConfigError("classifier", classifier, "a callable taking the error, or None")
        if not callable(rnd):
            raise ConfigError("rnd", rnd, "a callable returning a float in [0, 1)")
        if runtime is not None and not isinstance(runtime, Runtime):
            raise ConfigError("runtime", runtime, "a Runtime, or None (the process's)")
        runtime = runtime if runtime is not None else get_runtime()
        self._runtime = runtime
        self.service = runtime.service(service)
        policy = _retry_policy(retry)
        route = Route(
            runtime.downstream(self.service),
            _breaker(breaker, self.service, runtime),
            runtime,
            classifier or default_classify,
            critical=critical,
        )
        if health_check is not None:
            if route.breaker is None:
                # It would never run: a check only ever closes an open breaker.
                raise ConfigError(
                    "health_check", health_check, "None when breaker=False (it closes a breaker)"
                )
            if not runtime.health.register(route.breaker, health_check):
                _logger.warning(
                    "otel_raptor: the health checker already checks its maximum of breakers; "
                    "the health check of %r is not registered (its breaker reopens on its "
                    "recovery timeout)",
                    service,
                )
        hooks = CallHooks() if timeout_kwarg is None else TimeoutKwargHooks(timeout_kwarg)
        spec = LoopSpec.of(policy, replay_safe=replay_safe, has_fallback=fallback is not None)
        self._plan = CallPlan(
            route,
            spec,
            runtime=runtime,
            clock=runtime.clock,
            hooks=hooks,
            fallback=fallback,
            rnd=rnd,
        )

    @property
    def policy(self) -> RetryPolicy:
        return self._plan.spec.policy

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self._plan.route.breaker

    @property
    def plan(self) -> CallPlan:
        """How this guard's calls run (for integrations built on it)."""
        return self._plan

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` under the guard (sync; see :meth:`call_async`).

        Given a coroutine function (``async def``, plain, bound, in a ``functools.partial``
        or as an object's ``__call__``), it hands back
        ``call_async``'s awaitable: awaited as the bare call would be, the attempts run
        guarded, where running ``fn`` here would guard only the coroutine's creation."""
        code = getattr(fn, "__code__", None)  # a bound method forwards it from its function
        if code is not None:
            if code.co_flags & _COROUTINE_FLAGS:
                return self.call_async(fn, *args, **kwargs)  # type: ignore[arg-type,return-value]
        elif is_async_callable(fn):  # a partial, or an object with an async ``__call__``
            return self.call_async(fn, *args, **kwargs)  # type: ignore[arg-type,return-value]
        return run_sync(self._plan, fn, args, kwargs)  # type: ignore[no-any-return]

    async def call_async(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` under the guard; sleeps never block the loop.

        With a per-attempt timeout in the policy each attempt runs under
        ``asyncio.wait_for`` (or gets it through ``timeout_kwarg``). Cancellation from
        outside propagates at once.
        """
        return await run_async(self._plan, fn, args, kwargs)  # type: ignore[no-any-return]

    def bind(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` guarded: a function that behaves as ``lambda *a, **k: self.call(fn, *a, **k)``
        (``@resilient`` uses it: one call frame less per call). Given a coroutine function it
        returns one, as ``call`` hands over to ``call_async``: a plain function would only guard
        the coroutine's creation, and its attempts would run unguarded."""
        plan = self._plan
        if is_async_callable(fn):

            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                return await run_async(plan, fn, args, kwargs)  # type: ignore[arg-type]

            return guarded_async  # type: ignore[return-value]  # T is the awaitable

        def guarded(*args: Any, **kwargs: Any) -> T:
            return run_sync(plan, fn, args, kwargs)  # type: ignore[no-any-return]

        return guarded
