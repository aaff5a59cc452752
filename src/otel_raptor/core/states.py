"""Circuit-breaker states and the record of a state change."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CircuitState", "Transition", "TransitionReason"]


class CircuitState(str, enum.Enum):
    """A circuit breaker's state. The values are metric attribute values."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


class TransitionReason(str, enum.Enum):
    """Why a breaker changed state. The values are span-event attribute values."""

    CONSECUTIVE_FAILURES = "consecutive_failures"
    FAILURE_RATE = "failure_rate"
    SLOW_CALL_RATE = "slow_call_rate"
    PROBE_FAILED = "probe_failed"
    RECOVERY_TIMEOUT_ELAPSED = "recovery_timeout_elapsed"
    PROBES_SUCCEEDED = "probes_succeeded"
    HEALTH_CHECK_PASSED = "health_check_passed"
    MANUAL_OPEN = "manual_open"
    MANUAL_CLOSE = "manual_close"
    #: Recording a success failed (a bug of ours): the breaker stopped judging, closed.
    BOOKKEEPING_FAILED = "bookkeeping_failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, returned by the state machine for its caller to publish.

    ``open_for`` is how long the breaker stays open (seconds) when ``to_state`` is OPEN and
    the open was not manual; otherwise ``None``.
    """

    from_state: CircuitState
    to_state: CircuitState
    reason: TransitionReason
    at: float
    open_for: float | None = None
