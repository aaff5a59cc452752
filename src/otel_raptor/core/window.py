"""Sliding windows over call outcomes: ring buffers that subtract what they evict.

Two windows keep the same running totals (calls, failures, slow calls) and satisfy one
``SlidingWindow`` protocol, which is all the circuit breaker sees:

* ``CountWindow(size)`` covers the last ``size`` calls. Each call is one byte in a ring
  (a ``bytearray`` of ``CallOutcome`` codes); recording overwrites the oldest byte and
  subtracts it from the totals.
* ``TimeWindow(seconds, buckets=10)`` covers the last ``seconds``, cut into ``buckets`` slices
  of ``seconds / buckets`` each. A slice holds three counters; moving forward clears the slices
  that fell out (at most ``buckets`` of them, however far time jumped) and subtracts them.

Both record in O(1) and create no objects of their own per call (Python still boxes integers
above 256 and floats; that is the interpreter, not us). Neither is thread-safe: the runtime
breaker holds its lock around them. Pure: time is a parameter.
"""

from __future__ import annotations

import enum
from typing import Final, Protocol

from otel_raptor.errors import ConfigError

__all__ = ["CallOutcome", "CountWindow", "SlidingWindow", "TimeWindow", "outcome_of"]


class CallOutcome(enum.IntEnum):
    """What one call did, as stored in a window. ``0`` means an empty slot and is not valid."""

    SUCCESS = 1
    FAILURE = 2
    SLOW_SUCCESS = 3
    SLOW_FAILURE = 4


# Indexed by outcome code (0 is the empty slot): whether it is a failure / a slow call.
_FAILED: Final = (0, 0, 1, 0, 1)
_SLOW: Final = (0, 0, 0, 1, 1)
_SUCCESS: Final = 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, float) or _is_int(value)


def outcome_of(*, failed: bool, slow: bool) -> CallOutcome:
    """The ``CallOutcome`` for a call that failed or not and was slow or not."""
    return CallOutcome(1 + int(failed) + 2 * int(slow))


class SlidingWindow(Protocol):
    """Running totals over recent calls; what the circuit breaker needs from a window.

    ``outcome`` is a ``CallOutcome`` value (a plain ``int`` is accepted for speed). ``now`` is
    in seconds on any monotonic clock; a count window ignores it. Rates are in [0, 1] and are
    ``0.0`` for an empty window.
    """

    def record(self, outcome: int, now: float) -> None: ...

    def calls(self, now: float) -> int: ...

    def failures(self, now: float) -> int: ...

    def slow_calls(self, now: float) -> int: ...

    def failure_rate(self, now: float) -> float: ...

    def slow_call_rate(self, now: float) -> float: ...

    def reset(self) -> None: ...

    @property
    def absorbs_success(self) -> bool:
        """True when recording a plain success would leave the window unchanged, so the caller
        may skip ``record``. Read it as an attribute; it is a hot-path shortcut."""
        ...


class CountWindow:
    """The last ``size`` calls (``size`` >= 1).

    ``now`` is accepted by every method (to satisfy ``SlidingWindow``) and ignored.
    """

    __slots__ = ("_calls", "_failures", "_head", "_ring", "_size", "_slow", "absorbs_success")

    def __init__(self, size: int) -> None:
        if not _is_int(size) or size < 1:
            raise ConfigError("window.size", size, "an integer >= 1 (calls)")
        self._size = size
        self._ring = bytearray(size)
        self._head = 0
        self._calls = 0
        self._failures = 0
        self._slow = 0
        #: Read-only. True when the ring is full of plain successes: recording another one
        #: changes nothing (whatever the head position), so callers may skip the call.
        self.absorbs_success = False

    @property
    def size(self) -> int:
        """How many calls the window holds at most."""
        return self._size

    def record(self, outcome: int, now: float = 0.0) -> None:
        """Add one call, evicting the oldest once ``size`` calls are held."""
        # A full ring of plain successes stays the same whatever the head position: the
        # steady state of a healthy service is one flag test.
        if self.absorbs_success and outcome == _SUCCESS:
            return
        ring = self._ring
        head = self._head
        old = ring[head]
        # Evicting the same code that comes in leaves every total unchanged.
        if old != outcome:
            if old:
                self._failures += _FAILED[outcome] - _FAILED[old]
                self._slow += _SLOW[outcome] - _SLOW[old]
            else:
                self._calls += 1
                self._failures += _FAILED[outcome]
                self._slow += _SLOW[outcome]
            ring[head] = outcome
            self.absorbs_success = (
                self._calls == self._size and not self._failures and not self._slow
            )
        head += 1
        self._head = 0 if head == self._size else head

    def calls(self, now: float = 0.0) -> int:
        """Calls in the window (at most ``size``)."""
        return self._calls

    def failures(self, now: float = 0.0) -> int:
        """Failed calls in the window, slow or not."""
        return self._failures

    def slow_calls(self, now: float = 0.0) -> int:
        """Slow calls in the window, failed or not."""
        return self._slow

    def failure_rate(self, now: float = 0.0) -> float:
        """``failures / calls``, or ``0.0`` when empty."""
        calls = self._calls
        return self._failures / calls if calls else 0.0

    def slow_call_rate(self, now: float = 0.0) -> float:
        """``slow_calls / calls``, or ``0.0`` when empty."""
        calls = self._calls
        return self._slow / calls if calls else 0.0

    def reset(self) -> None:
        """Forget every call."""
        self._ring = bytearray(self._size)
        self._head = 0
        self._calls = 0
        self._failures = 0
        self._slow = 0
        self.absorbs_success = False

    def __repr__(self) -> str:
        return (
            f"CountWindow(size={self._size}, calls={self._calls}, "
            f"failures={self._failures}, slow_calls={self._slow})"
        )


