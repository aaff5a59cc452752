from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable
from typing import Any

import pytest

from otel_raptor.core.breaker import BreakerCore, CircuitBreakerConfig, Permit
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import BreakerTransitioned, CallRejected, Event
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.errors import CircuitOpenError, ConfigError
from otel_raptor.runtime.breaker import OTHER_BREAKER, BreakerRegistry, CircuitBreaker
from tests.support.clock import FakeClock

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
R = TransitionReason


class Boom(Exception):
    pass


class BadRequest(Exception):
    pass


def classification(category: ErrorCategory) -> Classification:
    return Classification(
        category=category, severity=Severity.MEDIUM, retryable=False, error_type="test"
    )


def classifier(exc: BaseException) -> Classification:
    if isinstance(exc, BadRequest):
        return classification(ErrorCategory.CLIENT_ERROR)
    return classification(ErrorCategory.SERVER_ERROR)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)


def config(**options: Any) -> CircuitBreakerConfig:
    options.setdefault("failure_threshold", 2)
    options.setdefault("recovery_timeout", 10.0)
    options.setdefault("recovery_jitter", 0.0)
    options.setdefault("success_threshold", 1)
    options.setdefault("adaptive_threshold", False)
    return CircuitBreakerConfig(**options)


def make(clock: FakeClock, sink: Any = None, **options: Any) -> CircuitBreaker:
    return CircuitBreaker(
        "payments", config(**options), clock=clock, sink=sink, classifier=classifier
    )


def boom() -> None:
    raise Boom("down")


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.config.failure_threshold):
        with pytest.raises(Boom):
            breaker.call_sync(boom)
    assert breaker.state is OPEN


# --- call_sync -------------------------------------------------------------------------------


def test_call_sync_returns_the_result_unchanged(clock: FakeClock) -> None:
    breaker = make(clock)
    result = object()

    def pair(x: int, *, y: int) -> tuple[int, int, object]:
        return (x, y, result)

    assert breaker.call_sync(pair, 1, y=2) == (1, 2, result)
    assert breaker.snapshot().window_calls == 1


def test_failures_trip_then_calls_are_refused(clock: FakeClock) -> None:
    sink = Recorder()
    breaker = make(clock, sink)
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert sink.events == []
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert sink.events == [
        BreakerTransitioned("payments", CLOSED, OPEN, R.CONSECUTIVE_FAILURES, 10.0)
    ]
    clock.advance(4.0)
    called: list[int] = []
    with pytest.raises(CircuitOpenError) as info:
        breaker.call_sync(called.append, 1)
    assert called == []
    assert info.value.breaker == "payments"
    assert info.value.retry_after == 6.0
    assert sink.events[-1] == CallRejected("payments", OPEN, 6.0)


def test_probe_after_recovery_timeout_closes(clock: FakeClock) -> None:
    sink = Recorder()
    breaker = make(clock, sink)
    trip(breaker)
    clock.advance(10.0)
    assert breaker.call_sync(lambda: "ok") == "ok"
    assert breaker.state is CLOSED
    assert [(e.from_state, e.to_state, e.reason) for e in sink.events[1:]] == [  # type: ignore[union-attr]
        (OPEN, HALF_OPEN, R.RECOVERY_TIMEOUT_ELAPSED),
        (HALF_OPEN, CLOSED, R.PROBES_SUCCEEDED),
    ]


def test_durations_come_from_the_clock(clock: FakeClock) -> None:
    breaker = make(
        clock,
        failure_threshold=100,
        window_size=2,
        minimum_calls=2,
        slow_call_duration=1.0,
        slow_call_rate_threshold=1.0,
    )

    def slow() -> str:
        clock.advance(1.5)
        return "late"

    assert breaker.call_sync(slow) == "late"
    assert breaker.state is CLOSED
    assert breaker.call_sync(slow) == "late"
    assert breaker.state is OPEN
    assert breaker.snapshot().window_slow_calls == 2


