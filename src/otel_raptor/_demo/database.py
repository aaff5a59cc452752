"""The demo's database phase: one write workload against a database, plain and under raptor.

PostgreSQL when one answers (``RAPTOR_DEMO_PG_DSN``, default ``host=127.0.0.1 port=5432
dbname=postgres user=postgres``) and psycopg is installed, reached through a loopback TCP
proxy the demo controls; SQLite (a temporary file) otherwise, so the demo runs on embedded
defaults. The schedule (seconds since the start of each run; ``--quick`` in brackets):

- ``healthy`` 0 - 1.5 (0.6);
- ``conflicts`` for 2.5 s (1 s): PostgreSQL: 30 % of the writes fail with ``40001``
  serialization_failure (a function the demo creates raises it at random); SQLite: another
  connection holds the write lock 80 ms in every 100 ms, and the workload's busy timeout is
  10 ms, so writes meet ``database is locked``;
- ``outage`` for 6 s (4.5 s; PostgreSQL only): the proxy cuts every connection, then accepts
  new ones without forwarding anything (as a network dropping every packet would), so a
  client waits out its connect timeout (2 s, libpq's least); when it ends, the connections
  it held are forwarded;
- ``recovered`` for 3 s (2.5 s).

The workload is ordinary application code: workers with one autocommit connection each
(reconnecting after an error), each inserting a row with an id of its own every 50 ms. It
remembers which writes were acknowledged; at the end the table is counted, so the report says
whether an acknowledged write was lost or doubled.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import socket
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatabasePhase", "DatabaseRun", "render_database", "run_database_phase"]

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=postgres user=postgres"
_CONFLICT_RATE = 0.3


class DatabasePhase(str, enum.Enum):
    HEALTHY = "healthy"
    CONFLICTS = "conflicts"
    OUTAGE = "outage"
    RECOVERED = "recovered"

    def __str__(self) -> str:
        return self.value


# Seconds each phase lasts, full and quick. The outage stays long in both: a few connect
# timeouts (2 s each) must fit in it for the breaker to matter.
_DURATIONS = {
    DatabasePhase.HEALTHY: (1.5, 0.6),
    DatabasePhase.CONFLICTS: (2.5, 1.0),
    DatabasePhase.OUTAGE: (6.0, 4.5),
    DatabasePhase.RECOVERED: (3.0, 2.5),
}


def _spans(*, quick: bool, outage: bool) -> list[tuple[DatabasePhase, float, float]]:
    spans = []
    start = 0.0
    for phase, (full, short) in _DURATIONS.items():
        if phase is DatabasePhase.OUTAGE and not outage:
            continue
        end = start + (short if quick else full)
        spans.append((phase, start, end))
        start = end
    return spans


@dataclass
class DatabaseRun:
    """What one run measured. Durations are seconds; ``phase`` maps to (calls, acknowledged)."""

    label: str
    backend: str
    calls: int = 0
    acked: set[int] = field(default_factory=set)
    by_phase: dict[DatabasePhase, list[int]] = field(default_factory=dict)
    failed_outage_durations: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    found: list[int] = field(default_factory=list)
    breaker: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Acknowledged writes that are not in the table."""
        return len(self.acked - set(self.found))

    @property
    def doubled(self) -> int:
        """Writes that are in the table more than once."""
        return len(self.found) - len(set(self.found))


# --- a loopback proxy the demo can cut ----------------------------------------------------------


class _Proxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; ``hang()`` cuts every connection and holds
    new ones without forwarding (a network that drops every packet), ``heal()`` forwards
    again, the held connections included (as retransmissions would get through)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._hanging = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self._hanging = True
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def heal(self) -> None:
        with self._lock:
            self._hanging = False
            held, self._held = self._held, []
        for client in held:
            self._forward(client)

    def close(self) -> None:
        self.hang()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(client)
                if self._hanging:
                    self._held.append(client)  # never answered, for now
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.append(server)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- backends ------------------------------------------------------------------------------------


class _Backend:
    name = ""
    has_outage = False

    def setup(self, tables: list[str]) -> None: ...

    def connect(self) -> Any:
        raise NotImplementedError

    def write(self, conn: Any, table: str, ident: int, conflicts: bool) -> None:
        raise NotImplementedError

    def errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def ids(self, table: str) -> list[int]:
        raise NotImplementedError

    @contextlib.contextmanager
    def phase(self, phase: DatabasePhase) -> Iterator[None]:
        yield

    def close(self, tables: list[str]) -> None: ...


