"""Type-checked only (mypy tests/typing): the public API reads well to a type checker."""

from __future__ import annotations

from typing_extensions import assert_type

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
