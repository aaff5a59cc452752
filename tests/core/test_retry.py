from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.retry import (
    ExponentialBackoff,
    FixedBackoff,
    GiveUp,
    GiveUpReason,
    Retry,
    RetryPolicy,
    adjusted_timeout,
)
from otel_raptor.errors import ConfigError


def classified(
    category: ErrorCategory = ErrorCategory.CONNECTION,
    *,
    retryable: bool = True,
    retry_after: float | None = None,
) -> Classification:
    return Classification(
        category=category,
        severity=Severity.MEDIUM,
        retryable=retryable,
        error_type="X",
        retry_after=retry_after,
    )


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


HALF = fixed(0.5)


def never() -> float:
    raise AssertionError("rnd must not be called")


def decide(
    policy: RetryPolicy,
    *,
    attempt: int = 1,
    elapsed: float = 0.0,
    classification: Classification | None = None,
    replay_safe: bool = True,
    rnd: Callable[[], float] = HALF,
) -> Retry | GiveUp:
    return policy.decide(
        attempt=attempt,
        elapsed=elapsed,
        classification=classification or classified(),
        replay_safe=replay_safe,
        rnd=rnd,
    )


# ---------------------------------------------------------------- backoff rules


def test_exponential_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    rule = ExponentialBackoff(base=1.0, multiplier=2.0, max=10.0, jitter="none")
    assert [rule.delay(n, never) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_exponential_backoff_never_overflows() -> None:
    rule = ExponentialBackoff(base=1.0, multiplier=10.0, max=300.0, jitter="none")
    assert rule.delay(100_000, never) == 300.0


@pytest.mark.parametrize(
    ("jitter", "r", "expected"),
    [
        ("full", 0.0, 0.0),
        ("full", 0.25, 1.0),
        ("full", 0.999, 3.996),
        ("equal", 0.0, 2.0),
        ("equal", 0.5, 3.0),
        ("none", 0.7, 4.0),
    ],
)
def test_jitter_modes(jitter: str, r: float, expected: float) -> None:
    rule = ExponentialBackoff(base=1.0, multiplier=2.0, max=100.0, jitter=jitter)  # type: ignore[arg-type]
    assert rule.delay(3, fixed(r)) == pytest.approx(expected)  # 4 s before jitter


def test_fixed_backoff() -> None:
    assert FixedBackoff(seconds=2.5).delay(7, never) == 2.5
    assert FixedBackoff(seconds=2.0, jitter="equal").delay(1, fixed(0.5)) == 1.5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"base": -1.0}, "backoff.base"),
        ({"multiplier": 0.5}, "backoff.multiplier"),
        ({"base": 5.0, "max": 1.0}, "backoff.max"),
        ({"jitter": "decorrelated"}, "backoff.jitter"),
        ({"max": math.inf}, "backoff.max"),
        ({"max": 1e10}, "backoff.max"),  # a sleep that long overflows CPython's clock
        ({"base": 10**400}, "backoff.base"),  # beyond a float: not an OverflowError
        ({"jitter": ["full"]}, "backoff.jitter"),  # unhashable: not a TypeError
    ],
)
def test_backoff_validation(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ExponentialBackoff(**kwargs)  # type: ignore[arg-type]
    assert caught.value.key == key
    with pytest.raises(ConfigError, match=r"backoff\.seconds"):
        FixedBackoff(seconds=-0.1)


# ------------------------------------------------------------------ the policy


def test_defaults_are_the_seeds_but_four_retries() -> None:
    policy = RetryPolicy()
    # The seed retried 3 times; at 30 % transient failures that caps success at 99.2 %,
    # below issue 7's 99 % within noise. Four retries reach 99.8 % (docs/retries.md).
    assert policy.max_retries == 4
    assert 1 - 0.3 ** (policy.max_retries + 1) > 0.995
    assert (policy.base_delay, policy.max_delay) == (1.0, 300.0)
    assert (policy.backoff_multiplier, policy.jitter) == (2.0, "full")
    assert (policy.attempt_timeout, policy.deadline, policy.retry_on) == (None, None, None)
    assert policy.respect_retry_after is True
    assert policy.max_retry_after is None
    assert policy.backoff == ExponentialBackoff(base=1.0, multiplier=2.0, max=300.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("max_retries", True),
        ("base_delay", -0.1),
        ("base_delay", math.nan),
        ("base_delay", "1"),
        ("max_delay", 0.5),  # below base_delay=1.0
        ("max_delay", math.inf),
        ("backoff_multiplier", 0.9),
        ("jitter", "decorrelated"),
        ("jitter", ["full"]),
        ("jitter", {"mode": "full"}),
        ("base_delay", 10**400),
        ("max_delay", 1e10),
        ("backoff_multiplier", 10**400),
        ("attempt_timeout", 1e10),
        ("cooldown_share", 10**400),
        ("attempt_timeout", 0.0),
        ("attempt_timeout", -1.0),
        ("deadline", 0.0),
        ("deadline", math.inf),
        ("deadline", 10_000_001),
        ("max_retry_after", 1e10),
        ("retry_on", frozenset()),
        ("retry_on", "timeout"),
        ("retry_on", frozenset({"nonsense"})),
        ("respect_retry_after", 1),
        ("max_retry_after", 0.0),
    ],
)
def test_every_field_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        RetryPolicy(**{field: value})  # type: ignore[arg-type]
    assert caught.value.key == f"retry.{field}"
    assert caught.value.value is value


