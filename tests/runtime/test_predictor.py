"""The predictor: scripted samples through tick(), the monitor thread, a real leaking child."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from otel_raptor import classify
from otel_raptor.core.classification import Severity
from otel_raptor.core.events import (
    ErrorClassified,
    Event,
    FailurePredicted,
    PreventionActionRun,
)
from otel_raptor.errors import ConfigError
from otel_raptor.runtime import memory as memory_module
from otel_raptor.runtime import predictor as predictor_module
from otel_raptor.runtime import safety
from otel_raptor.runtime.memory import CleanupResult, SimpleMemoryController
from otel_raptor.runtime.predictor import (
    _RANK,
    PredictiveFailure,
    PredictorOptions,
    get_predictive_failure,
    readings,
)
from otel_raptor.runtime.sampler import DiskUsage, ResourceSample, ResourceSampler
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock

LIMIT = 1_000_000


def sample(t: float, rss: float, *, open_fds: int | None = 10) -> ResourceSample:
    return ResourceSample(
        timestamp=t,
        pid=1,
        cpu_percent=25.0,
        process_cpu_percent=5.0,
        memory_total=4 * LIMIT,
        memory_available=3 * LIMIT,
        memory_used=LIMIT,
        process_rss=int(rss),
        memory_limit=4 * LIMIT,
        memory_current=LIMIT,
        cgroup_limited=False,
        process_memory_limit=LIMIT,
        disks=(),
        net_errors_per_s=0.0,
        net_drops_per_s=0.0,
        connections=None,
        open_fds=open_fds,
        fd_limit=1024,
        threads=3,
    )


class Scripted:
    """RSS follows ``rss(t)``; every sample advances the fake clock by ``step`` seconds."""

    def __init__(self, clock: FakeClock, step: float = 30.0) -> None:
        self.clock = clock
        self.step = step
        self.level = 0.3 * LIMIT
        self.growth = 0.0  # bytes per second

    def sample(self) -> ResourceSample:
        self.clock.advance(self.step)
        self.level += self.growth * self.step
        return sample(self.clock.now, self.level)


#: Every Harness of the running test, stopped after it (which closes a private event loop).
_harnesses: list[Harness] = []


@pytest.fixture(autouse=True)
def _stop_harnesses() -> Iterator[None]:
    yield
    while _harnesses:
        _harnesses.pop().predictor.stop_monitoring(timeout=1)
    # A callback abandoned on a private loop (it swallowed its cancellation) is a pending task
    # of the loop just closed: asyncio logs its destruction, which belongs to this test, not
    # to whichever later test the collector happens to run in.
    gc.collect()


class Harness:
    def __init__(self, **options: object) -> None:
        _harnesses.append(self)
        self.clock = FakeClock()
        self.runtime = Runtime(clock=self.clock)
        self.sampler = Scripted(self.clock)
        opts = {"resources": ("process_memory",), "builtin_actions": False, **options}
        self.predictor = PredictiveFailure(
            PredictorOptions(**opts),  # type: ignore[arg-type]  # test-only kwargs
            sampler=self.sampler,
            runtime=self.runtime,
            clock=self.clock,
        )
        self.events: list[Event] = []
        self.runtime.bus.subscribe(self.events.append)

    def run(self, ticks: int) -> list[FailurePredicted]:
        out: list[FailurePredicted] = []
        for _ in range(ticks):
            out.extend(self.predictor.tick())
        return out

    def actions(self) -> list[tuple[str, str]]:
        return [(e.action, e.outcome) for e in self.events if isinstance(e, PreventionActionRun)]

    def skips(self) -> set[tuple[str, str]]:
        """The skipped actions, with their reasons; every other run has none."""
        runs = [e for e in self.events if isinstance(e, PreventionActionRun)]
        assert all(bool(e.skip_reason) == (e.outcome == "skipped") for e in runs)
        return {(e.action, e.skip_reason) for e in runs if e.outcome == "skipped"}


def leak(h: Harness) -> FailurePredicted:
    h.run(30)  # a stable baseline fills the minimum window
    h.sampler.growth = 0.7 * LIMIT / 3600  # reaches the limit one hour from now
    for _ in range(120):
        raised = [p for p in h.predictor.tick() if not p.cleared]
        if raised:
            return raised[0]
    raise AssertionError("the leak was not predicted")


def test_a_stable_series_raises_nothing_and_a_leak_is_predicted() -> None:
    h = Harness()
    assert h.run(60) == []
    first = leak(h)
    assert first.resource == "process_memory"
    assert first.time_to_exhaustion_s is not None
    assert first.time_to_exhaustion_s < 1800.0
    assert first.confidence >= 0.5
    assert h.sampler.level < LIMIT  # predicted before running out
    assert first in h.events
    prediction = h.predictor.get_predictions()["process_memory"]
    assert prediction.alarm
    assert prediction.limit == LIMIT


def test_the_alarm_clears_when_the_leak_stops_and_memory_is_freed() -> None:
    h = Harness()
    leak(h)
    h.sampler.growth = 0.0
    h.sampler.level = 0.3 * LIMIT
    cleared = [p for p in h.run(90) if p.cleared]
    assert len(cleared) == 1
    assert not h.predictor.get_predictions()["process_memory"].alarm


def test_actions_run_by_severity_and_cooldown() -> None:
    h = Harness(action_cooldown_s=3600.0)
    seen: list[FailurePredicted] = []

    def boom(prediction: FailurePredicted) -> None:
        raise RuntimeError("action failed")

    h.predictor.add_prevention_action("process_memory", seen.append, min_severity="medium")
    h.predictor.add_prevention_action("process_memory", boom, min_severity=Severity.MEDIUM)
    drastic: list[FailurePredicted] = []
    h.predictor.add_prevention_action(
        "process_memory", drastic.append, min_severity="critical", name="drastic"
    )
    h.run(30)
    h.sampler.growth = 0.7 * LIMIT / 1800  # fast: escalates to critical
    h.run(60)
    outcomes = h.actions()
    assert ("append", "ok") in outcomes
    assert ("boom", "failed") in outcomes
    assert ("drastic", "skipped") in outcomes  # the first raise was below critical
    assert ("drastic", "below_severity") in h.skips()
    assert ("drastic", "ok") in outcomes  # the escalation to critical ran it
    # Within the cooldown an action runs again only for a worse severity than its last run:
    # once per escalation, in rising order.
    ranks = [_RANK[p.severity] for p in seen]
    assert outcomes.count(("append", "ok")) == len(ranks) > 1
    assert ranks == sorted(set(ranks))
    assert [p.severity for p in drastic] == [Severity.CRITICAL]
    assert seen[0].resource == "process_memory"


def test_actions_sharing_a_label_have_cooldowns_of_their_own() -> None:
    # The cooldown was keyed by (resource, label): two lambdas, two partials, or an app's
    # action named like a built-in shared one slot, and only the first of them ever ran.
    h = Harness(builtin_actions=True)
    h.predictor.use_memory_controller(Recorder())
    ran: list[str] = []

    def note(what: str, prediction: FailurePredicted) -> None:
        ran.append(what)

    def shed_load(prediction: FailurePredicted) -> None:  # the app's own, named like ours
        ran.append("app shed_load")

    add = h.predictor.add_prevention_action
    add("process_memory", lambda p: ran.append("sessions"), min_severity="medium")
    add("process_memory", lambda p: ran.append("images"), min_severity="medium")
    add("process_memory", functools.partial(note, "partial sessions"), min_severity="medium")
    add("process_memory", functools.partial(note, "partial images"), min_severity="medium")
    add("process_memory", shed_load, min_severity="critical")
    h.run(30)
    h.sampler.growth = 0.7 * LIMIT / 1200  # escalates to critical
    h.run(40)
    assert {"sessions", "images", "partial sessions", "partial images", "app shed_load"} <= set(ran)
    assert ran.count("sessions") == ran.count("images")
    assert h.actions().count(("shed_load", "ok")) == 2  # ours and the app's
    assert ("<lambda>", "skipped") not in h.actions()


def test_a_repeat_within_the_cooldown_is_skipped_for_its_cooldown() -> None:
    h = Harness(action_cooldown_s=86400.0)
    ran: list[FailurePredicted] = []
    h.predictor.add_prevention_action(
        "process_memory", ran.append, min_severity="medium", name="note"
    )
    leak(h)
    h.sampler.growth = 0.0
    h.sampler.level = 0.3 * LIMIT
    assert [p for p in h.run(90) if p.cleared]
    leak(h)  # the same severity again, well within the day
    assert len(ran) == 1
    assert h.skips() == {("note", "cooldown")}


class Recorder:
    """A memory controller that records the cleanups asked of it; the first ``skips`` say
    ``skipped`` (as a controller in its cooldown does)."""

    def __init__(self, skips: int = 0, reason: str = "cooldown") -> None:
        self.calls: list[tuple[str, str]] = []
        self.skips = skips
        self.reason = reason

    def cleanup(self, level: str, trigger: str = "manual") -> CleanupResult:
        self.calls.append((level, trigger))
        skipped = self.reason if len(self.calls) <= self.skips else ""
        return CleanupResult(level=level, trigger=trigger, skipped=skipped)


def test_a_cleanup_the_controller_skipped_is_reported_skipped_and_retried() -> None:
    # The controller's result was ignored: a cleanup it skipped (its cooldown, its learner,
    # auto_cleanup off) was recorded "ok" and started the predictor's own cooldown, so the
    # predicted cleanup never happened.
    h = Harness(builtin_actions=True, action_cooldown_s=86400.0)
    controller = Recorder(skips=1)
    h.predictor.use_memory_controller(controller)
    leak(h)  # medium: a standard cleanup, which the controller skips
    assert controller.calls == [("standard", "prediction")]
    assert ("memory_cleanup", "skipped") in h.actions()
    assert ("memory_cleanup", "controller_declined") in h.skips()
    assert ("memory_cleanup", "ok") not in h.actions()
    h.sampler.growth = 0.0
    h.sampler.level = 0.3 * LIMIT
    assert [p for p in h.run(90) if p.cleared]
    leak(h)  # back within the hour, at the same severity: the skipped run held nothing back
    assert controller.calls == [("standard", "prediction")] * 2
    assert ("memory_cleanup", "ok") in h.actions()


def test_a_cleanup_with_auto_cleanup_off_is_reported_skipped() -> None:
    h = Harness(builtin_actions=True)
    controller = SimpleMemoryController(runtime=h.runtime, clock=h.clock, auto_cleanup=False)
    h.predictor.use_memory_controller(controller)
    leak(h)
    assert ("memory_cleanup", "skipped") in h.actions()
    assert ("memory_cleanup", "ok") not in h.actions()


def test_sync_and_async_alert_callbacks_without_a_loop() -> None:
    h = Harness()
    got: list[tuple[str, FailurePredicted]] = []

    async def on_alert(prediction: FailurePredicted) -> None:
        await asyncio.sleep(0)
        got.append(("async", prediction))

    h.predictor.add_alert_callback(lambda p: got.append(("sync", p)))
    h.predictor.add_alert_callback(on_alert)
    first = leak(h)
    assert ("sync", first) in got
    assert ("async", first) in got  # ran to completion on the private loop


def test_an_async_callback_that_never_ends_does_not_hold_the_predictor(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(predictor_module, "_ASYNC_TIMEOUT_S", 0.05)
    h = Harness()

    async def hangs(prediction: FailurePredicted) -> None:
        await asyncio.Event().wait()

    h.predictor.add_alert_callback(hangs)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        leak(h)  # ticks on: each hanging callback is cut off
    assert time.monotonic() - started < 5.0
    assert any("callback" in r.getMessage() for r in caplog.records)


class Stubborn:
    """An async callback or action that swallows its cancellation: it awaits for good in
    its ``except CancelledError`` (a "clean up on cancel" handler that never finishes)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.__name__ = "stubborn"

    async def __call__(self, prediction: FailurePredicted) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            await asyncio.Event().wait()  # never re-raises, never ends


