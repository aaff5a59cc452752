"""PyMySQL and MySQL 8's error 4031 ("The client was disconnected by the server because of
inactivity", ``ER_CLIENT_INTERACTION_TIMEOUT``), through the real hook.

The shared MariaDB never sends 4031, so a tiny MySQL 8 stand-in on a real loopback socket
does: it speaks enough of the protocol for PyMySQL to connect (handshake, ``OK`` to every
statement and ``COM_PING``), and answers a statement with the 4031 error packet and closes
the connection, as MySQL 8.0.24+ does for a session it reaped. MySQL writes that packet while
the client is idle, numbered 0, which PyMySQL 1.x turns into its own ``2013`` ("Lost
connection", already a lost connection); numbered as the answer to the statement (1), PyMySQL
raises the server's ``4031``: both must be held unconfirmed, and the reconnect that follows
decides: it succeeds (the server is up) and drops them, or it is refused and they count with
it. (4031 was ``unknown`` before, which a database's breaker never counts: not even when
the reconnect after it was refused.)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import ErrorClassified
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from tests.integrations.db.conftest import Install

MESSAGE = (
    b"The client was disconnected by the server because of inactivity. "
    b"See wait_timeout and interactive_timeout for configuring this behavior."
)
# CLIENT_LONG_PASSWORD | CONNECT_WITH_DB | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION
# | PLUGIN_AUTH
CAPABILITIES = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000
AUTOCOMMIT = 0x2  # SERVER_STATUS_AUTOCOMMIT
COM_QUIT, COM_QUERY, COM_PING = 0x01, 0x03, 0x0E


def packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def ok_packet() -> bytes:
    return b"\x00\x00\x00" + struct.pack("<HH", AUTOCOMMIT, 0)


def handshake() -> bytes:
    salt = b"abcdefghijklmnopqrst"
    return (
        b"\x0a8.0.36-raptor-stand-in\x00"
        + struct.pack("<I", 7)
        + salt[:8]
        + b"\x00"
        + struct.pack("<H", CAPABILITIES & 0xFFFF)
        + bytes([45])  # utf8mb4_general_ci
        + struct.pack("<H", AUTOCOMMIT)
        + struct.pack("<H", CAPABILITIES >> 16)
        + bytes([21])
        + b"\x00" * 10
        + salt[8:]
        + b"\x00"
        + b"mysql_native_password\x00"
    )


class MySQL8StandIn:
    """Serves each connection on its own thread; a statement containing ``reap`` is answered
    with error 4031, numbered ``reap_seq``, and the connection closed."""

    def __init__(self, reap_seq: int) -> None:
        self.reap_seq = reap_seq
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket) -> tuple[int, bytes] | None:
        header = b""
        while len(header) < 4:
            chunk = conn.recv(4 - len(header))
            if not chunk:
                return None
            header += chunk
        length = int.from_bytes(header[:3], "little")
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return header[3], body

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(packet(0, handshake()))
            if self._read(conn) is None:  # the handshake response
                return
            conn.sendall(packet(2, ok_packet()))
            while (received := self._read(conn)) is not None:
                command = received[1][:1]
                if command == bytes([COM_QUIT]):
                    return
                if command == bytes([COM_QUERY]) and b"reap" in received[1]:
                    error = b"\xff" + struct.pack("<H", 4031) + b"#HY000" + MESSAGE
                    conn.sendall(packet(self.reap_seq, error))
                    return  # and closed
                conn.sendall(packet(1, ok_packet()))  # any other statement, COM_PING

    def close(self) -> None:
        """Stop listening (new connections are refused)."""
        with contextlib.suppress(OSError):  # shutdown wakes the thread blocked in accept()
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture(params=[0, 1], ids=["farewell-numbered-0", "answer-numbered-1"])
def stand_in(request: pytest.FixtureRequest) -> Iterator[MySQL8StandIn]:
    server = MySQL8StandIn(reap_seq=request.param)
    try:
        yield server
    finally:
        server.close()


def test_a_session_mysql_8_reaped_is_an_unconfirmed_lost_connection(
    install: Install, stand_in: MySQL8StandIn
) -> None:
    installed = install(PyMySQLIntegration, failure_threshold=1)
    conn: Any = pymysql.connect(
        host="127.0.0.1", port=stand_in.port, user="root", password="", database="test",
        autocommit=True, connect_timeout=2, read_timeout=2,
    )  # fmt: skip
    with conn.cursor() as cursor:
        cursor.execute("DO 1")
        with pytest.raises(pymysql.err.OperationalError) as raised:
            cursor.execute("DO 'reap'")
    # PyMySQL's own 2013 for MySQL's farewell (numbered 0); the server's 4031 otherwise.
    assert raised.value.args[0] == (2013 if stand_in.reap_seq == 0 else 4031)
    (classified,) = installed.of(ErrorClassified)
    assert classified.classification.category is ErrorCategory.CONNECTION
    assert classified.classification.unconfirmed  # held: the reconnect decides
    breaker = installed.runtime.breakers.get(f"mysql://127.0.0.1:{stand_in.port}/test")
    # failure_threshold=1: counted at once, the lost connection would have opened it.
    assert breaker.snapshot().window_failures == 0
    if conn.open:  # MySQL's error left PyMySQL's socket open: the app closes it first
        conn.close()
    conn.connect()  # the app's reconnect (PyMySQL's own ping(reconnect=True)): the server is up
    with conn.cursor() as cursor:
        cursor.execute("DO 1")
    assert stand_in.connections == 2
    assert breaker.snapshot().window_failures == 0
    assert breaker.snapshot().state.name == "CLOSED"
    conn.close()


def test_a_reaped_session_counts_when_the_reconnect_is_refused(
    install: Install, stand_in: MySQL8StandIn
) -> None:
    # The server went away after reaping the session: the refused reconnect counts, and
    # confirms the lost connection held before it, which counts with it.
    installed = install(PyMySQLIntegration, failure_threshold=3, max_retries=0)
    conn: Any = pymysql.connect(
        host="127.0.0.1", port=stand_in.port, user="root", password="", database="test",
        autocommit=True, connect_timeout=2, read_timeout=2,
    )  # fmt: skip
    with conn.cursor() as cursor, pytest.raises(pymysql.err.OperationalError):
        cursor.execute("DO 'reap'")
    stand_in.close()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        conn.connect()
    assert refused.value.args[0] == 2003
    breaker = installed.runtime.breakers.get(f"mysql://127.0.0.1:{stand_in.port}/test")
    assert breaker.snapshot().window_failures == 2
