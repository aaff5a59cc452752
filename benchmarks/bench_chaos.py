"""A harsh but ordinary day for a downstream, and four ways of calling it, side by side.

One loopback server, in its own process, plays the same schedule for every contender (times
in seconds at ``--scale 1``; ``SCHEDULE`` below)::

    healthy      1.0   every request answered 200
    degraded     4.0   30 % of requests answered 503
    (gap)        1.0   every request answered 200 (not reported)
    rate limited 4.0   25 % answered 429 with Retry-After: 1
    (gap)        1.0   every request answered 200 (not reported)
    outage       5.0   2 s of hanging (no answer; the client times out), then 3 s of
                       refusing (the connection is reset at once)
    heal         4.0   every request answered 200 again
    POSTs        4.0   30 % answered 503, and the client now sends POSTs (not idempotent)

The client (``--threads`` threads, default 8, each starting a call ``--rate`` times a second,
default 40, open loop: a slot missed while a call is still running is skipped, not queued;
a 0.25 s timeout; GETs except in the last phase) runs in a fresh interpreter per contender:

    plain               requests, no retries
    urllib3 Retry       requests with HTTPAdapter(max_retries=Retry(total=3, backoff 0.02 s,
                        429/5xx, Retry-After respected)): what many apps use today
    tenacity+pybreaker  tenacity (3 retries, exponential jitter from 0.02 s up to 2 s, on
                        connection errors, timeouts and 429/5xx) around pybreaker
                        (fail_max=5, reset_timeout=1 s): the other common recipe
    raptor              RaptorInstrumentor().instrument(), configured only through the
                        environment: base delay 0.02 s, max delay 2 s, recovery timeout 1 s

Reported per phase and contender: the success rate of the calls started in that phase (a
call succeeds when the app gets a 2xx), the calls made, the requests the server received
(hanging and reset connections included: a dead server still pays for every attempt) and
that load per call against plain's; plus, for the heal, the time from the heal to the first
success, and for raptor how its recoveries ended, by phase. Everything comes from one run of
this script.

    .venv/bin/python benchmarks/bench_chaos.py                 # about 2 minutes
    .venv/bin/python benchmarks/bench_chaos.py --scale 0.5     # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import Process, Queue
from typing import Any

CONTENDERS = ("plain", "urllib3 Retry", "tenacity+pybreaker", "raptor")
#: name, seconds at scale 1; the outage is two server behaviours, reported as one phase.
SCHEDULE = (
    ("healthy", 1.0),
    ("degraded", 4.0),
    ("gap", 1.0),
    ("rate limited", 4.0),
    ("gap", 1.0),
    ("outage hang", 2.0),
    ("outage refuse", 3.0),
    ("heal", 4.0),
    ("POSTs", 4.0),
)
REPORTED = ("degraded", "rate limited", "outage", "heal", "POSTs")
CLIENT_TIMEOUT_S = 0.25
RAPTOR_ENV = {
    "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY": "0.02",
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY": "2",
    "OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT": "1",
}


@dataclass(frozen=True)
class Schedule:
    """Phases in wall-clock time (``bench_db_chaos.py`` plays its own ``phases``)."""

    start: float  # time.time() when the first phase starts
    scale: float
    phases: tuple[tuple[str, float], ...] = SCHEDULE  # name, seconds at scale 1

    def phase_at(self, now: float) -> str | None:
        """The phase at ``now`` (the first before the start), ``None`` after the last."""
        elapsed = now - self.start
        for name, seconds in self.phases:
            elapsed -= seconds * self.scale
            if elapsed < 0:
                return name
        return None

    def begins(self, phase: str) -> float:
        at = self.start
        for name, seconds in self.phases:
            if name == phase:
                return at
            at += seconds * self.scale
        raise KeyError(phase)

    @property
    def end(self) -> float:
        return self.start + sum(seconds for _, seconds in self.phases) * self.scale


def reported(phase: str) -> str:
    return "outage" if phase.startswith("outage") else phase


def open_loop(schedule: Schedule, offset: float, interval: float) -> Iterator[tuple[float, str]]:
    """When each call of one thread starts, and in which phase, until the schedule ends.

    Open-loop arrivals, as in a service: a call every ``interval`` (from the schedule's start
    plus ``offset``) whatever the answers (a refusal does not bring the next call sooner);
    slots missed while a call was still running are skipped, not queued."""
    due = schedule.start + offset
    while True:
        now = time.time()
        if now < due:
            time.sleep(due - now)
            now = due
        due = max(due + interval, now)
        phase = schedule.phase_at(now)
        if phase is None:
            return
        yield now, phase


# --- the server ---------------------------------------------------------------------------------


def serve(port_queue: Queue, counts_queue: Queue, start: float, scale: float, seed: int) -> None:
    schedule = Schedule(start, scale)
    # One stream of dice per phase: the k-th request of a phase gets the same roll whichever
    # contender sends it and however many requests it sent before, so two contenders that send
    # the same requests in a phase (plain and raptor with POSTs, say) see the same answers.
    rngs: dict[str, random.Random] = {}
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        # One segment per answer: Nagle plus the client's delayed ACK would add 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            phase = schedule.phase_at(time.time())
            with lock:
                counts[reported(phase or "after")] += 1
                rng = rngs.get(phase or "after")
                if rng is None:
                    rng = rngs[phase or "after"] = random.Random(f"{seed}:{phase}")
                roll = rng.random()
            if phase == "outage hang":
                time.sleep(max(0.0, schedule.begins("outage refuse") - time.time()))
                self.close_connection = True
                return
            if phase == "outage refuse":
                # Reset: the connection dies at once, without a byte of answer.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                return
            if phase in ("degraded", "POSTs") and roll < 0.3:
                self._send(503, b"unavailable")
            elif phase == "rate limited" and roll < 0.25:
                self._send(429, b"slow down", {"Retry-After": "1"})
            else:
                self._send(200, b"ok")

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _answer
        do_POST = _answer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    time.sleep(max(0.0, schedule.end - time.time()) + 3.0 * scale + 1.0)
    with lock:
        counts_queue.put(dict(counts))
    server.shutdown()


# --- the client (one fresh interpreter per contender) -------------------------------------------


_current_phase = Schedule(0.0, 1.0)


def client(contender: str, url: str, start: float, scale: float, threads: int, rate: float) -> None:
    global _current_phase  # noqa: PLW0603 - the diagnostics' clock
    schedule = _current_phase = Schedule(start, scale)
    send = _sender(contender, url)
    results: list[tuple[str, bool, float]] = []
    lock = threading.Lock()
    interval = 1.0 / rate

    def work(offset: float) -> None:
        mine: list[tuple[str, bool, float]] = []
        for now, phase in open_loop(schedule, offset, interval):
            method = "POST" if phase == "POSTs" else "GET"
            try:
                ok = 200 <= send(method) < 300
            except Exception:  # noqa: BLE001 - a failed call, whatever the library raised
                ok = False
            mine.append((reported(phase), ok, now))
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
    if contender == "raptor":
        print("RAPTOR " + json.dumps(_raptor_outcomes))


#: For raptor: how its recoveries ended, by phase (why it gave up, when it did).
_raptor_outcomes: dict[str, dict[str, int]] = {}


def _sender(contender: str, url: str) -> Any:
    import requests

    if contender == "raptor":
        from otel_raptor import RaptorInstrumentor, get_runtime
        from otel_raptor.core.events import ErrorClassified, RecoveryFinished

        RaptorInstrumentor().instrument(memory=False, monitor=False)

        def count(event: object) -> None:
            if isinstance(event, RecoveryFinished):
                phase = _current_phase.phase_at(time.time()) or "after"
                key = f"{event.outcome.value}:{event.give_up_reason or '-'}"
            elif isinstance(event, ErrorClassified):
                phase = _current_phase.phase_at(time.time()) or "after"
                key = f"error:{event.classification.error_type}"
            else:
                return
            by_phase = _raptor_outcomes.setdefault(reported(phase), {})
            by_phase[key] = by_phase.get(key, 0) + 1

        get_runtime().bus.subscribe(count)
    session = requests.Session()
    if contender == "urllib3 Retry":
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(
            total=3,
            backoff_factor=0.02,
            status_forcelist=(429, 500, 502, 503, 504),
            respect_retry_after_header=True,
        )
        session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=64))
    else:
        from requests.adapters import HTTPAdapter

        session.mount("http://", HTTPAdapter(pool_maxsize=64))

    def plain(method: str) -> int:
        response = session.request(method, url, timeout=CLIENT_TIMEOUT_S, data=b"x" * 16)
        return int(response.status_code)

    if contender != "tenacity+pybreaker":
        return plain

    import pybreaker
    import tenacity

    class Failing(Exception):
        pass

    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=1)

    def checked(method: str) -> int:
        status = plain(method)
        if status == 429 or status >= 500:
            raise Failing(status)
        return status

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential_jitter(initial=0.02, max=2),
        retry=tenacity.retry_if_exception_type(
            (Failing, requests.ConnectionError, requests.Timeout)
        ),
        reraise=True,
    )
    def guarded(method: str) -> int:
        return breaker.call(checked, method)  # type: ignore[no-any-return]

    def call(method: str) -> int:
        try:
            return guarded(method)
        except Failing as failing:
            return int(failing.args[0])

    return call


# --- the parent -----------------------------------------------------------------------------------


@dataclass
class Run:
    contender: str
    results: list[tuple[str, bool, float]]
    server: dict[str, int]
    schedule: Schedule
    diagnostics: dict[str, dict[str, int]]


def run_contender(contender: str, scale: float, threads: int, rate: float, seed: int) -> Run:
    ports: Queue = Queue()
    counts: Queue = Queue()
    start = time.time() + 2.0
    server = Process(target=serve, args=(ports, counts, start, scale, seed), daemon=True)
    server.start()
    port = ports.get(timeout=10)
    env = dict(os.environ)
    env.update(RAPTOR_ENV)
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--client",
            contender,
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
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    received = counts.get(timeout=60)
    server.join(10)
    if completed.returncode != 0:
        raise RuntimeError(f"{contender} client failed:\n{completed.stderr[-3000:]}")
    lines = completed.stdout.splitlines()
    line = next(x for x in lines if x.startswith("RESULTS "))
    results = [tuple(r) for r in json.loads(line.removeprefix("RESULTS "))]
    extra = next((x for x in lines if x.startswith("RAPTOR ")), "RAPTOR {}")
    diagnostics = json.loads(extra.removeprefix("RAPTOR "))
    return Run(contender, results, received, Schedule(start, scale), diagnostics)  # type: ignore[arg-type]


def report(runs: list[Run]) -> None:
    plain = next((r for r in runs if r.contender == "plain"), None)
    print(
        f"{'phase':13s} {'contender':19s} {'success':>8s} {'calls':>6s} "
        f"{'server reqs':>11s} {'x plain':>8s} {'reqs/call':>9s}"
    )
    for phase in REPORTED:
        for run in runs:
            calls = [ok for p, ok, _ in run.results if p == phase]
            received = run.server.get(phase, 0)
            success = 100.0 * sum(calls) / len(calls) if calls else float("nan")
            per_call = received / len(calls) if calls else float("nan")
            load = float("nan")
            if plain is not None and plain.server.get(phase):
                load = received / plain.server[phase]
            print(
                f"{phase:13s} {run.contender:19s} {success:7.1f}% {len(calls):6d} "
                f"{received:11d} {load:8.2f} {per_call:9.2f}"
            )
        print()
    print("time from the heal to the first success:")
    for run in runs:
        healed = run.schedule.begins("heal")
        firsts = [t for p, ok, t in run.results if ok and t >= healed]
        first = min(firsts) - healed if firsts else float("nan")
        print(f"  {run.contender:19s} {first:6.2f} s")
    for run in runs:
        if run.diagnostics:
            print(f"\n{run.contender}: how its recoveries ended, by phase")
            for phase, outcomes in run.diagnostics.items():
                shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
                print(f"  {phase:13s} {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="stretch every phase")
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="calls per second per thread (open loop)"
    )
    parser.add_argument("--seed", type=int, default=7, help="the server's fault dice")
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, args.url, args.start, args.scale, args.threads, args.rate)
        return
    started = time.monotonic()
    runs = [
        run_contender(c, args.scale, args.threads, args.rate, args.seed) for c in args.contenders
    ]
    print(
        f"Python {sys.version.split()[0]}, {args.threads} client threads x {args.rate:g} calls/s "
        f"(open loop), scale {args.scale}, client timeout {CLIENT_TIMEOUT_S} s, "
        f"one run of {time.monotonic() - started:.0f} s\n"
    )
    report(runs)


if __name__ == "__main__":
    main()
