"""A bad day for a PostgreSQL server, and three ways of calling it, side by side.

A private PostgreSQL (``tests/support/dbservers.py``: its own cluster on a free port, never
the shared one) is reached through the fault-injecting TCP proxy (``tests/support/
tcp_proxy.py``). For each contender the parent plays the same schedule (seconds at
``--scale 1``; ``SCHEDULE`` below) with the same seed::

    healthy    6   nothing wrong
    degraded  12   each client-to-server chunk (a statement, or a step of a connect) rolls:
                   5 % the link is reset before it is forwarded (the statement never ran),
                   5 % it runs and its answer is lost (the link is reset instead: the client
                   cannot know), 15 % it is delayed 50 ms; the server itself answers
    outage    15   the server killed (``pg_ctl stop -m immediate``, a crash)
    heal      10   the server started again (recovery from its WAL)

The client (a fresh interpreter per contender, which says READY once its pool is full; the
parent then starts the schedule) is the usual app: a psycopg_pool
``ConnectionPool`` (``min_size = max_size = --threads``, ``timeout`` 3 s, autocommit,
``connect_timeout`` 2 s), ``--threads`` threads (4), each starting a statement ``--rate``
times a second (75, so 300 a second in all; open loop: a slot missed while a statement is
still running is skipped, not queued); half are ``SELECT``\\s by id, half autocommit
``INSERT``\\s of a client-made id into a table whose id is *not* unique, so a write applied
twice shows as two rows. The contenders:

    plain      the pool and the driver, the app retries nothing
    tenacity   what apps pick today: tenacity around ``with pool.connection()``, 4 attempts,
               ``wait_exponential_jitter(initial=0.02, max=1)``, on ``OperationalError``
               (``PoolTimeout`` included: it is one)
    raptor     ``RaptorInstrumentor().instrument()`` with SDK providers; every setting the
               default but ``OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT=2`` (60 s by
               default: a short run)

Reported per phase and contender: the success rate of the statements *started* in that
phase, the statements started, the share of the statements the open loop *offered* that
succeeded ("served": a slot skipped while a thread waited, for the pool say, is not served;
a little over 100 % can happen at a phase's edges), the connections opened to the proxy
(refused ones included: the load a dead server gets) and the chunks forwarded to the server
(about one per statement, plus a few per connect), that load against plain's, and the
median and 99th percentile latency of the failures (fail-fast or not); then, per contender,
the acknowledged INSERTs missing from the table (lost), the ids present twice or more
(doubled), the failed INSERTs whose row is there all the same (outcome unknown to the app:
not a fault), and the time from the restart (``pg_ctl start`` returned) to the first
success; and a verdict per ground rule 0: raptor's success rate and served share at least
plain's in every phase where the server answers (healthy, degraded, heal), and no write
lost or doubled. A phase where raptor is behind by less than two standard errors of the
difference (binomial; the proxy's dice fall differently for each contender, which sends its
own number of statements and connects) is shown as behind within noise, not as a breach.
The exit status is 1 when the verdict is BROKEN.

    .venv/bin/python benchmarks/bench_db_chaos.py            # about 2.5 minutes
    .venv/bin/python benchmarks/bench_db_chaos.py --quick    # under 40 s, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_chaos import Schedule, open_loop  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTENDERS = ("plain", "tenacity", "raptor")
#: name, seconds at scale 1
SCHEDULE = (("healthy", 6.0), ("degraded", 12.0), ("outage", 15.0), ("heal", 10.0))
#: The phases where the server answers: rule 0 compares success rates there.
ANSWERING = ("healthy", "degraded", "heal")
QUICK_SCALE = 0.2
#: Degraded: the share of client-to-server chunks reset, answered-then-lost, delayed.
CUT, LOSE_ANSWER, SLOW, SLOW_DELAY_S = 0.05, 0.05, 0.15, 0.05
POOL_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 2
RAPTOR_ENV = {"OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT": "2"}
#: Seconds the client may take to import, instrument and fill its pool before it says READY.
STARTUP_S = 30.0


def schedule_of(start: float, scale: float) -> Schedule:
    return Schedule(start, scale, SCHEDULE)


# --- the client (one fresh interpreter per contender) -------------------------------------------

#: One statement: phase, "read"/"write", succeeded, started (time.time()), seconds, id written.
Result = tuple[str, str, bool, float, float, str]


def client(contender: str, port: int, table: str, args: argparse.Namespace) -> None:
    global _schedule  # noqa: PLW0603 - the diagnostics' clock
    run = _statement_runner(contender, port, table, args.threads)
    # Ready (imported, instrumented, the pool full): the parent answers with the start time.
    print("READY", flush=True)
    schedule = _schedule = schedule_of(float(sys.stdin.readline()), args.scale)
    errors: Counter[str] = Counter()
    results: list[Result] = []
    lock = threading.Lock()
    interval = 1.0 / args.rate

    def work(worker: int) -> None:
        dice = random.Random(f"{args.seed}:{worker}")
        mine: list[Result] = []
        written: list[str] = []
        for now, phase in open_loop(schedule, worker * interval / args.threads, interval):
            if written and dice.random() < 0.5:
                kind, ident = "read", dice.choice(written)
            else:
                kind, ident = "write", f"{worker}-{len(mine)}"
            began = time.perf_counter()
            try:
                run(kind, ident)
                ok = True
            except Exception as error:  # noqa: BLE001 - a failed statement, whatever raised
                ok = False
                with lock:
                    errors[f"{phase}:{type(error).__name__}"] += 1
            mine.append((phase, kind, ok, now, time.perf_counter() - began, ident))
            if kind == "write":
                written.append(ident)
        with lock:
            results.extend(mine)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print("RESULTS " + json.dumps(results))
    print("ERRORS " + json.dumps(errors))
    print("RAPTOR " + json.dumps(_raptor_outcomes))


#: For raptor: how its recoveries ended, by phase (from its event bus).
_raptor_outcomes: dict[str, dict[str, int]] = {}
_schedule = schedule_of(float("inf"), 1.0)  # the client's, once the parent has said when


def _instrument_raptor() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from otel_raptor import RaptorInstrumentor, get_runtime
    from otel_raptor.core.events import BreakerTransitioned, RecoveryFinished

    class DropExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    RaptorInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, memory=False, monitor=False
    )

    def count(event: object) -> None:
        schedule, now = _schedule, time.time()
        phase = schedule.phase_at(now) or "after"
        if isinstance(event, RecoveryFinished):
            key = f"{event.outcome.value}:{event.give_up_reason or event.category}"
        elif isinstance(event, BreakerTransitioned):
            # When, in its phase: a breaker that opens late in the outage refuses the heal.
            since = now - schedule.begins(phase) if phase != "after" else 0.0
            key = f"breaker {event.to_state.value} at +{since:.1f}s"
        else:
            return
        by_phase = _raptor_outcomes.setdefault(phase, {})
        by_phase[key] = by_phase.get(key, 0) + 1

    get_runtime().bus.subscribe(count)


def _statement_runner(contender: str, port: int, table: str, threads: int) -> Any:
    if contender == "raptor":
        _instrument_raptor()
    import psycopg
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
        f"connect_timeout={CONNECT_TIMEOUT_S}",
        min_size=threads,
        max_size=threads,
        timeout=POOL_TIMEOUT_S,
        kwargs={"autocommit": True},
        open=False,
    )
    pool.open(wait=True, timeout=STARTUP_S)
    read = f"SELECT count(*) FROM {table} WHERE id = %s"
    write = f"INSERT INTO {table} (id) VALUES (%s)"

    def run(kind: str, ident: str) -> None:
        with pool.connection() as conn:
            if kind == "read":
                conn.execute(read, (ident,)).fetchone()
            else:
                conn.execute(write, (ident,))

    if contender != "tenacity":
        return run
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential_jitter(initial=0.02, max=1),
        retry=tenacity.retry_if_exception_type(psycopg.OperationalError),
        reraise=True,
    )(run)


# --- the parent -----------------------------------------------------------------------------------


@dataclass
class Run:
    contender: str
    schedule: Schedule
    results: list[Result]
    errors: dict[str, int]
    diagnostics: dict[str, dict[str, int]]
    #: per phase: connections opened to the proxy, chunks forwarded to the server
    load: dict[str, tuple[int, int]]
    restarted: float
    offered_per_s: float
    rows: Counter[str] = field(default_factory=Counter)


def _sql(port: int, statement: str) -> list[tuple[Any, ...]]:
    import psycopg

    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


def run_contender(contender: str, server: Any, args: argparse.Namespace) -> Run:
    from tests.support.tcp_proxy import FaultProxy

    table = f"chaos_{contender}"
    _sql(server.port, f"DROP TABLE IF EXISTS {table}")
    # Not unique on purpose: a write applied twice must show as two rows.
    _sql(server.port, f"CREATE TABLE {table} (id text NOT NULL)")
    _sql(server.port, f"CREATE INDEX ON {table} (id)")
    env = dict(os.environ)
    env.update(RAPTOR_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    load: dict[str, tuple[int, int]] = {}
    with (
        FaultProxy(("127.0.0.1", server.port)) as proxy,
        tempfile.TemporaryFile("w+") as err,
    ):
        command = [
            sys.executable, __file__, "--client", contender, "--port", str(proxy.port),
            "--table", table, "--scale", str(args.scale), "--threads", str(args.threads),
            "--rate", str(args.rate), "--seed", str(args.seed),
        ]  # fmt: skip
        # stderr to a file: the pool's warnings during the outage would fill a pipe's buffer.
        # stdout stays quiet until the client ends, but for READY.
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        if process.stdout.readline().strip() != "READY":
            process.wait(STARTUP_S)
            err.seek(0)
            raise RuntimeError(f"{contender} client failed to start:\n{err.read()[-3000:]}")
        start = time.time() + 0.2
        schedule = schedule_of(start, args.scale)
        process.stdin.write(f"{start!r}\n")
        process.stdin.flush()
        restarted = float("nan")
        counted = (0, 0)
        for phase, _ in (*SCHEDULE, ("end", 0.0)):
            at = schedule.end if phase == "end" else schedule.begins(phase)
            time.sleep(max(0.0, at - time.time()))
            now = (proxy.attempts, proxy.sends)
            previous = schedule.phase_at(at - 1e-3)
            if previous is not None:
                load[previous] = (now[0] - counted[0], now[1] - counted[1])
            counted = now
            if phase == "degraded":
                proxy.random_faults(
                    random.Random(f"{args.seed}:degraded"),
                    cut=CUT,
                    lose_answer=LOSE_ANSWER,
                    slow=SLOW,
                    delay=SLOW_DELAY_S,
                )
            elif phase == "outage":
                proxy.heal()
                server.kill()
            elif phase == "heal":
                server.start()
                restarted = time.time()
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{contender} client failed:\n{err.read()[-3000:]}")
        lines = output.splitlines()
    results = [tuple(r) for r in json.loads(_line(lines, "RESULTS"))]
    run = Run(
        contender,
        schedule,
        results,  # type: ignore[arg-type]
        json.loads(_line(lines, "ERRORS")),
        json.loads(_line(lines, "RAPTOR")),
        load,
        restarted,
        args.threads * args.rate,
    )
    run.rows.update(row[0] for row in _sql(server.port, f"SELECT id FROM {table}"))
    return run


def _line(lines: list[str], tag: str) -> str:
    return next(x for x in lines if x.startswith(tag + " ")).removeprefix(tag + " ")


def _percentile_ms(values: list[float], share: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(share * len(ordered)))]:.1f}ms"


def success_rate(run: Run, phase: str) -> float:
    calls = [ok for p, _, ok, _, _, _ in run.results if p == phase]
    return 100.0 * sum(calls) / len(calls) if calls else float("nan")


@dataclass(frozen=True)
class Writes:
    acknowledged: int
    lost: int
    doubled: int
    unknown_applied: int


def writes(run: Run) -> Writes:
    acked = {i for _, kind, ok, _, _, i in run.results if kind == "write" and ok}
    failed = {i for _, kind, ok, _, _, i in run.results if kind == "write" and not ok}
    return Writes(
        acknowledged=len(acked),
        lost=len(acked - run.rows.keys()),
        doubled=sum(1 for count in run.rows.values() if count > 1),
        unknown_applied=len(failed & run.rows.keys()),
    )


def restart_to_first_success(run: Run) -> float:
    firsts = [t for _, _, ok, t, _, _ in run.results if ok and t >= run.restarted]
    return min(firsts) - run.restarted if firsts else float("nan")


def report(runs: list[Run]) -> bool:
    """Print the tables; return whether raptor keeps rule 0 (True without raptor or plain)."""
    plain = next((r for r in runs if r.contender == "plain"), None)
    print(
        f"{'phase':9s} {'contender':9s} {'success':>8s} {'stmts':>6s} {'served':>7s} "
        f"{'connects':>8s} {'sends':>6s} {'x plain':>7s} {'fail p50':>9s} {'fail p99':>9s}"
    )
    for phase, _ in SCHEDULE:
        for run in runs:
            calls = [r for r in run.results if r[0] == phase]
            served = served_of(run, phase)[0]
            failures = [r[4] * 1000 for r in calls if not r[2]]
            connects, sends = run.load.get(phase, (0, 0))
            load = float("nan")
            if plain is not None and sum(plain.load.get(phase, (0, 0))):
                load = (connects + sends) / sum(plain.load[phase])
            print(
                f"{phase:9s} {run.contender:9s} {success_rate(run, phase):7.1f}% "
                f"{len(calls):6d} {served:6.1f}% {connects:8d} {sends:6d} {load:7.2f} "
                f"{_percentile_ms(failures, 0.5):>9s} {_percentile_ms(failures, 0.99):>9s}"
            )
        print()
    print(
        f"{'writes':9s} {'contender':9s} {'acked':>6s} {'lost':>5s} {'doubled':>7s} "
        f"{'failed but applied':>18s} {'restart -> 1st success':>22s}"
    )
    for run in runs:
        w = writes(run)
        print(
            f"{'':9s} {run.contender:9s} {w.acknowledged:6d} {w.lost:5d} {w.doubled:7d} "
            f"{w.unknown_applied:18d} {restart_to_first_success(run):20.2f} s"
        )
    for run in runs:
        print(f"\n{run.contender}: failures by phase and type")
        by_phase: dict[str, list[str]] = {}
        for key, count in sorted(run.errors.items()):
            phase, _, name = key.partition(":")
            by_phase.setdefault(phase, []).append(f"{name} {count}")
        for phase, shown in by_phase.items():
            print(f"  {phase:9s} {', '.join(shown)}")
        if run.diagnostics:
            print(f"{run.contender}: how its recoveries ended, by phase")
            for phase, outcomes in run.diagnostics.items():
                shown_outcomes = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
                print(f"  {phase:9s} {shown_outcomes}")
    raptor = next((r for r in runs if r.contender == "raptor"), None)
    if raptor is None or plain is None:
        return True
    w = writes(raptor)
    lines, kept = [], w.lost == 0 and w.doubled == 0
    for label, metric in (("success", success_of), ("served", served_of)):
        behind, within_noise = [], []
        for phase in ANSWERING:
            (mine, n_mine), (theirs, n_theirs) = metric(raptor, phase), metric(plain, phase)
            gap = theirs - mine
            if gap > 2 * _standard_error(mine, n_mine, theirs, n_theirs):
                behind.append(f"{phase} by {gap:.1f} points")
            elif gap > 0:
                within_noise.append(f"{phase} by {gap:.1f} points")
        kept = kept and not behind
        lines.append(
            f"  {label}: raptor "
            + ", ".join(
                f"{p} {metric(raptor, p)[0]:.1f}% vs {metric(plain, p)[0]:.1f}%" for p in ANSWERING
            )
            + (f"; BEHIND plain: {', '.join(behind)}" if behind else "")
            + (
                f"; behind within noise (2 sigma): {', '.join(within_noise)}"
                if within_noise
                else ""
            )
        )
    print(f"\nrule 0: {'KEPT' if kept else 'BROKEN'} (raptor against plain)")
    print("\n".join(lines))
    print(f"  writes: raptor lost {w.lost}, doubled {w.doubled}")
    return kept


def success_of(run: Run, phase: str) -> tuple[float, int]:
    """The share of the statements started in ``phase`` that succeeded, and how many started."""
    return success_rate(run, phase), sum(1 for r in run.results if r[0] == phase)


def served_of(run: Run, phase: str) -> tuple[float, int]:
    """The successes in ``phase`` against the statements the open loop offered (a slot
    skipped while a thread waited, for the pool say, counts as not served)."""
    seconds = dict(SCHEDULE)[phase] * run.schedule.scale
    offered = max(1, round(seconds * run.offered_per_s))
    successes = sum(1 for r in run.results if r[0] == phase and r[2])
    return 100.0 * successes / offered, offered


def _standard_error(one: float, n_one: int, other: float, n_other: int) -> float:
    """The standard error, in points, of the difference of two rates (binomial, in
    percent): the dice fall differently for each contender, which sends its own number of
    statements and connects. (Waits for the pool are not independent draws: for ``served``
    this understates the noise.)"""
    variance = 0.0
    for rate, n in ((one, n_one), (other, n_other)):
        share = min(max(rate / 100.0, 0.0), 1.0)
        variance += share * (1.0 - share) / max(n, 1)
    return 100.0 * variance**0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="stretch every phase")
    parser.add_argument("--quick", action="store_true", help=f"--scale {QUICK_SCALE}")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument(
        "--rate", type=float, default=75.0, help="statements per second per thread (open loop)"
    )
    parser.add_argument("--seed", type=int, default=7, help="the proxy's and workers' dice")
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.scale = QUICK_SCALE
    if args.client:
        client(args.client, args.port, args.table, args)
        return
    from tests.support.dbservers import PrivatePostgres

    started = time.monotonic()
    server = PrivatePostgres()
    try:
        server.start()
        runs = [run_contender(c, server, args) for c in args.contenders]
    finally:
        server.close()
    print(
        f"Python {sys.version.split()[0]}, psycopg + psycopg_pool, {args.threads} threads x "
        f"{args.rate:g} statements/s (open loop), scale {args.scale}, seed {args.seed}, "
        f"one run of {time.monotonic() - started:.0f} s\n"
    )
    sys.exit(0 if report(runs) else 1)


if __name__ == "__main__":
    main()