def _ticks_in_a_thread(h: Harness) -> threading.Thread:
    # A stuck predictor must fail the test, not hang it: the thread is a daemon.
    ticking = threading.Thread(target=leak, args=(h,), daemon=True)
    ticking.start()
    ticking.join(5)
    return ticking


def test_a_private_loop_callback_that_swallows_its_cancellation_is_abandoned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio.wait_for waited for the cancelled callback to end: forever, holding the
    # predictor's thread and the private loop's lock.
    monkeypatch.setattr(predictor_module, "_ASYNC_TIMEOUT_S", 0.05)
    safety._reset_for_tests()
    h = Harness()
    stubborn = Stubborn()
    after: list[FailurePredicted] = []

    async def polite(prediction: FailurePredicted) -> None:
        after.append(prediction)

    h.predictor.add_alert_callback(stubborn)
    h.predictor.add_alert_callback(polite)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert not _ticks_in_a_thread(h).is_alive()
    assert stubborn.cancelled.is_set()
    assert after  # the abandoned task does not block the private loop's next run
    assert h.predictor._private_lock.acquire(timeout=1)
    h.predictor._private_lock.release()
    assert any(
        "prediction.alert_callback" in r.getMessage()
        and isinstance(r.exc_info and r.exc_info[1], TimeoutError)
        for r in caplog.records
    )


