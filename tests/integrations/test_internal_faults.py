"""Ground rule 1, swept: a bug of ours never reaches the app's call.

For every guarded call path (requests, httpx sync and async, psycopg sync and async, psycopg2,
asyncpg, PyMySQL, redis-py sync and asyncio with pipelines, sqlite3, ``Guard.call``,
``Guard.call_async`` and ``@resilient``), against the loopback HTTP server and the shared
databases, one raptor internal at a time is made to raise (the classifier, the integration's
describe step, the event bus and the telemetry sink, the metric instruments, span starts, the
breaker's bookkeeping, the retry budget, the learner, the stale cache, the attempt loop, ...)
and each path runs the same script twice: a call that succeeds and calls that fail (a
failing result where the library has one, and an exception). Each must end exactly as it does
without raptor (the same result, the same exception type), reach the server exactly as often
(counted server-side: requests, rows, a sequence, a counter key), and every site of the bug
is logged once, however many calls met it.

Failing exporters and providers are covered too: an OTLP exporter pointing at a closed port,
span processors that raise in ``on_start``/``on_end``, a meter reader that raises on collect,
tracer and meter providers that cannot hand out a tracer, a meter or an instrument.

Then the paths off the plain one: a call that recovers (a failure, then a retry that
succeeds: the app gets raptor's answer or the plain one, never more sends), breakers held
open whose refusal cannot be built (the call runs), a refused request whose library answer
or failover URL cannot be built, raptor's span processor under the contrib instrumentations,
the monitor's redaction drained in the call, an app's cursor class, a Redis pipeline that
cannot be put back, redis-py ``Retry`` arguments we cannot read, and two failing
subscribers (each reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import psycopg
import psycopg2
import pymysql
import pytest
import redis
import redis.asyncio
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal import instrument as sdk_instrument
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_raptor.config import DownstreamOverride
from otel_raptor.core.attempts import AttemptLoop
from otel_raptor.core.breaker import BreakerCore
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.classify import Classifier
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.integrations import _http
from otel_raptor.integrations import httpx as httpx_integration
from otel_raptor.integrations import requests as requests_integration
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import HttpHooks, ResendCountSpanProcessor, StaleCache
from otel_raptor.integrations.db import psycopg as psycopg_integration
from otel_raptor.integrations.db import psycopg2 as psycopg2_integration
from otel_raptor.integrations.db import redis as redis_integration
from otel_raptor.integrations.db import sqlite3 as sqlite3_integration
from otel_raptor.integrations.db._common import DbHooks, DbState
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.redis import RedisIntegration
from otel_raptor.integrations.db.sqlite3 import SQLiteIntegration
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.breaker import BreakerRegistry, CircuitBreaker
from otel_raptor.runtime.decorator import resilient
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink
from tests.integrations.db.conftest import MYSQL_KWARGS, PG_DSN, fast_config
from tests.support.faulty_http import FaultyHTTPServer, closed_port, reset, status
from tests.support.services import MYSQL, POSTGRES, REDIS, require_service

REPORT_PREFIX = "otel_raptor internal error in "


class InjectedBug(RuntimeError):
    """The bug planted in raptor's code."""


# --- what one run of a path observed ----------------------------------------------------------


@dataclass
class Observed:
    """The outcomes of a path's script (results normalised, exceptions by exact type) and how
    often each kind of call reached the server."""

    outcomes: list[tuple[Any, ...]] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)

    def ok(self, value: Any) -> None:
        self.outcomes.append(("returned", value))

    def raised(self, error: BaseException) -> None:
        self.outcomes.append(("raised", type(error)))


def outcome(observed: Observed, call: Callable[[], Any], normalise: Callable[[Any], Any]) -> None:
    try:
        value = call()
    except Exception as error:
        observed.raised(error)
    else:
        observed.ok(normalise(value))


async def outcome_async(
    observed: Observed, call: Callable[[], Any], normalise: Callable[[Any], Any]
) -> None:
    try:
        value = await call()
    except Exception as error:
        observed.raised(error)
    else:
        observed.ok(normalise(value))


#: Each script runs its successful call and its failing calls this many times.
ROUNDS = 2


# --- the installation -------------------------------------------------------------------------


@dataclass
class Env:
    """One test's runtime and telemetry (a real SDK tracer and meter provider)."""

    runtime: Runtime
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    sink: TelemetrySink
    installed: list[Any] = field(default_factory=list)
    stale_if_error: bool = True

    def install(self, integration_type: type, *, stale_if_error: bool | None = None) -> None:
        integration = integration_type()
        if stale_if_error is None:
            stale_if_error = self.stale_if_error
        # The script's run of failures between two successes (two calls) does not open the
        # breaker, but three would: a bug that hid the successes from it opened it, and
        # turned the next failure into a refusal (the breaker then stops judging instead).
        config = fast_config(
            max_retries=2,
            failure_threshold=3,
            downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=stale_if_error),),
        )
        integration.install(IntegrationSettings(runtime=self.runtime, config=config))
        self.installed.append(integration)

    def close(self) -> None:
        for integration in reversed(self.installed):
            integration.uninstall()
        self.installed.clear()
        self.sink.uninstall()
        self.runtime.health.stop()


