"""The demo's client: a few workers calling the server with ``requests``, paced, timed.

The workload is ordinary application code: each worker has its own ``requests.Session`` (its
client id in the ``X-Demo-Client`` header) and calls ``session.get(url, timeout=...)`` at a
steady pace until the schedule ends. It knows nothing about otel_raptor, so the same code runs
plain and under ``RaptorInstrumentor``; only the outcome of each call is classified here,
including the fail-fast ``CircuitOpenError`` that the instrumented session may raise.

Each session's transport counts its TCP connection attempts, and which were refused, below
``requests`` (in urllib3's connection class). That is how the demo measures the outage's
refused half, when nothing listens and the server cannot count anything.
"""

from __future__ import annotations

import enum
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import NewConnectionError

from otel_raptor._demo.server import CLIENT_HEADER, Schedule
from otel_raptor.errors import CircuitOpenError, ConfigError

__all__ = [
    "Call",
    "CallOutcome",
    "ConnectAttempt",
    "Tally",
    "WorkloadOptions",
    "WorkloadResult",
    "run_workload",
]


class CallOutcome(str, enum.Enum):
    """How one logical call ended, as the application saw it."""

    OK = "ok"
    HTTP_ERROR = "http_error"  # a response with status >= 400
    REJECTED = "rejected"  # CircuitOpenError: failed fast, nothing was sent
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    OTHER = "other_error"


@dataclass(frozen=True, slots=True)
class Call:
    """One logical call: ``started`` is seconds since the run started, ``duration`` seconds.

    ``status`` is the response's status code (``None`` when an exception was raised);
    ``error`` the exception's class name (``None`` when a response came back).
    """

    started: float
    duration: float
    outcome: CallOutcome
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is CallOutcome.OK

    @property
    def kind(self) -> str:
        """A short label of the result: ``200``, ``503``, ``ReadTimeout``, ..."""
        if self.status is not None:
            return str(self.status)
        return self.error or self.outcome.value


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    """One TCP connection attempt by the client: when (s since run start), and if refused."""

    at: float
    refused: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadOptions:
    """How the client behaves.

    * ``workers`` (4, integer in [1, 64]): concurrent workers, each with its own session.
    * ``interval`` (0.1 s, > 0): a worker starts a call every ``interval`` seconds, or right
      after the previous one when that took longer (never a burst to catch up).
    * ``timeout`` (1.0 s, > 0): the ``timeout=`` of each ``session.get``, so hangs end.
    """

    workers: int = 4
    interval: float = 0.1
    timeout: float = 1.0

    def __post_init__(self) -> None:
        workers: object = self.workers
        if not (isinstance(workers, int) and not isinstance(workers, bool)) or not (
            1 <= workers <= 64
        ):
            raise ConfigError("demo.workers", workers, "an integer in [1, 64]")
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"demo.{name}", value, "a number > 0 (seconds)")


@dataclass(eq=False)
class Tally:
    """Live counters for the progress display; thread-safe."""

    done: int = 0
    ok: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, call: Call) -> None:
        with self._lock:
            self.done += 1
            self.ok += call.ok

    def snapshot(self) -> tuple[int, int]:
        """``(calls done, calls ok)``."""
        with self._lock:
            return self.done, self.ok


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """Every call and every connection attempt of one run, in no particular order."""

    calls: tuple[Call, ...]
    connects: tuple[ConnectAttempt, ...]
    wall: float


class _ConnectProbe:
    __slots__ = ("_attempts", "_lock", "_started")

    def __init__(self, started: float) -> None:
        self._started = started
        self._lock = threading.Lock()
        self._attempts: list[ConnectAttempt] = []

    def record(self, *, refused: bool) -> None:
        attempt = ConnectAttempt(time.monotonic() - self._started, refused)
        with self._lock:
            self._attempts.append(attempt)

    def attempts(self) -> tuple[ConnectAttempt, ...]:
        with self._lock:
            return tuple(self._attempts)


def _counting_pool(probe: _ConnectProbe) -> type[HTTPConnectionPool]:
    class CountingConnection(HTTPConnection):
        def connect(self) -> None:
            try:
                super().connect()
            except NewConnectionError as exc:
                probe.record(refused=isinstance(exc.__cause__, ConnectionRefusedError))
                raise
            probe.record(refused=False)

    class CountingPool(HTTPConnectionPool):
        ConnectionCls = CountingConnection

    return CountingPool