def test_ignored_categories_do_not_trip(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    def bad() -> None:
        raise BadRequest

    for _ in range(5):
        with pytest.raises(BadRequest):
            breaker.call_sync(bad)
    assert breaker.state is CLOSED
    assert dict(breaker.snapshot().failure_counts) == {ErrorCategory.CLIENT_ERROR: 5}


def test_a_broken_classifier_counts_unknown_and_keeps_the_error(clock: FakeClock) -> None:
    def broken(exc: BaseException) -> Classification:
        raise RuntimeError("classifier bug")

    breaker = CircuitBreaker("x", config(failure_threshold=1), clock=clock, classifier=broken)
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert breaker.state is OPEN
    assert dict(breaker.snapshot().failure_counts) == {ErrorCategory.UNKNOWN: 1}


def test_default_classifier_is_used(clock: FakeClock) -> None:
    breaker = CircuitBreaker("x", config(failure_threshold=1), clock=clock)

    def timeout() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        breaker.call_sync(timeout)
    assert breaker.state is OPEN
    assert dict(breaker.snapshot().failure_counts) == {ErrorCategory.TIMEOUT: 1}


def test_a_failing_sink_does_not_break_calls(clock: FakeClock) -> None:
    class Broken:
        def publish(self, event: Event) -> None:
            raise RuntimeError("sink bug")

    breaker = make(clock, Broken())
    trip(breaker)
    with pytest.raises(CircuitOpenError):
        breaker.call_sync(lambda: None)
    clock.advance(10.0)
    assert breaker.call_sync(lambda: 3) == 3


def test_base_exceptions_are_not_failures(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call_sync(interrupted)
    assert breaker.state is CLOSED
    trip(breaker)
    clock.advance(10.0)
    with pytest.raises(KeyboardInterrupt):
        breaker.call_sync(interrupted)  # the probe is released, not failed
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight) == (HALF_OPEN, 0)
    assert breaker.call_sync(lambda: 1) == 1
    assert breaker.state is CLOSED


# --- async -----------------------------------------------------------------------------------


def test_async_call_awaits_coroutines_and_plain_results(clock: FakeClock) -> None:
    breaker = make(clock)

    async def coro(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    def returns_awaitable() -> Awaitable[str]:
        return asyncio.sleep(0, result="awaited")

    async def main() -> None:
        assert await breaker.call(coro, 1) == 2
        assert await breaker.call(lambda: "plain") == "plain"
        assert await breaker.call(returns_awaitable) == "awaited"

    asyncio.run(main())
    assert breaker.snapshot().window_calls == 3


def test_async_failures_trip_and_refuse(clock: FakeClock) -> None:
    sink = Recorder()
    breaker = make(clock, sink)

    async def fails() -> None:
        await asyncio.sleep(0)
        raise Boom

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(Boom):
                await breaker.call(fails)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(fails)
        assert info.value.retry_after == 10.0

    asyncio.run(main())
    assert isinstance(sink.events[-1], CallRejected)


def test_cancellation_releases_the_probe_and_is_not_counted(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1)
    trip(breaker)
    clock.advance(10.0)

    async def main() -> None:
        started = asyncio.Event()

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(breaker.call(hang))
        await started.wait()
        assert breaker.snapshot().probes_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight) == (HALF_OPEN, 0)
        assert dict(snap.failure_counts) == {ErrorCategory.SERVER_ERROR: 1}  # the trip only
        assert await breaker.call(lambda: "next probe") == "next probe"

    asyncio.run(main())
    assert breaker.state is CLOSED


# --- low-level API ---------------------------------------------------------------------------


def test_low_level_api(clock: FakeClock) -> None:
    sink = Recorder()
    breaker = make(clock, sink, failure_threshold=1, success_threshold=2, half_open_max_calls=1)
    permit = breaker.acquire()
    assert permit is Permit.CALL
    breaker.record_failure(permit, 0.1, classification(ErrorCategory.TIMEOUT))
    assert breaker.state is OPEN
    assert breaker.acquire() is Permit.REJECTED
    error = breaker.reject_error()
    assert isinstance(error, CircuitOpenError)
    assert (error.breaker, error.retry_after) == ("payments", 10.0)
    assert sink.events[-1] == CallRejected("payments", OPEN, 10.0)
    clock.advance(10.0)
    probe = breaker.acquire()
    assert probe is Permit.PROBE
    assert breaker.acquire() is Permit.REJECTED  # one probe at a time
    breaker.release(probe)
    probe = breaker.acquire()
    breaker.record_success(probe, 0.1)
    assert breaker.state is HALF_OPEN
    probe = breaker.acquire()
    breaker.record_success(probe, 0.1)
    assert breaker.state is CLOSED
    assert [e.reason for e in sink.events if isinstance(e, BreakerTransitioned)] == [
        R.CONSECUTIVE_FAILURES,
        R.RECOVERY_TIMEOUT_ELAPSED,
        R.PROBES_SUCCEEDED,
    ]


def test_a_probe_that_outlives_its_half_open_episode_decides_nothing_in_the_next(
    clock: FakeClock,
) -> None:
    breaker = make(clock, failure_threshold=1, success_threshold=1, half_open_max_calls=1)
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    clock.advance(10.0)
    started, answer = threading.Event(), threading.Event()
    results: list[str] = []

    def hangs() -> str:
        started.set()
        answer.wait(10.0)
        return "old news"

    old = threading.Thread(target=lambda: results.append(breaker.call_sync(hangs)))
    old.start()  # the first probe of half-open #1, stuck
    assert started.wait(10.0)
    clock.advance(10.0)  # its lease runs out: another probe goes, and fails
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert breaker.state is OPEN
    clock.advance(10.0)
    probe = breaker.acquire()  # half-open #2's probe, still in flight
    assert probe == Permit.PROBE
    answer.set()  # the stuck probe of half-open #1 succeeds at last
    old.join(10.0)
    assert results == ["old news"]
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight) == (HALF_OPEN, 1)
    assert breaker.acquire() is Permit.REJECTED
    breaker.record_success(probe, 0.1)
    assert breaker.state is CLOSED


