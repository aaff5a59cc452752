"""A fault-injecting TCP proxy for database tests: latency, blackhole, a cut after N bytes,
refused connections.

``FaultProxy(upstream)`` listens on ``127.0.0.1`` (an ephemeral port, ``proxy.port``) and
forwards each connection to ``upstream`` with two pump threads. Faults can be switched at any
moment and apply to open connections as well as new ones:

- ``latency(seconds)``: every chunk is delayed that long, both ways;
- ``blackhole()``: connections are accepted, but nothing is forwarded either way (the client
  waits for an answer that never comes); ``heal()`` ends it;
- ``cut_responses_after(n, once=False)``: the next server-to-client bytes beyond ``n``
  (counted from now, per connection) are not delivered: the connection is reset instead.
  With ``n = 0`` a statement reaches the server, is executed, and its answer is lost: the
  client cannot know whether it happened. With ``once`` only the first such cut happens;
- ``cut_mysql_commands()``: each connection's MySQL handshake goes through, and so does a
  ``SET NAMES`` (which ProxySQL answers itself, and PyMySQL sends while connecting); any
  other command the client sends (a packet whose sequence id is 0) is not forwarded: the
  connection is reset instead, as ProxySQL in front of a dead server looks to a client
  (the login answered, every statement losing its link); ``heal()`` ends it;
- ``answer_mysql_commands(errno, message, times=None)``: as ``cut_mysql_commands``, but the
  command is answered with a MySQL ERR packet (SQLSTATE ``HY000``) and the link kept, as
  ProxySQL answers a statement it could not take to any server (``9001`` "Max connect
  timeout reached while reaching hostgroup N after M ms"); with ``times`` only that many
  commands are answered so, the later ones forwarded (``answered`` counts them);
- ``cut_redis_commands()``: the same for Redis (a proxy such as Envoy's whose server is
  dead): what redis-py sends while connecting (``HELLO``, ``CLIENT``, ``AUTH``, ``SELECT``)
  goes through, any other command resets the connection;
- ``cut_commands(matches)``: any client-to-server chunk ``matches`` accepts is not
  forwarded: the connection is reset instead; ``heal()`` ends it;
- ``refuse()``: the listening socket is closed and open connections reset (connection
  refused); ``heal()`` listens again on the same port;
- ``reset_all()``: reset every open connection now;
- ``random_faults(rng, cut=, lose_answer=, slow=, delay=)``: each client-to-server chunk (a
  statement, or a step of a connect) rolls ``rng``: with probability ``cut`` the connection
  is reset before it is forwarded (the statement never ran), with ``lose_answer`` it is
  forwarded and the server's answer is lost (reset instead: it ran, and the client cannot
  know), with ``slow`` it is delayed ``delay`` seconds; ``heal()`` ends it.

Counters: ``accepted`` (connections forwarded), ``attempts`` (connections a client opened,
those refused because the upstream could not be reached included), ``sends`` (client-to-server
chunks forwarded: about one per statement), ``up_bytes`` and ``down_bytes`` (forwarded).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Cut a connection: the peer sees it end at once (SO_LINGER 0 makes the close a reset).

    ``shutdown`` first: it wakes a pump thread blocked in ``recv`` on this socket, which a
    bare ``close`` from another thread would not (the kernel keeps the socket until that
    ``recv`` returns, so the peer would never learn of the cut)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _mysql_command(data: bytes) -> bool:
    """Whether ``data`` starts a MySQL command (sequence id 0) other than ``SET NAMES``."""
    return len(data) > 4 and data[3] == 0 and data[4:14].upper() != b"\x03SET NAMES"


#: What redis-py sends while opening a connection.
_REDIS_CONNECTING = frozenset({b"HELLO", b"CLIENT", b"AUTH", b"SELECT"})


def _redis_command(data: bytes) -> bool:
    """Whether ``data`` starts with a Redis command other than those of a connect."""
    parts = data.split(b"\r\n", 3)
    return len(parts) > 2 and parts[2].upper() not in _REDIS_CONNECTING


def _mysql_error_packet(errno: int, message: str) -> bytes:
    """An ERR packet answering a command (sequence id 1), with SQLSTATE ``HY000``."""
    payload = b"\xff" + struct.pack("<H", errno) + b"#HY000" + message.encode()
    return struct.pack("<I", len(payload))[:3] + b"\x01" + payload


class _Pair:
    __slots__ = ("client", "closed", "down_budget", "server")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = False
        self.down_budget: int | None = None

    def cut(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.client)
            _reset(self.server)


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0
        self.attempts = 0
        self.sends = 0
        self.up_bytes = 0
        self.down_bytes = 0
        self._delay = 0.0
        self._blackhole = False
        self._cut_after: int | None = None
        self._cut_once = False
        self._cuts_command: Callable[[bytes], bool] | None = None
        self._dice: tuple[random.Random, float, float, float, float] | None = None
        self.cuts = 0
        self._answer: bytes | None = None
        self._answers_left: int | None = None
        self.answered = 0
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._listener: socket.socket | None = None
        self._stopped = False
        self._listen()

    # --- faults -------------------------------------------------------------------------------

    def latency(self, seconds: float) -> None:
        self._delay = seconds

    def blackhole(self) -> None:
        self._blackhole = True

    def cut_responses_after(self, count: int, *, once: bool = False) -> None:
        with self._lock:
            self._cut_after = count
            self._cut_once = once
            for pair in self._pairs:
                pair.down_budget = count

    def cut_commands(self, matches: Callable[[bytes], bool]) -> None:
        self._cuts_command = matches

    def cut_mysql_commands(self) -> None:
        self._cuts_command = _mysql_command

    def answer_mysql_commands(self, errno: int, message: str, times: int | None = None) -> None:
        with self._lock:
            self._answer = _mysql_error_packet(errno, message)
            self._answers_left = times

    def cut_redis_commands(self) -> None:
        self._cuts_command = _redis_command

    def random_faults(
        self,
        rng: random.Random,
        *,
        cut: float = 0.0,
        lose_answer: float = 0.0,
        slow: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        self._dice = (rng, cut, lose_answer, slow, delay)

    def _roll(self) -> str | None:
        """The fault for the next client-to-server chunk: ``cut``, ``lose``, ``slow`` or none."""
        dice = self._dice
        if dice is None:
            return None
        rng, cut, lose_answer, slow, _ = dice
        with self._lock:
            roll = rng.random()
        if roll < cut:
            return "cut"
        if roll < cut + lose_answer:
            return "lose"
        if roll < cut + lose_answer + slow:
            return "slow"
        return None

    def refuse(self) -> None:
        self.stop_accepting()
        self.reset_all()

    def stop_accepting(self) -> None:
        """Refuse new connections, keeping the open ones (``heal()`` listens again)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); a bare close() would not, and
            # the port would go on accepting.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()

    def reset_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.cut()

    def heal(self) -> None:
        """End every fault: no latency, no blackhole, no cut, listening again."""
        self._delay = 0.0
        self._blackhole = False
        self._cuts_command = None
        self._dice = None
        with self._lock:
            self._answer = None
            self._cut_after = None
            for pair in self._pairs:
                pair.down_budget = None
        if self._listener is None and not self._stopped:
            self._listen()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._stopped = True
        self.refuse()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:  # the old listener's port is still being released
                time.sleep(0.05)
        else:
            listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by refuse()/close()
            with self._lock:
                self.attempts += 1
            try:
                server = socket.create_connection(self.upstream, timeout=5.0)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            with self._lock:
                self.accepted += 1
                pair.down_budget = self._cut_after
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _cut(self, pair: _Pair) -> None:
        with self._lock:
            self.cuts += 1
            if self._cut_once:
                self._cut_after = None
                for other in self._pairs:
                    other.down_budget = None
        pair.cut()

    def _answered(self, pair: _Pair, data: bytes) -> bool:
        """Answer ``data`` with the ERR packet of ``answer_mysql_commands`` if it is due."""
        with self._lock:
            answer = self._answer
            if answer is None or not _mysql_command(data):
                return False
            self.answered += 1
            if self._answers_left is not None:
                self._answers_left -= 1
                if self._answers_left <= 0:
                    self._answer = None
        pair.client.sendall(answer)
        return True

    def _pump(self, pair: _Pair, upward: bool) -> None:
        source, sink = (pair.client, pair.server) if upward else (pair.server, pair.client)
        try:
            while not pair.closed:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if self._delay:
                    time.sleep(self._delay)
                while self._blackhole and not pair.closed:
                    time.sleep(0.01)  # hold it: nothing flows until heal() or a cut
                if pair.closed:
                    break
                if upward and self._answered(pair, data):
                    continue  # never forwarded: the "proxy" answered it
                cuts_command = self._cuts_command
                if upward and cuts_command is not None and cuts_command(data):
                    self._cut(pair)  # never forwarded
                    break
                fault = self._roll() if upward else None
                if fault == "cut":
                    self._cut(pair)  # never forwarded
                    break
                if fault == "lose":
                    pair.down_budget = 0  # forwarded; the answer is cut
                elif fault == "slow" and self._dice is not None:
                    time.sleep(self._dice[4])
                if not upward and pair.down_budget is not None:
                    if len(data) > pair.down_budget:
                        self._cut(pair)
                        break
                    pair.down_budget -= len(data)
                sink.sendall(data)
                with self._lock:
                    if upward:
                        self.sends += 1
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
        except OSError:
            pass
        finally:
            if not pair.closed:
                # One side ended: end the other the same way (a clean close).
                pair.closed = True
                for sock in (pair.client, pair.server):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
            with self._lock, contextlib.suppress(ValueError):
                self._pairs.remove(pair)
