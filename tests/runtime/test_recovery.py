from __future__ import annotations

from typing import Any

import pytest

from otel_raptor import (
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    ConfigError,
    ErrorCategory,
    ErrorRecoveryEngine,
    Event,
    Guard,
    Outcome,
    RecoveryFinished,
    ResilientClient,
    RetryPolicy,
    Runtime,
    Strategy,
    get_production_error_recovery,
    get_resilient_client,
)
from otel_raptor.core.learning import LearnerOptions
from tests.support.clock import FakeClock


@pytest.fixture
def runtime(clock: FakeClock) -> Runtime:
    return Runtime(clock=clock)


@pytest.fixture
def engine(runtime: Runtime) -> ErrorRecoveryEngine:
    return ErrorRecoveryEngine(runtime=runtime, rnd=lambda: 0.5)


def finished(runtime: Runtime) -> list[RecoveryFinished]:
    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    return seen  # type: ignore[return-value]


class Sequence:
    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> object:
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def test_retry_func_recovers_a_connection_error(
    engine: ErrorRecoveryEngine, clock: FakeClock
) -> None:
    retry = Sequence(ConnectionResetError(104, "again"), "value")
    result = await engine.handle_error(
        ConnectionRefusedError(111, "refused"),
        {"service_name": "orders", "retry_func": retry},
    )
    assert result.success
    assert result.value == "value"
    assert result.strategy is Strategy.RECONNECT
    assert result.attempts == 3  # the original failure and two retries
    assert result.classification.category is ErrorCategory.CONNECTION
    assert result.duration_s == pytest.approx(sum(clock.sleeps))
    assert len(retry.calls) == 2


def test_sync_twin_and_max_retries_from_the_context(engine: ErrorRecoveryEngine) -> None:
    last = ConnectionResetError(104, "still down")
    retry = Sequence(ConnectionResetError(104, "down"), last)
    result = engine.handle_error_sync(
        ConnectionResetError(104, "down"), {"retry_func": retry, "max_retries": 2}
    )
    assert not result.success
    assert result.error is last
    assert result.attempts == 3


def test_reconnect_func_runs_before_each_retry(engine: ErrorRecoveryEngine) -> None:
    order: list[str] = []

    def reconnect() -> None:
        order.append("reconnect")

    def retry() -> str:
        order.append("retry")
        return "ok"

    result = engine.handle_error_sync(
        ConnectionResetError(104, "x"), {"retry_func": retry, "reconnect_func": reconnect}
    )
    assert result.success
    assert order == ["reconnect", "retry"]


def test_timeout_adjust_retries_with_a_longer_timeout(engine: ErrorRecoveryEngine) -> None:
    retry = Sequence(TimeoutError("slow"), "ok")
    result = engine.handle_error_sync(TimeoutError("slow"), {"retry_func": retry, "timeout": 2.0})
    assert result.success
    assert result.strategy is Strategy.TIMEOUT_ADJUST
    timeouts = [call["timeout"] for call in retry.calls]
    assert timeouts[0] > 2.0
    assert timeouts[1] > timeouts[0]


def test_non_retryable_errors_fail_fast_or_fail_over(engine: ErrorRecoveryEngine) -> None:
    error = ValueError("bad")
    result = engine.handle_error_sync(error, {"retry_func": Sequence("never")})
    assert (result.success, result.strategy, result.error) == (False, Strategy.FAIL_FAST, error)

    result = engine.handle_error_sync(error, {"fallback_func": lambda: "default"})
    assert (result.success, result.strategy, result.value) == (True, Strategy.FAILOVER, "default")

    result = engine.handle_error_sync(error, {"fallback_func": lambda e: f"saw {e}"})
    assert result.value == "saw bad"


async def test_exhausted_retries_fail_over_when_a_fallback_exists(
    runtime: Runtime, engine: ErrorRecoveryEngine
) -> None:
    seen = finished(runtime)
    retry = Sequence(*[ConnectionResetError(104, "x")] * 3)

    async def fallback(error: BaseException) -> str:
        return "stale"

    result = await engine.handle_error(
        ConnectionResetError(104, "x"), {"retry_func": retry, "fallback_func": fallback}
    )
    assert (result.success, result.strategy, result.value) == (True, Strategy.FAILOVER, "stale")
    outcomes = [(e.strategy, e.outcome) for e in seen if isinstance(e, RecoveryFinished)]
    assert outcomes == [(Strategy.FAILOVER, Outcome.FALLBACK)]


