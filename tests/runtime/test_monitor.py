"""The error-recovery monitor, fed by the bus and driven by a fake clock.

Alerts, cooldown, auto-resolve, minimum volumes, reports, insights and the seed's API, with
``monitor.tick()`` standing in for the background thread; then the thread, the process-wide
monitor and fork.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from otel_raptor.core.alerts import Alert, AlertNotification, AlertState
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import (
    BreakerTransitioned,
    ErrorClassified,
    RecoveryFinished,
    RetryBudgetExhausted,
)
from otel_raptor.core.insights import Insight, InsightKind
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.reports import MonitorReport
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.errors import ConfigError
from otel_raptor.runtime import monitor as monitor_module
from otel_raptor.runtime import safety
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.monitor import (
    RULE_BREAKER_OPEN,
    RULE_ERROR_FREQUENCY,
    RULE_MEMORY_USAGE,
    RULE_RECOVERY_TIME,
    RULE_SUCCESS_RATE,
    ErrorRecoveryMonitor,
    get_error_analytics,
    get_error_recovery_monitor,
)
from otel_raptor.runtime.state import Runtime, set_runtime
from tests.support.clock import FakeClock

QUIET = {"alert_for": 0, "alert_resolve_after": 60, "alert_cooldown": 300}


class Recorder:
    """A listener that keeps what the monitor hands out."""

    def __init__(self) -> None:
        self.recoveries: list[RecoveryFinished] = []
        self.alerts: list[AlertNotification] = []
        self.insights: list[Insight] = []
        self.reports: list[MonitorReport] = []

    def on_recoveries(self, finished: object) -> None:
        self.recoveries.extend(finished)  # type: ignore[call-overload]

    def on_alert(self, notification: AlertNotification) -> None:
        self.alerts.append(notification)

    def on_insight(self, insight: Insight) -> None:
        self.insights.append(insight)

    def on_report(self, report: MonitorReport) -> None:
        self.reports.append(report)

    def states(self) -> list[tuple[str, str, str]]:
        return [(n.alert.name, n.alert.severity, n.state.value) for n in self.alerts]


@pytest.fixture
def runtime(clock: FakeClock) -> Runtime:
    return Runtime(clock=clock)


def make(
    runtime: Runtime, memory: float | None = 0.1, **config: object
) -> tuple[ErrorRecoveryMonitor, Recorder]:
    monitor = ErrorRecoveryMonitor(config or None, runtime=runtime, memory_reader=lambda: memory)
    recorder = Recorder()
    monitor.add_listener(recorder)
    return monitor, recorder


@pytest.fixture
def closing() -> Iterator[list[ErrorRecoveryMonitor]]:
    made: list[ErrorRecoveryMonitor] = []
    yield made
    for monitor in made:
        monitor.close()


def classification(category: ErrorCategory, error_type: str = "TimeoutError") -> Classification:
    return Classification(
        category=category, severity=Severity.MEDIUM, retryable=True, error_type=error_type
    )


def recover(
    runtime: Runtime,
    service: str,
    *,
    outcome: Outcome = Outcome.RECOVERED,
    attempts: int = 2,
    duration: float = 0.5,
    category: ErrorCategory = ErrorCategory.TIMEOUT,
    strategy: Strategy = Strategy.TIMEOUT_ADJUST,
    error: BaseException | None = None,
    reason: str = "",
) -> None:
    """What the guard publishes for one call that needed recovery."""
    bus = runtime.bus
    failed = attempts - 1 if outcome is Outcome.RECOVERED else attempts
    for attempt in range(1, failed + 1):
        bus.publish(ErrorClassified(service, classification(category), attempt, error))
    bus.publish(
        RecoveryFinished(
            service=service,
            strategy=strategy,
            outcome=outcome,
            attempts=attempts,
            duration_s=duration,
            category=category.value,
            give_up_reason=reason,
        )
    )


# --------------------------------------------------------------------- fed by the bus


def test_guarded_calls_feed_it_with_no_code_in_the_app(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime)

    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self) -> str:
            self.calls += 1
            if self.calls == 1:
                raise TimeoutError(f"read timed out after {self.calls * 3}s from 10.0.0.7")
            return "ok"

    guard = Guard(
        "inventory",
        runtime=runtime,
        retry=RetryPolicy(max_retries=2, base_delay=0.2, jitter="none"),
        breaker=False,
    )
    for _ in range(5):
        assert guard.call(Flaky()) == "ok"
    metrics = monitor.get_current_metrics()
    service = metrics["services"]["inventory"]
    assert service["recoveries"] == 5
    assert service["success_rate"] == 1.0
    assert service["errors"] == 5
    assert service["attempts_mean"] == 2.0
    assert service["succeeded_with_retry"] == 5
    assert service["recovery_time_mean_s"] == pytest.approx(0.2)
    assert set(service["by_strategy"]) == {"timeout_adjust"}
    assert metrics["overall"]["recoveries"] == 5
    assert len(recorder.recoveries) == 5
    [pattern] = monitor.analytics.patterns()["inventory"]
    assert pattern.template == "read timed out after <duration> from <ip>"
    assert pattern.error_type == "TimeoutError"
    assert pattern.count == 5
    monitor.close()


def test_a_successful_call_costs_the_monitor_nothing(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    guard = Guard("quiet", runtime=runtime)
    for _ in range(100):
        guard.call(lambda: 1)
    assert len(monitor._queue) == 0  # nothing published, nothing queued
    monitor.close()


def test_without_the_exception_the_pattern_is_the_type_and_category(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    runtime.bus.publish(ErrorClassified("web", classification(ErrorCategory.UNAVAILABLE, "503"), 1))
    [pattern] = monitor.analytics.patterns("web")["web"]
    assert (pattern.error_type, pattern.category, pattern.template) == ("503", "unavailable", "")
    monitor.close()


# --------------------------------------------------------------------- the seed's API


def test_the_seeds_recording_api(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    published: list[object] = []
    runtime.bus.subscribe(published.append)

    async def main() -> None:
        await monitor.record_recovery_attempt(
            error_type="TimeoutError",
            recovery_time=2500,
            success=True,
            strategy="retry_with_backoff",
            context={"service": "api"},
        )

    asyncio.run(main())
    monitor.record_recovery_attempt_sync("ConnectionError", 100, False, "reconnect", {})
    metrics = monitor.get_current_metrics()
    api = metrics["services"]["api"]
    assert (api["recoveries"], api["success_rate"]) == (1, 1.0)
    assert api["recovery_time_mean_s"] == pytest.approx(2.5)
    assert api["by_strategy"]["retry_with_backoff"]["recoveries"] == 1
    default = metrics["services"]["default"]
    assert (default["failed"], default["success_rate"]) == (1, 0.0)
    # One failed attempt before the successful retry; two failed attempts when it failed.
    assert (api["errors"], default["errors"]) == (1, 2)
    # Published on the bus, so the telemetry sink counts them as well.
    finished = [e for e in published if isinstance(e, RecoveryFinished)]
    assert [(e.service, e.category, e.outcome.value) for e in finished] == [
        ("api", "timeout", "recovered"),
        ("default", "connection", "failed"),
    ]
    monitor.close()


LEAKY = "could not connect to postgres://app:hunter2@db.internal:5432/orders?sslmode=require"


@pytest.mark.parametrize(
    ("arguments", "options", "key"),
    [
        (("", 1.0, True, "reconnect"), {}, "error_type"),
        # error.type is a metric attribute: a class name or a status code, never a message.
        ((LEAKY, 1.0, False, "reconnect"), {}, "error_type"),
        (("TimeoutError: read timed out", 1.0, True, "reconnect"), {}, "error_type"),
        (("HTTP 503", 1.0, True, "reconnect"), {}, "error_type"),
        (("E" * 129, 1.0, True, "reconnect"), {}, "error_type"),
        ((None, 1.0, True, "reconnect"), {}, "error_type"),
        (("E", -1.0, True, "reconnect"), {}, "recovery_time"),
        (("E", 1.0, True, "pray"), {}, "strategy"),
        (("E", 1.0, True, "reconnect"), {"category": "nope"}, "category"),
        (("E", 1.0, True, "reconnect"), {"attempts": True}, "attempts"),
    ],
)
def test_bad_recording_arguments_raise(
    runtime: Runtime, arguments: tuple[object, ...], options: dict[str, object], key: str
) -> None:
    monitor, _ = make(runtime)
    published: list[object] = []
    runtime.bus.subscribe(published.append)
    with pytest.raises(ConfigError, match=key) as raised:
        monitor.record_recovery_attempt_sync(*arguments, **options)  # type: ignore[arg-type]
    assert raised.value.key == key
    assert published == []  # nothing reached the bus, so nothing reached telemetry
    assert "hunter2" not in str(raised.value)  # nor the password into the caller's logs
    monitor.close()


def test_a_bad_category_names_the_allowed_values(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    with pytest.raises(ConfigError) as raised:
        monitor.record_recovery_attempt_sync("E", 1.0, True, "reconnect", category="nope")
    assert (raised.value.key, raised.value.value) == ("category", "nope")
    assert "rate_limit" in raised.value.allowed
    assert "timeout" in raised.value.allowed
    monitor.close()


@pytest.mark.parametrize(
    "error_type",
    ["TimeoutError", "httpx.ConnectTimeout", "503", "app.jobs.<locals>.StaleJob", "E" * 128],
)
def test_class_names_and_status_codes_are_error_types(runtime: Runtime, error_type: str) -> None:
    monitor, _ = make(runtime)
    published: list[object] = []
    runtime.bus.subscribe(published.append)
    monitor.record_recovery_attempt_sync(error_type, 10.0, True, "reconnect", category="timeout")
    classified = [e for e in published if isinstance(e, ErrorClassified)]
    assert [e.classification.error_type for e in classified] == [error_type]
    monitor.close()


def test_a_bad_config_raises(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"monitor\.alert_cooldown"):
        ErrorRecoveryMonitor({"alert_cooldown": -5}, runtime=runtime)
    # Taken as is, it failed at every evaluation: the memory alert could never fire.
    with pytest.raises(ConfigError, match=r"monitor\.memory_reader"):
        ErrorRecoveryMonitor(runtime=runtime, memory_reader=0.9)  # type: ignore[arg-type]  # deliberately wrong


# --------------------------------------------------------------------- alerts


def test_the_alert_lifecycle_with_for_cooldown_and_auto_resolve(
    runtime: Runtime, clock: FakeClock
) -> None:
    monitor, recorder = make(
        runtime, alert_for=60, alert_resolve_after=120, alert_cooldown=300, min_recoveries=20
    )
    callbacks: list[Alert] = []
    monitor.add_alert_callback(callbacks.append)
    # 30 slow recoveries (6 s each) in a minute: p95 above 5 s with enough volume.
    for _ in range(30):
        recover(runtime, "db", duration=6.0)
        clock.advance(2)
    [pending] = monitor.get_active_alerts(include_pending=True)
    assert (pending.name, pending.state) == (RULE_RECOVERY_TIME, AlertState.PENDING)
    assert monitor.get_active_alerts() == []  # pending is not firing
    clock.advance(60)
    [firing] = monitor.get_active_alerts()
    assert (firing.name, firing.severity, firing.service) == (RULE_RECOVERY_TIME, "warning", "db")
    assert firing.value == pytest.approx(9.75)  # (5, 10] bucket, PromQL's interpolation
    assert firing.threshold == 5.0
    assert "p95 recovery time of db is 9.8 s" in firing.message
    # `since` is wall-clock time, to be read outside the process.
    assert firing.since == pytest.approx(clock.wall())
    assert recorder.states() == [(RULE_RECOVERY_TIME, "warning", "firing")]
    assert [a.state for a in callbacks] == [AlertState.FIRING]
    # The window moves past the slow recoveries: the condition clears, and 120 s later the
    # alert resolves by itself.
    clock.advance(300)
    monitor.tick()
    assert monitor.get_active_alerts() != []  # cleared, not yet for long enough
    clock.advance(120)
    assert monitor.get_active_alerts() == []
    assert recorder.states()[-1] == (RULE_RECOVERY_TIME, "warning", "resolved")
    assert [a.state for a in callbacks] == [AlertState.FIRING, AlertState.RESOLVED]
    monitor.close()


def test_a_flapping_condition_notifies_once_per_cooldown(
    runtime: Runtime, clock: FakeClock
) -> None:
    monitor, recorder = make(
        runtime, alert_for=0, alert_resolve_after=0, alert_cooldown=300, evaluation_window=60
    )
    # A burst of 15 errors every 4 minutes: above 10 a minute each time, gone a minute later.
    for _ in range(4):
        for _ in range(15):
            runtime.bus.publish(ErrorClassified("api", classification(ErrorCategory.TIMEOUT), 1))
        assert [a.name for a in monitor.get_active_alerts()] == [RULE_ERROR_FREQUENCY]
        clock.advance(120)
        assert monitor.get_active_alerts() == []
        clock.advance(120)
    # Four firings; the ones at 4 and 12 minutes fell within the cooldown of the one before.
    assert monitor._alerts.fired == 4
    assert monitor._alerts.suppressed == 2
    assert recorder.states() == [
        (RULE_ERROR_FREQUENCY, "warning", "firing"),
        (RULE_ERROR_FREQUENCY, "warning", "resolved"),
        (RULE_ERROR_FREQUENCY, "warning", "firing"),
        (RULE_ERROR_FREQUENCY, "warning", "resolved"),
    ]
    assert monitor.report().alerts_fired == {RULE_ERROR_FREQUENCY: 2}
    monitor.close()


def test_three_failures_in_four_calls_are_not_an_outage(runtime: Runtime, clock: FakeClock) -> None:
    monitor, _ = make(runtime, **QUIET)
    for outcome in (Outcome.FAILED, Outcome.FAILED, Outcome.FAILED, Outcome.RECOVERED):
        recover(runtime, "rare", outcome=outcome)
    assert monitor.get_current_metrics()["services"]["rare"]["success_rate"] == 0.25
    assert monitor.get_active_alerts() == []
    # With the volume (20 by default), the same rate is critical.
    for index in range(20):
        recover(runtime, "rare", outcome=Outcome.FAILED if index % 4 else Outcome.RECOVERED)
    names = {(a.name, a.severity) for a in monitor.get_active_alerts()}
    assert names == {(RULE_SUCCESS_RATE, "warning"), (RULE_SUCCESS_RATE, "critical")}
    monitor.close()


def test_rejections_are_left_to_the_breakers(runtime: Runtime) -> None:
    monitor, _ = make(runtime, **QUIET)
    for _ in range(40):
        recover(runtime, "down", outcome=Outcome.REJECTED, attempts=0, duration=0.0)
    service = monitor.get_current_metrics()["services"]["down"]
    assert service["rejected"] == 40
    assert service["success_rate"] is None
    assert monitor.get_active_alerts() == []
    monitor.close()


def test_errors_nothing_could_recover_are_not_judged(runtime: Runtime) -> None:
    # An app that catches duplicate keys on purpose: the database answered every call.
    monitor, _ = make(runtime, **QUIET)
    for _ in range(40):
        recover(
            runtime,
            "db",
            outcome=Outcome.FAILED,
            attempts=1,
            duration=0.002,
            category=ErrorCategory.INTEGRITY,
            strategy=Strategy.FAIL_FAST,
            reason="not_retryable",
        )
    service = monitor.get_current_metrics()["services"]["db"]
    assert (service["failed"], service["not_retryable"]) == (40, 40)
    assert service["success_rate"] is None
    assert monitor.get_active_alerts() == []
    # What retries could have fixed is still judged.
    for _ in range(20):
        recover(runtime, "db", outcome=Outcome.FAILED, attempts=5, reason="max_retries")
    assert monitor.get_current_metrics()["services"]["db"]["success_rate"] == 0.0
    assert RULE_SUCCESS_RATE in {a.name for a in monitor.get_active_alerts()}
    monitor.close()


def test_slow_recoveries_alert_on_the_volume_their_times_are_over(runtime: Runtime) -> None:
    # 19 slow recoveries among 100 quick not_retryable failures: the p95 is over all 119, and
    # so is the volume the alert asks for (the success rate's leaves those failures out).
    monitor, _ = make(runtime, **QUIET)
    for _ in range(19):
        recover(runtime, "db", duration=30.0)
    for _ in range(100):
        recover(
            runtime,
            "db",
            outcome=Outcome.FAILED,
            attempts=1,
            duration=0.001,
            category=ErrorCategory.INTEGRITY,
            strategy=Strategy.FAIL_FAST,
            reason="not_retryable",
        )
    assert monitor.get_current_metrics()["services"]["db"]["recovery_time_p95_s"] > 10
    assert RULE_RECOVERY_TIME in {a.name for a in monitor.get_active_alerts()}
    monitor.close()


def test_a_resolved_alert_without_recoveries_says_so(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime, **QUIET)
    for _ in range(20):
        recover(runtime, "svc", outcome=Outcome.FAILED)
    assert RULE_SUCCESS_RATE in {a.name for a in monitor.get_active_alerts()}
    clock.advance(400)  # the window empties: no recovery left to measure...
    monitor.get_active_alerts()
    clock.advance(60)  # ...for alert_resolve_after
    assert monitor.get_active_alerts() == []
    resolved = [n.alert.message for n in recorder.alerts if n.state is AlertState.RESOLVED]
    assert resolved == [
        "no recoveries at svc to measure over the last 5 min (threshold 80 %)",
        "no recoveries at svc to measure over the last 5 min (threshold 60 %)",
    ]
    monitor.close()


def test_memory_usage_alerts_for_the_process(runtime: Runtime) -> None:
    monitor, _ = make(runtime, memory=0.8, **QUIET)
    [alert] = monitor.get_active_alerts()
    assert (alert.name, alert.service, alert.value) == (RULE_MEMORY_USAGE, "", pytest.approx(80))
    monitor.close()


def test_an_async_callback_runs(runtime: Runtime) -> None:
    monitor, _ = make(runtime, memory=0.9, **QUIET)
    seen: list[tuple[str, str]] = []
    ran = threading.Event()

    async def notify(alert: Alert) -> None:
        await asyncio.sleep(0)
        seen.append((alert.name, threading.current_thread().name))
        ran.set()

    monitor.add_alert_callback(notify)
    monitor.get_active_alerts()  # no loop in this thread: the monitor's own loop runs it
    assert ran.wait(5)
    assert seen == [(RULE_MEMORY_USAGE, "otel-raptor-monitor-callbacks")]
    monitor.close()


def _frequent_errors(runtime: Runtime, service: str) -> None:
    """Enough failed attempts at ``service`` for ``RaptorErrorFrequencyHigh`` over a 60 s
    window."""
    for _ in range(15):
        runtime.bus.publish(ErrorClassified(service, classification(ErrorCategory.TIMEOUT), 1))


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_async_callbacks_delivered_from_two_threads_at_once_all_run(runtime: Runtime) -> None:
    # Two threads deliver alerts while the first callback is still running: one loop driven
    # by run_until_complete from both threads lost the second ("already running").
    monitor, recorder = make(runtime, evaluation_window=60, **QUIET)
    first_running = threading.Event()
    release = threading.Event()
    done = threading.Semaphore(0)
    seen: list[str] = []

    async def notify(alert: Alert) -> None:
        first_running.set()
        while not release.is_set():
            await asyncio.sleep(0.001)
        seen.append(alert.service)
        done.release()

    monitor.add_alert_callback(notify)
    _frequent_errors(runtime, "a")
    first = _in_thread(monitor.get_active_alerts)
    assert first_running.wait(5)
    _frequent_errors(runtime, "b")
    second = _in_thread(monitor.get_active_alerts)
    second.join(5)
    release.set()
    first.join(5)
    assert not first.is_alive()
    assert not second.is_alive()
    assert done.acquire(timeout=5)
    assert done.acquire(timeout=5)
    assert sorted(seen) == ["a", "b"]
    assert [n.alert.service for n in recorder.alerts] == ["a", "b"]
    monitor.close()


def test_an_async_callback_that_never_ends_is_cancelled_and_never_waited_for(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(monitor_module, "_ASYNC_TIMEOUT_S", 0.05)
    safety._reset_for_tests()
    monitor, _ = make(runtime, evaluation_window=60, **QUIET)
    cancelled = threading.Event()
    later = threading.Event()

    async def hangs(alert: Alert) -> None:
        if alert.service != "a":
            later.set()  # a later alert still gets its callback
            return
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monitor.add_alert_callback(hangs)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        _frequent_errors(runtime, "a")
        delivering = _in_thread(monitor.tick)  # the monitor thread's job: it must come back
        delivering.join(5)
        assert not delivering.is_alive()
        assert cancelled.wait(5)
        _frequent_errors(runtime, "b")
        monitor.get_active_alerts()
        assert later.wait(5)
    timeouts = [r for r in caplog.records if "monitor.alert_callback.timeout" in r.getMessage()]
    assert len(timeouts) == 1
    monitor.close()


def test_the_callback_backlog_is_bounded(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(monitor_module, "_MAX_PENDING_CALLBACKS", 1)
    safety._reset_for_tests()
    monitor, _ = make(runtime, evaluation_window=60, **QUIET)
    release = threading.Event()
    seen: list[str] = []

    async def blocks(alert: Alert) -> None:
        release.wait(5)  # blocks the callback loop's thread: later ones must not pile up
        seen.append(alert.service)

    monitor.add_alert_callback(blocks)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        _frequent_errors(runtime, "a")
        monitor.get_active_alerts()
        _frequent_errors(runtime, "b")
        monitor.get_active_alerts()  # the backlog is full: dropped and reported
    release.set()
    assert "monitor.alert_callback.backlog" in caplog.text
    monitor.close()  # waits for the loop's thread
    assert seen == ["a"]


def callback_loop_running(monitor: ErrorRecoveryMonitor) -> Any:
    """Deliver one async alert callback (the app runs no loop), so that the monitor's own
    callback loop starts; returns that loop once the callback has run on it."""
    ran = threading.Event()

    async def notify(alert: Alert) -> None:
        ran.set()

    monitor.add_alert_callback(notify)
    monitor.get_active_alerts()
    assert ran.wait(5)
    own = monitor._callback_loop
    assert own is not None
    assert own.thread.is_alive()
    return own


def test_close_stops_the_callback_thread(runtime: Runtime) -> None:
    monitor, _ = make(runtime, memory=0.9, **QUIET)
    own = callback_loop_running(monitor)
    monitor.close()
    assert not own.thread.is_alive()
    assert own.loop.is_closed()


def test_a_monitor_dropped_without_close_stops_its_callback_thread() -> None:
    # Each dropped monitor used to leave its thread and its loop's three fds behind.
    runtime = Runtime(clock=FakeClock())  # its bus is the only other holder of the monitor
    monitor, _ = make(runtime, memory=0.9, **QUIET)
    own = callback_loop_running(monitor)
    del monitor, runtime
    gc.collect()
    own.thread.join(5)
    assert not own.thread.is_alive()
    assert own.loop.is_closed()


def test_an_alert_after_close_starts_no_callback_thread(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    safety._reset_for_tests()
    monitor, _ = make(runtime, memory=0.9, **QUIET)
    made: list[Coroutine[object, object, None]] = []

    async def notify(alert: Alert) -> None:
        raise AssertionError("never run: the monitor is closed")

    def deliver(alert: Alert) -> Coroutine[object, object, None]:
        made.append(notify(alert))
        return made[-1]

    monitor.add_alert_callback(deliver)
    monitor.close()
    before = _callback_threads()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert monitor.get_active_alerts()  # still evaluated: the memory alert fires
    assert len(made) == 1
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED  # dropped, not leaked
    assert monitor._callback_loop is None
    assert _callback_threads() <= before
    assert "monitor.alert_callback.closed" in caplog.text


def _callback_threads() -> int:
    return sum(t.name == "otel-raptor-monitor-callbacks" for t in threading.enumerate())


def test_a_failing_callback_or_listener_never_stops_the_monitor(runtime: Runtime) -> None:
    monitor, recorder = make(runtime, memory=0.9, **QUIET)

    def broken(alert: Alert) -> None:
        raise RuntimeError("the pager is down")

    class BrokenListener(Recorder):
        def on_alert(self, notification: AlertNotification) -> None:
            raise RuntimeError("so is the log")

    monitor.add_alert_callback(broken)
    monitor.add_listener(BrokenListener())
    assert [a.name for a in monitor.get_active_alerts()] == [RULE_MEMORY_USAGE]
    assert recorder.states() == [(RULE_MEMORY_USAGE, "warning", "firing")]
    monitor.close()


def test_without_auto_resolve_an_alert_waits_for_a_person(
    runtime: Runtime, clock: FakeClock
) -> None:
    level = [0.9]
    monitor = ErrorRecoveryMonitor(
        {**QUIET, "auto_resolve_alerts": False}, runtime=runtime, memory_reader=lambda: level[0]
    )
    assert monitor.get_active_alerts() != []
    level[0] = 0.1
    clock.advance(3600)
    assert monitor.get_active_alerts() != []
    assert monitor.resolve_alert(RULE_MEMORY_USAGE, "warning")
    assert monitor.get_active_alerts() == []
    monitor.close()


def test_the_gauges_view_of_the_alerts(runtime: Runtime) -> None:
    monitor, _ = make(runtime, memory=0.9, **QUIET)
    monitor.get_active_alerts()
    counts = monitor.alert_counts()
    assert counts[(RULE_MEMORY_USAGE, "warning")] == 1
    assert counts[(RULE_RECOVERY_TIME, "critical")] == 0
    assert len(counts) == 7  # one per rule and severity
    monitor.close()


# --------------------------------------------------------------------- reports


def test_a_report_every_interval_covers_the_period_since_the_last(
    runtime: Runtime, clock: FakeClock
) -> None:
    monitor, recorder = make(runtime, report_interval=600, metrics_retention=1800)
    for _ in range(10):
        recover(runtime, "api", error=TimeoutError("timed out after 3s"))
    clock.advance(599)
    monitor.tick()
    assert recorder.reports == []
    current = monitor.report()
    assert current.services["api"].summary.recoveries == 10
    clock.advance(1)
    recover(runtime, "api")  # after the boundary: the next period
    monitor.tick()
    [first] = recorder.reports
    assert first.overall.recoveries == 10
    assert first.duration_s == pytest.approx(600)
    assert first.services["api"].top_patterns[0].template == "timed out after <duration>"
    assert monitor.report().overall.recoveries == 1
    for _ in range(5):
        clock.advance(600)
        monitor.tick()
    assert len(recorder.reports) == 6
    assert len(monitor.reports()) == 3  # 1800 s of retention: the last three
    as_dict = first.as_dict()
    assert as_dict["services"]["api"]["recoveries"] == 10
    assert as_dict["source"] == "process"
    monitor.close()


def test_effectiveness_and_abandoned_strategies(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    for _ in range(6):
        recover(runtime, "orders", attempts=3, outcome=Outcome.FAILED, strategy=Strategy.RECONNECT)
    recover(runtime, "orders", attempts=2, strategy=Strategy.RECONNECT)
    for _ in range(4):  # the learner gives up without a retry
        recover(
            runtime,
            "orders",
            attempts=1,
            outcome=Outcome.FAILED,
            strategy=Strategy.RECONNECT,
            reason="learned_futile",
        )
    [row] = monitor.analytics.effectiveness()
    assert (row.service, row.strategy, row.category) == ("orders", "reconnect", "timeout")
    assert (row.succeeded_with_retry, row.failed_with_retry, row.failed_without_retry) == (1, 6, 4)
    assert row.attempts_mean == pytest.approx((18 + 2 + 4) / 11)
    [abandoned] = monitor.analytics.abandoned_strategies()
    assert (abandoned.refused, abandoned.retried, abandoned.succeeded) == (4, 7, 1)
    monitor.close()


def test_a_probe_that_retried_is_not_counted_as_given_up_without_a_retry(
    runtime: Runtime, clock: FakeClock
) -> None:
    monitor, recorder = make(runtime)
    for _ in range(3):  # given up at once: the learner refused the retry
        recover(
            runtime,
            "orders",
            attempts=1,
            outcome=Outcome.FAILED,
            strategy=Strategy.RECONNECT,
            reason="learned_futile",
        )
    for _ in range(5):  # probes: one retry let through, then given up as futile
        recover(
            runtime,
            "orders",
            attempts=2,
            outcome=Outcome.FAILED,
            strategy=Strategy.RECONNECT,
            reason="learned_futile",
        )
    [abandoned] = monitor.analytics.abandoned_strategies()
    assert (abandoned.refused, abandoned.retried, abandoned.succeeded) == (3, 5, 0)
    clock.advance(60)
    monitor.tick()
    [insight] = [i for i in recorder.insights if i.kind is InsightKind.STRATEGY_ABANDONED]
    assert "3 calls were given up without a retry" in insight.summary
    monitor.close()


# --------------------------------------------------------------------- insights


def _minutes(monitor: ErrorRecoveryMonitor, clock: FakeClock, count: int, per_minute: int) -> None:
    bus = monitor.runtime.bus
    for _ in range(count):
        for _ in range(per_minute):
            bus.publish(ErrorClassified("search", classification(ErrorCategory.TIMEOUT), 1))
        clock.advance(60)
        monitor.tick()


def test_an_error_spike_becomes_one_insight(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime)
    _minutes(monitor, clock, 30, 12)
    assert recorder.insights == []
    _minutes(monitor, clock, 1, 60)
    [insight] = recorder.insights
    assert insight.kind is InsightKind.ERROR_SPIKE
    assert (insight.service, insight.category) == ("search", "timeout")
    assert insight.evidence["errors_per_minute"] == 60.0
    assert insight.evidence["ratio"] > 4
    assert "raise the attempt timeout" in insight.recommendation
    _minutes(monitor, clock, 3, 60)  # it goes on: no second announcement
    assert [i.kind for i in recorder.insights] == [InsightKind.ERROR_SPIKE]
    assert monitor.analytics.insights()[0].kind is InsightKind.ERROR_SPIKE
    monitor.close()


def test_a_handful_of_calls_never_raises_an_insight(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime)
    _minutes(monitor, clock, 30, 0)
    _minutes(monitor, clock, 1, 6)  # from nothing to six: "infinitely" more, but six
    assert recorder.insights == []
    monitor.close()


def test_retries_that_never_succeed_are_called_futile(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime)
    conflict = classification(ErrorCategory.CONCURRENCY, "409")
    for _ in range(12):
        runtime.bus.publish(ErrorClassified("orders:443", conflict, 1))
        runtime.bus.publish(
            RecoveryFinished(
                service="orders:443",
                strategy=Strategy.RETRY_WITH_BACKOFF,
                outcome=Outcome.FAILED,
                attempts=3,
                duration_s=1.0,
                category="concurrency",
                give_up_reason="attempts_exhausted",
            )
        )
    clock.advance(60)
    monitor.tick()
    [insight] = [i for i in recorder.insights if i.kind is InsightKind.FUTILE_RETRIES]
    assert insight.summary.startswith("retries on 409 (concurrency) at orders:443 never succeed")
    assert insight.recommendation.startswith("stop retrying concurrency")
    monitor.close()


def test_budget_and_breaker_insights(runtime: Runtime, clock: FakeClock) -> None:
    monitor, recorder = make(runtime)
    for _ in range(12):
        runtime.bus.publish(
            RetryBudgetExhausted("pay", classification(ErrorCategory.UNAVAILABLE, "503"))
        )
    for _ in range(3):
        runtime.bus.publish(
            BreakerTransitioned(
                "pay", CircuitState.CLOSED, CircuitState.OPEN, TransitionReason.FAILURE_RATE
            )
        )
    clock.advance(60)
    monitor.tick()
    kinds = {i.kind for i in recorder.insights}
    assert kinds == {InsightKind.RETRY_BUDGET_EXHAUSTED, InsightKind.BREAKER_FLAPPING}
    monitor.close()


# --------------------------------------------------------------------- bounds


def test_memory_is_bounded_whatever_the_traffic(runtime: Runtime, clock: FakeClock) -> None:
    monitor, _ = make(runtime)
    bus = runtime.bus
    for index in range(3000):
        bus.publish(
            ErrorClassified(
                f"svc-{index % 600}",
                classification(ErrorCategory.SERVER_ERROR, "ValueError"),
                1,
                ValueError(f"distinct message number {index} with id x{index}y"),
            )
        )
        if index % 500 == 0:
            clock.advance(10)
    monitor.tick()
    assert len(monitor._patterns) <= monitor_module._MAX_SKETCHES + 1
    assert all(len(s) <= 40 for s in monitor._patterns.values())
    assert len(monitor._fingerprints) <= monitor_module._FINGERPRINT_CACHE
    assert len(monitor._period) <= monitor_module._MAX_PERIOD_KEYS + 1
    monitor.close()


def test_without_its_thread_it_drains_its_queue_itself(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    bus = runtime.bus
    error = classification(ErrorCategory.TIMEOUT)
    for _ in range(monitor_module._HIGH_WATER + 10):
        bus.publish(ErrorClassified("busy", error, 1, TimeoutError("x")))
    assert len(monitor._queue) < monitor_module._HIGH_WATER  # exceptions do not pile up
    assert monitor.get_current_metrics()["services"]["busy"]["errors"] == (
        monitor_module._HIGH_WATER + 10
    )
    monitor.close()


# --------------------------------------------------------------------- thread, process, fork


def test_the_thread_processes_events_by_itself() -> None:
    runtime = Runtime()  # the real clock
    monitor = ErrorRecoveryMonitor(runtime=runtime, memory_reader=lambda: None)
    recorder = Recorder()
    monitor.add_listener(recorder)
    monitor.start()
    try:
        assert monitor.running
        recover(runtime, "live")
        deadline = time.monotonic() + 5
        while not recorder.recoveries and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e.service for e in recorder.recoveries] == ["live"]
    finally:
        monitor.close()
    assert not monitor.running
    assert monitor.closed


def test_the_process_wide_monitor_follows_the_process_wide_runtime() -> None:
    fresh = Runtime()
    previous = set_runtime(fresh)
    try:
        monitor = get_error_recovery_monitor()
        assert monitor.runtime is fresh
        assert monitor.running
        assert get_error_recovery_monitor() is monitor
        assert get_error_analytics() is monitor.analytics
        other = Runtime()
        set_runtime(other)
        replaced = get_error_recovery_monitor()
        assert replaced is not monitor
        assert monitor.closed
        replaced.close()
    finally:
        set_runtime(previous)


FORK = textwrap.dedent(
    """
    import os, sys, time
    from otel_raptor.core.classification import Classification, ErrorCategory, Severity
    from otel_raptor.core.events import ErrorClassified
    from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
    from otel_raptor.runtime.state import Runtime

    runtime = Runtime()
    monitor = ErrorRecoveryMonitor(runtime=runtime, memory_reader=lambda: None)
    monitor.start()
    parent_thread = monitor._thread
    error = Classification(ErrorCategory.TIMEOUT, Severity.LOW, True, "TimeoutError")
    runtime.bus.publish(ErrorClassified("before-fork", error, 1))
    pid = os.fork()
    if pid == 0:
        ok = monitor.running and monitor._thread is not parent_thread
        runtime.bus.publish(ErrorClassified("child", error, 1))
        time.sleep(1.5)  # the child's own thread drains it
        ok = ok and len(monitor._queue) == 0
        services = monitor.get_current_metrics()["services"]
        ok = ok and services["child"]["errors"] == 1
        monitor.close()
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    services = monitor.get_current_metrics()["services"]
    ok = "child" not in services and services["before-fork"]["errors"] == 1
    monitor.close()
    sys.exit(os.waitstatus_to_exitcode(status) or (0 if ok else 4))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_fork_gives_the_child_a_working_monitor() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


