"""The memory controller: watches RSS against the effective limit and cleans up caches.

:class:`SimpleMemoryController` samples the process RSS and the effective memory limit
(cgroup v2 ``memory.max``, or cgroup v1 ``memory.limit_in_bytes``, else physical memory) every
``check_interval`` seconds on a daemon thread, tracks the pressure level with hysteresis
(``core.memory``), and cleans the registered caches at the level that pressure, a prediction,
the schedule or a caller asks for. Every cleanup is measured (RSS before and after, entries
evicted) and published as :class:`~otel_raptor.core.events.MemoryCleanupFinished`; pressure
changes as :class:`~otel_raptor.core.events.MemoryPressureChanged`.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import ctypes.util
import gc
import os
import platform
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from otel_raptor.core.classification import Severity
from otel_raptor.core.events import MemoryCleanupFinished, MemoryPressureChanged
from otel_raptor.core.memory import (
    CachePriority,
    CleanupLevel,
    EffectivenessLearner,
    MemoryOptions,
    PressureLevel,
    PressureTracker,
    cleanup_level_for_pressure,
    cleanup_level_for_severity,
    plan_cleanup,
)
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.caches import (
    CacheRegistry,
    EvictorAdapter,
    RegisteredCache,
    adapt,
)
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.forksafe import LockBox, after_fork_in_child, register_lock
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.sampler import cgroup_limit, cgroup_memory, cgroup_working_set
from otel_raptor.runtime.state import Runtime, get_runtime, no_memory_ratio

__all__ = [
    "CleanupResult",
    "MemoryLimit",
    "SimpleMemoryController",
    "get_memory_controller",
    "malloc_trim",
    "read_memory_limit",
    "set_memory_controller",
]


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """The effective memory limit: ``bytes``, where it came from (``cgroup`` or
    ``physical``), and the memory in use against it (``usage_bytes``: the cgroup's
    ``memory.current``, else the system's used memory)."""

    bytes: int
    source: str
    usage_bytes: int


def read_memory_limit(
    *,
    proc_self_cgroup: str = "/proc/self/cgroup",
    cgroup_root: str = "/sys/fs/cgroup",
) -> MemoryLimit:
    """The effective memory limit of this process (paths are parameters for tests).

    cgroup v2: the ``0::<path>`` line of ``/proc/self/cgroup`` names the directory under
    ``cgroup_root`` whose ``memory.max`` / ``memory.current`` apply. cgroup v1: the
    ``memory`` controller's line, and ``memory/<path>/memory.limit_in_bytes`` /
    ``memory.usage_in_bytes``. The path seen from inside a container without a cgroup
    namespace may not exist there: the mount root is tried too (``sampler.cgroup_memory``).
    The usage is the working set: less the inactive page cache of ``memory.stat``, which the
    kernel reclaims before it would kill anything. A limit of ``max`` (or v1's huge
    "unlimited") or one above physical memory falls back to physical memory and system usage
    from psutil.
    """
    vm = psutil.virtual_memory()
    physical = MemoryLimit(int(vm.total), "physical", int(vm.total - vm.available))
    cgroup = cgroup_memory(root=Path(cgroup_root), cgroup_file=Path(proc_self_cgroup))
    if cgroup is None:
        return physical
    limit_bytes = cgroup_limit(cgroup)
    usage_bytes = cgroup_working_set(cgroup)
    if limit_bytes is not None and usage_bytes is not None and 0 < limit_bytes < physical.bytes:
        return MemoryLimit(limit_bytes, "cgroup", usage_bytes)
    return physical


def _find_malloc_trim() -> Callable[[int], int] | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim(0)``); ``False`` where unavailable."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanupResult:
    """What one cleanup did and freed.

    ``rss_before``/``rss_after`` and ``bytes_freed`` (their difference, never negative) are
    bytes; ``evicted`` maps each cache touched to the entries it lost, ``cleared`` names the
    caches emptied outright; ``gc_collected`` is the objects ``gc.collect`` found;
    ``malloc_trim`` whether heap was returned to the OS; ``duration_s`` seconds. ``skipped``
    is set (``cooldown``, ``ineffective``, ``disabled``, ``busy``) when an automatic run did
    nothing.
    """

    level: str
    trigger: str
    rss_before: int = 0
    rss_after: int = 0
    bytes_freed: int = 0
    evicted: Mapping[str, int] = field(default_factory=dict)
    cleared: tuple[str, ...] = ()
    gc_collected: int = 0
    malloc_trim: bool = False
    duration_s: float = 0.0
    skipped: str = ""

    @property
    def entries_evicted(self) -> int:
        return sum(self.evicted.values())


