"""What raptor adds to one loopback database statement, against the contrib tracing.

For psycopg (sync), asyncpg and PyMySQL a ``SELECT 1`` and for redis-py a ``GET``, against the
servers on loopback (PostgreSQL 5432, MariaDB 3306, Redis 6379; ``RAPTOR_TEST_*_PORT`` move
them), five configurations each, measured in the same run:

- ``plain``: the driver alone;
- ``plain (control)``: the driver alone again, in a second process: the method's noise floor
  (its "overhead" should be about 0);
- ``contrib``: ``opentelemetry-instrumentation-psycopg`` / ``-asyncpg`` / ``-pymysql`` /
  ``-redis`` with an SDK ``TracerProvider`` (``BatchSpanProcessor`` + an exporter that drops
  everything) and an SDK ``MeterProvider`` (an ``InMemoryMetricReader`` nobody collects);
- ``raptor``: ``RaptorInstrumentor().instrument()`` with the same SDK providers;
- ``raptor, timeout 0``: the same with ``statement_timeout=0``: the hooks alone, without the
  default statement timeout (which PostgreSQL and MariaDB enforce with a timer armed on
  every statement, and asyncpg with one of its own);
- ``both``: the contrib instrumentation, then raptor.

The method is ``bench_http.py``'s: each configuration lives in its own worker process, set up
once and warmed up; the workers run one at a time, in a shuffled order every round, each
timing ``--statements`` statements on one open connection (autocommit, so raptor's per-failure
replay judgement applies, as for the statements it can retry); ``--sessions`` fresh sets of
workers run in turn. Every statement is timed; per round each worker reports its median
(*p50*) and mean, each divided by ``plain``'s of the same round; overheads come from the
median of those ratios over rounds. The garbage collector stays on.

The servers are the shared ones, not this benchmark's: they cannot be pinned, and each
worker's PostgreSQL or MariaDB connection is served by a backend that the scheduler places
where it likes, which shifts a whole process's figures (on the 2-CPU VM this was written on,
by up to a third in either direction). So a second measurement comes first, which that cannot
touch: **alternating**, in one process per driver and on *one* connection, rounds of plain
statements alternate (in a shuffled order) with rounds under ``RaptorInstrumentor`` (SDK
providers, ``memory=False``), instrumented before and uninstrumented after each round, with
rounds under a *bare hook* (a do-nothing function patched over the method raptor hooks: the
floor any hook of that shape pays, so that raptor's own cost is measured against it too), and
with rounds on a plain connection whose session has the default statement timeout set (the
server's cost of enforcing it, which raptor's own overhead does not include, since the
connection predates the instrumentation). The contrib instrumentations are in the
process-per-configuration table only: psycopg's and PyMySQL's act on new connections.
Rounds differ from each other by more than the whole effect, though. So the first
measurement is finer still: **paired**, raptor installed throughout on one connection per
driver, every statement run three times back to back in a shuffled order, through the hooked
method's original, a bare hook and raptor's hook; the medians of the per-statement
differences (``--pairs`` statements each, with distribution-free 95 % intervals) carry the
hooks' cost and little else, as whatever drifts drifts for all three. With it, the server's
cost of the default statement timeout, on two connections swapping roles.
``--pin CPU`` pins the clients to one CPU; ``--mode`` runs one measurement only.

Target (issue 8): raptor adds at most 2 % to a loopback statement. The verdict is printed per
driver (paired: the 95 % upper bounds; the others: p50); the exit status is 0 either way:
this measures, it does not gate.

    .venv/bin/python benchmarks/bench_db.py [--statements N] [--rounds R] [--sessions S]
        [--warmup N] [--driver psycopg|asyncpg|pymysql|redis] [--pin CPU]
        [--mode paired|alternating|processes] [--pairs N]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

DRIVERS = ("psycopg", "asyncpg", "pymysql", "redis")
CONFIGS = ("plain", "plain (control)", "contrib", "raptor", "raptor, timeout 0", "both")
TARGET_PERCENT = 2.0
KEY = "raptor_db_bench_key"

PG_PORT = int(os.environ.get("RAPTOR_TEST_PG_PORT", "5432"))
MYSQL_PORT = int(os.environ.get("RAPTOR_TEST_MYSQL_PORT", "3306"))
REDIS_PORT = int(os.environ.get("RAPTOR_TEST_REDIS_PORT", "6379"))

CONTRIB = {
    "psycopg": ("opentelemetry.instrumentation.psycopg", "PsycopgInstrumentor"),
    "asyncpg": ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor"),
    "pymysql": ("opentelemetry.instrumentation.pymysql", "PyMySQLInstrumentor"),
    "redis": ("opentelemetry.instrumentation.redis", "RedisInstrumentor"),
}
DISTRIBUTIONS = {"psycopg": "psycopg", "asyncpg": "asyncpg", "pymysql": "PyMySQL", "redis": "redis"}


# ----------------------------------------------------------------------------- the workers


def _sdk_providers() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DropExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    return tracer_provider, meter_provider


def _instrument(driver: str, config: str) -> None:
    if config.startswith("plain"):
        return
    import importlib

    tracer_provider, meter_provider = _sdk_providers()
    providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    if config in ("contrib", "both"):
        module, name = CONTRIB[driver]
        getattr(importlib.import_module(module), name)().instrument(**providers)
    if config.startswith("raptor") or config == "both":
        from otel_raptor import RaptorInstrumentor

        extra = {"statement_timeout": 0} if config.endswith("timeout 0") else {}
        RaptorInstrumentor().instrument(**providers, **extra)


def _statement(driver: str) -> Callable[[int], list[float]]:
    """A function timing ``n`` statements: their durations in seconds."""
    return _statement_with_connection(driver)[0]


def _statement_with_connection(driver: str) -> tuple[Callable[[int], list[float]], Any]:
    """A function timing ``n`` statements (their durations in seconds), and its connection."""
    perf_counter = time.perf_counter
    if driver == "psycopg":
        import psycopg

        conn = psycopg.connect(
            f"host=127.0.0.1 port={PG_PORT} dbname=test user=postgres", autocommit=True
        )
        cursor = conn.cursor()

        def run_psycopg(n: int) -> list[float]:
            durations = [0.0] * n
            for i in range(n):
                start = perf_counter()
                cursor.execute("SELECT 1")
                cursor.fetchone()
                durations[i] = perf_counter() - start
            return durations

        return run_psycopg, conn
    if driver == "pymysql":
        import pymysql

        my = pymysql.connect(
            host="127.0.0.1", port=MYSQL_PORT, user="root", database="test", autocommit=True
        )
        my_cursor = my.cursor()

        def run_pymysql(n: int) -> list[float]:
            durations = [0.0] * n
            for i in range(n):
                start = perf_counter()
                my_cursor.execute("SELECT 1")
                my_cursor.fetchone()
                durations[i] = perf_counter() - start
            return durations

        return run_pymysql, my
    if driver == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=REDIS_PORT)
        client.set(KEY, "1")

        def run_redis(n: int) -> list[float]:
            durations = [0.0] * n
            for i in range(n):
                start = perf_counter()
                client.get(KEY)
                durations[i] = perf_counter() - start
            return durations

        return run_redis, client
    import asyncio

    import asyncpg

    loop = asyncio.new_event_loop()
    con = loop.run_until_complete(
        asyncpg.connect(f"postgresql://postgres@127.0.0.1:{PG_PORT}/test")
    )

    async def batch(n: int) -> list[float]:
        durations = [0.0] * n
        for i in range(n):
            start = perf_counter()
            await con.fetchval("SELECT 1")
            durations[i] = perf_counter() - start
        return durations

    return (lambda n: loop.run_until_complete(batch(n))), con


ALTERNATE = ("plain", "bare hook", "raptor", "plain + timeout")


def hooked_method(driver: str) -> tuple[Any, str]:
    """Where raptor hooks each driver's statement: the class and the method's name."""
    if driver == "psycopg":
        import psycopg

        return psycopg.Cursor, "execute"
    if driver == "asyncpg":
        import asyncpg

        return asyncpg.Connection, "fetchval"
    if driver == "pymysql":
        import pymysql.cursors

        return pymysql.cursors.Cursor, "execute"
    import redis

    return redis.Redis, "execute_command"


def patch_bare_hook(driver: str) -> Callable[[], None]:
    """Patch the cheapest hook there is over the method raptor hooks (a plain function that
    calls the original with what it was given: what any hook of that shape costs before it
    does anything); returns what undoes it."""
    owner, name = hooked_method(driver)
    original = getattr(owner, name)
    own = name in owner.__dict__
    hook: Callable[..., Any]
    if driver == "asyncpg":

        async def hook_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await original(self, *args, **kwargs)

        hook = hook_async
    else:

        def hook_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            return original(self, *args, **kwargs)

        hook = hook_sync
    setattr(owner, name, hook)
    return lambda: setattr(owner, name, original) if own else delattr(owner, name)


def _session_timeout(driver: str, seconds: float) -> Callable[[Any], None]:
    """Sets (``seconds`` > 0) or clears the session's statement timeout on a plain
    connection, as raptor's default would."""
    if driver == "psycopg":
        return lambda conn: conn.execute(f"SET statement_timeout = {int(seconds * 1000)}")
    if driver == "pymysql":
        return lambda conn: conn.cursor().execute(f"SET max_statement_time = {seconds}")
    return lambda conn: None


