"""The attempt loop of one logical call, as a pure state machine (sans-IO).

Every entry point (``@resilient`` sync and async, ``Guard.call``/``call_async``, the recovery
engine, every integration) runs the same loop. The loop never calls the operation, sleeps,
reads a clock or raises: it is told what happened and answers with the next :class:`Step`,
and a driver (``otel_raptor.runtime.drive``: one sync, one async, a dozen lines each) does it::

    ATTEMPT   run the operation now; ``loop.timeout`` is its timeout (None: none)
    SLEEP     wait ``loop.delay`` seconds, then report ``loop.slept(now)``
    FALLBACK  call the fallback with the last error (or the refusal), then report
              ``loop.fallback_finished(ok=...)``, or ``loop.fallback_declined(now)`` when the
              fallback had nothing to offer (then GIVE_UP or REFUSE as without one)
    GIVE_UP   re-raise the last error (or return the last failing result) unchanged
    REFUSE    no attempt was made: raise the refusal (``loop.refusal``)
    DONE      the last attempt succeeded: return its result

The driver reports each attempt's end with ``succeeded(now)``, ``failed(classification,
now)`` or ``cancelled()``. A successful call through a closed breaker never builds a loop:
drivers take a fast path and build one only when a call needs something the fast path does
not do (the breaker is not closed, the downstream is cooling down, or the first attempt
failed).

What the loop decides, in order, after a failed attempt (see ``docs/retries.md``):

1. count the failure against the breaker (``DownstreamPort.record_failure``) and publish
   ``ErrorClassified``; a rate limit with a ``Retry-After``, once throttling is pervasive
   (``RetryPolicy.cooldown_share`` of the downstream's recent calls), starts the
   downstream's *cooldown*, which every later call to it honours;
2. ``RetryPolicy.decide``: retry after a delay, or give up (not retryable, not replay
   safe, attempts or deadline exhausted, ``Retry-After`` too long);
3. the strategy learner may declare retries of this failure futile here;
4. the retry budget must have a token (a retry that then succeeds gives it back);
5. publish ``RetryScheduled`` and SLEEP. After the sleep: wait out a cooldown that another
   call started meanwhile (if it fits), and ask the breaker again; a breaker that opened
   meanwhile ends the call with its last error.

When it gives up with a fallback configured, the step is FALLBACK; its outcome is published
once the driver reports it. Every path publishes exactly one ``RecoveryFinished``, except a
cancelled call (abandoned, not failed) and a call that succeeded without ever failing.

Waiting for a cooldown at the start of a call (before the first attempt) happens when the
wait fits both ``RetryPolicy.retry_after_limit`` and the deadline; otherwise the call is
refused at once with a ``THROTTLED`` refusal, which integrations turn into the
library's own rate-limit answer (HTTP: a ``429`` response).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Protocol

from otel_raptor.core.breaker import Permit
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.events import (
    ErrorClassified,
    Event,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome, Strategy, default_strategy
from otel_raptor.core.retry import GiveUp, GiveUpReason, RetryPolicy, adjusted_timeout

__all__ = [
    "AttemptLoop",
    "DownstreamPort",
    "LoopSpec",
    "Refusal",
    "RefusalKind",
    "Step",
]


class Step(enum.IntEnum):
    """What the driver does next (see the module docstring)."""

    ATTEMPT = 1
    SLEEP = 2
    FALLBACK = 3
    GIVE_UP = 4
    REFUSE = 5
    #: The attempt succeeded: return its result (the answer of ``succeeded``).
    DONE = 6


class RefusalKind(str, enum.Enum):
    """Why a call was refused without an attempt."""

    #: The downstream's circuit breaker is open (or its half-open probes are all taken).
    CIRCUIT_OPEN = "circuit_open"
    #: The downstream asked for a pause (``Retry-After``) longer than this call may wait.
    THROTTLED = "throttled"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call refused without an attempt: why, which downstream (or breaker), and the seconds
    until a call would be admitted (``None`` for a breaker held open by hand)."""

    kind: RefusalKind
    name: str
    retry_after: float | None


