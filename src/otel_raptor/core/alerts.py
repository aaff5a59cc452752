"""Threshold alerts with the lifecycle of Prometheus and Alertmanager.

An alert is identified by its labels (``AlertKey``: rule name, severity, service), as in
Prometheus. Each evaluation says, per key, whether the rule's condition holds now; the tracker
moves the alert through

``inactive`` → ``pending`` (the condition holds) → ``firing`` (it has held for ``for_s``,
Prometheus' ``for:``) → ``resolved`` (it has been false for ``resolve_after_s``, Prometheus'
``keep_firing_for``; only with ``auto_resolve``) → ``inactive``.

A pending alert whose condition clears goes back to inactive without a word. A firing alert
whose condition holds again before ``resolve_after_s`` keeps firing: one incident, not two.

Notifications follow Alertmanager's rules of thumb: a **firing** notification when an alert
starts firing, but at most one per key per ``cooldown_s`` (an alert that resolves and fires
again within the cooldown is not announced twice; its firing is counted as *suppressed*, and
announced when the cooldown ends should it still be firing then), and a **resolved**
notification when an alert whose firing was announced resolves. The tracker returns what
happened; the caller publishes it (after releasing its lock).

Rules state the *minimum volume* their condition needs (``AlertRule.min_volume``): below it the
condition is false, so a success rate of 1 in 4 on a quiet service never pages anybody
(Hystrix waits for 20 requests in 10 s, Envoy for 100).

Pure: time (monotonic seconds) is a parameter; not thread-safe (the runtime holds a lock).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from otel_raptor.errors import ConfigError

__all__ = [
    "Alert",
    "AlertKey",
    "AlertNotification",
    "AlertOptions",
    "AlertRule",
    "AlertSeverity",
    "AlertState",
    "AlertTracker",
    "Comparison",
]


class AlertSeverity(str, enum.Enum):
    """How urgent an alert is (the ``severity`` label of the Prometheus rules)."""

    WARNING = "warning"
    CRITICAL = "critical"

    def __str__(self) -> str:
        return self.value


class AlertState(str, enum.Enum):
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"

    def __str__(self) -> str:
        return self.value


class Comparison(str, enum.Enum):
    """Whether a value *above* the threshold or *below* it breaches the rule."""

    ABOVE = "above"
    BELOW = "below"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertRule:
    """One threshold: ``name`` (``RaptorRecoveryTimeHigh``), ``severity``, the ``metric`` it
    reads (``recovery_time_p95``, ``success_rate``, ``error_frequency``, ``memory_usage``),
    ``comparison`` and ``threshold`` (in the metric's unit), ``min_volume`` (the count behind
    the metric needed before the rule applies, 0 for none) and a ``summary`` template
    (``{service}``, ``{value}``, ``{threshold}`` are filled in)."""

    name: str
    severity: AlertSeverity
    metric: str
    comparison: Comparison
    threshold: float
    min_volume: float = 0.0
    summary: str = ""

    def breached(self, value: float | None, volume: float) -> bool:
        """Whether ``value`` (with ``volume`` behind it) breaches the rule."""
        if value is None or math.isnan(value) or volume < self.min_volume:
            return False
        if self.comparison is Comparison.ABOVE:
            return value > self.threshold
        return value < self.threshold


@dataclass(frozen=True, slots=True, order=True)
class AlertKey:
    """An alert's identity: its labels."""

    name: str
    severity: str
    service: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """An alert as it stands: ``state`` (``pending``, ``firing`` or ``resolved``), the latest
    ``value`` and its ``threshold``, ``since`` (monotonic seconds at which it entered the
    current state), ``active_since`` (when its condition started holding), ``message`` (one
    sentence with the numbers) and ``notified`` (whether its firing was announced)."""

    name: str
    severity: str
    service: str
    state: AlertState
    value: float
    threshold: float
    since: float
    active_since: float
    message: str
    notified: bool = False

    @property
    def key(self) -> AlertKey:
        return AlertKey(self.name, self.severity, self.service)


@dataclass(frozen=True, slots=True)
class AlertNotification:
    """What to tell the world: an alert started firing, or resolved."""

    state: AlertState
    alert: Alert


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number of seconds >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(key, value, "a number of seconds >= 0")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertOptions:
    """``for_s``: how long a condition must hold before its alert fires (default 60 s);
    ``resolve_after_s``: how long it must have cleared before a firing alert resolves
    (120 s); ``cooldown_s``: at most one firing notification per alert per cooldown (300 s);
    ``auto_resolve``: resolve on its own (``True``), or stay firing until :meth:`resolve`."""

    for_s: float = 60.0
    resolve_after_s: float = 120.0
    cooldown_s: float = 300.0
    auto_resolve: bool = True

    def __post_init__(self) -> None:
        _seconds("monitor.alert_for", self.for_s)
        _seconds("monitor.alert_resolve_after", self.resolve_after_s)
        _seconds("monitor.alert_cooldown", self.cooldown_s)
        if not isinstance(self.auto_resolve, bool):
            raise ConfigError("monitor.auto_resolve_alerts", self.auto_resolve, "a boolean")