def test_manual_control_publishes(clock: FakeClock) -> None:
    sink = Recorder()
    breaker = make(clock, sink)
    transition = breaker.force_open()
    assert transition is not None
    assert transition.reason is R.MANUAL_OPEN
    clock.advance(1e6)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call_sync(lambda: None)
    assert info.value.retry_after is None
    assert breaker.force_open() is None
    assert breaker.health_score == 0
    assert breaker.force_close() is not None
    assert breaker.health_score == 100
    breaker.force_open()
    assert breaker.reset() is not None
    assert breaker.reset() is None
    assert [
        (e.from_state, e.to_state, e.reason)
        for e in sink.events
        if isinstance(e, BreakerTransitioned)
    ] == [
        (CLOSED, OPEN, R.MANUAL_OPEN),
        (OPEN, CLOSED, R.MANUAL_CLOSE),
        (CLOSED, OPEN, R.MANUAL_OPEN),
        (OPEN, CLOSED, R.MANUAL_CLOSE),
    ]
    assert breaker.name == "payments"
    assert "payments" in repr(breaker)


def test_bad_arguments(clock: FakeClock) -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreaker("", clock=clock)
    assert info.value.key == "breaker.name"
    with pytest.raises(ConfigError) as info:
        CircuitBreaker("x", {"failure_threshold": 1}, clock=clock)  # type: ignore[arg-type]
    assert info.value.key == "breaker.config"
    with pytest.raises(ConfigError) as info:
        BreakerRegistry(max_breakers=0)
    assert info.value.key == "breaker.max_breakers"


# --- locking ---------------------------------------------------------------------------------


def test_events_are_published_after_the_lock_is_released(clock: FakeClock) -> None:
    seen: list[tuple[bool, CircuitState, int]] = []
    breaker: CircuitBreaker

    class CallsBack:
        def publish(self, event: Event) -> None:
            # These take the breaker's (non-reentrant) lock: a publish under it would hang.
            seen.append((breaker._lock.locked(), breaker.state, breaker.health_score))
            breaker.snapshot()

    breaker = make(clock, CallsBack(), failure_threshold=1)

    def scenario() -> None:
        with pytest.raises(Boom):
            breaker.call_sync(boom)  # trip
        with pytest.raises(CircuitOpenError):
            breaker.call_sync(boom)  # reject
        clock.advance(10.0)
        breaker.call_sync(lambda: None)  # half-open, then closed
        breaker.force_open()
        breaker.force_close()

    worker = threading.Thread(target=scenario, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "deadlock: an event was published under the lock"
    assert [locked for locked, _, _ in seen] == [False] * 6
    assert [state for _, state, _ in seen] == [OPEN, OPEN, HALF_OPEN, CLOSED, OPEN, CLOSED]


def test_half_open_admits_exactly_half_open_max_calls_under_contention(
    clock: FakeClock,
) -> None:
    cap, workers = 3, 32
    breaker = make(clock, failure_threshold=1, success_threshold=2, half_open_max_calls=cap)
    trip(breaker)
    clock.advance(10.0)

    barrier = threading.Barrier(workers)
    release = threading.Event()
    counted = threading.Condition()
    entered = rejected = 0
    errors: list[BaseException] = []

    def probe() -> str:
        nonlocal entered
        with counted:
            entered += 1
            counted.notify_all()
        release.wait(timeout=10)
        return "ok"

    def worker() -> None:
        nonlocal rejected
        barrier.wait(timeout=10)
        try:
            breaker.call_sync(probe)
        except CircuitOpenError:
            with counted:
                rejected += 1
                counted.notify_all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        with counted:
            assert counted.wait_for(lambda: entered + rejected == workers, timeout=10)
        # Every probe is blocked inside the call, so they all overlap.
        assert (entered, rejected) == (cap, workers - cap)
        assert breaker.snapshot().probes_in_flight == cap
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=10)
    assert errors == []
    snap = breaker.snapshot()
    assert (snap.state, snap.probes_in_flight) == (CLOSED, 0)