def test_an_async_action_that_swallows_its_cancellation_is_recorded_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(predictor_module, "_ASYNC_TIMEOUT_S", 0.05)
    h = Harness()
    stubborn = Stubborn()
    h.predictor.add_prevention_action("process_memory", stubborn, min_severity="low")
    assert not _ticks_in_a_thread(h).is_alive()
    assert ("stubborn", "failed") in h.actions()
    assert stubborn.cancelled.is_set()


def test_a_callback_on_the_apps_loop_is_cancelled_at_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # future.result(timeout) gave up waiting but left the callback running on the app's loop.
    monkeypatch.setattr(predictor_module, "_ASYNC_TIMEOUT_S", 0.05)
    h = Harness()
    stubborn = Stubborn()
    h.predictor.add_alert_callback(stubborn)

    async def main() -> tuple[bool, bool]:
        h.predictor._loop = asyncio.get_running_loop()  # what start_monitoring records
        worker = threading.Thread(target=leak, args=(h,), daemon=True)
        worker.start()
        for _ in range(500):
            if not worker.is_alive() and stubborn.cancelled.is_set():
                break
            await asyncio.sleep(0.01)
        # Checked before asyncio.run() cancels what is left on its way out.
        return worker.is_alive(), stubborn.cancelled.is_set()

    assert asyncio.run(main()) == (False, True)


