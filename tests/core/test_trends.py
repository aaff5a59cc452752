"""The trend detectors on synthetic series: they find what is there, and benign noise (Poisson
counts, heavy-tailed recovery times, a daily cycle) must not make them fire."""

from __future__ import annotations

import math
import random

import pytest

from otel_raptor.core.trends import (
    AnomalyKind,
    Ewma,
    SeriesKind,
    TrendOptions,
    TrendSeries,
)
from otel_raptor.errors import ConfigError


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _mean_of(rng: random.Random, typical: float, n: int) -> float:
    # A heavy-tailed recovery time (lognormal, sigma 0.8), averaged over n recoveries.
    return sum(rng.lognormvariate(math.log(typical), 0.8) for _ in range(n)) / n


def _kinds(series: TrendSeries, values: list[tuple[float, float]]) -> list[tuple[int, str]]:
    found = []
    for index, (value, volume) in enumerate(values):
        for anomaly in series.observe(value, volume):
            found.append((index, anomaly.kind.value))
    return found


def test_ewma_is_a_running_mean_until_it_has_its_span() -> None:
    ewma = Ewma(10)
    for value in (1.0, 2.0, 3.0):
        ewma.update(value)
    assert ewma.mean == pytest.approx(2.0)
    assert ewma.std() == pytest.approx(math.sqrt(2 / 3), rel=0.05)


@pytest.mark.parametrize("rate", [3.0, 20.0, 200.0])
@pytest.mark.parametrize("seed", range(6))
def test_poisson_noise_with_a_daily_cycle_raises_nothing(rate: float, seed: int) -> None:
    rng = random.Random(seed)
    series = TrendSeries(SeriesKind.COUNT, TrendOptions())
    values = []
    for minute in range(1440):  # a day of minutes, errors rising and falling by 30 %
        count = _poisson(rng, rate * (1 + 0.3 * math.sin(2 * math.pi * minute / 1440)))
        values.append((float(count), float(count)))
    assert _kinds(series, values) == []


@pytest.mark.parametrize("seed", range(6))
def test_heavy_tailed_recovery_times_raise_nothing(seed: int) -> None:
    rng = random.Random(seed)
    series = TrendSeries(SeriesKind.LEVEL, TrendOptions())
    values = []
    for _ in range(1440):
        volume = rng.randint(10, 40)
        values.append((_mean_of(rng, 2.0, volume), float(volume)))
    assert _kinds(series, values) == []


def test_a_spike_is_found_in_the_interval_it_happens() -> None:
    rng = random.Random(1)
    series = TrendSeries(SeriesKind.COUNT, TrendOptions())
    for _ in range(60):
        count = _poisson(rng, 10)
        assert series.observe(count, count) == []
    [anomaly] = series.observe(55.0, 55.0)
    assert anomaly.kind is AnomalyKind.SPIKE
    assert anomaly.ratio > 4
    assert anomaly.score > 4
    # Reported once: the same level the next interval is not a second spike.
    assert [a.kind for a in series.observe(60.0, 60.0)] != [AnomalyKind.SPIKE]


def test_a_spike_needs_its_minimum_volume() -> None:
    series = TrendSeries(SeriesKind.COUNT, TrendOptions(min_volume=10))
    for _ in range(60):
        series.observe(1.0, 1.0)
    # 8 errors against a baseline of 1 is 8x, but 8 errors are a handful: nothing.
    assert series.observe(8.0, 8.0) == []


def test_nothing_fires_before_the_warmup() -> None:
    series = TrendSeries(SeriesKind.COUNT, TrendOptions(warmup=10))
    values = [(2.0, 2.0)] * 5 + [(100.0, 100.0)]
    assert _kinds(series, values) == []


def test_a_key_first_seen_late_compares_with_the_zeros_before_it() -> None:
    # A category that never failed in an hour of watching, then fails 40 times a minute.
    series = TrendSeries(SeriesKind.COUNT, TrendOptions(), history=60)
    [anomaly] = series.observe(40.0, 40.0)
    assert anomaly.kind is AnomalyKind.SPIKE
    assert math.isinf(anomaly.ratio)


def test_a_doubling_that_lasts_is_a_sustained_rise() -> None:
    rng = random.Random(2)
    series = TrendSeries(SeriesKind.COUNT, TrendOptions())
    for _ in range(100):
        count = _poisson(rng, 10)
        series.observe(count, count)
    found = []
    for minute in range(30):
        count = _poisson(rng, 20)
        found += [(minute, a.kind) for a in series.observe(count, count)]
    kinds = [kind for _, kind in found]
    assert AnomalyKind.SUSTAINED_RISE in kinds
    minute = next(m for m, kind in found if kind is AnomalyKind.SUSTAINED_RISE)
    assert minute >= TrendOptions().rise_intervals - 1  # it has to last to count


def test_a_slow_drift_of_recovery_time_is_a_degradation() -> None:
    rng = random.Random(3)
    series = TrendSeries(SeriesKind.LEVEL, TrendOptions())
    for _ in range(300):
        series.observe(_mean_of(rng, 2.0, 20), 20.0)
    found = []
    for minute in range(240):  # +0.5 % a minute: x2.2 over four hours
        value = _mean_of(rng, 2.0 * 1.005**minute, 20)
        found += [(minute, a) for a in series.observe(value, 20.0)]
    degradations = [(m, a) for m, a in found if a.kind is AnomalyKind.SLOW_DEGRADATION]
    assert degradations
    minute, anomaly = degradations[0]
    assert anomaly.ratio >= TrendOptions().degradation_factor
    assert minute < 200


def test_counts_never_report_a_slow_degradation() -> None:
    series = TrendSeries(SeriesKind.COUNT, TrendOptions())
    values = [(10.0 * 1.01**minute, 10.0 * 1.01**minute) for minute in range(400)]
    assert AnomalyKind.SLOW_DEGRADATION.value not in {kind for _, kind in _kinds(series, values)}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("baseline_intervals", 1),
        ("recent_intervals", 0),
        ("spike_factor", 1.0),
        ("rise_intervals", 2.5),
        ("min_volume", -1),
        ("warmup", True),
    ],
)
def test_options_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"trends.{key}"):
        TrendOptions(**{key: value})  # type: ignore[arg-type]


def test_recent_must_be_shorter_than_the_baseline() -> None:
    with pytest.raises(ConfigError, match="fewer intervals"):
        TrendOptions(recent_intervals=60, baseline_intervals=60)
