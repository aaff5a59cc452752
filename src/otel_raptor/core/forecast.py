"""Forecast when a resource runs out: a robust trend over a sliding window of samples.

The method, in order:

1. Keep at most ``max_points`` samples (default 120): beyond that the window is subsampled
   evenly, always keeping the newest sample, so the O(n²) slope estimate stays bounded
   (7 140 pairs at 120 points).
2. Slope by Theil-Sen: the median of the slopes of every pair of samples. Up to ~29 % of the
   points can be arbitrary outliers (a GC spike, one bad reading) without moving it.
3. Level by median: the median of ``value - slope * (t - t_last)``, i.e. the fitted value at
   the newest sample, again insensitive to outliers.
4. Noise by MAD: the median absolute deviation of the residuals, scaled by 1.4826 to estimate
   a normal standard deviation. The slope's own uncertainty is approximated as
   ``sigma / sqrt(sum((t - mean t)²))`` (the least-squares formula with the robust sigma).
5. The slope must hold in the newest half of the window as well: the smaller of the two
   Theil-Sen slopes is used (a step change or a collection leaves the newest half flat).
6. Confidence: fit quality (1 minus the squared ratio of residual spread to value spread,
   both MAD-based) times a sample-count factor ``1 - exp(-(n - 2) / 8)`` times a span factor
   ``min(1, window span / horizon)`` (a forecast reaching far past the data it saw is weak).
   A caller that samples often must therefore keep a window spanning the horizon (the
   predictor does), not a fixed count of samples.
7. Time to exhaustion: from the fitted level along the slope; 0 when the resource is at the
   limit now (the fitted level, or the median of the newest half of the window, reaches it),
   which an alarm takes whatever the confidence.
8. Probability of reaching ``limit`` within ``horizon``: the fitted value at the horizon (or
   now, whichever is higher) is treated as normal with the residual and slope uncertainties
   combined; that probability is mixed with the no-trend one (the current level plus noise
   reaching the limit), weighted by the confidence.

Pure and standard library only: no clock, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from otel_raptor.errors import ConfigError

__all__ = ["MAX_POINTS", "MIN_POINTS", "Forecast", "forecast"]

#: Samples used at most; longer windows are subsampled evenly.
MAX_POINTS = 120
#: Fewer samples than this give an empty forecast (no trend, zero confidence).
MIN_POINTS = 3

# MAD -> standard deviation of a normal distribution.
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True, slots=True, kw_only=True)
class Forecast:
    """What the trend says about one resource.

    ``time_to_exhaustion_s``: seconds from the newest sample until the trend reaches the
    limit (0 when it is there now: the fitted level, or the median of the newest half of the
    window, within a relative 1e-9), ``None`` when the trend does not rise.
    ``probability``: of the value reaching the limit within the horizon, in [0, 1].
    ``confidence``: how much to trust the trend, in [0, 1] (fit quality times sample count).
    ``slope``: the trend, in value units per second. ``level``: the fitted value at the
    newest sample.
    """

    time_to_exhaustion_s: float | None
    probability: float
    confidence: float
    slope: float
    level: float = 0.0


def _normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _window(samples: Sequence[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    points = [(float(t), float(v)) for t, v in samples if math.isfinite(t) and math.isfinite(v)]
    points.sort(key=lambda p: p[0])
    n = len(points)
    if n <= max_points:
        return points
    # Even subsampling that keeps both ends: the newest sample matters most.
    step = (n - 1) / (max_points - 1)
    return [points[round(i * step)] for i in range(max_points)]


def _theil_sen(points: Sequence[tuple[float, float]]) -> float | None:
    slopes = []
    for i, (ti, vi) in enumerate(points):
        for tj, vj in points[i + 1 :]:
            if tj > ti:
                slopes.append((vj - vi) / (tj - ti))
    return statistics.median(slopes) if slopes else None


def _mad(values: Sequence[float]) -> float:
    centre = statistics.median(values)
    return statistics.median([abs(v - centre) for v in values])


def forecast(
    samples: Sequence[tuple[float, float]],
    limit: float,
    *,
    horizon: float,
    max_points: int = MAX_POINTS,
) -> Forecast:
    """Forecast ``samples`` (``(timestamp_s, value)`` pairs, any order) against ``limit``.

    ``horizon`` (seconds, > 0) is how far ahead the probability looks; ``limit`` is the value
    at which the resource is exhausted (same unit as the values). Non-finite samples are
    ignored. ``max_points`` (>= 3, default 120) bounds the window. Fewer than 3 usable samples
    (or all at one instant) give no trend: slope 0, confidence 0, probability 1 if the newest
    value is at the limit else 0.
    """
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigError("forecast.horizon", horizon, "a finite number of seconds > 0")
    if not math.isfinite(limit):
        raise ConfigError("forecast.limit", limit, "a finite number")
    points_cap: object = max_points  # typed int, but callers pass anything
    if not isinstance(points_cap, int) or max_points < MIN_POINTS:
        raise ConfigError("forecast.max_points", max_points, f"an integer >= {MIN_POINTS}")
    points = _window(samples, max_points)
    last_value = points[-1][1] if points else 0.0
    slope = _theil_sen(points) if len(points) >= MIN_POINTS else None
    if slope is None:
        reached = bool(points) and last_value >= limit
        return Forecast(
            time_to_exhaustion_s=0.0 if reached else None,
            probability=1.0 if reached else 0.0,
            confidence=0.0,
            slope=0.0,
            level=last_value,
        )
    n = len(points)
    newest = points[n // 2 :] if n >= 2 * MIN_POINTS else points
    if n >= 2 * MIN_POINTS:
        # The trend must hold in the newest half too: after a step change (or a collection)
        # the newest half is flat (or falling) while the whole window still rises.
        recent = _theil_sen(newest)
        if recent is not None:
            slope = min(slope, recent)
    t_last = points[-1][0]
    level = statistics.median([v - slope * (t - t_last) for t, v in points])
    residuals = [v - (level + slope * (t - t_last)) for t, v in points]
    values = [v for _, v in points]
    scale = max(abs(limit), abs(level), 1e-12)
    # A floor on sigma: a perfectly clean line must not give a step-function probability.
    sigma = max(_MAD_TO_SIGMA * _mad(residuals), 1e-9 * scale)
    t_mean = statistics.fmean(t for t, _ in points)
    t_spread = math.sqrt(sum((t - t_mean) ** 2 for t, _ in points))
    slope_se = sigma / t_spread if t_spread > 0 else 0.0

    # At the limit now, give or take rounding (a fitted level a few ulps short of a full disk
    # reads as full): 0 is what tells the alarm to raise whatever the confidence. The newest
    # half's median counts too: once a ramp turns flat at the limit (a full disk) the slope
    # is the newest half's, 0, and the whole window's median level lags far behind it.
    at_limit = limit - 1e-9 * scale
    if level >= at_limit or statistics.median(v for _, v in newest) >= at_limit:
        tte: float | None = 0.0
    elif slope > 0:
        tte = (limit - level) / slope
    else:
        tte = None

    value_spread = _MAD_TO_SIGMA * _mad(values)
    ratio = sigma / value_spread if value_spread > 0 else math.inf
    fit = 1.0 - ratio * ratio if ratio < 1.0 else 0.0
    if value_spread <= 0 and sigma <= 1e-9 * scale:
        fit = 1.0  # a constant series fits its (flat) line exactly
    count_factor = 1.0 - math.exp(-(n - 2) / 8.0)
    # Extrapolating far beyond the observed span is speculation: one rising GC tooth looks
    # exactly like a leak until the window covers the next collection.
    span_factor = min(1.0, (t_last - points[0][0]) / horizon)
    confidence = min(1.0, max(0.0, fit * count_factor * span_factor))

    projected = max(level, level + slope * horizon)
    # hypot, not sqrt of squares: a huge slope error (subnormal time steps) must not overflow.
    spread = math.hypot(sigma, slope_se * horizon)
    with_trend = _normal_sf((limit - projected) / spread)
    without_trend = _normal_sf((limit - level) / sigma)
    # A mixture of "the trend goes on" and "there is no trend", weighted by the confidence:
    # an untrustworthy trend cannot make an alarm on its own.
    probability = confidence * with_trend + (1.0 - confidence) * without_trend
    return Forecast(
        time_to_exhaustion_s=tte,
        probability=min(1.0, max(0.0, probability)),
        confidence=confidence,
        slope=slope,
        level=level,
    )