def test_a_callback_handed_to_the_running_loop_is_cancelled_at_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # create_task() alone let it run for good.
    monkeypatch.setattr(predictor_module, "_ASYNC_TIMEOUT_S", 0.05)
    h = Harness()
    stubborn = Stubborn()
    outcomes: list[BaseException | None] = []
    h.predictor.add_alert_callback(stubborn)
    monkeypatch.setattr(predictor_module, "_report_callback_failure", outcomes.append)

    async def main() -> bool:
        leak(h)  # on the loop's thread: handed over as tasks, never waited for
        for _ in range(500):
            if stubborn.cancelled.is_set() and outcomes:
                break
            await asyncio.sleep(0.01)
        return stubborn.cancelled.is_set()

    assert asyncio.run(main())
    assert outcomes
    assert isinstance(outcomes[0], TimeoutError)


def test_a_sync_callback_or_action_that_blocks_does_not_stop_the_monitoring(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Sync ones ran on the monitor thread, unbounded: a webhook call without a timeout
    # stopped every later sample, forecast and alarm, and nothing was logged.
    monkeypatch.setattr(predictor_module, "_SYNC_TIMEOUT_S", 0.05)
    safety._reset_for_tests()
    h = Harness()
    release = threading.Event()

    def notify(prediction: FailurePredicted) -> None:
        release.wait(30)

    def drain(prediction: FailurePredicted) -> None:
        release.wait(30)

    h.predictor.add_alert_callback(notify)
    h.predictor.add_prevention_action("process_memory", drain, min_severity="medium")
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            assert not _ticks_in_a_thread(h).is_alive()
    finally:
        release.set()
    assert ("drain", "failed") in h.actions()
    assert any(
        "prediction.alert_callback" in r.getMessage()
        and isinstance(r.exc_info and r.exc_info[1], TimeoutError)
        for r in caplog.records
    )


def test_sync_calls_left_running_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each abandoned call keeps its thread: past a few still running, new ones are skipped
    # rather than leaving one more thread behind at every prediction.
    monkeypatch.setattr(predictor_module, "_SYNC_TIMEOUT_S", 0.01)
    h = Harness()
    release = threading.Event()
    outcomes: list[BaseException | None] = []
    prediction = FailurePredicted("process_memory", 0.9, 60.0, 0.9, Severity.HIGH)
    for _ in range(predictor_module._MAX_OVERRUNNING + 2):
        h.predictor._call(lambda p: release.wait(30), prediction, on_done=outcomes.append)
    release.set()
    overran = predictor_module._MAX_OVERRUNNING
    assert all(isinstance(o, TimeoutError) for o in outcomes[:overran])
    assert all(isinstance(o, predictor_module._Skip) for o in outcomes[overran:])
    for _ in range(500):  # the abandoned calls end once released
        if h.predictor._overrunning == 0:
            break
        time.sleep(0.01)
    assert h.predictor._overrunning == 0
    monkeypatch.setattr(predictor_module, "_SYNC_TIMEOUT_S", 5.0)  # a slow CI is no overrun
    h.predictor._call(lambda p: None, prediction, on_done=outcomes.append)
    assert outcomes[-1] is None


def test_stop_monitoring_does_not_wait_for_a_callback_that_hangs() -> None:
    h = Harness(min_samples=3)
    h.sampler.level = 1.5 * LIMIT  # over the limit: raised at the third sample
    entered, never = threading.Event(), threading.Event()

    def hangs(prediction: FailurePredicted) -> None:
        entered.set()
        never.wait(60)

    h.predictor.add_alert_callback(hangs)
    h.predictor.start(interval=0.01)
    thread = h.predictor._thread
    assert thread is not None
    try:
        assert entered.wait(5)
        started = time.monotonic()
        h.predictor.stop_monitoring(timeout=5.0)
        assert time.monotonic() - started < 2.0
        assert not thread.is_alive()
    finally:
        never.set()


def test_a_callback_may_stop_the_monitoring(caplog: pytest.LogCaptureFixture) -> None:
    safety._reset_for_tests()
    h = Harness(min_samples=3)
    h.sampler.level = 1.5 * LIMIT
    stopped = threading.Event()

    def stop(prediction: FailurePredicted) -> None:
        h.predictor.stop_monitoring()
        stopped.set()

    h.predictor.add_alert_callback(stop)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        h.predictor.start(interval=0.01)
        thread = h.predictor._thread
        assert thread is not None
        assert stopped.wait(5)
        thread.join(5)
    assert not thread.is_alive()
    assert not caplog.records  # it ended normally: no overrun, no failure


def test_the_memory_cleanup_does_not_wait_for_a_controller_cleanup_that_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cache evictor that blocks held the controller's cleanup lock, and the predictor's
    # memory_cleanup action waited on it for good, on the monitor thread.
    monkeypatch.setattr(memory_module, "_BUSY_WAIT_S", 0.05)
    h = Harness(builtin_actions=True)
    controller = SimpleMemoryController(runtime=h.runtime, clock=h.clock, cooldown=0)
    entered, release = threading.Event(), threading.Event()

    def hangs(level: str, max_age: float) -> int:
        entered.set()
        release.wait(30)
        return 0

    controller.register_cache("remote", hangs)
    threading.Thread(target=controller.cleanup, args=("standard",), daemon=True).start()
    assert entered.wait(5)
    h.predictor.use_memory_controller(controller)
    try:
        assert not _ticks_in_a_thread(h).is_alive()
    finally:
        release.set()
    assert ("memory_cleanup", "skipped") in h.actions()


def test_a_short_interval_keeps_a_window_spanning_the_horizon() -> None:
    # A 60-sample window at 5 s spans 5 minutes of a 30-minute horizon: the span factor
    # capped the confidence at 0.17, and a leak was never raised, even at the limit.
    h = Harness(interval_s=5.0)
    h.sampler.step = 5.0
    h.run(360)  # half an hour of a stable baseline
    h.sampler.growth = 0.7 * LIMIT / 1800  # reaches the limit half an hour from now
    for _ in range(360):
        raised = [p for p in h.predictor.tick() if not p.cleared]
        if raised:
            break
    else:
        raise AssertionError("the leak was not predicted")
    assert h.sampler.level < 0.8 * LIMIT  # well before the limit
    assert raised[0].confidence >= 0.5


def test_the_series_is_thinned_to_a_bounded_length_at_a_tiny_interval() -> None:
    h = Harness(horizon_s=60.0, window=10, min_samples=5)
    series = h.predictor._series["process_memory"]
    for i in range(60_000):  # every millisecond for a minute
        h.predictor._append(series, i / 1000.0, 1.0)
    assert len(series) <= predictor_module._SERIES_POINTS + 2
    newest, oldest = series[-1][0], series[0][0]
    assert newest == 59.999  # the newest sample is always kept
    assert newest - oldest >= 59.0  # and the series still spans the horizon


def test_a_failing_callback_does_not_stop_the_predictor() -> None:
    h = Harness()
    h.predictor.add_alert_callback(lambda p: 1 / 0)
    leak(h)  # raised anyway


def test_shed_load_tightens_the_retry_budget_for_a_while() -> None:
    h = Harness(builtin_actions=True, shed_duration_s=600.0)
    ratio = h.runtime.budget_ratio
    h.run(30)
    h.sampler.growth = 0.7 * LIMIT / 1200  # critical
    h.run(40)
    assert ("shed_load", "ok") in h.actions()
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio * 0.5)
    assert h.runtime.budget_ratio == ratio  # the configured shape is never rewritten
    h.sampler.growth = 0.0
    h.run(21)  # 630 s later
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio)