class DownstreamPort(Protocol):
    """What the loop needs of a downstream's shared state (breaker, retry budget, cooldown,
    strategy learner, event bus). The runtime implements it with locks and a clock; tests
    with plain objects. ``now`` is always the driver's monotonic time."""

    @property
    def service(self) -> str: ...

    @property
    def cooldown_until(self) -> float:
        """Monotonic time before which the downstream asked not to be called."""
        ...

    @property
    def breaker_open(self) -> bool:
        """Whether the breaker is not CLOSED (it raises the severity of failures)."""
        ...

    def record_call(self) -> None:
        """Count one logical call (its first attempt) towards the retry budget's deposits."""
        ...

    def acquire(self, now: float) -> Permit: ...

    def reject(self, now: float) -> Refusal:
        """The refusal for a call the breaker did not admit (publishes ``CallRejected``)."""
        ...

    def record_success(self, permit: Permit, now: float, duration: float) -> None: ...

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
    ) -> None: ...

    def release(self, permit: Permit) -> None: ...

    def withdraw(self, now: float) -> bool:
        """Take one retry token; ``False`` when the retry budget is empty."""
        ...

    def refund(self) -> None:
        """Give back the token of a retry that succeeded."""
        ...

    def cool_down(self, until: float) -> None:
        """Hold calls until ``until`` (never shortens a cooldown already running)."""
        ...

    def throttled(self, now: float) -> float:
        """Count one throttled answer (a rate limit) at ``now``; return the share of the
        downstream's recent calls that were throttled (0 to 1)."""
        ...

    def should_retry(self, category: str, strategy: Strategy, now: float) -> bool: ...

    def record_outcome(
        self, category: str, strategy: Strategy, *, recovered: bool, now: float
    ) -> None: ...

    def publish(self, event: Event) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopSpec:
    """The fixed part of a loop, built once per guard (or per integration policy).

    ``replay_safe``: the operation may be repeated. ``has_fallback``: give-ups and refusals go
    to the fallback. ``fixed_strategy``: the recovery engine's chosen strategy, reported
    instead of the per-failure default. ``learner_asked``: whoever built the loop asked the
    learner whether the first retry is worth it (the engine, choosing its strategy), so the
    loop does not ask again: that would spend the probe the learner grants now and then.
    ``force_retryable``: the first failure is retried even when it is not retryable as it
    stands (the recovery engine refreshed credentials after a 401). ``first_timeout`` is the
    first attempt's timeout (``policy.timeout_for_attempt(1, 0)``), precomputed for the fast
    path.

    Each attempt's timeout is the policy's (``attempt_timeout`` bounded by what is left of the
    ``deadline``); after a timeout, the ``timeout_adjust`` strategy lengthens it
    (:func:`~otel_raptor.core.retry.adjusted_timeout`). Drivers apply it where they can.
    """

    policy: RetryPolicy
    replay_safe: bool = True
    has_fallback: bool = False
    fixed_strategy: Strategy | None = None
    learner_asked: bool = False
    force_retryable: bool = False
    first_timeout: float | None = None

    @classmethod
    def of(
        cls,
        policy: RetryPolicy,
        *,
        replay_safe: bool = True,
        has_fallback: bool = False,
        fixed_strategy: Strategy | None = None,
        learner_asked: bool = False,
        force_retryable: bool = False,
    ) -> LoopSpec:
        return cls(
            policy=policy,
            replay_safe=replay_safe,
            has_fallback=has_fallback,
            fixed_strategy=fixed_strategy,
            learner_asked=learner_asked,
            force_retryable=force_retryable,
            first_timeout=policy.timeout_for_attempt(1, 0.0),
        )


_ATTEMPT: Final = Step.ATTEMPT
_SLEEP: Final = Step.SLEEP
_FALLBACK: Final = Step.FALLBACK
_GIVE_UP: Final = Step.GIVE_UP
_REFUSE: Final = Step.REFUSE
_DONE: Final = Step.DONE
_REJECTED: Final = Permit.REJECTED
_CALL: Final = Permit.CALL
_RATE_LIMIT: Final = ErrorCategory.RATE_LIMIT
_BREAKER_REJECTED: Final = "breaker_rejected"
_LEARNED_FUTILE: Final = "learned_futile"
_THROTTLED: Final = "throttled"
_DEADLINE: Final = GiveUpReason.DEADLINE.value
#: A sync call on an event loop's thread, which the driver may not make wait (see
#: ``AttemptLoop.cannot_wait``).
_EVENT_LOOP: Final = "event_loop"
#: Give-ups that cut a strategy short by the policy's choice (the downstream's cooldown, the
#: server's Retry-After longer than the caller will wait, the learner's own verdict): they
#: say nothing of whether the strategy works, and teaching the learner with them would let a
#: throttled or futile-judged downstream talk it out of retrying.
_NOT_A_VERDICT: Final = frozenset(
    {
        _THROTTLED,
        _LEARNED_FUTILE,
        GiveUpReason.RETRY_AFTER_TOO_LONG.value,
        GiveUpReason.RETRY_AFTER_BEYOND_DEADLINE.value,
        GiveUpReason.BUDGET_EXHAUSTED.value,
        _EVENT_LOOP,
    }
)


