"""raptor's errors survive pickling (a multiprocessing pool, a task queue hands them between
processes) with their message, fields and, for the integrations' fail-fast errors, the
library's own attributes."""

from __future__ import annotations

import pickle

import pymysql
import requests

from otel_raptor.core.attempts import Refusal, RefusalKind
from otel_raptor.errors import CircuitOpenError, ConfigError, ThrottledError
from otel_raptor.integrations.db import pymysql as pymysql_integration
from otel_raptor.integrations.db._common import refusal_factory
from otel_raptor.integrations.requests import circuit_open_error_type
from otel_raptor.runtime.classifying import classify


def round_trip(error: BaseException) -> BaseException:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    return copy


def test_the_plain_errors_keep_their_message_and_fields() -> None:
    copy = round_trip(CircuitOpenError("https://api:443", 2.5))
    assert isinstance(copy, CircuitOpenError)
    assert (copy.breaker, copy.retry_after) == ("https://api:443", 2.5)
    throttled = round_trip(ThrottledError("https://api:443", None))
    assert isinstance(throttled, ThrottledError)
    assert (throttled.service, throttled.retry_after) == ("https://api:443", None)
    config = round_trip(ConfigError("retry.max_retries", -1, "an integer >= 0"))
    assert isinstance(config, ConfigError)
    assert config.key == "retry.max_retries"


def test_a_library_flavoured_refusal_keeps_the_librarys_attributes() -> None:
    request = requests.Request("GET", "http://api.example/x").prepare()
    copy = round_trip(circuit_open_error_type()("http://api.example:80", 1.0, request=request))
    assert isinstance(copy, requests.ConnectionError)
    assert copy.request.url == "http://api.example/x"  # type: ignore[attr-defined]


def test_a_refusal_with_driver_args_keeps_them() -> None:
    # PyMySQL's errors carry ``(errno, message)``; the refusal's are set after it is built.
    build = refusal_factory(
        pymysql.err.OperationalError,
        "PyMySQLCircuitOpen",
        pymysql_integration.__name__,
        args=lambda message: (pymysql_integration.CONNECT_ERROR, message),
    )
    error = build(Refusal(RefusalKind.CIRCUIT_OPEN, "mysql://db:3306/shop", 3.0))
    copy = round_trip(error)
    assert isinstance(copy, pymysql.err.OperationalError)
    assert copy.args[0] == 2003


def test_every_refusal_is_classified_as_a_refusal_not_a_lost_connection() -> None:
    # The driver-flavoured refusals carry the driver's SQLSTATE (asyncpg's 08000) or error
    # number (PyMySQL's 2003): a guard around the app's database code must still see a refusal
    # (never retried), not a retryable lost connection.
    from otel_raptor.integrations.db.asyncpg import (
        circuit_open_error_type as asyncpg_refusal,
    )

    refusals: list[BaseException] = [
        CircuitOpenError("svc", 1.0),
        asyncpg_refusal()("postgresql://db:5432/shop", 1.0),
        refusal_factory(
            pymysql.err.OperationalError,
            "PyMySQLCircuitOpen",
            pymysql_integration.__name__,
            args=lambda message: (pymysql_integration.CONNECT_ERROR, message),
        )(Refusal(RefusalKind.CIRCUIT_OPEN, "mysql://db:3306/shop", 1.0)),
        circuit_open_error_type()("http://api:80", 1.0),
    ]
    for refusal in refusals:
        verdict = classify(refusal)
        assert (verdict.rule, verdict.retryable) == ("circuit_open", False), type(refusal)


def test_an_error_raised_while_handling_a_refusal_is_that_error() -> None:
    # The usual fallback: ``except CircuitOpenError: backup()``; the backup's own failure
    # carries the refusal as its context, and must be classified (and retried) as itself.
    for raised, rule in (
        (TimeoutError("backup timed out"), "timeout"),
        (ConnectionResetError(104, "reset"), "errno.connection"),
    ):
        try:
            try:
                raise CircuitOpenError("svc", 1.0)
            except CircuitOpenError:
                raise raised  # noqa: B904 - as the app's fallback does
        except OSError as error:
            verdict = classify(error)
        assert (verdict.rule, verdict.retryable) == (rule, True), raised
