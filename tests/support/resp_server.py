"""A loopback server speaking Redis' protocol (RESP2) with scripted answers: for replies a real
Redis gives only under a race too narrow to stage (a script ending between two commands of one
pipeline). ``answer`` gets each command (its arguments as bytes) and returns the raw reply."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import BinaryIO

Answer = Callable[[list[bytes]], bytes]


def _default(command: list[bytes]) -> bytes | None:
    """What redis-py asks on connecting, answered as a Redis 7 would."""
    name = command[0].upper()
    if name in (b"CLIENT", b"SELECT", b"AUTH", b"READONLY"):
        return b"+OK\r\n"
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"HELLO":
        return b"-ERR unknown command 'HELLO'\r\n"
    return None


class ScriptedRedis:
    """Serves every connection on its own thread until :meth:`close`; ``commands`` lists what
    it received, in order (connection set-up included)."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.commands: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while not self._closed:
                command = _read_command(reader)
                if command is None:
                    return
                with self._lock:
                    self.commands.append(command)
                reply = _default(command) or self._answer(command)
                conn.sendall(reply)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def _read_command(reader: BinaryIO) -> list[bytes] | None:
    line = reader.readline()
    if not line:
        return None
    assert line.startswith(b"*"), line
    args = []
    for _ in range(int(line[1:])):
        size = int(reader.readline()[1:])
        args.append(reader.read(size + 2)[:-2])
    return args
