"""Fingerprints of real exception messages, raised by the real libraries under real faults.

Two failures that differ only in their values (a port, an id, an object address, a path) must
share one normalised template and one fingerprint; failures that differ in kind must not; and
no value (numbers, addresses, paths, secrets) may survive into a template. HTTP faults come from
loopback servers; the databases are the shared loopback PostgreSQL, MariaDB and Redis (skipped
when absent, failed under ``RAPTOR_REQUIRE_SERVICES=1``); everything created has a unique name
and is dropped again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.fingerprint import fingerprint, normalize_message
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
from otel_raptor.runtime.state import Runtime
from tests.integrations.test_classify_real import caught, lib, redis_client, unique
from tests.support.faulty_http import FaultyHTTPServer, closed_port, status
from tests.support.services import MYSQL, POSTGRES, REDIS, require_service

#: Digits that may stay in a template: none but the placeholders' absence of them.
_NUMBER = re.compile(r"(?<![A-Za-z_])\d{2,}")


def pattern_of(exc: BaseException) -> tuple[str, str]:
    """(template, fingerprint) as the monitor computes them for ``exc``."""
    verdict = classify(exc)
    template = normalize_message(str(exc))
    return template, fingerprint(verdict.error_type, verdict.category.value, template)


def assert_clean(template: str, *values: object) -> None:
    assert template, "an empty template says nothing"
    for value in values:
        assert str(value) not in template, (value, template)
    assert not _NUMBER.search(template), template
    assert "0x" not in template, template


# --------------------------------------------------------------------------- HTTP


def test_requests_refused_on_two_ports_is_one_pattern() -> None:
    requests = lib("requests")
    ports = (closed_port(), closed_port())
    errors = [
        caught(lambda port=port: requests.get(f"http://127.0.0.1:{port}/items/7", timeout=2))
        for port in ports
    ]
    (first, fp1), (second, fp2) = (pattern_of(e) for e in errors)
    assert (first, fp1) == (second, fp2)
    assert_clean(first, *ports, "/items/7")
    # What a person needs to recognise it is still there.
    assert "Max retries exceeded" in first
    assert "Connection refused" in first


def test_httpx_refused_and_timed_out_are_two_patterns() -> None:
    httpx = lib("httpx")
    refused = [
        caught(lambda port=port: httpx.get(f"http://127.0.0.1:{port}/", timeout=2))
        for port in (closed_port(), closed_port())
    ]
    assert len({pattern_of(e) for e in refused}) == 1
    template, _ = pattern_of(refused[0])
    assert template == "[Errno <int>] Connection refused"
    from tests.support.faulty_http import hang

    server = FaultyHTTPServer(default=hang(5.0)).start()
    try:
        timeout = caught(lambda: httpx.get(server.url("/slow"), timeout=0.2))
    finally:
        server.stop()
    assert pattern_of(timeout)[1] != pattern_of(refused[0])[1]


def test_httpx_status_errors_for_different_ids_are_one_pattern() -> None:
    httpx = lib("httpx")
    server = FaultyHTTPServer(default=status(503)).start()
    origin = server.url("")
    try:
        errors = [
            caught(lambda item=item: httpx.get(server.url(f"/items/{item}")).raise_for_status())
            for item in (17, 4242)
        ]
    finally:
        server.stop()
    (first, fp1), (second, fp2) = (pattern_of(e) for e in errors)
    assert (first, fp1) == (second, fp2)
    assert_clean(first, "/items/17", "4242", origin)
    assert first.startswith("Server error '<int> Service Unavailable' for url <quoted>")


# --------------------------------------------------------------------------- databases


@pytest.fixture
def pg_table() -> Iterator[tuple[Any, str]]:
    require_service("PostgreSQL", POSTGRES)
    psycopg = lib("psycopg")
    connection = psycopg.connect(
        host=POSTGRES[0], port=POSTGRES[1], user="postgres", dbname="test", autocommit=True
    )
    table = unique("raptor_fp")
    connection.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    try:
        yield connection, table
    finally:
        connection.execute(f"DROP TABLE IF EXISTS {table}")
        connection.close()


def test_postgres_duplicate_keys_with_different_ids_are_one_pattern(
    pg_table: tuple[Any, str],
) -> None:
    connection, table = pg_table
    connection.execute(f"INSERT INTO {table} VALUES (42, 'a'), (4711, 'b')")
    errors = [
        caught(lambda key=key: connection.execute(f"INSERT INTO {table} VALUES ({key}, 'x')"))
        for key in (42, 4711)
    ]
    (first, fp1), (second, fp2) = (pattern_of(e) for e in errors)
    assert (first, fp1) == (second, fp2)
    assert_clean(first, "4711")
    assert "duplicate key value violates unique constraint <quoted>" in first
    assert classify(errors[0]).category is ErrorCategory.INTEGRITY


def test_postgres_unknown_databases_are_one_pattern() -> None:
    require_service("PostgreSQL", POSTGRES)
    psycopg = lib("psycopg")
    names = (unique("nodb"), unique("nodb"))
    errors = [
        caught(
            lambda name=name: psycopg.connect(
                host=POSTGRES[0], port=POSTGRES[1], user="postgres", dbname=name, connect_timeout=5
            )
        )
        for name in names
    ]
    (first, fp1), (second, fp2) = (pattern_of(e) for e in errors)
    assert (first, fp1) == (second, fp2)
    assert_clean(first, *names, POSTGRES[1])
    assert "does not exist" in first


def test_mysql_duplicate_entries_keep_their_sentence_and_lose_their_values() -> None:
    require_service("MariaDB", MYSQL)
    pymysql = lib("pymysql")
    connection = pymysql.connect(
        host=MYSQL[0], port=MYSQL[1], user="root", password="", database="test", autocommit=True
    )
    table = unique("raptor_fp")
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
            cursor.execute(f"INSERT INTO {table} VALUES (42), (4711)")
            duplicates = [
                caught(lambda key=key: cursor.execute(f"INSERT INTO {table} VALUES ({key})"))
                for key in (42, 4711)
            ]
            missing = caught(lambda: cursor.execute(f"SELECT * FROM {table}_missing"))
            cursor.execute(f"DROP TABLE {table}")
    finally:
        connection.close()
    (first, fp1), (second, fp2) = (pattern_of(e) for e in duplicates)
    assert (first, fp1) == (second, fp2)
    assert first == '(<int>, "Duplicate entry <quoted> for key <quoted>")'
    # Another error of the same exception type is another pattern: the sentence tells them apart.
    assert pattern_of(missing)[1] != fp1


def test_redis_refused_on_two_ports_is_one_pattern() -> None:
    ports = (closed_port(), closed_port())
    errors = [
        # Without redis-py's own retries (three by default, backing off 4 s in all): the
        # error is the same, the first connect's.
        caught(
            lambda port=port: redis_client(
                host="127.0.0.1", port=port, socket_connect_timeout=1
            ).ping()
        )
        for port in ports
    ]
    (first, fp1), (second, fp2) = (pattern_of(e) for e in errors)
    assert (first, fp1) == (second, fp2)
    assert_clean(first, *ports)
    assert "connecting to <ip>:<int>" in first


def test_redis_server_errors_keep_their_words() -> None:
    require_service("Redis", REDIS)
    redis = lib("redis")
    client = redis.Redis(host=REDIS[0], port=REDIS[1], socket_connect_timeout=2)
    key = unique("raptor_fp")
    try:
        client.rpush(key, "x")
        wrong = caught(lambda: client.get(key))
    finally:
        client.delete(key)
        client.close()
    template, _ = pattern_of(wrong)
    assert template == "WRONGTYPE Operation against a key holding the wrong kind of value"


# --------------------------------------------------------------------------- the monitor


def test_the_monitor_groups_real_failures_by_pattern(pg_table: tuple[Any, str]) -> None:
    connection, table = pg_table
    connection.execute(f"INSERT INTO {table} SELECT g, 'seed' FROM generate_series(1, 30) g")
    runtime = Runtime()
    monitor = ErrorRecoveryMonitor(runtime=runtime, memory_reader=lambda: None)
    guard = Guard("postgres", runtime=runtime, retry=0, breaker=False)
    try:
        for key in range(1, 31):  # thirty duplicate keys, thirty different messages
            with pytest.raises(Exception, match="duplicate key"):
                guard.call(connection.execute, f"INSERT INTO {table} VALUES ({key}, 'dup')")
        with pytest.raises(Exception, match="does not exist"):
            guard.call(connection.execute, f"SELECT * FROM {table}_missing")
        patterns = monitor.analytics.patterns("postgres")["postgres"]
    finally:
        monitor.close()
    assert [(p.count, p.category) for p in patterns] == [(30, "integrity"), (1, "query")]
    assert patterns[0].share == pytest.approx(30 / 31)
    assert "unique constraint <quoted>" in patterns[0].template