def work_alternating(driver: str, warmup: int, n: int, rounds: int) -> None:
    """One process, one connection: plain, bare-hook, raptor and plain-with-a-statement-timeout
    rounds in a shuffled order; prints one line per round and configuration."""
    from otel_raptor import RaptorInstrumentor

    _import_every_driver()
    run, conn = _statement_with_connection(driver)
    run(warmup)
    rng = random.Random(20261203)
    timeout = _session_timeout(driver, 30.0)
    untimed = _session_timeout(driver, 0.0)
    for _ in range(rounds):
        order = list(ALTERNATE)
        rng.shuffle(order)
        for config in order:
            if config == "raptor":
                tracer_provider, meter_provider = _sdk_providers()
                RaptorInstrumentor().instrument(
                    tracer_provider=tracer_provider, meter_provider=meter_provider, memory=False
                )
            elif config == "bare hook":
                unpatch = patch_bare_hook(driver)
            elif config == "plain + timeout":
                timeout(conn)
            try:
                durations = run(n)
            finally:
                if config == "raptor":
                    RaptorInstrumentor().uninstrument()
                elif config == "bare hook":
                    unpatch()
                elif config == "plain + timeout":
                    untimed(conn)
            print(
                f"{config}\t{statistics.median(durations)!r}\t"
                f"{math.fsum(durations) / len(durations)!r}",
                flush=True,
            )


