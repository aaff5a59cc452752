"""Recovery strategies and outcomes (the vocabulary; the engine lives in runtime)."""

from __future__ import annotations

import enum

__all__ = ["Outcome", "Strategy", "default_strategy"]


class Strategy(str, enum.Enum):
    """How a failure is recovered from. The values are metric attribute values."""

    RATE_LIMIT_BACKOFF = "rate_limit_backoff"
    RETRY_WITH_BACKOFF = "retry_with_backoff"
    TIMEOUT_ADJUST = "timeout_adjust"
    RECONNECT = "reconnect"
    AUTH_REFRESH = "auth_refresh"
    FAILOVER = "failover"
    FAIL_FAST = "fail_fast"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """How a logical call that needed recovery ended. Metric attribute values."""

    RECOVERED = "recovered"
    FALLBACK = "fallback"
    FAILED = "failed"
    REJECTED = "rejected"
    BUDGET_EXHAUSTED = "budget_exhausted"

    def __str__(self) -> str:
        return self.value


def default_strategy(category: str, *, retryable: bool) -> Strategy:
    """The strategy a failure of ``category`` gets before any learning.

    rate_limit → rate_limit_backoff; timeout → timeout_adjust; connection/dns → reconnect;
    authentication → auth_refresh; any other retryable failure → retry_with_backoff;
    any other failure that is not retryable → fail_fast. (Failover is chosen by the caller
    when a fallback exists.)
    """
    if category == "authentication":
        return Strategy.AUTH_REFRESH  # not retryable as is, but may be after a refresh
    if not retryable:
        return Strategy.FAIL_FAST
    return _BY_CATEGORY.get(category, Strategy.RETRY_WITH_BACKOFF)


_BY_CATEGORY = {
    "rate_limit": Strategy.RATE_LIMIT_BACKOFF,
    "timeout": Strategy.TIMEOUT_ADJUST,
    "connection": Strategy.RECONNECT,
    "dns": Strategy.RECONNECT,
}
