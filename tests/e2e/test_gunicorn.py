"""Raptor under a real pre-forking server: ``gunicorn --preload`` with 2 workers.

``tests/e2e/apps/gunicorn_app.py`` sets up the SDK (OTLP/HTTP to an in-test receiver) and calls
``RaptorInstrumentor().instrument()`` in gunicorn's master, before it forks the workers, and
makes one retried call there (a start-up check: 503, then 200). Raptor's background threads
(the memory controller, the monitor) and the SDK's (``BatchSpanProcessor``, the periodic
metric reader) are running in the master when it forks. Each worker calls a loopback
downstream with requests, through a fault proxy, and pings the shared Redis.

One scenario per worker class (``sync``, and ``gthread`` with 4 threads), then checks:

1. every request is answered (no worker hung at or after the fork), by both workers;
2. an outage (the proxy refuses connections) opens the downstream's breaker in every worker;
3. a worker killed with ``SIGKILL`` is replaced by a fresh fork of the master; the
   replacement does not start with an open breaker (the master never saw the outage) and
   answers;
4. once the downstream is back, every worker (the replacement too) calls it successfully
   within the breaker's ``recovery_timeout`` (1 s here) plus a margin;
5. each worker exports its own raptor spans and metrics (its own ``service.instance.id``,
   every span under a request of that worker's pid), and the master's retry before the fork is
   exported once, by the master, not again by each worker;
6. gunicorn stops on ``SIGTERM`` within its graceful timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from otel_raptor.telemetry.instruments import (
    ATTR_SERVICE,
    METRIC_ERRORS,
    METRIC_RETRIES,
    SPAN_RECOVERY,
)
from tests.e2e.otlp_receiver import OTLPReceiver
from tests.support.faulty_http import FaultyHTTPServer, status
from tests.support.services import REDIS, require_module, require_service, services_required
from tests.support.tcp_proxy import FaultProxy

pytestmark = [pytest.mark.timeout(90), pytest.mark.services]

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
RECOVERY_TIMEOUT_S = 1.0
#: How long after the downstream is back (beyond ``recovery_timeout``) a worker may still fail.
HEAL_MARGIN_S = 2.0
INSTANCE = "service.instance.id"
THREADS = {
    "otel-raptor-memory",
    "otel-raptor-monitor",
    "OtelBatchSpanRecordProcessor",
    "OtelPeriodicExportingMetricReader",
}


def _gunicorn() -> str:
    found = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    if found is None:
        reason = "gunicorn is not installed (pip install -e '.[test]')"
        if services_required():
            pytest.fail(f"{reason} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(reason)
    return found


def _no_control_socket(program: str) -> list[str]:
    """gunicorn 24+ opens a control socket at a fixed path in $HOME by default: not here."""
    usage = subprocess.run([program, "--help"], capture_output=True, text=True, check=False)
    return ["--no-control-socket"] if "--no-control-socket" in usage.stdout else []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A running gunicorn and what the test saw of it."""

    process: subprocess.Popen[str]
    base: str
    log: Path
    #: pid -> the last JSON body it answered.
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        import requests

        response = requests.get(self.base + path, timeout=timeout)
        body = response.json()
        self.seen[body["pid"]] = body
        return response.status_code, body

    def spread(self, path: str, count: int = 16) -> list[tuple[int, dict[str, Any]]]:
        """``count`` concurrent GETs (each route holds its worker briefly, so they spread)."""
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: self.get(path), range(count)))

    def each_worker(self, path: str, pids: set[int], deadline_s: float = 10.0) -> dict[int, Any]:
        """GET ``path`` until every worker in ``pids`` has answered; pid -> (status, body)."""
        answers: dict[int, Any] = {}
        end = time.monotonic() + deadline_s
        while not pids <= answers.keys():
            assert time.monotonic() < end, f"workers {pids - answers.keys()} never answered"
            for code, body in self.spread(path, 8):
                answers.setdefault(body["pid"], (code, body))
        return {pid: answers[pid] for pid in pids}

    def workers(self) -> set[int]:
        """The master's live children (its workers), by /proc."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return {int(pid) for pid in children.read_text().split()}

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def gunicorn(env: dict[str, str], worker_args: list[str], tmp: Path) -> Iterator[Server]:
    program = _gunicorn()
    port = _free_port()
    log = tmp / "gunicorn.log"
    command = [
        *[program, "--preload", "--workers", str(WORKERS), *worker_args],
        *["--bind", f"127.0.0.1:{port}", "--timeout", "20", "--graceful-timeout", "5"],
        *_no_control_socket(program),
        "tests.e2e.apps.gunicorn_app:app",
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        end = time.monotonic() + 20
        while len(server.workers()) < WORKERS or not _answers(server):
            assert process.poll() is None, server.output()
            assert time.monotonic() < end, "gunicorn did not start:\n" + server.output()
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError:
        return False
    return True


def _answers(server: Server) -> bool:
    try:
        server.get("/state", timeout=1.0)
    except OSError:  # requests' ConnectionError and Timeout are OSErrors
        return False
    return True


@dataclass
class Run:
    receiver: OTLPReceiver
    downstream: str
    warm: str
    master: int
    first: set[int]
    killed: int
    replacement: int
    healthy: dict[int, Any]
    outage: dict[int, Any]
    after_kill: dict[int, Any]
    healed_after_s: dict[int, float]
    redis: dict[int, Any] | None
    stopped: int | None
    output: str


def run_scenario(worker_args: list[str], tmp: Path) -> Run:
    _gunicorn()
    require_module("requests")
    require_module("redis")
    # One database call per worker through the instrumented redis-py, when Redis is there.
    use_redis = services_required() or _reachable(REDIS)
    if use_redis:
        require_service("Redis", REDIS)
    receiver = OTLPReceiver().start()
    target = FaultyHTTPServer().start()
    warm = FaultyHTTPServer([status(503)]).start()  # the master's start-up call: 503, then 200
    proxy = FaultProxy(("127.0.0.1", target.port))
    downstream = f"http://127.0.0.1:{proxy.port}"
    warm_origin = f"http://{warm.authority}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GUNICORN"))}
    env.update(receiver.env("gunicorn-app"))
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "DOWNSTREAM_URL": downstream,
            "REDIS_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
            "GUNICORN_APP_WARMUP": warm.url("/warmup"),
            "OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT": str(RECOVERY_TIMEOUT_S),
            "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD": "3",
            "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY": "0.01",
            "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY": "0.05",
        }
    )
    try:
        with gunicorn(env, worker_args, tmp) as server:
            master = server.process.pid
            first = server.workers()
            assert len(first) == WORKERS
            # 1. Healthy traffic: every request answered, by every worker.
            healthy = server.each_worker("/call?path=/ok&hold=0.1", first)
            redis = server.each_worker("/redis?hold=0.1", first) if use_redis else None
            # 2. Outage: every worker's breaker opens.
            proxy.refuse()
            outage: dict[int, Any] = {}
            end = time.monotonic() + 15
            while not first <= outage.keys():
                assert time.monotonic() < end, f"breakers never opened: {server.seen}"
                for code, body in server.spread("/call?path=/down&hold=0.05", 8):
                    if "CircuitOpen" in body.get("error", ""):
                        outage.setdefault(body["pid"], (code, body))
            # 3. One worker killed; the master forks a replacement.
            killed = min(first)
            os.kill(killed, signal.SIGKILL)
            end = time.monotonic() + 15
            while not server.workers() - first:
                assert time.monotonic() < end, "no replacement worker:\n" + server.output()
                time.sleep(0.05)
            [replacement] = server.workers() - first
            current = {replacement, *(first - {killed})}
            after_kill = server.each_worker("/state?hold=0.1", current)
            # 4. The downstream is back: every worker gets through within recovery_timeout.
            proxy.heal()
            healed_at = time.monotonic()
            healed_after_s: dict[int, float] = {}
            end = healed_at + RECOVERY_TIMEOUT_S + HEAL_MARGIN_S + 5
            while not current <= healed_after_s.keys() and time.monotonic() < end:
                for code, body in server.spread("/call?path=/ok&hold=0.05", 8):
                    if code == 200:
                        healed_after_s.setdefault(body["pid"], time.monotonic() - healed_at)
            # 5. Every worker flushes what it has.
            server.each_worker("/flush?hold=0.1", current)
            server.process.send_signal(signal.SIGTERM)
            try:
                stopped: int | None = server.process.wait(timeout=12)
            except subprocess.TimeoutExpired:
                stopped = None
            output = server.output()
    finally:
        proxy.close()
        target.stop()
        warm.stop()
        receiver.stop()
    return Run(
        receiver=receiver,
        downstream=downstream,
        warm=warm_origin,
        master=master,
        first=first,
        killed=killed,
        replacement=replacement,
        healthy=healthy,
        outage=outage,
        after_kill=after_kill,
        healed_after_s=healed_after_s,
        redis=redis,
        stopped=stopped,
        output=output,
    )


@pytest.fixture(
    scope="module",
    params=[["--worker-class", "sync"], ["--worker-class", "gthread", "--threads", "4"]],
    ids=["sync", "gthread"],
)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run_scenario(request.param, tmp_path_factory.mktemp("gunicorn"))


def test_every_worker_answers_and_none_hangs(run: Run) -> None:
    assert {code for code, _ in run.healthy.values()} == {200}
    if run.redis is not None:
        assert {code for code, _ in run.redis.values()} == {200}
        assert all(body["ping"] for _, body in run.redis.values())
    # Raptor's and the SDK's threads run again in every worker (a fork keeps only the forking
    # thread).
    for _, body in run.after_kill.values():
        assert set(body["threads"]) >= THREADS, body
    assert run.stopped == 0, run.output
    assert "Traceback" not in run.output, run.output
    assert "WORKER TIMEOUT" not in run.output, run.output


def test_an_outage_opens_the_breaker_of_every_worker(run: Run) -> None:
    assert run.outage.keys() == run.first
    assert {code for code, _ in run.outage.values()} == {503}


def test_a_replacement_worker_starts_from_the_masters_state(run: Run) -> None:
    assert run.replacement not in run.first
    _, replacement = run.after_kill[run.replacement]
    assert replacement["ppid"] == run.master
    # The master never called the downstream: no breaker, or a closed one; never open.
    assert replacement["breakers"].get(run.downstream, "closed") == "closed"
    [survivor] = run.first - {run.killed}
    _, body = run.after_kill[survivor]
    assert body["breakers"][run.downstream] == "open"  # the check above is not vacuous


def test_every_worker_sees_the_downstream_back_within_recovery_timeout(run: Run) -> None:
    current = {run.replacement, *(run.first - {run.killed})}
    assert run.healed_after_s.keys() == current, run.healed_after_s
    assert max(run.healed_after_s.values()) <= RECOVERY_TIMEOUT_S + HEAL_MARGIN_S


def test_each_worker_exports_its_own_telemetry(run: Run) -> None:
    receiver = run.receiver
    spans = receiver.spans()
    # Which process each instance id is: the app's request spans carry the worker's pid.
    pid_of: dict[str, set[int]] = {}
    for span in spans:
        if span.name.startswith("handle"):
            pid_of.setdefault(span.resource[INSTANCE], set()).add(span.attributes["app.pid"])
    assert all(len(pids) == 1 for pids in pid_of.values()), pid_of
    instances = {next(iter(pids)): instance for instance, pids in pid_of.items()}
    workers = run.first | {run.replacement}
    assert workers - {run.killed} <= instances.keys()
    # Raptor's spans: each under a request of its own worker, with that worker's instance id.
    by_id = {span.span_id: span for span in spans}
    recovery = [s for s in spans if s.name == SPAN_RECOVERY.name]
    assert recovery
    for span in recovery:
        parent = by_id.get(span.parent_span_id)
        if parent is None:
            continue  # the master's start-up call, or a killed worker's unexported parent
        assert parent.resource[INSTANCE] == span.resource[INSTANCE]
    survivors = run.first - {run.killed}
    for pid in survivors:
        mine = [s for s in recovery if s.resource[INSTANCE] == instances[pid]]
        assert mine, f"worker {pid} exported no {SPAN_RECOVERY.name} span"
        retries = [
            p
            for p in receiver.metrics().get(METRIC_RETRIES.name, [])
            if p.resource[INSTANCE] == instances[pid]
            and p.attributes[ATTR_SERVICE] == run.downstream
        ]
        assert retries, f"worker {pid} exported no {METRIC_RETRIES.name}"


def test_the_masters_pre_fork_telemetry_is_not_exported_again_by_workers(run: Run) -> None:
    receiver = run.receiver
    warm_spans = [
        s
        for s in receiver.spans()
        if s.name == SPAN_RECOVERY.name and s.attributes.get(ATTR_SERVICE) == run.warm
    ]
    # The master's span, queued at the fork, is exported by the master alone.
    assert len(warm_spans) == 1, warm_spans
    master = warm_spans[0].resource[INSTANCE]
    # The master counted its own call and nothing else: instrument() records no counts.
    counted = {
        (name, point.attributes.get(ATTR_SERVICE))
        for name, points in receiver.metrics().items()
        if name.startswith("raptor.")
        for point in points
        if point.resource[INSTANCE] == master
        and point.kind in ("sum", "histogram")
        and point.monotonic is not False
    }
    assert counted, "the master exported no count of its start-up call"
    assert {service for _, service in counted} == {run.warm}, counted
    # What the workers export of it. The SDK's metric storage is copied by fork() and not
    # reset in the child, so each worker re-exports the master's cumulative totals as they
    # were at its fork (open-telemetry/opentelemetry-python#3885; the docs say to keep the
    # master call-free). Raptor must add nothing to that copy: never above the master's.
    for name in (METRIC_RETRIES.name, METRIC_ERRORS.name):
        by_process: dict[str, list[float]] = {}
        for point in receiver.metrics().get(name, []):
            if point.attributes.get(ATTR_SERVICE) == run.warm:
                by_process.setdefault(point.resource[INSTANCE], []).append(point.value)
        assert set(by_process.get(master, ())) == {1}, (name, by_process)
        assert all(set(values) <= {1} for values in by_process.values()), (name, by_process)