def test_numbers_are_normalised_and_retry_on_accepts_strings() -> None:
    policy = RetryPolicy(base_delay=0, max_delay=5, retry_on={"timeout", ErrorCategory.DNS})  # type: ignore[arg-type]
    assert isinstance(policy.base_delay, float)
    assert isinstance(policy.max_delay, float)
    assert policy.retry_on == frozenset({ErrorCategory.TIMEOUT, ErrorCategory.DNS})


def test_from_mapping_takes_the_seeds_keys_and_names_unknown_ones() -> None:
    policy = RetryPolicy.from_mapping(
        {"max_retries": 5, "base_delay": 0.5, "max_delay": 60.0, "backoff_multiplier": 3.0}
    )
    assert policy == RetryPolicy(
        max_retries=5, base_delay=0.5, max_delay=60.0, backoff_multiplier=3.0
    )
    assert RetryPolicy.from_mapping(
        {"retry_on": ["rate_limit"], "deadline": 30}
    ).retry_on == frozenset({ErrorCategory.RATE_LIMIT})
    with pytest.raises(ConfigError) as caught:
        RetryPolicy.from_mapping({"max_retries": 1, "retries": 2})
    assert caught.value.key == "retry.retries"
    assert "max_retries" in caught.value.allowed
    assert "max_retry_after" in caught.value.allowed
    with pytest.raises(ConfigError, match=r"retry\.max_delay"):
        RetryPolicy.from_mapping({"max_delay": -1})


def test_replace_revalidates_and_policies_pickle() -> None:
    policy = RetryPolicy(deadline=10.0)
    assert dataclasses.replace(policy, max_retries=0).max_retries == 0
    with pytest.raises(ConfigError, match=r"retry\.max_retries"):
        dataclasses.replace(policy, max_retries=-2)
    assert pickle.loads(pickle.dumps(policy)) == policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 9  # type: ignore[misc]


def test_the_disabled_policy_never_retries() -> None:
    assert RetryPolicy.disabled() is RetryPolicy.NONE
    assert RetryPolicy.NONE.max_retries == 0
    assert decide(RetryPolicy.NONE) is GiveUp.of(GiveUpReason.ATTEMPTS_EXHAUSTED)


# ----------------------------------------------------------------- the decision


def test_delays_follow_the_backoff_and_attempts_run_out() -> None:
    policy = RetryPolicy(max_retries=3, base_delay=1.0, jitter="none")
    decisions = [decide(policy, attempt=n, rnd=never) for n in (1, 2, 3, 4)]
    assert decisions == [
        Retry(1.0),
        Retry(2.0),
        Retry(4.0),
        GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED),
    ]


def test_full_jitter_scales_the_backoff() -> None:
    policy = RetryPolicy(base_delay=2.0)
    assert decide(policy, attempt=2, rnd=fixed(0.25)) == Retry(1.0)  # 4 s * 0.25


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        # cancellation wins over everything, even a (wrongly) retryable classification
        (
            {"classification": classified(ErrorCategory.CANCELLED, retryable=True)},
            GiveUpReason.CANCELLED,
        ),
        (
            {"classification": classified(ErrorCategory.CANCELLED), "replay_safe": False},
            GiveUpReason.CANCELLED,
        ),
        # not retryable beats not replay safe and exhausted attempts
        (
            {
                "classification": classified(ErrorCategory.CLIENT_ERROR, retryable=False),
                "replay_safe": False,
                "attempt": 99,
            },
            GiveUpReason.NOT_RETRYABLE,
        ),
        # not replay safe beats exhausted attempts
        ({"replay_safe": False, "attempt": 99}, GiveUpReason.NOT_REPLAY_SAFE),
        ({"attempt": 5}, GiveUpReason.ATTEMPTS_EXHAUSTED),
    ],
)
def test_the_order_of_the_checks(kwargs: dict[str, object], reason: GiveUpReason) -> None:
    assert decide(RetryPolicy(), **kwargs) is GiveUp.of(reason)  # type: ignore[arg-type]


