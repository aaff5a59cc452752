"""The forecast: Theil-Sen trend, robust to noise and outliers, explicit samples."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.forecast import MAX_POINTS, forecast
from otel_raptor.errors import ConfigError
from otel_raptor.predict import Forecast
from otel_raptor.predict import forecast as public_forecast


def line(
    n: int, slope: float, start: float = 100.0, step: float = 30.0
) -> list[tuple[float, float]]:
    return [(i * step, start + slope * i * step) for i in range(n)]


def test_public_module_reexports_the_core_function() -> None:
    assert public_forecast is forecast
    assert isinstance(forecast(line(5, 1.0), 1000.0, horizon=60.0), Forecast)


def test_a_clean_line_gives_its_slope_and_exact_time_to_exhaustion() -> None:
    f = forecast(line(20, 0.5), 1000.0, horizon=600.0)
    # value at the last sample: 100 + 0.5 * 570 = 385; (1000 - 385) / 0.5 = 1230 s
    assert f.slope == pytest.approx(0.5)
    assert f.level == pytest.approx(385.0)
    assert f.time_to_exhaustion_s == pytest.approx(1230.0)
    assert f.probability < 0.01  # 385 + 300 = 685 at the horizon: far below the limit
    # A clean line; the span factor (570 s seen / 600 s ahead) keeps it just under 0.9.
    assert 0.8 < f.confidence < 0.9


def test_reaching_the_limit_within_the_horizon_is_near_certain() -> None:
    f = forecast(line(60, 0.5), 1800.0, horizon=1800.0)
    # level 100 + 0.5 * 1770 = 985; (1800 - 985) / 0.5 = 1630 s < 1800 s
    assert f.time_to_exhaustion_s == pytest.approx(1630.0)
    assert f.probability > 0.95


def test_a_short_window_cannot_make_a_long_extrapolation_certain() -> None:
    # The same line seen for 570 s only: one rising GC tooth looks just like this.
    f = forecast(line(20, 0.5), 1000.0, horizon=1800.0)
    assert f.time_to_exhaustion_s == pytest.approx(1230.0)
    assert f.confidence < 0.35
    assert f.probability < 0.35


def test_a_falling_or_flat_series_never_reaches_the_limit() -> None:
    assert forecast(line(20, -0.2), 1000.0, horizon=600.0).time_to_exhaustion_s is None
    flat = forecast(line(20, 0.0), 1000.0, horizon=600.0)
    assert flat.time_to_exhaustion_s is None
    assert flat.probability == pytest.approx(0.0, abs=1e-9)


def test_outliers_do_not_move_the_slope() -> None:
    samples = line(40, 0.1)
    for index in (5, 17, 30):  # three wild GC spikes / bad readings
        t, v = samples[index]
        samples[index] = (t, v + 5000.0)
    f = forecast(samples, 10_000.0, horizon=600.0)
    assert f.slope == pytest.approx(0.1, rel=1e-6)


def test_noise_on_a_stable_series_gives_low_probability_and_confidence() -> None:
    rnd = random.Random(7)
    samples = [(i * 30.0, 500.0 + rnd.gauss(0, 10)) for i in range(60)]
    f = forecast(samples, 1000.0, horizon=1800.0)
    assert abs(f.slope) < 0.02
    assert f.probability < 1e-6
    assert f.confidence < 0.3


def test_a_value_already_at_the_limit_is_exhausted_now() -> None:
    f = forecast([(0, 90.0), (30, 95.0), (60, 100.0), (90, 105.0)], 100.0, horizon=60.0)
    assert f.time_to_exhaustion_s == 0.0
    assert f.probability > 0.99


def test_a_level_at_the_limit_within_rounding_is_exhausted_now() -> None:
    # A leak sampled every 5 s that reaches the limit exactly: the fitted level came out a
    # third of a byte short (integer byte counts), so the time to exhaustion was 3e-7 s, not 0.
    limit = 1_000_000_000
    samples = [
        (float(t), float(int((0.3 + 0.7 * (t - 3600) / 600) * limit)))
        for t in range(4200 - 59 * 5, 4201, 5)
    ]
    assert forecast(samples, float(limit), horizon=1800.0).time_to_exhaustion_s == 0.0


def test_a_ramp_that_stays_at_the_limit_is_exhausted_now() -> None:
    # A disk that filled and stays full: the newest half is flat (slope 0) and the whole
    # window's median level lags at 0.91, so the trend said "never" while every write failed.
    samples = [(i * 30.0, min(1.0, 0.6 + 0.4 * i / 38)) for i in range(60)]
    f = forecast(samples, 1.0, horizon=1800.0)
    assert f.time_to_exhaustion_s == 0.0
    # Not at the limit: a single sample there (a spike) is not enough.
    spike = [*[(i * 30.0, 0.5) for i in range(59)], (59 * 30.0, 1.0)]
    assert forecast(spike, 1.0, horizon=1800.0).time_to_exhaustion_s is None


def test_too_few_samples_give_no_trend() -> None:
    assert forecast([], 10.0, horizon=1.0) == Forecast(
        time_to_exhaustion_s=None, probability=0.0, confidence=0.0, slope=0.0, level=0.0
    )
    at_limit = forecast([(0.0, 5.0), (1.0, 12.0)], 10.0, horizon=1.0)
    assert at_limit.time_to_exhaustion_s == 0.0
    assert at_limit.probability == 1.0
    assert at_limit.confidence == 0.0


def test_non_finite_samples_are_ignored_and_order_does_not_matter() -> None:
    samples = line(10, 1.0)
    shuffled = [*reversed(samples), (math.nan, 1.0), (300.0, math.inf)]
    assert forecast(shuffled, 1000.0, horizon=60.0) == forecast(samples, 1000.0, horizon=60.0)


def test_a_step_change_is_not_read_as_a_trend_once_the_new_level_holds() -> None:
    rnd = random.Random(3)
    samples = [(i * 30.0, (40.0 if i < 30 else 65.0) + rnd.gauss(0, 1.5)) for i in range(60)]
    f = forecast(samples, 100.0, horizon=1800.0)
    assert f.probability < 0.05


def test_long_windows_are_subsampled_to_the_cap() -> None:
    f = forecast(line(1000, 0.25), 1e6, horizon=60.0)
    assert f.slope == pytest.approx(0.25)
    assert f.level == pytest.approx(100.0 + 0.25 * 999 * 30)
    assert MAX_POINTS == 120


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"horizon": 0.0}, "forecast.horizon"),
        ({"horizon": math.inf}, "forecast.horizon"),
        ({"horizon": 1.0, "max_points": 2}, "forecast.max_points"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        forecast(line(5, 1.0), 10.0, **kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key


def test_a_non_finite_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"forecast\.limit"):
        forecast(line(5, 1.0), math.nan, horizon=1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1e5, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False)),
        max_size=40,
    ),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(1e-3, 1e5, allow_nan=False),
)
def test_outputs_are_always_in_range(
    samples: list[tuple[float, float]], limit: float, horizon: float
) -> None:
    f = forecast(samples, limit, horizon=horizon)
    assert 0.0 <= f.probability <= 1.0
    assert 0.0 <= f.confidence <= 1.0
    assert f.time_to_exhaustion_s is None or f.time_to_exhaustion_s >= 0.0
