"""Time-bucketed counters and the histogram arithmetic that Prometheus uses.

``SlicedCounters`` keeps, per key, a fixed row of numbers for each slice of time in a ring of
``slices`` slices of ``width_s`` seconds. Adding is O(1); reading a window sums the slices it
covers. Slices are reused as time moves on (a slice that comes round again is emptied first),
so memory is ``slices x keys x fields`` numbers, whatever the traffic: it does not grow with
the number of events, and the number of keys in one slice is capped (the excess is counted
under an overflow key). A window is rounded to whole slices: the current slice counts in full
however far into it ``now`` is.

``DURATION_BUCKETS`` are the bucket boundaries of recovery times, the same as the
``raptor.recovery.duration`` histogram's (a test keeps them equal), and
``histogram_quantile`` estimates a quantile from bucket counts exactly as PromQL's function of
that name does, so that a percentile computed in process and one computed by Prometheus from the
exported histogram agree.

Pure: time is a parameter; not thread-safe (the runtime holds a lock).
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Hashable, Iterable, Sequence
from typing import Final, Generic, TypeVar

from otel_raptor.errors import ConfigError

__all__ = [
    "DURATION_BUCKETS",
    "SlicedCounters",
    "bucket_index",
    "histogram_quantile",
]

K = TypeVar("K", bound=Hashable)

#: Upper bounds (seconds) of the recovery-time buckets; a last, implicit ``+Inf`` bucket
#: follows. Equal to ``telemetry.instruments.RECOVERY_DURATION_BUCKETS`` (tested).
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


def bucket_index(value: float, bounds: Sequence[float] = DURATION_BUCKETS) -> int:
    """The bucket ``value`` falls in: the first ``i`` with ``value <= bounds[i]``, or
    ``len(bounds)`` (the ``+Inf`` bucket). Buckets are upper-inclusive, as in Prometheus and
    the OpenTelemetry SDK."""
    return bisect.bisect_left(bounds, value)


def histogram_quantile(
    q: float, counts: Sequence[float], bounds: Sequence[float] = DURATION_BUCKETS
) -> float | None:
    """The ``q``-quantile (0 <= q <= 1) of a histogram, as PromQL's ``histogram_quantile``.

    ``counts[i]`` is the number of observations in bucket ``i`` (not cumulative), with
    ``len(counts) == len(bounds) + 1`` (the last is ``+Inf``). Within a bucket the value is
    interpolated linearly; the first bucket starts at 0 (its bound is positive); a quantile
    that lands in the ``+Inf`` bucket is the largest finite bound. ``None`` without
    observations.
    """
    if len(counts) != len(bounds) + 1:
        raise ValueError("counts must have one more entry than bounds (+Inf)")
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    cumulative: list[float] = []
    running = 0.0
    for count in counts:
        running += count
        cumulative.append(running)
    observations = cumulative[-1]
    if observations <= 0:
        return None
    rank = q * observations
    # promql/quantile.go bucketQuantile: the first finite bucket whose cumulative count
    # reaches the rank; none of them: the largest finite bound.
    found = next((i for i in range(len(bounds)) if cumulative[i] >= rank), len(bounds))
    if found == len(bounds):
        return bounds[-1]
    if found == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, in_bucket = 0.0, bounds[found], cumulative[found]
    if found > 0:
        start = bounds[found - 1]
        in_bucket -= cumulative[found - 1]
        rank -= cumulative[found - 1]
    if in_bucket <= 0:
        return None  # PromQL's 0/0: NaN (only for q == 0 with an empty first bucket)
    return start + (end - start) * (rank / in_bucket)


class SlicedCounters(Generic[K]):
    """Rows of ``fields`` numbers per key, per slice of a ring covering ``width_s * slices``.

    ``max_keys`` caps the distinct keys in one slice; further keys in that slice are added to
    ``overflow`` instead (which must be a key of the same shape).
    """

    __slots__ = ("_fields", "_indices", "_max_keys", "_overflow", "_rows", "_slices", "_width")

    def __init__(
        self, *, width_s: float, slices: int, fields: int, max_keys: int, overflow: K
    ) -> None:
        width: object = width_s  # typed, but callers pass anything
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise ConfigError("window.width_s", width_s, "a number of seconds > 0")
        checks: tuple[tuple[str, object], ...] = (
            ("window.slices", slices),
            ("window.fields", fields),
            ("window.max_keys", max_keys),
        )
        for key, value in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(key, value, "an integer >= 1")
        self._width = float(width_s)
        self._slices = slices
        self._fields = fields
        self._max_keys = max_keys
        self._overflow = overflow
        # For each ring position: the absolute slice number it holds, and its rows.
        self._indices: list[int] = [-1] * slices
        self._rows: list[dict[K, array[float]]] = [{} for _ in range(slices)]

    @property
    def width_s(self) -> float:
        return self._width

    @property
    def span_s(self) -> float:
        """The longest window the ring can answer, in seconds."""
        return self._width * self._slices

    def row(self, key: K, now: float) -> array[float] | None:
        """The row of ``key`` in the slice of ``now``, to add to in place (created on first
        use); ``None`` when ``now`` is older than the ring (the event is too late to count)."""
        number = int(now // self._width)
        position = number % self._slices
        held = self._indices[position]
        if held != number:
            if number < held:
                return None
            self._indices[position] = number
            self._rows[position] = {}
        rows = self._rows[position]
        row = rows.get(key)
        if row is None:
            if len(rows) >= self._max_keys:
                key = self._overflow
                row = rows.get(key)
            if row is None:
                row = rows[key] = array("d", bytes(8 * self._fields))
        return row

    def window(self, now: float, span_s: float) -> dict[K, array[float]]:
        """Sum of each key's rows over the slices covering ``(now - span_s, now]``, rounded up
        to whole slices and capped at the ring's span."""
        newest = int(now // self._width)
        count = max(1, min(self._slices, math.ceil(span_s / self._width - 1e-9)))
        oldest = newest - count + 1
        total: dict[K, array[float]] = {}
        fields = range(self._fields)
        for position in range(self._slices):
            number = self._indices[position]
            if not oldest <= number <= newest:
                continue
            for key, row in self._rows[position].items():
                into = total.get(key)
                if into is None:
                    total[key] = array("d", row)
                else:
                    for index in fields:
                        into[index] += row[index]
        return total

    def between(self, start: float, end: float) -> dict[K, array[float]]:
        """Sum of each key's rows over the slices that *start* in ``[start, end)``: exact
        when both are multiples of ``width_s``. Slices no longer in the ring count as empty."""
        first = math.ceil(start / self._width - 1e-9)
        last = math.ceil(end / self._width - 1e-9) - 1
        total: dict[K, array[float]] = {}
        fields = range(self._fields)
        for position in range(self._slices):
            number = self._indices[position]
            if not first <= number <= last:
                continue
            for key, row in self._rows[position].items():
                into = total.get(key)
                if into is None:
                    total[key] = array("d", row)
                else:
                    for index in fields:
                        into[index] += row[index]
        return total

    def keys(self) -> Iterable[K]:
        seen: set[K] = set()
        for rows in self._rows:
            seen.update(rows)
        return seen

    def clear(self) -> None:
        self._indices = [-1] * self._slices
        self._rows = [{} for _ in range(self._slices)]
