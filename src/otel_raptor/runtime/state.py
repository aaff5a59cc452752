"""The process-wide state that guards share: the bus, breakers, downstreams, the learner.

One writer per piece of shared state. The retry-budget shape is set by :meth:`Runtime.configure`
(the instrumentor) and applied to every downstream in place; the predictor's load shedding is a
separate, temporary factor on top (:meth:`Runtime.shed_load`) that ends by itself, so nobody
ever restores a ratio that someone else changed meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager as ContextManager
from types import MappingProxyType

from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.events import Event
from otel_raptor.core.learning import LearnerOptions, StrategyLearner
from otel_raptor.core.numbers import SERVICE_CAP_TEXT, is_service_cap
from otel_raptor.core.prediction import EMPTY_SNAPSHOT, ResourceSnapshot
from otel_raptor.core.recovery import Strategy
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.breaker import BreakerRegistry
from otel_raptor.runtime.bus import EventBus
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.downstream import Downstream
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.health import HealthChecker

__all__ = [
    "OTHER_SERVICE",
    "REPEAT_WINDOW_S",
    "MemoryRatioProvider",
    "RecoveryScope",
    "ResourceSnapshotProvider",
    "Runtime",
    "get_runtime",
    "set_runtime",
]

#: Opens the scope of one logical call's recovery: called with the service and the monotonic
#: time the first attempt started, when that attempt has failed; the attempt loop's driver
#: runs the retries (and publishes their events) inside the returned context manager.
#: Telemetry installs one that makes a ``raptor.recovery`` span current, so each retry's
#: client span is its child.
RecoveryScope = Callable[[str, float], ContextManager[None]]


def _no_scope(service: str, started: float) -> ContextManager[None]:
    return contextlib.nullcontext()


#: Returns the latest resource readings and forecasts for the resource gauges; the predictor
#: installs one while it monitors (``otel_raptor.runtime.predictor``). Called at collection
#: time, from the metric reader's thread: it must be cheap and must not block.
ResourceSnapshotProvider = Callable[[], ResourceSnapshot]


def _no_resources() -> ResourceSnapshot:
    return EMPTY_SNAPSHOT


#: Returns this process's memory over its effective limit, now; the memory controller installs
#: one while it runs (``otel_raptor.runtime.memory``), for the ``raptor.memory.pressure`` gauge.
#: Called at collection time, like ``ResourceSnapshotProvider``.
MemoryRatioProvider = Callable[[], float | None]


def no_memory_ratio() -> float | None:
    """The ``Runtime.memory_ratio`` of a runtime whose memory controller is not running."""
    return None


#: The window over which repeated failures of one category raise their severity.
REPEAT_WINDOW_S = 60.0

#: Where services beyond ``max_services`` are folded, to keep metric cardinality bounded.
OTHER_SERVICE = "other"

#: Distinct owners whose load shedding is held at once (the predictor and the app in practice).
_MAX_SHED_OWNERS = 16

_NO_DESCRIPTION: Mapping[str, str | int] = MappingProxyType({})

#: What a clock must have (``otel_raptor.runtime.clock.Clock``).
_CLOCK_METHODS = ("monotonic", "wall", "sleep", "sleep_async")


class Runtime:
    """Shared resilience state: one per process unless a test builds its own.

    ``max_services`` bounds the distinct service names (breakers, downstreams, learner keys
    and so metric attribute values); names beyond it share the ``other`` service. Memory is
    bounded accordingly: per service one breaker (a window of ``window_size`` bytes plus a
    few hundred bytes), one downstream (about 300 bytes), at most 16 repeat counters and the
    learner's entries (``LearnerOptions.max_entries`` in all).
    """

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_services: int = 256,
        budget_ratio: float = 0.2,
        budget_min_retries_per_second: float = 10.0,
        learner: LearnerOptions | None = None,
    ) -> None:
        # Checked here, under their own names: a bad one used to surface later, as another
        # key (``breaker.max_breakers``) or as an AttributeError in the first failing call.
        if not all(callable(getattr(clock, name, None)) for name in _CLOCK_METHODS):
            raise ConfigError("clock", clock, "a Clock: " + ", ".join(_CLOCK_METHODS))
        limit: object = max_services  # typed int, but callers pass anything
        if not is_service_cap(limit):
            raise ConfigError("max_services", limit, SERVICE_CAP_TEXT)
        if learner is not None and not isinstance(learner, LearnerOptions):
            raise ConfigError("learner", learner, "a LearnerOptions, or None (the defaults)")
        self.clock = clock
        self.bus = EventBus()
        self.max_services = max_services
        self.breakers = BreakerRegistry(clock=clock, sink=self.bus, max_breakers=max_services)
        #: Active health checks of open breakers (a thread only once one is registered).
        self.health = HealthChecker(clock=clock, max_checks=max_services)
        self._budget_ratio = budget_ratio
        self._budget_floor = budget_min_retries_per_second
        # Built once here so that a bad ratio fails now, not at the first failure.
        RetryBudget(ratio=budget_ratio, min_retries_per_second=budget_min_retries_per_second)
        self._services: set[str] = set()
        self._downstreams: dict[str, Downstream] = {}
        # The downstreams of one caller each (past ``max_services``): not shared, not named,
        # but their budgets follow load shedding like every other's while they live.
        self._private: weakref.WeakSet[Downstream] = weakref.WeakSet()
        self._descriptions: dict[str, Mapping[str, str | int]] = {}
        self._recent: dict[tuple[str, str], list[float]] = {}
        self._learner = StrategyLearner(learner or LearnerOptions())
        # Load shedding: owner -> (factor, until). The ratio in force is the configured one
        # times the smallest live factor; ``_next_shed_end`` is when the next one ends, so a
        # retry can settle the table without scanning it.
        self._sheds: dict[Hashable, tuple[float, float]] = {}
        self._next_shed_end = math.inf
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        # Reading the ratio in force and applying it are one step: otherwise a reshape worked
        # out before another thread's change could land after that thread's own, and leave
        # every budget on a ratio nobody holds any more.
        self._reshape_lock = threading.Lock()
        register_lock(self, "_reshape_lock")
        self.recovery_scope: RecoveryScope = _no_scope
        self.resource_snapshot: ResourceSnapshotProvider = _no_resources
        self.memory_ratio: MemoryRatioProvider = no_memory_ratio

    @property
    def budget_ratio(self) -> float:
        """Retry-budget tokens deposited per call, as configured (see :class:`RetryBudget`)."""
        return self._budget_ratio

    @property
    def effective_budget_ratio(self) -> float:
        """The ratio in force now: the configured one, times the shedding factor while the
        predictor sheds load."""
        return self._budget_ratio * self._shed_factor(self.clock.monotonic())

    def _shed_factor(self, now: float) -> float:
        # list(): a copy taken in one step, so a concurrent shed_load cannot break the loop.
        live = [factor for factor, until in list(self._sheds.values()) if now < until]
        return min(live, default=1.0)

    @property
    def budget_min_retries_per_second(self) -> float:
        """Retry-budget tokens per second that flow in without calls."""
        return self._budget_floor

    def configure(
        self,
        *,
        budget_ratio: float | None = None,
        budget_min_retries_per_second: float | None = None,
        max_services: int | None = None,
    ) -> None:
        """Change the retry-budget shape and the service cap of a runtime already in use.

        The process-wide runtime exists before the instrumentor runs, so the instrumentor
        reconfigures it rather than replacing it (guards built earlier keep working).
        ``None`` leaves a setting as it is. A new budget shape is applied to every
        downstream's budget in place, keeping its balance: no guard is left depositing into a
        budget that nobody reads. ``max_services`` (an integer in [1, 100 000]) applies to
        names not seen yet (and to new breakers); names already in use keep theirs. Bad values
        raise ``ConfigError`` before anything changes.
        """
        ratio = self._budget_ratio if budget_ratio is None else budget_ratio
        floor = self._budget_floor
        if budget_min_retries_per_second is not None:
            floor = budget_min_retries_per_second
        RetryBudget(ratio=ratio, min_retries_per_second=floor)  # validates both
        limit: object = max_services  # typed int, but callers pass anything
        if limit is not None and not is_service_cap(limit):
            raise ConfigError("max_services", limit, SERVICE_CAP_TEXT)
        with self._lock:
            reshape = (ratio, floor) != (self._budget_ratio, self._budget_floor)
            self._budget_ratio, self._budget_floor = float(ratio), float(floor)
            if max_services is not None:
                self.max_services = max_services
                self.breakers.set_max_breakers(max_services)  # the registry's follows
        if reshape:
            self._reshape_budgets()

    def shed_load(self, factor: float, duration: float, *, owner: Hashable = None) -> None:
        """Multiply every downstream's retry-budget ratio by ``factor`` (in (0, 1)) for
        ``duration`` seconds (> 0), so retries slow down while the process is in trouble.

        Shedding is held per ``owner`` (the predictor sheds as itself; the default owner is
        ``None``, the app's): shedding again as the same owner replaces its factor and extends
        its period, and when several owners shed at once the smallest factor applies, so
        shedding never compounds. Each owner's shedding ends by itself, or by
        :meth:`stop_shedding` with the same owner; it never ends another owner's.
        """
        given: tuple[object, object] = (factor, duration)  # typed, but callers pass anything
        if not (isinstance(given[0], (int, float)) and 0.0 < factor < 1.0):
            raise ConfigError("shed_load.factor", factor, "a number in (0, 1)")
        if not (isinstance(given[1], (int, float)) and 0.0 < duration < math.inf):
            raise ConfigError("shed_load.duration", duration, "a finite number of seconds > 0")
        hash(owner)  # an unhashable owner fails here, not inside the lock
        now = self.clock.monotonic()
        with self._lock:
            _, until = self._sheds.get(owner, (1.0, -math.inf))
            self._sheds[owner] = (float(factor), max(until, now + duration))
            self._settle_sheds(now)
        self._reshape_budgets()

    def stop_shedding(self, *, owner: Hashable = None) -> None:
        """End ``owner``'s load shedding now (others' goes on)."""
        now = self.clock.monotonic()
        with self._lock:
            stopped = self._sheds.pop(owner, None) is not None
            self._settle_sheds(now)
        if stopped:
            self._reshape_budgets()

    def _settle_sheds(self, now: float) -> None:
        """Drop ended sheddings and find the next end (holding ``_lock``). The table stays
        small: an owner holds one entry, and at most ``_MAX_SHED_OWNERS`` are kept (those
        ending first go first)."""
        for owner, (_, until) in list(self._sheds.items()):
            if until <= now:
                del self._sheds[owner]
        while len(self._sheds) > _MAX_SHED_OWNERS:
            del self._sheds[min(self._sheds, key=lambda o: self._sheds[o][1])]
        self._next_shed_end = min((u for _, u in self._sheds.values()), default=math.inf)

    def _end_due_sheds(self, now: float) -> None:
        with self._lock:
            if self._next_shed_end > now:
                return  # another thread settled it first
            self._settle_sheds(now)
        self._reshape_budgets()

    def _reshape_budgets(self) -> None:
        with self._reshape_lock:
            now = self.clock.monotonic()
            ratio = self.effective_budget_ratio
            for downstream in [*self._downstreams.values(), *list(self._private)]:
                downstream.reshape(ratio, self._budget_floor, now)

    def service(self, name: str) -> str:
        """``name`` itself, or ``other`` once ``max_services`` distinct names are in use."""
        if name in self._services:
            return name
        with self._lock:
            if name in self._services:
                return name
            if len(self._services) >= self.max_services:
                return OTHER_SERVICE
            self._services.add(name)
            return name

    def downstream(self, service: str) -> Downstream:
        """The shared state of ``service`` (a name from :meth:`service`), created on first
        use and never replaced."""
        downstream = self._downstreams.get(service)
        if downstream is None:
            now = self.clock.monotonic()
            with self._lock:
                downstream = self._downstreams.get(service)
                if downstream is None:
                    budget = RetryBudget(
                        ratio=self.effective_budget_ratio,
                        min_retries_per_second=self._budget_floor,
                        now=now,
                    )
                    downstream = self._downstreams[service] = Downstream(service, budget)
        return downstream

    def private_downstream(self) -> Downstream:
        """A downstream of its own for one caller (named ``other``): never shared, never
        registered, so one folded downstream's cooldown or spent budget never reaches
        another's. Its budget is reshaped with every other's (load shedding) while it lives."""
        with self._reshape_lock:  # a reshape in progress either sees it or made its ratio
            budget = RetryBudget(
                ratio=self.effective_budget_ratio,
                min_retries_per_second=self._budget_floor,
                now=self.clock.monotonic(),
            )
            downstream = Downstream(OTHER_SERVICE, budget)
            self._private.add(downstream)
        return downstream

    def describe(self, service: str, attributes: Mapping[str, str | int]) -> None:
        """Attach semantic-convention attributes to ``service`` (``server.address``,
        ``server.port``, ``db.system.name``, ...): telemetry adds them to the service's metric
        points and ``raptor.recovery`` spans. Integrations describe a downstream when they
        first meet it; the first description wins, and ``other`` is never described (it
        stands for many). Values must be bounded like the service names themselves."""
        if service == OTHER_SERVICE or service in self._descriptions:
            return
        with self._lock:
            if len(self._descriptions) < self.max_services:
                self._descriptions.setdefault(service, MappingProxyType(dict(attributes)))

    def description(self, service: str) -> Mapping[str, str | int]:
        """The attributes :meth:`describe` attached to ``service`` (empty when none)."""
        return self._descriptions.get(service, _NO_DESCRIPTION)

    def budget(self, service: str) -> RetryBudget:
        """The retry budget of ``service`` (its downstream's)."""
        return self.downstream(service).budget

    def withdraw(self, downstream: Downstream, now: float) -> bool:
        """Spend one retry token of ``downstream`` at ``now``; ``False`` when its budget is
        empty. Ends load shedding that has run its course first."""
        if self._next_shed_end <= now:
            self._end_due_sheds(now)
        return downstream.withdraw(now)

    def budget_tokens(self) -> dict[str, float]:
        """Tokens left per service, for the gauge (a service whose lock is busy is left out
        of this reading)."""
        now = self.clock.monotonic()
        found = {}
        for name, downstream in list(self._downstreams.items()):
            tokens = downstream.tokens(now)
            if tokens is not None:
                found[name] = tokens
        return found

    def publish(self, event: Event) -> None:
        """Publish ``event`` on the bus (subscribers' failures never reach the caller)."""
        self.bus.publish(event)

    def note_failure(self, service: str, category: str) -> int:
        """Count one failure of ``category`` at ``service``; return how many happened in the
        last ``REPEAT_WINDOW_S`` seconds (this one included), for the severity rule.

        Two fixed buckets, the previous one weighted by how much of it still overlaps the
        window: O(1), three numbers per key, bounded by ``max_services`` times the categories.
        """
        now = self.clock.monotonic()
        key = (service, category)
        with self._lock:
            counter = self._recent.get(key)
            if counter is None:
                if len(self._recent) >= self.max_services * 16:
                    self._recent.clear()  # a crude bound, reached only under abuse
                counter = self._recent[key] = [now, 0.0, 0.0]
            started, current, previous = counter
            elapsed = now - started
            if elapsed >= REPEAT_WINDOW_S:
                previous = current if elapsed < 2 * REPEAT_WINDOW_S else 0.0
                started, current = started + REPEAT_WINDOW_S * (elapsed // REPEAT_WINDOW_S), 0.0
                elapsed = now - started
            current += 1.0
            counter[:] = [started, current, previous]
            overlap = max(0.0, 1.0 - elapsed / REPEAT_WINDOW_S)
            return int(current + previous * overlap)

    # The learner is consulted and fed on the failure path only.
    def should_retry(self, service: str, category: str, strategy: Strategy) -> bool:
        now = self.clock.monotonic()
        with self._lock:
            return self._learner.should_retry(service, category, strategy, now=now)

    def best_strategy(
        self, service: str, category: str, candidates: tuple[Strategy, ...]
    ) -> Strategy:
        now = self.clock.monotonic()
        with self._lock:
            return self._learner.best_strategy(service, category, candidates, now=now)

    def record_outcome(
        self, service: str, category: str, strategy: Strategy, *, recovered: bool
    ) -> None:
        now = self.clock.monotonic()
        with self._lock:
            self._learner.record(service, category, strategy, recovered=recovered, now=now)


_default: Runtime | None = None
_default_box = LockBox()


def get_runtime() -> Runtime:
    """The process-wide runtime (created on first use)."""
    global _default  # noqa: PLW0603 - the one process-wide default, created lazily
    runtime = _default
    if runtime is None:
        with _default_box.lock:
            if _default is None:
                _default = Runtime()
            runtime = _default
    return runtime


def set_runtime(runtime: Runtime | None) -> Runtime | None:
    """Replace the process-wide runtime (tests, or an instrumentor with its own options)."""
    global _default
    with _default_box.lock:
        previous, _default = _default, runtime
    return previous
