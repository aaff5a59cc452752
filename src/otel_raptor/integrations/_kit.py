"""The integration kit: what every hooked library shares.

An integration holds only what is specific to its library:

- **how to describe a call**: which downstream it goes to (a key of the integration's choosing:
  an HTTP origin, a database server) and whether it may be replayed;
- **how to map outcomes** (:class:`~otel_raptor.runtime.drive.CallHooks`): a result that is a
  failure (an HTTP 503), what the caller gets on giving up, how a failed attempt's leftovers
  are released, how an attempt's timeout is applied;
- **its refusal types** (:func:`library_error`): a fail-fast error that is both ours and the
  library's own, so existing ``except`` clauses keep working;
- **how to re-send**: its wrapper hands the original function and arguments to the driver,
  which calls them again for each attempt.

The kit supplies the rest: :class:`Target` (one downstream of an integration with its call
plans, one per replay safety and fallback, built on first use) and :class:`TargetTable`
(targets by key, bounded), :func:`call` / :func:`call_async`, the drivers, and
:class:`HookedIntegration`, installing and uninstalling the hooks.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace
from typing import Any, Final, Generic, Protocol, TypeVar

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import CircuitOpenError, ThrottledError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._wrapping import HookSet, install_hooks, remove_hooks
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, run_async, run_sync
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import OTHER_SERVICE, Runtime

__all__ = [
    "MAX_TARGETS",
    "Evictable",
    "HookedIntegration",
    "Target",
    "TargetPolicy",
    "TargetTable",
    "call",
    "call_async",
    "in_asyncio",
    "is_refusal_of",
    "library_error",
    "manage_cache",
]

#: Targets one integration remembers; past it the table starts over (targets are cheap to
#: rebuild, and breakers, budgets and cooldowns live in the runtime, so nothing is lost).
MAX_TARGETS: Final = 1024

K = TypeVar("K", bound=Hashable)

#: The drivers, under the names integrations use.
call = run_sync
call_async = run_async


class TargetPolicy(Protocol):
    """What the kit needs of an integration's per-downstream policy."""

    @property
    def retry(self) -> RetryPolicy: ...

    @property
    def breaker(self) -> CircuitBreakerConfig: ...


class Target:
    """One downstream of an integration: its service name, breaker and call plans.

    ``service`` is the name the runtime gave it; the breaker is the service's shared one,
    created with ``policy.breaker`` if it is new, and it never counts an ``unknown`` failure
    (an exception the library did not raise itself, such as the app's own ``TypeError`` from
    an unserialisable body or a failing auth callable: the downstream never saw the call).
    Past the runtime's ``max_services`` the name folds into ``other``, and the target gets no
    breaker and a downstream (cooldown, retry budget) of its own: a breaker or cooldown shared
    by every folded downstream would let one dead host refuse calls to healthy ones.
    ``hooks`` are the integration's. ``attributes`` describe the downstream in
    semantic-convention terms (``server.address``, ``db.system.name``, ...): telemetry adds
    them to its metric points and spans (:meth:`Runtime.describe`). ``plan(replay_safe=...,
    with_fallback=...)`` returns one of four plans, each built on first use and then shared.
    """

    __slots__ = (
        "__weakref__",
        "_hooks",
        "_lock",
        "_plans",
        "_runtime",
        "breaker_name",
        "policy",
        "route",
        "service",
    )

    def __init__(
        self,
        name: str,
        policy: TargetPolicy,
        runtime: Runtime,
        hooks: CallHooks,
        attributes: Mapping[str, str | int] | None = None,
    ) -> None:
        self.policy = policy
        self.service = runtime.service(name)
        breaker: CircuitBreaker | None
        if self.service == OTHER_SERVICE:
            breaker, downstream = None, runtime.private_downstream()
        else:
            if attributes:
                runtime.describe(self.service, attributes)
            breaker = runtime.breakers.get(self.service, _counting_known(policy.breaker))
            downstream = runtime.downstream(self.service)
        self.breaker_name = "" if breaker is None else breaker.name
        self.route = Route(downstream, breaker, runtime, classify)
        self._runtime = runtime
        self._hooks = hooks
        self._plans: dict[tuple[bool, bool], CallPlan] = {}
        self._lock = threading.Lock()
        register_lock(self, "_lock")

    def plan(self, *, replay_safe: bool, with_fallback: bool = False) -> CallPlan:
        key = (replay_safe, with_fallback)
        plan = self._plans.get(key)
        if plan is None:
            runtime = self._runtime
            plan = CallPlan(
                self.route,
                LoopSpec.of(self.policy.retry, replay_safe=replay_safe, has_fallback=with_fallback),
                runtime=runtime,
                clock=runtime.clock,
                hooks=self._hooks,
            )
            with self._lock:  # two threads may build it; one is kept
                plan = self._plans.setdefault(key, plan)
        return plan


def _counting_known(config: CircuitBreakerConfig) -> CircuitBreakerConfig:
    if ErrorCategory.UNKNOWN in config.ignored_categories:
        return config
    return replace(config, ignored_categories=config.ignored_categories | {ErrorCategory.UNKNOWN})


class TargetTable(Generic[K]):
    """Targets by key for one installed integration; ``build(key)`` makes a missing one
    (``None``: calls to that key are left alone). Lookups are lock-free dict reads; at most
    :data:`MAX_TARGETS` keys are kept (then the table starts over)."""

    __slots__ = ("_build", "_limit", "_targets")

    def __init__(self, build: Callable[[K], Target | None], limit: int = MAX_TARGETS) -> None:
        self._build = build
        self._limit = limit
        self._targets: dict[K, Target | None] = {}

    def get(self, key: K) -> Target | None:
        try:
            return self._targets[key]
        except KeyError:
            pass
        target = self._build(key)
        targets = self._targets
        if len(targets) >= self._limit:
            targets.clear()
        targets[key] = target
        return target

    def __len__(self) -> int:
        return len(self._targets)


