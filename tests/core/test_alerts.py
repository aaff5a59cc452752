"""The alert lifecycle of Prometheus and Alertmanager, driven by a clock passed in."""

from __future__ import annotations

import pytest

from otel_raptor.core.alerts import (
    AlertKey,
    AlertOptions,
    AlertRule,
    AlertSeverity,
    AlertState,
    AlertTracker,
    Comparison,
)
from otel_raptor.errors import ConfigError

KEY = AlertKey("RaptorRecoverySuccessRateLow", "warning", "api")


def _step(tracker: AlertTracker, now: float, breached: bool, value: float = 50.0) -> str | None:
    notification = tracker.evaluate(
        KEY, breached=breached, value=value, threshold=80.0, message=f"{value}", now=now
    )
    return None if notification is None else notification.state.value


def test_pending_then_firing_then_resolved() -> None:
    tracker = AlertTracker(AlertOptions(for_s=60, resolve_after_s=120, cooldown_s=300))
    assert _step(tracker, 0, True) is None
    [pending] = tracker.active()
    assert pending.state is AlertState.PENDING
    assert _step(tracker, 30, True) is None  # still pending: `for` not elapsed
    assert _step(tracker, 60, True) == "firing"
    [firing] = tracker.firing()
    assert (firing.since, firing.active_since, firing.notified) == (60, 0, True)
    assert _step(tracker, 90, True) is None  # firing goes on without a second word
    assert _step(tracker, 100, False) is None  # cleared, but not for long enough
    assert _step(tracker, 219, False) is None
    assert _step(tracker, 220, False) == "resolved"
    assert tracker.active() == []


def test_a_pending_alert_that_clears_says_nothing() -> None:
    tracker = AlertTracker(AlertOptions(for_s=60))
    _step(tracker, 0, True)
    assert _step(tracker, 30, False) is None
    assert tracker.active() == []
    # and its next breach starts a new pending period
    _step(tracker, 40, True)
    assert _step(tracker, 90, True) is None
    assert _step(tracker, 100, True) == "firing"


def test_breaching_again_before_resolving_is_the_same_incident() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0, resolve_after_s=120, cooldown_s=0))
    assert _step(tracker, 0, True) == "firing"
    _step(tracker, 10, False)
    assert _step(tracker, 100, True) is None  # back before 120 s: still the same firing
    assert _step(tracker, 200, False) is None
    assert _step(tracker, 320, False) == "resolved"


def test_the_cooldown_allows_one_notification_per_alert_per_cooldown() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0, resolve_after_s=0, cooldown_s=300))
    states = []
    # Flapping every 20 s for 10 minutes: the condition breaches 15 times.
    for now in range(0, 600, 20):
        states.append(_step(tracker, now, breached=(now // 20) % 2 == 0))
    fired = [s for s in states if s == "firing"]
    assert len(fired) == 2  # at 0 and at 300, not 15
    assert tracker.fired == 15
    assert tracker.suppressed == 13
    # A resolved notification only follows a firing that was announced.
    assert states.count("resolved") == 2


def test_a_firing_held_back_by_the_cooldown_is_announced_once_the_cooldown_ends() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0, resolve_after_s=0, cooldown_s=300))
    assert _step(tracker, 0, True) == "firing"
    assert _step(tracker, 10, False) == "resolved"
    assert _step(tracker, 20, True) is None  # fires again within the cooldown: held back
    # ...and then goes on firing for good: the world's last word must not stay "resolved".
    assert [_step(tracker, now, True) for now in range(30, 300, 30)] == [None] * 9
    assert _step(tracker, 300, True) == "firing"
    [firing] = tracker.firing()
    assert firing.notified
    assert _step(tracker, 330, True) is None  # once
    assert _step(tracker, 340, False) == "resolved"


def test_other_labels_are_other_alerts() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0, cooldown_s=300))
    other = AlertKey("RaptorRecoverySuccessRateLow", "warning", "db")
    assert _step(tracker, 0, True) == "firing"
    notification = tracker.evaluate(
        other, breached=True, value=1.0, threshold=80.0, message="", now=1
    )
    assert notification is not None
    assert notification.state is AlertState.FIRING
    assert {a.service for a in tracker.firing()} == {"api", "db"}


def test_without_auto_resolve_only_a_person_resolves() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0, resolve_after_s=0, auto_resolve=False))
    assert _step(tracker, 0, True) == "firing"
    assert _step(tracker, 1000, False) is None
    assert [a.state for a in tracker.active()] == [AlertState.FIRING]
    notification = tracker.resolve(KEY, 1001)
    assert notification is not None
    assert notification.state is AlertState.RESOLVED
    assert tracker.resolve(KEY, 1002) is None


def test_the_tracker_is_bounded() -> None:
    tracker = AlertTracker(AlertOptions(for_s=0), max_alerts=3)
    for index in range(5):
        key = AlertKey("A", "warning", f"s{index}")
        tracker.evaluate(key, breached=True, value=1, threshold=0, message="", now=0)
    assert len(tracker) == 3  # every entry is firing: no room for more, nothing forgotten


@pytest.mark.parametrize(
    ("comparison", "value", "volume", "breached"),
    [
        (Comparison.ABOVE, 6.0, 20, True),
        (Comparison.ABOVE, 5.0, 20, False),  # equal is not above
        (Comparison.ABOVE, 60.0, 19, False),  # below the minimum volume: never
        (Comparison.BELOW, 79.0, 20, True),
        (Comparison.BELOW, None, 100, False),
        (Comparison.BELOW, float("nan"), 100, False),
    ],
)
def test_rules_compare_with_their_minimum_volume(
    comparison: Comparison, value: float | None, volume: float, breached: bool
) -> None:
    threshold = 5.0 if comparison is Comparison.ABOVE else 80.0
    rule = AlertRule(
        name="X",
        severity=AlertSeverity.WARNING,
        metric="m",
        comparison=comparison,
        threshold=threshold,
        min_volume=20,
    )
    assert rule.breached(value, volume) is breached


@pytest.mark.parametrize(
    ("key", "value"),
    [("for_s", -1), ("resolve_after_s", float("inf")), ("cooldown_s", "5"), ("auto_resolve", 1)],
)
def test_options_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=r"monitor\."):
        AlertOptions(**{key: value})  # type: ignore[arg-type]