def make_env(*processors: SpanProcessor) -> Env:
    runtime = Runtime()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(ResendCountSpanProcessor())
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    sink = TelemetrySink(
        runtime=runtime, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    sink.install()
    return Env(runtime, tracer_provider, meter_provider, reader, spans, sink)


# --- the paths --------------------------------------------------------------------------------


def _response(response: Any) -> tuple[int, str]:
    return (response.status_code, response.text)


@contextlib.contextmanager
def _http_server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as server:
        yield server


def _http_hits(server: FaultyHTTPServer, observed: Observed) -> None:
    observed.hits = {
        "GET": server.count("GET", "/ok"),
        "POST": server.count("POST", "/fail"),
    }


def path_requests(env: Env | None) -> Observed:
    if env is not None:
        env.install(RequestsIntegration)
    observed = Observed()
    with _http_server() as server, requests.Session() as session:
        for _ in range(ROUNDS):
            outcome(observed, lambda: session.get(server.url("/ok"), timeout=5), _response)
            server.push(status(503))
            outcome(
                observed,
                lambda: session.post(server.url("/fail"), data=b"x", timeout=5),
                _response,
            )
            server.push(reset())
            outcome(
                observed,
                lambda: session.post(server.url("/fail"), data=b"x", timeout=5),
                _response,
            )
        _http_hits(server, observed)
    return observed


def path_httpx(env: Env | None) -> Observed:
    if env is not None:
        env.install(HttpxIntegration)
    observed = Observed()
    with _http_server() as server, httpx.Client(timeout=5) as client:
        for _ in range(ROUNDS):
            outcome(observed, lambda: client.get(server.url("/ok")), _response)
            server.push(status(503))
            outcome(observed, lambda: client.post(server.url("/fail"), content=b"x"), _response)
            server.push(reset())
            outcome(observed, lambda: client.post(server.url("/fail"), content=b"x"), _response)
        _http_hits(server, observed)
    return observed


def path_httpx_async(env: Env | None) -> Observed:
    if env is not None:
        env.install(HttpxIntegration)
    observed = Observed()

    async def script(server: FaultyHTTPServer) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(ROUNDS):
                await outcome_async(observed, lambda: client.get(server.url("/ok")), _response)
                server.push(status(503))
                await outcome_async(
                    observed, lambda: client.post(server.url("/fail"), content=b"x"), _response
                )
                server.push(reset())
                await outcome_async(
                    observed, lambda: client.post(server.url("/fail"), content=b"x"), _response
                )

    with _http_server() as server:
        asyncio.run(script(server))
        _http_hits(server, observed)
    return observed


def _name() -> str:
    return f"raptor_rule1_{secrets.token_hex(4)}"


@contextlib.contextmanager
def _pg_objects() -> Iterator[str]:
    """A table ``name`` and ``name_fail()``, which counts its runs in a sequence (no
    rollback undoes ``nextval``) and raises ``22012`` every time."""
    require_service("PostgreSQL", POSTGRES)
    name = _name()
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (v int)")
        cur.execute(f"CREATE SEQUENCE {name}_seq")
        cur.execute(
            f"""CREATE FUNCTION {name}_fail() RETURNS int LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM nextval('{name}_seq');
                RAISE EXCEPTION 'injected' USING ERRCODE = '22012';
            END $$"""
        )
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")
            cur.execute(f"DROP FUNCTION IF EXISTS {name}_fail()")
            cur.execute(f"DROP SEQUENCE IF EXISTS {name}_seq")
        admin.close()


def _pg_hits(name: str, observed: Observed) -> None:
    admin = psycopg2.connect(PG_DSN)
    try:
        with admin.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {name}")
            rows = cur.fetchone()[0]
            cur.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {name}_seq")
            runs = cur.fetchone()[0]
    finally:
        admin.close()
    observed.hits = {"insert": rows, "fail": runs}


def path_psycopg(env: Env | None) -> Observed:
    observed = Observed()
    with _pg_objects() as name:
        if env is not None:
            env.install(PsycopgIntegration)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for _ in range(ROUNDS):
                outcome(
                    observed,
                    lambda: conn.execute(f"INSERT INTO {name} VALUES (1) RETURNING v").fetchall(),
                    repr,
                )
                outcome(observed, lambda: conn.execute(f"SELECT {name}_fail()").fetchall(), repr)
        _pg_hits(name, observed)
    return observed


def path_psycopg_async(env: Env | None) -> Observed:
    observed = Observed()

    async def script(name: str) -> None:
        conn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
        async with conn:
            for _ in range(ROUNDS):

                async def insert() -> Any:
                    cur = await conn.execute(f"INSERT INTO {name} VALUES (1) RETURNING v")
                    return await cur.fetchall()

                async def fail() -> Any:
                    cur = await conn.execute(f"SELECT {name}_fail()")
                    return await cur.fetchall()

                await outcome_async(observed, insert, repr)
                await outcome_async(observed, fail, repr)

    with _pg_objects() as name:
        if env is not None:
            env.install(PsycopgIntegration)
        asyncio.run(script(name))
        _pg_hits(name, observed)
    return observed


def path_psycopg2(env: Env | None) -> Observed:
    observed = Observed()
    with _pg_objects() as name:
        if env is not None:
            env.install(Psycopg2Integration)
        conn = psycopg2.connect(PG_DSN)
        conn.autocommit = True
        try:
            for _ in range(ROUNDS):
                with conn.cursor() as cur:
                    outcome(
                        observed,
                        lambda: (
                            cur.execute(f"INSERT INTO {name} VALUES (1) RETURNING v"),
                            cur.fetchall(),
                        ),
                        repr,
                    )
                with conn.cursor() as cur:
                    outcome(
                        observed,
                        lambda: (cur.execute(f"SELECT {name}_fail()"), cur.fetchall()),
                        repr,
                    )
        finally:
            conn.close()
        _pg_hits(name, observed)
    return observed


def path_asyncpg(env: Env | None) -> Observed:
    observed = Observed()

    async def script(name: str) -> None:
        conn = await asyncpg.connect(
            host=POSTGRES[0], port=POSTGRES[1], user="postgres", database="test"
        )
        try:
            for _ in range(ROUNDS):
                await outcome_async(
                    observed,
                    lambda: conn.fetch(f"INSERT INTO {name} VALUES (1) RETURNING v"),
                    lambda rows: [tuple(r) for r in rows],
                )
                await outcome_async(
                    observed,
                    lambda: conn.fetch(f"SELECT {name}_fail()"),
                    lambda rows: [tuple(r) for r in rows],
                )
        finally:
            await conn.close()

    with _pg_objects() as name:
        if env is not None:
            env.install(AsyncpgIntegration)
        asyncio.run(script(name))
        _pg_hits(name, observed)
    return observed


def path_pymysql(env: Env | None) -> Observed:
    require_service("MariaDB", MYSQL)
    observed = Observed()
    name = _name()
    admin = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE TABLE {name} (v INT)")
            # MyISAM: the row the procedure inserts stays when its SIGNAL fails the CALL.
            cur.execute(
                f"CREATE TABLE {name}_runs (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=MyISAM"
            )
            cur.execute(
                f"CREATE PROCEDURE {name}_fail() BEGIN INSERT INTO {name}_runs VALUES (NULL); "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected'; END"
            )
        if env is not None:
            env.install(PyMySQLIntegration)
        conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
        try:
            for _ in range(ROUNDS):
                with conn.cursor() as cur:
                    outcome(observed, lambda: cur.execute(f"INSERT INTO {name} VALUES (1)"), repr)
                with conn.cursor() as cur:
                    outcome(observed, lambda: cur.execute(f"CALL {name}_fail()"), repr)
        finally:
            conn.close()
        with admin.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {name}")
            rows = cur.fetchone()[0]
            cur.execute(f"SELECT COUNT(*) FROM {name}_runs")
            runs = cur.fetchone()[0]
        observed.hits = {"insert": rows, "fail": runs}
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")
            cur.execute(f"DROP TABLE IF EXISTS {name}_runs")
            cur.execute(f"DROP PROCEDURE IF EXISTS {name}_fail")
        admin.close()
    return observed


#: Counts its runs in KEYS[1], then fails.
FAILING_SCRIPT = "redis.call('INCR', KEYS[1]); return redis.error_reply('injected')"


def _redis_hits(name: str, observed: Observed) -> None:
    admin = redis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        observed.hits = {
            "incr": int(admin.get(f"{name}:ok") or 0),
            "fail": int(admin.get(f"{name}:runs") or 0),
        }
        admin.delete(f"{name}:ok", f"{name}:runs")
    finally:
        admin.close()


def path_redis(env: Env | None) -> Observed:
    require_service("Redis", REDIS)
    if env is not None:
        env.install(RedisIntegration)
    observed = Observed()
    name = _name()
    client = redis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        for _ in range(ROUNDS):
            outcome(observed, lambda: client.incr(f"{name}:ok"), repr)
            outcome(observed, lambda: client.eval(FAILING_SCRIPT, 1, f"{name}:runs"), repr)
    finally:
        client.close()
    _redis_hits(name, observed)
    return observed


def path_redis_pipeline(env: Env | None) -> Observed:
    require_service("Redis", REDIS)
    if env is not None:
        env.install(RedisIntegration)
    observed = Observed()
    name = _name()
    client = redis.Redis(host=REDIS[0], port=REDIS[1])

    def good() -> Any:
        pipe = client.pipeline(transaction=True)
        pipe.incr(f"{name}:ok")
        pipe.get(f"{name}:ok")
        return pipe.execute()

    def bad() -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.eval(FAILING_SCRIPT, 1, f"{name}:runs")
        return pipe.execute()

    try:
        for _ in range(ROUNDS):
            outcome(observed, good, repr)
            outcome(observed, bad, repr)
    finally:
        client.close()
    _redis_hits(name, observed)
    return observed


def path_redis_async(env: Env | None) -> Observed:
    require_service("Redis", REDIS)
    if env is not None:
        env.install(RedisIntegration)
    observed = Observed()
    name = _name()

    async def script() -> None:
        client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1])
        try:
            for _ in range(ROUNDS):
                await outcome_async(observed, lambda: client.incr(f"{name}:ok"), repr)
                await outcome_async(
                    observed, lambda: client.eval(FAILING_SCRIPT, 1, f"{name}:runs"), repr
                )
        finally:
            await client.aclose()

    asyncio.run(script())
    _redis_hits(name, observed)
    return observed