def test_concurrent_calls_keep_exact_counts(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10_000, window_size=10_000, minimum_calls=10_000)
    threads, per_thread = 8, 250
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait(timeout=10)
        for i in range(per_thread):
            if i % 5 == 0:
                with contextlib.suppress(Boom):
                    breaker.call_sync(boom)
            else:
                breaker.call_sync(lambda: None)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_failures) == (threads * per_thread, threads * 50)


# --- registry --------------------------------------------------------------------------------


def test_registry_returns_one_breaker_per_name(clock: FakeClock) -> None:
    sink = Recorder()
    registry = BreakerRegistry(clock=clock, sink=sink, classifier=classifier)
    special = config(failure_threshold=1)
    db = registry.get("db", special)
    assert registry.get("db") is db
    assert registry.get("db", config(failure_threshold=7)) is db  # config only on creation
    assert db.config is special
    assert registry.get("cache").config == CircuitBreakerConfig()
    with pytest.raises(Boom):
        db.call_sync(boom)  # the registry's sink and classifier are passed on
    assert db.state is OPEN
    assert isinstance(sink.events[-1], BreakerTransitioned)
    assert [name for name, _ in registry.items()] == ["db", "cache"]
    registry.reset_all()
    assert db.state is CLOSED


def test_registry_folds_names_beyond_the_bound_into_other(clock: FakeClock) -> None:
    registry = BreakerRegistry(max_breakers=3, clock=clock)
    named = [registry.get(f"host-{i}") for i in range(3)]
    assert len(registry) == 3
    extra = registry.get("host-3")
    assert extra.name == OTHER_BREAKER
    assert registry.get("host-4") is extra
    assert registry.get("host-1") is named[1]  # existing names keep their breakers
    assert len(registry) == 4
    assert [name for name, _ in registry.items()] == ["host-0", "host-1", "host-2", "other"]
    assert registry.max_breakers == 3


def test_registry_creation_is_race_free(clock: FakeClock) -> None:
    registry = BreakerRegistry(max_breakers=10, clock=clock)
    barrier = threading.Barrier(16)
    got: list[CircuitBreaker] = []

    def worker() -> None:
        barrier.wait(timeout=10)
        got.append(registry.get("shared"))

    pool = [threading.Thread(target=worker) for _ in range(16)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=10)
    assert len(got) == 16
    assert len({id(b) for b in got}) == 1


# --- fork ------------------------------------------------------------------------------------

FORK_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, traceback, warnings
    warnings.simplefilter("ignore")
    from otel_raptor.runtime.breaker import BreakerRegistry

    registry = BreakerRegistry()
    breaker = registry.get("db")
    held, done = threading.Event(), threading.Event()

    def hold():
        # A parent thread is inside the breaker and the registry when the process forks.
        with breaker._lock, registry._lock:
            held.set()
            done.wait()

    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a deadlock in the child fails the test instead of hanging it
        try:
            assert not breaker._lock.locked()
            assert breaker.call_sync(lambda: 41) + 1 == 42
            assert registry.get("new-after-fork").call_sync(lambda: "ok") == "ok"
            breaker.force_open()
            assert breaker.state.value == "open"
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    done.set()
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_breakers_work_in_a_forked_child() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- success bookkeeping that fails -------------------------------------------------------------

#: Where a bug of ours may make recording a success raise, for good: the runtime's wrapper
#: (a regression in it) or the core's state machine (a corrupted window, say).
SUCCESS_FAULTS = {
    "wrapper": [(CircuitBreaker, "record_success_since"), (CircuitBreaker, "record_success")],
    "core": [(BreakerCore, "on_success")],
}


