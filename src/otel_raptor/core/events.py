"""Event records: what the core and runtime decided, for subscribers to publish.

Every record is a frozen, slotted dataclass with low-cardinality fields only: service and
breaker names (already folded to a bounded set by the runtime), enums and numbers. Nothing here
carries an exception message, a URL or SQL text as a field, with one exception:
``ErrorClassified.error``, the exception object itself, for the error analytics (which keeps
only a normalised, scrubbed template of its message); telemetry never records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from otel_raptor.core.classification import Classification, Severity
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.states import CircuitState, TransitionReason

__all__ = [
    "BreakerTransitioned",
    "CallRejected",
    "ErrorClassified",
    "Event",
    "EventSink",
    "FailurePredicted",
    "MemoryCleanupFinished",
    "MemoryPressureChanged",
    "PreventionActionRun",
    "RecoveryFinished",
    "RetryBudgetExhausted",
    "RetryScheduled",
    "SKIP_REASONS",
]


@dataclass(frozen=True, slots=True)
class ErrorClassified:
    """A call failed and was classified. ``attempt`` counts from 1.

    ``error`` is the exception itself when there is one (``None`` for a failing response, or
    from publishers that do not pass it). It is there for the error analytics, which
    fingerprint its type and normalised message; it is never a metric or span attribute, and
    it takes no part in comparing or printing the event.
    """

    service: str
    classification: Classification
    attempt: int
    error: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """The attempt loop will run attempt ``attempt + 1`` after ``delay_s`` seconds."""

    service: str
    attempt: int
    delay_s: float
    classification: Classification
    strategy: Strategy


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted:
    """A retry was wanted but the downstream's retry budget had no token left."""

    service: str
    classification: Classification


@dataclass(frozen=True, slots=True)
class BreakerTransitioned:
    """A circuit breaker changed state."""

    breaker: str
    from_state: CircuitState
    to_state: CircuitState
    reason: TransitionReason
    open_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class CallRejected:
    """An open (or saturated half-open) breaker refused a call without running it."""

    breaker: str
    state: CircuitState
    retry_after_s: float | None


@dataclass(frozen=True, slots=True)
class RecoveryFinished:
    """A logical call that needed recovery has ended (however it ended).

    ``give_up_reason`` is set when the outcome is not ``recovered``/``fallback`` and says why
    the attempt loop stopped: a ``GiveUpReason`` value, or one of the loop's own
    (``breaker_rejected``, ``throttled``, ``learned_futile``, ``fallback_failed``); ``""``
    otherwise.
    """

    service: str
    strategy: Strategy
    outcome: Outcome
    attempts: int
    duration_s: float
    category: str
    give_up_reason: str = ""


@dataclass(frozen=True, slots=True)
class FailurePredicted:
    """A resource is forecast to run out (or, with ``cleared``, no longer is).

    ``resource`` is a bounded name (``memory``, ``process_memory``, ``cpu``, ``disk``,
    ``file_descriptors``, ``threads``, ``connections``, ``error_rate``); ``probability`` of
    reaching the limit within the horizon and ``confidence`` are in [0, 1];
    ``time_to_exhaustion_s`` is ``None`` when the trend does not reach the limit.
    """

    resource: str
    probability: float
    time_to_exhaustion_s: float | None
    confidence: float
    severity: Severity
    cleared: bool = False


@dataclass(frozen=True, slots=True)
class PreventionActionRun:
    """A prevention action ran for ``resource``; ``outcome`` is ``ok``, ``failed`` or
    ``skipped``, and then ``skip_reason`` says why (one of :data:`SKIP_REASONS`; empty
    otherwise)."""

    resource: str
    action: str
    outcome: str
    duration_s: float
    skip_reason: str = ""


#: Why a prevention action was skipped: within its cooldown (and not an escalation), below its
#: minimum severity, too many earlier sync calls still running, no memory controller to clean
#: with, or the controller did nothing (its own cooldown, ``auto_cleanup`` off, a cleanup
#: already running).
SKIP_REASONS: Final = frozenset(
    {"cooldown", "below_severity", "overrunning", "no_controller", "controller_declined"}
)


@dataclass(frozen=True, slots=True)
class MemoryPressureChanged:
    """Memory use crossed a level: ``normal``, ``warning`` (70 %), ``critical`` (85 %) or
    ``emergency`` (95 % of the effective limit)."""

    level: str
    previous: str
    usage_ratio: float


@dataclass(frozen=True, slots=True)
class MemoryCleanupFinished:
    """A memory cleanup ran at ``level`` (``standard``, ``critical``, ``emergency``),
    started by ``trigger`` (``manual``, ``pressure``, ``prediction``, ``scheduled``)."""

    level: str
    trigger: str
    bytes_freed: int
    entries_evicted: int
    duration_s: float


Event: TypeAlias = (
    ErrorClassified
    | RetryScheduled
    | RetryBudgetExhausted
    | BreakerTransitioned
    | CallRejected
    | RecoveryFinished
    | FailurePredicted
    | PreventionActionRun
    | MemoryPressureChanged
    | MemoryCleanupFinished
)


class EventSink(Protocol):
    """Anything that accepts events: the bus, a test recorder, a telemetry exporter."""

    def publish(self, event: Event) -> None: ...
