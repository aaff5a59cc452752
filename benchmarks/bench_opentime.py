"""How long should a breaker stay open? raptor at several open times, on harsh workloads.

The default ``recovery_timeout`` decides how long an app is refused after its downstream heals
(up to one open duration, half of it on average) and how often a dead downstream is probed
(one request per open duration per process). This script measures both, with ``plain``
(requests, no retries) as the yardstick, on three schedules (seconds at ``--scale 1``):

    outage      healthy 5 · hang 5 · down 85 · heal 60
    outages     healthy 5 · 4 x (hang 3 · down 27, 34, 41, 48 · up 20) · heal 5
    flapping    healthy 5 · 6 x (down 5 · up 5) · heal 30

"hang": no answer (the client times out); "down": every connection reset at once; "up" and
"heal": every request answered 200. The four outages of different lengths put their heals at
different points of the breaker's open/probe cycle: one heal is one sample of luck.

Contenders (each in its own interpreter with its own loopback server, all of them at once so
that they see the same host; raptor with its defaults but for the breaker's open time, set
through an ``OTEL_PYTHON_RAPTOR_CONFIG`` file):

    plain           requests, no retries
    T               raptor, recovery_timeout T s, no growth
    B..C            raptor, recovery_timeout B s, x2 per failed probe, capped at C s

Client: ``--threads`` threads (8) x ``--rate`` calls/s (25), open loop, GETs, a 1 s timeout.
Reported per workload and contender: the success rate of the calls started while the server
was back after a failure, the time from each return to the first success (mean and worst),
the requests the server received while down (hanging and reset connections included) and
their share of plain's, and the whole run's success rate against plain's. Every open time and
phase is multiplied by ``--scale``, so the ratios hold on a quicker run (raptor's retry
delays are not scaled: keep 1 for the figures in benchmarks/README.md).

    .venv/bin/python benchmarks/bench_opentime.py                       # about 5 minutes
    .venv/bin/python benchmarks/bench_opentime.py --workloads outages flapping \
        --contenders plain 1 2 3 5 10 2..30                             # about 6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import Process, Queue
from pathlib import Path
from typing import Any

from bench_chaos import Schedule, open_loop  # this script's directory is on sys.path

CLIENT_TIMEOUT_S = 1.0
#: Phases: "healthy", "hang" (no answer until the phase ends), "down" (connections reset),
#: "up" (the server is back, between failures) and "heal" (back for good, the last phase).
WORKLOADS: dict[str, tuple[tuple[str, float], ...]] = {
    "outage": (("healthy", 5.0), ("hang", 5.0), ("down", 85.0), ("heal", 60.0)),
    # Four outages of different lengths, so that the heals fall at different points of the
    # breaker's open/probe cycle: one heal is one sample of a time that is luck by nature.
    "outages": (
        ("healthy", 5.0),
        *(
            phase
            for length in (30.0, 37.0, 44.0, 51.0)
            for phase in (("hang", 3.0), ("down", length - 3.0), ("up", 20.0))
        ),
        ("heal", 5.0),
    ),
    "flapping": (
        ("healthy", 5.0),
        *(phase for _ in range(6) for phase in (("down", 5.0), ("up", 5.0))),
        ("heal", 30.0),
    ),
}
DEFAULT_CONTENDERS = ("plain", "2", "5", "10", "30", "60", "2..30", "5..60")
DOWN = ("hang", "down")
BACK = ("up", "heal")


def setting(contender: str) -> tuple[float, float, float] | None:
    """``recovery_timeout``, ``recovery_backoff_multiplier`` and ``max_recovery_timeout`` of a
    contender named ``T`` (T seconds, no growth) or ``B..C`` (B seconds, x2 per failed probe,
    capped at C); ``None`` for ``plain``."""
    if contender == "plain":
        return None
    base, _, cap = contender.partition("..")
    if not cap:
        return float(base), 1.0, float(base)
    return float(base), 2.0, float(cap)


def label(contender: str) -> str:
    return contender if contender == "plain" else f"raptor {contender} s"


def returns(schedule: Schedule) -> list[tuple[float, float]]:
    """(start, end) of every phase where the server is back after a failure."""
    spans = []
    at = schedule.start
    for name, seconds in schedule.phases:
        end = at + seconds * schedule.scale
        if name in BACK:
            spans.append((at, end))
        at = end
    return spans


def phase_end(schedule: Schedule, now: float) -> float:
    at = schedule.start
    for _, seconds in schedule.phases:
        at += seconds * schedule.scale
        if now < at:
            return at
    return at


def serve(port_queue: Queue, counts_queue: Queue, start: float, scale: float, phases: Any) -> None:
    schedule = Schedule(start, scale, phases)
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            phase = schedule.phase_at(time.time()) or "after"
            with lock:
                counts[phase] += 1
            if phase == "hang":
                time.sleep(max(0.0, phase_end(schedule, time.time()) - time.time()))
                self.close_connection = True
                return
            if phase == "down":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(max(0.0, schedule.end - time.time()) + 2.0)
    with lock:
        counts_queue.put(dict(counts))
    server.shutdown()


def client(url: str, start: float, scale: float, phases: Any, threads: int, rate: float) -> None:
    import requests

    if os.environ.get("OTEL_PYTHON_RAPTOR_CONFIG"):
        from otel_raptor import RaptorInstrumentor

        RaptorInstrumentor().instrument(memory=False, monitor=False)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))
    schedule = Schedule(start, scale, phases)
    results: list[tuple[str, bool, float]] = []
    lock = threading.Lock()
    interval = 1.0 / rate

    def work(offset: float) -> None:
        mine: list[tuple[str, bool, float]] = []
        for now, phase in open_loop(schedule, offset, interval):
            try:
                ok = 200 <= session.get(url, timeout=CLIENT_TIMEOUT_S).status_code < 300
            except Exception:  # noqa: BLE001 - a failed call, whatever the library raised
                ok = False
            mine.append((phase, ok, now))
        with lock:
            results.extend(mine)

    workers = [
        threading.Thread(target=work, args=(i * interval / threads,)) for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print("RESULTS " + json.dumps(results))


@dataclass
class Run:
    contender: str
    results: list[tuple[str, bool, float]]
    server: dict[str, int]
    schedule: Schedule


def run_workload(
    workload: str, contenders: list[str], scale: float, threads: int, rate: float, tmp: Path
) -> list[Run]:
    phases = WORKLOADS[workload]
    start = time.time() + 3.0
    launched = []
    for name in contenders:
        ports: Queue = Queue()
        counts: Queue = Queue()
        server = Process(target=serve, args=(ports, counts, start, scale, phases), daemon=True)
        server.start()
        port = ports.get(timeout=10)
        env = dict(os.environ)
        env.pop("OTEL_PYTHON_RAPTOR_CONFIG", None)
        chosen = setting(name)
        if chosen is not None:
            base, growth, cap = chosen
            config = tmp / f"{workload}-{name}.toml"
            config.write_text(
                "[breaker]\n"
                f"recovery_timeout = {base * scale!r}\n"
                f"recovery_backoff_multiplier = {growth!r}\n"
                f"max_recovery_timeout = {cap * scale!r}\n"
            )
            env["OTEL_PYTHON_RAPTOR_CONFIG"] = str(config)
        process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                "--workload",
                workload,
                "--url",
                f"http://127.0.0.1:{port}/work",
                "--start",
                repr(start),
                "--scale",
                str(scale),
                "--threads",
                str(threads),
                "--rate",
                str(rate),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        launched.append((name, server, counts, process))
    runs = []
    for name, server, counts, process in launched:
        stdout, stderr = process.communicate(timeout=900)
        received = counts.get(timeout=60)
        server.join(10)
        if process.returncode != 0:
            raise RuntimeError(f"{name} client failed:\n{stderr[-3000:]}")
        line = next(x for x in stdout.splitlines() if x.startswith("RESULTS "))
        results = [tuple(r) for r in json.loads(line.removeprefix("RESULTS "))]
        runs.append(Run(name, results, received, Schedule(start, scale, phases)))  # type: ignore[arg-type]
    return runs


def _rate(calls: list[bool]) -> float:
    return 100.0 * sum(calls) / len(calls) if calls else float("nan")


def report(workload: str, runs: list[Run]) -> None:
    plain = next(r for r in runs if r.contender == "plain")
    plain_all = _rate([ok for _, ok, _ in plain.results])
    plain_dead = sum(n for phase, n in plain.server.items() if phase in DOWN)
    print(
        f"{workload}: {'contender':15s} {'back ok':>8s} {'1st ok':>7s} {'max':>6s} "
        f"{'dead reqs':>9s} {'x plain':>8s} {'run ok':>7s} {'- plain':>8s}"
    )
    for run in runs:
        firsts = []
        for start, end in returns(run.schedule):
            oks = [t for _, ok, t in run.results if ok and start <= t < end]
            firsts.append(min(oks) - start if oks else end - start)
        dead = sum(n for phase, n in run.server.items() if phase in DOWN)
        whole = _rate([ok for _, ok, _ in run.results])
        print(
            f"{'':{len(workload) + 1}s} {label(run.contender):15s} "
            f"{_rate([ok for p, ok, _ in run.results if p in BACK]):7.1f}% "
            f"{sum(firsts) / len(firsts):6.2f}s {max(firsts):5.1f}s "
            f"{dead:9d} {dead / plain_dead if plain_dead else float('nan'):8.3f} "
            f"{whole:6.1f}% {whole - plain_all:+7.1f}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="stretch phases and open times")
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--rate", type=float, default=25.0, help="calls/s per thread (open loop)")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument(
        "--contenders",
        nargs="*",
        default=list(DEFAULT_CONTENDERS),
        help="plain, T (open T s) or B..C (B s, x2 per failed probe, capped at C s)",
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        phases = WORKLOADS[args.workload]
        client(args.url, args.start, args.scale, phases, args.threads, args.rate)
        return
    contenders = ["plain", *(c for c in args.contenders if c != "plain")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        reports = [
            (w, run_workload(w, contenders, args.scale, args.threads, args.rate, Path(tmp)))
            for w in args.workloads
        ]
    print(
        f"Python {sys.version.split()[0]}, {args.threads} client threads x {args.rate:g} calls/s "
        f"(open loop) per contender, all contenders at once, scale {args.scale}, client "
        f"timeout {CLIENT_TIMEOUT_S} s, one run of {time.monotonic() - started:.0f} s\n"
        "back ok: success of the calls started while the server was back after a failure; "
        "1st ok, max: from the server's return to the first success (mean and worst over the "
        "returns; a return with none counts its whole length); dead reqs: requests the server "
        "got while down; run ok: the whole run's success and its difference from plain's "
        "(points)\n"
    )
    for workload, runs in reports:
        report(workload, runs)


if __name__ == "__main__":
    main()
