"""What raptor adds to one loopback HTTP round trip, against the contrib tracing instrumentation.

For requests and httpx (sync), five configurations each, measured in the same run:

- ``plain``: the library alone;
- ``plain (control)``: the library alone again, in a second process: the method's noise
  floor (its "overhead" should be about 0);
- ``contrib``: ``opentelemetry-instrumentation-requests`` / ``-httpx`` with an SDK
  ``TracerProvider`` (``BatchSpanProcessor`` + an exporter that drops everything) and an SDK
  ``MeterProvider`` (an ``InMemoryMetricReader`` nobody collects);
- ``raptor``: ``RaptorInstrumentor().instrument()`` with the same SDK providers;
- ``both``: the contrib instrumentation, then raptor.

How it keeps the comparison fair:

- The server is a minimal threaded HTTP/1.1 keep-alive server answering every request with
  the same small ``200``, in its own *process*, so the client does not share its GIL; every
  client keeps one connection open, so each request is one loopback round trip.
- Instrumentors are process-wide singletons and uninstrumenting is not guaranteed to leave a
  process exactly as it found it, so each configuration lives in its *own worker process*,
  set up once and warmed up. The workers run one at a time: the parent asks each in turn to
  time ``--requests`` GETs, in a shuffled order every round, so drift (frequency scaling,
  noisy neighbours) hits all of them alike. Turns are short (50 GETs, a few tens of
  milliseconds) and many: on a shared VM a turn's median moves by about ±10 % from one turn
  to the next whatever its length (seen with turns of 20, 100 and 500 GETs), so what narrows
  the result is the number of turns, not their length.
  ``--sessions`` fresh sets of workers are started in turn, so that no configuration keeps a
  lucky (or unlucky) process for the whole run.
- Each request passes ``timeout=10`` explicitly (and the httpx client is built with it):
  raptor's request timeout for requests calls without one would otherwise change what the
  plain library does (a socket with a timeout polls before each read), which is a
  behaviour, not an overhead.
- Every request is timed. Per round, each worker reports its median request (*p50*: robust
  to scheduling spikes from other processes) and its mean (every cost: spikes, GC pauses,
  rare paths); each is divided by ``plain``'s of the *same round*. Overheads come from the
  median of those ratios, with a 90 % interval from a bootstrap that draws sessions, then
  rounds within them (a session's processes carry their own luck, which more rounds of the
  same processes cannot average out). ms/request is the median over rounds of absolute times
  (it drifts with the machine's load). The garbage collector stays on: allocations are part
  of what an instrumentation costs.
- Processes are pinned (Linux, 2+ CPUs; ``--no-pin`` to turn off): the server to one CPU,
  every client to another, so the scheduler places everyone alike.

Target (issue 7; issue 3 asked for 3 %): raptor adds at most 1.5 % to a loopback round trip,
and less than the contrib tracing instrumentation does. The verdict is printed per library,
judged on p50 and on the whole interval: *yes* when all of it is at most 1.5 %, *NO* when all
of it is above, *undecided* when the run's noise straddles the target (the mean figures get
their own). The exit status is 0 either way: this measures, it does not gate.

    Default sizing: a first look (intervals of about ±2.5 %); ``--rounds 100 --sessions 10``
    (about 5.5 minutes) resolves about ±0.6 %.

    make bench                 # bench_guard.py, then this
    .venv/bin/python benchmarks/bench_http.py [--requests N] [--rounds R] [--sessions S]
        [--warmup N] [--library requests|httpx] [--no-pin]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

LIBRARIES = ("requests", "httpx")
CONFIGS = ("plain", "plain (control)", "contrib", "raptor", "both")
TARGET_PERCENT = 1.5

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 2\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"ok"
)

# ------------------------------------------------------------------------------- the server


def _serve_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    with conn:
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                end = buffer.find(b"\r\n\r\n")
            head, buffer = buffer[:end], buffer[end + 4 :]
            # GETs carry no body; skip one if a client sends it anyway.
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            while len(buffer) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            conn.sendall(_RESPONSE)


def serve() -> None:
    """Run the server until stdin closes; print its port first."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(listener.getsockname()[1], flush=True)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # the parent closes our stdin (or dies): time to go
    listener.close()


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


