"""Retry policy: backoff rules and the one decision ``RetryPolicy.decide``.

Everything here is pure. The caller passes in the number of attempts made so far, the seconds
elapsed since the first attempt started and a random source; nothing reads a clock or sleeps.

``decide`` answers one question after a failed attempt: retry after ``delay`` seconds, or give
up, and why. The order of its checks (the first that applies wins):

1. ``cancelled``: the failure is a cancellation;
2. ``not_retryable``: the classification says it is not transient, or its category is not in
   ``retry_on``;
3. ``not_replay_safe``: the operation may not be repeated;
4. ``attempts_exhausted``: ``max_retries`` retries have been made already;
5. the delay is the jittered exponential backoff, raised to the server's ``Retry-After`` when
   there is one (never below it);
6. ``retry_after_too_long``: the server asks for more than :attr:`RetryPolicy.retry_after_limit`;
7. ``retry_after_beyond_deadline``: the server's ``Retry-After`` ends at or after the deadline;
8. ``deadline``: the delayed attempt could not start before the deadline.

The retry budget is not consulted here: the attempt loop (:mod:`otel_raptor.core.attempts`)
withdraws a token after a ``Retry``.
See ``docs/retries.md``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Literal, TypeAlias

from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.numbers import MAX_SECONDS_TEXT, as_finite, as_seconds
from otel_raptor.errors import ConfigError

__all__ = [
    "Backoff",
    "Decision",
    "ExponentialBackoff",
    "FixedBackoff",
    "GiveUp",
    "GiveUpReason",
    "JitterMode",
    "Retry",
    "RETRY_AFTER_FLOOR_S",
    "RetryPolicy",
    "adjusted_timeout",
]

#: How a backoff delay ``d`` is randomised, ``r`` being ``rnd()`` in ``[0, 1)``:
#: ``full`` → ``d * r`` (uniform in ``[0, d)``, the AWS "full jitter");
#: ``equal`` → ``d/2 + d/2 * r`` (uniform in ``[d/2, d)``); ``none`` → ``d``.
JitterMode = Literal["full", "equal", "none"]

#: With ``max_retry_after`` unset, the longest ``Retry-After`` waited out is the larger of
#: ``max_delay`` and this: a policy with sub-second backoff still waits a server's "1" (it
#: speaks in whole seconds), and none waits a server's "86400". Small on purpose: a caller
#: that chose short delays gets a long pause as the server's answer, at once.
RETRY_AFTER_FLOOR_S: Final = 5.0

_JITTER_MODES: frozenset[str] = frozenset({"full", "equal", "none"})
_JITTER_ALLOWED = "one of 'full', 'equal', 'none'"
_DELAY_ALLOWED = f"a number of seconds >= 0 and <= {MAX_SECONDS_TEXT}"

#: The smallest timeout handed out, in seconds. A timeout of 0 means "non-blocking" to a
#: socket, which would turn a nearly expired deadline into an instant, confusing failure.
_MIN_TIMEOUT = 0.001


def _is_number(value: object) -> bool:
    # bool is an int, but ``max_delay=True`` is a bug, not a number.
    return as_finite(value) is not None


def _finite(key: str, value: object, allowed: str) -> float:
    number = as_finite(value)
    if number is None:
        raise ConfigError(key, value, allowed)
    return number


def _seconds(key: str, value: object, allowed: str, *, zero_ok: bool = True) -> float:
    seconds = as_seconds(value, zero_ok=zero_ok)
    if seconds is None:
        raise ConfigError(key, value, allowed)
    return seconds


def _check_jitter(key: str, value: object) -> None:
    # A list is unhashable: ask its type before the set.
    if not isinstance(value, str) or value not in _JITTER_MODES:
        raise ConfigError(key, value, _JITTER_ALLOWED)


def _exponential(attempt: int, base: float, multiplier: float, cap: float) -> float:
    """``min(cap, base * multiplier ** (attempt - 1))`` without overflowing."""
    try:
        delay = base * multiplier ** (attempt - 1)
    except OverflowError:
        # Float ``**`` raises instead of returning inf; any overflow is far above the cap.
        return cap
    return cap if delay > cap else delay


def _jittered(delay: float, jitter: str, rnd: Callable[[], float]) -> float:
    if jitter == "full":
        return delay * rnd()
    if jitter == "equal":
        half = delay * 0.5
        return half + half * rnd()
    return delay


class Backoff:
    """A backoff rule: the delay before retry number ``attempt``.

    ``attempt`` counts retries from 1 (the first retry, made after the first attempt failed).
    ``rnd`` returns a float in ``[0, 1)``, like :func:`random.random`. Subclasses are frozen
    dataclasses with this one method.
    """

    __slots__ = ()

    def delay(self, attempt: int, rnd: Callable[[], float]) -> float:
        """Seconds to wait before retry ``attempt`` (>= 1); always >= 0."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class ExponentialBackoff(Backoff):
    """``min(max, base * multiplier ** (attempt - 1))``, then jittered.

    ``base``: seconds before the first retry, >= 0, default 1.0. ``multiplier``: growth per
    retry, >= 1, default 2.0. ``max``: cap in seconds applied *before* jitter, >= ``base``,
    default 300.0. ``jitter``: see :data:`JitterMode`, default ``"full"``.
    """

    base: float = 1.0
    multiplier: float = 2.0
    max: float = 300.0
    jitter: JitterMode = "full"

    def __post_init__(self) -> None:
        base = _seconds("backoff.base", self.base, _DELAY_ALLOWED)
        multiplier = _finite("backoff.multiplier", self.multiplier, "a finite number >= 1")
        if multiplier < 1.0:
            raise ConfigError("backoff.multiplier", self.multiplier, "a finite number >= 1")
        cap_allowed = f"a number of seconds >= backoff.base ({base}) and <= {MAX_SECONDS_TEXT}"
        cap = _seconds("backoff.max", self.max, cap_allowed)
        if cap < base:
            raise ConfigError("backoff.max", self.max, cap_allowed)
        _check_jitter("backoff.jitter", self.jitter)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "multiplier", multiplier)
        object.__setattr__(self, "max", cap)

    def delay(self, attempt: int, rnd: Callable[[], float]) -> float:
        return _jittered(
            _exponential(attempt, self.base, self.multiplier, self.max), self.jitter, rnd
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedBackoff(Backoff):
    """The same ``seconds`` (>= 0, default 1.0) before every retry, jittered (default none)."""

    seconds: float = 1.0
    jitter: JitterMode = "none"

    def __post_init__(self) -> None:
        seconds = _seconds("backoff.seconds", self.seconds, _DELAY_ALLOWED)
        _check_jitter("backoff.jitter", self.jitter)
        object.__setattr__(self, "seconds", seconds)

    def delay(self, attempt: int, rnd: Callable[[], float]) -> float:
        return _jittered(self.seconds, self.jitter, rnd)


class GiveUpReason(str, enum.Enum):
    """Why recovery stopped. The values are event and metric attribute values."""

    NOT_RETRYABLE = "not_retryable"
    NOT_REPLAY_SAFE = "not_replay_safe"
    CANCELLED = "cancelled"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    #: The next attempt, after its backoff delay, could not start before the deadline.
    DEADLINE = "deadline"
    #: The server's ``Retry-After`` ends at or after the deadline: give up now, don't sleep.
    RETRY_AFTER_BEYOND_DEADLINE = "retry_after_beyond_deadline"
    #: The server's ``Retry-After`` exceeds ``max_retry_after`` (or is not finite).
    RETRY_AFTER_TOO_LONG = "retry_after_too_long"
    #: The downstream's retry budget is empty (decided by the attempt loop, never by ``decide``).
    BUDGET_EXHAUSTED = "budget_exhausted"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry after ``delay`` seconds (>= 0)."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop retrying, for ``reason``. Use :meth:`of` for the shared, preallocated instance."""

    reason: GiveUpReason

    @staticmethod
    def of(reason: GiveUpReason) -> GiveUp:
        """The preallocated ``GiveUp`` for ``reason`` (giving up allocates nothing)."""
        return _GIVE_UPS[reason]


#: What :meth:`RetryPolicy.decide` returns.
Decision: TypeAlias = Retry | GiveUp

_GIVE_UPS: dict[GiveUpReason, GiveUp] = {reason: GiveUp(reason) for reason in GiveUpReason}
_CANCELLED = _GIVE_UPS[GiveUpReason.CANCELLED]
_NOT_RETRYABLE = _GIVE_UPS[GiveUpReason.NOT_RETRYABLE]
_NOT_REPLAY_SAFE = _GIVE_UPS[GiveUpReason.NOT_REPLAY_SAFE]
_ATTEMPTS_EXHAUSTED = _GIVE_UPS[GiveUpReason.ATTEMPTS_EXHAUSTED]
_DEADLINE = _GIVE_UPS[GiveUpReason.DEADLINE]
_RETRY_AFTER_BEYOND_DEADLINE = _GIVE_UPS[GiveUpReason.RETRY_AFTER_BEYOND_DEADLINE]
_RETRY_AFTER_TOO_LONG = _GIVE_UPS[GiveUpReason.RETRY_AFTER_TOO_LONG]
_CATEGORY_CANCELLED = ErrorCategory.CANCELLED


def _categories(value: object) -> frozenset[ErrorCategory]:
    allowed = "None, or a non-empty set of ErrorCategory (or their string values)"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError("retry.retry_on", value, allowed)
    result: set[ErrorCategory] = set()
    for item in value:
        try:
            result.add(ErrorCategory(item))
        except ValueError:
            raise ConfigError("retry.retry_on", value, allowed) from None
    if not result:
        raise ConfigError("retry.retry_on", value, allowed)
    return frozenset(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how long to wait before repeating a failed operation.

    Fields (seconds everywhere):

    - ``max_retries``: retries after the first attempt, int >= 0, default 4 (so at most 5
      attempts); 0 disables retries. Four, not the usual three: at 30 % transient failures
      three retries cap success at 1 - 0.3**4 = 99.2 %, four reach 99.8 %, for 0.6 % more
      requests (a retry that keeps failing still drains the retry budget).
    - ``base_delay``: backoff before the first retry, >= 0, default 1.0.
    - ``max_delay``: cap on the backoff before jitter, >= ``base_delay``, default 300.0. It does
      not shorten a server's ``Retry-After`` (see ``max_retry_after``).
    - ``backoff_multiplier``: growth per retry, >= 1, default 2.0.
    - ``jitter``: ``"full"`` (default), ``"equal"`` or ``"none"``; see :data:`JitterMode`.
    - ``attempt_timeout``: timeout of each attempt, > 0, or ``None`` (default, none).
    - ``deadline``: overall limit counted from the start of the first attempt, > 0, or
      ``None`` (default, none). No attempt starts at or after it.
    - ``retry_on``: ``None`` (default) retries whatever the classification calls retryable;
      a set of categories retries only failures that are retryable *and* in the set.
    - ``respect_retry_after``: wait at least the server's ``Retry-After``, default ``True``.
    - ``max_retry_after``: give up when the server asks for a longer wait than this, > 0, or
      ``None`` (default: the larger of ``max_delay`` and 5 s, :attr:`retry_after_limit`).
    - ``cooldown_share``: when a rate-limit answer (429) carries a ``Retry-After``, the retry
      of that call always waits it out; the pause becomes the whole downstream's *cooldown*
      (every call to it waits, or is refused when the wait does not fit its ``max_retry_after``,
      else ``max_delay``, and deadline) once at least this share of the downstream's recent
      attempts were throttled, in [0, 1], default 0.5. ``0`` pauses every call on the first 429;
      ``1`` only when (nearly) every call is throttled. A server throttling a quarter of the
      calls is asking those calls to wait, not the whole client to stop.

    Every field is validated when the policy is built; a bad value raises
    :class:`~otel_raptor.errors.ConfigError` with key ``retry.<field>``.
    """

    max_retries: int = 4
    base_delay: float = 1.0
    max_delay: float = 300.0
    backoff_multiplier: float = 2.0
    jitter: JitterMode = "full"
    attempt_timeout: float | None = None
    deadline: float | None = None
    retry_on: frozenset[ErrorCategory] | None = None
    respect_retry_after: bool = True
    max_retry_after: float | None = None
    cooldown_share: float = 0.5

    #: A policy that never retries (``max_retries=0``, other fields at their defaults).
    NONE: ClassVar[RetryPolicy]

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        max_retries: object = self.max_retries  # typed int, but callers pass anything
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ConfigError("retry.max_retries", max_retries, "an int >= 0")
        base = _seconds("retry.base_delay", self.base_delay, _DELAY_ALLOWED)
        setattr_(self, "base_delay", base)
        cap_allowed = f"a number of seconds >= retry.base_delay ({base}) and <= {MAX_SECONDS_TEXT}"
        cap = _seconds("retry.max_delay", self.max_delay, cap_allowed)
        if cap < base:
            raise ConfigError("retry.max_delay", self.max_delay, cap_allowed)
        setattr_(self, "max_delay", cap)
        multiplier = _finite(
            "retry.backoff_multiplier", self.backoff_multiplier, "a finite number >= 1"
        )
        if multiplier < 1.0:
            raise ConfigError(
                "retry.backoff_multiplier", self.backoff_multiplier, "a finite number >= 1"
            )
        setattr_(self, "backoff_multiplier", multiplier)
        _check_jitter("retry.jitter", self.jitter)  # a Literal, but callers pass anything
        for name in ("attempt_timeout", "deadline", "max_retry_after"):
            value = getattr(self, name)
            if value is not None:
                allowed = f"a number of seconds > 0 and <= {MAX_SECONDS_TEXT}, or None"
                seconds = _seconds(f"retry.{name}", value, allowed, zero_ok=False)
                setattr_(self, name, seconds)
        if self.retry_on is not None:
            setattr_(self, "retry_on", _categories(self.retry_on))
        respect: object = self.respect_retry_after
        if not isinstance(respect, bool):
            raise ConfigError("retry.respect_retry_after", respect, "a bool")
        share = _finite("retry.cooldown_share", self.cooldown_share, "a number in [0, 1]")
        if not 0.0 <= share <= 1.0:
            raise ConfigError("retry.cooldown_share", self.cooldown_share, "a number in [0, 1]")
        setattr_(self, "cooldown_share", share)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> RetryPolicy:
        """Build a policy from a dict such as the seed's ``RECOVERY_CONFIG``.

        Keys are the field names (``max_retries``, ``base_delay``, ``max_delay``,
        ``backoff_multiplier``, ``jitter``, ``attempt_timeout``, ``deadline``, ``retry_on``,
        ``respect_retry_after``, ``max_retry_after``, ``cooldown_share``); missing keys take
        their defaults.
        ``retry_on`` may list category strings. An unknown key raises ``ConfigError``
        naming the allowed keys.
        """
        allowed = _FIELD_NAMES
        for key in mapping:
            if key not in allowed:
                raise ConfigError(
                    f"retry.{key}", mapping[key], f"a known key, one of {', '.join(allowed)}"
                )
        values: dict[str, Any] = dict(mapping)  # Any: each value is validated by __post_init__
        return cls(**values)

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """The shared policy that never retries (:attr:`NONE`)."""
        return cls.NONE

    @property
    def backoff(self) -> ExponentialBackoff:
        """This policy's backoff rule as a value (for inspection; ``decide`` inlines it)."""
        return ExponentialBackoff(
            base=self.base_delay,
            multiplier=self.backoff_multiplier,
            max=self.max_delay,
            jitter=self.jitter,
        )

    def decide(
        self,
        *,
        attempt: int,
        elapsed: float,
        classification: Classification,
        replay_safe: bool,
        rnd: Callable[[], float],
    ) -> Decision:
        """Retry after a delay, or give up, after attempt number ``attempt`` failed.

        ``attempt`` is the number of attempts made so far (>= 1); ``elapsed`` the seconds
        since the first attempt started; ``replay_safe`` whether repeating the operation is
        safe; ``rnd`` a random source in ``[0, 1)``. The checks run in the order given in the
        module docstring. A :class:`GiveUp` is a shared instance (no allocation).

        The delay never undercuts a respected ``Retry-After``: jitter applies to the backoff
        only, and the larger of the two is used. A returned ``Retry`` always satisfies
        ``elapsed + delay < deadline`` when a deadline is set.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts attempts made so far and is >= 1, got {attempt}")
        category = classification.category
        if category is _CATEGORY_CANCELLED:
            return _CANCELLED
        retry_on = self.retry_on
        if not classification.retryable or (retry_on is not None and category not in retry_on):
            return _NOT_RETRYABLE
        if not replay_safe:
            return _NOT_REPLAY_SAFE
        if attempt > self.max_retries:
            return _ATTEMPTS_EXHAUSTED
        delay = _jittered(
            _exponential(attempt, self.base_delay, self.backoff_multiplier, self.max_delay),
            self.jitter,
            rnd,
        )
        deadline = self.deadline
        retry_after = classification.retry_after
        if retry_after is not None and self.respect_retry_after:
            if not retry_after <= self.retry_after_limit:  # also refuses nan and inf
                return _RETRY_AFTER_TOO_LONG
            if deadline is not None and elapsed + retry_after >= deadline:
                return _RETRY_AFTER_BEYOND_DEADLINE
            delay = max(delay, retry_after)
        if deadline is not None and elapsed + delay >= deadline:
            return _DEADLINE
        return Retry(delay)

    @property
    def retry_after_limit(self) -> float:
        """The longest server-requested wait (``Retry-After``, a cooldown) a call waits out:
        ``max_retry_after``, else the larger of ``max_delay`` and ``RETRY_AFTER_FLOOR_S``.
        Never unbounded: a server asking for a day must not hold a caller for a day."""
        limit = self.max_retry_after
        return max(self.max_delay, RETRY_AFTER_FLOOR_S) if limit is None else limit

    def timeout_for_attempt(self, attempt: int, elapsed: float) -> float | None:
        """The timeout for attempt number ``attempt`` (1 = the first), in seconds.

        ``attempt_timeout`` bounded by what remains of the deadline at ``elapsed`` seconds
        after the first attempt started; ``None`` when neither is set. Never below 1 ms, since
        a zero timeout means "non-blocking" to sockets. ``attempt`` does not change the base
        rule today (see :func:`adjusted_timeout` for the lengthening one).
        """
        timeout = self.attempt_timeout
        deadline = self.deadline
        if deadline is None:
            return timeout
        remaining = deadline - elapsed
        if timeout is None or remaining < timeout:
            timeout = remaining
        return timeout if timeout > _MIN_TIMEOUT else _MIN_TIMEOUT


RetryPolicy.NONE = RetryPolicy(max_retries=0)

_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RetryPolicy))


def adjusted_timeout(
    base_timeout: float, attempt: int, *, factor: float = 1.5, cap: float | None = None
) -> float:
    """The ``timeout_adjust`` strategy: a longer timeout for each retry after a timeout.

    ``base_timeout * factor ** attempt`` seconds, where ``attempt`` is the retry number
    (0 = the first attempt, which gets ``base_timeout``; 1 = the first retry). ``base_timeout``
    > 0; ``factor`` >= 1, default 1.5; ``cap`` (seconds, usually what remains of the deadline)
    bounds the result when given. Never below 1 ms.
    """
    if not _is_number(base_timeout) or not base_timeout > 0.0:
        raise ConfigError("timeout_adjust.base_timeout", base_timeout, "a number of seconds > 0")
    if not _is_number(factor) or not 1.0 <= factor < math.inf:
        raise ConfigError("timeout_adjust.factor", factor, "a finite number >= 1")
    try:
        timeout = base_timeout * factor ** max(0, attempt)
    except OverflowError:
        timeout = math.inf
    if cap is not None and timeout > cap:
        timeout = cap
    return timeout if timeout > _MIN_TIMEOUT else _MIN_TIMEOUT