@dataclass(slots=True)
class _Entry:
    alert: Alert | None = None  # None: inactive
    cleared_since: float | None = None
    last_notified: float = -math.inf


class AlertTracker:
    """The state of every alert key (see the module docstring). At most ``max_alerts`` keys
    are remembered; when full, the inactive key idle longest is forgotten (its cooldown with
    it), and a new key that finds no room is not tracked (the rules' keys are bounded by the
    services, so this only guards against misuse)."""

    __slots__ = ("_entries", "_max", "_options", "fired", "suppressed")

    def __init__(self, options: AlertOptions | None = None, *, max_alerts: int = 4096) -> None:
        self._options = options or AlertOptions()
        self._entries: dict[AlertKey, _Entry] = {}
        self._max = max_alerts
        #: Firing transitions so far, and those whose notification the cooldown held back.
        self.fired = 0
        self.suppressed = 0

    @property
    def options(self) -> AlertOptions:
        return self._options

    def evaluate(
        self,
        key: AlertKey,
        *,
        breached: bool,
        value: float,
        threshold: float,
        message: str,
        now: float,
    ) -> AlertNotification | None:
        """One evaluation of ``key``'s condition at ``now``; the notification to send, if any."""
        entry = self._entries.get(key)
        if entry is None:
            if not breached or not self._make_room():
                return None
            entry = self._entries[key] = _Entry()
        alert = entry.alert
        options = self._options
        if breached:
            entry.cleared_since = None
            if alert is None:
                alert = Alert(
                    name=key.name,
                    severity=key.severity,
                    service=key.service,
                    state=AlertState.PENDING,
                    value=value,
                    threshold=threshold,
                    since=now,
                    active_since=now,
                    message=message,
                )
            else:
                alert = replace(alert, value=value, threshold=threshold, message=message)
            if alert.state is AlertState.PENDING and now - alert.active_since >= options.for_s:
                return self._fire(entry, alert, now)
            if (
                alert.state is AlertState.FIRING
                and not alert.notified
                and now - entry.last_notified >= options.cooldown_s
            ):
                # Its firing was held back by the cooldown (it had just resolved, and that
                # was announced): still firing once the cooldown is over, it is announced
                # now, or the world's last word stays "resolved" for as long as it fires.
                return self._announce(entry, alert, now)
            entry.alert = alert
            return None
        # The condition does not hold.
        if alert is None:
            return None
        if alert.state is AlertState.PENDING:
            entry.alert = None
            return None
        alert = replace(alert, value=value, message=message)
        entry.alert = alert
        if not options.auto_resolve:
            return None
        if entry.cleared_since is None:
            entry.cleared_since = now
        if now - entry.cleared_since < options.resolve_after_s:
            return None
        return self._resolve(entry, alert, now)

    def resolve(self, key: AlertKey, now: float) -> AlertNotification | None:
        """Resolve a firing (or forget a pending) alert by hand."""
        entry = self._entries.get(key)
        if entry is None or entry.alert is None:
            return None
        if entry.alert.state is AlertState.PENDING:
            entry.alert = None
            return None
        return self._resolve(entry, entry.alert, now)

    def _fire(self, entry: _Entry, alert: Alert, now: float) -> AlertNotification | None:
        self.fired += 1
        announce = now - entry.last_notified >= self._options.cooldown_s
        alert = replace(alert, state=AlertState.FIRING, since=now, notified=announce)
        entry.alert = alert
        if not announce:
            self.suppressed += 1
            return None
        return self._announce(entry, alert, now)

    def _announce(self, entry: _Entry, alert: Alert, now: float) -> AlertNotification:
        alert = replace(alert, notified=True)
        entry.alert = alert
        entry.last_notified = now
        return AlertNotification(AlertState.FIRING, alert)

    def _resolve(self, entry: _Entry, alert: Alert, now: float) -> AlertNotification | None:
        entry.alert = None
        entry.cleared_since = None
        if not alert.notified:
            return None
        return AlertNotification(
            AlertState.RESOLVED, replace(alert, state=AlertState.RESOLVED, since=now)
        )

    def active(self) -> list[Alert]:
        """Pending and firing alerts, firing first, then by key."""
        alerts = [entry.alert for entry in self._entries.values() if entry.alert is not None]
        return sorted(alerts, key=lambda a: (a.state is not AlertState.FIRING, a.key))

    def firing(self) -> list[Alert]:
        return [alert for alert in self.active() if alert.state is AlertState.FIRING]

    def keys(self) -> list[AlertKey]:
        """Keys with a pending or firing alert (to evaluate even when their data is gone)."""
        return [key for key, entry in self._entries.items() if entry.alert is not None]

    def _make_room(self) -> bool:
        if len(self._entries) < self._max:
            return True
        idle = [key for key, entry in self._entries.items() if entry.alert is None]
        if not idle:
            return False
        oldest = min(idle, key=lambda key: self._entries[key].last_notified)
        del self._entries[oldest]
        return True

    def __len__(self) -> int:
        return len(self._entries)