class AttemptLoop:
    """The state of one logical call once it needs more than the fast path.

    ``started`` is when the call began (monotonic seconds): the first attempt's start, or the
    moment the call was first admitted. Build it, then either ``admit(now)`` (no attempt made
    yet) or ``first_failed(permit, attempt_started, classification, now)`` (the fast path's
    attempt failed). ``rnd`` returns floats in ``[0, 1)`` for the backoff jitter.
    """

    __slots__ = (
        "_finished",
        "_permit",
        "_plain_strategy",
        "_port",
        "_rnd",
        "_spec",
        "attempt_started",
        "attempts",
        "classification",
        "delay",
        "give_up_reason",
        "outcome",
        "refusal",
        "started",
        "strategy",
        "timeout",
    )

    def __init__(
        self,
        spec: LoopSpec,
        port: DownstreamPort,
        *,
        started: float,
        rnd: Callable[[], float],
    ) -> None:
        self._spec = spec
        self._port = port
        self._rnd = rnd
        self._permit = _CALL
        self._finished = False
        self.started = started
        #: Attempts made so far (each ``succeeded``/``failed``/``cancelled`` ends one).
        self.attempts = 0
        self.attempt_started = started
        self.classification: Classification | None = None
        self.strategy = spec.fixed_strategy or Strategy.FAIL_FAST
        # The strategy to report if a fallback declines (it was FAILOVER only in hope).
        self._plain_strategy = self.strategy
        self.outcome = Outcome.FAILED
        self.give_up_reason = ""
        #: SLEEP's seconds.
        self.delay = 0.0
        #: ATTEMPT's timeout in seconds (``None``: none).
        self.timeout: float | None = spec.first_timeout
        #: REFUSE's (and a refused call's FALLBACK's) refusal.
        self.refusal: Refusal | None = None

    # --- starting ---------------------------------------------------------------------------

    def admit(self, now: float) -> Step:
        """Admit the first attempt at ``now`` (the fast path did not): wait out a cooldown if
        it fits, else refuse; ask the breaker; ATTEMPT, SLEEP, REFUSE or FALLBACK."""
        return self._admit(now)

    def first_failed(
        self,
        permit: Permit,
        attempt_started: float,
        classification: Classification,
        now: float,
        *,
        error: BaseException | None = None,
        replay_safe: bool | None = None,
    ) -> Step:
        """The fast path's first attempt, admitted with ``permit`` at ``attempt_started``,
        failed at ``now`` (``error`` and ``replay_safe`` as for :meth:`failed`)."""
        self._permit = permit
        self.attempt_started = attempt_started
        self._port.record_call()
        return self.failed(classification, now, error=error, replay_safe=replay_safe)

    # --- the end of an attempt ----------------------------------------------------------------

    def succeeded(self, now: float) -> Step:
        """The attempt in flight succeeded at ``now``: the call is over (DONE)."""
        port = self._port
        self.attempts += 1
        port.record_success(self._permit, now, now - self.attempt_started)
        self._permit = _CALL  # the probe's slot, if it held one, is given back
        if self.classification is None:
            return _DONE  # nothing had failed: a call that only waited (cooldown, half-open)
        if self.attempts > 1:
            port.refund()  # a productive retry keeps its budget
        self.outcome = Outcome.RECOVERED
        self.give_up_reason = ""
        self._finish(now)
        return _DONE

    def failed(
        self,
        classification: Classification,
        now: float,
        *,
        error: BaseException | None = None,
        replay_safe: bool | None = None,
    ) -> Step:
        """The attempt in flight failed at ``now`` with ``classification``; ``error`` (the
        exception, if any) rides on ``ErrorClassified`` for the error analytics.

        ``replay_safe`` narrows the spec's replay safety for this failure only: an integration
        that judges it per failure (a database statement the server rolled back may be sent
        again, one whose outcome the failure leaves unknown may not) passes its verdict here.
        ``None`` keeps the spec's; it can never make an unsafe spec safe."""
        port = self._port
        spec = self._spec
        self.attempts += 1
        attempts = self.attempts
        category = classification.category
        port.record_failure(
            self._permit,
            now,
            now - self.attempt_started,
            category,
            retry=attempts > 1,
            live_refusal=classification.live_refusal,
            unconfirmed=classification.unconfirmed,
            opened_at=classification.opened_at,
        )
        self._permit = _CALL
        self.classification = classification
        port.publish(ErrorClassified(port.service, classification, attempts, error))
        if category is _RATE_LIMIT:
            # Every throttle counts towards the share; one with a Retry-After may pause all.
            share = port.throttled(now)
            retry_after = classification.retry_after
            # A policy that ignores Retry-After (``respect_retry_after=False``) ignores it
            # here too: its own 429s must not pause the downstream (its next calls would wait
            # for the header, or be refused with ThrottledError).
            if (
                retry_after is not None
                and retry_after > 0.0
                and share >= spec.policy.cooldown_share
                and spec.policy.respect_retry_after
            ):
                port.cool_down(now + retry_after)
        value = category.value
        strategy = spec.fixed_strategy or default_strategy(
            value, retryable=classification.retryable
        )
        self.strategy = strategy
        if spec.force_retryable and attempts == 1 and not classification.retryable:
            classification = replace(classification, retryable=True)
        decision = spec.policy.decide(
            attempt=attempts,
            elapsed=now - self.started,
            classification=classification,
            replay_safe=spec.replay_safe
            if replay_safe is None
            else spec.replay_safe and replay_safe,
            rnd=self._rnd,
        )
        if isinstance(decision, GiveUp):
            if attempts == 1 and spec.fixed_strategy is None:
                self.strategy = Strategy.FAIL_FAST
            return self._give_up(decision.reason.value, now)
        if (attempts > 1 or not spec.learner_asked) and not port.should_retry(value, strategy, now):
            return self._give_up(_LEARNED_FUTILE, now)
        if not port.withdraw(now):
            self.outcome = Outcome.BUDGET_EXHAUSTED
            port.publish(RetryBudgetExhausted(port.service, classification))
            return self._give_up("budget_exhausted", now)
        port.publish(
            RetryScheduled(port.service, attempts, decision.delay, classification, strategy)
        )
        self.delay = decision.delay
        return _SLEEP

    def cancelled(self) -> Step:
        """The attempt in flight ended without a verdict (cancellation, ``KeyboardInterrupt``,
        ``SystemExit``): nothing is counted or retried, and nothing is published."""
        self._port.release(self._permit)
        self._permit = _CALL
        self._finished = True
        self.give_up_reason = "cancelled"
        return _GIVE_UP

    def abandon(self) -> None:
        """The driver stops reporting to the loop (a bug of ours turned it passive): give
        back the probe slot that the attempt in flight (or the last one) holds, if any, so
        that a half-open breaker is not left waiting for an outcome that never comes.
        Nothing is counted and nothing is published."""
        permit, self._permit = self._permit, _CALL
        self._finished = True
        self._port.release(permit)

    # --- between attempts -------------------------------------------------------------------

    def slept(self, now: float) -> Step:
        """The SLEEP ended at ``now``. A retry whose sleep overran the deadline (a busy event
        loop, a stalled process) is not made: no retry starts at or after the deadline."""
        deadline = self._spec.policy.deadline
        if self.attempts and deadline is not None and now - self.started >= deadline:
            return self._give_up(_DEADLINE, now)
        return self._admit(now)

    def cannot_wait(self, now: float) -> Step:
        """The driver may not wait out this SLEEP (a sync call made on an event loop's
        thread, where a sleep would stall every task of the loop): the call ends as it would
        without the wait. Before any attempt (a cooldown) it is refused, as a cooldown too
        long to wait is; after a failure it gives up with that failure, and the retry's
        token goes back to the budget (no retry is made)."""
        if not self.attempts:
            wait = max(0.0, self._port.cooldown_until - now)
            return self._refuse(Refusal(RefusalKind.THROTTLED, self._port.service, wait), now)
        self._port.refund()
        return self._give_up(_EVENT_LOOP, now)

    def fallback_finished(self, *, ok: bool, now: float) -> None:
        """The fallback returned (``ok``) or raised: publish how the call ended."""
        if ok:
            self.outcome = Outcome.FALLBACK
            self.give_up_reason = ""
        else:
            if self.outcome is not Outcome.BUDGET_EXHAUSTED:
                self.outcome = Outcome.FAILED
            self.give_up_reason = "fallback_failed"
        self._finish(now, refused=self._refused_before_trying())

    def fallback_declined(self, now: float) -> Step:
        """The fallback had nothing to offer: the call ends as it would have without one
        (GIVE_UP, or REFUSE when no attempt was made), and is reported so."""
        self.strategy = self._plain_strategy
        refused = self._refused_before_trying()
        self._finish(now, refused=refused)
        return _REFUSE if refused else _GIVE_UP

    def _refused_before_trying(self) -> bool:
        return self.refusal is not None and self.attempts == 0

    # --- internals ----------------------------------------------------------------------------

    def _admit(self, now: float) -> Step:
        port = self._port
        wait = port.cooldown_until - now
        if wait > 0.0:
            if self._may_wait(wait, now):
                self.delay = wait
                return _SLEEP
            return self._refuse(Refusal(RefusalKind.THROTTLED, port.service, wait), now)
        permit = port.acquire(now)
        if permit is _REJECTED:
            refusal = port.reject(now)
            if self.attempts:
                # The breaker opened while we were retrying: stop, and surface the app's own
                # last error rather than our refusal.
                self.outcome = Outcome.REJECTED
                return self._give_up(_BREAKER_REJECTED, now)
            return self._refuse(refusal, now)
        self._permit = permit
        self.attempt_started = now
        self.timeout = self._attempt_timeout(now)
        if not self.attempts:
            port.record_call()
        return _ATTEMPT

    def _may_wait(self, wait: float, now: float) -> bool:
        policy = self._spec.policy
        if wait > policy.retry_after_limit:
            return False
        deadline = policy.deadline
        return deadline is None or (now - self.started) + wait < deadline

    def _refuse(self, refusal: Refusal, now: float) -> Step:
        self.refusal = refusal
        if refusal.kind is RefusalKind.THROTTLED:
            self.give_up_reason = _THROTTLED
        else:
            self.give_up_reason = _BREAKER_REJECTED
        if self.attempts:
            # Throttled between retries: end with the app's last error, not a refusal.
            return self._give_up(self.give_up_reason, now)
        self.outcome = Outcome.REJECTED
        self.strategy = Strategy.FAIL_FAST
        if self._spec.has_fallback:
            self._plain_strategy = self.strategy
            self.strategy = Strategy.FAILOVER
            return _FALLBACK
        self._finish(now, refused=True)
        return _REFUSE

    def _give_up(self, reason: str, now: float) -> Step:
        self.give_up_reason = reason
        if self._spec.has_fallback:
            self._plain_strategy = self.strategy
            self.strategy = Strategy.FAILOVER
            return _FALLBACK
        self._finish(now)
        return _GIVE_UP

    def _attempt_timeout(self, now: float) -> float | None:
        policy = self._spec.policy
        elapsed = now - self.started
        timeout = policy.timeout_for_attempt(self.attempts + 1, elapsed)
        if (
            timeout is not None
            and self.strategy is Strategy.TIMEOUT_ADJUST
            and policy.attempt_timeout is not None
        ):
            deadline = policy.deadline
            cap = None if deadline is None else max(0.001, deadline - elapsed)
            timeout = adjusted_timeout(policy.attempt_timeout, self.attempts, cap=cap)
        return timeout

    def _finish(self, now: float, *, refused: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        port = self._port
        classification = self.classification
        if classification is None and not refused:
            return
        category = (
            classification.category.value
            if classification is not None
            else ErrorCategory.UNAVAILABLE.value
        )
        outcome = self.outcome
        if (
            self.attempts > 1
            and outcome in (Outcome.RECOVERED, Outcome.FAILED)
            and self.give_up_reason not in _NOT_A_VERDICT
        ):
            port.record_outcome(
                category, self.strategy, recovered=outcome is Outcome.RECOVERED, now=now
            )
        port.publish(
            RecoveryFinished(
                service=port.service,
                strategy=self.strategy,
                outcome=outcome,
                attempts=self.attempts,
                duration_s=max(0.0, now - self.started),
                category=category,
                give_up_reason=""
                if outcome in (Outcome.RECOVERED, Outcome.FALLBACK)
                else self.give_up_reason,
            )
        )