async def test_auth_refresh_calls_the_refresher_then_retries_once(
    engine: ErrorRecoveryEngine,
) -> None:
    from otel_raptor import Classification, Severity

    refreshed: list[bool] = []
    engine.register_auth_refresher("billing", lambda: refreshed.append(True))

    def unauthorized(exc: BaseException, *, context: Any = None) -> Classification:
        return Classification(ErrorCategory.AUTHENTICATION, Severity.HIGH, False, "401")

    engine._classify = unauthorized
    result = await engine.handle_error(
        PermissionError("401"), {"service_name": "billing", "retry_func": lambda: "fresh"}
    )
    assert (result.success, result.strategy, result.value) == (True, Strategy.AUTH_REFRESH, "fresh")
    assert refreshed == [True]
    result = await engine.handle_error(
        PermissionError("401"), {"service_name": "other", "retry_func": lambda: "fresh"}
    )
    assert result.strategy is Strategy.FAIL_FAST  # no refresher for that service


def test_a_refresher_is_found_by_its_service_name_past_max_services(clock: FakeClock) -> None:
    from otel_raptor import Classification, Severity

    runtime = Runtime(clock=clock, max_services=1)
    runtime.service("first")  # "billing" is folded into "other" from now on

    def unauthorized(exc: BaseException, *, context: Any = None) -> Classification:
        return Classification(ErrorCategory.AUTHENTICATION, Severity.HIGH, False, "401")

    engine = ErrorRecoveryEngine(runtime=runtime, classifier=unauthorized)
    refreshed: list[str] = []
    engine.register_auth_refresher("billing", lambda: refreshed.append("billing"))
    engine.register_auth_refresher("crm", lambda: refreshed.append("crm"))
    result = engine.handle_error_sync(
        PermissionError("401"), {"service_name": "billing", "retry_func": lambda: "fresh"}
    )
    # It was looked up as "other" and not found: the 401 failed fast, credentials stale.
    assert (result.success, result.strategy, result.value) == (True, Strategy.AUTH_REFRESH, "fresh")
    assert refreshed == ["billing"]  # its own refresher, not another folded service's