def break_success_bookkeeping(monkeypatch: pytest.MonkeyPatch, fault: str) -> list[int]:
    met: list[int] = []

    def raising(*args: Any, **kwargs: Any) -> Any:
        met.append(1)
        raise RuntimeError("a bug in otel_raptor's success bookkeeping")

    for owner, name in SUCCESS_FAULTS[fault]:
        monkeypatch.setattr(owner, name, raising)
    return met


@pytest.mark.parametrize("fault", list(SUCCESS_FAULTS))
@pytest.mark.parametrize("use_async", [False, True], ids=["call_sync", "call"])
def test_a_breaker_that_cannot_record_successes_never_refuses_a_mostly_healthy_downstream(
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    use_async: bool,
) -> None:
    # One call in five fails: a breaker that counted those failures without the successes
    # between them opened after two (failure_threshold=2) and refused the rest for 10 s.
    met = break_success_bookkeeping(monkeypatch, fault)
    sink = Recorder()
    breaker = make(clock, sink)
    answers: list[str] = []

    def downstream(i: int) -> str:
        if i % 5 == 4:
            raise Boom("one in five")
        return "ok"

    async def calls() -> None:
        for i in range(100):
            with contextlib.suppress(Boom):
                answers.append(await breaker.call(downstream, i))

    with caplog.at_level("WARNING", logger="otel_raptor"):
        if use_async:
            asyncio.run(calls())
        else:
            for i in range(100):
                with contextlib.suppress(Boom):
                    answers.append(breaker.call_sync(downstream, i))
    assert answers == ["ok"] * 80  # never refused, never a lost result
    assert met == [1]  # then it stopped judging (quiet: no success is recorded any more)
    assert not breaker.judging
    assert breaker.state is CLOSED
    assert sink.events == []
    stopped = [r for r in caplog.records if "stops judging" in r.getMessage()]
    assert len(stopped) == 1
    assert "'payments'" in stopped[0].getMessage()


@pytest.mark.parametrize("fault", list(SUCCESS_FAULTS))
def test_a_probe_success_that_cannot_be_recorded_closes_the_breaker(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    sink = Recorder()
    breaker = make(clock, sink)
    trip(breaker)  # a real outage opened it
    break_success_bookkeeping(monkeypatch, fault)
    clock.advance(10.0)
    assert breaker.call_sync(lambda: "ok") == "ok"  # the probe
    # Left half-open, it would admit one probe at a time for ever, each unrecorded.
    assert breaker.state is CLOSED
    assert [(e.from_state, e.to_state, e.reason) for e in sink.events[1:]] == [  # type: ignore[union-attr]
        (OPEN, HALF_OPEN, R.RECOVERY_TIMEOUT_ELAPSED),
        (HALF_OPEN, CLOSED, R.BOOKKEEPING_FAILED),
    ]
    for _ in range(10):
        with pytest.raises(Boom):
            breaker.call_sync(boom)
        assert breaker.call_sync(lambda: "ok") == "ok"
    assert breaker.state is CLOSED


def test_a_breaker_that_stopped_judging_judges_again_after_reset(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = make(clock)
    with monkeypatch.context() as patch:
        break_success_bookkeeping(patch, "wrapper")
        breaker.call_sync(lambda: "ok")
    assert not breaker.judging
    breaker.reset()
    assert breaker.judging
    breaker.call_sync(lambda: "ok")
    trip(breaker)  # the bug is gone: it judges again


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_drops_the_parents_unconfirmed_failures(clock: FakeClock) -> None:
    # The parent's pooled connections were found closed (held, unconfirmed). The child's own
    # first counted failure must not count them: with them it would trip at once.
    breaker = make(clock, failure_threshold=3)
    for _ in range(2):
        permit = breaker.acquire()
        breaker.record_failure(permit, 0.01, ErrorCategory.CONNECTION, unconfirmed=True)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            permit = breaker.acquire()
            breaker.record_failure(permit, 0.01, ErrorCategory.CONNECTION)
            code = 0 if breaker.state is CLOSED else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent keeps them: its next counted failure trips.
    permit = breaker.acquire()
    breaker.record_failure(permit, 0.01, ErrorCategory.CONNECTION)
    assert breaker.state is OPEN
