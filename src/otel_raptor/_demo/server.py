"""The demo's downstream: a loopback HTTP/1.1 server that follows a fault schedule in time.

The phase of every request is decided by the time elapsed since :meth:`FaultServer.begin_run`,
so two runs of the same workload meet the same faults at the same moments (and, with the same
seed, the same random 503 sequence)::

    healthy ─► flaky ─► rate_limited ─► outage_hang ─► outage_refused ─► recovered
    200        30 % 503  quota, then 429  read, never     listening socket  200
                         + Retry-After    answered        closed

Everything the server sees is recorded per request (:class:`ServedRequest`): when it arrived,
in which phase, from which client (the ``X-Demo-Client`` header), what was answered, and
whether it arrived before a ``Retry-After`` this server had announced to that client expired.
During ``outage_refused`` nothing listens, so nothing can be recorded here: the workload
counts those refused connection attempts on the client side.
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from otel_raptor.errors import ConfigError

__all__ = [
    "CLIENT_HEADER",
    "OUTAGE_PHASES",
    "FaultServer",
    "Phase",
    "PhaseSpan",
    "Schedule",
    "ServedRequest",
    "ServerLog",
]

#: The request header naming the client (one per workload worker), for ``Retry-After`` accounting.
CLIENT_HEADER = "X-Demo-Client"

_MAX_HEAD = 64 * 1024
# How long an idle keep-alive connection blocks in recv before checking for a stop.
_POLL_S = 0.25


class Phase(str, enum.Enum):
    """What the server does, by time since the run started."""

    HEALTHY = "healthy"
    FLAKY = "flaky"
    RATE_LIMITED = "rate_limited"
    OUTAGE_HANG = "outage_hang"
    OUTAGE_REFUSED = "outage_refused"
    RECOVERED = "recovered"

    def __str__(self) -> str:
        return self.value


#: The two halves of the hard outage.
OUTAGE_PHASES = frozenset({Phase.OUTAGE_HANG, Phase.OUTAGE_REFUSED})


@dataclass(frozen=True, slots=True)
class PhaseSpan:
    """One phase and its ``[start, end)`` in seconds since the run started."""

    phase: Phase
    start: float
    end: float


_PHASE_FIELDS = ("healthy", "flaky", "rate_limited", "outage_hang", "outage_refused", "recovered")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """The fault script. Durations are seconds (finite, > 0), in the order of the phases.

    * ``healthy`` (3.0), ``flaky`` (5.0), ``rate_limited`` (4.0), ``outage_hang`` (3.0),
      ``outage_refused`` (3.0), ``recovered`` (4.0): how long each phase lasts.
    * ``error_rate`` (0.3, in [0, 1]): share of requests answered ``503`` while flaky.
    * ``retry_after`` (1, integer seconds in [1, 60]): the rate limiter's window, and the
      ``Retry-After`` it announces (always a whole number of seconds, as RFC 9110 wants).
    * ``quota`` (2, integer >= 1): requests each client may make per window while rate
      limited. Every request counts, refused ones too, so a client that ignores
      ``Retry-After`` keeps being refused.
    """

    healthy: float = 3.0
    flaky: float = 5.0
    rate_limited: float = 4.0
    outage_hang: float = 3.0
    outage_refused: float = 3.0
    recovered: float = 4.0
    error_rate: float = 0.3
    retry_after: int = 1
    quota: int = 2

    def __post_init__(self) -> None:
        for name in _PHASE_FIELDS:
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            ):
                raise ConfigError(f"demo.schedule.{name}", value, "a finite number > 0 (s)")
        rate: object = self.error_rate
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate <= 1):
            raise ConfigError("demo.schedule.error_rate", rate, "a number in [0, 1]")
        retry_after: object = self.retry_after
        if not (isinstance(retry_after, int) and not isinstance(retry_after, bool)) or not (
            1 <= retry_after <= 60
        ):
            raise ConfigError("demo.schedule.retry_after", retry_after, "an integer in [1, 60]")
        quota: object = self.quota
        if not (isinstance(quota, int) and not isinstance(quota, bool) and quota >= 1):
            raise ConfigError("demo.schedule.quota", quota, "an integer >= 1")

    @classmethod
    def quick(cls) -> Schedule:
        """A ~5 s schedule for tests: every phase, just shorter (the 429 window stays 1 s)."""
        return cls(
            healthy=0.4,
            flaky=0.8,
            rate_limited=1.2,
            outage_hang=0.8,
            outage_refused=0.8,
            recovered=1.2,
        )

    def spans(self) -> tuple[PhaseSpan, ...]:
        """Every phase with its start and end, in order."""
        out: list[PhaseSpan] = []
        start = 0.0
        for phase, length in (
            (Phase.HEALTHY, self.healthy),
            (Phase.FLAKY, self.flaky),
            (Phase.RATE_LIMITED, self.rate_limited),
            (Phase.OUTAGE_HANG, self.outage_hang),
            (Phase.OUTAGE_REFUSED, self.outage_refused),
            (Phase.RECOVERED, self.recovered),
        ):
            out.append(PhaseSpan(phase, start, start + length))
            start += length
        return tuple(out)

    @property
    def total(self) -> float:
        """Length of the whole schedule, seconds."""
        return self.spans()[-1].end

    def span_of(self, phase: Phase) -> PhaseSpan:
        """The span of ``phase``."""
        return next(s for s in self.spans() if s.phase is phase)

    def phase_at(self, elapsed: float) -> Phase:
        """The phase at ``elapsed`` seconds since the run started (``recovered`` after the end,
        ``healthy`` before the start)."""
        for span in self.spans():
            if elapsed < span.end:
                return span.phase
        return Phase.RECOVERED


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """One request the server read.

    ``at`` is seconds since the run started; ``status`` what was answered (``None``: the
    request was read and never answered). ``early`` is true when the client had been told
    ``Retry-After`` by this server and that wait had not yet expired.
    """

    at: float
    client: str
    phase: Phase
    status: int | None
    early: bool


@dataclass(frozen=True, slots=True)
class ServerLog:
    """What the server saw during one run."""

    requests: tuple[ServedRequest, ...]
    #: TCP connections accepted, by the phase they were accepted in.
    connections: dict[Phase, int]

    def in_phase(self, *phases: Phase) -> Iterator[ServedRequest]:
        return (r for r in self.requests if r.phase in phases)

    @property
    def early(self) -> int:
        """Requests that arrived before a ``Retry-After`` announced to their client expired."""
        return sum(1 for r in self.requests if r.early)


@dataclass
class _Client:
    window_start: float = -math.inf
    used: int = 0
    not_before: float = -math.inf


@dataclass(eq=False)
class FaultServer:
    """A threaded loopback server playing ``schedule`` (see the module docstring).

    Idle (before :meth:`begin_run` and after :meth:`end_run`) it answers ``200``. Bound to
    ``127.0.0.1`` on an ephemeral port; during ``outage_refused`` the listening socket is
    closed and every open connection cut, and afterwards it listens again on the same port.
    """

    schedule: Schedule
    seed: int = 0
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _port: int = field(init=False, default=0)
    _started_at: float | None = field(init=False, default=None)
    _rng: random.Random = field(init=False, default_factory=random.Random)
    _records: list[ServedRequest] = field(init=False, default_factory=list)
    _connections: dict[Phase, int] = field(init=False, default_factory=dict)
    _clients: dict[str, _Client] = field(init=False, default_factory=dict)
    _conns: set[socket.socket] = field(init=False, default_factory=set)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _acceptor: threading.Thread | None = field(init=False, default=None)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultServer:
        """Bind and start accepting; returns ``self``."""
        listener = self._bind(0)
        self._port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="demo-server", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every connection (hangs end at once) and join the threads."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=2.0)
        self._cut_connections()
        for thread in list(self._threads):
            thread.join(timeout=2.0)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/") -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self._port}{path}"

    # -- runs --------------------------------------------------------------------------------

    def begin_run(self) -> float:
        """Start the schedule now (``time.monotonic()``, returned); forget the previous run."""
        with self._lock:
            self._records.clear()
            self._connections.clear()
            self._clients.clear()
            self._rng.seed(self.seed)
            self._started_at = time.monotonic()
            return self._started_at

    def end_run(self) -> ServerLog:
        """Stop the schedule (back to answering ``200``) and return what this run saw."""
        with self._lock:
            self._started_at = None
            log = ServerLog(tuple(self._records), dict(self._connections))
        return log

    @property
    def started_at(self) -> float | None:
        """``time.monotonic()`` when the current run began; ``None`` between runs."""
        return self._started_at

    def phase(self, now: float | None = None) -> Phase | None:
        """The phase at ``now`` (default: the current time); ``None`` when no run is going."""
        started = self._started_at
        if started is None:
            return None
        return self.schedule.phase_at((time.monotonic() if now is None else now) - started)

    # -- listening ---------------------------------------------------------------------------

    @staticmethod
    def _bind(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        return listener

    def _until_next_boundary(self) -> float:
        """Seconds until the phase may change, capped at 50 ms."""
        started = self._started_at
        if started is None:
            return 0.05
        elapsed = time.monotonic() - started
        ahead = [s.start - elapsed for s in self.schedule.spans() if s.start > elapsed]
        return max(0.0005, min([0.05, *ahead]))

    def _accept_loop(self, first: socket.socket) -> None:
        # This one thread owns the listening socket: it closes it when the refused half of
        # the outage starts and binds the same port again when it ends, so no other thread
        # ever races a close against accept().
        listener: socket.socket | None = first
        try:
            while not self._stopping.is_set():
                refusing = self.phase() is Phase.OUTAGE_REFUSED
                if refusing and listener is not None:
                    listener.close()
                    listener = None
                    self._cut_connections()
                elif not refusing and listener is None:
                    try:
                        listener = self._bind(self._port)
                    except OSError:
                        # The port is briefly unavailable: try again on the next tick.
                        self._stopping.wait(0.01)
                        continue
                wait = self._until_next_boundary()
                if listener is None:
                    self._stopping.wait(wait)
                    continue
                ready, _, _ = select.select([listener], [], [], wait)
                if not ready:
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                phase = self.phase()
                with self._lock:
                    self._conns.add(conn)
                    if phase is not None:
                        self._connections[phase] = self._connections.get(phase, 0) + 1
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
                thread.start()
        finally:
            if listener is not None:
                listener.close()

    def _cut_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- serving -----------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_POLL_S)
            buffer = b""
            while not self._stopping.is_set():
                head, buffer = self._read_head(conn, buffer)
                if head is None:
                    return
                if not self._answer(conn, head):
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _read_head(self, conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > _MAX_HEAD or self._stopping.is_set():
                return None, b""
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None, b""
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        # The demo's client sends bodiless GETs; a body, if any, is skipped by its length.
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or b"0")
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return head, rest[length:]

    def _answer(self, conn: socket.socket, head: bytes) -> bool:
        """Answer one request; ``True`` when the connection may serve another one."""
        now = time.monotonic()
        client = "-"
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == CLIENT_HEADER.lower().encode():
                client = value.strip().decode("latin-1")[:64]
        started = self._started_at
        phase = Phase.HEALTHY if started is None else self.schedule.phase_at(now - started)
        status: int | None = 200
        headers: list[tuple[str, str]] = []
        with self._lock:
            state = self._clients.setdefault(client, _Client())
            early = now < state.not_before
            if phase is Phase.FLAKY and self._rng.random() < self.schedule.error_rate:
                status = 503
            elif phase is Phase.RATE_LIMITED:
                window = float(self.schedule.retry_after)
                if now - state.window_start >= window:
                    state.window_start, state.used = now, 0
                state.used += 1
                if state.used > self.schedule.quota:
                    status = 429
                    wait = max(1, math.ceil(state.window_start + window - now))
                    headers.append(("Retry-After", str(wait)))
                    state.not_before = max(state.not_before, now + wait)
            elif phase in OUTAGE_PHASES:
                status = None
            if started is not None:
                self._records.append(ServedRequest(now - started, client, phase, status, early))
        if status is None:
            if phase is Phase.OUTAGE_HANG and started is not None:
                # Hold the request until the hang ends; the client's timeout fires first.
                end = started + self.schedule.span_of(Phase.OUTAGE_HANG).end
                self._stopping.wait(max(0.0, end - time.monotonic()))
            return False
        body = b'{"ok": true}' if status == 200 else f'{{"status": {status}}}'.encode()
        reason = {200: "OK", 429: "Too Many Requests", 503: "Service Unavailable"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
        lines += [
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive",
        ]
        conn.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        return True
