"""Memory policy: pressure levels with hysteresis, cleanup plans, and learning what helps.

Everything here is pure: readings and times are arguments. The runtime's
``SimpleMemoryController`` samples RSS against the effective limit, feeds the ratio to a
:class:`PressureTracker`, turns the level into a :class:`CleanupLevel`, asks
:func:`plan_cleanup` what to do with each registered cache, and records what a cleanup freed in
an :class:`EffectivenessLearner`, which then says whether an *automatic* run of that level is
worth doing.

Levels (percent of the effective memory limit, defaults from the seed's ``MEMORY_CONFIG``):

========== ============ ===================================================================
pressure   at or above  automatic cleanup
========== ============ ===================================================================
normal     —            none (the scheduled standard cleanup still runs)
warning    70 %         ``standard``: expired entries, young GC generations
critical   85 %         ``critical``: + low-priority caches cleared, full collection
emergency  95 %         ``emergency``: every cache cleared, full collection, ``malloc_trim``
========== ============ ===================================================================
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from otel_raptor.core.classification import Severity
from otel_raptor.errors import ConfigError

__all__ = [
    "CachePriority",
    "CleanupLevel",
    "CleanupPlan",
    "EffectivenessLearner",
    "LearnerDecision",
    "MemoryOptions",
    "PressureChange",
    "PressureLevel",
    "PressureTracker",
    "cleanup_level_for_pressure",
    "cleanup_level_for_severity",
    "plan_cleanup",
    "pressure_level",
]


class PressureLevel(str, enum.Enum):
    """How close memory use is to the effective limit; ordered."""

    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _PRESSURE_ORDER.index(self)


_PRESSURE_ORDER = (
    PressureLevel.NORMAL,
    PressureLevel.WARNING,
    PressureLevel.CRITICAL,
    PressureLevel.EMERGENCY,
)


class CleanupLevel(str, enum.Enum):
    """How hard a cleanup works; ordered: each level does what the one below does, and more."""

    STANDARD = "standard"
    CRITICAL = "critical"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _CLEANUP_ORDER.index(self)


_CLEANUP_ORDER = (CleanupLevel.STANDARD, CleanupLevel.CRITICAL, CleanupLevel.EMERGENCY)


class CachePriority(str, enum.Enum):
    """How much a registered cache is worth keeping: ``low`` caches are cleared at
    ``critical``, all caches at ``emergency``."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


