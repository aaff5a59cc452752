"""Raptor next to the contrib database instrumentations, in both load orders, and SQLAlchemy
on top: every statement still traced, nothing doubled, retries visible, the application's
objects still the driver's own."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import psycopg2.extras
import pymysql
import pytest
import redis
import sqlalchemy
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
from opentelemetry.instrumentation.pymysql import PyMySQLInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import create_async_engine

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import RecoveryFinished
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.redis import RedisIntegration
from otel_raptor.integrations.db.sqlite3 import SQLiteIntegration
from tests.integrations.db.conftest import (
    MYSQL_KWARGS,
    PG_DSN,
    PG_URL,
    Install,
    Installed,
    create_pg_flaky,
    drop_pg_flaky,
)
from tests.support.dbservers import free_port
from tests.support.services import MYSQL, POSTGRES, REDIS, require_service

ORDERS = ["contrib_first", "raptor_first"]


class Traced:
    """A contrib instrumentor and raptor's integration, installed in a given order."""

    def __init__(self, install: Install, contrib: Any, integration: type, order: str) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.contrib = contrib
        self.provider = provider
        if order == "contrib_first":
            contrib.instrument(tracer_provider=provider)
            self.raptor: Installed = install(integration)
        else:
            self.raptor = install(integration)
            contrib.instrument(tracer_provider=provider)

    def client_spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]

    def close(self) -> None:
        self.raptor.integration.uninstall()
        self.contrib.uninstrument()


@pytest.fixture
def traced(install: Install) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(contrib: Any, integration: type, order: str) -> Traced:
        pair = Traced(install, contrib, integration, order)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


@pytest.fixture
def pg_table(unique_name: str) -> Iterator[str]:
    require_service("PostgreSQL", POSTGRES)
    with psycopg2.connect(PG_DSN) as admin:
        admin.autocommit = True
        with admin.cursor() as cur:
            create_pg_flaky(cur.execute, unique_name)
    yield unique_name
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        drop_pg_flaky(cur.execute, unique_name)
    admin.close()


@pytest.fixture
def psycopg_connect_kept() -> Iterator[None]:
    """The contrib psycopg instrumentation's ``uninstrument()`` (0.66b1) replaces the class
    method ``Connection.connect`` with a method bound to ``Connection``, after which
    subclasses (and psycopg_pool's ``connection_class``) build plain ``Connection`` objects.
    Not ours to fix; put it back so the tests after these see psycopg whole."""
    saved = {cls: cls.__dict__["connect"] for cls in (psycopg.Connection, psycopg.AsyncConnection)}
    yield
    for cls, connect in saved.items():
        cls.connect = connect


@pytest.mark.usefixtures("psycopg_connect_kept")
@pytest.mark.parametrize("order", ORDERS)
def test_psycopg(traced: Callable[..., Traced], order: str, pg_table: str) -> None:
    pair = traced(PsycopgInstrumentor(), PsycopgIntegration, order)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SELECT 1")
        conn.execute(f"SELECT {pg_table}_flaky(1, '40001')")
    spans = pair.client_spans()
    # One span per logical statement: contrib's traced cursor calls the hooked one, so the
    # retry happens inside its span (which ends successfully).
    assert [s.name for s in spans].count("SELECT") == 2
    [finished] = pair.raptor.of(RecoveryFinished)
    assert finished.attempts == 2


@pytest.mark.parametrize("order", ORDERS)
def test_psycopg2_each_attempt_is_its_own_span(
    traced: Callable[..., Traced], order: str, pg_table: str
) -> None:
    pair = traced(Psycopg2Instrumentor(), Psycopg2Integration, order)
    conn = psycopg2.connect(PG_DSN)
    try:
        conn.autocommit = True
        psycopg2.extras.register_default_jsonb(conn)  # still a real connection
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        cursor.execute(f"SELECT {pg_table}_flaky(1, '40001')")
    finally:
        conn.close()
    spans = pair.client_spans()
    # Raptor's guarded cursor subclasses contrib's traced one: the retry re-enters the traced
    # execute, so each attempt is a span (the first one failed).
    assert len(spans) == 3
    assert [s.status.is_ok for s in spans] == [True, False, True]


@pytest.mark.parametrize("order", ORDERS)
async def test_asyncpg(traced: Callable[..., Traced], order: str, pg_table: str) -> None:
    pair = traced(AsyncPGInstrumentor(), AsyncpgIntegration, order)
    con = await asyncpg.connect(PG_URL)
    try:
        assert await con.fetchval("SELECT 1") == 1
        assert await con.fetchval(f"SELECT {pg_table}_flaky(1, '40001')") == 1
    finally:
        await con.close()
    spans = pair.client_spans()
    # Both wrap the same methods: the outer layer decides (contrib outer: one span around the
    # retries; raptor outer: one span per attempt).
    expected = 2 if order == "raptor_first" else 3
    assert len(spans) == expected


