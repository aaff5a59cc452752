"""When a forecast becomes an alarm: thresholds with hysteresis, one state machine per resource.

Raise when ``probability >= raise_threshold``, or when the time to exhaustion is under the
horizon with ``confidence >= min_confidence``, or when it is 0 (the level is at the limit now:
no extrapolation to distrust, so whatever the confidence). Clear only after ``clear_after``
consecutive evaluations with ``probability < clear_threshold`` *and* no time to exhaustion
under ``clear_margin x horizon`` (never while at the limit). The gap between the two
thresholds and the run of quiet evaluations keep a noisy but stable series from flapping.

Severity of a raised alarm, by time to exhaustion: ``critical`` under a quarter of the horizon,
``high`` under half of it, else ``medium``. Without a rising trend (no time to exhaustion, the
level itself near the limit): ``high`` at a probability >= 0.95, else ``medium``. While
raised, a rise in severity is reported again (``Raised(escalated=True)``) so prevention actions
with a higher minimum severity can run.

Pure: ``evaluate`` returns what happened; the caller publishes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from otel_raptor.core.classification import Severity
from otel_raptor.core.forecast import Forecast
from otel_raptor.errors import ConfigError

__all__ = [
    "EMPTY_SNAPSHOT",
    "Alarm",
    "AlarmOptions",
    "Cleared",
    "Raised",
    "ResourceSnapshot",
    "is_integer",
    "is_number",
    "severity_of",
]

_SEVERITY_RANK = {Severity.LOW: 0, Severity.MEDIUM: 1, Severity.HIGH: 2, Severity.CRITICAL: 3}


def is_number(value: object) -> bool:
    """A finite int or float (not a bool): option values arrive untyped from env and files."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmOptions:
    """Thresholds of the alarm.

    ``horizon_s`` (> 0, default 1800): how far ahead to look, seconds.
    ``raise_threshold`` (default 0.8) and ``clear_threshold`` (default 0.4): probabilities,
    ``0 <= clear < raise <= 1``. ``min_confidence`` (default 0.5, in [0, 1]): confidence a
    time-to-exhaustion alarm needs. ``clear_after`` (integer >= 1, default 3): quiet
    evaluations in a row before clearing. ``clear_margin`` (>= 1, default 1.5): a time to
    exhaustion under ``clear_margin x horizon_s`` keeps the alarm raised.
    """

    horizon_s: float = 1800.0
    raise_threshold: float = 0.8
    clear_threshold: float = 0.4
    min_confidence: float = 0.5
    clear_after: int = 3
    clear_margin: float = 1.5

    def __post_init__(self) -> None:
        if not is_number(self.horizon_s) or self.horizon_s <= 0:
            raise ConfigError("prediction.horizon_s", self.horizon_s, "a number of seconds > 0")
        for key, value in (
            ("prediction.raise_threshold", self.raise_threshold),
            ("prediction.clear_threshold", self.clear_threshold),
            ("prediction.min_confidence", self.min_confidence),
        ):
            if not (is_number(value) and 0.0 <= value <= 1.0):
                raise ConfigError(key, value, "a number in [0, 1]")
        if self.clear_threshold >= self.raise_threshold:
            raise ConfigError(
                "prediction.clear_threshold",
                self.clear_threshold,
                f"a number below raise_threshold ({self.raise_threshold})",
            )
        if not is_integer(self.clear_after) or self.clear_after < 1:
            raise ConfigError("prediction.clear_after", self.clear_after, "an integer >= 1")
        if not (is_number(self.clear_margin) and self.clear_margin >= 1.0):
            raise ConfigError("prediction.clear_margin", self.clear_margin, "a number >= 1")


@dataclass(frozen=True, slots=True)
class Raised:
    """The alarm went up (or, with ``escalated``, its severity rose while up)."""

    forecast: Forecast
    severity: Severity
    escalated: bool = False


@dataclass(frozen=True, slots=True)
class Cleared:
    """The alarm went down."""

    forecast: Forecast


def severity_of(forecast: Forecast, horizon_s: float) -> Severity:
    """Severity of a forecast that raised an alarm (see the module doc)."""
    tte = forecast.time_to_exhaustion_s
    if tte is not None:
        if tte < horizon_s / 4:
            return Severity.CRITICAL
        if tte < horizon_s / 2:
            return Severity.HIGH
        return Severity.MEDIUM
    # No rising trend, yet a high probability: the level itself sits near the limit.
    return Severity.HIGH if forecast.probability >= 0.95 else Severity.MEDIUM


def _at_limit(forecast: Forecast) -> bool:
    # The confidence weighs a trend's extrapolation; a level at the limit is no forecast.
    # Without this, a short window (low confidence) or a flat series at the limit (a full
    # disk: probability 0.5 with no trend) never raised at all.
    return forecast.time_to_exhaustion_s == 0.0


class Alarm:
    """The alarm of one resource. Not thread-safe: the caller serialises ``evaluate``."""

    __slots__ = ("_options", "_quiet", "_severity")

    def __init__(self, options: AlarmOptions | None = None) -> None:
        self._options = options or AlarmOptions()
        self._severity: Severity | None = None
        self._quiet = 0

    @property
    def raised(self) -> bool:
        return self._severity is not None

    @property
    def severity(self) -> Severity | None:
        """The severity while raised, else ``None``."""
        return self._severity

    def _should_raise(self, forecast: Forecast) -> bool:
        opts = self._options
        if forecast.probability >= opts.raise_threshold or _at_limit(forecast):
            return True
        tte = forecast.time_to_exhaustion_s
        return (
            tte is not None and tte < opts.horizon_s and forecast.confidence >= opts.min_confidence
        )

    def _is_quiet(self, forecast: Forecast) -> bool:
        opts = self._options
        tte = forecast.time_to_exhaustion_s
        return (
            not _at_limit(forecast)
            and forecast.probability < opts.clear_threshold
            and (
                tte is None
                or tte > opts.horizon_s * opts.clear_margin
                or forecast.confidence < opts.min_confidence
            )
        )

    def evaluate(self, forecast: Forecast) -> Raised | Cleared | None:
        """Feed one forecast; returns the transition, or ``None`` when nothing changed."""
        opts = self._options
        if self._severity is None:
            if self._should_raise(forecast):
                self._severity = severity_of(forecast, opts.horizon_s)
                self._quiet = 0
                return Raised(forecast, self._severity)
            return None
        if self._is_quiet(forecast):
            self._quiet += 1
            if self._quiet >= opts.clear_after:
                self._severity = None
                self._quiet = 0
                return Cleared(forecast)
            return None
        self._quiet = 0
        if self._should_raise(forecast):
            severity = severity_of(forecast, opts.horizon_s)
            if _SEVERITY_RANK[severity] > _SEVERITY_RANK[self._severity]:
                self._severity = severity
                return Raised(forecast, severity, escalated=True)
        return None

    def reset(self) -> None:
        self._severity = None
        self._quiet = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSnapshot:
    """What the resource gauges report, by bounded resource name.

    ``utilization``: usage over limit (0-1, may briefly exceed 1). ``time_to_exhaustion_s``:
    only resources whose trend reaches the limit. ``probability``: of exhaustion within the
    horizon. ``memory_pressure``: effective memory usage over the effective limit, ``None``
    when unknown.
    """

    utilization: Mapping[str, float] = field(default_factory=dict)
    time_to_exhaustion_s: Mapping[str, float] = field(default_factory=dict)
    probability: Mapping[str, float] = field(default_factory=dict)
    memory_pressure: float | None = None


#: The snapshot of a runtime nobody monitors.
EMPTY_SNAPSHOT = ResourceSnapshot()
