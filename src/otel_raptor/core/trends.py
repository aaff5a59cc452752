"""Trends and anomalies: EWMA baselines, deviation scores and three detectors.

Every series is fed one observation per *interval* (a minute by default): an error count, or
a mean recovery time, or a failure ratio, each with the *volume* behind it (errors counted,
recoveries finished). Intervals below the minimum volume are skipped by the rate-of-outcome
series (a mean of two recoveries says nothing), while count series take zeros too (no errors is
a fact). Each series keeps:

* a **baseline**: an exponentially weighted mean and variance (``Ewma``) with a long memory
  (``baseline_intervals``, default 60), and a **recent** level with a short one (5);
* a **deviation score**: how many standard deviations the newest observation is from the
  baseline. Counts are Poisson-like: their score is also at most the Anscombe score
  ``2 (sqrt(x + 3/8) - sqrt(baseline + 3/8))``, which is standard normal for Poisson noise,
  so a quiet series (3 errors a minute) does not make every blip look huge.

The detectors, each needing a minimum volume before it may fire:

* **spike** — the newest observation is at least ``spike_factor`` (3) times the baseline *and*
  at least ``spike_score`` (4) deviations above it, with ``min_volume`` behind it;
* **sustained rise** — the recent level has stayed at least ``rise_factor`` (1.5) times the
  baseline, and 3 standard errors of the recent level above it, for ``rise_intervals`` (5)
  intervals in a row;
* **slow degradation** (level series: recovery time, failure ratio) — a medium level (an EWMA
  over ``3 x recent_intervals``) has stayed at least ``degradation_factor`` (1.2) times a
  *long* reference (an EWMA over ``4 x baseline_intervals``, established over at least
  ``baseline_intervals``), and 3 standard errors of that level above it, for
  ``degradation_intervals`` (10) intervals in a row: a drift too slow for the other two, whose
  baseline follows it (two moving averages of different spans, as a MACD does). Counts are
  left out: a daily cycle of traffic is a slow rise of errors too, and it is benign.

A detector that fired stays quiet until its condition has cleared (hysteresis), so a
lasting change is reported once, not every interval. A series needs ``warmup`` (10)
intervals of history before any detector may fire: until then there is no baseline to
compare with.

Pure: no clock (intervals are counted), no randomness, not thread-safe.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from otel_raptor.errors import ConfigError

__all__ = [
    "Anomaly",
    "AnomalyKind",
    "Ewma",
    "SeriesKind",
    "TrendOptions",
    "TrendSeries",
]


#: Standard errors of the smoothed level a degradation must stand above its reference.
_DEGRADATION_MARGIN = 3.0
#: Standard errors of the recent level a sustained rise must stand above the baseline.
_RISE_MARGIN = 3.5


class AnomalyKind(str, enum.Enum):
    """What a detector found."""

    SPIKE = "spike"
    SUSTAINED_RISE = "sustained_rise"
    SLOW_DEGRADATION = "slow_degradation"

    def __str__(self) -> str:
        return self.value


class SeriesKind(str, enum.Enum):
    """How a series' observations behave: ``count`` (events per interval, Poisson-like,
    zeros included) or ``level`` (a mean or a ratio, observed only with enough volume)."""

    COUNT = "count"
    LEVEL = "level"


def _positive(key: str, value: float, *, integer: bool = False, minimum: float = 0.0) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if integer:
        bad = bad or not isinstance(value, int)
    if bad or not math.isfinite(value) or value <= minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"trends.{key}", value, f"{what} > {minimum:g}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendOptions:
    """Knobs of the detectors (see the module docstring); intervals are counts, not seconds."""

    baseline_intervals: int = 60
    recent_intervals: int = 5
    warmup: int = 10
    spike_factor: float = 3.0
    spike_score: float = 4.0
    rise_factor: float = 1.5
    rise_intervals: int = 5
    degradation_factor: float = 1.2
    degradation_intervals: int = 10
    min_volume: float = 10.0

    def __post_init__(self) -> None:
        _positive("baseline_intervals", self.baseline_intervals, integer=True, minimum=1)
        _positive("recent_intervals", self.recent_intervals, integer=True)
        _positive("warmup", self.warmup, integer=True)
        _positive("spike_factor", self.spike_factor, minimum=1)
        _positive("spike_score", self.spike_score)
        _positive("rise_factor", self.rise_factor, minimum=1)
        _positive("rise_intervals", self.rise_intervals, integer=True)
        _positive("degradation_factor", self.degradation_factor, minimum=1)
        _positive("degradation_intervals", self.degradation_intervals, integer=True)
        if self.recent_intervals >= self.baseline_intervals:
            raise ConfigError(
                "trends.recent_intervals",
                self.recent_intervals,
                f"fewer intervals than baseline_intervals ({self.baseline_intervals})",
            )
        volume: object = self.min_volume  # typed float, but callers pass anything
        if isinstance(volume, bool) or not (isinstance(volume, (int, float)) and volume >= 0):
            raise ConfigError("trends.min_volume", volume, "a number >= 0")


class Ewma:
    """An exponentially weighted mean and variance (West, 1979), with ``alpha = 2 / (n + 1)``
    for a memory of about ``n`` observations. Until it has seen ``n`` observations it weighs
    them equally (a running mean), so that its first value does not dominate for long."""

    __slots__ = ("alpha", "count", "mean", "variance")

    def __init__(self, intervals: int) -> None:
        self.alpha = 2.0 / (intervals + 1.0)
        self.mean = 0.0
        self.variance = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        if self.count == 0:
            self.mean = value
        else:
            alpha = max(self.alpha, 1.0 / (self.count + 1))
            delta = value - self.mean
            increment = alpha * delta
            self.mean += increment
            self.variance = (1.0 - alpha) * (self.variance + delta * increment)
        self.count += 1

    def std(self) -> float:
        return math.sqrt(max(self.variance, 0.0))


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A detector fired: ``value`` is the newest observation (or the recent level, for a rise
    and a degradation), ``baseline`` the reference it was compared with, ``ratio`` their
    quotient (``inf`` over a zero baseline), ``score`` the deviation in standard deviations,
    ``volume`` what was behind the newest observation, ``intervals`` how long the series has
    been deviating (1 for a spike)."""

    kind: AnomalyKind
    value: float
    baseline: float
    ratio: float
    score: float
    volume: float
    intervals: int