FORK_STATE = textwrap.dedent(
    """
    import os, sys
    from otel_raptor.core.classification import Classification, ErrorCategory, Severity
    from otel_raptor.core.events import ErrorClassified
    from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
    from otel_raptor.runtime.state import Runtime

    runtime = Runtime()
    monitor = ErrorRecoveryMonitor(
        {"alert_for": 0, "alert_resolve_after": 0, "evaluation_window": 60},
        runtime=runtime,
        memory_reader=lambda: None,
    )
    heard = []
    monitor.add_alert_callback(lambda alert: heard.append((alert.service, str(alert.state))))
    error = Classification(ErrorCategory.TIMEOUT, Severity.LOW, True, "TimeoutError")
    for _ in range(15):
        runtime.bus.publish(ErrorClassified("parent", error, 1))
    ok = [a.service for a in monitor.get_active_alerts()] == ["parent"]
    runtime.bus.publish(ErrorClassified("queued-at-fork", error, 1))
    pid = os.fork()
    if pid == 0:
        heard.clear()
        # The parent's alerts, counts and queued events are the parent's: the child neither
        # reports them again nor resolves the parent's incident a second time.
        child_ok = monitor.get_active_alerts() == []
        report = monitor.report()
        child_ok = child_ok and set(report.services) == set() and report.overall.errors == 0
        child_ok = child_ok and heard == []
        monitor.close()
        os._exit(0 if child_ok else 3)
    _, status = os.waitpid(pid, 0)
    ok = ok and monitor.report().services["parent"].summary.errors == 15
    monitor.close()
    sys.exit(os.waitstatus_to_exitcode(status) or (0 if ok else 4))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_a_forked_child_starts_without_the_parents_alerts_and_counts() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK_STATE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


FORK_CALLBACKS = textwrap.dedent(
    """
    import os, sys, threading
    from otel_raptor.core.classification import Classification, ErrorCategory, Severity
    from otel_raptor.core.events import ErrorClassified
    from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
    from otel_raptor.runtime.state import Runtime

    runtime = Runtime()
    monitor = ErrorRecoveryMonitor(
        {"alert_for": 0, "evaluation_window": 60}, runtime=runtime, memory_reader=lambda: None
    )
    error = Classification(ErrorCategory.TIMEOUT, Severity.LOW, True, "TimeoutError")
    ran = {}

    async def notify(alert):
        ran[alert.service] = threading.current_thread().ident
        ran.setdefault("events", {})[alert.service].set()

    monitor.add_alert_callback(notify)

    def alert(service):
        ran.setdefault("events", {})[service] = threading.Event()
        for _ in range(15):
            runtime.bus.publish(ErrorClassified(service, error, 1))
        monitor.get_active_alerts()
        return ran["events"][service].wait(5)

    ok = alert("parent")  # the parent's callback thread now exists
    parent_thread = monitor._callback_loop.thread
    pid = os.fork()
    if pid == 0:
        # The parent's loop thread is gone: a fresh one runs the child's callbacks.
        child_ok = alert("child") and monitor._callback_loop.thread is not parent_thread
        monitor.close()
        os._exit(0 if child_ok else 3)
    _, status = os.waitpid(pid, 0)
    ok = ok and alert("parent-again")
    monitor.close()
    sys.exit(os.waitstatus_to_exitcode(status) or (0 if ok else 4))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_async_callbacks_run_in_a_forked_child() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK_CALLBACKS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_concurrent_publishers_lose_nothing(runtime: Runtime) -> None:
    monitor, _ = make(runtime)
    error = classification(ErrorCategory.TIMEOUT)

    def publish() -> None:
        for _ in range(2000):
            runtime.bus.publish(ErrorClassified("threads", error, 1))

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert monitor.get_current_metrics()["services"]["threads"]["errors"] == 8000
    monitor.close()


def test_an_open_breaker_fires_its_own_alert_while_refusals_leave_the_success_rate(
    runtime: Runtime, clock: FakeClock
) -> None:
    # The success rate leaves refusals out, so during an outage it went quiet: the in-process
    # alerts said nothing about a downstream every call was refused from. Prometheus has
    # RaptorCircuitBreakerOpen for this; the monitor now has the same rule.
    breaker = runtime.breakers.get("payments")
    breaker.force_open()  # opened before the monitor exists: read from the registry
    monitor, recorder = make(runtime, alert_for=60, alert_resolve_after=0, alert_cooldown=0)
    monitor.tick()
    assert [(a.name, a.state) for a in monitor.get_active_alerts(include_pending=True)] == [
        (RULE_BREAKER_OPEN, AlertState.PENDING)
    ]
    clock.advance(61)
    monitor.tick()
    assert recorder.states() == [(RULE_BREAKER_OPEN, "critical", "firing")]
    alert = monitor.get_active_alerts()[0]
    assert alert.service == "payments"
    assert "payments is open" in alert.message
    breaker.force_close()
    clock.advance(61)
    monitor.tick()
    assert recorder.states()[-1] == (RULE_BREAKER_OPEN, "critical", "resolved")
    assert monitor.get_active_alerts() == []
    # A breaker that only flickers open (shorter than alert_for) never fires.
    breaker.force_open()
    clock.advance(61)
    monitor.tick()  # pending from here
    breaker.force_close()
    clock.advance(61)
    monitor.tick()
    assert len(recorder.states()) == 2
    monitor.close()