def alternate(drivers: Sequence[str], *, n: int, rounds: int, warmup: int, cpu: int | None) -> None:
    print(f"\nAlternating: one process and one connection per driver, {rounds} rounds of {n}")
    print("statements per configuration, in a shuffled order; medians over rounds. Each row is")
    print("against plain, except 'raptor/bare hook': raptor against the bare hook (a do-nothing")
    print("function on the method raptor hooks) of the same round, raptor's own cost.")
    print(
        f"\n{'driver':<8} {'configuration':<16} {'µs/stmt p50':>11} {'ratio':>7}"
        f" {'ratio IQR':>13} {'overhead µs':>12} {'overhead %':>11} {'mean %':>8}"
    )
    verdicts = []
    for driver in drivers:
        args = ["--alternate", driver, "--statements", str(n), "--rounds", str(rounds)]
        process = _spawn([*args, "--warmup", str(warmup)], cpu)
        out, _ = process.communicate(timeout=600)
        by: dict[str, list[tuple[float, float]]] = {config: [] for config in ALTERNATE}
        for line in out.splitlines():
            config, median, mean = line.split("\t")
            by[config].append((float(median), float(mean)))
        found = {}
        rows_against = [(config, config, "plain") for config in ALTERNATE]
        rows_against.insert(
            ALTERNATE.index("raptor") + 1, ("raptor/bare hook", "raptor", "bare hook")
        )
        for label, config, base_config in rows_against:
            rows, base = by[config], by[base_config]
            ratios = [row[0] / other[0] for row, other in zip(rows, base, strict=True)]
            mean_ratios = [row[1] / other[1] for row, other in zip(rows, base, strict=True)]
            ratio = statistics.median(ratios)
            q1, q3 = _quartiles(ratios)
            p50 = statistics.median(row[0] for row in rows)
            micros = (ratio - 1) * statistics.median(row[0] for row in base) * 1e6
            found[label] = (ratio, micros)
            print(
                f"{driver:<8} {label:<16} {p50 * 1e6:>11.2f} {ratio:>7.4f}"
                f" {f'{q1:.3f}-{q3:.3f}':>13} {micros:>+12.2f} {(ratio - 1) * 100:>+10.2f}%"
                f" {(statistics.median(mean_ratios) - 1) * 100:>+7.2f}%"
            )
        (ratio, micros), (own, own_micros) = found["raptor"], found["raptor/bare hook"]
        bare, bare_micros = found["bare hook"]
        verdicts.append(
            f"{driver}: raptor adds {micros:+.2f} µs ({(ratio - 1) * 100:+.2f} %) per statement;"
            f" a bare hook {bare_micros:+.2f} µs ({(bare - 1) * 100:+.2f} %), raptor's own cost"
            f" over it {own_micros:+.2f} µs ({(own - 1) * 100:+.2f} %)."
            f" At most {TARGET_PERCENT:g} %:"
            f" {'yes' if (ratio - 1) * 100 <= TARGET_PERCENT else 'NO'}."
        )
    print()
    print("\n".join(verdicts))


