"""Adapters that let the memory controller expire and clear the caches an app registers.

Each adapter answers three questions: how many entries (:meth:`CacheAdapter.entries`), evict
the entries older than an age (:meth:`CacheAdapter.evict_expired`, in batches), and empty the
cache (:meth:`CacheAdapter.clear`). :func:`adapt` picks one for an object:

- :class:`TrackedDict` (ours): a ``dict`` (a drop-in one) that stamps each key when it is set,
  so ages are exact.
- a plain ``dict`` / ``OrderedDict`` / any mutable mapping: a plain dict cannot say how old an
  entry is, so the adapter keeps a side table of the time each key was *first seen by a scan*
  (scans happen at registration and at every cleanup). An entry is therefore evicted between
  ``max_age`` and ``max_age + cleanup_interval`` after it was inserted, a value overwritten
  under the same key keeps its first-seen time, and the side table costs one float per key
  (it only holds keys still in the cache). Use ``TrackedDict`` when that is not good enough.
- a cachetools cache (duck-typed: ``popitem``, ``maxsize``, ``currsize``): ``expire()`` is
  called when it has one (``TTLCache``); otherwise the first-seen side table, as for a dict.
- a ``functools.lru_cache`` function (``cache_clear`` and ``cache_info``): it has no
  per-entry ages, so an expiry clears it whole once ``max_age`` has passed since its last
  clear.
- anything with ``clear()``: expiry does nothing; it is only cleared.
- :class:`Evictor`: a callable ``fn(level, max_age) -> entries evicted`` the app writes.

The controller reaches into a cache from its own thread. ``dict``, ``OrderedDict`` and
``lru_cache`` take that (each operation is one step for other threads), a cachetools cache
does not: it is plain Python, and an eviction half-way through an operation of the app's
breaks the app's next one (``RuntimeError: OrderedDict mutated during iteration`` from a
``cache[key] = value`` of an app using it from its event loop alone). ``adapt(cache, now,
lock)`` takes the lock the app guards the cache with (the one it hands to
``cachetools.cached``, say): the adapter then holds it around each step it takes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload, runtime_checkable

from otel_raptor.core.memory import CachePriority, CleanupLevel
from otel_raptor.runtime.forksafe import register_lock

if TYPE_CHECKING:
    from _typeshed import SupportsKeysAndGetItem

__all__ = [
    "CacheAdapter",
    "CacheRegistry",
    "ClearableAdapter",
    "Evictor",
    "EvictorAdapter",
    "LruCacheAdapter",
    "MappingAdapter",
    "RegisteredCache",
    "TrackedDict",
    "TrackedDictAdapter",
    "TtlCacheAdapter",
    "adapt",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class CacheAdapter(Protocol):
    """How the controller reaches into one cache. ``now`` is monotonic seconds."""

    kind: str

    def entries(self) -> int | None:
        """Entries now held (``None`` when the cache cannot say)."""
        ...

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        """Evict entries older than ``max_age`` seconds; how many were evicted."""
        ...

    def clear(self, now: float) -> int:
        """Empty the cache; how many entries it held (0 when unknown)."""
        ...


@runtime_checkable
class _Clearable(Protocol):
    def clear(self) -> None: ...


#: A custom evictor: called with the cleanup level's name (``standard``, ``critical``,
#: ``emergency``) and the maximum age in seconds; returns the entries it evicted.
Evictor = Callable[[str, float], int]


class TrackedDict(dict[K, V]):
    """A ``dict`` that records when each key was last set (monotonic seconds, via ``clock``).

    A drop-in for a ``dict``: ``TrackedDict()``, ``TrackedDict(clock)``,
    ``TrackedDict(clock, initial, **kwargs)`` or, as ``dict(...)`` takes them,
    ``TrackedDict(mapping_or_pairs, **kwargs)``. ``clock`` defaults to ``time.monotonic``, the
    controller's clock. Every write stamps its key: ``d[k] = v``, ``setdefault``, ``update``
    (a mapping, pairs and keywords), ``|=``, ``fromkeys``. Reads do not refresh an entry: the
    age is the age of the value. ``copy()``, ``copy.copy`` and ``|`` give a ``TrackedDict``
    keeping the stamps; pickling and ``deepcopy`` keep them too (a stamp from a clock that
    reads later than this one, another boot's, becomes the time of loading). It compares
    equal to a ``dict`` with the same items.
    """

    @overload
    def __init__(
        self,
        clock: Callable[[], float] = ...,
        initial: SupportsKeysAndGetItem[K, V] | Iterable[tuple[K, V]] | None = ...,
        /,
        **kwargs: V,
    ) -> None: ...

    @overload
    def __init__(
        self, initial: SupportsKeysAndGetItem[K, V] | Iterable[tuple[K, V]], /, **kwargs: V
    ) -> None: ...

    def __init__(
        self,
        clock: object = time.monotonic,
        initial: object = None,
        /,
        **kwargs: V,
    ) -> None:
        super().__init__()
        if not callable(clock):
            if initial is not None:
                raise TypeError(f"TrackedDict clock must be callable, not {type(clock).__name__}")
            # TrackedDict(mapping) as dict(mapping): what swapping the type in leaves behind.
            clock, initial = time.monotonic, clock
        self._clock: Callable[[], float] = clock
        self.stamps: dict[K, float] = {}
        if initial is not None:
            self.update(initial)  # type: ignore[arg-type]  # dict.update checks it as dict() does
        if kwargs:
            self.update(**kwargs)

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.stamps[key] = self._clock()

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key)
        self.stamps.pop(key, None)

    def update(
        self,
        other: SupportsKeysAndGetItem[K, V] | Iterable[tuple[K, V]] = (),
        /,
        **kwargs: V,
    ) -> None:
        # dict.update would write past __setitem__ (its C code never calls it): stamp here.
        # The argument rules are dict's: anything with keys() is a mapping, else pairs.
        if hasattr(other, "keys"):
            mapping: SupportsKeysAndGetItem[K, V] = other  # type: ignore[assignment]
            for key in mapping.keys():  # noqa: SIM118 - keys() is what marks a mapping here
                self[key] = mapping[key]
        else:
            for pair in other:  # not a mapping: pairs, as dict.update takes them
                key, value = pair
                self[key] = value
        for name, value in kwargs.items():
            self[name] = value  # type: ignore[index]  # keyword keys are str, as for dict

    def setdefault(self, key: K, default: V = None) -> V:  # type: ignore[assignment]
        if key not in self:
            self[key] = default
        return self[key]

    @overload
    def pop(self, key: K, /) -> V: ...

    @overload
    def pop(self, key: K, default: V, /) -> V: ...

    @overload
    def pop(self, key: K, default: T, /) -> V | T: ...

    def pop(self, key: K, /, *default: object) -> object:
        self.stamps.pop(key, None)
        return super().pop(key, *default)

    def popitem(self) -> tuple[K, V]:
        key, value = super().popitem()
        self.stamps.pop(key, None)
        return key, value

    def clear(self) -> None:
        super().clear()
        self.stamps.clear()

    def copy(self) -> TrackedDict[K, V]:
        """A ``TrackedDict`` with the same items, stamps and clock (``dict.copy`` would give a
        plain ``dict``)."""
        twin = _empty_like(self)
        twin._take(self)
        return twin

    __copy__ = copy

    def __or__(self, other: object) -> TrackedDict[K, V]:  # type: ignore[override]
        if not isinstance(other, dict):
            return NotImplemented
        merged = self.copy()
        merged.update(other)
        return merged

    def __ror__(self, other: object) -> TrackedDict[K, V]:  # type: ignore[override]
        if not isinstance(other, dict):
            return NotImplemented
        merged = _empty_like(self)
        merged.update(other)
        merged._take(self)
        return merged

    def __ior__(self, other: object) -> TrackedDict[K, V]:  # type: ignore[override]
        # dict's |= merges in C, past __setitem__: its keys would never be stamped.
        self.update(other)  # type: ignore[arg-type]  # update refuses what |= refuses
        return self

    def _take(self, source: TrackedDict[K, V]) -> None:
        """Copy ``source``'s items with their stamps (not restamped: it is the same data)."""
        now = self._clock()
        for key, value in source.items():
            dict.__setitem__(self, key, value)
            self.stamps[key] = source.stamps.get(key, now)

    def __reduce__(self) -> tuple[object, ...]:
        # dict's pickling would rebuild it with TrackedDict() and then fill it past
        # __setitem__ and without _clock; the items travel in the state instead.
        extra = {k: v for k, v in vars(self).items() if k not in ("_clock", "stamps")}
        return (_empty_tracked_dict, (type(self), self._clock), (dict(self), self.stamps, extra))

    def __setstate__(self, state: tuple[dict[K, V], dict[K, float], dict[str, object]]) -> None:
        items, stamps, extra = state
        vars(self).update(extra)
        now = self._clock()
        for key, value in items.items():
            dict.__setitem__(self, key, value)
            # A monotonic stamp from another boot may read later than now: it would never
            # expire. Clamped, it expires at worst early, which costs a cache one miss.
            self.stamps[key] = min(stamps.get(key, now), now)


def _empty_tracked_dict(
    cls: type[TrackedDict[K, V]], clock: Callable[[], float]
) -> TrackedDict[K, V]:
    """An empty ``cls`` with ``clock``, built without its ``__init__`` (a subclass may take
    other arguments): what unpickling and copying start from."""
    made = dict.__new__(cls)
    made._clock = clock
    made.stamps = {}
    return made


def _empty_like(source: TrackedDict[K, V]) -> TrackedDict[K, V]:
    return _empty_tracked_dict(type(source), source._clock)


def _list_keys(mapping: MutableMapping[K, V]) -> list[K]:
    # The app may mutate the mapping from another thread; copy the keys, retry if it changed
    # size under us (list(dict) itself runs in C without releasing the GIL for plain dicts).
    for _ in range(3):
        try:
            return list(mapping)
        except RuntimeError:
            continue
    return []


class TrackedDictAdapter(Generic[K, V]):
    """Exact ages from a :class:`TrackedDict`'s stamps."""

    kind = "tracked_dict"
    __slots__ = ("_cache",)

    def __init__(self, cache: TrackedDict[K, V]) -> None:
        self._cache = cache

    def entries(self) -> int | None:
        return len(self._cache)

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        cutoff = now - max_age
        stamps = self._cache.stamps
        old = [key for key in list(stamps) if stamps.get(key, now) < cutoff]
        return _pop_in_batches(self._cache, old, batch_size)

    def clear(self, now: float) -> int:
        held = len(self._cache)
        self._cache.clear()
        return held


_Lock = AbstractContextManager[Any]
#: A lock of nobody's: what an adapter holds when the app gave none.
_NO_LOCK: _Lock = contextlib.nullcontext()


def _pop_in_batches(
    cache: MutableMapping[K, V], keys: list[K], batch_size: int, lock: _Lock = _NO_LOCK
) -> int:
    evicted = 0
    for start in range(0, len(keys), batch_size):
        with lock:
            for key in keys[start : start + batch_size]:
                # pop with a default: the app may have removed it meanwhile.
                if cache.pop(key, _MISSING) is not _MISSING:
                    evicted += 1
        # Batches keep each stretch of work short: sleep(0) releases the GIL between them so
        # the app's threads are not stalled behind a long eviction.
        time.sleep(0)
    return evicted


_MISSING = object()


class MappingAdapter(Generic[K, V]):
    """A dict, ``OrderedDict`` or any mutable mapping, aged by a first-seen side table.
    ``lock``: the app's lock around the cache, held around each step (see the module doc)."""

    __slots__ = ("_cache", "_first_seen", "_lock", "kind")

    def __init__(
        self,
        cache: MutableMapping[K, V],
        now: float,
        kind: str = "mapping",
        lock: _Lock | None = None,
    ) -> None:
        self._cache = cache
        self.kind = kind
        self._lock = _NO_LOCK if lock is None else lock
        self._first_seen: dict[K, float] = {}
        self.scan(now)

    def entries(self) -> int | None:
        with self._lock:
            return len(self._cache)

    def scan(self, now: float) -> list[K]:
        """Stamp keys not seen before with ``now``, forget keys that left; the live keys."""
        with self._lock:
            keys = _list_keys(self._cache)
        seen = self._first_seen
        fresh: dict[K, float] = {}
        for key in keys:
            fresh[key] = seen.get(key, now)
        self._first_seen = fresh  # rebuilt, so the side table never outgrows the cache
        return keys

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        keys = self.scan(now)
        cutoff = now - max_age
        seen = self._first_seen
        old = [key for key in keys if seen[key] < cutoff]
        evicted = _pop_in_batches(self._cache, old, batch_size, self._lock)
        for key in old:
            seen.pop(key, None)
        return evicted

    def clear(self, now: float) -> int:
        with self._lock:
            held = len(self._cache)
            self._cache.clear()
        self._first_seen = {}
        return held


class TtlCacheAdapter(MappingAdapter[K, V]):
    """A cachetools cache: ``expire()`` when it has one, else the first-seen side table."""

    __slots__ = ()

    def scan(self, now: float) -> list[K]:
        if callable(getattr(self._cache, "expire", None)):
            return []  # it ages its own entries; iterating it would silently expire them
        return MappingAdapter.scan(self, now)

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        expire = getattr(self._cache, "expire", None)
        if callable(expire):
            # cachetools >= 5 returns the expired items. Counting by len() instead would
            # count nothing: TTLCache's len() already drops expired entries.
            with self._lock:
                expired = expire()
            return len(expired) if isinstance(expired, list) else 0
        return MappingAdapter.evict_expired(self, max_age, now, batch_size)


class LruCacheAdapter:
    """A ``functools.lru_cache`` function: no per-entry ages, so it expires as a whole."""

    kind = "lru_cache"
    __slots__ = ("_cleared_at", "_fn")

    def __init__(self, fn: object, now: float) -> None:
        self._fn = fn
        self._cleared_at = now

    def entries(self) -> int | None:
        return int(self._fn.cache_info().currsize)  # type: ignore[attr-defined]

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        if now - self._cleared_at < max_age:
            return 0
        return self.clear(now)

    def clear(self, now: float) -> int:
        held = self.entries() or 0
        self._fn.cache_clear()  # type: ignore[attr-defined]
        self._cleared_at = now
        return held


class ClearableAdapter:
    """Any object with ``clear()``; entries from ``len()`` when it has one. ``lock``: the
    app's lock around the object, held around each step."""

    kind = "clearable"
    __slots__ = ("_cache", "_lock")

    def __init__(self, cache: _Clearable, lock: _Lock | None = None) -> None:
        self._cache = cache
        self._lock = _NO_LOCK if lock is None else lock

    def entries(self) -> int | None:
        try:
            with self._lock:
                return len(self._cache)  # type: ignore[arg-type]
        except TypeError:
            return None

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        return 0

    def clear(self, now: float) -> int:
        held = self.entries() or 0
        with self._lock:
            self._cache.clear()
        return held


class EvictorAdapter:
    """A custom :data:`Evictor`; ``clear`` calls it with the ``emergency`` level and age 0."""

    kind = "evictor"
    __slots__ = ("_fn", "level")

    def __init__(self, fn: Evictor) -> None:
        self._fn = fn
        self.level = CleanupLevel.STANDARD

    def entries(self) -> int | None:
        return None

    def evict_expired(self, max_age: float, now: float, batch_size: int) -> int:
        return int(self._fn(self.level.value, max_age))

    def clear(self, now: float) -> int:
        return int(self._fn(CleanupLevel.EMERGENCY.value, 0.0))


def adapt(cache: object, now: float, lock: _Lock | None = None) -> CacheAdapter:
    """The adapter for ``cache`` (see the module docstring for the order tried); ``lock``,
    the app's lock around ``cache``, is held around each step the adapter takes in it.

    Raises ``TypeError`` for an object none of them fits.
    """
    if isinstance(cache, TrackedDict):
        return TrackedDictAdapter(cache)
    if callable(getattr(cache, "cache_clear", None)) and callable(
        getattr(cache, "cache_info", None)
    ):
        return LruCacheAdapter(cache, now)
    # Probe the type: reading TTLCache.currsize on the instance would expire entries.
    if all(
        hasattr(type(cache), name) or name in getattr(cache, "__dict__", {})
        for name in ("popitem", "maxsize", "currsize")
    ) and isinstance(cache, MutableMapping):
        return TtlCacheAdapter(cache, now, kind="cachetools", lock=lock)
    if isinstance(cache, MutableMapping):
        return MappingAdapter(cache, now, kind=type(cache).__name__, lock=lock)
    if isinstance(cache, _Clearable):
        return ClearableAdapter(cache, lock)
    if callable(cache):
        return EvictorAdapter(cache)
    raise TypeError(
        f"cannot manage a {type(cache).__name__}: expected a mapping, an lru_cache function, "
        "a cachetools cache, an object with clear(), or an evictor callable"
    )


@dataclass(slots=True)
class RegisteredCache:
    """One registered cache: its adapter, priority and own maximum age (``None``: default)."""

    name: str
    adapter: CacheAdapter
    priority: CachePriority
    max_age: float | None


class CacheRegistry:
    """Named caches, thread-safe; iteration works on a snapshot."""

    __slots__ = ("__weakref__", "_caches", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        self._caches: dict[str, RegisteredCache] = {}

    def add(self, entry: RegisteredCache) -> None:
        with self._lock:
            self._caches = {**self._caches, entry.name: entry}

    def remove(self, name: str) -> bool:
        with self._lock:
            if name not in self._caches:
                return False
            caches = dict(self._caches)
            del caches[name]
            self._caches = caches
            return True

    def get(self, name: str) -> RegisteredCache | None:
        return self._caches.get(name)

    def __iter__(self) -> Iterator[RegisteredCache]:
        return iter(list(self._caches.values()))

    def __len__(self) -> int:
        return len(self._caches)