_LEVELS = {level.value: level for level in CleanupLevel}
_PRIORITIES = {priority.value: priority for priority in CachePriority}
_TRIGGERS = ("manual", "pressure", "prediction", "scheduled")
# The automatic triggers whose run at a stronger level than the last automatic run skips the
# cooldown (the schedule only ever asks for ``standard``).
_ESCALATING = frozenset({"pressure", "prediction"})
# ``check_interval`` is a wait timeout of the background thread: above threading.TIMEOUT_MAX
# the wait raises OverflowError and the thread dies; and memory sampled less than daily is not
# being watched.
_MAX_CHECK_INTERVAL_S = 86400.0
# How long an automatic cleanup waits for a cleanup already running (a cache's evictor that
# blocks holds it): past it, the run is skipped as ``busy`` rather than queued behind it for
# good. Below the predictor's bound on its actions, so a prediction reports ``skipped``.
_BUSY_WAIT_S = 5.0


def _options(config: Mapping[str, object]) -> MemoryOptions:
    options = MemoryOptions.from_mapping(config)
    if options.check_interval > _MAX_CHECK_INTERVAL_S:
        raise ConfigError(
            "memory.check_interval",
            options.check_interval,
            f"a finite number of seconds in (0, {_MAX_CHECK_INTERVAL_S:g}]",
        )
    return options


def _cleanup_level(level: str | CleanupLevel) -> CleanupLevel:
    found = _LEVELS.get(level.value if isinstance(level, CleanupLevel) else level)
    if found is None:
        raise ConfigError("memory.cleanup.level", level, "one of standard, critical, emergency")
    return found