PAIRED = ("plain", "bare hook", "raptor")


def _paired_connection(driver: str) -> tuple[Any, tuple[Any, ...]]:
    """A connection opened before raptor is installed (no default statement timeout: the
    hook's cost alone), and the arguments the hooked method takes after it."""
    if driver == "psycopg":
        import psycopg

        conn = psycopg.connect(
            f"host=127.0.0.1 port={PG_PORT} dbname=test user=postgres", autocommit=True
        )
        return conn, (conn.cursor(), "SELECT 1")
    if driver == "pymysql":
        import pymysql

        my = pymysql.connect(
            host="127.0.0.1", port=MYSQL_PORT, user="root", database="test", autocommit=True
        )
        return my, (my.cursor(), "SELECT 1")
    if driver == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=REDIS_PORT)
        client.set(KEY, "1")
        return client, (client, "GET", KEY)
    raise ValueError(driver)


def _median_ci(values: list[float]) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free 95 % interval for it (the order
    statistics a binomial(n, 1/2) puts 95 % of the median's rank between)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 1.96 * math.sqrt(n) / 2
    low, high = max(int(n / 2 - half), 0), min(math.ceil(n / 2 + half), n - 1)
    return statistics.median(ordered), ordered[low], ordered[high]


def work_paired(driver: str, warmup: int, n: int) -> None:
    """One process, one connection, raptor installed (SDK providers, ``memory=False``): each
    statement is run three times in a row in a shuffled order, through the method's original
    (plain), through a bare hook over it, and through raptor's hook, each timed. Prints, as
    JSON, the medians of the per-triple differences and their 95 % intervals."""
    import json

    from otel_raptor import RaptorInstrumentor

    _import_every_driver()
    if driver == "asyncpg":
        import asyncio

        import asyncpg

        loop = asyncio.new_event_loop()
        connection: Any = loop.run_until_complete(
            asyncpg.connect(f"postgresql://postgres@127.0.0.1:{PG_PORT}/test")
        )
        args: tuple[Any, ...] = (connection, "SELECT 1")
    else:
        connection, args = _paired_connection(driver)
    tracer_provider, meter_provider = _sdk_providers()
    RaptorInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, memory=False
    )
    owner, name = hooked_method(driver)
    hooked = owner.__dict__[name]
    original = hooked.__wrapped__
    fetch = getattr(args[0], "fetchone", None) if driver in ("psycopg", "pymysql") else None
    rng = random.Random(20261204)
    perf_counter = time.perf_counter
    if driver == "asyncpg":

        async def bare_async(self: Any, *a: Any, **k: Any) -> Any:
            return await original(self, *a, **k)

        functions: tuple[Any, ...] = (original, bare_async, hooked)

        async def triples_async(count: int) -> list[list[float]]:
            out = [[0.0] * count for _ in functions]
            orders = [rng.sample(range(3), 3) for _ in range(count)]
            for i in range(count):
                for j in orders[i]:
                    function = functions[j]
                    start = perf_counter()
                    await function(*args)
                    out[j][i] = perf_counter() - start
            return out

        def triples(count: int) -> list[list[float]]:
            return loop.run_until_complete(triples_async(count))

    else:

        def bare(self: Any, *a: Any, **k: Any) -> Any:
            return original(self, *a, **k)

        functions = (original, bare, hooked)

        def triples(count: int) -> list[list[float]]:
            out = [[0.0] * count for _ in functions]
            orders = [rng.sample(range(3), 3) for _ in range(count)]
            for i in range(count):
                for j in orders[i]:
                    function = functions[j]
                    start = perf_counter()
                    function(*args)
                    if fetch is not None:
                        fetch()
                    out[j][i] = perf_counter() - start
            return out

    triples(warmup)
    plain, bare_times, raptor = triples(n)

    def shift(slower: list[float], faster: list[float]) -> tuple[float, float, float]:
        return _median_ci([a - b for a, b in zip(slower, faster, strict=True)])

    found = {
        "plain": statistics.median(plain),
        "raptor": shift(raptor, plain),
        "bare hook": shift(bare_times, plain),
        "raptor/bare hook": shift(raptor, bare_times),
    }
    if driver in ("psycopg", "pymysql"):
        timed, untimed = _timeout_pairs(driver, original, warmup, n, rng)
        found["plain + timeout"] = shift(timed, untimed)
    elif driver == "asyncpg":
        found["plain + timeout"] = shift(
            *loop.run_until_complete(_timeout_pairs_async(original, warmup, n, rng))
        )

        # asyncpg's own timeout (``command_timeout``, or ``timeout=`` on each call, as here)
        # is a client-side timer per statement: what raptor's default would cost had it used
        # that instead of the server's ``statement_timeout``.
        async def own_timer_pairs(count: int) -> tuple[list[float], list[float]]:
            timed, untimed = [0.0] * count, [0.0] * count
            for i in range(count):
                for with_timeout in rng.sample((True, False), 2):
                    start = perf_counter()
                    if with_timeout:
                        await original(connection, "SELECT 1", timeout=30.0)
                        timed[i] = perf_counter() - start
                    else:
                        await original(connection, "SELECT 1")
                        untimed[i] = perf_counter() - start
            return timed, untimed

        loop.run_until_complete(own_timer_pairs(warmup))
        found["command_timeout"] = shift(*loop.run_until_complete(own_timer_pairs(n)))
    RaptorInstrumentor().uninstrument()
    print(json.dumps(found), flush=True)