class _Postgres(_Backend):
    has_outage = True

    def __init__(self, dsn: str) -> None:
        import psycopg  # noqa: PLC0415 - optional: only when PostgreSQL answers

        self.psycopg = psycopg
        self.dsn = dsn
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        host, port = str(params.get("host") or "127.0.0.1"), int(str(params.get("port") or 5432))
        self.proxy = _Proxy((host, port))
        self.name = f"PostgreSQL {host}:{port}, through a loopback proxy the demo controls"
        self.proxied = psycopg.conninfo.make_conninfo(
            dsn,
            host="127.0.0.1",
            port=self.proxy.port,
            connect_timeout=2,
        )
        self.flaky = f"raptor_demo_{secrets.token_hex(4)}_flaky"

    def _admin(self) -> Any:
        return self.psycopg.connect(self.dsn, autocommit=True)

    def setup(self, tables: list[str]) -> None:
        with self._admin() as conn:
            for table in tables:
                conn.execute(f"CREATE TABLE {table} (id int)")
            conn.execute(
                f"""CREATE FUNCTION {self.flaky}(rate float8) RETURNS int LANGUAGE plpgsql AS $$
                BEGIN
                    IF random() < rate THEN
                        RAISE EXCEPTION 'demo conflict' USING ERRCODE = '40001';
                    END IF;
                    RETURN 1;
                END $$"""
            )

    def connect(self) -> Any:
        return self.psycopg.connect(self.proxied, autocommit=True)

    def write(self, conn: Any, table: str, ident: int, conflicts: bool) -> None:
        rate = _CONFLICT_RATE if conflicts else 0.0
        conn.execute(f"INSERT INTO {table} SELECT %s WHERE {self.flaky}(%s) = 1", (ident, rate))

    def errors(self) -> tuple[type[BaseException], ...]:
        return (self.psycopg.Error,)

    def ids(self, table: str) -> list[int]:
        with self._admin() as conn:
            return [int(row[0]) for row in conn.execute(f"SELECT id FROM {table}")]

    @contextlib.contextmanager
    def phase(self, phase: DatabasePhase) -> Iterator[None]:
        if phase is DatabasePhase.OUTAGE:
            self.proxy.hang()
        try:
            yield
        finally:
            self.proxy.heal()

    def close(self, tables: list[str]) -> None:
        self.proxy.close()
        with contextlib.suppress(Exception), self._admin() as conn:
            for table in tables:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DROP FUNCTION IF EXISTS {self.flaky}(float8)")


class _SQLite(_Backend):
    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="raptor_demo_")
        self.path = os.path.join(self.directory, "demo.db")
        self.name = "SQLite (a temporary file; no PostgreSQL answered)"
        self._stop = threading.Event()
        self._holder: threading.Thread | None = None

    def setup(self, tables: list[str]) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        for table in tables:
            conn.execute(f"CREATE TABLE {table} (id INTEGER)")
        conn.close()

    def connect(self) -> Any:
        return sqlite3.connect(
            self.path, timeout=0.01, isolation_level=None, check_same_thread=False
        )

    def write(self, conn: Any, table: str, ident: int, conflicts: bool) -> None:
        conn.execute(f"INSERT INTO {table} VALUES (?)", (ident,))

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def ids(self, table: str) -> list[int]:
        conn = sqlite3.connect(self.path)
        try:
            return [int(row[0]) for row in conn.execute(f"SELECT id FROM {table}")]
        finally:
            conn.close()

    def _hold_the_lock(self) -> None:
        holder = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self._stop.is_set():
                holder.execute("BEGIN IMMEDIATE")
                time.sleep(0.08)
                holder.execute("COMMIT")
                time.sleep(0.02)
        finally:
            holder.close()

    @contextlib.contextmanager
    def phase(self, phase: DatabasePhase) -> Iterator[None]:
        if phase is DatabasePhase.CONFLICTS:
            self._stop.clear()
            self._holder = threading.Thread(target=self._hold_the_lock, daemon=True)
            self._holder.start()
        try:
            yield
        finally:
            self._stop.set()
            if self._holder is not None:
                self._holder.join(5)
                self._holder = None

    def close(self, tables: list[str]) -> None:
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                os.unlink(os.path.join(self.directory, name))
            os.rmdir(self.directory)


def _pick_backend(environ: Mapping[str, str]) -> _Backend:
    dsn = environ.get("RAPTOR_DEMO_PG_DSN") or DEFAULT_DSN
    try:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return _Postgres(dsn)
    except Exception:  # noqa: BLE001 - no PostgreSQL here: the embedded fallback
        return _SQLite()


# --- the workload ---------------------------------------------------------------------------------


