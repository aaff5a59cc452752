from __future__ import annotations

import time

import pytest

from otel_raptor.core.replay import (
    IDEMPOTENT_METHODS,
    SQL_SCAN_LIMIT,
    http_replay_safe,
    sql_ends_transaction,
    sql_may_commit_partway,
    sql_replay_safe,
)


class CaseInsensitiveHeaders(dict[str, str]):
    """Like requests' CaseInsensitiveDict: lookups ignore case, iteration keeps it."""

    def __getitem__(self, key: str) -> str:
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        raise KeyError(key)


# ------------------------------------------------------------------------- HTTP


def test_the_idempotent_methods_are_rfc_9110s() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}) == IDEMPOTENT_METHODS


@pytest.mark.parametrize(
    ("method", "headers", "body_replayable", "opt_in", "expected"),
    [
        ("GET", None, True, False, True),
        ("get", None, True, False, True),
        (b"PUT", None, True, False, True),
        ("DELETE", {}, True, False, True),
        ("POST", None, True, False, False),
        ("PATCH", {"Content-Type": "application/json"}, True, False, False),
        ("POST", {"Idempotency-Key": "8e03978e"}, True, False, True),
        ("POST", {"idempotency-key": "8e03978e"}, True, False, True),
        ("POST", {"IDEMPOTENCY-KEY": "8e03978e"}, True, False, True),
        ("POST", {b"Idempotency-Key": b"8e03978e"}, True, False, True),
        ("POST", CaseInsensitiveHeaders({"IdemPotency-KEY": "k"}), True, False, True),
        ("POST", {"Idempotency-Key": ""}, True, False, False),
        ("POST", {"Idempotency-Key": "   "}, True, False, False),
        ("POST", None, True, True, True),
        # a body that cannot be sent again vetoes everything
        ("GET", None, False, False, False),
        ("POST", {"Idempotency-Key": "k"}, False, False, False),
        ("POST", None, False, True, False),
    ],
)
def test_http_replay_safety(
    method: str | bytes,
    headers: dict[str, str] | dict[bytes, bytes] | None,
    body_replayable: bool,
    opt_in: bool,
    expected: bool,
) -> None:
    assert (
        http_replay_safe(
            method, headers, body_replayable=body_replayable, retry_non_idempotent=opt_in
        )
        is expected
    )


# -------------------------------------------------------------------------- SQL

SAFE = [
    "SELECT 1",
    "SELECT * FROM orders ORDER BY id OFFSET 20 ROWS FETCH NEXT 10 ROWS ONLY",
    "SELECT id, next FROM nodes",
    "select * from users where id = %s",
    "  \n\tSELECT id FROM t;",
    "SELECT 1;;  ",
    "-- fetch the user\nSELECT * FROM users",
    "/* app:web route:/users */ SELECT * FROM users",
    "/* multi\nline */ -- and a line\n  select 1",
    "(SELECT a FROM t) UNION (SELECT b FROM u)",
    "SHOW server_version",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN ANALYZE SELECT * FROM t",
    "VALUES (1, 'a'), (2, 'b')",
    "WITH recent AS (SELECT * FROM orders WHERE ts > now() - interval '1 day') "
    "SELECT count(*) FROM recent",
    "SELECT count(*), max(created_at), coalesce(updated_by, 'x') FROM t",
    "SELECT replace(name, 'a', 'b') FROM t",
    "SELECT currval('s'), lastval()",
    "select id from locks_history",  # 'lock' only as a whole word
    "SELECT * FROM t WHERE a = $1 FOR READ ONLY",
    b"SELECT 1",
]