class SimpleMemoryController:
    """Watches memory pressure and cleans the registered caches.

    ``config``: a ``MEMORY_CONFIG``-style mapping or :class:`MemoryOptions`; keyword
    arguments (the same names) override it. Invalid values raise ``ConfigError``.
    ``runtime``: where events are published (default: the process-wide runtime, looked up
    at each publish). ``clock``: monotonic time for ages, cooldowns and durations.

    The background thread runs only after :meth:`start` (and only when ``auto_cleanup``).
    """

    def __init__(
        self,
        config: Mapping[str, object] | MemoryOptions | None = None,
        *,
        runtime: Runtime | None = None,
        clock: Clock = SYSTEM_CLOCK,
        limit_reader: Callable[[], MemoryLimit] = read_memory_limit,
        rss_reader: Callable[[], int] | None = None,
        **options: object,
    ) -> None:
        if isinstance(config, MemoryOptions):
            base: dict[str, object] = {
                name: getattr(config, name) for name in MemoryOptions.__dataclass_fields__
            }
        elif config is None or isinstance(config, Mapping):
            base = dict(config or {})
        else:
            raise ConfigError("memory", config, "a MEMORY_CONFIG-style mapping or MemoryOptions")
        # Checked now: either would only fail on the background thread, at every sample,
        # leaving memory unwatched.
        for key, reader in (
            ("memory.limit_reader", limit_reader),
            ("memory.rss_reader", rss_reader),
        ):
            if reader is not None and not callable(reader):
                raise ConfigError(key, reader, "a callable with no arguments")
        base.update(options)
        self.options = _options(base)
        self._runtime = runtime
        self._clock = clock
        self._limit_reader = limit_reader
        self._process = psutil.Process()
        self._rss_reader = rss_reader or self._read_rss
        self._caches = CacheRegistry()
        self._pressure = PressureTracker(self.options)
        self._learner = EffectivenessLearner(self.options)
        self._lock = threading.Lock()  # guards learner, cooldown, last results
        self._cleanup_lock = threading.Lock()  # one cleanup at a time
        self._last_auto = -float("inf")
        self._last_auto_level: CleanupLevel | None = None
        self._last_scheduled = clock.monotonic()
        self._history: list[CleanupResult] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wanted = False
        _live.add(self)
        register_lock(self, "_lock")
        register_lock(self, "_cleanup_lock")
        after_fork_in_child(self, SimpleMemoryController._after_fork_in_child)

    def _reconfigure(self, config: Mapping[str, object]) -> None:
        """Apply a ``MEMORY_CONFIG``-style mapping over the defaults (``ConfigError`` for a
        bad one, nothing changed then). The registered caches and the thread stay; the
        pressure level and what the learner learnt start afresh under the new thresholds."""
        options = _options(dict(config))
        with self._lock:
            self.options = options
            self._pressure = PressureTracker(options)
            self._learner = EffectivenessLearner(options)

    # -- caches ---------------------------------------------------------------------------

    def register_cache(
        self,
        name: str,
        cache: object,
        *,
        priority: str | CachePriority = CachePriority.NORMAL,
        max_age: float | None = None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        """Manage ``cache`` under ``name`` (replacing a cache of that name).

        ``priority``: ``low`` (cleared at ``critical``), ``normal`` or ``high`` (cleared only
        at ``emergency``). ``max_age``: seconds an entry may live (default ``max_cache_age``);
        > 0. ``lock``: the lock the app guards ``cache`` with (``threading.Lock``, or any
        context manager), held around every step the controller's thread takes in it; a
        cachetools cache needs one, being no more thread-safe than any Python object. See
        :mod:`otel_raptor.runtime.caches` for the objects accepted.
        """
        found = _PRIORITIES.get(priority.value if isinstance(priority, CachePriority) else priority)
        if found is None:
            raise ConfigError("memory.cache.priority", priority, "one of low, normal, high")
        age: object = max_age  # typed float, but callers pass anything
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 < age < float("inf")
        ):
            raise ConfigError("memory.cache.max_age", max_age, "a finite number of seconds > 0")
        if lock is not None and not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
            raise ConfigError("memory.cache.lock", lock, "a lock (a context manager), or None")
        adapter = adapt(cache, self._clock.monotonic(), lock)
        self._caches.add(RegisteredCache(name, adapter, found, max_age))

    def unregister_cache(self, name: str) -> bool:
        """Stop managing ``name``; ``False`` when it was not registered."""
        return self._caches.remove(name)

    # -- readings -------------------------------------------------------------------------

    def _read_rss(self) -> int:
        return int(self._process.memory_info().rss)

    def usage_ratio(self) -> tuple[float, MemoryLimit]:
        """Memory in use against the effective limit, and the limit read.

        With a cgroup limit the usage is the cgroup's (which is what the OOM killer sees);
        with physical memory it is this process's RSS.
        """
        limit = self._limit_reader()
        used = limit.usage_bytes if limit.source == "cgroup" else self._rss_reader()
        return used / limit.bytes, limit

    @property
    def pressure(self) -> PressureLevel:
        return self._pressure.level

    def get_memory_stats(self) -> dict[str, object]:
        """A snapshot: ``system_memory``, ``process``, ``limit``, ``caches``, ``gc``,
        ``pressure`` and ``cleanups`` (the last results, newest last)."""
        vm = psutil.virtual_memory()
        info = self._process.memory_info()
        ratio, limit = self.usage_ratio()
        caches: dict[str, object] = {}
        for entry in self._caches:
            try:
                entries = entry.adapter.entries()
            except Exception as exc:  # noqa: BLE001 - a broken cache must not break stats
                report_internal_error(f"memory.cache_entries.{entry.adapter.kind}", exc)
                entries = None
            caches[entry.name] = {
                "entries": entries,
                "priority": entry.priority.value,
                "max_age": entry.max_age or self.options.max_cache_age,
                "kind": entry.adapter.kind,
            }
        with self._lock:
            history = list(self._history)
            useless = {level.value: self._learner.useless_runs(level) for level in CleanupLevel}
        return {
            "system_memory": {
                "usage_percentage": float(vm.percent),
                "total": int(vm.total),
                "available": int(vm.available),
                "used": int(vm.total - vm.available),
            },
            "process": {
                "rss": int(info.rss),
                "vms": int(info.vms),
                "pid": os.getpid(),
                "threads": threading.active_count(),
            },
            "limit": {
                "bytes": limit.bytes,
                "source": limit.source,
                # What the ratio counts: the cgroup's working set, else this process's RSS
                # (the machine's used memory is system_memory.used).
                "usage_bytes": limit.usage_bytes if limit.source == "cgroup" else int(info.rss),
                "usage_ratio": ratio,
            },
            "caches": caches,
            "gc": {
                "counts": gc.get_count(),
                "thresholds": gc.get_threshold(),
                "collections": [stats["collections"] for stats in gc.get_stats()],
                "enabled": gc.isenabled(),
            },
            "pressure": {"level": self._pressure.level.value, "useless_runs": useless},
            "cleanups": history,
            "malloc_trim_available": _MALLOC_TRIM is not None,
        }

    # -- cleanup --------------------------------------------------------------------------

    def cleanup(self, level: str | CleanupLevel, trigger: str = "manual") -> CleanupResult:
        """Clean up at ``level`` (``standard``, ``critical``, ``emergency``), blocking.

        ``trigger`` is ``manual`` (always runs), or ``pressure``, ``prediction``,
        ``scheduled``: those are automatic runs, skipped while the cooldown lasts, when
        ``auto_cleanup`` is off, while the learner backs off a level that freed nothing
        lately, or when another cleanup is still running after ``_BUSY_WAIT_S`` (the result
        then says ``skipped``: ``cooldown``, ``disabled``, ``ineffective``, ``busy``). A
        ``prediction`` or ``pressure`` run at a stronger level than the last automatic run is
        not held back by the cooldown: an escalation gets its stronger cleanup at once. Never
        raises for a failing cache: it is reported and skipped.
        """
        chosen = _cleanup_level(level)
        if trigger not in _TRIGGERS:
            raise ConfigError("memory.cleanup.trigger", trigger, "one of " + ", ".join(_TRIGGERS))
        if trigger == "manual":
            with self._cleanup_lock:
                result = self._run(chosen, trigger)
        else:
            now = self._clock.monotonic()
            claimed = self._claim(chosen, trigger, now)
            if isinstance(claimed, str):
                return CleanupResult(level=chosen.value, trigger=trigger, skipped=claimed)
            # Never queue for good behind a cleanup that hangs (an evictor that blocks): the
            # caller is a monitoring thread that must go on sampling.
            if not self._cleanup_lock.acquire(timeout=_BUSY_WAIT_S):
                self._unclaim(claimed, now)
                return CleanupResult(level=chosen.value, trigger=trigger, skipped="busy")
            try:
                result = self._run(chosen, trigger)
            finally:
                self._cleanup_lock.release()
        with self._lock:
            self._learner.record(
                chosen,
                bytes_freed=result.bytes_freed,
                entries_evicted=result.entries_evicted,
                now=self._clock.monotonic(),
            )
            self._history = [*self._history[-9:], result]
        self._publish(
            MemoryCleanupFinished(
                level=result.level,
                trigger=trigger,
                bytes_freed=result.bytes_freed,
                entries_evicted=result.entries_evicted,
                duration_s=result.duration_s,
            )
        )
        return result

    async def manual_cleanup(self, level: str | CleanupLevel = "standard") -> CleanupResult:
        """:meth:`cleanup` with trigger ``manual``, run in a worker thread so the event loop
        keeps running."""
        return await asyncio.to_thread(self.cleanup, level, "manual")

    def _claim(
        self, level: CleanupLevel, trigger: str, now: float
    ) -> str | tuple[float, CleanupLevel | None]:
        """Take the automatic-run slot for ``level``: the reason to skip, or what the slot
        held before (to give it back with :meth:`_unclaim` if the run cannot start)."""
        with self._lock:
            if not self.options.auto_cleanup:
                return "disabled"
            last = self._last_auto_level
            # The cooldown paces repeated runs; a prediction or a pressure level that
            # escalates asks for a stronger cleanup than the last automatic run, which must
            # not wait a minute (behind the scheduled housekeeping, an emergency at 95 %
            # waited for the OOM killer).
            escalates = trigger in _ESCALATING and (last is None or level.rank > last.rank)
            if now - self._last_auto < self.options.cooldown and not escalates:
                return "cooldown"
            if not self._learner.decide(level, now).run:
                return "ineffective"
            previous = (self._last_auto, last)
            self._last_auto = now
            self._last_auto_level = level
            return previous

    def _unclaim(self, previous: tuple[float, CleanupLevel | None], claimed_at: float) -> None:
        # A run that never started must not hold the next one back; unless another run
        # claimed the slot meanwhile.
        with self._lock:
            if self._last_auto == claimed_at:
                self._last_auto, self._last_auto_level = previous

    def _run(self, level: CleanupLevel, trigger: str) -> CleanupResult:
        started = self._clock.monotonic()
        rss_before = self._rss_reader()
        entries = list(self._caches)
        plan = plan_cleanup(level, [(e.name, e.priority, e.max_age) for e in entries], self.options)
        evicted: dict[str, int] = {}
        batch = self.options.cleanup_batch_size
        for entry in entries:
            adapter = entry.adapter
            if isinstance(adapter, EvictorAdapter):
                adapter.level = level
            try:
                if entry.name in plan.clear:
                    evicted[entry.name] = adapter.clear(self._clock.monotonic())
                elif entry.name in plan.expire:
                    evicted[entry.name] = adapter.evict_expired(
                        plan.expire[entry.name], self._clock.monotonic(), batch
                    )
            except Exception as exc:  # noqa: BLE001 - one broken cache must not stop the rest
                report_internal_error(f"memory.cleanup.{adapter.kind}", exc)
        collected = 0
        for generation in plan.gc_generations:
            collected += gc.collect(generation)
        trimmed = malloc_trim() if plan.trim else False
        rss_after = self._rss_reader()
        return CleanupResult(
            level=level.value,
            trigger=trigger,
            rss_before=rss_before,
            rss_after=rss_after,
            bytes_freed=max(0, rss_before - rss_after),
            evicted=evicted,
            cleared=plan.clear,
            gc_collected=collected,
            malloc_trim=trimmed,
            duration_s=self._clock.monotonic() - started,
        )

    def on_prediction(self, resource: str, severity: Severity | str) -> CleanupResult | None:
        """A memory-exhaustion prediction: clean up at the matching level (trigger
        ``prediction``). ``None`` for other resources or a ``low`` severity."""
        if resource not in ("memory", "process_memory"):
            return None
        try:
            known = Severity(severity)
        except ValueError:  # "'dire' is not a valid Severity" said nothing of what is
            raise ConfigError(
                "memory.prediction.severity", severity, "one of low, medium, high, critical"
            ) from None
        level = cleanup_level_for_severity(known)
        if level is None:
            return None
        return self.cleanup(level, trigger="prediction")

    # -- the background loop --------------------------------------------------------------

    def check(self) -> CleanupResult | None:
        """One sample: update the pressure level (publishing a change), then run the
        cleanup it or the schedule calls for. The background thread calls this."""
        ratio, _ = self.usage_ratio()
        change = self._pressure.update(ratio)
        if change is not None:
            self._publish(
                MemoryPressureChanged(
                    level=change.level.value,
                    previous=change.previous.value,
                    usage_ratio=ratio,
                )
            )
        level = cleanup_level_for_pressure(self._pressure.level)
        # Above warning, every sample may clean again (the cooldown and learner pace it);
        # a crossing alone would leave a level that never falls back uncleaned.
        if level is not None:
            result = self.cleanup(level, trigger="pressure")
            if not result.skipped:
                return result
        now = self._clock.monotonic()
        if now - self._last_scheduled >= self.options.cleanup_interval:
            self._last_scheduled = now
            return self.cleanup(CleanupLevel.STANDARD, trigger="scheduled")
        return None

    def start(self) -> None:
        """Start the background thread (a no-op when running or ``auto_cleanup`` is off), and
        report the live usage ratio as ``raptor.memory.pressure`` until :meth:`stop`."""
        self._wanted = True
        (self._runtime or get_runtime()).memory_ratio = self._live_ratio
        if not self.options.auto_cleanup:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="otel-raptor-memory", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread and wait for it (``timeout`` seconds)."""
        runtime = self._runtime or get_runtime()
        if runtime.memory_ratio == self._live_ratio:
            runtime.memory_ratio = no_memory_ratio
        self._halt(timeout)

    def _halt(self, timeout: float | None) -> None:
        self._wanted = False
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _live_ratio(self) -> float:
        return self.usage_ratio()[0]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        stop = self._stop
        while not stop.wait(self.options.check_interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must survive our own bugs
                report_internal_error("memory.check", exc)

    def _publish(self, event: MemoryPressureChanged | MemoryCleanupFinished) -> None:
        runtime = self._runtime or get_runtime()
        runtime.bus.publish(event)

    def _after_fork_in_child(self) -> None:
        # The locks are fresh already (forksafe); the thread and the process are the parent's.
        self._process = psutil.Process()
        # So are the pressure level, what the learner learnt of cleanups and the cooldowns:
        # they are about the parent's memory, not this worker's.
        self._pressure = PressureTracker(self.options)
        self._learner = EffectivenessLearner(self.options)
        self._last_auto = -float("inf")
        self._last_auto_level = None
        self._last_scheduled = self._clock.monotonic()
        self._history = []
        self._thread = None  # the parent's thread does not exist here
        self._stop = threading.Event()  # its lock may have been held by that thread
        if self._wanted:
            self.start()


_live: weakref.WeakSet[SimpleMemoryController] = weakref.WeakSet()


_default_controller: SimpleMemoryController | None = None
_default_box = LockBox()


def get_memory_controller() -> SimpleMemoryController:
    """The process-wide controller (created, not started, on first use).

    ``RaptorInstrumentor`` starts it on ``instrument()`` and, if it started it, stops it on
    ``uninstrument()``; register your caches on it to have them cleaned under memory pressure.
    """
    global _default_controller  # noqa: PLW0603 - a lazily created process-wide singleton
    with _default_box.lock:
        if _default_controller is None:
            _default_controller = SimpleMemoryController()
        return _default_controller


def set_memory_controller(controller: SimpleMemoryController | None) -> None:
    """Make ``controller`` the process-wide one (``None``: a new one on next use)."""
    global _default_controller  # noqa: PLW0603 - see get_memory_controller
    with _default_box.lock:
        _default_controller = controller


def _stop_all() -> None:
    # The threads only: the ratio stays readable for the meter provider's last export, which
    # an SDK set up before raptor was imported runs after this.
    for controller in list(_live):
        controller._halt(timeout=1.0)


atexit.register(_stop_all)