class TimeWindow:
    """Calls of the last ``seconds`` (> 0), in ``buckets`` slices (an integer >= 1, default 10).

    Time is cut into slices of ``width = seconds / buckets``; slice number ``now // width``.
    At time ``now`` the window holds the calls recorded in the current slice and in the
    ``buckets - 1`` slices before it, so it spans between ``seconds - width`` and ``seconds``.
    Every method takes ``now`` and first moves the window forward to it, which costs at most
    ``buckets`` steps however long the gap. A ``now`` older than the newest one seen is treated
    as the newest (clocks are monotonic; this only keeps misuse from corrupting the totals).
    """

    __slots__ = (
        "_bucket_calls",
        "_bucket_failures",
        "_bucket_slow",
        "_buckets",
        "_calls",
        "_epoch",
        "_failures",
        "_pos",
        "_seconds",
        "_slow",
        "_width",
    )

    #: A success always lands in the current slice, so it is never absorbed.
    absorbs_success: Final = False

    def __init__(self, seconds: float, buckets: int = 10) -> None:
        if not (_is_real(seconds) and 0.0 < seconds < float("inf")):
            raise ConfigError("window.seconds", seconds, "a finite number > 0 (seconds)")
        if not _is_int(buckets) or buckets < 1:
            raise ConfigError("window.buckets", buckets, "an integer >= 1")
        self._seconds = float(seconds)
        self._buckets = buckets
        self._width = self._seconds / buckets
        self._bucket_calls = [0] * buckets
        self._bucket_failures = [0] * buckets
        self._bucket_slow = [0] * buckets
        self._epoch = float("-inf")  # slice number of the newest slice seen
        self._pos = 0  # its index in the bucket lists
        self._calls = 0
        self._failures = 0
        self._slow = 0

    @property
    def seconds(self) -> float:
        """The span of the window in seconds."""
        return self._seconds

    @property
    def buckets(self) -> int:
        """How many slices the window is cut into."""
        return self._buckets

    def _roll(self, epoch: float) -> None:
        n = self._buckets
        calls, failures, slow = self._bucket_calls, self._bucket_failures, self._bucket_slow
        if epoch - self._epoch >= n:
            for i in range(n):
                calls[i] = failures[i] = slow[i] = 0
            self._calls = self._failures = self._slow = 0
        else:
            pos = self._pos
            for _ in range(int(epoch - self._epoch)):
                pos = pos + 1 if pos + 1 < n else 0
                self._calls -= calls[pos]
                self._failures -= failures[pos]
                self._slow -= slow[pos]
                calls[pos] = failures[pos] = slow[pos] = 0
        self._epoch = epoch
        self._pos = int(epoch) % n

    def record(self, outcome: int, now: float) -> None:
        """Add one call at time ``now`` (seconds)."""
        epoch = now // self._width
        if epoch > self._epoch:
            self._roll(epoch)
        pos = self._pos
        failed = _FAILED[outcome]
        slow = _SLOW[outcome]
        self._bucket_calls[pos] += 1
        self._calls += 1
        if failed:
            self._bucket_failures[pos] += 1
            self._failures += 1
        if slow:
            self._bucket_slow[pos] += 1
            self._slow += 1

    def calls(self, now: float) -> int:
        """Calls in the window at ``now``."""
        epoch = now // self._width
        if epoch > self._epoch:
            self._roll(epoch)
        return self._calls

    def failures(self, now: float) -> int:
        """Failed calls in the window at ``now``, slow or not."""
        epoch = now // self._width
        if epoch > self._epoch:
            self._roll(epoch)
        return self._failures

    def slow_calls(self, now: float) -> int:
        """Slow calls in the window at ``now``, failed or not."""
        epoch = now // self._width
        if epoch > self._epoch:
            self._roll(epoch)
        return self._slow

    def failure_rate(self, now: float) -> float:
        """``failures / calls`` at ``now``, or ``0.0`` when empty."""
        calls = self.calls(now)
        return self._failures / calls if calls else 0.0

    def slow_call_rate(self, now: float) -> float:
        """``slow_calls / calls`` at ``now``, or ``0.0`` when empty."""
        calls = self.calls(now)
        return self._slow / calls if calls else 0.0

    def reset(self) -> None:
        """Forget every call (the newest slice seen is kept, so time still cannot go back)."""
        n = self._buckets
        for i in range(n):
            self._bucket_calls[i] = self._bucket_failures[i] = self._bucket_slow[i] = 0
        self._calls = self._failures = self._slow = 0

    def __repr__(self) -> str:
        return (
            f"TimeWindow(seconds={self._seconds}, buckets={self._buckets}, calls={self._calls}, "
            f"failures={self._failures}, slow_calls={self._slow})"
        )
