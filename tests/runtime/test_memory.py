from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from pathlib import Path

import psutil
import pytest

from otel_raptor.core.events import Event, MemoryCleanupFinished, MemoryPressureChanged
from otel_raptor.core.memory import CleanupLevel, MemoryOptions, PressureLevel
from otel_raptor.errors import ConfigError
from otel_raptor.runtime import memory as memory_module
from otel_raptor.runtime.memory import (
    MemoryLimit,
    SimpleMemoryController,
    malloc_trim,
    read_memory_limit,
)
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock

GIB = 1 << 30


class Readings:
    """Scripted RSS against a fixed 1 GiB physical limit."""

    def __init__(self) -> None:
        self.rss = 100 << 20

    def limit(self) -> MemoryLimit:
        return MemoryLimit(GIB, "physical", self.rss)

    def read_rss(self) -> int:
        return self.rss


@pytest.fixture
def runtime() -> Runtime:
    return Runtime()


@pytest.fixture
def events(runtime: Runtime) -> list[Event]:
    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    return seen


@pytest.fixture
def readings() -> Readings:
    return Readings()


@pytest.fixture
def controller(runtime: Runtime, clock: FakeClock, readings: Readings) -> SimpleMemoryController:
    return SimpleMemoryController(
        runtime=runtime,
        clock=clock,
        limit_reader=readings.limit,
        rss_reader=readings.read_rss,
        cooldown=30,
    )