UNSAFE = [
    "SELECT NEXT VALUE FOR s",
    "SELECT NEXT  VALUE\n FOR s",
    "select next value for s",
    "SELECT * FROM pg_logical_slot_get_changes('slot', NULL, NULL)",
    "SELECT pg_logical_emit_message(true, 'p', 'x')",
    "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
    "SELECT pg_drop_replication_slot('s')",
    "SELECT pg_replication_origin_advance('o', '0/0')",
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "REPLACE INTO t VALUES (1)",
    "CREATE TABLE t (a int)",
    "DROP TABLE t",
    "TRUNCATE t",
    "CALL proc()",
    "BEGIN",
    "COMMIT",
    "SET search_path TO x",
    "COPY t TO STDOUT",
    "DO $$ BEGIN END $$",
    "SELECT 1; DELETE FROM t",
    "SELECT 1; SELECT 2",
    "SELECT ';'",  # a semicolon in a literal is refused too: conservative
    "SELECT * INTO backup FROM t",
    "SELECT a INTO OUTFILE '/tmp/x' FROM t",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR NO KEY UPDATE",
    "SELECT * FROM t FOR SHARE",
    "SELECT * FROM t FOR KEY SHARE",
    "SELECT * FROM t LOCK IN SHARE MODE",
    "SELECT nextval('order_id_seq')",
    "SELECT NEXTVAL ('s')",
    "SELECT setval('s', 42)",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_lock(1), pg_sleep(0.3)",
    "SELECT pg_try_advisory_xact_lock(42)",
    "SELECT RELEASE_ALL_LOCKS()",
    "SELECT pg_notify('channel', 'payload')",
    "SELECT pg_terminate_backend(123)",
    "SELECT GET_LOCK('name', 10)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT * FROM dblink('db', 'DELETE FROM t') AS x(a int)",
    "SELECT @counter := @counter + 1",
    "WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone",
    "WITH new AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM new",
    "EXPLAIN ANALYZE DELETE FROM t",
    "/* SELECT */ DELETE FROM t",
    "-- SELECT\nUPDATE t SET a = 1",
    "/* unterminated SELECT 1",
    "/* /* nested */ SELECT 1 */ DELETE FROM t",
    "SELECTED",
    "selection",
    "",
    "   ",
    "-- only a comment",
]


@pytest.mark.parametrize("statement", SAFE)
def test_read_only_statements_are_replay_safe(statement: str | bytes) -> None:
    assert sql_replay_safe(statement, in_transaction=False) is True


@pytest.mark.parametrize("statement", UNSAFE)
def test_statements_with_side_effects_are_not(statement: str) -> None:
    assert sql_replay_safe(statement, in_transaction=False) is False


def test_nothing_is_replay_safe_inside_a_transaction() -> None:
    assert sql_replay_safe("SELECT 1", in_transaction=True) is False
    assert sql_replay_safe("SELECT 1", in_transaction=True, opt_in=True) is False


def test_opt_in_vouches_for_any_statement_outside_a_transaction() -> None:
    assert sql_replay_safe("INSERT INTO t VALUES (1)", in_transaction=False, opt_in=True) is True
    assert sql_replay_safe(None, in_transaction=False, opt_in=True) is True
    assert sql_replay_safe(None, in_transaction=False) is False


def test_statements_longer_than_the_scan_limit_are_not_safe() -> None:
    # The tail is unseen, and FOR UPDATE or a second statement usually sits there.
    head = "SELECT * FROM t WHERE id IN ("
    fits = head + "1," * ((SQL_SCAN_LIMIT - len(head) - 2) // 2) + "1)"
    assert len(fits) <= SQL_SCAN_LIMIT
    assert sql_replay_safe(fits, in_transaction=False) is True
    too_long = head + "1," * SQL_SCAN_LIMIT + "1)"
    assert sql_replay_safe(too_long, in_transaction=False) is False


def test_the_scan_is_bounded_on_hostile_input() -> None:
    # Worst cases for the comment-skipping pattern: many openers, nothing closing them.
    for text in ("/*" * (SQL_SCAN_LIMIT // 2), "(" * SQL_SCAN_LIMIT, " " * SQL_SCAN_LIMIT):
        start = time.perf_counter()
        for _ in range(100):
            assert sql_replay_safe(text, in_transaction=False) is False
        assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "statement",
    [
        "ROLLBACK",
        "rollback;",
        "COMMIT;",
        b"COMMIT",
        "  -- done\n END",
        "/* x */ abort",
        "ROLLBACK TO SAVEPOINT s",
        "commit work",
    ],
)
def test_statements_that_end_a_transaction(statement: str | bytes) -> None:
    assert sql_ends_transaction(statement) is True


@pytest.mark.parametrize(
    "statement",
    ["BEGIN", "SELECT 'rollback'", "committed", "INSERT INTO t VALUES (1); COMMIT", "", None, 7],
)
def test_statements_that_do_not_end_a_transaction(statement: object) -> None:
    assert sql_ends_transaction(statement) is False


@pytest.mark.parametrize(
    ("statement", "partway"),
    [
        ("CALL p()", True),
        (b" /* batch */ call p(1)", True),
        ("DO $$ BEGIN COMMIT; END $$", True),
        (object(), True),  # a composed query: cannot be read
        (None, True),
        ("INSERT INTO t VALUES (1)", False),
        ("SELECT do_it()", False),
        ("UPDATE calls SET n = n + 1", False),
    ],
)
def test_statements_that_may_commit_partway(statement: object, partway: bool) -> None:
    assert sql_may_commit_partway(statement) is partway