def test_auth_refreshers_are_bounded(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_raptor.errors import ConfigError
    from otel_raptor.runtime import recovery

    monkeypatch.setattr(recovery, "MAX_AUTH_REFRESHERS", 2)
    engine = ErrorRecoveryEngine(runtime=runtime)
    engine.register_auth_refresher("billing", lambda: None)
    engine.register_auth_refresher("crm", lambda: None)
    engine.register_auth_refresher("crm", lambda: None)  # replacing one is always allowed
    with pytest.raises(ConfigError) as raised:
        engine.register_auth_refresher("ledger", lambda: None)
    assert "'ledger'" in str(raised.value)
    assert "at most 2 services" in str(raised.value)


def test_a_refresher_that_never_helps_is_given_up_on(clock: FakeClock) -> None:
    from otel_raptor import Classification, Severity

    runtime = Runtime(clock=clock, learner=LearnerOptions(min_samples=3))
    engine = ErrorRecoveryEngine(runtime=runtime, rnd=lambda: 0.0)
    refreshed: list[bool] = []
    engine.register_auth_refresher("billing", lambda: refreshed.append(True))

    def unauthorized(exc: BaseException, *, context: Any = None) -> Classification:
        return Classification(ErrorCategory.AUTHENTICATION, Severity.HIGH, False, "401")

    def still_unauthorized() -> str:
        raise PermissionError("401")

    engine._classify = unauthorized
    for _ in range(100):
        clock.advance(1.0)
        engine.handle_error_sync(
            PermissionError("401"), {"service_name": "billing", "retry_func": still_unauthorized}
        )
    # A few to learn it is futile, then one probe in ten: not one refresh per 401.
    assert 3 <= len(refreshed) <= 20


def test_the_learner_prefers_the_strategy_that_recovers(clock: FakeClock) -> None:
    runtime = Runtime(clock=clock, learner=LearnerOptions(min_samples=3))
    engine = ErrorRecoveryEngine(runtime=runtime, policy=RetryPolicy(max_retries=1, base_delay=0))
    for _ in range(4):
        runtime.record_outcome("s", "timeout", Strategy.TIMEOUT_ADJUST, recovered=False)
        runtime.record_outcome("s", "timeout", Strategy.RETRY_WITH_BACKOFF, recovered=True)
    result = engine.handle_error_sync(
        TimeoutError("slow"), {"service_name": "s", "retry_func": lambda: "ok"}
    )
    assert result.strategy is Strategy.RETRY_WITH_BACKOFF


def test_context_values_are_validated(engine: ErrorRecoveryEngine) -> None:
    with pytest.raises(ConfigError, match=r"context\.max_retries"):
        engine.handle_error_sync(TimeoutError(), {"max_retries": "3"})
    with pytest.raises(ConfigError, match=r"context\.max_retries"):
        engine.handle_error_sync(TimeoutError(), {"max_retries": -1})
    with pytest.raises(ConfigError, match=r"context\.retry_func"):
        engine.handle_error_sync(TimeoutError(), {"retry_func": 3})


def test_callables_a_sync_recovery_cannot_run_are_refused(engine: ErrorRecoveryEngine) -> None:
    # handle_error_sync cannot await: an async callable's coroutine would be taken for its
    # result, and the recovery reported as a success that never ran.
    async def coroutine_function(*args: object) -> str:
        return "never run"

    for key in ("retry_func", "fallback_func", "reconnect_func", "auth_refresh_func"):
        with pytest.raises(ConfigError, match=rf"context\.{key}"):
            engine.handle_error_sync(ConnectionResetError(104, "down"), {key: coroutine_function})
    engine.register_auth_refresher("api", coroutine_function)
    with pytest.raises(ConfigError, match=r"auth_refresher"):
        engine.handle_error_sync(PermissionError("401"), {"service_name": "api"})

    def needs_two(error: BaseException, extra: object) -> str:
        return "never"

    with pytest.raises(ConfigError, match=r"context\.fallback_func"):
        engine.handle_error_sync(ValueError("bad"), {"fallback_func": needs_two})


async def test_an_async_recovery_takes_async_callables(engine: ErrorRecoveryEngine) -> None:
    async def retry() -> str:
        return "ok"

    result = await engine.handle_error(ConnectionResetError(104, "down"), {"retry_func": retry})
    assert result.success
    assert result.value == "ok"


def test_the_engine_makes_the_learners_probes_and_finds_a_healed_downstream(
    clock: FakeClock,
) -> None:
    # Once retries at "orders" proved futile the engine fails fast, except for one call in
    # probe_every (10) of each strategy: those do retry, and a healed downstream is found
    # without waiting for the idle probe (60 s).
    runtime = Runtime(clock=clock, learner=LearnerOptions(min_samples=3))
    engine = ErrorRecoveryEngine(
        runtime=runtime, policy=RetryPolicy(max_retries=1, base_delay=0), rnd=lambda: 0.0
    )
    healed = False
    retried = 0

    def retry() -> str:
        nonlocal retried
        retried += 1
        if not healed:
            raise ConnectionResetError(104, "down")
        return "ok"

    def handle() -> Any:
        clock.advance(1.0)
        return engine.handle_error_sync(
            ConnectionResetError(104, "down"), {"service_name": "orders", "retry_func": retry}
        )

    for _ in range(40):
        handle()  # both strategies learn they are futile here
    assert not handle().success
    healed, retried = True, 0
    results = [handle() for _ in range(20)]
    assert retried >= 2  # the probes: about one call in ten per strategy
    assert any(r.success for r in results)
    assert results[-1].success  # found: retrying again


def test_the_engine_tries_the_alternative_when_the_specialised_retry_is_futile(
    clock: FakeClock,
) -> None:
    # A timeout: timeout_adjust retries with a timeout= that always times out here, while a
    # plain retry works. The learner can only prefer the plain retry once it has tried it.
    runtime = Runtime(clock=clock, learner=LearnerOptions(min_samples=5))
    engine = ErrorRecoveryEngine(
        runtime=runtime, policy=RetryPolicy(max_retries=2, base_delay=0), rnd=lambda: 0.0
    )

    def retry(**kwargs: Any) -> str:
        if "timeout" in kwargs:
            raise TimeoutError("the adjusted attempt timed out too")
        return "ok"

    results = []
    for _ in range(60):
        clock.advance(2.0)
        results.append(
            engine.handle_error_sync(
                TimeoutError("read timed out"), {"service_name": "search", "retry_func": retry}
            )
        )
    assert results[0].strategy is Strategy.TIMEOUT_ADJUST
    assert all(r.success for r in results[-30:])
    assert {r.strategy for r in results[-30:]} == {Strategy.RETRY_WITH_BACKOFF}


def test_engine_accepts_the_seed_recovery_config() -> None:
    engine = ErrorRecoveryEngine(
        policy={"max_retries": 5, "base_delay": 0.5, "max_delay": 30, "backoff_multiplier": 3}
    )
    assert engine.policy.max_retries == 5
    assert engine.policy.backoff_multiplier == 3


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"policy": 3}, "policy"),
        ({"policy": "fast"}, "policy"),
        ({"runtime": "rt"}, "runtime"),
        ({"classifier": 5}, "classifier"),
        ({"rnd": None}, "rnd"),
    ],
)
def test_engine_refuses_bad_arguments_when_built(kwargs: dict[str, Any], key: str) -> None:
    # They used to be accepted, and the first handle_error failed with an AttributeError or
    # TypeError (or, for rnd, turned into an internal error that dropped every retry).
    with pytest.raises(ConfigError, match=rf"^invalid {key}="):
        ErrorRecoveryEngine(**kwargs)


