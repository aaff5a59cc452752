"""Time-sliced counters against a naive model, and histogram_quantile against PromQL's."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.timeseries import (
    DURATION_BUCKETS,
    SlicedCounters,
    bucket_index,
    histogram_quantile,
)
from otel_raptor.errors import ConfigError


def _ring(**overrides: object) -> SlicedCounters[str]:
    options: dict[str, object] = {
        "width_s": 10.0,
        "slices": 6,
        "fields": 2,
        "max_keys": 100,
        "overflow": "other",
    }
    options.update(overrides)
    return SlicedCounters(**options)  # type: ignore[arg-type]


def test_a_window_sums_the_slices_it_covers() -> None:
    ring = _ring()
    for now, key in ((0.0, "a"), (5.0, "a"), (15.0, "b"), (25.0, "a")):
        row = ring.row(key, now)
        assert row is not None
        row[0] += 1
    assert {k: list(v) for k, v in ring.window(29.0, 10.0).items()} == {"a": [1.0, 0.0]}
    assert {k: list(v) for k, v in ring.window(29.0, 30.0).items()} == {
        "a": [3.0, 0.0],
        "b": [1.0, 0.0],
    }
    # The ring spans 60 s: older slices are gone, and a late event finds no row.
    assert ring.window(85.0, 60.0) == {}
    assert ring.row("a", 60.0) is not None  # slice 6 takes the place of slice 0...
    assert ring.row("a", 0.0) is None  # ...so an event of slice 0 is too late to count


def test_between_is_exact_on_slice_boundaries() -> None:
    ring = _ring()
    for now in (9.9, 10.0, 19.9, 20.0):
        row = ring.row("a", now)
        assert row is not None
        row[1] += 1
    assert list(ring.between(10.0, 20.0)["a"]) == [0.0, 2.0]
    assert list(ring.between(0.0, 30.0)["a"]) == [0.0, 4.0]


def test_keys_per_slice_are_capped_into_the_overflow_key() -> None:
    ring = _ring(max_keys=2)
    for key in ("a", "b", "c", "d"):
        row = ring.row(key, 1.0)
        assert row is not None
        row[0] += 1
    assert {k: v[0] for k, v in ring.window(1.0, 10.0).items()} == {"a": 1, "b": 1, "other": 2}


@pytest.mark.parametrize(
    ("key", "value"),
    [("width_s", 0), ("width_s", math.inf), ("slices", 0), ("fields", 1.5), ("max_keys", True)],
)
def test_the_shape_is_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"window.{key}"):
        _ring(**{key: value})


@settings(max_examples=200)
@given(
    events=st.lists(
        st.tuples(st.floats(0, 500, allow_nan=False), st.sampled_from("abc")), max_size=80
    ),
    span=st.floats(1, 60),
)
def test_windows_match_a_naive_model(events: list[tuple[float, str]], span: float) -> None:
    events.sort()
    ring = _ring()
    accepted: list[tuple[float, str]] = []
    for now, key in events:
        row = ring.row(key, now)
        if row is not None:
            row[0] += 1
            accepted.append((now, key))
    if not events:
        return
    now = events[-1][0]
    width = 10.0
    newest = math.floor(now / width)
    count = min(6, math.ceil(span / width - 1e-9))
    oldest = newest - count + 1
    expected: dict[str, float] = {}
    for at, key in accepted:
        if oldest <= math.floor(at / width) <= newest:
            expected[key] = expected.get(key, 0.0) + 1
    assert {k: v[0] for k, v in ring.window(now, span).items()} == expected
    # Memory is the ring, whatever the number of events.
    assert len(list(ring.keys())) <= 3


def test_bucket_index_is_upper_inclusive() -> None:
    assert bucket_index(0.0) == 0
    assert bucket_index(0.005) == 0
    assert bucket_index(0.0051) == 1
    assert bucket_index(300.0) == len(DURATION_BUCKETS) - 1
    assert bucket_index(301.0) == len(DURATION_BUCKETS)


def _counts(**by_bound: float) -> list[float]:
    counts = [0.0] * (len(DURATION_BUCKETS) + 1)
    for name, value in by_bound.items():
        counts[int(name.removeprefix("b"))] = value
    return counts


def test_histogram_quantile_follows_promql() -> None:
    # Every observation in (5, 10]: PromQL interpolates linearly inside the bucket.
    counts = _counts(b10=30)
    assert histogram_quantile(0.5, counts) == pytest.approx(7.5)
    assert histogram_quantile(0.95, counts) == pytest.approx(9.75)
    # The first bucket starts at 0.
    assert histogram_quantile(0.5, _counts(b0=4)) == pytest.approx(0.0025)
    # Landing in +Inf gives the largest finite bound.
    assert histogram_quantile(0.99, _counts(b15=10)) == 300.0
    # Nothing observed: no value (PromQL's NaN).
    assert histogram_quantile(0.5, _counts()) is None
    assert histogram_quantile(-0.1, counts) == -math.inf
    assert histogram_quantile(1.1, counts) == math.inf
    # Two buckets: 10 in (1, 2.5], 10 in (2.5, 5]; the median is the first's upper bound.
    two = _counts(b8=10, b9=10)
    assert histogram_quantile(0.5, two) == pytest.approx(2.5)
    assert histogram_quantile(0.75, two) == pytest.approx(3.75)


def test_histogram_quantile_rejects_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match="one more entry"):
        histogram_quantile(0.5, [1.0, 2.0])