def test_the_shedding_ends_when_the_prediction_clears() -> None:
    h = Harness(builtin_actions=True, shed_duration_s=3600.0)
    ratio = h.runtime.budget_ratio
    h.run(30)
    h.sampler.growth = 0.7 * LIMIT / 1200  # critical
    h.run(40)
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio * 0.5)
    h.sampler.growth = 0.0
    h.sampler.level = 0.3 * LIMIT  # freed: the alarm clears well before the hour is up
    cleared = [p for p in h.run(90) if p.cleared]
    assert cleared
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio)


def test_the_predictor_never_ends_the_apps_own_shedding() -> None:
    h = Harness(builtin_actions=True, shed_duration_s=600.0)
    ratio = h.runtime.budget_ratio
    h.runtime.shed_load(0.8, 86400.0)  # the app sheds for a day, for its own reasons
    h.run(30)
    h.sampler.growth = 0.7 * LIMIT / 1200  # critical
    h.run(40)
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio * 0.5)
    h.sampler.growth = 0.0
    h.sampler.level = 0.3 * LIMIT
    assert [p for p in h.run(90) if p.cleared]
    h.predictor.stop_monitoring()
    assert h.runtime.effective_budget_ratio == pytest.approx(ratio * 0.8)


def test_memory_cleanup_uses_the_controller_at_the_matching_level() -> None:
    h = Harness(builtin_actions=True)
    calls: list[tuple[str, str]] = []

    class Controller:
        def cleanup(self, level: str, trigger: str = "manual") -> None:
            calls.append((level, trigger))

    h.predictor.use_memory_controller(Controller())
    leak(h)  # one hour from exhaustion: medium
    assert calls == [("standard", "prediction")]
    h.run(40)  # escalations clean harder
    assert [level for level, _ in calls][:2] == ["standard", "critical"]
    assert {trigger for _, trigger in calls} == {"prediction"}
    assert ("memory_cleanup", "ok") in h.actions()
    assert ("gc_collect", "ok") in h.actions()


