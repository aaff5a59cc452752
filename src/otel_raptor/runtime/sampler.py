"""Resource sampling with psutil, cgroup-aware: one cheap snapshot of the machine and a process.

:meth:`ResourceSampler.sample` reads, in one call (about 1 ms; see ``docs/prediction.md``):

* CPU: system-wide and the process's, in percent since the previous sample (the first sample
  reads 0 for the process: psutil needs two readings).
* Memory: system total / available / used, the process's RSS, and the *effective* limit and
  usage: inside a cgroup with a memory limit (v2 ``memory.max`` / ``memory.current``, v1
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``) those, else physical memory.
  ``max`` (v2) or an absurdly large v1 value means unlimited.
* Disk usage of each configured mount (default ``/``): used, free (what an unprivileged
  writer can still use: the root-reserved blocks left out) and total.
* Network errors and drops per second (deltas of ``net_io_counters``: ``errin + errout`` and
  ``dropin + dropout``), 0 on the first sample.
* Open sockets of the process, counted by reading ``/proc/<pid>/fd`` links (psutil's
  ``net_connections`` parses every socket table of the host, which grows with the host's load,
  not ours); ``None`` where ``/proc`` is absent.
* Open file descriptors against the soft ``RLIMIT_NOFILE``, and the thread count.
* Failed attempts per second per service, from ``ErrorClassified`` events on the bus the
  sampler was given (counted between two samples).

The sampler is a plain object: the predictor calls it from its own thread. ``pid`` selects the
watched process (default: this one), which is how tests watch a leaking child.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import psutil

from otel_raptor.core.events import ErrorClassified, Event
from otel_raptor.core.prediction import is_integer
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.bus import EventBus
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.forksafe import register_lock

_resource: ModuleType | None
try:
    import resource as _resource
except ImportError:  # pragma: no cover - Windows
    _resource = None

__all__ = [
    "CgroupMemory",
    "DiskUsage",
    "ResourceSample",
    "ResourceSampler",
    "cgroup_limit",
    "cgroup_memory",
    "cgroup_working_set",
]

# cgroup v1 reports "no limit" as a huge page-aligned number (2^63 rounded down).
_V1_UNLIMITED = 1 << 60
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskUsage:
    """One mount: bytes used, total, and free for an unprivileged writer (psutil's ``free``,
    ``f_bavail``: the blocks reserved for root, 5 % of an ext4 by default, are neither used
    nor free); ``None`` when unknown."""

    mount: str
    used: int
    total: int
    free: int | None = None

    @property
    def ratio(self) -> float:
        """How full the mount is for this process: ``used / (used + free)`` (psutil's and
        ``df``'s percentage), 1 when a write fails with ENOSPC; ``used / total`` when ``free``
        is unknown. Against ``total``, a full disk would read 0.95 on a default ext4 and
        never look exhausted."""
        if self.free is None:
            return self.used / self.total if self.total > 0 else 0.0
        usable = self.used + self.free
        return self.used / usable if usable > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSample:
    """One reading. Byte counts are bytes, rates per second, CPU in percent (0-100 per
    system; the process's may exceed 100 on several cores). ``timestamp`` is the clock's
    monotonic time. ``memory_limit``/``memory_current``: the effective (cgroup-aware) limit
    and usage; ``process_memory_limit``: what the watched process's RSS is measured against
    (the effective limit unless the sampler was given one)."""

    timestamp: float
    pid: int
    cpu_percent: float
    process_cpu_percent: float
    memory_total: int
    memory_available: int
    memory_used: int
    process_rss: int
    memory_limit: int
    memory_current: int
    cgroup_limited: bool
    process_memory_limit: int
    disks: tuple[DiskUsage, ...]
    net_errors_per_s: float
    net_drops_per_s: float
    connections: int | None
    open_fds: int | None
    fd_limit: int | None
    threads: int
    error_rates: Mapping[str, float] = field(default_factory=dict)

    @property
    def memory_ratio(self) -> float:
        """Effective memory usage over the effective limit, 0-1 (can exceed 1 briefly):
        outside a memory-limited cgroup, the machine's used memory over physical memory."""
        return self.memory_current / self.memory_limit if self.memory_limit > 0 else 0.0

    @property
    def pressure_ratio(self) -> float:
        """The watched process's memory over its effective limit, as the memory controller
        counts it (``SimpleMemoryController.usage_ratio``): in a memory-limited cgroup the
        cgroup's working set over its limit (what the OOM killer compares), else the RSS over
        physical memory. ``raptor.memory.pressure`` and the pressure levels are this."""
        if self.memory_limit <= 0:
            return 0.0
        used = self.memory_current if self.cgroup_limited else self.process_rss
        return used / self.memory_limit


@dataclass(frozen=True, slots=True)
class CgroupMemory:
    """Where this process's cgroup memory files are (either may be ``None``)."""

    limit_file: Path | None
    usage_file: Path | None
    version: int


def cgroup_memory(
    pid: int | str = "self", root: Path = _CGROUP_ROOT, *, cgroup_file: Path | None = None
) -> CgroupMemory | None:
    """Find the memory-limit and usage files of ``pid``'s cgroup, or ``None`` outside one.

    Reads ``/proc/<pid>/cgroup`` (or ``cgroup_file``); v2 (``0::/path``) looks under ``root``
    and, on hybrid hosts, ``root/unified``; v1 (``N:memory:/path``) under ``root/memory``. In
    a container the path seen from inside may not exist (cgroup namespaces), so the mount root
    is tried too. The files returned are those of the cgroup whose limit binds: the one found
    or an ancestor with a smaller limit.
    """
    source = cgroup_file if cgroup_file is not None else Path(f"/proc/{pid}/cgroup")
    try:
        lines = source.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    v2_path: str | None = None
    v1_path: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    if v2_path is not None:
        for base in (root, root / "unified"):
            for candidate in (base / v2_path.lstrip("/"), base):
                if (candidate / "memory.max").is_file():
                    return _binding_cgroup(candidate, base, 2)
    if v1_path is not None:
        base = root / "memory"
        for candidate in (base / v1_path.lstrip("/"), base):
            if (candidate / "memory.limit_in_bytes").is_file():
                return _binding_cgroup(candidate, base, 1)
    return None


_LIMIT_FILE: Final = {
    2: ("memory.max", "memory.current"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes"),
}


def _binding_cgroup(leaf: Path, mount: Path, version: int) -> CgroupMemory:
    """The files of the cgroup whose limit binds: ``leaf`` or the ancestor (up to ``mount``)
    with the smallest limit. A container without a limit of its own inside a limited pod or
    systemd slice is held to the parent's, and the kernel compares the parent's usage (its
    whole subtree) with it, so that usage is the one to watch."""
    limit_name, usage_name = _LIMIT_FILE[version]
    chosen, smallest = leaf, _read_int(leaf / limit_name)
    group = leaf
    while group != mount and mount in group.parents:
        group = group.parent
        limit = _read_int(group / limit_name)
        if limit is not None and (smallest is None or limit < smallest):
            chosen, smallest = group, limit
    usage = chosen / usage_name
    return CgroupMemory(chosen / limit_name, usage if usage.is_file() else None, version)


# The page cache the kernel reclaims first, in ``memory.stat``: the usage files count it, so an
# app that reads or writes files would otherwise sit near its limit for ever (the kernel fills
# a cgroup with cache up to its limit). v1 names the hierarchy's total ``total_inactive_file``.
_INACTIVE_FILE: Final = {2: ("inactive_file",), 1: ("total_inactive_file", "inactive_file")}


def cgroup_limit(cgroup: CgroupMemory) -> int | None:
    """The cgroup's memory limit in bytes; ``None`` when it has none (``max``, v1's huge
    "unlimited") or it cannot be read."""
    return _read_int(cgroup.limit_file)


def cgroup_working_set(cgroup: CgroupMemory) -> int | None:
    """The cgroup's memory in use less its inactive page cache (what kubelet and
    ``docker stats`` report as the working set); ``None`` when the usage cannot be read. The
    usage as it is when ``memory.stat`` cannot be."""
    usage = _read_int(cgroup.usage_file)
    if usage is None or cgroup.usage_file is None:
        return usage
    try:
        text = (cgroup.usage_file.parent / "memory.stat").read_text(encoding="ascii")
    except OSError:
        return usage
    values = dict(line.partition(" ")[::2] for line in text.splitlines())
    for key in _INACTIVE_FILE.get(cgroup.version, ()):
        raw = values.get(key, "").strip()
        if raw.isdigit():
            return max(0, usage - int(raw))
    return usage


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _V1_UNLIMITED else value


def _busy_and_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds of ``psutil.cpu_times()``, counted as psutil counts them:
    ``guest`` time is already inside ``user`` (Linux), and waiting for I/O is idle."""
    total = float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = float(times.idle) + getattr(times, "iowait", 0.0)
    return total - idle, total


class ResourceSampler:
    """Reads a :class:`ResourceSample` on demand.

    ``pid``: the process to watch (default: the current one). ``mounts``: the disk mounts to
    report (default ``("/",)``). ``bus``: count ``ErrorClassified`` per service from it.
    ``process_memory_limit``: bytes, overrides the effective limit for the watched process
    (tests use it to give a child a synthetic limit). ``count_connections`` (default True):
    count the process's sockets. Bad values raise ``ConfigError``.
    """

    def __init__(
        self,
        *,
        pid: int | None = None,
        mounts: Sequence[str] = ("/",),
        bus: EventBus | None = None,
        process_memory_limit: int | None = None,
        count_connections: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        given: object = mounts  # typed, but callers pass anything
        items: list[object] = list(mounts)
        if isinstance(given, str) or not all(isinstance(m, str) and m for m in items):
            raise ConfigError("sampler.mounts", mounts, "a sequence of mount paths")
        if process_memory_limit is not None and (
            not is_integer(process_memory_limit) or process_memory_limit <= 0
        ):
            raise ConfigError(
                "sampler.process_memory_limit", process_memory_limit, "an integer > 0 (bytes)"
            )
        if pid is None:
            # Our own process: if psutil cannot read it (a sandbox without /proc), that is
            # the machine's doing, not a bad value, and psutil's error says so.
            self._process = psutil.Process()
        else:
            try:
                self._process = psutil.Process(pid)
            except (psutil.Error, ValueError, TypeError) as error:
                raise ConfigError("sampler.pid", pid, "the id of a running process") from error
        self._pid = self._process.pid
        self._mounts = tuple(mounts)
        self._process_limit = process_memory_limit
        self._count_connections = count_connections
        self._clock = clock
        self._cgroup = cgroup_memory(self._pid)
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        self._errors: dict[str, int] = {}
        self._last_net: tuple[float, int, int] | None = None
        self._last_errors_at: float | None = None
        self._unsubscribe = bus.subscribe(self._on_event) if bus is not None else None
        # CPU percentages are deltas since the previous reading: prime them. The machine's
        # are kept here, not by ``psutil.cpu_percent``, whose baseline is per thread (samples
        # run on the predictor's thread) and is moved by every other caller in that thread.
        self._last_cpu = _busy_and_total(psutil.cpu_times())
        with contextlib.suppress(psutil.Error):
            self._process.cpu_percent(None)

    @property
    def pid(self) -> int:
        return self._pid

    def close(self) -> None:
        """Stop counting bus events."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def _on_event(self, event: Event) -> None:
        if type(event) is ErrorClassified:
            with self._lock:
                self._errors[event.service] = self._errors.get(event.service, 0) + 1

    def _error_rates(self, now: float) -> dict[str, float]:
        with self._lock:
            counts, self._errors = self._errors, {}
        last, self._last_errors_at = self._last_errors_at, now
        if last is None or now <= last:
            return {}
        elapsed = now - last
        return {service: count / elapsed for service, count in counts.items()}

    def _net_rates(self, now: float) -> tuple[float, float]:
        try:
            # None without network interfaces, whatever psutil's annotations say.
            counters: object = psutil.net_io_counters()
        except (psutil.Error, OSError):
            return 0.0, 0.0
        if counters is None:
            return 0.0, 0.0
        errors = int(getattr(counters, "errin", 0)) + int(getattr(counters, "errout", 0))
        drops = int(getattr(counters, "dropin", 0)) + int(getattr(counters, "dropout", 0))
        last, self._last_net = self._last_net, (now, errors, drops)
        if last is None or now <= last[0]:
            return 0.0, 0.0
        elapsed = now - last[0]
        return max(0, errors - last[1]) / elapsed, max(0, drops - last[2]) / elapsed

    def _sockets(self) -> int | None:
        if not self._count_connections:
            return None
        base = f"/proc/{self._pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            return None
        count = 0
        for name in names:
            try:
                if os.readlink(f"{base}/{name}").startswith("socket:"):
                    count += 1
            except OSError:
                continue  # closed between listdir and readlink
        return count

    def _fd_limit(self) -> int | None:
        if _resource is None:
            return None
        try:
            if self._pid == os.getpid():
                soft = _resource.getrlimit(_resource.RLIMIT_NOFILE)[0]
            else:
                soft = self._process.rlimit(psutil.RLIMIT_NOFILE)[0]
        except (OSError, psutil.Error, AttributeError):
            return None
        return None if soft < 0 else int(soft)

    def _system_cpu_percent(self) -> float:
        """The machine's CPU use since the previous sample, in percent."""
        busy, total = _busy_and_total(psutil.cpu_times())
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        elapsed = total - last_total
        if elapsed <= 0.0:
            return 0.0
        return min(100.0, max(0.0, (busy - last_busy) / elapsed * 100.0))

    def sample(self) -> ResourceSample:
        """Read everything once. Raises ``psutil.NoSuchProcess`` if the watched process is
        gone; other unreadable values fall back to 0 or ``None``."""
        now = self._clock.monotonic()
        process = self._process
        with process.oneshot():
            rss = int(process.memory_info().rss)
            process_cpu = float(process.cpu_percent(None))
            threads = int(process.num_threads())
            try:
                fds: int | None = int(process.num_fds())
            except (psutil.Error, AttributeError):
                fds = None
        vm = psutil.virtual_memory()
        total = int(vm.total)
        used = total - int(vm.available)
        limit, current, limited = total, used, False
        if self._cgroup is not None:
            cg_limit = _read_int(self._cgroup.limit_file)
            if cg_limit is not None and 0 < cg_limit < total:
                limit, limited = cg_limit, True
                cg_usage = cgroup_working_set(self._cgroup)
                current = cg_usage if cg_usage is not None else rss
        disks = []
        for mount in self._mounts:
            try:
                usage = psutil.disk_usage(mount)
            except OSError:
                continue
            disks.append(
                DiskUsage(
                    mount=mount,
                    used=int(usage.used),
                    total=int(usage.total),
                    free=int(usage.free),
                )
            )
        net_errors, net_drops = self._net_rates(now)
        return ResourceSample(
            timestamp=now,
            pid=self._pid,
            cpu_percent=self._system_cpu_percent(),
            process_cpu_percent=process_cpu,
            memory_total=total,
            memory_available=int(vm.available),
            memory_used=used,
            process_rss=rss,
            memory_limit=limit,
            memory_current=current,
            cgroup_limited=limited,
            process_memory_limit=limit if self._process_limit is None else self._process_limit,
            disks=tuple(disks),
            net_errors_per_s=net_errors,
            net_drops_per_s=net_drops,
            connections=self._sockets(),
            open_fds=fds,
            fd_limit=self._fd_limit(),
            threads=threads,
            error_rates=self._error_rates(now),
        )
