"""A downstream's shared state, and the route one kind of call takes to it.

:class:`Downstream` is what every caller of one downstream shares besides its circuit breaker:
the retry budget and the ``Retry-After`` cooldown. The runtime owns one per service name
(bounded by ``max_services``) and never replaces it: a new budget shape is applied in place
(:meth:`Downstream.reshape`), by one writer, the runtime. So a guard may keep the object for
its lifetime and never deposits into a budget that nobody reads.

:class:`Route` is built once per guard (or per integration policy): the downstream, the breaker
that guard uses (the service's shared one, one of its own, or none), how its failures are
classified, and the runtime's learner and bus. It implements the attempt loop's
:class:`~otel_raptor.core.attempts.DownstreamPort`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Final, Protocol

from otel_raptor.core.attempts import Refusal, RefusalKind
from otel_raptor.core.breaker import Permit
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.classify import REPEAT_THRESHOLD, ClassifyContext
from otel_raptor.core.events import Event
from otel_raptor.core.recovery import Strategy
from otel_raptor.core.states import CircuitState
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.forksafe import register_lock
from otel_raptor.runtime.safety import report_internal_error

__all__ = [
    "THROTTLE_MIN_CALLS",
    "THROTTLE_WINDOW_S",
    "ClassifyFunction",
    "Downstream",
    "Route",
    "RuntimeServices",
]

#: The window over which a downstream's share of throttled calls is measured (seconds).
THROTTLE_WINDOW_S: Final = 10.0
#: Attempts the window must hold before a share of them can count as pervasive throttling.
THROTTLE_MIN_CALLS: Final = 10

_CALL: Final = Permit.CALL
_CLOSED: Final = CircuitState.CLOSED


class ClassifyFunction(Protocol):
    def __call__(
        self, exc: BaseException, *, context: ClassifyContext | None = None
    ) -> Classification: ...


class Downstream:
    """The retry budget and the cooldown of one downstream (see the module docstring).

    ``cooldown_until`` (monotonic seconds) is read without a lock on every call: a float
    attribute read is atomic, and a call that just misses a new cooldown is one that would
    have started a moment earlier anyway.
    """

    __slots__ = (
        "__weakref__",
        "_lock",
        "_retries",
        "_throttle",
        "budget",
        "cooldown_until",
        "service",
    )

    def __init__(self, service: str, budget: RetryBudget) -> None:
        self.service = service
        self.budget = budget
        self.cooldown_until = -math.inf
        # Retries granted (each one attempt more than the calls): with the budget's call
        # count, the attempts the throttle share is measured against.
        self._retries = 0
        # Throttled answers against attempts, over two windows of THROTTLE_WINDOW_S: [start
        # of the current window, the attempt count then, throttled in it, attempts and
        # throttled in the previous window].
        self._throttle = [-math.inf, 0.0, 0.0, 0.0, 0.0]
        self._lock = threading.Lock()
        register_lock(self, "_lock")

    def withdraw(self, now: float) -> bool:
        """Take one retry token at ``now``; ``False`` when the budget is empty."""
        with self._lock:
            granted = self.budget.try_withdraw(now)
            self._retries += granted
            return granted

    def refund(self) -> None:
        """Give back the token of a retry that succeeded."""
        with self._lock:
            self.budget.refund()

    def tokens(self, now: float) -> float | None:
        """Retry tokens available at ``now``, for the gauge: ``None`` when the lock is busy
        (see :meth:`CircuitBreaker.try_snapshot`; a gauge must not wait on our locks)."""
        lock = self._lock
        if not lock.acquire(blocking=False):
            return None
        try:
            return self.budget.tokens(now)
        finally:
            lock.release()

    def reshape(self, ratio: float, min_retries_per_second: float, now: float) -> None:
        """Apply a new budget shape in place (the balance is kept)."""
        with self._lock:
            self.budget.reshape(ratio, min_retries_per_second, now=now)

    def throttled(self, now: float) -> float:
        """Count one throttled answer at ``now``; the share of the attempts (calls and
        retries) of the last :data:`THROTTLE_WINDOW_S` (about) that were throttled, 0 to 1, or
        0 while fewer than :data:`THROTTLE_MIN_CALLS` attempts were seen (not enough to call
        throttling pervasive). Attempts, not calls: a call that waits out a 429 and is
        throttled again counts twice, and so does its attempt, so a server that throttles a
        quarter of the requests shows a quarter however long the callers wait. Two windows,
        the older weighted by how much of it still overlaps; a window starts at a throttle
        (attempts are only counted, not timed, so the first window measures from its first
        throttle on). O(1), on the failure path only."""
        with self._lock:
            calls = float(self.budget._calls + self._retries)
            state = self._throttle
            start, calls_at_start, throttled, previous_calls, previous_throttled = state
            elapsed = now - start
            if elapsed >= THROTTLE_WINDOW_S:
                recent = elapsed < 2 * THROTTLE_WINDOW_S
                previous_calls = calls - calls_at_start if recent else 0.0
                previous_throttled = throttled if recent else 0.0
                # The window starts with the throttled call itself (already counted).
                start, calls_at_start, throttled, elapsed = now, max(0.0, calls - 1), 0.0, 0.0
            throttled += 1.0
            state[:] = [start, calls_at_start, throttled, previous_calls, previous_throttled]
            overlap = max(0.0, 1.0 - elapsed / THROTTLE_WINDOW_S)
            answers = calls - calls_at_start + previous_calls * overlap
            if answers < THROTTLE_MIN_CALLS:
                return 0.0
            return min(1.0, (throttled + previous_throttled * overlap) / answers)

    def cool_down(self, until: float) -> None:
        """Hold calls until ``until``; never shortens a cooldown already running."""
        with self._lock:
            self.cooldown_until = max(self.cooldown_until, until)


class RuntimeServices(Protocol):
    """What a route needs of the runtime (``otel_raptor.runtime.state.Runtime``)."""

    def note_failure(self, service: str, category: str) -> int: ...

    def withdraw(self, downstream: Downstream, now: float) -> bool: ...

    def should_retry(self, service: str, category: str, strategy: Strategy) -> bool: ...

    def record_outcome(
        self, service: str, category: str, strategy: Strategy, *, recovered: bool
    ) -> None: ...

    def publish(self, event: Event) -> None: ...


class Route:
    """One kind of call to a downstream: the attempt loop's port (see the module docstring).

    ``breaker`` is ``None`` for calls that no breaker guards. ``critical`` raises the severity
    of the failures by one level. ``classifier`` classifies failures (its context carries the
    service, ``critical``, whether the breaker is open, and repeats in the last minute).
    """

    __slots__ = ("_classifier", "_runtime", "breaker", "critical", "downstream", "service")

    def __init__(
        self,
        downstream: Downstream,
        breaker: CircuitBreaker | None,
        runtime: RuntimeServices,
        classifier: ClassifyFunction,
        *,
        critical: bool = False,
    ) -> None:
        self.service = downstream.service
        self.downstream = downstream
        self.breaker = breaker
        self.critical = critical
        self._runtime = runtime
        self._classifier = classifier

    # --- the fast path's question ---------------------------------------------------------------

    def ready(self, now: float) -> bool:
        """Whether a call may skip the loop at ``now``: the breaker is closed (or absent) and
        the downstream is not cooling down. Lock-free."""
        breaker = self.breaker
        return (
            breaker is None or breaker._core._state is _CLOSED
        ) and now >= self.downstream.cooldown_until

    # --- classification -------------------------------------------------------------------------

    def classify(self, error: BaseException) -> Classification:
        """``error`` classified in this route's context; repeats of its category at this
        service in the last minute raise its severity."""
        breaker = self.breaker
        context = ClassifyContext(
            service=self.service,
            critical=self.critical,
            breaker_open=breaker is not None and breaker.state is not _CLOSED,
        )
        classification = self._classifier(error, context=context)
        recent = self._runtime.note_failure(self.service, classification.category.value)
        if recent >= REPEAT_THRESHOLD:
            classification = self._classifier(
                error, context=replace(context, recent_occurrences=recent)
            )
        return classification

    # --- DownstreamPort -------------------------------------------------------------------------

    @property
    def cooldown_until(self) -> float:
        return self.downstream.cooldown_until

    @property
    def breaker_open(self) -> bool:
        breaker = self.breaker
        return breaker is not None and breaker._core._state is not _CLOSED

    def acquire(self, now: float) -> Permit:
        breaker = self.breaker
        return _CALL if breaker is None else breaker.acquire(now)

    def reject(self, now: float) -> Refusal:
        breaker = self.breaker
        if breaker is None:  # only a breaker refuses; kept total for the protocol
            return Refusal(RefusalKind.CIRCUIT_OPEN, self.service, 0.0)
        return Refusal(RefusalKind.CIRCUIT_OPEN, breaker.name, breaker.reject(now))

    def record_call(self) -> None:
        self.downstream.budget._calls += 1  # RetryBudget.record_call, inlined

    def record_success(self, permit: Permit, now: float, duration: float) -> None:
        breaker = self.breaker
        if breaker is None or not breaker.judging:
            return  # nothing to judge: see CircuitBreaker.stop_judging
        try:
            breaker.record_success(permit, duration, now)
        except Exception as bug:  # noqa: BLE001 - the call's success stands
            # Counting its failures without its successes, it would open on a downstream
            # that answers (rule 0).
            report_internal_error("breaker.record_success", bug)
            breaker.stop_judging()

    def record_failure(
        self,
        permit: Permit,
        now: float,
        duration: float,
        category: ErrorCategory,
        *,
        retry: bool = False,
        live_refusal: bool = False,
        unconfirmed: bool = False,
        opened_at: float | None = None,
    ) -> None:
        breaker = self.breaker
        if breaker is not None:
            breaker.record_failure(
                permit,
                duration,
                category,
                now,
                retry=retry,
                live_refusal=live_refusal,
                unconfirmed=unconfirmed,
                opened_at=opened_at,
            )

    def release(self, permit: Permit) -> None:
        breaker = self.breaker
        if breaker is not None:
            breaker.release(permit)

    def withdraw(self, now: float) -> bool:
        return self._runtime.withdraw(self.downstream, now)

    def refund(self) -> None:
        self.downstream.refund()

    def cool_down(self, until: float) -> None:
        self.downstream.cool_down(until)

    def throttled(self, now: float) -> float:
        return self.downstream.throttled(now)

    def should_retry(self, category: str, strategy: Strategy, now: float) -> bool:
        return self._runtime.should_retry(self.service, category, strategy)

    def record_outcome(
        self, category: str, strategy: Strategy, *, recovered: bool, now: float
    ) -> None:
        self._runtime.record_outcome(self.service, category, strategy, recovered=recovered)

    def publish(self, event: Event) -> None:
        self._runtime.publish(event)


#: A function that turns a refusal into the exception to raise (library-flavoured).
RefusalFactory = Callable[[Refusal], BaseException]
