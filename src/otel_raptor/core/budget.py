"""The retry budget: retries to one downstream may be at most a fraction of its calls.

The rule is Finagle's (and Linkerd's, and close to Envoy's): every call deposits ``ratio`` of
a token, every retry spends one whole token, and a floor of ``min_retries_per_second`` tokens
flows in regardless, so that a service with little traffic can still retry. A retry that
succeeds gives its token back (``refund``, as the AWS SDKs' "standard" retry quota does), so
only futile retries cost anything. A retry storm is therefore bounded: over any period of
``T`` seconds with ``N`` calls, at most ``ratio * N + min_retries_per_second * T`` retries
that were not given back, plus what was in the bucket at the start.

What is in the bucket is bounded too. Deposits do not keep forever: the balance leaks with
time constant ``ttl``, so that with a steady ``c`` calls per second and no retries it settles
at ``(ratio * c + min_retries_per_second) * ttl``, that is ``ratio * calls_in_the_last_ttl +
min_retries_per_second * ttl``. An exponential window stands in for Finagle's sliding window:
it needs no buckets and no per-call timestamp. A fresh budget starts with one second of the
floor (``min_retries_per_second`` tokens), not a full ``ttl`` of it: a process in a crash loop
should not bring a fresh reserve of retries with every restart.

``record_call`` is on every call's path, so it only bumps a counter and takes no time. The
deposits it counts are folded into the balance lazily, at the next ``try_withdraw``, as if
they had arrived evenly since the previous fold, and leak from there. Folding can only
under-credit (deposits that really came late in the interval would have leaked less), never
credit more than ``ratio`` per call. See ``docs/retries.md`` for a worked example.

Thread safety: none by itself. The runtime serialises ``try_withdraw`` (and ``tokens``)
under a lock, but calls ``record_call`` without one. That is sound because each counter has a
single kind of writer: ``record_call`` only ever increments ``_calls``, and a fold only reads
it and remembers how many it has credited (``_credited``). Two racing ``record_call`` calls may
lose an increment, which only means fewer deposits: a race makes the budget stricter, never
looser.
"""

from __future__ import annotations

import math

from otel_raptor.core.numbers import as_finite
from otel_raptor.errors import ConfigError

__all__ = ["RetryBudget"]

# Below this fraction of ``ttl`` an interval is folded without leak: the exponential formula
# would divide by a vanishing interval, and the leak over it is below float precision anyway.
_TINY = 1e-9


def _finite(key: str, value: object, allowed: str, *, zero_ok: bool = True) -> float:
    """``value`` as a float: finite, not a bool, >= 0 (> 0 unless ``zero_ok``)."""
    number = as_finite(value)
    if number is None or number < 0 or (number == 0 and not zero_ok):
        raise ConfigError(key, value, allowed)
    return number