def path_redis_async_pipeline(env: Env | None) -> Observed:
    require_service("Redis", REDIS)
    if env is not None:
        env.install(RedisIntegration)
    observed = Observed()
    name = _name()

    async def script() -> None:
        client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1])

        async def good() -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.incr(f"{name}:ok")
            pipe.get(f"{name}:ok")
            return await pipe.execute()

        async def bad() -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.eval(FAILING_SCRIPT, 1, f"{name}:runs")
            return await pipe.execute()

        try:
            for _ in range(ROUNDS):
                await outcome_async(observed, good, repr)
                await outcome_async(observed, bad, repr)
        finally:
            await client.aclose()

    asyncio.run(script())
    _redis_hits(name, observed)
    return observed


def path_sqlite3(env: Env | None) -> Observed:
    if env is not None:
        env.install(SQLiteIntegration)
    observed = Observed()
    runs = Counter[str]()

    def fail() -> int:
        runs["fail"] += 1
        raise ValueError("injected")

    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.create_function("raptor_fail", 0, fail)
        conn.execute("CREATE TABLE t (v int)")
        for _ in range(ROUNDS):
            outcome(
                observed,
                lambda: conn.execute("INSERT INTO t VALUES (1) RETURNING v").fetchall(),
                repr,
            )
            outcome(observed, lambda: conn.execute("SELECT raptor_fail()").fetchall(), repr)
        rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        conn.close()
    observed.hits = {"insert": rows, "fail": runs["fail"]}
    return observed


class _Work:
    """A function's calls, counted: ``ok`` returns a fresh object, ``fail`` raises a
    connection error (a downstream failure the breaker counts)."""

    def __init__(self) -> None:
        self.runs = Counter[str]()

    def ok(self, value: int) -> dict[str, int]:
        self.runs["ok"] += 1
        return {"value": value}

    def fail(self) -> None:
        self.runs["fail"] += 1
        raise ConnectionRefusedError("injected")

    async def ok_async(self, value: int) -> dict[str, int]:
        return self.ok(value)

    async def fail_async(self) -> None:
        self.fail()


def _guard(env: Env | None) -> Guard | None:
    if env is None:
        return None
    # Not replay safe: a failure must never be sent again.
    return Guard(
        "rule1-guard",
        retry=RetryPolicy(max_retries=2, base_delay=0.001, max_delay=0.002),
        replay_safe=False,
        runtime=env.runtime,
    )


def path_guard_call(env: Env | None) -> Observed:
    guard, work, observed = _guard(env), _Work(), Observed()
    for _ in range(ROUNDS):
        if guard is None:
            outcome(observed, lambda: work.ok(7), repr)
            outcome(observed, work.fail, repr)
        else:
            outcome(observed, lambda: guard.call(work.ok, 7), repr)
            outcome(observed, lambda: guard.call(work.fail), repr)
    observed.hits = dict(work.runs)
    return observed


def path_guard_call_async(env: Env | None) -> Observed:
    guard, work, observed = _guard(env), _Work(), Observed()

    async def script() -> None:
        for _ in range(ROUNDS):
            if guard is None:
                await outcome_async(observed, lambda: work.ok_async(7), repr)
                await outcome_async(observed, work.fail_async, repr)
            else:
                await outcome_async(observed, lambda: guard.call_async(work.ok_async, 7), repr)
                await outcome_async(observed, lambda: guard.call_async(work.fail_async), repr)

    asyncio.run(script())
    observed.hits = dict(work.runs)
    return observed


