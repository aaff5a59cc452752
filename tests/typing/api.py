"""Type-checked only (mypy tests/typing): the public API reads well to a type checker."""

from __future__ import annotations

from typing import Any, assert_type

import otel_raptor
from otel_raptor import (
    CircuitBreaker,
    Classification,
    ErrorCategory,
    Guard,
    RecoveryResult,
    RetryPolicy,
    resilient,
)


@resilient(service="typed", retry=RetryPolicy(max_retries=2))
def lookup(key: str) -> int:
    return len(key)


@resilient
async def fetch(url: str) -> bytes:
    return url.encode()


async def main() -> None:
    assert_type(lookup("a"), int)
    assert_type(await fetch("x"), bytes)
    guard = Guard("svc")
    assert_type(guard.call(lookup, "b"), int)
    assert_type(await guard.call_async(fetch, "y"), bytes)
    classification = otel_raptor.classify(TimeoutError())
    assert_type(classification, Classification)
    assert_type(classification.category, ErrorCategory)
    breaker = otel_raptor.get_resilient_client().add_circuit_breaker("db")
    assert_type(breaker, CircuitBreaker)
    result = await otel_raptor.get_production_error_recovery().handle_error(TimeoutError(), {})
    assert_type(result, RecoveryResult)


def instrument() -> None:
    from otel_raptor import RaptorInstrumentor

    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(retry={"max_retries": 2}, integrations=["requests"])
    controller = otel_raptor.get_memory_controller()
    assert_type(controller, otel_raptor.SimpleMemoryController)
    instrumentor.uninstrument()


async def monitoring() -> None:
    monitor = otel_raptor.get_error_recovery_monitor()
    assert_type(monitor, otel_raptor.ErrorRecoveryMonitor)
    await monitor.record_recovery_attempt(
        error_type="TimeoutError",
        recovery_time=2500,
        success=True,
        strategy="retry_with_backoff",
        context={"service": "api"},
    )
    monitor.record_recovery_attempt_sync("503", 120.0, False, otel_raptor.Strategy.FAIL_FAST)
    metrics = monitor.get_current_metrics()
    assert_type(metrics, dict[str, Any])
    alerts = monitor.get_active_alerts()
    assert_type(alerts, list[otel_raptor.Alert])
    assert_type(monitor.report(), otel_raptor.MonitorReport)
    insights = otel_raptor.get_error_analytics().insights()
    assert_type(insights, list[otel_raptor.Insight])
    assert_type(insights[0].kind, otel_raptor.InsightKind)
    custom = otel_raptor.ErrorRecoveryMonitor(
        otel_raptor.MonitorConfig(alert_cooldown=60.0), runtime=otel_raptor.get_runtime()
    )
    custom.add_alert_callback(lambda alert: print(alert.message))
    custom.close()


def refusals() -> None:
    try:
        Guard("typed-refusals").call(lookup, "c")
    except otel_raptor.ThrottledError as error:
        assert_type(error.retry_after, float | None)
    except otel_raptor.CircuitOpenError as error:
        assert_type(error.retry_after, float | None)


def cached_or_decline() -> int:
    raise otel_raptor.FallbackDeclined


def transactions(conn: object) -> None:
    from otel_raptor.db import TransactionInProgressError, run_transaction

    def work(c: object) -> int:
        return 1

    assert_type(run_transaction(conn, work, max_retries=3), int)
    assert issubclass(TransactionInProgressError, ValueError)


async def transactions_async(conn: object) -> None:
    from otel_raptor.db import run_transaction_async

    async def work(c: object) -> str:
        return "ok"

    assert_type(await run_transaction_async(conn, work), str)
