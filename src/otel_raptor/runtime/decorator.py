"""``@resilient``: a guard around a function of the user's own, sync or async."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from otel_raptor.errors import ConfigError
from otel_raptor.runtime.drive import is_async_callable, run_async
from otel_raptor.runtime.guard import BreakerSpec, Guard, RetrySpec
from otel_raptor.runtime.state import Runtime

__all__ = ["resilient"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def resilient(func: F, /) -> F: ...


@overload
def resilient(
    *,
    service: str | None = None,
    retry: RetrySpec = None,
    breaker: BreakerSpec = None,
    fallback: Callable[[BaseException], Any] | None = None,
    replay_safe: bool = True,
    timeout_kwarg: str | None = None,
    critical: bool = False,
    runtime: Runtime | None = None,
) -> Callable[[F], F]: ...


def resilient(
    func: Callable[..., Any] | None = None,
    /,
    *,
    service: str | None = None,
    retry: RetrySpec = None,
    breaker: BreakerSpec = None,
    fallback: Callable[[BaseException], Any] | None = None,
    replay_safe: bool = True,
    timeout_kwarg: str | None = None,
    critical: bool = False,
    runtime: Runtime | None = None,
) -> Any:
    """Guard every call of the decorated function with a breaker and a retry policy.

    Works on plain and coroutine functions (async ones sleep with ``asyncio.sleep`` and run
    each attempt under the policy's per-attempt timeout). ``service`` defaults to the
    function's qualified name; the other arguments are :class:`Guard`'s. The guard is built
    once, when decorating, so a bad argument raises :class:`~otel_raptor.ConfigError` at
    import time rather than at the first call. The guard is reachable as ``wrapper.guard``.

    Retrying repeats the function: leave ``replay_safe=True`` (the default) only for
    functions whose repetition cannot duplicate a side effect. Generator functions (sync or
    async) are refused with :class:`~otel_raptor.ConfigError`: their work runs while they are
    iterated, after the call the guard sees has returned.
    """

    def decorate(fn: F) -> F:
        target: object = fn  # typed, but callers pass anything
        if isinstance(target, staticmethod | classmethod):
            # ``@resilient`` above ``@staticmethod``/``@classmethod``: guard the function and
            # wrap the guard the same way. The guard alone is a plain function, which an
            # instance would bind as a method (``self`` passed to a static method), and a
            # static coroutine function would not be recognised as async.
            return type(target)(decorate(target.__func__))  # type: ignore[return-value]
        if isinstance(target, str):
            # ``@resilient("inventory")``: the service must be named.
            raise ConfigError(
                "resilient", target, "a function; name the service with @resilient(service=...)"
            )
        if not callable(target) or inspect.isclass(target):
            # A class would be replaced by a function (``isinstance`` and subclassing break).
            raise ConfigError("resilient", target, "a plain or async function (not a class)")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # Calling one only builds the generator: its body (the work, and its failures)
            # runs as it is iterated, after the guard has counted a success and returned.
            raise ConfigError(
                "resilient",
                fn,
                "a plain or async function, not a generator function (guard the call that "
                "fetches the items, or collect them in a function to decorate)",
            )
        if isinstance(timeout_kwarg, str) and not _takes_keyword(fn, timeout_kwarg):
            # Every attempt given a timeout would fail with the function's own TypeError
            # (an unexpected keyword argument), in production rather than here.
            raise ConfigError(
                "timeout_kwarg",
                timeout_kwarg,
                f"a keyword argument {_default_service(fn)} takes (it has no such parameter "
                "and no **kwargs)",
            )
        guard = Guard(
            service if service is not None else _default_service(fn),
            retry=retry,
            breaker=breaker,
            fallback=fallback,
            replay_safe=replay_safe,
            timeout_kwarg=timeout_kwarg,
            critical=critical,
            runtime=runtime,
        )
        wrapper: Any
        # An object whose ``__call__`` is ``async def`` is async too: wrapped as a plain
        # function, its coroutine would reach the caller unguarded.
        is_async = is_async_callable(fn)
        if fallback is not None and not is_async and is_async_callable(fallback):
            # A sync call would hand its caller the fallback's coroutine, never run.
            raise ConfigError(
                "fallback", fallback, "a plain function for a plain (not async) function"
            )
        if is_async:
            plan = guard.plan

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await run_async(plan, fn, args, kwargs)

            wrapper = async_wrapper
        else:
            # bind() returns a real function, so decorated methods still bind ``self``.
            wrapper = functools.update_wrapper(guard.bind(fn), fn)
        wrapper.guard = guard
        return wrapper  # type: ignore[no-any-return]  # functools.wraps keeps fn's signature

    if func is not None:
        return decorate(func)
    return decorate


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (``True`` when its signature
    cannot be read: then only a call can tell)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    parameter = parameters.get(name)
    if parameter is not None and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY:
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _default_service(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of the decorated callable: of the function a ``functools.partial``
    wraps, of the class of a callable object (neither has a ``__qualname__`` of its own)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{named.__module__}.{named.__qualname__}"