class RetryBudget:
    """A token bucket of retries for one downstream.

    ``ratio``: tokens deposited per call, so the long-run fraction of calls that may be
    retried; finite, >= 0, default 0.2. ``min_retries_per_second``: the floor, tokens per
    second that flow in without calls; finite, >= 0, default 10.0. ``ttl``: seconds, the time
    constant with which unspent tokens leak, so the length of the (exponential) window the
    balance remembers; finite, > 0, default 10.0. ``now``: the clock's time at creation, in
    the same seconds as later ``now`` arguments; when ``None`` the clock starts at the first
    ``try_withdraw``, and calls recorded before it are credited as if they were all recent.

    Invalid arguments raise :class:`~otel_raptor.errors.ConfigError` (``retry_budget.<name>``).
    """

    __slots__ = ("_calls", "_credited", "_floor", "_last", "_ratio", "_tokens", "_ttl")

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 10.0,
        ttl: float = 10.0,
        *,
        now: float | None = None,
    ) -> None:
        at_least_0 = "a finite number >= 0"
        self._ratio = _finite("retry_budget.ratio", ratio, at_least_0)
        self._floor = _finite(
            "retry_budget.min_retries_per_second", min_retries_per_second, at_least_0
        )
        self._ttl = _finite(
            "retry_budget.ttl", ttl, "a finite number of seconds > 0", zero_ok=False
        )
        start: object = now  # typed float | None, but callers pass anything
        if start is not None and (
            isinstance(start, bool)
            or not isinstance(start, (int, float))
            or not math.isfinite(start)
        ):
            raise ConfigError("retry_budget.now", start, "a finite number of seconds, or None")
        # Calls ever recorded (only ``record_call`` writes it) and how many of them the
        # balance already includes (only folds write it).
        self._calls = 0
        self._credited = 0
        # The balance as of ``_last`` (the time of the last fold; None before the first one).
        self._tokens = self._floor * min(1.0, self._ttl)
        self._last: float | None = None if start is None else float(start)

    @property
    def ratio(self) -> float:
        return self._ratio

    @property
    def min_retries_per_second(self) -> float:
        return self._floor

    @property
    def ttl(self) -> float:
        return self._ttl

    def record_call(self) -> None:
        """Count one call (deposits ``ratio`` of a token at the next fold). O(1), no clock."""
        self._calls += 1

    def refund(self) -> None:
        """Give back the token of a retry that succeeded (the AWS SDK "standard" retry quota
        does the same): productive retries cost nothing, so a degraded downstream keeps its
        retries, while retries that keep failing still drain the budget. O(1), no clock."""
        self._tokens += 1.0

    def reshape(self, ratio: float, min_retries_per_second: float, *, now: float) -> None:
        """Change ``ratio`` and ``min_retries_per_second`` in place at time ``now``, keeping
        the balance (the calls recorded so far are credited at the old ratio first). Invalid
        values raise :class:`~otel_raptor.errors.ConfigError` and change nothing."""
        at_least_0 = "a finite number >= 0"
        new_ratio = _finite("retry_budget.ratio", ratio, at_least_0)
        new_floor = _finite(
            "retry_budget.min_retries_per_second", min_retries_per_second, at_least_0
        )
        calls = self._calls
        self._tokens = self._balance(now, calls - self._credited)
        self._credited = calls
        if self._last is None or now > self._last:
            self._last = now
        self._ratio, self._floor = new_ratio, new_floor

    def try_withdraw(self, now: float) -> bool:
        """Spend one token for a retry at time ``now`` (seconds); ``False`` if there is none."""
        calls = self._calls
        balance = self._balance(now, calls - self._credited)
        self._credited = calls
        if self._last is None or now > self._last:
            self._last = now
        if balance >= 1.0:
            self._tokens = balance - 1.0
            return True
        self._tokens = balance
        return False

    def tokens(self, now: float) -> float:
        """The balance at time ``now``, deposits included, for a gauge. Changes nothing."""
        return self._balance(now, self._calls - self._credited)

    def _balance(self, now: float, calls: int) -> float:
        """The balance at ``now`` after crediting ``calls`` calls since the last fold.

        Between folds the balance ``B`` follows ``dB/dt = ratio * c + floor - B / ttl`` with
        the ``calls`` spread evenly over the interval (``c = calls / dt``), whose solution is
        ``B * e + (ratio * calls / dt + floor) * ttl * (1 - e)`` with ``e = exp(-dt / ttl)``.
        Since ``ttl * (1 - e) <= dt``, this never credits more than ``ratio * calls +
        floor * dt``.
        """
        last = self._last
        deposit = self._ratio * calls
        if last is None:
            return self._tokens + deposit
        ttl = self._ttl
        x = (now - last) / ttl
        if x < _TINY:
            # Same instant (or a clock that went back): the calls are recent, nothing leaks.
            return self._tokens + deposit + (self._floor * (now - last) if x > 0.0 else 0.0)
        leaked = -math.expm1(-x)  # 1 - exp(-x), precise for small x
        return self._tokens * (1.0 - leaked) + (deposit / x + self._floor * ttl) * leaked

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio}, min_retries_per_second={self._floor}, "
            f"ttl={self._ttl}, tokens={self._tokens:.3g}, "
            f"pending_calls={self._calls - self._credited})"
        )