def test_memory_cleanup_without_a_controller_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(predictor_module, "_default_memory_cleanup", lambda: None)
    h = Harness(builtin_actions=True)
    leak(h)
    assert ("memory_cleanup", "skipped") in h.actions()
    assert ("memory_cleanup", "no_controller") in h.skips()


def test_metrics_and_snapshot() -> None:
    h = Harness()
    assert h.predictor.get_current_metrics() == {}
    h.run(3)
    metrics = h.predictor.get_current_metrics()
    assert metrics["process_rss"] == int(0.3 * LIMIT)
    utilization = metrics["utilization"]
    assert isinstance(utilization, dict)
    assert utilization["process_memory"] == pytest.approx(0.3)
    assert utilization["cpu"] == pytest.approx(0.25)
    assert utilization["file_descriptors"] == pytest.approx(10 / 1024)
    snap = h.predictor.snapshot()
    assert snap.utilization["process_memory"] == pytest.approx(0.3)
    # The controller's figure: this process's RSS over physical memory (no cgroup limit);
    # the machine's used memory over it is the "memory" utilization.
    assert snap.memory_pressure == pytest.approx(0.3 / 4)
    assert snap.utilization["memory"] == pytest.approx(0.25)
    assert set(snap.probability) == {"process_memory"}
    assert readings(sample(0, 5))["process_memory"] == (5.0, float(LIMIT))
    # In a memory-limited cgroup, the cgroup's working set over its limit.
    limited = dataclasses.replace(sample(0, 5), cgroup_limited=True)
    assert limited.pressure_ratio == pytest.approx(0.25)


def test_a_disk_is_exhausted_when_an_unprivileged_writer_is_out_of_space() -> None:
    # used / total reads 0.95 on a full default ext4 (5 % reserved for root): never "full".
    full = DiskUsage(mount="/", used=95, free=0, total=100)
    assert readings(dataclasses.replace(sample(0, 5), disks=(full,)))["disk"] == (1.0, 1.0)


def test_start_monitoring_in_a_process_psutil_cannot_read_reports_and_carries_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A sandbox that refuses psutil.Process(): the app asked for predictions, cannot have
    # them, and must not be stopped by a ConfigError blaming a pid it never gave.
    from otel_raptor.runtime import sampler as sampler_module

    def refused(*args: object, **kwargs: object) -> None:
        raise psutil.AccessDenied(pid=None, msg="sandboxed")

    monkeypatch.setattr(sampler_module.psutil, "Process", refused)
    predictor = PredictiveFailure(PredictorOptions(builtin_actions=False), runtime=Runtime())
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        asyncio.run(predictor.start_monitoring(interval=30))
    assert not predictor.monitoring
    assert predictor.get_current_metrics() == {}
    assert any("process unreadable" in r.getMessage() for r in caplog.records)
    predictor.stop_monitoring()
    with pytest.raises(ConfigError, match=r"sampler\.pid"):
        ResourceSampler(pid=-5)  # a pid the app chose is still checked


