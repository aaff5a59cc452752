"""A downstream's shared state: the budget (never orphaned), the cooldown and the share of
throttled calls, and the runtime's one-writer rules for the budget's shape."""

from __future__ import annotations

import threading
import time

import pytest

from otel_raptor import CircuitBreakerConfig, Guard, RetryPolicy
from otel_raptor.core.budget import RetryBudget
from otel_raptor.errors import ConfigError, ThrottledError
from otel_raptor.runtime.downstream import THROTTLE_WINDOW_S, Downstream
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock


def calls(downstream: Downstream, n: int) -> None:
    for _ in range(n):
        downstream.budget.record_call()


def test_the_throttled_share_counts_throttles_against_recent_calls() -> None:
    downstream = Downstream("svc", RetryBudget(now=0.0))
    calls(downstream, 100)  # long ago: the first window starts at the first throttle
    assert downstream.throttled(1.0) == 0.0  # too few calls to tell (1: the throttled one)
    calls(downstream, 8)
    assert downstream.throttled(2.0) == 0.0  # 9 < THROTTLE_MIN_CALLS
    calls(downstream, 8)
    assert downstream.throttled(3.0) == pytest.approx(3 / 17)
    # A new window starts with the next throttle; the previous one (29 calls, 3 throttled)
    # counts for what of it still overlaps: all of it, right at the start.
    calls(downstream, 12)
    later = 1.0 + THROTTLE_WINDOW_S * 1.5
    assert downstream.throttled(later) == pytest.approx((1 + 3) / (1 + 29))
    # Long quiet: the old windows are forgotten.
    calls(downstream, 10)
    assert downstream.throttled(later + 3 * THROTTLE_WINDOW_S) == 0.0  # a fresh window


def test_retries_count_as_attempts_so_waiting_callers_do_not_inflate_the_share() -> None:
    # A server that throttles a quarter of the requests: callers that wait out a 429 make
    # fewer calls, but each retry is an attempt too, and the share stays a quarter.
    downstream = Downstream("svc", RetryBudget(now=0.0))
    throttles = 0
    for i in range(40):  # within one window
        now = i * THROTTLE_WINDOW_S / 50
        calls(downstream, 3)
        assert downstream.withdraw(now)  # a retry, after one of the three calls got a 429
        throttles += 1
        share = downstream.throttled(now)
    assert throttles == 40
    # 40 throttles in the 157 attempts since the window opened at the first one (counting
    # calls alone would give 40 / 118, a third).
    assert share == pytest.approx(40 / 157)


def test_budgets_are_reshaped_in_place_never_replaced() -> None:
    clock = FakeClock()
    runtime = Runtime(clock=clock, budget_ratio=0.2)
    guard = Guard("svc", runtime=runtime)
    downstream = runtime.downstream("svc")
    budget = downstream.budget
    for _ in range(100):
        guard.call(lambda: None)
    runtime.configure(budget_ratio=0.5)
    assert runtime.downstream("svc") is downstream
    assert downstream.budget is budget  # the guard still deposits into the budget in use
    assert budget.ratio == 0.5
    runtime.shed_load(0.5, 60.0)
    assert budget.ratio == 0.25  # shedding is a factor on the configured ratio
    runtime.configure(budget_ratio=0.4)  # a new shape while shedding: still shed
    assert budget.ratio == pytest.approx(0.2)
    clock.advance(61.0)
    runtime.withdraw(downstream, clock.monotonic())  # shedding ends by itself
    assert budget.ratio == 0.4
    assert runtime.effective_budget_ratio == 0.4
    with pytest.raises(ConfigError, match=r"shed_load\.factor"):
        runtime.shed_load(1.5, 1.0)


def test_each_owner_ends_only_its_own_shedding_and_the_smallest_factor_applies() -> None:
    clock = FakeClock()
    runtime = Runtime(clock=clock, budget_ratio=0.4)
    budget = runtime.downstream("svc").budget
    predictor = object()
    runtime.shed_load(0.5, 100.0)  # the app's
    runtime.shed_load(0.25, 10.0, owner=predictor)
    assert budget.ratio == pytest.approx(0.1)  # the smallest factor, never 0.5 * 0.25
    runtime.stop_shedding(owner=predictor)  # the predictor's alarm clears
    assert budget.ratio == pytest.approx(0.2)  # the app's shedding goes on
    runtime.shed_load(0.25, 10.0, owner=predictor)
    clock.advance(11.0)
    runtime.withdraw(runtime.downstream("svc"), clock.monotonic())  # the predictor's ran out
    assert budget.ratio == pytest.approx(0.2)
    assert runtime.effective_budget_ratio == pytest.approx(0.2)
    runtime.stop_shedding()  # the app's own
    assert budget.ratio == pytest.approx(0.4)
    runtime.stop_shedding()  # nothing left to stop: harmless
    assert budget.ratio == pytest.approx(0.4)