def _number(
    key: str,
    value: object,
    allowed: str,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = True,
) -> float:
    """``value`` as a finite float in ``(low, high]`` (``[low, high]`` unless ``low_open``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value > high
        or value < low
        or (low_open and value == low)
    ):
        raise ConfigError(key, value, allowed)
    return float(value)


def _integer(key: str, value: object, allowed: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, allowed)
    return value


# The seed's MEMORY_CONFIG spelled the thresholds as a nested mapping; both spellings are read.
_THRESHOLD_KEYS = {
    "warning": "warning_threshold",
    "critical": "critical_threshold",
    "emergency": "emergency_threshold",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOptions:
    """The memory controller's knobs (the seed's ``MEMORY_CONFIG``), validated when built.

    - ``auto_cleanup``: clean up automatically on pressure crossings, predictions and the
      schedule; default ``True``. Manual cleanups always run.
    - ``cleanup_interval``: seconds between scheduled ``standard`` cleanups; > 0, default 300.
    - ``max_cache_age``: seconds an entry of a registered cache may live before ``standard``
      evicts it (a cache's own ``max_age`` overrides it); > 0, default 3600.
    - ``max_working_age``: the tighter age that ``critical`` and ``emergency`` apply to the
      caches they do not clear outright; > 0 and <= ``max_cache_age``, default 1800.
    - ``cleanup_batch_size``: entries evicted per batch (the cache is released between
      batches so the app is not stalled); integer >= 1, default 100.
    - ``warning_threshold`` / ``critical_threshold`` / ``emergency_threshold``: percent of the
      effective limit, in (0, 100], strictly increasing; defaults 70 / 85 / 95.
    - ``hysteresis``: percentage points usage must fall below a threshold before the level
      drops back; in [0, 50), default 5.
    - ``check_interval``: seconds between pressure samples; > 0, default 5.
    - ``cooldown``: minimum seconds between two automatic cleanups; >= 0, default 60.
    - ``ineffective_runs``: consecutive runs of a level that freed nothing before automatic
      runs of it back off; integer >= 1, default 3.
    - ``backoff_base`` / ``backoff_max``: seconds the first back-off lasts (each further
      useless run doubles it) and its cap; > 0, defaults 300 and 3600.
    - ``min_effective_bytes``: a run freeing fewer bytes (and evicting no entry) counts as
      useless; >= 0, default 1 MiB.
    """

    auto_cleanup: bool = True
    cleanup_interval: float = 300.0
    max_cache_age: float = 3600.0
    max_working_age: float = 1800.0
    cleanup_batch_size: int = 100
    warning_threshold: float = 70.0
    critical_threshold: float = 85.0
    emergency_threshold: float = 95.0
    hysteresis: float = 5.0
    check_interval: float = 5.0
    cooldown: float = 60.0
    ineffective_runs: int = 3
    backoff_base: float = 300.0
    backoff_max: float = 3600.0
    min_effective_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.auto_cleanup, bool):
            raise ConfigError("memory.auto_cleanup", self.auto_cleanup, "true or false")
        for name in (
            "cleanup_interval",
            "max_cache_age",
            "max_working_age",
            "check_interval",
            "backoff_base",
            "backoff_max",
        ):
            _number(
                f"memory.{name}", getattr(self, name), "a finite number of seconds > 0", low=0.0
            )
        _number(
            "memory.cooldown",
            self.cooldown,
            "a finite number of seconds >= 0",
            low=0.0,
            low_open=False,
        )
        if self.max_working_age > self.max_cache_age:
            raise ConfigError(
                "memory.max_working_age",
                self.max_working_age,
                f"seconds in (0, max_cache_age={self.max_cache_age:g}]",
            )
        if self.backoff_max < self.backoff_base:
            raise ConfigError(
                "memory.backoff_max",
                self.backoff_max,
                f"seconds >= backoff_base={self.backoff_base:g}",
            )
        _integer("memory.cleanup_batch_size", self.cleanup_batch_size, "an integer >= 1", low=1)
        _integer("memory.ineffective_runs", self.ineffective_runs, "an integer >= 1", low=1)
        _integer("memory.min_effective_bytes", self.min_effective_bytes, "an integer >= 0", low=0)
        previous = 0.0
        for level, name in _THRESHOLD_KEYS.items():
            value = getattr(self, name)
            _number(
                f"memory.thresholds.{level}", value, "a percentage in (0, 100]", low=0.0, high=100.0
            )
            if value <= previous:
                raise ConfigError(
                    f"memory.thresholds.{level}",
                    value,
                    f"a percentage in ({previous:g}, 100]: thresholds must "
                    "increase warning < critical < emergency",
                )
            previous = value
        _number(
            "memory.hysteresis",
            self.hysteresis,
            "percentage points in [0, 50)",
            low=0.0,
            high=50.0,
            low_open=False,
        )
        if self.hysteresis == 50.0:
            raise ConfigError("memory.hysteresis", self.hysteresis, "percentage points in [0, 50)")
        # A level is left below its threshold minus the hysteresis: at or under it, the
        # level could never be left (``warning: 0.7`` taken as a fraction does that).
        warning = self.warning_threshold
        if warning <= self.hysteresis:
            hint = " (percent, not a fraction: 70 for 70 %)" if warning <= 1 else ""
            raise ConfigError(
                "memory.thresholds.warning",
                warning,
                f"a percentage above memory.hysteresis ({self.hysteresis:g}) and up to 100{hint}",
            )

    @classmethod
    def from_mapping(cls, config: Mapping[str, object]) -> MemoryOptions:
        """Options from a ``MEMORY_CONFIG``-style mapping.

        Accepts the field names above, and the seed's nested spelling
        ``{"thresholds": {"warning": 70, "critical": 85, "emergency": 95}}``. An unknown key
        raises :class:`ConfigError` rather than being ignored (a typo would silently keep the
        default).
        """
        known = set(cls.__dataclass_fields__)
        values: dict[str, object] = {}
        for key, value in config.items():
            if key == "thresholds":
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        "memory.thresholds",
                        value,
                        "a mapping of warning/critical/emergency percentages",
                    )
                for level, percent in value.items():
                    if level not in _THRESHOLD_KEYS:
                        raise ConfigError(
                            f"memory.thresholds.{level}",
                            percent,
                            "one of warning, critical, emergency",
                        )
                    values[_THRESHOLD_KEYS[level]] = percent
            elif key in known:
                values[key] = value
            else:
                raise ConfigError(
                    f"memory.{key}",
                    value,
                    "a known option: " + ", ".join(sorted(known | {"thresholds"})),
                )
        return cls(**values)  # type: ignore[arg-type]  # values are validated in __post_init__

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """``(warning, critical, emergency)`` in percent."""
        return (self.warning_threshold, self.critical_threshold, self.emergency_threshold)


def pressure_level(
    usage_percent: float,
    thresholds: tuple[float, float, float],
    *,
    current: PressureLevel = PressureLevel.NORMAL,
    hysteresis: float = 0.0,
) -> PressureLevel:
    """The pressure level for ``usage_percent`` (of the limit), given the ``current`` one.

    Going up is immediate: the highest threshold reached wins. Going down needs usage below
    the current level's threshold minus ``hysteresis`` percentage points, and then drops to
    the highest level whose threshold (minus hysteresis) is still reached, so usage hovering
    at a threshold does not flap.
    """
    raw = PressureLevel.NORMAL
    for level, threshold in zip(_PRESSURE_ORDER[1:], thresholds, strict=True):
        if usage_percent >= threshold:
            raw = level
    if raw.rank >= current.rank:
        return raw
    held = PressureLevel.NORMAL
    for level, threshold in zip(_PRESSURE_ORDER[1 : current.rank + 1], thresholds, strict=False):
        if usage_percent >= threshold - hysteresis:
            held = level
    return held


@dataclass(frozen=True, slots=True)
class PressureChange:
    """The level moved from ``previous`` to ``level`` at ``usage_ratio`` (usage / limit)."""

    level: PressureLevel
    previous: PressureLevel
    usage_ratio: float


class PressureTracker:
    """Holds the current pressure level; :meth:`update` says when it changes."""

    __slots__ = ("_hysteresis", "_level", "_thresholds")

    def __init__(self, options: MemoryOptions) -> None:
        self._thresholds = options.thresholds
        self._hysteresis = options.hysteresis
        self._level = PressureLevel.NORMAL

    @property
    def level(self) -> PressureLevel:
        return self._level

    def update(self, usage_ratio: float) -> PressureChange | None:
        """Feed one reading (usage / limit, 0 to 1 or more); the change it caused, if any."""
        level = pressure_level(
            usage_ratio * 100.0, self._thresholds, current=self._level, hysteresis=self._hysteresis
        )
        if level is self._level:
            return None
        change = PressureChange(level, self._level, usage_ratio)
        self._level = level
        return change


def cleanup_level_for_pressure(level: PressureLevel) -> CleanupLevel | None:
    """The cleanup that a pressure level calls for (``None`` at ``normal``)."""
    return _FOR_PRESSURE[level]


_FOR_PRESSURE = {
    PressureLevel.NORMAL: None,
    PressureLevel.WARNING: CleanupLevel.STANDARD,
    PressureLevel.CRITICAL: CleanupLevel.CRITICAL,
    PressureLevel.EMERGENCY: CleanupLevel.EMERGENCY,
}


def cleanup_level_for_severity(severity: Severity) -> CleanupLevel | None:
    """The cleanup a memory prediction of ``severity`` calls for: ``low`` none, ``medium``
    standard, ``high`` critical, ``critical`` emergency."""
    return _FOR_SEVERITY[severity]


_FOR_SEVERITY = {
    Severity.LOW: None,
    Severity.MEDIUM: CleanupLevel.STANDARD,
    Severity.HIGH: CleanupLevel.CRITICAL,
    Severity.CRITICAL: CleanupLevel.EMERGENCY,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanupPlan:
    """What one cleanup does.

    ``expire`` maps cache names to the maximum entry age (seconds) to keep; ``clear`` names
    the caches emptied outright; ``gc_generations`` the ``gc.collect`` calls to make, in
    order; ``trim`` whether to return freed heap to the OS.
    """

    level: CleanupLevel
    expire: Mapping[str, float] = field(default_factory=dict)
    clear: tuple[str, ...] = ()
    gc_generations: tuple[int, ...] = ()
    trim: bool = False


def plan_cleanup(
    level: CleanupLevel,
    caches: Sequence[tuple[str, CachePriority, float | None]],
    options: MemoryOptions,
) -> CleanupPlan:
    """The plan for ``level`` over ``caches`` given as ``(name, priority, max_age)``.

    - ``standard``: entries older than the cache's ``max_age`` (default ``max_cache_age``)
      are evicted; ``gc.collect(0)`` then ``gc.collect(1)``.
    - ``critical``: ``low`` caches cleared; the others lose entries older than the smaller of
      their ``max_age`` and ``max_working_age``; a full ``gc.collect()``.
    - ``emergency``: every cache cleared; a full collection; ``malloc_trim``.
    """
    if level is CleanupLevel.EMERGENCY:
        return CleanupPlan(
            level=level, clear=tuple(name for name, _, _ in caches), gc_generations=(2,), trim=True
        )
    expire: dict[str, float] = {}
    clear: list[str] = []
    for name, priority, max_age in caches:
        age = options.max_cache_age if max_age is None else max_age
        if level is CleanupLevel.CRITICAL:
            if priority is CachePriority.LOW:
                clear.append(name)
                continue
            age = min(age, options.max_working_age)
        expire[name] = age
    generations = (0, 1) if level is CleanupLevel.STANDARD else (2,)
    return CleanupPlan(level=level, expire=expire, clear=tuple(clear), gc_generations=generations)


@dataclass(frozen=True, slots=True)
class LearnerDecision:
    """Whether to run an automatic cleanup of a level now; when not, until when it is
    skipped (``skip_until``, same seconds as ``now``)."""

    run: bool
    skip_until: float | None = None


class EffectivenessLearner:
    """Remembers, per cleanup level, whether recent runs freed anything.

    The rule: after ``ineffective_runs`` consecutive runs of a level that each freed fewer
    than ``min_effective_bytes`` and evicted no entry, automatic runs of that level are
    skipped for ``backoff_base`` seconds; every further useless run (one is let through when
    the back-off ends) doubles that, up to ``backoff_max``. One useful run resets the level.
    Manual runs are not asked about (they always run) but are recorded like any other.
    """

    __slots__ = ("_options", "_state")

    def __init__(self, options: MemoryOptions) -> None:
        self._options = options
        # level -> [consecutive useless runs, skip until]
        self._state: dict[CleanupLevel, list[float]] = {}

    def decide(self, level: CleanupLevel, now: float) -> LearnerDecision:
        state = self._state.get(level)
        if state is None or now >= state[1]:
            return LearnerDecision(True)
        return LearnerDecision(False, state[1])

    def record(
        self, level: CleanupLevel, *, bytes_freed: int, entries_evicted: int, now: float
    ) -> None:
        options = self._options
        state = self._state.setdefault(level, [0.0, -math.inf])
        if bytes_freed >= options.min_effective_bytes or entries_evicted > 0:
            state[0], state[1] = 0.0, -math.inf
            return
        state[0] += 1
        beyond = int(state[0]) - options.ineffective_runs
        if beyond >= 0:
            backoff = min(options.backoff_max, options.backoff_base * 2.0 ** min(beyond, 60))
            state[1] = now + backoff

    def useless_runs(self, level: CleanupLevel) -> int:
        """Consecutive runs of ``level`` that freed nothing (for stats)."""
        state = self._state.get(level)
        return 0 if state is None else int(state[0])