def path_resilient(env: Env | None) -> Observed:
    work, observed = _Work(), Observed()
    ok, fail = work.ok, work.fail
    if env is not None:
        decorate = resilient(
            service="rule1-resilient",
            retry=RetryPolicy(max_retries=2, base_delay=0.001, max_delay=0.002),
            replay_safe=False,
            runtime=env.runtime,
        )
        ok, fail = decorate(ok), decorate(fail)
    for _ in range(ROUNDS):
        outcome(observed, lambda: ok(7), repr)
        outcome(observed, fail, repr)
    observed.hits = dict(work.runs)
    return observed


PATHS: dict[str, Callable[[Env | None], Observed]] = {
    "requests": path_requests,
    "httpx": path_httpx,
    "httpx-async": path_httpx_async,
    "psycopg": path_psycopg,
    "psycopg-async": path_psycopg_async,
    "psycopg2": path_psycopg2,
    "asyncpg": path_asyncpg,
    "pymysql": path_pymysql,
    "redis": path_redis,
    "redis-pipeline": path_redis_pipeline,
    "redis-async": path_redis_async,
    "redis-async-pipeline": path_redis_async_pipeline,
    "sqlite3": path_sqlite3,
    "guard-call": path_guard_call,
    "guard-call-async": path_guard_call_async,
    "resilient": path_resilient,
}
HTTP_PATHS = frozenset({"requests", "httpx", "httpx-async"})
DB_PATHS = frozenset(PATHS) - HTTP_PATHS - {"guard-call", "guard-call-async", "resilient"}
REDIS_PATHS = frozenset(p for p in PATHS if p.startswith("redis"))
PG_PATHS = frozenset({"psycopg", "psycopg-async", "psycopg2"})

_baselines: dict[str, Observed] = {}


def without_raptor(path: str) -> Observed:
    """What the path's script does with nothing of raptor installed (computed once)."""
    found = _baselines.get(path)
    if found is None:
        found = _baselines[path] = PATHS[path](None)
    return found


# --- the faults -------------------------------------------------------------------------------


class Fault:
    """Raptor internals made to raise: ``(owner, attribute)`` pairs, patched on the class or
    module. ``paths`` limits it to the paths whose calls reach it (``None``: all)."""

    def __init__(self, *targets: tuple[object, str], paths: frozenset[str] | None = None) -> None:
        self.targets = targets
        self.paths = paths
        self.hits = 0

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for owner, attribute in self.targets:
            original = getattr(owner, attribute)
            monkeypatch.setattr(owner, attribute, self._raiser(original))

    def _raiser(self, original: object) -> Any:
        fault = self

        def boom(*args: Any, **kwargs: Any) -> Any:
            fault.hits += 1
            raise InjectedBug("a bug in otel_raptor")

        # Named as the function it stands for (reports name their site by it).
        boom.__name__ = getattr(original, "__name__", boom.__name__)
        boom.__qualname__ = getattr(original, "__qualname__", boom.__qualname__)

        if isinstance(original, staticmethod):
            return staticmethod(boom)
        return boom


FAULTS: dict[str, Callable[[], Fault]] = {
    "none": Fault,
    "classifier": lambda: Fault((Classifier, "classify")),
    "route-classify": lambda: Fault((Route, "classify")),
    "event-publish": lambda: Fault((Runtime, "publish")),
    "sink-publish": lambda: Fault((TelemetrySink, "publish")),
    "sink-span-events": lambda: Fault(
        (TelemetrySink, "_buffer"), (TelemetrySink, "_emit_recovery_span")
    ),
    "instruments": lambda: Fault(
        (sdk_instrument._Counter, "add"), (sdk_instrument._Histogram, "record")
    ),
    "span-start": lambda: Fault((Tracer, "start_span")),
    "recovery-scope": lambda: Fault((TelemetrySink, "recovery_scope")),
    "breaker-success": lambda: Fault(
        (CircuitBreaker, "record_success_since"), (CircuitBreaker, "record_success")
    ),
    "breaker-core-success": lambda: Fault((BreakerCore, "on_success")),
    "breaker-failure": lambda: Fault((CircuitBreaker, "record_failure")),
    "budget": lambda: Fault((Runtime, "withdraw"), (RetryBudget, "try_withdraw")),
    "learner": lambda: Fault(
        (Runtime, "should_retry"), (Runtime, "record_outcome"), (Runtime, "note_failure")
    ),
    "attempt-loop": lambda: Fault((AttemptLoop, "__init__")),
    "loop-verdict": lambda: Fault((AttemptLoop, "first_failed"), (AttemptLoop, "failed")),
    "give-up": lambda: Fault((CallHooks, "give_up"), (HttpHooks, "give_up")),
    "resend-count": lambda: Fault((_http, "current_resend")),
    "stale-cache": lambda: Fault((StaleCache, "put"), (StaleCache, "get"), paths=HTTP_PATHS),
    "failure-of": lambda: Fault((_http, "_failing"), (HttpHooks, "failure_of"), paths=HTTP_PATHS),
    "http-describe": lambda: Fault(
        (requests_integration._Installed, "describe"),
        (httpx_integration._Installed, "describe"),
        paths=HTTP_PATHS,
    ),
    "db-describe": lambda: Fault((DbState, "target"), paths=DB_PATHS),
    "redis-retry-step": lambda: Fault((redis_integration, "_is_health_check"), paths=REDIS_PATHS),
    "redis-pipeline-restore": lambda: Fault(
        (redis_integration._PipelineRun, "restore"),
        paths=frozenset({"redis-pipeline", "redis-async-pipeline"}),
    ),
    "pg-statement-timeout": lambda: Fault(
        (psycopg_integration, "statement_timeout_query"),
        (psycopg2_integration, "statement_timeout_query"),
        paths=PG_PATHS,
    ),
}


