from __future__ import annotations

import copy
import functools
import pickle
import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping

import pytest

from otel_raptor.core.memory import CachePriority
from otel_raptor.runtime.caches import (
    CacheRegistry,
    ClearableAdapter,
    EvictorAdapter,
    LruCacheAdapter,
    MappingAdapter,
    RegisteredCache,
    TrackedDict,
    TrackedDictAdapter,
    TtlCacheAdapter,
    adapt,
)
from tests.support.clock import FakeClock


class StandInCache(MutableMapping[str, int]):
    """The cachetools interface the adapter relies on: a mapping with popitem/maxsize/currsize."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: dict[str, int] = {}

    @property
    def currsize(self) -> int:
        return len(self._data)

    def __getitem__(self, key: str) -> int:
        return self._data[key]

    def __setitem__(self, key: str, value: int) -> None:
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize("factory", [dict, OrderedDict])
def test_a_plain_mapping_ages_by_first_seen_time(factory: type[dict[str, int]]) -> None:
    cache = factory()
    cache["old"] = 1
    adapter = adapt(cache, now=0.0)
    assert isinstance(adapter, MappingAdapter)
    cache["new"] = 2
    # "new" is first seen by this scan, at 50: nothing is 100 s old yet.
    assert adapter.evict_expired(100.0, now=50.0, batch_size=1) == 0
    assert adapter.evict_expired(100.0, now=120.0, batch_size=1) == 1
    assert list(cache) == ["new"]
    assert adapter.evict_expired(100.0, now=151.0, batch_size=1) == 1
    assert cache == {}
    cache["x"] = 3
    assert adapter.entries() == 1
    assert adapter.clear(now=200.0) == 1
    assert cache == {}


def test_the_side_table_only_holds_live_keys() -> None:
    cache = {str(i): i for i in range(1000)}
    adapter = MappingAdapter(cache, now=0.0)
    for key in list(cache)[:900]:
        del cache[key]
    adapter.scan(now=1.0)
    assert len(adapter._first_seen) == 100


def test_batches_evict_everything_expired() -> None:
    cache = {i: i for i in range(250)}
    adapter = MappingAdapter(cache, now=0.0)
    assert adapter.evict_expired(10.0, now=11.0, batch_size=7) == 250


def test_tracked_dict_has_exact_ages() -> None:
    clock = FakeClock(start=0.0)
    cache: TrackedDict[str, int] = TrackedDict(clock.monotonic, {"a": 1})
    clock.advance(30)
    cache["b"] = 2
    cache.setdefault("c", 3)
    cache.update({"d": 4})
    adapter = adapt(cache, now=clock.now)
    assert isinstance(adapter, TrackedDictAdapter)
    assert adapter.evict_expired(20.0, now=45.0, batch_size=100) == 1
    assert sorted(cache) == ["b", "c", "d"]
    assert sorted(cache.stamps) == ["b", "c", "d"]
    cache.pop("b")
    del cache["c"]
    assert list(cache.stamps) == ["d"]
    assert adapter.clear(now=50.0) == 1
    assert cache.stamps == {}


class Ticking:
    """A picklable clock (a FakeClock's bound method pickles with it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tracked_dict_is_a_drop_in_dict() -> None:
    # update() took only a mapping, TrackedDict() needed a clock (so fromkeys failed),
    # pickling lost _clock, and |= wrote past __setitem__ unstamped.
    clock = Ticking()
    cache: TrackedDict[str, int] = TrackedDict(clock)
    cache.update([("a", 1)], b=2)
    clock.now = 10.0
    cache.update({"c": 3}.items())
    cache |= {"d": 4}
    assert cache.stamps == {"a": 0.0, "b": 0.0, "c": 10.0, "d": 10.0}
    assert cache == {"a": 1, "b": 2, "c": 3, "d": 4}  # equal to a dict with the same items

    plain: TrackedDict[str, int] = TrackedDict()  # the default clock: time.monotonic
    plain["x"] = 1
    assert 0 < plain.stamps["x"] <= time.monotonic()
    assert TrackedDict({"x": 1}, y=2) == {"x": 1, "y": 2}  # as dict(mapping, **kwargs)
    assert TrackedDict([("x", 1)]) == {"x": 1}
    made = TrackedDict.fromkeys(["p", "q"], 0)
    assert isinstance(made, TrackedDict)
    assert made == {"p": 0, "q": 0}
    assert set(made.stamps) == {"p", "q"}

    twin = cache.copy()
    assert type(twin) is TrackedDict
    assert twin == cache
    assert twin.stamps == cache.stamps
    twin["e"] = 5
    assert "e" not in cache
    assert "e" not in cache.stamps
    assert copy.copy(cache).stamps == cache.stamps

    clock.now = 20.0
    merged = cache | {"a": 9}
    assert isinstance(merged, TrackedDict)
    assert merged["a"] == 9
    assert merged.stamps["a"] == 20.0  # rewritten
    assert merged.stamps["c"] == 10.0  # kept
    assert "a" in cache.stamps
    assert cache["a"] == 1
    left = {"z": 0, "c": 0} | cache
    assert isinstance(left, TrackedDict)
    assert left == {"z": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    assert left.stamps["c"] == 10.0
    assert left.stamps["z"] == 20.0

    assert cache.setdefault("a", 7) == 1
    assert cache.setdefault("f", 6) == 6
    assert cache.stamps["f"] == 20.0
    assert cache.pop("f") == 6
    assert cache.pop("f", None) is None
    assert "f" not in cache.stamps

    for restored in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert type(restored) is TrackedDict
        assert restored == cache
        assert restored.stamps == cache.stamps
        restored["g"] = 7  # its clock came along
        assert restored.stamps["g"] == 20.0


def test_an_unpickled_stamp_later_than_its_clock_reads_becomes_the_load_time() -> None:
    # time.monotonic() pickled on one boot and loaded on another may read less: a stamp in
    # the future would never expire.
    later, earlier = Ticking(), Ticking()
    later.now, earlier.now = 5000.0, 100.0
    cache: TrackedDict[str, int] = TrackedDict(later, {"a": 1})
    rebuild, _, state = cache.__reduce__()
    restored = rebuild(TrackedDict, earlier)  # type: ignore[operator]  # as pickle.loads does
    restored.__setstate__(state)
    assert restored == {"a": 1}
    assert restored.stamps == {"a": 100.0}


def test_lru_cache_expires_whole_after_max_age_since_its_last_clear() -> None:
    @functools.cache
    def square(x: int) -> int:
        return x * x

    for i in range(10):
        square(i)
    adapter = adapt(square, now=0.0)
    assert isinstance(adapter, LruCacheAdapter)
    assert adapter.entries() == 10
    assert adapter.evict_expired(100.0, now=99.0, batch_size=5) == 0
    assert adapter.evict_expired(100.0, now=100.0, batch_size=5) == 10
    assert square.cache_info().currsize == 0
    square(3)
    assert adapter.evict_expired(100.0, now=150.0, batch_size=5) == 0
    assert adapter.clear(now=151.0) == 1


def test_a_cachetools_like_cache_uses_the_side_table() -> None:
    cache = StandInCache(maxsize=10)
    cache["a"] = 1
    adapter = adapt(cache, now=0.0)
    assert isinstance(adapter, TtlCacheAdapter)
    assert adapter.kind == "cachetools"
    assert adapter.evict_expired(5.0, now=6.0, batch_size=1) == 1
    assert cache.currsize == 0


def test_real_cachetools_caches() -> None:
    cachetools = pytest.importorskip("cachetools")
    lru = cachetools.LRUCache(maxsize=100)
    for i in range(20):
        lru[i] = i
    adapter = adapt(lru, now=0.0)
    assert adapter.kind == "cachetools"
    assert adapter.evict_expired(10.0, now=11.0, batch_size=3) == 20
    assert lru.currsize == 0

    timer = FakeClock(start=0.0)
    ttl = cachetools.TTLCache(maxsize=100, ttl=10, timer=timer.monotonic)
    ttl["a"] = 1
    timer.advance(5)
    ttl["b"] = 2
    timer.advance(6)
    adapter = adapt(ttl, now=0.0)
    # TTLCache.expire() drops what its own ttl says is expired ("a"), whatever max_age says.
    assert adapter.evict_expired(1000.0, now=11.0, batch_size=3) == 1
    assert list(ttl) == ["b"]
    assert adapter.clear(now=12.0) == 1


def test_clearable_and_evictor() -> None:
    class Pool:
        def __init__(self) -> None:
            self.cleared = 0

        def clear(self) -> None:
            self.cleared += 1

    pool = Pool()
    adapter = adapt(pool, now=0.0)
    assert isinstance(adapter, ClearableAdapter)
    assert adapter.entries() is None
    assert adapter.evict_expired(1.0, now=5.0, batch_size=1) == 0
    assert adapter.clear(now=5.0) == 0
    assert pool.cleared == 1

    calls: list[tuple[str, float]] = []

    def evictor(level: str, max_age: float) -> int:
        calls.append((level, max_age))
        return 7

    custom = adapt(evictor, now=0.0)
    assert isinstance(custom, EvictorAdapter)
    assert custom.evict_expired(60.0, now=1.0, batch_size=1) == 7
    assert custom.clear(now=1.0) == 7
    assert calls == [("standard", 60.0), ("emergency", 0.0)]


def test_unmanageable_objects_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot manage a int"):
        adapt(42, now=0.0)


def test_registry_add_remove_snapshot() -> None:
    registry = CacheRegistry()
    entry = RegisteredCache("a", adapt({}, now=0.0), CachePriority.LOW, None)
    registry.add(entry)
    assert [e.name for e in registry] == ["a"]
    assert registry.get("a") is entry
    assert registry.remove("a") is True
    assert registry.remove("a") is False
    assert len(registry) == 0
