"""A loopback HTTP/1.1 server with scripted faults, for integration tests.

Each request the server reads pops the next :class:`Action` from its script; when the script is
empty it plays ``default`` (``ok()`` unless told otherwise). The actions:

=====================  =============================================================================
``ok(body)``           ``200`` with ``body``
``status(code, h)``    ``code`` with headers ``h`` (e.g. ``{"Retry-After": "2"}``) and a short body
``hang(seconds)``      read the request, answer nothing for ``seconds``, then close (or until stop)
``close()``            read the request, close the connection without a byte of response
``reset()``            read the request, close with ``SO_LINGER 0`` so the client gets a TCP RST
``truncate(body, n)``  send headers announcing ``n`` bytes, then ``body`` (shorter), then close
=====================  =============================================================================

The server binds ``127.0.0.1`` on an ephemeral port, serves each connection on its own daemon
thread, keeps connections alive between requests (as ``requests``/``httpx`` pools expect), and
records every request (method, path, headers, body, arrival time on ``time.monotonic``)::

    with FaultyHTTPServer([status(503), status(429, {"Retry-After": "1"}), ok("hi")]) as server:
        requests.get(server.url("/a"))
        assert server.count("GET", "/a") == 1

Bytes that do not look like HTTP (a TLS ``ClientHello``, say) get a plain ``400`` and a close,
so a client that speaks TLS to it fails its handshake at once instead of hanging. Pass
``ssl_context`` (a server-side ``ssl.SSLContext``) to serve HTTPS instead.

As a pytest fixture: ``from tests.support.faulty_http import faulty_http_server`` in a test
module (or a conftest) and take ``faulty_http_server`` as an argument; it yields a started,
empty-script server and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import pytest

__all__ = [
    "Action",
    "FaultyHTTPServer",
    "RecordedRequest",
    "close",
    "closed_port",
    "faulty_http_server",
    "hang",
    "ok",
    "reset",
    "status",
    "truncate",
]

_MAX_HEAD = 64 * 1024
_IO_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Action:
    """One scripted reaction to one request. Build it with the helper functions."""

    kind: str
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    seconds: float = 0.0
    declared_length: int = 0


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def ok(body: bytes | str = b"ok", headers: Mapping[str, str] | None = None) -> Action:
    """Answer ``200`` with ``body`` (and extra ``headers``)."""
    return Action("respond", 200, tuple((headers or {}).items()), _as_bytes(body))


def status(code: int, headers: Mapping[str, str] | None = None, body: bytes | str = b"") -> Action:
    """Answer ``code`` (100-599) with ``headers``; the body defaults to the reason phrase."""
    if not 100 <= code <= 599:
        raise ValueError(f"status code {code} is outside 100-599")
    payload = _as_bytes(body) if body else _reason(code).encode()
    return Action("respond", code, tuple((headers or {}).items()), payload)


def hang(seconds: float) -> Action:
    """Read the request and answer nothing for ``seconds`` (cut short when the server stops)."""
    return Action("hang", seconds=seconds)


def close() -> Action:
    """Read the request and close the connection without any response (a clean FIN)."""
    return Action("close")


def reset() -> Action:
    """Read the request and abort the connection with a TCP RST (``SO_LINGER`` 0)."""
    return Action("reset")


def truncate(body: bytes | str = b"partial", declared_length: int = 1000) -> Action:
    """Send ``200`` announcing ``declared_length`` bytes, send only ``body``, then close."""
    payload = _as_bytes(body)
    if declared_length <= len(payload):
        raise ValueError("declared_length must exceed the body to truncate anything")
    return Action("truncate", 200, (), payload, declared_length=declared_length)


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as the server read it. ``arrived_at`` is ``time.monotonic()`` seconds."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    arrived_at: float


def closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, read and released; reuse is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Unparseable(Exception):
    """The peer sent bytes that are not an HTTP/1.x request."""


@dataclass(eq=False)
class FaultyHTTPServer:
    """A threaded loopback HTTP/1.1 server that plays a script of faults (see the module doc).

    ``script`` is consumed in order, one action per request, across all connections;
    ``default`` answers once it is empty. Thread-safe: tests may ``push`` while clients run.
    """

    script: Iterable[Action] = ()
    default: Action = dataclasses.field(default_factory=ok)
    ssl_context: ssl.SSLContext | None = None
    _queue: list[Action] = field(init=False, default_factory=list)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _listener: socket.socket | None = field(init=False, default=None)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _conns: set[socket.socket] = field(init=False, default_factory=set)
    _records: list[RecordedRequest] = field(init=False, default_factory=list)
    _counts: Counter[tuple[str, str]] = field(init=False, default_factory=Counter)
    _bad_requests: int = field(init=False, default=0)
    _connections: int = field(init=False, default=0)
    _open: int = field(init=False, default=0)
    _peak: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._queue.extend(self.script)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultyHTTPServer:
        """Bind ``127.0.0.1:0`` and start accepting; returns ``self``."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self._spawn(self._accept_loop, listener)
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (hangs end at once) and join the threads."""
        self._stopping.set()
        if self._listener is not None:
            # close() alone does not wake a thread blocked in accept(); a connection does.
            with contextlib.suppress(OSError):
                socket.create_connection(self._listener.getsockname(), timeout=1.0).close()
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in list(self._threads):
            thread.join(timeout=2.0)

    def __enter__(self) -> FaultyHTTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addressing and scripting -------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def authority(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """``http://127.0.0.1:<port><path>`` (``https`` when serving TLS)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.authority}{path if path.startswith('/') else '/' + path}"

    def push(self, *actions: Action) -> None:
        """Append ``actions`` to the script."""
        with self._lock:
            self._queue.extend(actions)

    @property
    def pending(self) -> int:
        """Actions still waiting in the script."""
        with self._lock:
            return len(self._queue)

    # -- what happened ---------------------------------------------------------------------------

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests read so far, optionally only those with this method and/or path."""
        with self._lock:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if (method is None or m == method.upper()) and (path is None or p == path)
            )

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request read so far, in arrival order."""
        with self._lock:
            return list(self._records)

    @property
    def arrivals(self) -> list[float]:
        """``time.monotonic()`` at which each request was read, in order."""
        with self._lock:
            return [r.arrived_at for r in self._records]

    @property
    def bad_requests(self) -> int:
        """Connections that sent something other than HTTP (answered ``400`` and closed)."""
        with self._lock:
            return self._bad_requests

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Accepted connections not yet closed by the server (it closes one when the client
        does, or when a fault ends it)."""
        with self._lock:
            return self._open

    @property
    def peak_connections(self) -> int:
        """The most connections that were open at once so far."""
        with self._lock:
            return self._peak

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self._stopping.is_set():
                conn.close()
                return
            with self._lock:
                self._conns.add(conn)
                self._connections += 1
                self._open += 1
                self._peak = max(self._peak, self._open)
            self._spawn(self._serve, conn)

    def _next_action(self, record: RecordedRequest) -> Action:
        with self._lock:
            self._records.append(record)
            self._counts[(record.method, record.path)] += 1
            return self._queue.pop(0) if self._queue else self.default

    def _serve(self, raw: socket.socket) -> None:
        conn = raw
        try:
            raw.settimeout(_IO_TIMEOUT_S)
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(raw, server_side=True)
                except (OSError, ssl.SSLError):
                    return  # the client refused our certificate: that is the test's point
                with self._lock:
                    self._conns.add(conn)
            buffer = b""
            while not self._stopping.is_set():
                try:
                    request, buffer = self._read_request(conn, buffer)
                except _Unparseable:
                    with self._lock:
                        self._bad_requests += 1
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                if request is None:
                    return
                action = self._next_action(request)
                if not self._play(conn, action, request):
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(raw)
                self._conns.discard(conn)
                # Before the close: a client that reconnects once it sees this one end never
                # finds it still counted.
                self._open -= 1
            with contextlib.suppress(OSError):
                conn.close()

    def _play(self, conn: socket.socket, action: Action, request: RecordedRequest) -> bool:
        """Carry out ``action``; ``True`` when the connection may serve another request."""
        if action.kind == "respond":
            wants_close = request.headers.get("connection", "").lower() == "close"
            head = [f"HTTP/1.1 {action.status} {_reason(action.status)}"]
            names = {name.lower() for name, _ in action.headers}
            head.extend(f"{name}: {value}" for name, value in action.headers)
            if "content-length" not in names:
                head.append(f"Content-Length: {len(action.body)}")
            if "content-type" not in names:
                head.append("Content-Type: text/plain")
            head.append(f"Connection: {'close' if wants_close else 'keep-alive'}")
            body = b"" if request.method == "HEAD" else action.body
            conn.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
            return not wants_close
        if action.kind == "hang":
            self._stopping.wait(action.seconds)
            return False
        if action.kind == "close":
            return False
        if action.kind == "reset":
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return False
        if action.kind == "truncate":
            partial = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {action.declared_length}\r\n\r\n"
            )
            conn.sendall(partial.encode("latin-1") + action.body)
            return False
        raise ValueError(f"unknown action {action.kind!r}")

    def _read_request(
        self, conn: socket.socket, buffer: bytes
    ) -> tuple[RecordedRequest | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            if buffer and not buffer[:1].isalpha():
                raise _Unparseable
            if len(buffer) > _MAX_HEAD:
                raise _Unparseable
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            buffer += chunk
        arrived_at = time.monotonic()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Unparseable
        method, path = parts[0].upper(), parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body, rest = self._read_body(conn, headers, rest)
        return RecordedRequest(method, path, headers, body, arrived_at), rest

    @staticmethod
    def _read_body(
        conn: socket.socket, headers: Mapping[str, str], rest: bytes
    ) -> tuple[bytes, bytes]:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in rest:
                    rest += _recv_or_fail(conn)
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    rest += _recv_or_fail(conn)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    return body, rest
        length = int(headers.get("content-length", "0") or "0")
        while len(rest) < length:
            rest += _recv_or_fail(conn)
        return rest[:length], rest[length:]


def _recv_or_fail(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise OSError("peer closed mid-request")
    return chunk


@pytest.fixture
def faulty_http_server() -> Iterator[FaultyHTTPServer]:
    """A started :class:`FaultyHTTPServer` with an empty script; stopped after the test."""
    with FaultyHTTPServer() as server:
        yield server