def test_retry_on_narrows_but_never_widens() -> None:
    policy = RetryPolicy(retry_on=frozenset({ErrorCategory.TIMEOUT}))
    timeout = classified(ErrorCategory.TIMEOUT)
    assert isinstance(decide(policy, classification=timeout), Retry)
    assert decide(policy, classification=classified(ErrorCategory.CONNECTION)) is GiveUp.of(
        GiveUpReason.NOT_RETRYABLE
    )
    not_transient = classified(ErrorCategory.TIMEOUT, retryable=False)
    assert decide(policy, classification=not_transient) is GiveUp.of(GiveUpReason.NOT_RETRYABLE)


def test_give_ups_are_preallocated() -> None:
    first = decide(RetryPolicy(), replay_safe=False)
    second = decide(RetryPolicy(max_retries=7), replay_safe=False)
    assert first is second is GiveUp.of(GiveUpReason.NOT_REPLAY_SAFE)
    assert {GiveUp.of(r).reason for r in GiveUpReason} == set(GiveUpReason)
    assert str(GiveUpReason.DEADLINE) == "deadline"


def test_attempt_must_count_from_one() -> None:
    with pytest.raises(ValueError, match="attempt"):
        decide(RetryPolicy(), attempt=0)


# ---------------------------------------------------------------- Retry-After


def test_retry_after_is_a_floor_that_jitter_cannot_undercut() -> None:
    policy = RetryPolicy(base_delay=1.0)
    rate_limited = classified(ErrorCategory.RATE_LIMIT, retry_after=7.0)
    assert decide(policy, classification=rate_limited, rnd=fixed(0.0)) == Retry(7.0)
    # a longer backoff wins over a shorter Retry-After
    assert decide(
        RetryPolicy(base_delay=10.0, jitter="none"), classification=rate_limited
    ) == Retry(10.0)


def test_retry_after_can_be_ignored() -> None:
    policy = RetryPolicy(respect_retry_after=False, base_delay=1.0, jitter="none")
    rate_limited = classified(ErrorCategory.RATE_LIMIT, retry_after=3600.0)
    assert decide(policy, classification=rate_limited) == Retry(1.0)


def test_a_negative_retry_after_is_no_wait() -> None:
    policy = RetryPolicy(base_delay=0.0)
    assert decide(policy, classification=classified(retry_after=-5.0)) == Retry(0.0)


def test_retry_after_too_long() -> None:
    policy = RetryPolicy(max_retry_after=60.0)
    assert decide(policy, classification=classified(retry_after=60.0), rnd=fixed(0.0)) == Retry(
        60.0
    )
    assert decide(policy, classification=classified(retry_after=61.0)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )
    # an infinite wait is too long even without a limit
    assert decide(RetryPolicy(), classification=classified(retry_after=math.inf)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )
    assert decide(RetryPolicy(), classification=classified(retry_after=math.nan)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )


def test_an_unset_max_retry_after_is_bounded_never_unbounded() -> None:
    # A server asking for a day must not hold the caller for a day (four, with four retries).
    day = classified(ErrorCategory.RATE_LIMIT, retry_after=86400.0)
    assert decide(RetryPolicy(), classification=day) is GiveUp.of(GiveUpReason.RETRY_AFTER_TOO_LONG)
    # The limit is max_delay, but never below 5 s: a sub-second backoff still waits the whole
    # seconds a server speaks in.
    assert RetryPolicy(base_delay=0.01, max_delay=0.2).retry_after_limit == 5.0
    fast = RetryPolicy(base_delay=0.01, max_delay=0.2)
    assert decide(fast, classification=classified(retry_after=1.0), rnd=fixed(0.0)) == Retry(1.0)
    assert decide(fast, classification=classified(retry_after=6.0)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )
    policy = RetryPolicy(max_delay=120.0)
    assert decide(policy, classification=classified(retry_after=120.0), rnd=fixed(0.0)) == Retry(
        120.0
    )
    assert decide(policy, classification=classified(retry_after=121.0)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )
    # An explicit limit above max_delay is the user's choice.
    assert decide(
        RetryPolicy(max_delay=30.0, max_retry_after=600.0),
        classification=classified(retry_after=500.0),
        rnd=fixed(0.0),
    ) == Retry(500.0)


