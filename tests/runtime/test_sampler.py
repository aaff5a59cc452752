"""The psutil sampler, with real readings of this process."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import ErrorClassified
from otel_raptor.errors import ConfigError
from otel_raptor.runtime.bus import EventBus
from otel_raptor.runtime.sampler import DiskUsage, ResourceSampler, cgroup_memory
from tests.support.clock import FakeClock


def test_readings_are_plausible() -> None:
    sample = ResourceSampler().sample()
    assert sample.pid == os.getpid()
    assert 0 < sample.process_rss < sample.memory_total
    assert sample.process_rss < sample.memory_limit <= sample.memory_total
    assert 0 < sample.memory_current <= sample.memory_limit * 1.05
    assert 0.0 < sample.memory_ratio < 1.0
    assert 0 < sample.memory_available <= sample.memory_total
    assert sample.threads >= 1
    assert sample.open_fds is not None
    assert sample.open_fds >= 3
    assert sample.fd_limit is not None
    assert sample.fd_limit >= sample.open_fds
    (disk,) = sample.disks
    assert disk.mount == "/"
    assert 0 < disk.used < disk.total
    assert disk.free is not None
    assert 0 < disk.used + disk.free <= disk.total
    # What df and psutil call the use percentage: the app's own view of how full it is.
    assert disk.ratio == pytest.approx(psutil.disk_usage("/").percent / 100, abs=0.01)
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert sample.net_errors_per_s == 0.0  # the first sample has no delta yet
    assert sample.process_memory_limit == sample.memory_limit


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_first_cpu_reading_on_another_thread_measures_since_the_sampler_was_made() -> None:
    sampler = ResourceSampler()  # made on this thread; sampled on the predictor's
    busy = threading.Thread(target=_spin, args=(0.4,))
    busy.start()
    busy.join()  # one CPU busy for 0.4 s: at least a share of the machine's CPU since then
    readings: list[float] = []
    reader = threading.Thread(target=lambda: readings.append(sampler.sample().cpu_percent))
    reader.start()
    reader.join()
    # psutil.cpu_percent's baseline is per thread: a first call on a new thread read 0.0.
    assert readings[0] >= 100.0 / (os.cpu_count() or 1) / 4
    # Another caller of psutil.cpu_percent in between does not move the sampler's baseline.
    _spin(0.3)
    psutil.cpu_percent(None)
    assert sampler.sample().cpu_percent >= 100.0 / (os.cpu_count() or 1) / 4
    sampler.close()


def test_a_disk_is_full_when_an_unprivileged_writer_can_write_no_more() -> None:
    # used / total put a full default ext4 (5 % reserved for root) at 0.95: never exhausted.
    full = DiskUsage(mount="/", used=95, free=0, total=100)
    assert full.ratio == 1.0
    assert DiskUsage(mount="/", used=45, free=45, total=100).ratio == 0.5
    assert DiskUsage(mount="/", used=45, total=100).ratio == 0.45  # free unknown
    assert DiskUsage(mount="/", used=0, free=0, total=0).ratio == 0.0


def test_sockets_are_counted_from_proc() -> None:
    import socket

    sampler = ResourceSampler()
    before = sampler.sample().connections
    if before is None:
        pytest.skip("no /proc on this platform")
    with socket.socket(), socket.socket():
        assert sampler.sample().connections == before + 2


def test_error_rates_come_from_the_bus() -> None:
    bus = EventBus()
    clock = FakeClock()
    sampler = ResourceSampler(bus=bus, clock=clock)
    sampler.sample()
    error = Classification(
        category=ErrorCategory.TIMEOUT, severity=Severity.MEDIUM, retryable=True, error_type="x"
    )
    for _ in range(6):
        bus.publish(ErrorClassified("api:443", error, 1))
    bus.publish(ErrorClassified("db:5432", error, 1))
    clock.advance(2.0)
    assert sampler.sample().error_rates == {"api:443": 3.0, "db:5432": 0.5}
    clock.advance(1.0)
    assert sampler.sample().error_rates == {}
    sampler.close()
    bus.publish(ErrorClassified("api:443", error, 1))
    clock.advance(1.0)
    assert sampler.sample().error_rates == {}


def test_a_given_pid_and_limit_are_watched() -> None:
    sampler = ResourceSampler(pid=os.getppid(), process_memory_limit=10**12)
    sample = sampler.sample()
    assert sample.pid == os.getppid()
    assert sample.process_memory_limit == 10**12
    assert sample.memory_limit != 10**12


def test_cgroup_detection_matches_the_host() -> None:
    found = cgroup_memory()
    if found is None:
        pytest.skip("not in a cgroup with memory files")
    assert found.version in (1, 2)
    assert found.limit_file is not None
    assert found.limit_file.is_file()


def test_one_sample_is_cheap() -> None:
    sampler = ResourceSampler()
    sampler.sample()
    runs = 50
    started = time.perf_counter()
    for _ in range(runs):
        sampler.sample()
    per_sample = (time.perf_counter() - started) / runs
    print(f"one sample: {per_sample * 1000:.3f} ms")
    assert per_sample < 0.05  # loose: about 0.3 ms measured on a 2-core VM


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"pid": -5}, "sampler.pid"),
        ({"mounts": "/"}, "sampler.mounts"),
        ({"mounts": ["/", ""]}, "sampler.mounts"),
        ({"process_memory_limit": 0}, "sampler.process_memory_limit"),
        ({"process_memory_limit": 1.5}, "sampler.process_memory_limit"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ResourceSampler(**kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key
