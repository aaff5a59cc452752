"""Heavy hitters in fixed memory: the space-saving sketch (Metwally, Agrawal, El Abbadi, 2005).

``SpaceSaving(capacity)`` watches a stream of keys and keeps at most ``capacity`` counters.
A key already counted is incremented. A new key, while there is room, gets a counter of its
own; once the sketch is full it *takes over* the smallest counter: the old key is forgotten and
the new one starts at that counter's value plus one, remembering that value as its ``error``
(how much of its count may belong to keys it replaced).

What that buys, for a stream of ``n`` keys:

* every key whose true count exceeds ``n / capacity`` is in the sketch (no heavy hitter is
  missed), and
* each reported ``count`` over-estimates the true count by at most its ``error``, itself at most
  ``n / capacity``: ``count - error <= true count <= count``.

So one million distinct messages cost exactly ``capacity`` counters, and the patterns that
matter (the frequent ones) are the ones kept.

Each update is O(1): counters are grouped in buckets by value (the paper's "stream summary"),
so the smallest counter is always at hand. Each key may carry a small payload (an error
pattern's template, say) that lives and dies with its counter. Pure and not thread-safe: the
runtime holds a lock around it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from otel_raptor.errors import ConfigError

__all__ = ["HeavyHitter", "SpaceSaving"]

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class HeavyHitter(Generic[K, P]):
    """One tracked key: ``count`` (an upper bound of its true count), ``error`` (how much of
    ``count`` may belong to keys it replaced: the true count is at least ``count - error``),
    its ``payload`` and the stream position ``first_seen`` at which it (last) entered."""

    key: K
    count: int
    error: int
    payload: P
    first_seen: int

    @property
    def guaranteed(self) -> int:
        """The count this key surely has: ``count - error``."""
        return self.count - self.error


class _Counter(Generic[K, P]):
    __slots__ = ("error", "first_seen", "key", "payload", "value")

    def __init__(self, key: K, value: int, error: int, payload: P, first_seen: int) -> None:
        self.key = key
        self.value = value
        self.error = error
        self.payload = payload
        self.first_seen = first_seen


class SpaceSaving(Generic[K, P]):
    """The top keys of a stream in ``capacity`` counters (an integer >= 1)."""

    __slots__ = ("_buckets", "_capacity", "_counters", "_min", "_total")

    def __init__(self, capacity: int) -> None:
        given: object = capacity  # typed int, but callers pass anything
        if not isinstance(given, int) or isinstance(given, bool) or given < 1:
            raise ConfigError("sketch.capacity", given, "an integer >= 1")
        self._capacity = capacity
        self._counters: dict[K, _Counter[K, P]] = {}
        # value -> the counters holding that value (a dict used as an ordered set: the
        # oldest-inserted is evicted first among equals, which keeps eviction deterministic).
        self._buckets: dict[int, dict[K, None]] = {}
        self._min = 0
        self._total = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def total(self) -> int:
        """Keys offered so far (the stream length ``n``, weights included)."""
        return self._total

    def __len__(self) -> int:
        return len(self._counters)

    def __contains__(self, key: object) -> bool:
        return key in self._counters

    def offer(self, key: K, payload: P, weight: int = 1) -> None:
        """Count ``key`` (``weight`` times, an integer >= 1). ``payload`` is stored when the key
        gets a counter and kept while it has one."""
        if weight < 1:
            raise ValueError("weight must be >= 1")
        self._total += weight
        counter = self._counters.get(key)
        if counter is not None:
            self._move(counter, counter.value + weight)
            return
        if len(self._counters) < self._capacity:
            counter = _Counter(key, 0, 0, payload, self._total)
            self._counters[key] = counter
            self._place(counter, weight)
            if len(self._counters) == 1 or weight < self._min:
                self._min = weight
            return
        # Full: take over the smallest counter (the oldest among the smallest).
        smallest = self._buckets[self._min]
        victim_key = next(iter(smallest))
        victim = self._counters.pop(victim_key)
        del smallest[victim_key]
        if not smallest:
            del self._buckets[self._min]
        floor = victim.value
        victim.key, victim.payload, victim.error = key, payload, floor
        victim.first_seen = self._total
        self._counters[key] = victim
        victim.value = floor
        self._place(victim, floor + weight)
        if self._min not in self._buckets:
            # The victim was the last at the minimum; with weight 1 it is the new minimum.
            self._min = floor + 1 if weight == 1 else min(self._buckets)

    def _place(self, counter: _Counter[K, P], value: int) -> None:
        counter.value = value
        bucket = self._buckets.get(value)
        if bucket is None:
            bucket = self._buckets[value] = {}
        bucket[counter.key] = None

    def _move(self, counter: _Counter[K, P], value: int) -> None:
        old = counter.value
        bucket = self._buckets[old]
        del bucket[counter.key]
        if not bucket:
            del self._buckets[old]
        self._place(counter, value)
        if old == self._min and old not in self._buckets:
            # With weight 1 the new minimum is old + 1 (where this counter went), the common
            # case; a bigger weight may skip buckets, so look them up (bounded by capacity).
            self._min = value if value - old == 1 else min(self._buckets)

    def top(self, limit: int | None = None) -> list[HeavyHitter[K, P]]:
        """The tracked keys, most frequent first (ties: the one tracked longest first)."""
        ranked = sorted(self._counters.values(), key=lambda c: (-c.value, c.first_seen))
        if limit is not None:
            ranked = ranked[:limit]
        return [HeavyHitter(c.key, c.value, c.error, c.payload, c.first_seen) for c in ranked]

    def get(self, key: K) -> HeavyHitter[K, P] | None:
        counter = self._counters.get(key)
        if counter is None:
            return None
        return HeavyHitter(
            counter.key, counter.value, counter.error, counter.payload, counter.first_seen
        )

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._counters))

    def clear(self) -> None:
        self._counters.clear()
        self._buckets.clear()
        self._min = 0
        self._total = 0