def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    policy = RetryPolicy(deadline=10.0)
    assert decide(policy, elapsed=2.0, classification=classified(retry_after=8.0)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_BEYOND_DEADLINE
    )
    assert decide(
        policy, elapsed=2.0, classification=classified(retry_after=7.5), rnd=fixed(0.0)
    ) == Retry(7.5)


def test_too_long_is_checked_before_the_deadline() -> None:
    policy = RetryPolicy(deadline=10.0, max_retry_after=5.0)
    assert decide(policy, classification=classified(retry_after=20.0)) is GiveUp.of(
        GiveUpReason.RETRY_AFTER_TOO_LONG
    )


# ------------------------------------------------------------------- deadlines


def test_no_attempt_starts_at_or_after_the_deadline() -> None:
    policy = RetryPolicy(deadline=10.0, base_delay=4.0, jitter="none")
    assert decide(policy, elapsed=5.9) == Retry(4.0)
    assert decide(policy, elapsed=6.0) is GiveUp.of(GiveUpReason.DEADLINE)
    assert decide(policy, elapsed=11.0) is GiveUp.of(GiveUpReason.DEADLINE)


def test_a_backoff_beyond_the_deadline_is_a_deadline_give_up_even_with_retry_after() -> None:
    policy = RetryPolicy(deadline=10.0, base_delay=8.0, jitter="none")
    assert decide(policy, elapsed=3.0, classification=classified(retry_after=1.0)) is GiveUp.of(
        GiveUpReason.DEADLINE
    )


def test_timeout_for_attempt() -> None:
    assert RetryPolicy().timeout_for_attempt(1, 0.0) is None
    assert RetryPolicy(attempt_timeout=2.0).timeout_for_attempt(3, 100.0) == 2.0
    both = RetryPolicy(attempt_timeout=2.0, deadline=5.0)
    assert both.timeout_for_attempt(1, 0.0) == 2.0
    assert both.timeout_for_attempt(2, 4.0) == pytest.approx(1.0)
    assert both.timeout_for_attempt(3, 7.0) == 0.001  # never 0: that means non-blocking
    assert RetryPolicy(deadline=5.0).timeout_for_attempt(2, 1.5) == pytest.approx(3.5)


def test_adjusted_timeout_lengthens_and_respects_the_cap() -> None:
    assert [adjusted_timeout(2.0, n) for n in range(4)] == [2.0, 3.0, 4.5, 6.75]
    assert adjusted_timeout(2.0, 3, factor=2.0) == 16.0
    assert adjusted_timeout(2.0, 3, cap=5.0) == 5.0
    assert adjusted_timeout(2.0, 3, cap=-1.0) == 0.001
    assert adjusted_timeout(1.0, 10_000, cap=30.0) == 30.0
    with pytest.raises(ConfigError, match=r"timeout_adjust\.base_timeout"):
        adjusted_timeout(0.0, 1)
    with pytest.raises(ConfigError, match=r"timeout_adjust\.factor"):
        adjusted_timeout(1.0, 1, factor=0.5)


# ------------------------------------------------------------------ properties

policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 10),
    base_delay=st.floats(0.0, 10.0),
    max_delay=st.floats(10.0, 100.0),
    backoff_multiplier=st.floats(1.0, 4.0),
    jitter=st.sampled_from(["full", "equal", "none"]),
    deadline=st.none() | st.floats(0.1, 1000.0),
    max_retry_after=st.none() | st.floats(0.1, 1000.0),
)


@given(
    policy=policies,
    attempt=st.integers(1, 15),
    elapsed=st.floats(0.0, 2000.0),
    retry_after=st.none() | st.floats(0.0, 2000.0),
    r=st.floats(0.0, 1.0, exclude_max=True),
)
def test_every_retry_honours_the_bounds(
    policy: RetryPolicy, attempt: int, elapsed: float, retry_after: float | None, r: float
) -> None:
    decision = decide(
        policy,
        attempt=attempt,
        elapsed=elapsed,
        classification=classified(retry_after=retry_after),
        rnd=fixed(r),
    )
    if isinstance(decision, GiveUp):
        assert decision is GiveUp.of(decision.reason)
        return
    assert attempt <= policy.max_retries
    assert 0.0 <= decision.delay <= max(policy.max_delay, retry_after or 0.0)
    if retry_after is not None:
        assert decision.delay >= retry_after
        if policy.max_retry_after is not None:
            assert retry_after <= policy.max_retry_after
    if policy.deadline is not None:
        assert elapsed + decision.delay < policy.deadline
