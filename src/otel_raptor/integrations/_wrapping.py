"""Wrapping and unwrapping library functions with wrapt.

Every integration hooks a library through :func:`wrap` and removes the hook through
:func:`unwrap`, so that all of them share one set of rules:

- a hook is a module-level wrapt wrapper function ``(wrapped, instance, args, kwargs)``; its
  identity is what marks the hook as ours, so installing twice (from two integration
  instances, or instrument/uninstrument/instrument) never stacks a second layer;
- on a per-call path where wrapt's dispatch would cost more than the rest of the hook
  (database statements: a wrapt ``FunctionWrapper`` costs about 450 ns a call on CPython 3.11,
  a plain function about 30 ns), :func:`patch` puts a plain function in place instead: a
  module-level *hook factory* ``hook(original) -> replacement`` builds it, and the factory's
  identity marks the layer as ours just as a wrapper function's does;
- :func:`unwrap` restores the exact original object (``Session.request is original``) when
  our layer is the outermost one. When someone else wrapped the attribute after us (a contrib
  instrumentation, say), removing our layer would throw theirs away too: it is left in place,
  and the integration's wrapper, which reads its module's installation state on every call,
  passes straight through until it is installed again.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import wrapt

__all__ = [
    "HookFactory",
    "HookSet",
    "Wrapper",
    "install_hooks",
    "is_wrapped",
    "patch",
    "remove_hooks",
    "same_parameters",
    "unwrap",
    "wrap",
]

#: A wrapt wrapper: ``wrapper(wrapped, instance, args, kwargs)`` returns the call's result.
Wrapper: TypeAlias = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
#: Builds the plain function that replaces ``original`` (see :func:`patch`).
HookFactory: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Any]]

# Set on a function installed by :func:`patch`: the factory that built it.
_FACTORY = "_otel_raptor_hook"

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
    """The wrapt wrapper function of ``value`` if it is a wrapt ``FunctionWrapper``, or the
    hook factory of a function installed by :func:`patch`."""
    wrapper: object = getattr(value, "_self_wrapper", None)
    if not callable(wrapper) and type(value) is types.FunctionType:
        wrapper = getattr(value, _FACTORY, None)
    return wrapper if callable(wrapper) else None


def is_wrapped(owner: object, attribute: str, wrapper: Wrapper | HookFactory) -> bool:
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


def patch(owner: type, attribute: str, factory: HookFactory) -> bool:
    """Replace the function ``owner.attribute`` (defined in the class ``owner`` itself) with
    ``factory(original)``, a plain function; ``False`` if ``factory`` is already a layer.

    ``factory`` is handed the original as a plain function taking the instance first (a
    descriptor that is not a plain function, such as another library's wrapt layer, is bound
    on each call). The replacement carries ``__wrapped__`` (the original, which :func:`unwrap`
    puts back), the
    original's name, qualified name, module and docstring (so ``inspect.signature`` and
    ``inspect.iscoroutinefunction`` answer as before when the replacement is ``async def`` for
    an ``async def`` original), and a reference to ``factory``, which marks the layer as ours.
    Raises ``AttributeError`` when ``owner`` defines no such function.
    """
    namespace = getattr(owner, "__dict__", {})
    current = namespace.get(attribute)
    if current is None:
        raise AttributeError(f"{owner!r} defines no attribute {attribute!r} to patch")
    if is_wrapped(owner, attribute, factory):
        return False
    replacement = factory(current if type(current) is types.FunctionType else _bound(current))
    for name in ("__name__", "__qualname__", "__module__", "__doc__"):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(replacement, name, getattr(current, name))
    replacement.__wrapped__ = current  # type: ignore[attr-defined]  # a function attribute
    setattr(replacement, _FACTORY, factory)
    setattr(owner, attribute, replacement)
    return True


def same_parameters(function: Callable[..., Any], hook: Callable[..., Any]) -> bool:
    """Whether ``function`` takes exactly ``hook``'s parameters: names, kinds and defaults
    (annotations aside). A hook written with the method's own parameters rather than
    ``*args, **kwargs`` builds no tuple and no dictionary per call (0.2 µs of a database
    statement hook's 0.45 µs, measured with ``bench_db.py --mode paired``); it replaces only a
    method of that exact shape, and a method of another shape (another version of the
    library, someone else's layer) gets a general hook."""
    try:
        theirs = inspect.signature(function).parameters.values()
        ours = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):
        return False
    return [(p.name, p.kind, p.default) for p in theirs] == [
        (p.name, p.kind, p.default) for p in ours
    ]


def _bound(descriptor: Any) -> Callable[..., Any]:
    """``descriptor`` (someone else's wrapt layer, say) as a plain function taking the
    instance first: it is bound to the instance on each call, as attribute access would, so
    the layer below sees its instance (wrapt wrappers read ``instance``)."""
    get = descriptor.__get__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return get(self, type(self))(*args, **kwargs)

    return call


def unwrap(owner: object, attribute: str, wrapper: Wrapper | HookFactory) -> bool:
    """Remove ``wrapper`` (a wrapt wrapper function, or a :func:`patch` hook factory) from
    ``owner.attribute`` if it is the outermost layer.

    Returns ``True`` when the attribute was restored to what it was before :func:`wrap`
    (the very same object), ``False`` when ``wrapper`` is not the outermost layer (not
    wrapped, or wrapped over by someone else: then it stays, see the module docstring).
    """
    current = _current(owner, attribute)
    if _layer_of(current) is not wrapper:
        return False
    # Put back the owner's own attribute as it was (``__wrapped__`` of the wrapper stored in
    # the class or module namespace), not what ``getattr`` binds it to: OpenTelemetry's
    # ``unwrap`` restores the *bound* original, which turns a classmethod (psycopg's
    # ``Connection.connect``) into a method bound to the base class, so subclasses would build
    # base-class instances.
    # A *bound* wrapper here means someone else's unwrap put it there (OpenTelemetry's, for
    # a layer wrapped over ours): what we wrapped is its parent's.
    layer: Any = getattr(current, "_self_parent", None) or current
    setattr(owner, attribute, layer.__wrapped__)
    return True


def install_hooks(
    wrapped: Sequence[tuple[object, str, Wrapper]],
    patched: Sequence[tuple[type, str, HookFactory]] = (),
) -> None:
    """Install wrapt wrappers and :func:`~otel_raptor.integrations._wrapping.patch` hooks, all
    or none: when one fails, those this call installed are removed and the error raised."""
    done_wrapped: list[tuple[object, str, Wrapper]] = []
    done_patched: list[tuple[type, str, HookFactory]] = []
    try:
        # Only what this call added is taken back on failure: a hook already there (an
        # installation before this one) stays.
        for owner, attribute, wrapper in wrapped:
            if wrap(owner, attribute, wrapper):
                done_wrapped.append((owner, attribute, wrapper))
        for cls, attribute, factory in patched:
            if patch(cls, attribute, factory):
                done_patched.append((cls, attribute, factory))
    except Exception:
        remove_hooks(done_wrapped, done_patched)
        raise


def remove_hooks(
    wrapped: Sequence[tuple[object, str, Wrapper]],
    patched: Sequence[tuple[type, str, HookFactory]] = (),
) -> None:
    """Remove what :func:`install_hooks` installed, in reverse order."""
    for cls, attribute, factory in reversed(patched):
        unwrap(cls, attribute, factory)
    for owner, attribute, wrapper in reversed(wrapped):
        unwrap(owner, attribute, wrapper)


#: What one integration hooks: wrapt wrappers, then plain-function patches.
HookSet: TypeAlias = tuple[
    Sequence[tuple[object, str, Wrapper]], Sequence[tuple[type, str, HookFactory]]
]