def test_auth_refreshers_and_clients_refuse_bad_arguments(engine: ErrorRecoveryEngine) -> None:
    with pytest.raises(ConfigError, match="service"):
        engine.register_auth_refresher(None, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="runtime"):
        ResilientClient("rt")  # type: ignore[arg-type]


def test_singletons_are_shared() -> None:
    assert get_production_error_recovery() is get_production_error_recovery()
    assert get_resilient_client() is get_resilient_client()


async def test_resilient_client_breakers_call_sync_and_async(runtime: Runtime) -> None:
    client = ResilientClient(runtime)
    breaker = client.add_circuit_breaker("payments", {"failure_threshold": 2})
    assert client.add_circuit_breaker("payments") is breaker
    assert client.get_circuit_breaker("payments") is breaker

    async def fine() -> str:
        return "paid"

    assert await breaker.call(fine) == "paid"
    assert breaker.call_sync(lambda: "paid") == "paid"
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            breaker.call_sync(Sequence(ConnectionResetError(104, "x")))
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await breaker.call(fine)
    with pytest.raises(ConfigError, match="payments"):
        client.add_circuit_breaker("payments", CircuitBreakerConfig(failure_threshold=9))


def test_a_client_breaker_config_the_runtimes_breaker_does_not_have_is_refused(
    runtime: Runtime,
) -> None:
    # The runtime's breaker of that name (here a guard's) used to be returned with its own
    # config: failure_threshold=1 silently meant 5.
    Guard("payments", runtime=runtime)
    with pytest.raises(ConfigError, match="failure_threshold=5"):
        ResilientClient(runtime).add_circuit_breaker("payments", {"failure_threshold": 1})
    same = ResilientClient(runtime).add_circuit_breaker("payments", CircuitBreakerConfig())
    assert same is runtime.breakers.get("payments")


def test_a_client_keeps_no_name_past_the_runtimes_cap() -> None:
    # Names past max_services share the runtime's ``other`` breaker, but the client kept every
    # one of them: a name made per call (an id in it) grew the process-wide client for ever.
    client = ResilientClient(Runtime(max_services=4))
    own = [client.add_circuit_breaker(f"svc-{i}") for i in range(4)]
    folded = {client.add_circuit_breaker(f"order-{i}") for i in range(2000)}
    assert [b.name for b in own] == [f"svc-{i}" for i in range(4)]
    assert [b.name for b in folded] == ["other"]
    assert len(client.circuit_breakers) <= 5
    assert client.get_circuit_breaker("svc-1") is own[1]
    assert client.add_circuit_breaker("order-7") in folded


def test_each_failure_is_classified_once(runtime: Runtime, engine: ErrorRecoveryEngine) -> None:
    from otel_raptor import ErrorClassified

    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    engine.handle_error_sync(ConnectionResetError(104, "x"), {"retry_func": lambda: "ok"})
    engine.handle_error_sync(ValueError("bad"), {})
    attempts = [e.attempt for e in seen if isinstance(e, ErrorClassified)]
    assert attempts == [1, 1]  # one for each original error; the retry succeeded