def _instrument(library: str, config: str) -> None:
    if config.startswith("plain"):
        return
    tracer_provider, meter_provider = _sdk_providers()
    providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    if config in ("contrib", "both"):
        if library == "requests":
            from opentelemetry.instrumentation.requests import RequestsInstrumentor

            RequestsInstrumentor().instrument(**providers)
        else:
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor().instrument(**providers)
    if config in ("raptor", "both"):
        from otel_raptor import RaptorInstrumentor

        RaptorInstrumentor().instrument(**providers)


def _client(library: str, url: str) -> Callable[[], int]:
    if library == "requests":
        import requests

        session = requests.Session()
        return lambda: session.get(url, timeout=10).status_code
    import httpx

    client = httpx.Client(timeout=10)
    return lambda: client.get(url).status_code


def work(library: str, config: str, url: str, warmup: int) -> None:
    """A worker: set up, warm up, then time ``RUN n`` batches read from stdin."""
    _instrument(library, config)
    get = _client(library, url)
    for _ in range(warmup):
        if get() != 200:
            raise SystemExit("the benchmark server did not answer 200")
    print("READY", flush=True)
    perf_counter = time.perf_counter
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command != "RUN":
            break
        n = int(argument)
        durations = [0.0] * n
        for i in range(n):
            start = perf_counter()
            get()
            durations[i] = perf_counter() - start
        print(f"DONE {statistics.median(durations)!r} {math.fsum(durations) / n!r}", flush=True)


# ------------------------------------------------------------------------------ the parent


@dataclass
class Worker:
    library: str
    config: str
    process: subprocess.Popen[str]

    def run(self, n: int) -> tuple[float, float]:
        """``n`` requests: the median and the mean seconds per request."""
        stdin, stdout = _pipes(self.process)
        stdin.write(f"RUN {n}\n")
        stdin.flush()
        line = stdout.readline()
        if not line.startswith("DONE "):
            raise RuntimeError(f"{self.library}/{self.config} worker said {line!r}")
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


def cpu_plan() -> tuple[int, int] | None:
    """``(server CPU, client CPU)``: two distinct CPUs this process may run on, or ``None``
    when the platform cannot pin processes or offers fewer than two."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[-1], cpus[0]


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _spawn(args: list[str], cpu: int | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if cpu is not None:
        args = [*args, "--cpu", str(cpu)]
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def start_workers(libraries: Sequence[str], url: str, warmup: int, cpu: int | None) -> list[Worker]:
    workers = [
        Worker(
            library,
            config,
            _spawn(["--worker", library, config, "--url", url, "--warmup", str(warmup)], cpu),
        )
        for library in libraries
        for config in CONFIGS
    ]
    for worker in workers:
        line = _pipes(worker.process)[1].readline()
        if line.strip() != "READY":
            for other in workers:
                other.stop()
            raise RuntimeError(f"{worker.library}/{worker.config} failed to start: {line!r}")
    return workers


@dataclass
class Series:
    """One configuration, per round: the median and the mean seconds per request, and each
    divided by ``plain``'s in the same round."""

    medians: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    median_ratios: list[float] = field(default_factory=list)
    mean_ratios: list[float] = field(default_factory=list)
    sessions: list[int] = field(default_factory=list)  # each round's session


def measure(
    libraries: Sequence[str],
    url: str,
    *,
    n: int,
    rounds: int,
    sessions: int,
    warmup: int,
    cpu: int | None = None,
) -> dict[tuple[str, str], Series]:
    results = {(lib, cfg): Series() for lib in libraries for cfg in CONFIGS}
    rng = random.Random(20261128)
    progress = sys.stderr.isatty()
    total = rounds * sessions
    done = 0
    for session in range(sessions):
        workers = start_workers(libraries, url, warmup, cpu)
        try:
            for _ in range(rounds):
                order = list(workers)
                rng.shuffle(order)
                this_round = {(w.library, w.config): w.run(n) for w in order}
                for (lib, cfg), (median, mean) in this_round.items():
                    plain_median, plain_mean = this_round[lib, "plain"]
                    series = results[lib, cfg]
                    series.medians.append(median)
                    series.means.append(mean)
                    series.median_ratios.append(median / plain_median)
                    series.mean_ratios.append(mean / plain_mean)
                    series.sessions.append(session)
                done += 1
                if progress:
                    print(f"\r  round {done}/{total}", end="", file=sys.stderr, flush=True)
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


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    versions = ", ".join(
        f"{name} {_version(name)}"
        for name in (
            "otel-raptor",
            "requests",
            "urllib3",
            "httpx",
            "opentelemetry-sdk",
            "opentelemetry-instrumentation-requests",
            "opentelemetry-instrumentation-httpx",
        )
    )
    return (
        f"machine: {platform.platform()}; {cpu}; {os.cpu_count()} CPUs\n"
        f"python:  {platform.python_implementation()} {platform.python_version()}"
        f" ({sys.executable})\n"
        f"versions: {versions}"
    )