def test_stop_monitoring_stops_the_samplers_counting_of_errors() -> None:
    # The sampler it made counts failed attempts from the bus: it stayed subscribed after
    # stop_monitoring(), taking its lock on every failure for nobody, and kept the bus busy.
    runtime = Runtime()
    predictor = PredictiveFailure(PredictorOptions(builtin_actions=False), runtime=runtime)
    predictor.start(interval=30)
    assert runtime.bus.has_subscribers
    predictor.stop_monitoring()
    assert not runtime.bus.has_subscribers
    # A new start counts again, with a sampler of its own.
    predictor.start(interval=30)
    try:
        assert runtime.bus.has_subscribers
        runtime.bus.publish(ErrorClassified("api", classify(TimeoutError()), 1))
        predictor.tick()  # the rates are per second since the last sample
        assert set(predictor.get_current_metrics()["error_rates"]) == {"api"}  # type: ignore[arg-type]
    finally:
        predictor.stop_monitoring()


def test_start_monitoring_holds_a_first_sample_when_it_returns_and_stops() -> None:
    runtime = Runtime()
    predictor = PredictiveFailure(
        PredictorOptions(builtin_actions=False), runtime=runtime, sampler=ResourceSampler()
    )

    async def main() -> tuple[float, dict[str, object], int]:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        beating = asyncio.create_task(heartbeat())
        await asyncio.sleep(0)
        started = time.perf_counter()
        await predictor.start_monitoring(interval=30)
        elapsed = time.perf_counter() - started
        metrics = predictor.get_current_metrics()  # right away: the seed example's call
        beating.cancel()
        return elapsed, metrics, ticks

    elapsed, metrics, ticks = asyncio.run(main())
    try:
        # The first sample was taken before start_monitoring returned...
        assert metrics["process_rss"]
        assert metrics["utilization"]
        # ...in the monitor thread: the loop kept running meanwhile, and it took little time.
        assert ticks > 1
        assert elapsed < 5.0
        assert predictor.monitoring
        assert runtime.resource_snapshot == predictor.snapshot
        assert runtime.resource_snapshot().utilization["process_memory"] > 0
    finally:
        predictor.stop_monitoring()
    stopped = not predictor.monitoring
    assert stopped
    assert runtime.resource_snapshot().utilization == {}


def test_async_callbacks_run_on_the_loop_that_started_monitoring() -> None:
    h = Harness()
    ran_on: list[int] = []

    async def on_alert(prediction: FailurePredicted) -> None:
        ran_on.append(threading.get_ident())

    h.predictor.add_alert_callback(on_alert)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        h.predictor._loop = loop  # what start_monitoring records
        worker = threading.Thread(target=leak, args=(h,))
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert ran_on
    assert set(ran_on) == {loop_thread}