class Evictable(Protocol):
    """A cache of an integration's own that the memory controller may shrink."""

    def evict(self, now: float, max_age: float) -> int:
        """Drop entries older than ``max_age`` seconds at ``now`` (all with 0); how many."""
        ...


def manage_cache(settings: IntegrationSettings, name: str, cache: Evictable) -> Callable[[], None]:
    """Register ``cache`` with the memory controller the instrumentor runs (low priority:
    cleared first under pressure); returns the function that unregisters it. Without a
    controller (``memory=False``) it does nothing."""
    memory = settings.memory
    if memory is None:
        return _nothing
    monotonic = settings.runtime.clock.monotonic

    def evict(level: str, max_age: float) -> int:
        return cache.evict(monotonic(), max_age)

    try:
        memory.register_cache(name, evict, priority="low")
    except Exception as bug:  # noqa: BLE001 - the cache is still bounded by itself
        report_internal_error("integrations.manage_cache", bug)
        return _nothing

    def unmanage() -> None:
        try:
            memory.unregister_cache(name)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("integrations.unmanage_cache", bug)

    return unmanage


def _nothing() -> None:
    return None


def is_refusal_of(error: BaseException, plan: CallPlan) -> bool:
    """Whether ``error`` is ``plan``'s own plain refusal (its breaker's ``CircuitOpenError``,
    or its downstream's ``ThrottledError``), which the integration turns into the library's
    answer, rather than one that a fallback function raised (which passes through)."""
    if type(error) is CircuitOpenError:
        breaker = plan.breaker
        return breaker is not None and error.breaker == breaker.name
    return type(error) is ThrottledError and error.service == plan.route.service


_error_types: dict[tuple[type, type], type] = {}
_error_types_box = LockBox()


def library_error(
    base: type[Any], library_error: type[BaseException], name: str, module: str
) -> type[Any]:
    """The class that is both ``base`` (``CircuitOpenError``, ...) and ``library_error`` (the
    library's own exception), named ``name`` in ``module``; the same class for the same pair
    every time.

    Both ``__init__`` are cooperative: ``base`` takes its own arguments first and passes the
    library's keyword arguments (``request=...``) on.
    """
    key = (base, library_error)
    found = _error_types.get(key)
    if found is not None:
        return found
    with _error_types_box.lock:
        found = _error_types.get(key)
        if found is None:
            found = type(
                name,
                (base, library_error),
                {
                    "__doc__": f"A {base.__name__} that is also a "
                    f"{library_error.__module__}.{library_error.__qualname__}.",
                    "__module__": module,
                    "__qualname__": name,
                },
            )
            _error_types[key] = found
    return found


def in_asyncio() -> bool:
    """Whether the caller runs in an asyncio event loop. Async hooks pass everything else
    (trio, no loop) straight through: the attempt loop sleeps with asyncio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


S = TypeVar("S")


class HookedIntegration(Generic[S]):
    """What installing and uninstalling an integration takes, once for every library.

    A subclass names its ``library`` (the module to import), builds the installation's state
    (:meth:`new_state`), says what to hook (:meth:`hooks`) and, when the state holds what must
    be let go of (a cache registered with the memory controller), how (:meth:`release`). The
    state is published as the module global ``_installed`` of the module that defines the
    subclass: the hooks read that global on every call, one dictionary lookup, where a holder
    object would cost an attribute lookup more. Installing again replaces the settings and
    never hooks twice; a failed installation takes back only the hooks it added and leaves the
    previous installation in charge; uninstalling is a no-op for an instance that did not
    install (another instance installed since: the hooks are that one's).
    """

    name: str
    library: str

    def __init__(self) -> None:
        self._state: S | None = None

    def new_state(self, settings: IntegrationSettings, library: Any) -> S:
        """The installation's state, which the hooks read."""
        raise NotImplementedError

    def hooks(self, library: Any) -> HookSet:
        """What to hook in ``library``: ``(wrapt wrappers, patches)``."""
        raise NotImplementedError

    def release(self, state: S) -> None:
        """Let go of what ``state`` holds, once it is no longer installed."""

    def _globals(self) -> dict[str, Any]:
        return vars(sys.modules[type(self).__module__])

    @property
    def installed(self) -> bool:
        return self._state is not None and self._state is self._globals().get("_installed")

    def install(self, settings: IntegrationSettings) -> None:
        """Hook the library (imported only now); all hooks or none."""
        library = importlib.import_module(self.library)
        state = self.new_state(settings, library)
        module = self._globals()
        previous = module.get("_installed")
        module["_installed"] = self._state = state
        try:
            install_hooks(*self.hooks(library))
        except Exception:
            # The hooks are as they were: so is the installation they read.
            module["_installed"], self._state = previous, None
            self.release(state)
            raise

    def uninstall(self) -> None:
        """Put every hooked function back. Objects made meanwhile keep what they were given;
        the hooks pass every call straight through from now on."""
        state = self._state
        self._state = None
        if state is None:
            return
        module = self._globals()
        current: object = module.get("_installed")
        if current is not state:
            return  # another instance installed since: the hooks are that one's
        module["_installed"] = None
        self.release(state)
        library = sys.modules.get(self.library)
        if library is not None:
            remove_hooks(*self.hooks(library))
