"""Wrapping and unwrapping library functions: wrapt in, OpenTelemetry's ``unwrap`` out.

Every integration hooks a library through :func:`wrap` and removes the hook through
:func:`unwrap`, so that all of them share one set of rules:

- a hook is a module-level wrapt wrapper function ``(wrapped, instance, args, kwargs)``; its
  identity is what marks the hook as ours, so installing twice (from two integration
  instances, or instrument/uninstrument/instrument) never stacks a second layer;
- :func:`unwrap` restores the exact original object (``Session.request is original``) when
  our layer is the outermost one. When someone else wrapped the attribute after us (a contrib
  instrumentation, say), removing our layer would throw theirs away too: it is left in place,
  and the integration's wrapper, which reads its module's installation state on every call,
  passes straight through until it is installed again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import wrapt
from opentelemetry.instrumentation.utils import unwrap as _otel_unwrap

__all__ = ["Wrapper", "is_wrapped", "unwrap", "wrap"]

#: A wrapt wrapper: ``wrapper(wrapped, instance, args, kwargs)`` returns the call's result.
Wrapper: TypeAlias = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]

# Bounds the walk down a chain of wrappers (each layer exposes ``__wrapped__``): a cycle
# built by some other library must not hang the installation.
_MAX_LAYERS = 32


def _current(owner: object, attribute: str) -> object:
    # The class's own attribute (a FunctionWrapper is a descriptor: getattr would bind it).
    namespace = getattr(owner, "__dict__", None)
    if namespace is not None and attribute in namespace:
        return namespace[attribute]
    return getattr(owner, attribute, None)


def _layer_of(value: object) -> Callable[..., Any] | None:
    """The wrapt wrapper function of ``value`` if it is a wrapt ``FunctionWrapper``."""
    wrapper = getattr(value, "_self_wrapper", None)
    return wrapper if callable(wrapper) else None


def is_wrapped(owner: object, attribute: str, wrapper: Wrapper) -> bool:
    """Whether ``wrapper`` is one of the layers around ``owner.attribute``."""
    value = _current(owner, attribute)
    for _ in range(_MAX_LAYERS):
        if value is None:
            return False
        if _layer_of(value) is wrapper:
            return True
        value = getattr(value, "__wrapped__", None)
    return False


def wrap(owner: object, attribute: str, wrapper: Wrapper) -> bool:
    """Wrap ``owner.attribute`` with the wrapt ``wrapper``; ``False`` if it already is.

    ``owner`` is a class or a module. Raises ``AttributeError`` when it has no such
    attribute (the library changed shape: the integration reports it and installs nothing).
    """
    if _current(owner, attribute) is None:
        raise AttributeError(f"{owner!r} has no attribute {attribute!r} to wrap")
    if is_wrapped(owner, attribute, wrapper):
        return False
    wrapt.wrap_function_wrapper(owner, attribute, wrapper)
    return True


def unwrap(owner: object, attribute: str, wrapper: Wrapper) -> bool:
    """Remove ``wrapper`` from ``owner.attribute`` if it is the outermost layer.

    Returns ``True`` when the attribute was restored to what it was before :func:`wrap`
    (the very same object), ``False`` when ``wrapper`` is not the outermost layer (not
    wrapped, or wrapped over by someone else: then it stays, see the module docstring).
    """
    if _layer_of(_current(owner, attribute)) is not wrapper:
        return False
    _otel_unwrap(owner, attribute)
    return True
