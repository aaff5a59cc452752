"""The space-saving sketch: fixed memory, no heavy hitter missed, honest error bounds."""

from __future__ import annotations

import collections
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.sketch import SpaceSaving
from otel_raptor.errors import ConfigError


def test_counts_exactly_while_there_is_room() -> None:
    sketch: SpaceSaving[str, None] = SpaceSaving(4)
    for key in "aabacb":
        sketch.offer(key, None)
    top = sketch.top()
    assert [(h.key, h.count, h.error) for h in top] == [("a", 3, 0), ("b", 2, 0), ("c", 1, 0)]
    assert sketch.total == 6


def test_a_new_key_takes_over_the_smallest_counter() -> None:
    sketch: SpaceSaving[str, str] = SpaceSaving(2)
    for key in "aaab":
        sketch.offer(key, key.upper())
    sketch.offer("c", "C")  # replaces b (count 1): c starts at 1 + 1, error 1
    got = {h.key: (h.count, h.error, h.payload) for h in sketch.top()}
    assert got == {"a": (3, 0, "A"), "c": (2, 1, "C")}
    assert "b" not in sketch


def test_the_capacity_is_validated() -> None:
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match=r"sketch\.capacity"):
            SpaceSaving(bad)  # type: ignore[arg-type]


def test_a_million_distinct_keys_take_the_memory_of_capacity_counters() -> None:
    # The bound the analytics rely on: the sketch never holds more than `capacity` counters,
    # and its memory after 200 000 distinct keys equals its memory after `capacity` of them.
    sketch: SpaceSaving[int, str] = SpaceSaving(64)
    heavy = [f"heavy-{i}" for i in range(5)]
    tracemalloc.start()
    try:
        for index in range(200_000):
            if index % 10 < 3:  # 30 % of the stream: five heavy hitters, 6 % each
                name = heavy[(index // 10) % 5]
                sketch.offer(hash(name), name)
            else:
                sketch.offer(index, "rare")  # never seen twice
            if index == 1_000:
                early, _ = tracemalloc.get_traced_memory()
        late, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sketch) == 64
    # The same number of counters; what differs is int objects and payload strings churning
    # through the bounded structure (a few KiB, not a leak proportional to the stream).
    assert late - early < 64 * 1024
    top = {h.payload for h in sketch.top(5)}
    assert top == set(heavy)


def _stream() -> st.SearchStrategy[list[int]]:
    # Skewed streams: few distinct keys that repeat, many that do not.
    return st.lists(st.one_of(st.integers(0, 5), st.integers(0, 1000)), min_size=0, max_size=400)


@settings(max_examples=300)
@given(stream=_stream(), capacity=st.integers(1, 20))
def test_space_saving_guarantees(stream: list[int], capacity: int) -> None:
    sketch: SpaceSaving[int, None] = SpaceSaving(capacity)
    for key in stream:
        sketch.offer(key, None)
    truth = collections.Counter(stream)
    n = len(stream)
    assert len(sketch) == min(capacity, len(truth))
    assert sketch.total == n
    hitters = sketch.top()
    # The counters add up to the stream length (every offer lands on exactly one counter).
    assert sum(h.count for h in hitters) == n
    for hitter in hitters:
        assert hitter.count - hitter.error <= truth[hitter.key] <= hitter.count
        assert hitter.error <= n // capacity
    # No key more frequent than n / capacity is missed.
    for key, count in truth.items():
        if count > n / capacity:
            assert key in sketch, (key, count)
    counts = [h.count for h in hitters]
    assert counts == sorted(counts, reverse=True)


@given(stream=_stream(), capacity=st.integers(1, 10), weights=st.data())
def test_weighted_offers_keep_the_minimum_right(
    stream: list[int], capacity: int, weights: st.DataObject
) -> None:
    sketch: SpaceSaving[int, None] = SpaceSaving(capacity)
    # The naive model of the algorithm: key -> (count, when it reached that count), and a
    # linear search for the smallest count (ties: the one that reached it first).
    naive: dict[int, tuple[int, int]] = {}
    for step, key in enumerate(stream):
        weight = weights.draw(st.integers(1, 5))
        sketch.offer(key, None, weight)
        if key in naive:
            naive[key] = (naive[key][0] + weight, step)
        elif len(naive) < capacity:
            naive[key] = (weight, step)
        else:
            victim = min(naive, key=lambda k: naive[k])
            smallest = naive.pop(victim)[0]
            naive[key] = (smallest + weight, step)
    assert {h.key: h.count for h in sketch.top()} == {k: v[0] for k, v in naive.items()}
