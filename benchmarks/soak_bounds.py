"""Soak: does raptor's memory and metric cardinality stay bounded under unbounded variety?

Drives, under ``RaptorInstrumentor().instrument()`` with SDK providers (an in-memory metric
reader and span exporter), a long stream of calls where every call brings something new:

- HTTP (requests and httpx) to many origins: ``127.0.0.N`` hosts times several loopback ports,
  paths with ids, query strings and ``Authorization`` headers carrying per-call tokens, and
  faults mixed in (5xx, 429 with ``Retry-After``, resets, timeouts);
- SQL with literals and per-call table names against sqlite3 and, when reachable, the shared
  PostgreSQL (psycopg2, psycopg) and MariaDB (pymysql), some failing with ids in the message;
- Redis keys holding tokens;
- ``Guard`` / ``@resilient`` services named per call, raising exceptions whose messages carry
  ids, and exception classes made per call.

Every ``checkpoint`` calls it measures RSS, tracemalloc of memory allocated in ``otel_raptor``
files, and the size of every container reachable from raptor's objects (runtime, sink,
monitor, memory controller, module globals). At the end it counts metric streams per
instrument and distinct values per attribute key, and scans every exported span attribute,
span event attribute and metric attribute for a secret, query string, SQL literal or id sent.

Run: ``.venv/bin/python benchmarks/soak_bounds.py [--calls N] [--checkpoint K]``; it prints a
JSON report. ``tests/test_soak_bounds.py`` runs a short version and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Markers put in what must never be exported; each call appends its number.
SECRET = "sEcReTtOkEn"
PASSWORD = "pAsSwOrD"
LITERAL = "sqlLiTeRaL"
ID_MARK = "9137"  # ids are 9137<n>: long enough not to collide with counts or ports
QUERY = "qSTRing"
#: Attributes whose values the app chose (its Guard services, its exception classes).
_NAMED_BY_THE_APP = ("raptor.service", "raptor.circuit_breaker.name", "error.type")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path
        if "/reset/" in path:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self.close_connection = True
            self.connection.close()
            return
        if "/hang/" in path:
            time.sleep(0.3)
            self.close_connection = True
            return
        code, headers = 200, {}
        if "/e503/" in path:
            code = 503
        elif "/e429/" in path:
            code, headers = 429, {"Retry-After": "0"}
        elif "/e404/" in path:
            code = 404
        body = b"ok"
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer


@dataclass
class Servers:
    servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def start(self, count: int) -> Servers:
        for _ in range(count):
            server = ThreadingHTTPServer(("0.0.0.0", 0), _Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        return self

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
    except OSError:
        return False
    return True


# --- measuring ----------------------------------------------------------------------------


def _is_raptor(obj: object) -> bool:
    return type(obj).__module__.startswith("otel_raptor")


def container_sizes(roots: dict[str, object], max_depth: int = 6) -> dict[str, int]:
    """``path -> len`` of every container reachable from ``roots`` through raptor objects."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()

    def attrs(obj: object) -> Iterator[tuple[str, object]]:
        names: list[str] = []
        with contextlib.suppress(Exception):
            names.extend(vars(obj))
        for klass in type(obj).__mro__:
            names.extend(getattr(klass, "__slots__", ()))
        for name in dict.fromkeys(names):
            with contextlib.suppress(Exception):
                yield name, object.__getattribute__(obj, name)

    def walk(path: str, obj: object, depth: int) -> None:
        if id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        if isinstance(obj, (dict, list, set, frozenset, tuple, collections.deque)) or (
            hasattr(obj, "__len__") and _is_raptor(obj)
        ):
            with contextlib.suppress(Exception):
                sizes[path] = len(obj)
        if isinstance(obj, dict):
            for i, value in enumerate(list(obj.values())[:4]):
                walk(f"{path}[v{i}]", value, depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            for i, value in enumerate(list(obj)[:4]):
                walk(f"{path}[{i}]", value, depth + 1)
            return
        with contextlib.suppress(Exception):
            import weakref

            if isinstance(
                obj, (weakref.WeakSet, weakref.WeakKeyDictionary, weakref.WeakValueDictionary)
            ):
                sizes[path] = len(obj)
                return
        if _is_raptor(obj) or depth == 0:
            for name, value in attrs(obj):
                if callable(value) and not _is_raptor(value):
                    continue
                walk(f"{path}.{name}", value, depth + 1)

    for name, root in roots.items():
        walk(name, root, 0)
    return sizes


def module_globals() -> dict[str, object]:
    roots: dict[str, object] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("otel_raptor") or module is None:
            continue
        for key, value in vars(module).items():
            special = key.startswith("__") or isinstance(value, type) or callable(value)
            if special and (not _is_raptor(value) or isinstance(value, type)):
                continue
            if isinstance(value, (str, int, float, bytes, bool)) or value is None:
                continue
            if type(value).__name__ == "module":
                continue
            roots[f"{name}.{key}"] = value
    return roots


def raptor_traced_bytes(snapshot: tracemalloc.Snapshot) -> int:
    filtered = snapshot.filter_traces([tracemalloc.Filter(True, "*otel_raptor*")])
    return sum(stat.size for stat in filtered.statistics("filename"))


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# --- the workload ---------------------------------------------------------------------------


@dataclass
class Soak:
    calls: int
    checkpoint: int
    ports: list[int]
    with_services: bool
    max_services: int = 256
    report_interval: float = 60.0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)

    def run(self) -> dict[str, Any]:
        import httpx
        import requests
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from otel_raptor import RetryPolicy
        from otel_raptor.config.downstream import DownstreamOverride
        from otel_raptor.instrumentor import RaptorInstrumentor
        from otel_raptor.runtime.state import get_runtime

        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import (
            InMemoryLogRecordExporter,
            SimpleLogRecordProcessor,
        )

        logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
        logger_provider = LoggerProvider()
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
        instrumentor = RaptorInstrumentor()
        instrumentor.instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            logger_provider=logger_provider,
            # Reports and alerts (logs) while the soak runs, so their text is scanned too.
            monitor={"report_interval": self.report_interval},
            retry=RetryPolicy(max_retries=1, base_delay=0.001, max_delay=0.002),
            request_timeout=0.1,
            max_services=self.max_services,
            health_check_path="/health",
            # Stale-if-error on every origin, so its cache sees every URL (with its tokens).
            downstreams=[DownstreamOverride(pattern="127.0.0.*", stale_if_error=True)],
        )
        self.requests, self.httpx = requests, httpx
        self.session = requests.Session()
        self.client = httpx.Client(timeout=0.1)
        self.aclient_loop = asyncio.new_event_loop()
        self.db = self._open_dbs()
        tracemalloc.start(1)
        try:
            started = time.monotonic()
            spans_seen: set[str] = set()
            secrets_found: list[str] = []
            attr_values: dict[str, set[str]] = collections.defaultdict(set)
            for i in range(self.calls):
                self._one(i)
                if (i + 1) % self.checkpoint == 0:
                    # Spans are scanned and dropped as we go: the exporter is ours, not raptor's.
                    for span in exporter.get_finished_spans():
                        self._scan_span(span, secrets_found, attr_values)
                        spans_seen.add(span.name)
                    exporter.clear()
                    data = reader.get_metrics_data()  # also what a periodic reader does
                    self.samples.append(self._sample(i + 1, time.monotonic() - started, data))
            for span in exporter.get_finished_spans():
                self._scan_span(span, secrets_found, attr_values)
            data = reader.get_metrics_data()
            streams, metric_values, metric_secrets = self._metrics(data)
            pattern_secrets: list[str] = []
            monitor = instrumentor.error_recovery_monitor
            if monitor is not None:
                for service, patterns in monitor.analytics.patterns(limit=50).items():
                    for pattern in patterns:
                        self._scan(f"pattern of {service}", pattern.template, pattern_secrets)
                self._scan("report", json.dumps(monitor.report().as_dict()), pattern_secrets)
            log_secrets: list[str] = []
            log_names: collections.Counter[str] = collections.Counter()
            for item in logs.get_finished_logs():
                record = item.log_record
                name = str((record.attributes or {}).get("event.name", record.event_name))
                log_names[name] += 1
                self._scan(f"log {name} body", record.body, log_secrets)
                for key, value in (record.attributes or {}).items():
                    self._scan(f"log {name} {key}", value, log_secrets)
            runtime = get_runtime()
            return {
                "calls": self.calls,
                "seconds": round(time.monotonic() - started, 1),
                "errors_raised_to_app": dict(self.errors.most_common(12)),
                "samples": self.samples,
                "growing": self._growing(),
                "metric_streams": streams,
                "metric_attribute_values": metric_values,
                "span_names": sorted(spans_seen),
                "span_attribute_cardinality": {k: len(v) for k, v in sorted(attr_values.items())},
                "secrets_in_spans": secrets_found[:40],
                "secrets_in_metrics": metric_secrets[:40],
                "secrets_in_monitor_patterns": pattern_secrets[:40],
                "logs": dict(log_names),
                "secrets_in_logs": log_secrets[:40],
                "services_past_the_cap": self._folded(runtime),
            }
        finally:
            tracemalloc.stop()
            self.session.close()
            self.client.close()
            self.aclient_loop.close()
            for conn in self.db.values():
                with contextlib.suppress(Exception):
                    conn.close()
            instrumentor.uninstrument()

    def _folded(self, runtime: Any) -> bool:
        """Whether some service was folded into ``other`` (the cap was reached)."""
        return any(name == "other" for name, _ in runtime.breakers.items())

    # -- calls --

    def _open_dbs(self) -> dict[str, Any]:
        import sqlite3

        conns: dict[str, Any] = {"sqlite": sqlite3.connect(":memory:", check_same_thread=False)}
        if not self.with_services:
            return conns
        if _reachable(5432):
            import psycopg
            import psycopg2

            conns["psycopg2"] = psycopg2.connect(
                host="127.0.0.1", dbname="test", user="postgres", password=PASSWORD + "pg2"
            )
            conns["psycopg2"].autocommit = True
            conns["psycopg"] = psycopg.connect(
                f"host=127.0.0.1 dbname=test user=postgres password={PASSWORD}pg3",
                autocommit=True,
            )
        if _reachable(3306):
            import pymysql

            conns["pymysql"] = pymysql.connect(
                host="127.0.0.1", user="root", password="", database="test", autocommit=True
            )
        if _reachable(6379):
            import redis

            conns["redis"] = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5)
        return conns

    def _one(self, i: int) -> None:
        kind = i % 8
        try:
            if kind in (0, 1, 2):
                self._http(i)
            elif kind == 3:
                self._sql(i)
            elif kind == 4:
                self._redis(i)
            elif kind == 5:
                self._guard(i)
            elif kind == 6:
                self._decorated(i)
            else:
                self._async_http(i)
        except Exception as error:  # noqa: BLE001 - counted: faults are expected
            self.errors[type(error).__name__] += 1

    def _url(self, i: int, fault: str) -> str:
        host = f"127.0.0.{1 + (i * 7) % 250}"
        port = self.ports[(i // 3) % len(self.ports)]
        return (
            f"http://{host}:{port}/users/{ID_MARK}{i}/{fault}/orders"
            f"?token={SECRET}{i}&q={QUERY}{i}&password={PASSWORD}{i}"
        )

    def _fault(self, i: int) -> str:
        return ("ok", "ok", "e503", "e429", "reset", "ok", "e404", "hang", "ok", "ok")[i % 10]

    def _http(self, i: int) -> None:
        url = self._url(i, self._fault(i))
        headers = {"Authorization": f"Bearer {SECRET}{i}", "X-Api-Key": f"{SECRET}k{i}"}
        if i % 2:
            self.session.get(url, headers=headers, timeout=0.1)
        else:
            self.client.get(url, headers=headers)

    def _async_http(self, i: int) -> None:
        url = self._url(i, self._fault(i // 3))
        httpx = self.httpx

        async def go() -> None:
            async with httpx.AsyncClient(timeout=0.1) as client:
                await client.get(url, headers={"Authorization": f"Basic {SECRET}{i}"})

        self.aclient_loop.run_until_complete(go())

    def _sql(self, i: int) -> None:
        names = [n for n in ("sqlite", "psycopg2", "psycopg", "pymysql") if n in self.db]
        name = names[(i // 8) % len(names)]
        conn = self.db[name]
        table = f"t_{ID_MARK}{i}"
        mark = "?" if name == "sqlite" else "%s"
        cur = conn.cursor()
        try:
            if i % 3 == 0:  # fails: the message names the missing table (an id)
                cur.execute(f"SELECT secret FROM missing_{ID_MARK}{i} WHERE pw = '{LITERAL}{i}'")
            else:
                cur.execute(f"CREATE TEMPORARY TABLE {table} (v TEXT)")
                cur.execute(f"INSERT INTO {table} (v) VALUES ('{LITERAL}{i}')")
                cur.execute(f"SELECT v FROM {table} WHERE v = {mark}", (f"{LITERAL}p{i}",))
                cur.fetchall()
                cur.execute(f"DROP TABLE {table}")
        finally:
            with contextlib.suppress(Exception):
                cur.close()
            if name == "psycopg2" and i % 3 == 0:
                pass  # autocommit: no aborted transaction to roll back

    def _redis(self, i: int) -> None:
        conn = self.db.get("redis")
        if conn is None:
            self._guard(i)
            return
        key = f"user:{ID_MARK}{i}:token:{SECRET}{i}"
        conn.set(key, f"{PASSWORD}{i}", ex=5)
        conn.get(key)
        if i % 5 == 0:
            conn.execute_command("NOSUCHCMD", f"{SECRET}{i}")  # an error reply with the argument

    def _guard(self, i: int) -> None:
        from otel_raptor import Guard, RetryPolicy

        guard = Guard(
            f"svc-{ID_MARK}{i}",
            health_check=lambda: False,
            retry=RetryPolicy(max_retries=1, base_delay=0.0005, max_delay=0.001),
        )
        error_type = type(f"Err{ID_MARK}{i}", (RuntimeError,), {})

        def call() -> str:
            if i % 2:
                raise error_type(
                    f"order {ID_MARK}{i} failed: password={PASSWORD}{i} at"
                    f" https://api.example.com/o/{ID_MARK}{i}?sig={SECRET}{i}"
                )
            if i % 3 == 0:
                raise ConnectionResetError(f"peer {ID_MARK}{i} reset; Bearer {SECRET}{i}")
            return "ok"

        guard.call(call)

    def _decorated(self, i: int) -> None:
        from otel_raptor import resilient

        @resilient(service=f"deco-{ID_MARK}{i}")
        def call() -> None:
            if i % 2:
                raise TimeoutError(
                    f"timed out on /v1/jobs/{ID_MARK}{i}?access_token={SECRET}{i}&{QUERY}=1"
                    f" key {SECRET}{i}ABCDEFGHIJKLMNOPQRSTUVWX"
                )

        call()

    # -- measuring --

    def _roots(self) -> dict[str, object]:
        from otel_raptor.runtime.state import get_runtime

        roots: dict[str, object] = {"runtime": get_runtime()}
        roots.update(module_globals())
        return roots

    def _sample(self, calls: int, seconds: float, data: Any) -> dict[str, Any]:
        gc.collect()
        sizes = container_sizes(self._roots())
        streams = 0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    streams += len(metric.data.data_points)
        return {
            "calls": calls,
            "seconds": round(seconds, 1),
            "rss_mib": round(rss_bytes() / 2**20, 1),
            "raptor_traced_kib": round(raptor_traced_bytes(tracemalloc.take_snapshot()) / 1024, 1),
            "metric_points": streams,
            "sizes": sizes,
        }

    def _growing(self) -> dict[str, list[int]]:
        """Containers still growing over the second half of the run (not plateaued)."""
        if len(self.samples) < 4:
            return {}
        half = self.samples[len(self.samples) // 2]["sizes"]
        last = self.samples[-1]["sizes"]
        grown = {}
        for path, size in last.items():
            before = half.get(path)
            if before is not None and size > before and size > 64:
                grown[path] = [s["sizes"].get(path, -1) for s in self.samples]
        return grown

    def _scan(self, where: str, value: object, found: list[str]) -> None:
        if isinstance(value, (int, float)):
            # A number we computed (a retry delay of 0.00038273414189137 s) may spell any
            # digits, the id mark's included; a secret, a literal or an id arrives as text.
            return
        text = str(value)
        marks: tuple[str, ...] = (SECRET, PASSWORD, LITERAL, QUERY)
        if not any(name in where for name in _NAMED_BY_THE_APP):
            marks += (ID_MARK,)  # services and exception classes are named (with ids) by us
        for mark in marks:
            if mark in text:
                at = text.index(mark)
                found.append(f"{where}: ...{text[max(0, at - 100) : at + 60]}")
                return

    def _scan_span(self, span: Any, found: list[str], values: dict[str, set[str]]) -> None:
        for key, value in (span.attributes or {}).items():
            self._scan(f"span {span.name} {key}", value, found)
            values[key].add(str(value))
        self._scan(f"span name {span.name}", span.name, found)
        self._scan(f"span status {span.name}", span.status.description, found)
        for event in span.events:
            for key, value in (event.attributes or {}).items():
                self._scan(f"event {span.name}/{event.name} {key}", value, found)

    def _metrics(self, data: Any) -> tuple[dict[str, int], dict[str, int], list[str]]:
        streams: dict[str, int] = {}
        values: dict[str, set[str]] = collections.defaultdict(set)
        found: list[str] = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points = metric.data.data_points
                    streams[metric.name] = len(points)
                    for point in points:
                        for key, value in (point.attributes or {}).items():
                            values[key].add(str(value))
                            self._scan(f"metric {metric.name} {key}", value, found)
        return streams, {k: len(v) for k, v in sorted(values.items())}, found


def soak(
    calls: int,
    checkpoint: int,
    servers: int = 8,
    with_services: bool = True,
    max_services: int = 256,
) -> dict[str, Any]:
    running = Servers().start(servers)
    try:
        return Soak(calls, checkpoint, running.ports, with_services, max_services).run()
    finally:
        running.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--checkpoint", type=int, default=2000)
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--no-services", action="store_true")
    parser.add_argument("--max-services", type=int, default=256)
    parser.add_argument("--all-sizes", action="store_true", help="print every container size")
    args = parser.parse_args(argv)
    report = soak(
        args.calls, args.checkpoint, args.servers, not args.no_services, args.max_services
    )
    if not args.all_sizes:
        for sample in report["samples"]:
            sizes = sample.pop("sizes")
            sample["largest"] = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:12])
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