@pytest.mark.parametrize("order", ORDERS)
async def test_asyncpg_cursors(traced: Callable[..., Traced], order: str) -> None:
    pair = traced(AsyncPGInstrumentor(), AsyncpgIntegration, order)
    con = await asyncpg.connect(PG_URL)
    try:
        async with con.transaction():
            got = [r[0] async for r in con.cursor("SELECT generate_series(1, 5)", prefetch=2)]
            assert got == [1, 2, 3, 4, 5]
            cursor = await con.cursor("SELECT generate_series(1, 5)")
            assert [r[0] for r in await cursor.fetch(2)] == [1, 2]
            assert await cursor.forward(1) == 1
            service = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"
            pair.raptor.runtime.breakers.get(service).force_open()
            with pytest.raises(CircuitOpenError):
                await cursor.fetchrow()
            with pytest.raises(CircuitOpenError):
                await anext(aiter(con.cursor("SELECT 1")))
    finally:
        await con.close()
    # Both wrap the cursor's fetches: they are traced either way (the refused ones too).
    assert [s.name for s in pair.client_spans()].count("CURSOR: SELECT") >= 5


@pytest.mark.parametrize("order", ORDERS)
def test_pymysql(traced: Callable[..., Traced], order: str) -> None:
    require_service("MariaDB", MYSQL)
    pair = traced(PyMySQLInstrumentor(), PyMySQLIntegration, order)
    conn = pymysql.connect(**MYSQL_KWARGS)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.execute("SELECT 2")
    finally:
        conn.close()
    assert len(pair.client_spans()) == 2
    assert not pair.raptor.events


@pytest.mark.parametrize("order", ORDERS)
def test_redis(traced: Callable[..., Traced], order: str, unique_name: str) -> None:
    require_service("Redis", REDIS)
    pair = traced(RedisInstrumentor(), RedisIntegration, order)
    client = redis.Redis(host=REDIS[0], port=REDIS[1])
    client.set(unique_name, "1")
    assert client.get(unique_name) == b"1"
    pipe = client.pipeline()
    pipe.get(unique_name).delete(unique_name)
    assert pipe.execute() == [b"1", 1]
    assert [s.name for s in pair.client_spans()] == ["SET", "GET", "GET DEL"]


@pytest.mark.parametrize("order", ORDERS)
def test_sqlite3(traced: Callable[..., Traced], order: str, tmp_path: Path) -> None:
    pair = traced(SQLite3Instrumentor(), SQLiteIntegration, order)
    conn = sqlite3.connect(tmp_path / "t.db")
    try:
        cursor = conn.cursor()
        cursor.execute("CREATE TABLE t (v INTEGER)")
        cursor.execute("INSERT INTO t VALUES (1)")
    finally:
        conn.close()
    assert len(pair.client_spans()) == 2


# --- SQLAlchemy on top ----------------------------------------------------------------------------


def test_sqlalchemy_on_psycopg_and_psycopg2(install: Install) -> None:
    require_service("PostgreSQL", POSTGRES)
    install(PsycopgIntegration)
    install(Psycopg2Integration)
    host, port = POSTGRES
    for driver in ("psycopg", "psycopg2"):
        engine = sqlalchemy.create_engine(f"postgresql+{driver}://postgres@{host}:{port}/test")
        try:
            with engine.connect() as conn:
                value = conn.execute(sqlalchemy.text("""SELECT '{"a": [1]}'::json""")).scalar()
                assert value == {"a": [1]}
        finally:
            engine.dispose()


def test_sqlalchemy_sees_an_open_breaker_as_an_operational_error(install: Install) -> None:
    install(PsycopgIntegration, max_retries=0)
    engine = sqlalchemy.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test", pool_pre_ping=True
    )
    try:
        for _ in range(3):
            with pytest.raises(sqlalchemy.exc.OperationalError):
                engine.connect()
        with pytest.raises(sqlalchemy.exc.OperationalError) as refused:
            engine.connect()
        assert isinstance(refused.value.orig, CircuitOpenError)
    finally:
        engine.dispose()


def test_sqlalchemy_on_pymysql_and_sqlite3(install: Install, tmp_path: Path) -> None:
    require_service("MariaDB", MYSQL)
    install(PyMySQLIntegration)
    install(SQLiteIntegration)
    host, port = MYSQL
    for url in (f"mysql+pymysql://root@{host}:{port}/test", f"sqlite:///{tmp_path / 's.db'}"):
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()


async def test_sqlalchemy_on_asyncpg(install: Install) -> None:
    require_service("PostgreSQL", POSTGRES)
    installed = install(AsyncpgIntegration)
    host, port = POSTGRES
    engine = create_async_engine(f"postgresql+asyncpg://postgres@{host}:{port}/test")
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sqlalchemy.text("SELECT 1"))
            assert result.scalar() == 1
    finally:
        await engine.dispose()
    assert not installed.of(RecoveryFinished)