class _CountingAdapter(HTTPAdapter):
    def __init__(self, probe: _ConnectProbe) -> None:
        self._probe = probe  # before super().__init__, which builds the pool manager
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        classes = dict(self.poolmanager.pool_classes_by_scheme)
        classes["http"] = _counting_pool(self._probe)
        self.poolmanager.pool_classes_by_scheme = classes


def _error_label(exc: BaseException) -> str:
    """The exception's class name, plus the socket-level cause when there is one to find
    (``ConnectionError (ConnectionRefusedError)``): requests wraps urllib3 wraps the OS."""
    queue: list[BaseException] = [exc]
    seen: set[int] = set()
    while queue and len(seen) < 16:
        item = queue.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, http.client.HTTPException) or (
            isinstance(item, OSError) and type(item).__module__ == "builtins"
        ):
            return f"{type(exc).__name__} ({type(item).__name__})"
        reason = getattr(item, "reason", None)
        for nxt in (*item.args, reason, item.__cause__, item.__context__):
            if isinstance(nxt, BaseException):
                queue.append(nxt)
    return type(exc).__name__


def _call(session: requests.Session, url: str, timeout: float, started: float) -> Call:
    begin = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        response = session.get(url, timeout=timeout)
    except CircuitOpenError as exc:  # before ConnectionError: it is one too
        outcome, error = CallOutcome.REJECTED, type(exc).__name__
    except requests.Timeout as exc:
        outcome, error = CallOutcome.TIMEOUT, type(exc).__name__
    except requests.ConnectionError as exc:
        outcome, error = CallOutcome.CONNECTION, _error_label(exc)
    except Exception as exc:  # noqa: BLE001 - the demo reports every failure, it never dies
        outcome, error = CallOutcome.OTHER, type(exc).__name__
    else:
        status = response.status_code
        outcome = CallOutcome.OK if status < 400 else CallOutcome.HTTP_ERROR
        response.close()
    end = time.monotonic()
    return Call(begin - started, end - begin, outcome, status, error)


def _worker(
    index: int,
    base_url: str,
    schedule: Schedule,
    options: WorkloadOptions,
    started: float,
    probe: _ConnectProbe,
    tally: Tally,
    calls: list[Call],
    stop: threading.Event,
) -> None:
    with requests.Session() as session:
        session.headers[CLIENT_HEADER] = f"worker-{index}"
        session.mount("http://", _CountingAdapter(probe))
        # Staggered starts, so the workers do not call in lockstep.
        next_start = index * options.interval / options.workers
        number = 0
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed < next_start and stop.wait(next_start - elapsed):
                return
            if time.monotonic() - started >= schedule.total:
                return
            number += 1
            call = _call(session, f"{base_url}/orders/{index}-{number}", options.timeout, started)
            calls.append(call)  # one list per worker: no lock needed
            tally.add(call)
            next_start = max(next_start + options.interval, call.started + call.duration)


def run_workload(
    base_url: str,
    schedule: Schedule,
    options: WorkloadOptions,
    *,
    started: float,
    tally: Tally,
    wait: Callable[[list[threading.Thread]], None] | None = None,
) -> WorkloadResult:
    """Run ``options.workers`` workers against ``base_url`` until ``schedule.total`` seconds
    after ``started`` (a ``time.monotonic()`` value); calls in flight then finish.

    ``wait`` is called with the started threads and returns when they are done (the caller
    draws its progress display there); by default the threads are simply joined. If it
    raises (Ctrl-C), the workers are told to stop and the exception propagates.
    """
    probe = _ConnectProbe(started)
    stop = threading.Event()
    per_worker: list[list[Call]] = [[] for _ in range(options.workers)]
    threads = [
        threading.Thread(
            target=_worker,
            args=(i, base_url, schedule, options, started, probe, tally, per_worker[i], stop),
            name=f"demo-worker-{i}",
            daemon=True,
        )
        for i in range(options.workers)
    ]
    for thread in threads:
        thread.start()
    try:
        if wait is None:
            for thread in threads:
                thread.join()
        else:
            wait(threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5.0)
    calls = tuple(call for worker_calls in per_worker for call in worker_calls)
    return WorkloadResult(calls, probe.attempts(), time.monotonic() - started)
