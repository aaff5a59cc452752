"""The pure database decisions: per-failure replay safety and transaction conflicts, against
the table in the module docstring (hypothesis over every combination and random codes)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.db import (
    CONFLICT_MYSQL_ERRORS,
    CONFLICT_SQLSTATES,
    REDIS_READ_ONLY_COMMANDS,
    FailurePoint,
    Operation,
    conflict_code,
    is_transaction_conflict,
    redis_read_only,
    replay_safe_after,
)

operations = st.sampled_from(list(Operation))
failures = st.sampled_from(list(FailurePoint))


def table(
    operation: Operation,
    failure: FailurePoint,
    in_transaction: bool,
    read_only: bool,
    can_send: bool,
) -> bool:
    """The docstring's table, row by row, written out plainly."""
    rows = {
        ("connect", None): True,
        ("batch", None): False,
    }
    if operation.value in ("connect", "batch"):
        return rows[(operation.value, None)]
    if in_transaction:
        return False
    if failure is FailurePoint.ROLLED_BACK:
        return True
    if failure is FailurePoint.TIMED_OUT:
        return False
    if failure is FailurePoint.NOT_SENT:
        return can_send
    if failure is FailurePoint.FAILED:
        return read_only and can_send
    return read_only and can_send  # UNKNOWN


@given(operations, failures, st.booleans(), st.booleans(), st.booleans())
def test_the_rule_is_the_documented_table(
    operation: Operation, failure: FailurePoint, in_tx: bool, read_only: bool, can_send: bool
) -> None:
    assert replay_safe_after(
        operation, failure, in_transaction=in_tx, read_only=read_only, can_send=can_send
    ) == table(operation, failure, in_tx, read_only, can_send)


def test_the_safety_properties_over_every_combination() -> None:
    for operation, failure, in_tx, read_only, can_send in itertools.product(
        Operation, FailurePoint, (False, True), (False, True), (False, True)
    ):
        facts = {"in_transaction": in_tx, "read_only": read_only, "can_send": can_send}
        verdict = replay_safe_after(operation, failure, **facts)
        if operation is Operation.CONNECT:
            assert verdict
            continue
        # Never a batch, never inside a transaction.
        if operation is Operation.BATCH or in_tx:
            assert not verdict
        # A write whose outcome is unknown is never sent again.
        if failure is FailurePoint.UNKNOWN and not read_only:
            assert not verdict
        # Nor is a statement that ran out of its time.
        if failure is FailurePoint.TIMED_OUT:
            assert not verdict
        # Knowing more can only allow more: read-only, able to send, outside a transaction.
        for better in ({"read_only": True}, {"can_send": True}, {"in_transaction": False}):
            if verdict:
                assert replay_safe_after(operation, failure, **{**facts, **better})


def classification(code: str | None, rule: str = "") -> Classification:
    return Classification(
        category=ErrorCategory.CONCURRENCY,
        severity=Severity.MEDIUM,
        retryable=True,
        error_type="E",
        code=code,
        rule=rule,
    )


@given(st.sampled_from(sorted(CONFLICT_SQLSTATES | CONFLICT_MYSQL_ERRORS)))
def test_conflicts_are_conflicts(code: str) -> None:
    assert is_transaction_conflict(classification(code))
    assert conflict_code(classification(code)) == code


@given(st.text(min_size=1, max_size=12))
def test_nothing_else_is_a_conflict(code: str) -> None:
    expected = (
        code in CONFLICT_SQLSTATES
        or code in CONFLICT_MYSQL_ERRORS
        or code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
    )
    assert is_transaction_conflict(classification(code)) is expected


def test_sqlite_busy_by_name_or_by_rule() -> None:
    assert conflict_code(classification("SQLITE_BUSY_SNAPSHOT")) == "SQLITE_BUSY_SNAPSHOT"
    assert conflict_code(classification("SQLITE_LOCKED")) == "SQLITE_LOCKED"
    # Python < 3.11: no error name, the classifier recognised the message.
    assert conflict_code(classification(None, rule="sqlite.locked")) == "SQLITE_BUSY"
    assert not is_transaction_conflict(classification("SQLITE_CONSTRAINT"))
    assert not is_transaction_conflict(classification(None))
    assert not is_transaction_conflict(classification("55P03"))  # NOWAIT: the app's choice


@given(st.sampled_from(sorted(REDIS_READ_ONLY_COMMANDS)))
def test_redis_reads_in_any_case_and_type(command: str) -> None:
    assert redis_read_only(command)
    assert redis_read_only(command.lower())
    assert redis_read_only(command.encode())


@given(st.sampled_from(["INCR", "SET", "LPUSH", "EVAL", "DEL", "EXPIRE", "XADD", "FLUSHALL"]))
def test_redis_writes(command: str) -> None:
    assert not redis_read_only(command)
    assert not redis_read_only(command.lower().encode())


def test_redis_nonsense_is_a_write() -> None:
    assert not redis_read_only(None)
    assert not redis_read_only(42)
    assert not redis_read_only("")