def _one_run(
    label: str,
    backend: _Backend,
    table: str,
    *,
    quick: bool,
    workers: int,
    started: Callable[[float], None] | None = None,
) -> DatabaseRun:
    spans = _spans(quick=quick, outage=backend.has_outage)
    run = DatabaseRun(label, backend.name, by_phase={p: [0, 0] for p, _, _ in spans})
    lock = threading.Lock()
    ids = iter(range(1, 10**9))
    errors = backend.errors()
    current: list[DatabasePhase] = [DatabasePhase.HEALTHY]
    stop = threading.Event()

    def worker() -> None:
        conn = None
        while not stop.is_set():
            phase = current[0]
            with lock:
                ident = next(ids)
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = backend.connect()
                backend.write(conn, table, ident, phase is DatabasePhase.CONFLICTS)
            except errors as error:
                elapsed = time.perf_counter() - started
                with lock:
                    run.calls += 1
                    run.by_phase[phase][0] += 1
                    kind = type(error).__name__
                    run.failures[kind] = run.failures.get(kind, 0) + 1
                    if phase is DatabasePhase.OUTAGE:
                        run.failed_outage_durations.append(elapsed)
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
            else:
                with lock:
                    run.calls += 1
                    run.by_phase[phase][0] += 1
                    run.by_phase[phase][1] += 1
                    run.acked.add(ident)
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    began = time.monotonic()
    if started is not None:
        started(began)
    for thread in threads:
        thread.start()
    try:
        for phase, start, end in spans:
            time.sleep(max(0.0, began + start - time.monotonic()))
            current[0] = phase
            with backend.phase(phase):
                time.sleep(max(0.0, began + end - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    run.found = backend.ids(table)
    return run


def run_database_phase(
    *,
    quick: bool,
    instrument: Callable[[], Callable[[], None]],
    environ: Mapping[str, str],
) -> tuple[DatabaseRun, DatabaseRun]:
    """Run the workload plain, then between ``instrument()`` and the function it returns
    (which uninstruments), and return both runs' measurements."""
    from otel_raptor.core.events import BreakerTransitioned, Event  # noqa: PLC0415
    from otel_raptor.runtime.state import get_runtime  # noqa: PLC0415

    backend = _pick_backend(environ)
    token = secrets.token_hex(4)
    tables = [f"raptor_demo_{token}_plain", f"raptor_demo_{token}_raptor"]
    changes: list[str] = []
    began = [0.0]

    def on_event(event: Event) -> None:
        if isinstance(event, BreakerTransitioned):
            at = time.monotonic() - began[0]
            changes.append(f"{at:.2f} s {event.from_state.value} -> {event.to_state.value}")

    backend.setup(tables)
    try:
        plain = _one_run("plain", backend, tables[0], quick=quick, workers=4)
        uninstrument = instrument()
        unsubscribe = get_runtime().bus.subscribe(on_event)
        try:
            raptor = _one_run(
                "raptor",
                backend,
                tables[1],
                quick=quick,
                workers=4,
                started=lambda at: began.__setitem__(0, at),
            )
        finally:
            unsubscribe()
            uninstrument()
        raptor.breaker = changes
    finally:
        backend.close(tables)
    return plain, raptor


# --- the report ----------------------------------------------------------------------------------


def render_database(plain: DatabaseRun, raptor: DatabaseRun, *, quick: bool) -> str:
    phases = [p for p in DatabasePhase if p in plain.by_phase]
    lines = [f"Database phase: {plain.backend}"]
    what = {
        DatabasePhase.HEALTHY: "every write succeeds",
        DatabasePhase.CONFLICTS: (
            "30 % of the writes fail with 40001 serialization_failure"
            if raptor.backend.startswith("PostgreSQL")
            else "another connection holds the write lock 80 ms in every 100 ms"
        ),
        DatabasePhase.OUTAGE: "connections cut, new ones hang until the connect timeout",
        DatabasePhase.RECOVERED: "every write succeeds again",
    }
    for phase, start, end in _spans(quick=quick, outage=DatabasePhase.OUTAGE in phases):
        lines.append(f"  {start:4.1f} - {end:4.1f}  {phase.value:<10} {what[phase]}")
    lines.append(
        "Workload: 4 workers, one autocommit connection each (reconnect after an error),"
        " an INSERT with a new id every 50 ms."
    )
    lines.append("")

    def rate(run: DatabaseRun, phase: DatabasePhase) -> str:
        calls, ok = run.by_phase.get(phase, [0, 0])
        return f"{100.0 * ok / calls:.0f} % of {calls}" if calls else "-"

    def outage(run: DatabaseRun) -> str:
        durations = run.failed_outage_durations
        return f"{statistics.median(durations) * 1000:.1f} ms" if durations else "-"

    rows = [
        ("writes attempted", str(plain.calls), str(raptor.calls)),
        ("writes acknowledged", str(len(plain.acked)), str(len(raptor.acked))),
        *[(f"acknowledged, {p.value}", rate(plain, p), rate(raptor, p)) for p in phases],
    ]
    if DatabasePhase.OUTAGE in phases:
        rows.append(("failed call (outage), p50", outage(plain), outage(raptor)))
    rows += [
        ("rows in the table", str(len(plain.found)), str(len(raptor.found))),
        ("acknowledged writes lost", str(plain.lost), str(raptor.lost)),
        ("writes applied twice", str(plain.doubled), str(raptor.doubled)),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    lines.append(f"{'':<{width}}{'plain':>14}{'raptor':>14}")
    lines += [f"{label:<{width}}{left:>14}{right:>14}" for label, left, right in rows]
    for run in (plain, raptor):
        kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(run.failures.items())) or "none"
        lines.append(f"{run.label} failures: {kinds}")
    lines.append("raptor breaker: " + ("; ".join(raptor.breaker) or "no state change"))
    return "\n".join(lines)