def test_config_mapping_kwargs_and_errors() -> None:
    controller = SimpleMemoryController({"cleanup_interval": 60}, cleanup_batch_size=5)
    assert controller.options.cleanup_interval == 60
    assert controller.options.cleanup_batch_size == 5
    assert SimpleMemoryController(MemoryOptions(cooldown=1), cooldown=2).options.cooldown == 2
    with pytest.raises(ConfigError, match=r"memory.thresholds.critical=60"):
        SimpleMemoryController({"thresholds": {"warning": 70, "critical": 60, "emergency": 95}})
    with pytest.raises(ConfigError) as caught:
        SimpleMemoryController(max_cache_agee=5)
    assert caught.value.key == "memory.max_cache_agee"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"config": 70}, "memory"),
        ({"limit_reader": 2**30}, "memory.limit_reader"),
        ({"rss_reader": "rss"}, "memory.rss_reader"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs: dict[str, object], key: str) -> None:
    # A bare TypeError for the config; the readers were taken and failed at every sample on
    # the background thread, memory unwatched.
    with pytest.raises(ConfigError) as caught:
        SimpleMemoryController(**kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key


def test_register_validates(controller: SimpleMemoryController) -> None:
    with pytest.raises(ConfigError, match=r"memory\.cache\.priority"):
        controller.register_cache("c", {}, priority="urgent")
    with pytest.raises(ConfigError, match=r"memory\.cache\.max_age"):
        controller.register_cache("c", {}, max_age=0)
    with pytest.raises(TypeError):
        controller.register_cache("c", 3)
    with pytest.raises(ConfigError, match=r"memory\.cleanup\.level"):
        controller.cleanup("severe")
    with pytest.raises(ConfigError, match=r"memory\.cleanup\.trigger"):
        controller.cleanup("standard", trigger="cron")
    with pytest.raises(ConfigError, match=r"memory\.prediction\.severity='dire'.*one of low"):
        controller.on_prediction("memory", "dire")


def test_stats_shape_with_real_readings() -> None:
    controller = SimpleMemoryController()
    controller.register_cache("memo", {"a": 1}, priority="low", max_age=10)
    stats = controller.get_memory_stats()
    system = stats["system_memory"]
    assert isinstance(system, dict)
    assert 0 < system["usage_percentage"] < 100
    assert system["total"] == psutil.virtual_memory().total
    process = stats["process"]
    assert isinstance(process, dict)
    rss = psutil.Process().memory_info().rss
    assert abs(process["rss"] - rss) < 64 << 20
    assert process["vms"] >= process["rss"]
    limit = stats["limit"]
    assert isinstance(limit, dict)
    assert limit["source"] in ("cgroup", "physical")
    assert 0 < limit["usage_ratio"] < 1
    # The usage shown is the one the ratio counts (RSS against physical memory).
    assert abs(limit["usage_bytes"] / limit["bytes"] - limit["usage_ratio"]) < 0.01
    assert stats["caches"] == {
        "memo": {"entries": 1, "priority": "low", "max_age": 10, "kind": "dict"}
    }
    gc_stats = stats["gc"]
    assert isinstance(gc_stats, dict)
    assert len(gc_stats["counts"]) == 3
    assert len(gc_stats["collections"]) == 3


def test_standard_expires_old_entries_only(
    controller: SimpleMemoryController, clock: FakeClock, events: list[Event]
) -> None:
    cache = {"old": 1}
    controller.register_cache("memo", cache, max_age=100)
    clock.advance(60)
    cache["new"] = 2
    controller.cleanup("standard")  # first sight of "new"
    clock.advance(50)
    result = controller.cleanup("standard")
    assert cache == {"new": 2}
    assert result.evicted == {"memo": 1}
    assert result.cleared == ()
    assert result.malloc_trim is False
    assert events[-1] == MemoryCleanupFinished(
        level="standard",
        trigger="manual",
        bytes_freed=0,
        entries_evicted=1,
        duration_s=0.0,
    )


def test_critical_clears_low_priority_and_tightens_age(
    controller: SimpleMemoryController, clock: FakeClock
) -> None:
    low = {i: i for i in range(10)}
    normal: OrderedDict[int, int] = OrderedDict((i, i) for i in range(5))
    high = {1: 1}
    controller.register_cache("low", low, priority="low")
    controller.register_cache("normal", normal)
    controller.register_cache("high", high, priority="high", max_age=100_000)
    clock.advance(2000)  # past max_working_age (1800), below max_cache_age (3600)
    result = controller.cleanup(CleanupLevel.CRITICAL)
    assert result.cleared == ("low",)
    assert result.evicted == {"low": 10, "normal": 5, "high": 1}
    assert (low, dict(normal), high) == ({}, {}, {})


def test_emergency_clears_every_cache_and_trims(controller: SimpleMemoryController) -> None:
    @functools.cache
    def double(x: int) -> int:
        return 2 * x

    for i in range(4):
        double(i)
    cleared: list[str] = []
    controller.register_cache("fn", double, priority="high")
    controller.register_cache("dict", {1: 1}, priority="high")

    def evictor(level: str, max_age: float) -> int:
        cleared.append(level)
        return 3

    controller.register_cache("custom", evictor)
    result = asyncio.run(controller.manual_cleanup("emergency"))
    assert result.evicted == {"fn": 4, "dict": 1, "custom": 3}
    assert cleared == ["emergency"]
    assert double.cache_info().currsize == 0
    assert result.malloc_trim is malloc_trim()
    assert result.trigger == "manual"


def test_a_failing_cache_is_reported_and_the_rest_cleaned(
    controller: SimpleMemoryController,
) -> None:
    def broken(level: str, age: float) -> int:
        raise RuntimeError("boom")

    good = {1: 1}
    controller.register_cache("broken", broken)
    controller.register_cache("good", good)
    result = controller.cleanup("emergency")
    assert good == {}
    assert result.evicted == {"good": 1}


def test_unregister(controller: SimpleMemoryController) -> None:
    cache = {1: 1}
    controller.register_cache("c", cache)
    assert controller.unregister_cache("c") is True
    assert controller.unregister_cache("c") is False
    controller.cleanup("emergency")
    assert cache == {1: 1}


def test_pressure_crossings_publish_and_clean_with_cooldown(
    controller: SimpleMemoryController,
    clock: FakeClock,
    readings: Readings,
    events: list[Event],
) -> None:
    cache = {i: i for i in range(3)}
    controller.register_cache("low", cache, priority="low")
    assert controller.check() is None
    readings.rss = int(0.90 * GIB)
    result = controller.check()
    assert result is not None
    assert (result.level, result.trigger) == ("critical", "pressure")
    assert cache == {}
    assert events[0] == MemoryPressureChanged(
        level="critical", previous="normal", usage_ratio=readings.rss / GIB
    )
    assert isinstance(events[1], MemoryCleanupFinished)
    assert events[1].trigger == "pressure"
    assert controller.pressure is PressureLevel.CRITICAL
    # Still critical 10 s later: the 30 s cooldown holds the next automatic run back.
    clock.advance(10)
    assert controller.check() is None
    assert len(events) == 2
    # Manual runs ignore the cooldown.
    assert controller.cleanup("standard").skipped == ""
    readings.rss = GIB // 2
    clock.advance(30)
    controller.check()
    assert events[-1] == MemoryPressureChanged(level="normal", previous="critical", usage_ratio=0.5)


def test_a_pressure_escalation_is_not_held_back_by_a_weaker_runs_cooldown(
    controller: SimpleMemoryController, clock: FakeClock, readings: Readings
) -> None:
    # The scheduled housekeeping ran a moment before memory shot up: the emergency cleanup
    # waited out its cooldown (30 s here, a minute by default) while the process headed for
    # the OOM killer.
    cache = {i: i for i in range(3)}
    controller.register_cache("sessions", cache, priority="high")
    clock.advance(300)
    scheduled = controller.check()
    assert scheduled is not None
    assert (scheduled.level, scheduled.trigger, scheduled.skipped) == ("standard", "scheduled", "")
    clock.advance(5)
    readings.rss = int(0.96 * GIB)
    emergency = controller.check()
    assert emergency is not None
    assert (emergency.level, emergency.trigger, emergency.skipped) == ("emergency", "pressure", "")
    assert cache == {}
    # The cooldown still paces repeated runs of a level.
    clock.advance(5)
    assert controller.check() is None


def test_useless_automatic_runs_back_off_but_manual_runs_still_run(
    controller: SimpleMemoryController, clock: FakeClock, readings: Readings
) -> None:
    readings.rss = int(0.75 * GIB)  # warning: standard cleanups that free nothing
    ran = []
    for _ in range(6):
        result = controller.check()
        ran.append(result is not None and not result.skipped)
        clock.advance(31)
    assert ran == [True, True, True, False, False, False]
    skipped = controller.cleanup("standard", trigger="pressure")
    assert skipped.skipped == "ineffective"
    assert controller.cleanup("standard").skipped == ""
    stats = controller.get_memory_stats()
    assert stats["pressure"] == {
        "level": "warning",
        "useless_runs": {"standard": 4, "critical": 0, "emergency": 0},
    }


def test_scheduled_standard_cleanup(
    controller: SimpleMemoryController, clock: FakeClock, events: list[Event]
) -> None:
    assert controller.check() is None
    clock.advance(300)
    result = controller.check()
    assert result is not None
    assert (result.level, result.trigger) == ("standard", "scheduled")


def test_auto_cleanup_off_skips_automatic_runs(runtime: Runtime, readings: Readings) -> None:
    controller = SimpleMemoryController(
        runtime=runtime,
        limit_reader=readings.limit,
        rss_reader=readings.read_rss,
        auto_cleanup=False,
    )
    assert controller.cleanup("emergency", trigger="pressure").skipped == "disabled"
    assert controller.cleanup("emergency").skipped == ""
    controller.start()
    assert not controller.running


def test_a_prediction_escalating_past_the_last_automatic_run_skips_the_cooldown(
    controller: SimpleMemoryController, clock: FakeClock, readings: Readings
) -> None:
    # The predictor's escalation to a stronger cleanup landed in the cooldown of a pressure
    # run and was dropped: "an escalation gets its stronger cleanup at once".
    cache = {i: i for i in range(3)}
    controller.register_cache("low", cache, priority="low")
    readings.rss = int(0.75 * GIB)
    first = controller.check()  # warning: a standard pressure cleanup
    assert first is not None
    assert (first.level, first.skipped) == ("standard", "")
    clock.advance(10)  # within the 30 s cooldown
    assert controller.cleanup("standard", "prediction").skipped == "cooldown"  # no stronger
    assert controller.cleanup("standard", "scheduled").skipped == "cooldown"  # never escalates
    stronger = controller.cleanup("critical", "prediction")
    assert stronger.skipped == ""
    assert cache == {}  # the critical level cleared the low-priority cache
    clock.advance(10)
    assert controller.cleanup("critical", "prediction").skipped == "cooldown"
    assert controller.cleanup("emergency", "prediction").skipped == ""


def test_an_automatic_cleanup_does_not_wait_for_one_that_hangs(
    controller: SimpleMemoryController, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An evictor that blocks held the cleanup lock for good, and every automatic cleanup
    # (the predictor's too) queued behind it for good.
    monkeypatch.setattr(memory_module, "_BUSY_WAIT_S", 0.05)
    entered, release = threading.Event(), threading.Event()

    def hangs(level: str, max_age: float) -> int:
        entered.set()
        release.wait(10)
        return 0

    controller.register_cache("remote", hangs)
    manual = threading.Thread(target=controller.cleanup, args=("standard",), daemon=True)
    manual.start()
    assert entered.wait(5)
    try:
        busy = controller.cleanup("critical", trigger="prediction")
        assert busy.skipped == "busy"
        assert controller.cleanup("critical", trigger="pressure").skipped == "busy"
    finally:
        release.set()
        manual.join(5)
    # A run that could not start did not take the cooldown: the next one runs at once.
    controller.unregister_cache("remote")
    assert controller.cleanup("critical", trigger="pressure").skipped == ""


def test_a_check_interval_longer_than_a_day_is_refused() -> None:
    # threading's wait raised OverflowError above TIMEOUT_MAX (about 292 years on Linux) and
    # the background thread died with a traceback.
    with pytest.raises(ConfigError) as caught:
        SimpleMemoryController(check_interval=1e10)
    assert caught.value.key == "memory.check_interval"
    assert SimpleMemoryController(check_interval=86400).options.check_interval == 86400


def test_on_prediction_maps_severity(controller: SimpleMemoryController) -> None:
    assert controller.on_prediction("cpu", "critical") is None
    assert controller.on_prediction("memory", "low") is None
    result = controller.on_prediction("memory", "high")
    assert result is not None
    assert (result.level, result.trigger) == ("critical", "prediction")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_read_memory_limit_cgroup_v2_v1_and_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/app.slice/web\n")
    _write(tmp_path / "fs/app.slice/web/memory.max", "536870912\n")
    _write(tmp_path / "fs/app.slice/web/memory.current", "134217728\n")
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(512 << 20, "cgroup", 128 << 20)

    _write(tmp_path / "fs/app.slice/web/memory.max", "max\n")
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit.source == "physical"
    assert limit.bytes == psutil.virtual_memory().total

    _write(proc, "4:memory:/docker/abc\n0::/\n")
    _write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", str(256 << 20))
    _write(tmp_path / "fs/memory/docker/abc/memory.usage_in_bytes", str(64 << 20))
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(256 << 20, "cgroup", 64 << 20)

    limit = read_memory_limit(proc_self_cgroup=str(tmp_path / "missing"))
    assert limit.source == "physical"


def test_controller_uses_cgroup_usage_against_the_cgroup_limit(runtime: Runtime) -> None:
    controller = SimpleMemoryController(
        runtime=runtime,
        limit_reader=lambda: MemoryLimit(1000, "cgroup", 960),
        rss_reader=lambda: 1,
    )
    ratio, limit = controller.usage_ratio()
    assert ratio == 0.96
    assert limit.source == "cgroup"


def test_background_thread_samples_and_stops(runtime: Runtime, readings: Readings) -> None:
    readings.rss = int(0.97 * GIB)
    seen = threading.Event()
    runtime.bus.subscribe(lambda event: seen.set())
    controller = SimpleMemoryController(
        runtime=runtime,
        limit_reader=readings.limit,
        rss_reader=readings.read_rss,
        check_interval=0.01,
    )
    controller.start()
    try:
        assert controller.running
        assert seen.wait(5)
    finally:
        controller.stop()
    assert controller.pressure is PressureLevel.EMERGENCY
    assert not controller.running


def _run_child(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_without_the_parents_cleanups() -> None:
    result = _run_child(
        """
        import asyncio, json, os
        from otel_raptor.runtime.memory import SimpleMemoryController
        from otel_raptor.runtime.state import Runtime
        c = SimpleMemoryController(runtime=Runtime())
        for _ in range(3):  # useless cleanups (nothing to free): the learner backs off
            asyncio.run(c.manual_cleanup("standard"))
        parent = len(c.get_memory_stats()["cleanups"])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(len(c.get_memory_stats()["cleanups"])).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps({"parent": parent, "child": int(os.read(r, 8))}))
        """
    )
    assert result == {"parent": 3, "child": 0}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_thread_restarts_in_a_forked_child() -> None:
    result = _run_child(
        """
        import json, os
        from otel_raptor.runtime.memory import SimpleMemoryController
        c = SimpleMemoryController(check_interval=0.05)
        c.start()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"1" if c.running and c._thread.ident is not None else b"0")
            c.stop()
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps({"child_running": os.read(r, 1) == b"1", "parent": c.running}))
        """
    )
    assert result == {"child_running": True, "parent": True}


ALLOCATE = """
    import asyncio, gc, json, os, psutil
    from otel_raptor.runtime.memory import SimpleMemoryController
    from otel_raptor.runtime.state import Runtime
    proc = psutil.Process()
    c = SimpleMemoryController(runtime=Runtime())
    baseline = proc.memory_info().rss
    cache = {{}}
    c.register_cache("cache", cache, priority="high")
    {fill}
    filled = proc.memory_info().rss
    result = asyncio.run(c.manual_cleanup("emergency"))
    after = proc.memory_info().rss
    print(json.dumps({{"allocated": filled - baseline, "freed": filled - after,
                      "reported": result.bytes_freed, "entries": len(cache),
                      "evicted": result.entries_evicted, "trim": result.malloc_trim}}))
"""


def test_a_200_mb_cache_of_large_values_is_returned_at_emergency() -> None:
    # 200 x 1 MiB of non-zero bytes (zeroed pages would never be touched, so never resident).
    fill = "for i in range(200): cache[i] = bytes([i % 251 + 1]) * (1 << 20)"
    result = _run_child(ALLOCATE.format(fill=fill))
    allocated = result["allocated"]
    assert isinstance(allocated, int)
    assert allocated > 190 << 20
    assert result["entries"] == 0
    assert result["evicted"] == 200
    assert isinstance(result["freed"], int)
    assert result["freed"] >= 0.5 * allocated
    assert isinstance(result["reported"], int)
    assert result["reported"] >= 0.5 * allocated


def test_many_small_strings_are_returned() -> None:
    # ~390 MB RSS for 1.6 million 100-byte strings: pymalloc arenas, which CPython unmaps
    # itself once empty, so these come back with or without malloc_trim.
    fill = "for i in range(1_600_000): cache[i] = (str(i) * 40)[:100]"
    result = _run_child(ALLOCATE.format(fill=fill))
    allocated = result["allocated"]
    assert isinstance(allocated, int)
    assert allocated > 150 << 20
    assert result["evicted"] == 1_600_000
    assert isinstance(result["freed"], int)
    assert result["freed"] >= 0.5 * allocated


NO_TRIM = "import otel_raptor.runtime.memory as m; m._MALLOC_TRIM = None\n    "


@pytest.mark.skipif(not malloc_trim(), reason="malloc_trim needs glibc")
def test_malloc_trim_returns_mid_sized_objects_that_free_alone_does_not() -> None:
    # 400 000 x 600-byte bytearrays (~300 MB): above pymalloc's 512-byte limit, below the mmap
    # threshold, so they sit in glibc's heap; free() keeps the pages until malloc_trim.
    fill = "for i in range(400_000): cache[i] = bytearray(600)"
    with_trim = _run_child(ALLOCATE.format(fill=fill))
    without = _run_child(
        ALLOCATE.replace(
            "c = SimpleMemoryController", NO_TRIM + "c = SimpleMemoryController"
        ).format(fill=fill)
    )
    for result in (with_trim, without):
        assert isinstance(result["allocated"], int)
        assert result["allocated"] > 250 << 20
        assert result["evicted"] == 400_000
    assert with_trim["trim"] is True
    assert without["trim"] is False
    assert isinstance(with_trim["freed"], int)
    assert isinstance(without["freed"], int)
    assert with_trim["freed"] >= 0.9 * with_trim["allocated"]  # type: ignore[operator]
    assert without["freed"] < 0.5 * without["allocated"]  # type: ignore[operator]


def test_the_cgroup_usage_leaves_out_the_inactive_page_cache(tmp_path: Path) -> None:
    # The kernel fills a cgroup with page cache up to its limit and reclaims it before it
    # kills anything: counted as usage, an app that writes files would sit at emergency.
    proc = tmp_path / "cgroup"
    _write(proc, "0::/app\n")
    _write(tmp_path / "fs/app/memory.max", str(512 << 20))
    _write(tmp_path / "fs/app/memory.current", str(542 << 20))
    _write(tmp_path / "fs/app/memory.stat", f"anon {30 << 20}\ninactive_file {507 << 20}\n")
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(512 << 20, "cgroup", 35 << 20)

    _write(proc, "4:memory:/docker/abc\n")  # v1 names the hierarchy's total
    _write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", str(256 << 20))
    _write(tmp_path / "fs/memory/docker/abc/memory.usage_in_bytes", str(250 << 20))
    _write(
        tmp_path / "fs/memory/docker/abc/memory.stat",
        f"inactive_file {1 << 20}\ntotal_inactive_file {200 << 20}\n",
    )
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(256 << 20, "cgroup", 50 << 20)


def test_a_limit_set_on_an_ancestor_cgroup_binds(tmp_path: Path) -> None:
    # A container with no limit of its own in a limited pod (or a unit in a limited slice):
    # the kernel holds the pod's whole subtree to the pod's limit, so that is the one to use.
    proc = tmp_path / "cgroup"
    _write(proc, "0::/kubepods/pod1/app\n")
    _write(tmp_path / "fs/kubepods/memory.max", "max\n")
    _write(tmp_path / "fs/kubepods/pod1/memory.max", str(1 << 30))
    _write(tmp_path / "fs/kubepods/pod1/memory.current", str(700 << 20))
    _write(tmp_path / "fs/kubepods/pod1/app/memory.max", "max\n")
    _write(tmp_path / "fs/kubepods/pod1/app/memory.current", str(600 << 20))
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(1 << 30, "cgroup", 700 << 20)

    # A leaf limit below the parent's is the one that binds.
    _write(tmp_path / "fs/kubepods/pod1/app/memory.max", str(512 << 20))
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(512 << 20, "cgroup", 600 << 20)

    # v1 the same way (its unlimited root reads as a huge number).
    _write(proc, "4:memory:/slice/unit\n")
    _write(tmp_path / "fs/memory/memory.limit_in_bytes", str(2**63 - 4096))
    _write(tmp_path / "fs/memory/slice/memory.limit_in_bytes", str(256 << 20))
    _write(tmp_path / "fs/memory/slice/memory.usage_in_bytes", str(64 << 20))
    _write(tmp_path / "fs/memory/slice/unit/memory.limit_in_bytes", str(2**63 - 4096))
    _write(tmp_path / "fs/memory/slice/unit/memory.usage_in_bytes", str(32 << 20))
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(256 << 20, "cgroup", 64 << 20)


def test_a_v1_container_without_a_cgroup_namespace_finds_its_limit_at_the_mount_root(
    tmp_path: Path,
) -> None:
    # /proc/self/cgroup names the host's path, which does not exist inside the container.
    proc = tmp_path / "cgroup"
    _write(proc, "4:memory:/docker/0123abcd\n")
    _write(tmp_path / "fs/memory/memory.limit_in_bytes", str(512 << 20))
    _write(tmp_path / "fs/memory/memory.usage_in_bytes", str(100 << 20))
    limit = read_memory_limit(proc_self_cgroup=str(proc), cgroup_root=str(tmp_path / "fs"))
    assert limit == MemoryLimit(512 << 20, "cgroup", 100 << 20)


def test_a_cachetools_cache_is_cleaned_under_the_apps_lock_while_the_app_uses_it() -> None:
    # A cachetools cache is plain Python: the controller's thread evicting from it half-way
    # through an app's `cache[key] = value` broke that call ("OrderedDict mutated during
    # iteration" from its LRU bookkeeping), even with every access of the app's under its
    # lock, since the controller never took it. It takes the lock it is given now.
    cachetools = pytest.importorskip("cachetools")
    cache = cachetools.LRUCache(maxsize=300)
    lock = threading.Lock()

    @cachetools.cached(cache, lock=lock)
    def render(key: int) -> bytes:
        return b"x" * key

    controller = SimpleMemoryController(runtime=Runtime())
    controller.register_cache("render", cache, max_age=0.001, lock=lock)
    with pytest.raises(ConfigError, match=r"memory\.cache\.lock"):
        controller.register_cache("bad", {}, lock=object())  # type: ignore[arg-type]
    stop = threading.Event()
    failures: list[BaseException] = []
    cleanups = 0

    def clean() -> None:
        nonlocal cleanups
        while not stop.is_set():
            controller.cleanup("standard")
            cleanups += 1

    async def app() -> None:  # an event loop and a thread of the app's, both through the lock
        for round_ in range(400):
            for key in range(round_ % 7, 1000, 7):
                render(key)
            await asyncio.sleep(0)

    def in_thread(run: object) -> threading.Thread:
        def target() -> None:
            try:
                asyncio.run(app()) if run is app else [render(k % 999) for k in range(200_000)]
            except BaseException as failure:  # handed to the test thread
                failures.append(failure)

        return threading.Thread(target=target)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches anywhere, as a long-running app meets them
    try:
        cleaner = threading.Thread(target=clean)
        cleaner.start()
        users = [in_thread(app), in_thread(None)]
        for user in users:
            user.start()
        for user in users:
            user.join(timeout=30)
        stop.set()
        cleaner.join(timeout=30)
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[0]
    assert cleanups > 0
    assert cache.currsize == len(cache) == len(list(cache))  # its bookkeeping still whole