CONFIDENCE = 0.90
RESAMPLES = 2000


def interval(
    ratios: Sequence[float], sessions: Sequence[int], *, seed: int = 20261202
) -> tuple[float, float]:
    """The central ``CONFIDENCE`` interval of the median of ``ratios``, by a two-level
    bootstrap: draw sessions with replacement, then rounds with replacement within each drawn
    session. Both levels, because a session's processes carry their own luck (memory layout,
    where the scheduler put them) that more rounds of the same processes cannot average out;
    with a single session the interval covers only the rounds' noise."""
    groups: dict[int, list[float]] = {}
    for ratio, session in zip(ratios, sessions, strict=True):
        groups.setdefault(session, []).append(ratio)
    drawn_from = list(groups.values())
    rng = random.Random(seed)
    estimates = []
    for _ in range(RESAMPLES):
        pooled: list[float] = []
        for _ in drawn_from:
            group = drawn_from[rng.randrange(len(drawn_from))]
            pooled.extend(group[rng.randrange(len(group))] for _ in group)
        estimates.append(statistics.median(pooled))
    estimates.sort()
    tail = (1.0 - CONFIDENCE) / 2
    return estimates[int(tail * RESAMPLES)], estimates[int((1.0 - tail) * RESAMPLES) - 1]


@dataclass(frozen=True)
class Overhead:
    """One configuration against ``plain``: medians over rounds."""

    seconds: float  # per request
    ratio: float  # to plain in the same round
    low: float  # the ratio's CONFIDENCE interval (see ``interval``)
    high: float
    plain_seconds: float  # plain's, per request

    @property
    def percent(self) -> float:
        return (self.ratio - 1.0) * 100

    @property
    def micros(self) -> float:
        """Added per request."""
        return (self.ratio - 1.0) * self.plain_seconds * 1e6

    def verdict(self, target_percent: float) -> str:
        """``yes`` when the whole interval is at most the target, ``NO`` when all of it is
        above, else ``undecided``: this run's noise is wider than the distance to the
        target."""
        if (self.high - 1.0) * 100 <= target_percent:
            return "yes"
        if (self.low - 1.0) * 100 > target_percent:
            return "NO"
        return "undecided"


def _overheads(
    results: dict[tuple[str, str], Series], library: str, *, typical: bool
) -> dict[str, Overhead]:
    def pick(series: Series) -> tuple[list[float], list[float]]:
        if typical:
            return series.medians, series.median_ratios
        return series.means, series.mean_ratios

    plain = statistics.median(pick(results[library, "plain"])[0])
    found = {}
    for config in CONFIGS:
        series = results[library, config]
        seconds, ratios = pick(series)
        low, high = interval(ratios, series.sessions)
        found[config] = Overhead(
            statistics.median(seconds), statistics.median(ratios), low, high, plain
        )
    return found


