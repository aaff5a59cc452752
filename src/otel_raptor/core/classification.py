"""The error taxonomy: categories, severities and the classification record."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "NON_HEALTH_CATEGORIES",
    "Classification",
    "ErrorCategory",
    "Severity",
]


class ErrorCategory(str, enum.Enum):
    """What kind of failure an exception (or response) is.

    The values are metric attribute values that dashboards and alert rules rely on: they are
    part of the public contract and never change.
    """

    RATE_LIMIT = "rate_limit"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    DNS = "dns"
    TLS = "tls"
    AUTHENTICATION = "authentication"
    AUTHORIZATION = "authorization"
    UNAVAILABLE = "unavailable"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    CONCURRENCY = "concurrency"
    INTEGRITY = "integrity"
    QUERY = "query"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class Severity(str, enum.Enum):
    """How bad a failure is, from ``low`` to ``critical``; ordered."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    def raised(self, steps: int = 1) -> Severity:
        """This severity moved ``steps`` levels up (capped at ``critical``)."""
        return _SEVERITIES[min(len(_SEVERITIES) - 1, max(0, self.rank + steps))]

    def __str__(self) -> str:
        return self.value


_SEVERITIES = (Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL)
_SEVERITY_RANK = {s: i for i, s in enumerate(_SEVERITIES)}

#: Failures that say nothing about the downstream's health: the caller sent something wrong,
#: or gave up, or the downstream is throttling (a 429 is a live server asking for less traffic,
#: not a failing one). They never trip a breaker.
NON_HEALTH_CATEGORIES = frozenset(
    {
        ErrorCategory.RATE_LIMIT,
        ErrorCategory.CLIENT_ERROR,
        ErrorCategory.INTEGRITY,
        ErrorCategory.QUERY,
        ErrorCategory.AUTHENTICATION,
        ErrorCategory.AUTHORIZATION,
        ErrorCategory.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one failure.

    ``retryable`` says the failure is transient by nature: a retry of an operation that is safe
    to repeat may succeed. Whether *this* operation is safe to repeat is the caller's call.
    ``retry_after`` is the server's requested wait in seconds (``Retry-After`` or a rate-limit
    reset header), or ``None``. ``error_type`` is the value for the OTel ``error.type``
    attribute: the exception's fully qualified class name, or the HTTP status code as a string.
    ``rule`` names the rule that matched, for debugging. ``live_refusal``: the downstream
    answered and refused this call for a state of its own that lets other calls through (a
    Redis at ``maxmemory`` refusing writes with ``OOM``, a read-only replica refusing writes):
    evidence of degradation, not of an outage, so it never counts toward opening a breaker,
    which would refuse the reads that still succeed. ``unconfirmed``: a failure that is
    evidence of an outage only if another one confirms it, such as a statement that finds
    its pooled connection closed (by a reaper of idle sessions, or by a server that went
    down): it counts toward opening a breaker only after a counted failure or before one,
    with no success between (see ``BreakerCore.on_failure``). ``opened_at``: for an
    unconfirmed failure, when (monotonic seconds, the runtime clock) the connection it lost
    was opened, if the integration knows: a connection the server ended before it could
    idle confirms the outage (see "A fresh connection's lost link" in
    ``otel_raptor.core.breaker``).
    """

    category: ErrorCategory
    severity: Severity
    retryable: bool
    error_type: str
    retry_after: float | None = None
    status_code: int | None = None
    code: str | None = None
    rule: str = ""
    live_refusal: bool = False
    unconfirmed: bool = False
    opened_at: float | None = None

    @property
    def counts_against_health(self) -> bool:
        """Whether this failure should count towards tripping a circuit breaker."""
        return not self.live_refusal and self.category not in NON_HEALTH_CATEGORIES