def _reports(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    found = Counter[str]()
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "otel_raptor" and message.startswith(REPORT_PREFIX):
            found[message[len(REPORT_PREFIX) :].split(";")[0]] += 1
    return found


def _cases() -> Iterator[Any]:
    for fault_name, make in FAULTS.items():
        scope = make().paths
        for path in PATHS:
            if scope is None or path in scope:
                yield pytest.param(path, fault_name, id=f"{path}-{fault_name}")


@pytest.fixture(autouse=True)
def _fresh_reports() -> Iterator[None]:
    _reset_for_tests()
    yield
    _reset_for_tests()


@pytest.mark.parametrize(("path", "fault_name"), list(_cases()))
def test_a_bug_of_ours_never_changes_the_call(
    path: str,
    fault_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = without_raptor(path)
    fault = FAULTS[fault_name]()
    fault.apply(monkeypatch)
    env = make_env()
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = PATHS[path](env)
    finally:
        env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    reports = _reports(caplog)
    assert all(count == 1 for count in reports.values()), reports  # once per site
    if fault_name == "none":
        assert not reports
    elif fault.hits:
        assert reports, "the bug was met but never logged"


# --- failing exporters and providers ----------------------------------------------------------


class RaisingProcessor(SpanProcessor):
    """A span processor that fails in ``on_start`` or ``on_end``."""

    def __init__(self, *, on_start: bool = False, on_end: bool = False) -> None:
        self._start = on_start
        self._end = on_end

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if self._start:
            raise InjectedBug("on_start")

    def on_end(self, span: ReadableSpan) -> None:
        if self._end:
            raise InjectedBug("on_end")


def _otlp_processor() -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{closed_port()}/v1/traces", timeout=0.5)
    return SimpleSpanProcessor(exporter)


EXPORT_FAULTS: dict[str, Callable[[], SpanProcessor]] = {
    "processor-on-start": lambda: RaisingProcessor(on_start=True),
    "processor-on-end": lambda: RaisingProcessor(on_end=True),
    "otlp-closed-port": _otlp_processor,
}


@pytest.mark.parametrize("export_fault", list(EXPORT_FAULTS))
@pytest.mark.parametrize("path", ["requests", "httpx-async", "psycopg", "redis", "guard-call"])
def test_a_failing_span_pipeline_never_changes_the_call(
    path: str, export_fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected = without_raptor(path)
    env = make_env(EXPORT_FAULTS[export_fault]())
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = PATHS[path](env)
    finally:
        env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    assert all(count == 1 for count in _reports(caplog).values()), _reports(caplog)


class RaisingReader(InMemoryMetricReader):
    """A metric reader whose collection fails."""

    def _receive_metrics(self, *args: Any, **kwargs: Any) -> None:
        raise InjectedBug("collect")


def test_a_meter_reader_that_fails_on_collect_never_changes_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = without_raptor("requests")
    env = make_env()
    reader = RaisingReader()
    env.sink.uninstall()
    env.meter_provider = MeterProvider(metric_readers=[reader])
    env.sink = TelemetrySink(
        runtime=env.runtime,
        tracer_provider=env.tracer_provider,
        meter_provider=env.meter_provider,
    )
    env.sink.install()
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = path_requests(env)
            with pytest.raises(InjectedBug):
                reader.collect()  # the reader's own failure is the reader's caller's
            again = path_requests(env)
    finally:
        env.close()
    assert seen.outcomes == expected.outcomes == again.outcomes
    assert seen.hits == expected.hits


# --- raptor's span processor under the contrib instrumentations ------------------------------


CONTRIB = {"requests": "requests", "httpx": "httpx", "httpx-async": "httpx"}


def _contrib(name: str) -> Any:
    if name == "requests":
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        return RequestsInstrumentor()
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    return HTTPXClientInstrumentor()


@pytest.mark.parametrize("path", list(CONTRIB))
def test_a_bug_in_the_resend_count_processor_never_reaches_the_app(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # ResendCountSpanProcessor sits on the app's tracer provider: it runs for every span
    # started there, the contrib instrumentations' client spans and the app's own.
    expected = without_raptor(path)
    fault = Fault((_http, "current_resend"))
    fault.apply(monkeypatch)
    env = make_env()
    contrib = _contrib(CONTRIB[path])
    contrib.instrument(tracer_provider=env.tracer_provider)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = PATHS[path](env)
            env.tracer_provider.get_tracer("app").start_span("app work").end()
    finally:
        contrib.uninstrument()
        env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    assert fault.hits
    reports = _reports(caplog)
    assert reports
    assert all(count == 1 for count in reports.values()), reports


# --- a refusal that cannot be built ------------------------------------------------------------


def _get_twice(
    path: str, server: FaultyHTTPServer, between: Callable[[], None], second: str
) -> Observed:
    """GET ``/ok`` with ``path``'s client, run ``between``, then GET ``second``."""
    observed = Observed()
    first, then = server.url("/ok"), server.url(second)
    if path == "requests":
        with requests.Session() as session:
            outcome(observed, lambda: session.get(first, timeout=5), _response)
            between()
            outcome(observed, lambda: session.get(then, timeout=5), _response)
    elif path == "httpx":
        with httpx.Client(timeout=5) as client:
            outcome(observed, lambda: client.get(first), _response)
            between()
            outcome(observed, lambda: client.get(then), _response)
    else:

        async def script() -> None:
            async with httpx.AsyncClient(timeout=5) as client:
                await outcome_async(observed, lambda: client.get(first), _response)
                between()
                await outcome_async(observed, lambda: client.get(then), _response)

        asyncio.run(script())
    observed.hits = {"GET": server.count("GET")}
    return observed


@pytest.mark.parametrize("stale_if_error", [False, True], ids=["plain", "with-fallbacks"])
@pytest.mark.parametrize("path", sorted(HTTP_PATHS))
def test_a_refusal_that_cannot_be_built_lets_the_call_proceed(
    path: str,
    stale_if_error: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The breaker is open: raptor would refuse with the library's fail-fast error. Should
    # building that error fail, the call goes ahead as it would without raptor. (With
    # stale-if-error the request is described with its fallbacks; it asks for a page that has
    # no stale copy, so the refusal is the answer.)
    env = make_env()
    env.install(
        RequestsIntegration if path == "requests" else HttpxIntegration,
        stale_if_error=stale_if_error,
    )
    fault = Fault((requests_integration, "_refusal"), (httpx_integration, "_refusal"))

    def open_breakers() -> None:
        for _, breaker in env.runtime.breakers.items():
            breaker.force_open()
        fault.apply(monkeypatch)

    try:
        with _http_server() as server, caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = _get_twice(path, server, open_breakers, "/other")
    finally:
        env.close()
    assert seen.outcomes == [("returned", (200, "ok"))] * 2
    assert seen.hits == {"GET": 2}
    assert fault.hits
    assert _reports(caplog) == Counter({f"{path.partition('-')[0]}.refusal": 1})


# --- a failover URL that cannot be described ---------------------------------------------------


@pytest.mark.parametrize("path", sorted(HTTP_PATHS))
def test_a_failover_url_that_cannot_be_described_is_sent_as_without_raptor(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A POST refused by its origin's open breaker goes to the failover URL (never sent,
    # so any URL may have it). A bug of ours describing that URL must not become the app's
    # answer: the request goes there unguarded, as to an origin raptor leaves alone.
    with _http_server() as primary, _http_server() as backup:
        env = make_env()
        integration = RequestsIntegration() if path == "requests" else HttpxIntegration()
        config = fast_config(
            failure_threshold=50,
            downstreams=(
                DownstreamOverride(
                    pattern=f"127.0.0.1:{primary.port}", failover_urls=(backup.url(""),)
                ),
            ),
        )
        integration.install(IntegrationSettings(runtime=env.runtime, config=config))
        env.installed.append(integration)
        describe_parts = _http.OriginTable.for_parts
        describe_prefix = _http.OriginTable.for_prefix
        hits: list[object] = []

        def for_parts(table: Any, scheme: str, host: str, port: int | None) -> Any:
            if port == backup.port:
                hits.append(port)
                raise InjectedBug("a bug in otel_raptor")
            return describe_parts(table, scheme, host, port)

        def for_prefix(table: Any, prefix: str) -> Any:
            if prefix.endswith(f":{backup.port}"):
                hits.append(prefix)
                raise InjectedBug("a bug in otel_raptor")
            return describe_prefix(table, prefix)

        monkeypatch.setattr(_http.OriginTable, "for_parts", for_parts)
        monkeypatch.setattr(_http.OriginTable, "for_prefix", for_prefix)

        def open_breakers() -> None:
            for _, breaker in env.runtime.breakers.items():
                breaker.force_open()

        observed = Observed()
        try:
            with caplog.at_level(logging.WARNING, logger="otel_raptor"):
                if path == "requests":
                    with requests.Session() as session:
                        session.get(primary.url("/ok"), timeout=5)
                        open_breakers()
                        outcome(
                            observed,
                            lambda: session.post(primary.url("/fail"), data=b"x", timeout=5),
                            _response,
                        )
                elif path == "httpx":
                    with httpx.Client(timeout=5) as client:
                        client.get(primary.url("/ok"))
                        open_breakers()
                        outcome(
                            observed,
                            lambda: client.post(primary.url("/fail"), content=b"x"),
                            _response,
                        )
                else:

                    async def script() -> None:
                        async with httpx.AsyncClient(timeout=5) as client:
                            await client.get(primary.url("/ok"))
                            open_breakers()
                            await outcome_async(
                                observed,
                                lambda: client.post(primary.url("/fail"), content=b"x"),
                                _response,
                            )

                    asyncio.run(script())
        finally:
            env.close()
        assert hits
        assert observed.outcomes == [("returned", (200, "ok"))]
        assert (primary.count("POST"), backup.count("POST")) == (0, 1)
        assert all(count == 1 for count in _reports(caplog).values()), _reports(caplog)


# --- every breaker open, and the refusal cannot be built -----------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_an_open_breaker_whose_refusal_cannot_be_built_lets_the_call_run(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Every breaker is held open from its creation, so raptor refuses every call (the
    # connects too) with the library's fail-fast error, which the hooks build. Should that
    # fail, the call runs as it would without raptor (the driver's promise: before any
    # attempt, our bug lets the call simply run).
    expected = without_raptor(path)
    get = BreakerRegistry.get

    def held_open(registry: BreakerRegistry, name: str, config: Any = None) -> CircuitBreaker:
        breaker = get(registry, name, config)
        breaker.force_open()
        return breaker

    monkeypatch.setattr(BreakerRegistry, "get", held_open)
    fault = Fault(
        (CallHooks, "refusal"),
        (DbHooks, "refusal"),
        (requests_integration, "_refusal"),
        (httpx_integration, "_refusal"),
    )
    fault.apply(monkeypatch)
    env = make_env()
    env.stale_if_error = False  # a stale copy would answer the refused GETs
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = PATHS[path](env)
    finally:
        env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    assert fault.hits
    assert all(count == 1 for count in _reports(caplog).values()), _reports(caplog)


# --- a call that recovers ----------------------------------------------------------------------


def recovering_requests(env: Env | None) -> Observed:
    if env is not None:
        env.install(RequestsIntegration)
    observed = Observed()
    with _http_server() as server, requests.Session() as session:
        for _ in range(ROUNDS):
            server.push(status(503))
            outcome(observed, lambda: session.get(server.url("/r"), timeout=5), _response)
        observed.hits = {"GET": server.count("GET")}
    return observed


def recovering_httpx_async(env: Env | None) -> Observed:
    if env is not None:
        env.install(HttpxIntegration)
    observed = Observed()

    async def script(server: FaultyHTTPServer) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(ROUNDS):
                server.push(reset())
                await outcome_async(observed, lambda: client.get(server.url("/r")), _response)

    with _http_server() as server:
        asyncio.run(script(server))
        observed.hits = {"GET": server.count("GET")}
    return observed


def recovering_guard(env: Env | None) -> Observed:
    observed = Observed()
    runs = Counter[str]()

    def flaky() -> str:
        runs["call"] += 1
        if runs["call"] % 2:
            raise ConnectionResetError("injected")
        return "answer"

    guard = None
    if env is not None:
        guard = Guard(
            "rule1-recovering",
            retry=RetryPolicy(max_retries=2, base_delay=0.001, max_delay=0.002),
            runtime=env.runtime,
        )
    for _ in range(ROUNDS):
        outcome(observed, flaky if guard is None else lambda: guard.call(flaky), repr)
    observed.hits = dict(runs)
    return observed


RECOVERING: dict[str, Callable[[Env | None], Observed]] = {
    "requests": recovering_requests,
    "httpx-async": recovering_httpx_async,
    "guard-call": recovering_guard,
}
RECOVERY_FAULTS = (
    "classifier",
    "route-classify",
    "event-publish",
    "sink-publish",
    "sink-span-events",
    "instruments",
    "span-start",
    "recovery-scope",
    "breaker-success",
    "breaker-core-success",
    "breaker-failure",
    "budget",
    "learner",
    "loop-verdict",
    "resend-count",
    "give-up",
    "attempt-loop",
)
RETRY_FAULTS: dict[str, Callable[[], Fault]] = {
    "loop-succeeded": lambda: Fault((AttemptLoop, "succeeded")),
    "loop-slept": lambda: Fault((AttemptLoop, "slept")),
    "loop-refund": lambda: Fault((Route, "refund"), (Route, "record_outcome")),
    "attempt-kwargs": lambda: Fault((HttpHooks, "attempt_kwargs"), (CallHooks, "attempt_kwargs")),
    "discard": lambda: Fault((HttpHooks, "discard"), (CallHooks, "discard")),
}


@pytest.mark.parametrize("fault_name", list(RECOVERY_FAULTS) + list(RETRY_FAULTS))
@pytest.mark.parametrize("path", list(RECOVERING))
def test_a_bug_of_ours_during_a_recovery_ends_it_as_with_or_without_raptor(
    path: str, fault_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A first attempt fails and a retry would succeed: with raptor the app gets the retry's
    # answer, without it the first failure. A bug of ours met on the way may cost the retry,
    # never more: the app gets one of the two, and nothing is sent more often than raptor
    # sends it.
    plain = RECOVERING[path](None)
    env = make_env()
    try:
        recovered = RECOVERING[path](env)
    finally:
        env.close()
    _reset_for_tests()
    fault = (FAULTS.get(fault_name) or RETRY_FAULTS[fault_name])()
    fault.apply(monkeypatch)
    env = make_env()
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = RECOVERING[path](env)
    finally:
        env.close()
    assert recovered.outcomes != plain.outcomes  # the script does recover under raptor
    for index, got in enumerate(seen.outcomes):
        assert got in (plain.outcomes[index], recovered.outcomes[index])
    assert all(seen.hits[key] <= max(recovered.hits[key], plain.hits[key]) for key in seen.hits), (
        seen.hits,
        recovered.hits,
    )
    reports = _reports(caplog)
    assert all(count == 1 for count in reports.values()), reports
    if fault.hits:
        assert reports


# --- the app's cursor class ---------------------------------------------------------------------


class AppCursor(sqlite3.Cursor):
    """An app's own sqlite3 cursor class."""


@pytest.mark.parametrize("given", ["keyword", "positional"])
@pytest.mark.parametrize("driver", ["psycopg2", "sqlite3"])
def test_a_bug_guarding_a_cursor_keeps_the_apps_cursor_class(
    driver: str, given: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # psycopg2 and sqlite3 connections hand out guarded subclasses of the cursor class the
    # app asks for. Should making that subclass fail, the app still gets its own class.
    env = make_env()
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            if driver == "psycopg2":
                require_service("PostgreSQL", POSTGRES)
                import psycopg2.extras

                env.install(Psycopg2Integration)
                fault = Fault((psycopg2_integration, "guarded_cursor_factory"))
                fault.apply(monkeypatch)
                factory = psycopg2.extras.RealDictCursor
                conn = psycopg2.connect(PG_DSN)
                try:
                    cur = (
                        conn.cursor(cursor_factory=factory)
                        if given == "keyword"
                        else conn.cursor(None, factory)
                    )
                    cur.execute("SELECT 1 AS one")
                    rows = [dict(row) for row in cur.fetchall()]
                finally:
                    conn.close()
                assert isinstance(cur, factory)
                assert rows == [{"one": 1}]
            else:
                env.install(SQLiteIntegration)
                fault = Fault((sqlite3_integration, "_guarded_cursor"))
                fault.apply(monkeypatch)
                lite = sqlite3.connect(":memory:")
                try:
                    cur = (
                        lite.cursor(factory=AppCursor)
                        if given == "keyword"
                        else lite.cursor(AppCursor)
                    )
                finally:
                    lite.close()
                assert isinstance(cur, AppCursor)
    finally:
        env.close()
    assert fault.hits
    assert _reports(caplog) == Counter({f"{driver}.cursor": 1})


# --- the error-recovery monitor's redaction ------------------------------------------------------


@pytest.mark.parametrize("path", ["requests", "psycopg", "redis-async", "guard-call"])
def test_a_bug_redacting_an_error_message_never_reaches_the_app(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The monitor subscribes to the bus; until its thread runs, a full queue is drained in
    # the publishing thread, i.e. in the app's call (made to happen at every event here).
    # Normalising (redacting) and fingerprinting the error's message then run there.
    from otel_raptor.runtime import monitor as monitor_module

    expected = without_raptor(path)
    monkeypatch.setattr(monitor_module, "_HIGH_WATER", 1)
    fault = Fault((monitor_module, "normalize_message"), (monitor_module, "fingerprint"))
    fault.apply(monkeypatch)
    env = make_env()
    watcher = monitor_module.ErrorRecoveryMonitor(runtime=env.runtime)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = PATHS[path](env)
    finally:
        watcher.close()
        env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    assert fault.hits
    reports = _reports(caplog)
    assert reports
    assert all(count == 1 for count in reports.values()), reports


# --- broken providers ----------------------------------------------------------------------------


class BrokenTracerProvider(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        raise InjectedBug("get_tracer")


class BrokenMeterProvider(MeterProvider):
    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise InjectedBug("get_meter")


class NoInstrumentsMeterProvider(MeterProvider):
    """A provider whose meter cannot create a single instrument."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        meter = super().get_meter(*args, **kwargs)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise InjectedBug("create instrument")

        for name in dir(meter):
            if name.startswith("create_"):
                setattr(meter, name, broken)
        return meter


PROVIDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "tracer-provider": lambda: (BrokenTracerProvider(), MeterProvider()),
    "meter-provider": lambda: (TracerProvider(), BrokenMeterProvider()),
    "meter-instruments": lambda: (TracerProvider(), NoInstrumentsMeterProvider()),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("path", ["requests", "psycopg-async", "guard-call"])
def test_a_broken_provider_never_changes_the_call(
    path: str, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected = without_raptor(path)
    env = make_env()
    env.sink.uninstall()
    tracer_provider, meter_provider = PROVIDERS[provider]()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        env.sink = TelemetrySink(
            runtime=env.runtime, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        env.sink.install()
        try:
            seen = PATHS[path](env)
        finally:
            env.close()
    assert seen.outcomes == expected.outcomes
    assert seen.hits == expected.hits
    reports = _reports(caplog)
    assert reports
    assert all(count == 1 for count in reports.values()), reports


def test_a_redis_pipeline_that_cannot_be_put_back_is_not_resent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A retry of a pipeline puts back the commands the failed attempt's reset() cleared. If
    # that fails, the retry must not go out (empty, it would look like a success): the
    # previous attempt's failure is the answer.
    state: Any = type("State", (), {})()
    state.watch_error = redis.WatchError
    state.exec_abort = redis.exceptions.ExecAbortError
    pipe: Any = type("Pipe", (), {})()
    pipe.command_stack = [(("INCR", "k"), {})]
    pipe.scripts = set()
    pipe.explicit_transaction = False
    sent: list[list[Any]] = []
    lost = redis.ConnectionError("lost")

    def execute(target: Any) -> Any:
        sent.append(list(target.command_stack))
        target.command_stack = []  # as redis-py's reset() does
        raise lost

    run = redis_integration._PipelineRun(execute, pipe, state, transaction=False)
    with pytest.raises(redis.ConnectionError):
        run(redis_integration._WRITES)
    fault = Fault((redis_integration._PipelineRun, "restore"))
    fault.apply(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="otel_raptor"),
        pytest.raises(redis.ConnectionError) as raised,
    ):
        run(redis_integration._WRITES)
    assert raised.value is lost
    assert sent == [[(("INCR", "k"), {})]]
    assert _reports(caplog) == Counter({"redis.pipeline_restore": 1})


def test_two_failing_subscribers_are_each_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The telemetry sink and the error-recovery monitor both subscribe to the bus with a
    # bound method: the failure of one must not silence the other's report.
    from otel_raptor.runtime import monitor as monitor_module

    fault = Fault((TelemetrySink, "publish"), (monitor_module.ErrorRecoveryMonitor, "_on_event"))
    fault.apply(monkeypatch)
    env = make_env()
    watcher = monitor_module.ErrorRecoveryMonitor(runtime=env.runtime)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            seen = path_guard_call(env)
    finally:
        watcher.close()
        env.close()
    assert seen.outcomes == without_raptor("guard-call").outcomes
    assert _reports(caplog) == Counter(
        {
            "event subscriber TelemetrySink.publish": 1,
            "event subscriber ErrorRecoveryMonitor._on_event": 1,
        }
    )


class _Unreadable:
    """A data descriptor whose reads fail (a library attribute gone or renamed)."""

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        raise AttributeError("gone in this version")

    def __set__(self, instance: object, value: object) -> None:
        return None


def test_a_prepared_asyncpg_statement_whose_query_cannot_be_read_runs_unguarded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The hook reads asyncpg's private PreparedStatement._query (the statement's text, for
    # the replay judgement): an asyncpg without it must not fail the app's fetch.
    require_service("PostgreSQL", POSTGRES)
    import asyncpg.prepared_stmt

    monkeypatch.setattr(asyncpg.prepared_stmt.PreparedStatement, "_query", _Unreadable())
    env = make_env()
    env.install(AsyncpgIntegration)

    async def script() -> Any:
        conn = await asyncpg.connect(
            host=POSTGRES[0], port=POSTGRES[1], user="postgres", database="test"
        )
        try:
            statement = await conn.prepare("SELECT 1 AS one")
            return [tuple(row) for row in await statement.fetch()]
        finally:
            await conn.close()

    try:
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            rows = asyncio.run(script())
    finally:
        env.close()
    assert rows == [(1,)]
    assert _reports(caplog) == Counter({"asyncpg.describe": 1})


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_redis_retry_loop_with_unknown_arguments_keeps_the_commands_error(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A redis-py whose Retry.call_with_retry takes other arguments gets the hook that takes
    # any: reading them is ours, and a command's error must reach the app whatever they are.
    def original(
        self: Any, do: Any, fail: Any, is_retryable: Any = None, failures: bool = False, x: Any = 0
    ) -> Any:
        raise AssertionError("not called while raptor drives")

    async def original_async(
        self: Any, do: Any, fail: Any, is_retryable: Any = None, failures: bool = False, x: Any = 0
    ) -> Any:
        raise AssertionError("not called while raptor drives")

    answer = redis.ResponseError("the command's own error")

    def do() -> Any:
        raise answer

    async def do_async() -> Any:
        raise answer

    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    if flavour == "sync":
        hook = redis_integration._retry_hook(original)

        def run() -> Any:
            return hook(retry, do, lambda error: None, None, False, "new")
    else:
        hook = redis_integration._async_retry_hook(original_async)

        def run() -> Any:
            return asyncio.run(hook(retry, do_async, lambda error: None, None, False, "new"))

    token = redis_integration._driving.set(True)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="otel_raptor"),
            pytest.raises(redis.ResponseError) as raised,
        ):
            run()
    finally:
        redis_integration._driving.reset(token)
    assert raised.value is answer
    assert _reports(caplog) == Counter({"redis.retry_step": 1})


@pytest.mark.parametrize("broken", ["acquire", "reject_error"])
@pytest.mark.parametrize("flavour", ["call_sync", "call"])
def test_a_breaker_that_cannot_admit_or_refuse_lets_the_call_run(
    flavour: str, broken: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # CircuitBreaker.call_sync / call (ResilientClient's breakers): an open breaker refuses
    # with CircuitOpenError; should admitting or refusing fail (our bug), the call runs.
    breaker = Runtime().breakers.get("rule1-breaker")
    breaker.force_open()
    Fault((CircuitBreaker, broken)).apply(monkeypatch)
    work = _Work()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        if flavour == "call_sync":
            value = breaker.call_sync(work.ok, 7)
        else:
            value = asyncio.run(breaker.call(work.ok_async, 7))
    assert value == {"value": 7}
    assert work.runs == Counter({"ok": 1})
    assert _reports(caplog) == Counter({"breaker.admit": 1})