def report(
    results: dict[tuple[str, str], Series], libraries: Sequence[str], n: int, rounds: int
) -> str:
    """Print both tables and the verdicts; return the verdict on the target (by the typical,
    median, round trip): ``MET``, ``MISSED`` or ``UNDECIDED``."""
    sessions = len(set(results[libraries[0], "plain"].sessions))
    print(f"\n{n} requests per configuration per round, {rounds} rounds in {sessions} sessions.")
    print(
        "Each round records every request's duration. 'p50' is the median request of the round"
        " (robust to\nscheduling spikes from other processes); 'mean' is the round's total"
        " over its requests (includes\nspikes, GC pauses and every rare cost). 'ratio' is"
        " against plain in the same round, the median\nover rounds; '90 % interval' is that"
        " median's, by a bootstrap over sessions and rounds."
    )
    verdicts = []
    answers: list[str] = []
    for typical in (True, False):
        title = "p50 (typical request)" if typical else "mean (all costs, noisier)"
        print(f"\n{title}")
        print(
            f"{'library':<9} {'configuration':<16} {'ms/request':>10} {'ratio':>7}"
            f" {'90 % interval':>15} {'overhead µs':>12} {'overhead %':>11}"
        )
        for library in libraries:
            overheads = _overheads(results, library, typical=typical)
            for config, o in overheads.items():
                print(
                    f"{library:<9} {config:<16} {o.seconds * 1e3:>10.4f} {o.ratio:>7.4f}"
                    f" {f'{o.low:.4f}-{o.high:.4f}':>15} {o.micros:>+12.1f}"
                    f" {o.percent:>+10.2f}%"
                )
            raptor, contrib = overheads["raptor"], overheads["contrib"]
            both, control = overheads["both"], overheads["plain (control)"]
            answer = raptor.verdict(TARGET_PERCENT)
            under_contrib = raptor.high < contrib.low
            if typical:
                answers.append(answer if under_contrib else "NO")
            verdicts.append(
                f"{library} ({'p50' if typical else 'mean'}): raptor {raptor.micros:+.1f} µs"
                f" ({raptor.percent:+.2f} %, 90 % interval {(raptor.low - 1) * 100:+.2f} to"
                f" {(raptor.high - 1) * 100:+.2f} %), contrib tracing {contrib.micros:+.1f} µs"
                f" ({contrib.percent:+.2f} %), raptor on top of contrib"
                f" {both.micros - contrib.micros:+.1f} µs; control {control.percent:+.2f} %"
                f" ({(control.low - 1) * 100:+.2f} to {(control.high - 1) * 100:+.2f} %: the"
                f" noise floor). At most {TARGET_PERCENT:g} %: {answer}; below contrib:"
                f" {'yes' if under_contrib else 'NO'}."
            )
    print()
    print("\n".join(verdicts))
    if "NO" in answers:
        held = "MISSED"
    elif "undecided" in answers:
        held = "UNDECIDED (this run's noise straddles the target: more sessions, a quieter host)"
    else:
        held = "MET"
    target = (
        f"raptor adds at most {TARGET_PERCENT:g} % to a loopback round trip and less than"
        " the contrib tracing instrumentation does"
    )
    print(f"\nTarget ({target}), by p50, whole 90 % interval: {held}")
    return held.split()[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=50, help="per configuration per round")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per session")
    parser.add_argument("--sessions", type=int, default=6, help="fresh sets of worker processes")
    parser.add_argument("--warmup", type=int, default=300, help="requests before timing")
    parser.add_argument("--library", choices=LIBRARIES, action="append", help="default: both")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _pin(args.cpu)
    if args.serve:
        serve()
        return 0
    if args.worker:
        library, config = args.worker
        work(library, config, args.url, args.warmup)
        return 0

    libraries = tuple(args.library or LIBRARIES)
    print(describe_machine(), flush=True)
    needed = [*libraries, *(f"opentelemetry-instrumentation-{lib}" for lib in libraries)]
    missing = [name for name in needed if _version(name) == "not installed"]
    if missing:
        print(f"not installed: {', '.join(missing)}; install otel-raptor[test]", file=sys.stderr)
        return 2
    plan = None if args.no_pin else cpu_plan()
    if plan is None:
        print("processes: not pinned")
    else:
        print(f"processes: server pinned to CPU {plan[0]}, clients to CPU {plan[1]}")
    server = _spawn(["--serve"], None if plan is None else plan[0])
    try:
        port = int(_pipes(server)[1].readline())
        url = f"http://127.0.0.1:{port}/"
        started = time.monotonic()
        results = measure(
            libraries,
            url,
            n=args.requests,
            rounds=args.rounds,
            sessions=args.sessions,
            warmup=args.warmup,
            cpu=None if plan is None else plan[1],
        )
        report(results, libraries, args.requests, args.rounds * args.sessions)
        print(f"({time.monotonic() - started:.0f} s)")
    finally:
        with contextlib.suppress(OSError):
            _pipes(server)[0].close()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