def test_concurrent_owners_never_leave_a_budget_on_a_stale_ratio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thread preempted between reading the ratio in force and applying it must not land
    # its stale ratio after another thread's newer one (a reshape is slowed down to show it).
    reshape = Downstream.reshape

    def slow(self: Downstream, ratio: float, floor: float, now: float) -> None:
        time.sleep(0.0005)
        reshape(self, ratio, floor, now)

    monkeypatch.setattr(Downstream, "reshape", slow)
    for _ in range(5):
        runtime = Runtime(budget_ratio=0.2)
        budgets = [runtime.downstream(runtime.service(f"s{i}")).budget for i in range(2)]

        def shed_and_stop(owner: str, runtime: Runtime = runtime) -> None:
            for _ in range(10):
                runtime.shed_load(0.1, 100.0, owner=owner)
                runtime.stop_shedding(owner=owner)

        threads = [threading.Thread(target=shed_and_stop, args=(f"o{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [b.ratio for b in budgets] == [0.2, 0.2]


def test_the_shedding_table_is_bounded() -> None:
    clock = FakeClock()
    runtime = Runtime(clock=clock, budget_ratio=0.4)
    for i in range(1000):
        runtime.shed_load(0.5, 1.0 + i, owner=i)
    assert len(runtime._sheds) <= 16
    assert runtime.effective_budget_ratio == pytest.approx(0.2)
    with pytest.raises(TypeError):
        runtime.shed_load(0.5, 1.0, owner=[])  # type: ignore[arg-type]


def test_pervasive_throttling_pauses_every_call_and_refuses_what_cannot_wait() -> None:
    clock = FakeClock()
    runtime = Runtime(clock=clock)

    class TooManyRequests(Exception):
        status_code = 429
        headers = {"Retry-After": "30"}  # noqa: RUF012 - read by the classifier

    def limited() -> None:
        raise TooManyRequests

    short = Guard(
        "api",
        retry=RetryPolicy(max_retries=0, max_delay=5.0, max_retry_after=10.0, cooldown_share=0.5),
        breaker=CircuitBreakerConfig(),
        runtime=runtime,
    )
    for _ in range(9):
        with pytest.raises(TooManyRequests):
            short.call(limited)
    assert runtime.downstream("api").cooldown_until < clock.now  # 9 calls: too few to tell
    with pytest.raises(TooManyRequests):
        short.call(limited)  # 10 of 10 throttled: pervasive
    assert runtime.downstream("api").cooldown_until == pytest.approx(clock.now + 30.0)
    calls_made = []
    with pytest.raises(ThrottledError) as refused:
        short.call(lambda: calls_made.append(1))  # 30 s > max_retry_after: refused at once
    assert calls_made == []
    assert refused.value.retry_after == pytest.approx(30.0)
    patient = Guard("api", retry=RetryPolicy(max_retries=0, max_delay=60.0), runtime=runtime)
    assert patient.call(lambda: "after the pause") == "after the pause"
    assert clock.sleeps == [pytest.approx(30.0)]


def test_private_downstreams_follow_load_shedding_while_they_live() -> None:
    # The downstreams of targets past max_services are nobody's to share, but a shed budget
    # must reach them, and end for them, like every other.
    runtime = Runtime(max_services=1)
    tracked = runtime.downstream(runtime.service("tracked"))
    private = runtime.private_downstream()
    runtime.shed_load(0.1, 60.0)
    during = runtime.private_downstream()
    assert private.budget._ratio == tracked.budget._ratio == during.budget._ratio
    assert tracked.budget._ratio < 0.2
    runtime.stop_shedding()
    assert private.budget._ratio == tracked.budget._ratio == during.budget._ratio == 0.2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_services": 0}, "max_services"),
        ({"max_services": 2.5}, "max_services"),
        ({"max_services": True}, "max_services"),
        ({"learner": "fast"}, "learner"),
        ({"clock": "system"}, "clock"),
    ],
)
def test_a_runtime_refuses_bad_arguments_under_their_own_names(
    kwargs: dict[str, object], key: str
) -> None:
    # max_services was reported as breaker.max_breakers; learner and clock were accepted and
    # broke the first failing call instead.
    with pytest.raises(ConfigError, match=rf"^invalid {key}="):
        Runtime(**kwargs)  # type: ignore[arg-type]


def test_raising_max_services_gives_new_names_their_own_breakers() -> None:
    # The registry remembered it had been full: after configure(max_services=) made room,
    # every new name still shared the "other" breaker (one outage refused them all).
    runtime = Runtime(max_services=1)
    first = runtime.breakers.get(runtime.service("first"))
    folded = runtime.breakers.get("second")  # past the cap: the shared breaker
    assert folded.name == "other"
    runtime.configure(max_services=3)
    second = runtime.breakers.get(runtime.service("second"))
    assert runtime.service("second") == "second"
    assert second.name == "second"
    assert second is not folded
    assert second is not first
    assert runtime.breakers.max_breakers == 3
    with pytest.raises(ConfigError, match="max_breakers"):
        runtime.breakers.set_max_breakers(0)