class TrendSeries:
    """One series and its detectors. Feed it with :meth:`observe` once per interval."""

    __slots__ = (
        "_baseline",
        "_degrading",
        "_fired",
        "_kind",
        "_long",
        "_medium",
        "_options",
        "_recent",
        "_rising",
        "idle",
    )

    def __init__(self, kind: SeriesKind, options: TrendOptions, *, history: int = 0) -> None:
        """``history``: intervals already known to have been zero (a count series created
        for a key first seen now, in a process that has watched for that long)."""
        self._kind = kind
        self._options = options
        self._baseline = Ewma(options.baseline_intervals)
        self._recent = Ewma(options.recent_intervals)
        self._medium = Ewma(3 * options.recent_intervals)
        self._long = Ewma(4 * options.baseline_intervals)
        if history and kind is SeriesKind.COUNT:
            known = min(history, options.baseline_intervals)
            for ewma in (self._baseline, self._recent, self._medium, self._long):
                ewma.count = known
        self._rising = 0
        self._degrading = 0
        self._fired: set[AnomalyKind] = set()
        #: Intervals in a row with nothing observed (the owner drops idle series).
        self.idle = 0

    @property
    def baseline(self) -> float:
        return self._baseline.mean

    @property
    def recent(self) -> float:
        return self._recent.mean

    @property
    def intervals(self) -> int:
        return self._baseline.count

    def deviation(self) -> float:
        """The baseline's standard deviation, floored: at ``sqrt(baseline)`` and 1 for counts
        (Poisson), at 5 % of the level for levels, so a flat series never divides by zero."""
        std = self._baseline.std()
        mean = abs(self._baseline.mean)
        if self._kind is SeriesKind.COUNT:
            return max(std, math.sqrt(mean), 1.0)
        return max(std, 0.05 * mean, 1e-9)

    def score(self, value: float) -> float:
        """How unusual ``value`` is against the baseline, in standard deviations."""
        baseline = self._baseline.mean
        plain = (value - baseline) / self.deviation()
        if self._kind is SeriesKind.COUNT and value >= 0 and baseline >= 0:
            anscombe = 2.0 * (math.sqrt(value + 0.375) - math.sqrt(baseline + 0.375))
            return min(plain, anscombe)
        return plain

    def observe(self, value: float, volume: float) -> list[Anomaly]:
        """Add this interval's observation; return what fired (usually nothing).

        For a ``level`` series, an interval with less than ``min_volume`` behind it should not
        be observed at all (call :meth:`skip`)."""
        options = self._options
        found: list[Anomaly] = []
        warmed = self._baseline.count >= options.warmup
        baseline = self._baseline.mean
        score = self.score(value)
        self._recent.update(value)
        recent = self._recent.mean
        enough = volume >= options.min_volume
        if warmed:
            # Spike: this interval alone.
            spiking = (
                enough and value >= options.spike_factor * baseline and score >= options.spike_score
            )
            self._edge(AnomalyKind.SPIKE, spiking, found, value, baseline, score, volume, 1)
            # Sustained rise: the recent level, interval after interval, well beyond the noise
            # a level averaged over the recent intervals still has.
            recent_score = (recent - baseline) / self._recent_error()
            if enough and recent >= options.rise_factor * baseline and recent_score >= _RISE_MARGIN:
                self._rising += 1
            else:
                self._rising = 0
            self._edge(
                AnomalyKind.SUSTAINED_RISE,
                self._rising >= options.rise_intervals,
                found,
                recent,
                baseline,
                recent_score,
                volume,
                self._rising,
            )
            self._medium.update(value)
            if self._kind is SeriesKind.LEVEL:
                self._degradation(self._medium.mean, volume, found)
        # Learn after judging, so that a spike does not excuse itself; and not while a rise is
        # building up, or the baseline would chase it and the rise never be confirmed. A rise
        # confirmed (or one that lasts 3x longer than needed) is learnt: a new normal becomes
        # normal, as it should.
        if not 0 < self._rising < options.rise_intervals:
            self._baseline.update(value)
        if not warmed:
            self._medium.update(value)
        self._long.update(value)
        self.idle = 0
        return found

    def skip(self) -> None:
        """An interval with too little volume for a level series: nothing learnt."""
        self.idle += 1

    def _recent_error(self, ewma: Ewma | None = None) -> float:
        """The noise of a smoothed level: the series' deviation shrunk by the smoothing of
        the EWMA, ``sqrt(alpha / (2 - alpha))``."""
        alpha = (ewma or self._recent).alpha
        return self.deviation() * math.sqrt(alpha / (2.0 - alpha))

    def _degradation(self, recent: float, volume: float, out: list[Anomaly]) -> None:
        options = self._options
        reference = self._long.mean
        margin = (recent - reference) / self._recent_error(self._medium)
        if (
            self._long.count >= options.baseline_intervals
            and volume >= options.min_volume
            and reference > 0
            and recent >= options.degradation_factor * reference
            and margin >= _DEGRADATION_MARGIN
        ):
            self._degrading += 1
        else:
            self._degrading = 0
        self._edge(
            AnomalyKind.SLOW_DEGRADATION,
            self._degrading >= options.degradation_intervals,
            out,
            recent,
            reference,
            margin,
            volume,
            self._degrading,
        )

    def _edge(
        self,
        kind: AnomalyKind,
        active: bool,
        out: list[Anomaly],
        value: float,
        baseline: float,
        score: float,
        volume: float,
        intervals: int,
    ) -> None:
        if not active:
            self._fired.discard(kind)
            return
        if kind in self._fired:
            return
        self._fired.add(kind)
        ratio = value / baseline if baseline > 0 else math.inf
        out.append(Anomaly(kind, value, baseline, ratio, score, volume, intervals))