def test_the_singleton() -> None:
    assert get_predictive_failure() is get_predictive_failure()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"interval_s": 0}, "prediction.interval_s"),
        ({"interval_s": 1e10}, "prediction.interval_s"),
        ({"horizon_s": -1}, "prediction.horizon_s"),
        ({"window": 2}, "prediction.window"),
        ({"window": 10, "min_samples": 11}, "prediction.min_samples"),
        ({"raise_threshold": 2}, "prediction.raise_threshold"),
        ({"clear_threshold": 0.9}, "prediction.clear_threshold"),
        ({"resources": ("memory", "gpu")}, "prediction.resources"),
        ({"resources": "memory"}, "prediction.resources"),
        ({"action_cooldown_s": -1}, "prediction.action_cooldown_s"),
        ({"shed_factor": 1.0}, "prediction.shed_factor"),
        ({"shed_duration_s": 0}, "prediction.shed_duration_s"),
        # "no" is truthy: taken as is, it turned on the cache clearing and the load shedding
        # the caller asked to keep off.
        ({"builtin_actions": "no"}, "prediction.builtin_actions"),
        ({"builtin_actions": 0}, "prediction.builtin_actions"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PredictorOptions(**kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"options": {"interval_s": 5}}, "prediction.options"),
        ({"sampler": 5}, "prediction.sampler"),
        ({"memory_cleanup": "emergency"}, "prediction.memory_cleanup"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs: dict[str, object], key: str) -> None:
    # Each used to be taken, then fail on the monitor thread (an AttributeError for the
    # mapping): reported there, with no prediction or no cleanup ever made.
    with pytest.raises(ConfigError) as caught:
        PredictiveFailure(runtime=Runtime(), **kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key


def test_bad_registrations_are_refused() -> None:
    predictor = PredictiveFailure(PredictorOptions(builtin_actions=False), runtime=Runtime())
    with pytest.raises(ConfigError, match=r"prediction\.action\.resource"):
        predictor.add_prevention_action("gpu", print)
    with pytest.raises(ConfigError, match=r"prediction\.action\.min_severity"):
        predictor.add_prevention_action("memory", print, min_severity="dire")
    with pytest.raises(ConfigError, match=r"prediction\.alert_callback"):
        predictor.add_alert_callback("not callable")  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(ConfigError, match=r"prediction\.interval_s"):
        predictor.start(interval=-1)
    # Above threading.TIMEOUT_MAX the monitor thread died of an OverflowError.
    with pytest.raises(ConfigError, match=r"prediction\.interval_s=.*\(0, 86400\]"):
        predictor.start(interval=1e10)


# --- a real leak in a child process --------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    print("ready", flush=True)
    sys.stdin.readline()
    hoard = []
    for _ in range(150):  # 2 MB every 50 ms, at most 300 MB
        hoard.append(bytearray(b"x") * (2 * 1024 * 1024))
        time.sleep(0.05)
    time.sleep(60)
    """
)


@pytest.fixture
def leaking_child() -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        yield child
    finally:
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


def test_a_leak_in_a_child_process_is_predicted_before_its_limit(
    leaking_child: subprocess.Popen[str],
) -> None:
    process = psutil.Process(leaking_child.pid)
    limit = process.memory_info().rss + 200 * 1024 * 1024
    runtime = Runtime()
    predictor = PredictiveFailure(
        PredictorOptions(
            interval_s=0.1,
            horizon_s=4.0,
            window=60,
            min_samples=10,
            min_confidence=0.4,
            resources=("process_memory",),
            builtin_actions=False,
        ),
        sampler=ResourceSampler(pid=leaking_child.pid, process_memory_limit=limit),
        runtime=runtime,
    )
    raised = threading.Event()
    rss_at_alarm: list[int] = []

    def on_alert(prediction: FailurePredicted) -> None:
        if prediction.resource == "process_memory" and not prediction.cleared:
            rss_at_alarm.append(process.memory_info().rss)
            raised.set()

    predictor.add_alert_callback(on_alert)
    predictor.start()
    try:
        assert leaking_child.stdin is not None
        leaking_child.stdin.write("go\n")
        leaking_child.stdin.flush()
        assert raised.wait(20.0), "no prediction"
    finally:
        predictor.stop_monitoring()
    print(f"predicted at {rss_at_alarm[0] / 2**20:.0f} MiB of a {limit / 2**20:.0f} MiB limit")
    assert rss_at_alarm[0] < limit


# --- fork ------------------------------------------------------------------------------------

FORK = textwrap.dedent(
    """
    import os, sys, time
    from otel_raptor.runtime.predictor import PredictiveFailure, PredictorOptions
    from otel_raptor.runtime.state import Runtime

    runtime = Runtime()
    p = PredictiveFailure(PredictorOptions(interval_s=0.02, builtin_actions=False),
                          runtime=runtime)
    p.start()
    time.sleep(0.1)
    parent_thread = p._thread
    pid = os.fork()
    if pid == 0:
        ok = p.monitoring and p._thread is not parent_thread
        time.sleep(0.2)
        ok = ok and p.get_current_metrics().get("pid") == os.getpid()
        # The parent's sampler is off the child's bus: only the child's own counts errors.
        ok = ok and len(runtime.bus._subscribers) == 1
        p.stop_monitoring()
        ok = ok and not runtime.bus.has_subscribers
        os._exit(0 if ok and not p.monitoring else 3)
    _, status = os.waitpid(pid, 0)
    ok = p.monitoring and p.get_current_metrics().get("pid") == os.getpid()
    p.stop_monitoring()
    ok = ok and not runtime.bus.has_subscribers
    sys.exit(os.waitstatus_to_exitcode(status) or (0 if ok else 4))
    """
)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_monitoring_restarts_in_a_forked_child() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr.decode()


def test_a_prediction_drives_a_real_memory_controller() -> None:
    from otel_raptor import MemoryCleanupFinished, SimpleMemoryController

    h = Harness(builtin_actions=True)
    controller = SimpleMemoryController(runtime=h.runtime, clock=h.clock)
    stale = {f"k{i}": b"x" * 100 for i in range(50)}
    controller.register_cache("stale", stale, priority="low")
    h.predictor.use_memory_controller(controller)
    leak(h)
    cleanups = [e for e in h.events if isinstance(e, MemoryCleanupFinished)]
    assert cleanups
    assert cleanups[0].trigger == "prediction"
    assert cleanups[0].level == "standard"
    assert ("memory_cleanup", "ok") in h.actions()