async def _timeout_pairs_async(
    original: Any, warmup: int, n: int, rng: random.Random
) -> tuple[list[float], list[float]]:
    """:func:`_timeout_pairs` for asyncpg."""
    import asyncpg

    url = f"postgresql://postgres@127.0.0.1:{PG_PORT}/test"
    connections = (await asyncpg.connect(url), await asyncpg.connect(url))
    perf_counter = time.perf_counter
    timed, untimed = [0.0] * n, [0.0] * n
    block = 500
    for phase, count in (("warm-up", warmup), ("measure", n)):
        for begin in range(0, count, block):
            which = (begin // block) % 2
            await connections[which].execute("SET statement_timeout = 30000")
            await connections[1 - which].execute("SET statement_timeout = 0")
            for i in range(begin, min(begin + block, count)):
                for j in rng.sample((0, 1), 2):
                    start = perf_counter()
                    await original(connections[j], "SELECT 1")
                    elapsed = perf_counter() - start
                    if phase == "measure":
                        (timed if j == which else untimed)[i] = elapsed
    for connection in connections:
        await connection.close()
    return timed, untimed


def _timeout_pairs(
    driver: str, original: Any, warmup: int, n: int, rng: random.Random
) -> tuple[list[float], list[float]]:
    """What the server's enforcement of a session statement timeout (raptor's default, 30 s)
    costs a statement: two connections, one with the timeout set, statements alternating
    between them in a shuffled order; the connections swap roles every 500 pairs, so that
    neither one's server process (and where the scheduler put it) is always the timed one."""
    first, first_args = _paired_connection(driver)
    second, second_args = _paired_connection(driver)
    set_timeout, clear = _session_timeout(driver, 30.0), _session_timeout(driver, 0.0)
    perf_counter = time.perf_counter
    both = (first_args, second_args)
    fetches = (first_args[0].fetchone, second_args[0].fetchone)
    timed, untimed = [0.0] * n, [0.0] * n
    block = 500
    for phase, count in (("warm-up", warmup), ("measure", n)):
        for begin in range(0, count, block):
            which = (begin // block) % 2  # the connection with the timeout in this block
            set_timeout((first, second)[which])
            clear((first, second)[1 - which])
            for i in range(begin, min(begin + block, count)):
                for j in rng.sample((0, 1), 2):
                    start = perf_counter()
                    original(*both[j])
                    fetches[j]()
                    elapsed = perf_counter() - start
                    if phase == "measure":
                        (timed if j == which else untimed)[i] = elapsed
    first.close()
    second.close()
    return timed, untimed


def paired(drivers: Sequence[str], *, n: int, warmup: int, cpu: int | None) -> None:
    import json

    print(f"\nPaired: one process and one connection per driver, {n} statements per")
    print("configuration; each statement is run through the method's original, a bare hook")
    print("and raptor's hook, back to back in a shuffled order, and timed: what drifts (CPU")
    print("placement, frequency, the server's backend, other load) drifts for all three. Rows")
    print("are the median of the per-statement differences with its 95 % interval; raptor is")
    print("installed with SDK providers; the connection predates it (no statement timeout).")
    print(
        f"\n{'driver':<8} {'configuration':<16} {'µs/stmt p50':>11} {'added µs':>9}"
        f" {'95 % interval µs':>17} {'added %':>8} {'95 % upper':>10}"
    )
    verdicts = []
    for driver in drivers:
        process = _spawn(["--paired", driver, "--statements", str(n), "--warmup", str(warmup)], cpu)
        out, _ = process.communicate(timeout=1800)
        found = json.loads(out.strip().splitlines()[-1])
        plain = found["plain"]
        print(f"{driver:<8} {'plain':<16} {plain * 1e6:>11.2f}")
        for label in (
            "bare hook",
            "raptor",
            "raptor/bare hook",
            "plain + timeout",
            "command_timeout",
        ):
            if label not in found:
                continue
            median, low, high = found[label]
            print(
                f"{driver:<8} {label:<16} {'':>11} {median * 1e6:>+9.2f}"
                f" {f'{low * 1e6:+.2f}..{high * 1e6:+.2f}':>17} {median / plain * 100:>+7.2f}%"
                f" {high / plain * 100:>+9.2f}%"
            )
        median, _, high = found["raptor"]
        timeout = found.get("plain + timeout", (0.0, 0.0, 0.0))
        upper = (high + timeout[2]) / plain * 100
        with_timeout = (
            f"; with the default statement timeout's server cost"
            f" ({timeout[0] * 1e6:+.2f} µs), up to {upper:+.2f} %"
            if "plain + timeout" in found
            else ""
        )
        verdicts.append(
            f"{driver}: raptor's hook adds {median * 1e6:+.2f} µs ({median / plain * 100:+.2f} %,"
            f" 95 % interval up to {high / plain * 100:+.2f} %) per statement of"
            f" {plain * 1e6:.1f} µs{with_timeout}."
            f" At most {TARGET_PERCENT:g} %: {'yes' if upper <= TARGET_PERCENT else 'NO'}."
        )
    print()
    print("\n".join(verdicts))


def _import_every_driver() -> None:
    """Every worker imports all four drivers first, whatever it measures, so that every
    configuration hooks (and carries) the same libraries: an import alone can change another
    driver's speed (on the machine these numbers come from, ``import redis`` made asyncpg's
    loopback ``SELECT 1`` about 40 % faster in that process)."""
    import asyncpg
    import psycopg
    import pymysql
    import redis

    del asyncpg, psycopg, pymysql, redis


def work(driver: str, config: str, warmup: int) -> None:
    """A worker: set up, warm up, then time ``RUN n`` batches read from stdin."""
    _import_every_driver()
    _instrument(driver, config)
    run = _statement(driver)
    run(warmup)
    print("READY", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command != "RUN":
            break
        durations = run(int(argument))
        print(
            f"DONE {statistics.median(durations)!r} {math.fsum(durations) / len(durations)!r}",
            flush=True,
        )


# ------------------------------------------------------------------------------ the parent


@dataclass
class Worker:
    driver: str
    config: str
    process: subprocess.Popen[str]

    def run(self, n: int) -> tuple[float, float]:
        stdin, stdout = _pipes(self.process)
        stdin.write(f"RUN {n}\n")
        stdin.flush()
        line = stdout.readline()
        if not line.startswith("DONE "):
            raise RuntimeError(f"{self.driver}/{self.config} worker said {line!r}")
        median, mean = line.split()[1:]
        return float(median), float(mean)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            _pipes(self.process)[0].close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _pipes(process: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    assert process.stdin is not None
    assert process.stdout is not None
    return process.stdin, process.stdout


def _spawn(args: list[str], cpu: int | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if cpu is not None:
        args = [*args, "--pin", str(cpu)]
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def start_workers(drivers: Sequence[str], warmup: int, cpu: int | None) -> list[Worker]:
    workers = [
        Worker(driver, config, _spawn(["--worker", driver, config, "--warmup", str(warmup)], cpu))
        for driver in drivers
        for config in CONFIGS
    ]
    for worker in workers:
        line = _pipes(worker.process)[1].readline()
        if line.strip() != "READY":
            for other in workers:
                other.stop()
            raise RuntimeError(f"{worker.driver}/{worker.config} failed to start: {line!r}")
    return workers


@dataclass
class Series:
    medians: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    median_ratios: list[float] = field(default_factory=list)
    mean_ratios: list[float] = field(default_factory=list)


def measure(
    drivers: Sequence[str], *, n: int, rounds: int, sessions: int, warmup: int, cpu: int | None
) -> dict[tuple[str, str], Series]:
    results = {(d, c): Series() for d in drivers for c in CONFIGS}
    rng = random.Random(20261202)
    progress = sys.stderr.isatty()
    done = 0
    for _ in range(sessions):
        workers = start_workers(drivers, warmup, cpu)
        try:
            for _ in range(rounds):
                order = list(workers)
                rng.shuffle(order)
                this_round = {(w.driver, w.config): w.run(n) for w in order}
                for (driver, config), (median, mean) in this_round.items():
                    plain_median, plain_mean = this_round[driver, "plain"]
                    series = results[driver, config]
                    series.medians.append(median)
                    series.means.append(mean)
                    series.median_ratios.append(median / plain_median)
                    series.mean_ratios.append(mean / plain_mean)
                done += 1
                if progress:
                    print(f"\r  round {done}/{rounds * sessions}", end="", file=sys.stderr)
        finally:
            for worker in workers:
                worker.stop()
    if progress:
        print(file=sys.stderr)
    return results


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(drivers: Sequence[str]) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    names = ["otel-raptor", "opentelemetry-sdk"]
    for driver in drivers:
        names += [DISTRIBUTIONS[driver], f"opentelemetry-instrumentation-{driver}"]
    versions = ", ".join(f"{name} {_version(name)}" for name in names)
    return (
        f"machine: {platform.platform()}; {cpu}; {os.cpu_count()} CPUs\n"
        f"python:  {platform.python_implementation()} {platform.python_version()}\n"
        f"versions: {versions}"
    )


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def report(
    results: dict[tuple[str, str], Series], drivers: Sequence[str], n: int, rounds: int
) -> None:
    print(f"\n{n} statements per configuration per round, {rounds} rounds.")
    verdicts = []
    for typical in (True, False):
        print("\np50 (typical statement)" if typical else "\nmean (all costs, noisier)")
        print(
            f"{'driver':<8} {'configuration':<18} {'µs/stmt':>8} {'ratio':>7}"
            f" {'ratio IQR':>13} {'overhead µs':>12} {'overhead %':>11}"
        )
        for driver in drivers:
            plain = statistics.median(
                results[driver, "plain"].medians if typical else results[driver, "plain"].means
            )
            found = {}
            for config in CONFIGS:
                series = results[driver, config]
                seconds = series.medians if typical else series.means
                ratios = series.median_ratios if typical else series.mean_ratios
                ratio = statistics.median(ratios)
                q1, q3 = _quartiles(ratios)
                micros = (ratio - 1.0) * plain * 1e6
                found[config] = (ratio, micros)
                print(
                    f"{driver:<8} {config:<18} {statistics.median(seconds) * 1e6:>8.1f}"
                    f" {ratio:>7.4f} {f'{q1:.3f}-{q3:.3f}':>13} {micros:>+12.2f}"
                    f" {(ratio - 1) * 100:>+10.2f}%"
                )
            raptor, contrib, both = found["raptor"], found["contrib"], found["both"]
            bare, control = found["raptor, timeout 0"], found["plain (control)"]
            percent = (raptor[0] - 1) * 100
            verdicts.append(
                f"{driver} ({'p50' if typical else 'mean'}): raptor {raptor[1]:+.2f} µs"
                f" ({percent:+.2f} %; {bare[1]:+.2f} µs, {(bare[0] - 1) * 100:+.2f} % without"
                f" the statement timeout), contrib tracing {contrib[1]:+.2f} µs"
                f" ({(contrib[0] - 1) * 100:+.2f} %), raptor on top of contrib"
                f" {both[1] - contrib[1]:+.2f} µs; control {(control[0] - 1) * 100:+.2f} %."
                f" At most {TARGET_PERCENT:g} %: {'yes' if percent <= TARGET_PERCENT else 'NO'}."
            )
    print()
    print("\n".join(verdicts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--statements", type=int, default=1000, help="per configuration per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per session")
    parser.add_argument("--sessions", type=int, default=2, help="fresh sets of worker processes")
    parser.add_argument("--warmup", type=int, default=500, help="statements before timing")
    parser.add_argument("--driver", choices=DRIVERS, action="append", help="default: all four")
    parser.add_argument("--pin", type=int, help="pin the client processes to this CPU")
    parser.add_argument("--worker", nargs=2, metavar=("DRIVER", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--alternate", help=argparse.SUPPRESS)
    parser.add_argument("--paired", help=argparse.SUPPRESS)
    parser.add_argument(
        "--mode",
        choices=("paired", "alternating", "processes"),
        help="one measurement only (default: all three)",
    )
    parser.add_argument(
        "--pairs", type=int, default=20000, help="statements per configuration, paired mode"
    )
    args = parser.parse_args(argv)
    if args.pin is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.pin})
    if args.worker:
        work(args.worker[0], args.worker[1], args.warmup)
        return 0
    if args.alternate:
        work_alternating(args.alternate, args.warmup, args.statements, args.rounds)
        return 0
    if args.paired:
        work_paired(args.paired, args.warmup, args.statements)
        return 0
    drivers = tuple(args.driver or DRIVERS)
    print(describe_machine(drivers), flush=True)
    missing = [
        name
        for driver in drivers
        for name in (DISTRIBUTIONS[driver], f"opentelemetry-instrumentation-{driver}")
        if _version(name) == "not installed"
    ]
    if missing:
        print(f"not installed: {', '.join(missing)}; install otel-raptor[test]", file=sys.stderr)
        return 2
    print(f"clients: {'pinned to CPU ' + str(args.pin) if args.pin is not None else 'not pinned'}")
    started = time.monotonic()
    if args.mode in (None, "paired"):
        paired(drivers, n=args.pairs, warmup=args.warmup, cpu=args.pin)
    if args.mode in (None, "alternating"):
        alternate(
            drivers,
            n=args.statements,
            rounds=args.rounds * args.sessions,
            warmup=args.warmup,
            cpu=args.pin,
        )
    if args.mode in (None, "processes"):
        print("\nOne process per configuration (contrib included):")
        results = measure(
            drivers,
            n=args.statements,
            rounds=args.rounds,
            sessions=args.sessions,
            warmup=args.warmup,
            cpu=args.pin,
        )
        report(results, drivers, args.statements, args.rounds * args.sessions)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
