"""Private database servers that a test may kill and restart: PostgreSQL, MariaDB, Redis.

The shared servers on the usual ports are never stopped by a test. These start their own
instance in a temporary directory on a free loopback port, and remove it afterwards:

- :class:`PrivatePostgres`: ``initdb`` (as the ``postgres`` user when run as root, since
  PostgreSQL refuses to run as root), ``pg_ctl start``/``stop -m immediate`` (a crash: no
  checkpoint, recovery from the WAL on restart);
- :class:`PrivateMariaDB`: ``mariadb-install-db`` then ``mariadbd``; ``mysqladmin shutdown``
  or a ``SIGKILL``;
- :class:`PrivatePgBouncer`: ``pgbouncer`` (session pooling, trust auth) in front of a
  :class:`PrivatePostgres`;
- :class:`PrivateRedis`: ``redis-server`` with an append-only file fsynced on every write;
  ``SHUTDOWN NOSAVE`` or a ``SIGKILL``;
- :class:`PrivateTwemproxy`: twemproxy (``nutcracker``) in front of a :class:`PrivateRedis`.

Durability is the servers' own, with syncing to disk relaxed where that only matters for a
machine crash (``fsync=off``, ``innodb_flush_log_at_trx_commit=2``): a killed *process* loses
nothing it acknowledged. :func:`find_binary` locates the programs; a test skips (or fails
with ``RAPTOR_REQUIRE_SERVICES=1``) when one is missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.services import services_required

__all__ = [
    "PrivateMariaDB",
    "PrivatePgBouncer",
    "PrivatePostgres",
    "PrivateRedis",
    "PrivateRedisCluster",
    "PrivateTwemproxy",
    "find_binary",
    "free_port",
]


#: The ports :func:`free_port` handed out, so that it never hands one out twice: servers are
#: often given their ports before any of them starts (``PrivateRedis(), PrivateRedis()``), and
#: the kernel may offer a port again once its probe socket closed (about once in 20 000
#: pairs, measured). Two servers given one port would make the second's start "succeed" on
#: the first one's listener (a replica told to replicate itself, which Redis accepts, never
#: synchronises).
_handed_out: set[int] = set()


def free_port(*, below: int = 65536) -> int:
    """A loopback port nothing listens on now (below ``below``), never one handed out before
    in this process."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port below {below}")


def find_binary(*names: str) -> str:
    """The path of the first of ``names`` found on PATH or in PostgreSQL's versioned
    directories; skips (fails with ``RAPTOR_REQUIRE_SERVICES=1``) when none is."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
            return candidate
    message = f"none of {', '.join(names)} is installed"
    if services_required():
        pytest.fail(f"{message} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _wait_closed(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} still listens after {timeout}s")


class PrivatePostgres:
    """A PostgreSQL cluster of our own (user ``postgres``, trust auth, database ``postgres``)."""

    def __init__(self) -> None:
        self.initdb = find_binary("initdb")
        self.pg_ctl = find_binary("pg_ctl")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raptor_db_pg_"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as, *command], check=True, capture_output=True, timeout=60, cwd=self.root
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c shared_buffers=16MB -c max_connections=40"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
            "-w", "-t", "30", "start",
        )  # fmt: skip
        _wait_port(self.port, 30)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: every session is ended (``57P01``), then the server stops,
        as in a planned restart."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
        _wait_closed(self.port, 10)

    def kill(self) -> None:
        """``pg_ctl stop -m immediate``: the server process ends at once, as in a crash."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        _wait_closed(self.port, 10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivatePgBouncer:
    """A PgBouncer of our own in front of ``server`` (session pooling, ``auth_type = trust``,
    any database name mapped to the server's). PgBouncer refuses to run as root: as
    :class:`PrivatePostgres`, it runs as ``postgres`` then.

    With the server down, PgBouncer still accepts connections (it answers the login itself,
    with the server parameters it cached), and a statement waits for a server connection
    until ``query_wait_timeout`` (here ``query_wait`` seconds; 120 by default), then fails
    with ``08P01`` "query_wait_timeout" and the client connection is closed. A statement on
    a client whose server connection died gets ``08P01`` "server conn crashed?" at once, and
    one sent within ``server_login_retry`` of a failed server connect ``08P01`` "server
    login has been failing, try again later (server_login_retry)", at once too.
    ``server_login_retry`` is 1 s, so the server is used again within a second of its return."""

    def __init__(self, server: PrivatePostgres, *, query_wait: float = 1.0) -> None:
        self.binary = find_binary("pgbouncer")
        self.server = server
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raptor_db_pgbouncer_"))
        self._process: subprocess.Popen[bytes] | None = None
        (self.root / "users.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\n"
            "pool_mode = session\nserver_login_retry = 1\n"
            f"query_wait_timeout = {query_wait}\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
        )
        # As root, the process itself runs as ``postgres`` (not under ``runuser``: on SIGTERM
        # runuser forwards it, then sleeps 2 s before it exits, whatever the child did).
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._uid, self._gid = user.pw_uid, user.pw_gid

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.binary, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            user=self._uid,
            group=self._gid,
            extra_groups=[] if self._uid is not None else None,
        )
        _wait_port(self.port, 30)

    def close(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # PgBouncer exits at once on SIGTERM
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateMariaDB:
    """A MariaDB server of our own (user ``root``, no password, grants skipped)."""

    def __init__(self) -> None:
        self.install = find_binary("mariadb-install-db", "mysql_install_db")
        self.server = find_binary("mariadbd", "mysqld")
        self.admin = find_binary("mariadb-admin", "mysqladmin")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raptor_db_my_"))
        self.data = self.root / "data"
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                self.install, "--no-defaults", f"--datadir={self.data}", "--user=root",
                "--auth-root-authentication-method=normal", "--skip-test-db",
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        log = open(self.root / "log", "ab")  # noqa: SIM115 - handed to the server process
        self.process = subprocess.Popen(
            [
                self.server, "--no-defaults", f"--datadir={self.data}", "--user=root",
                f"--port={self.port}", "--bind-address=127.0.0.1",
                f"--socket={self.root / 'sock'}", f"--pid-file={self.root / 'pid'}",
                "--skip-grant-tables", "--skip-name-resolve", "--skip-log-bin",
                "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=2", "--performance-schema=OFF",
                "--max-connections=60",
            ],
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        _wait_port(self.port, 60)

    def shutdown(self) -> None:
        """``mysqladmin shutdown``: the server finishes what it is doing and stops."""
        subprocess.run(
            [self.admin, "-h127.0.0.1", f"-P{self.port}", "-uroot", "shutdown"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        if self.process is not None:
            self.process.wait(timeout=60)
        _wait_closed(self.port, 10)

    def kill(self) -> None:
        """``SIGKILL``: the server process ends at once, as in a crash."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        _wait_closed(self.port, 10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(Exception):
                self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A Redis server of our own, with every write appended and fsynced before its reply."""

    def __init__(self, *, cluster: bool = False, options: tuple[str, ...] = ()) -> None:
        self.binary = find_binary("redis-server")
        self.options = options
        # A cluster node also listens on its port + 10000 (the cluster bus).
        self.port = free_port(below=55000) if cluster else free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raptor_db_redis_"))
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster = cluster

    def start(self) -> None:
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.root), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--logfile", str(self.root / "log"),
                *(cluster if self.cluster else []), *self.options,
            ],
        )  # fmt: skip
        _wait_port(self.port, 30)
        if self.cluster and not self.options:
            self._serve_every_slot()

    def _command(self, *parts: bytes) -> bytes:
        request = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
        )
        with socket.create_connection(("127.0.0.1", self.port), 5) as sock:
            sock.sendall(request)
            reply = sock.recv(65536)
            if reply.startswith(b"$") and b"\r\n" in reply:  # a bulk string: all of it
                header = reply.partition(b"\r\n")[0]
                size = len(header) + 2 + max(int(header[1:]), 0) + 2
                while len(reply) < size and (more := sock.recv(65536)):
                    reply += more
            return reply

    def _serve_every_slot(self) -> None:
        """A cluster of one node: it serves all 16384 slots."""
        self._command(b"CLUSTER", b"ADDSLOTSRANGE", b"0", b"16383")
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in self._command(b"CLUSTER", b"INFO"):
            if time.monotonic() > deadline:
                raise TimeoutError("the one-node cluster never became ready")
            time.sleep(0.05)

    def shutdown_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``: no snapshot; what the append-only file holds is all there is."""
        with socket.create_connection(("127.0.0.1", self.port), 5) as sock:
            sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
            with contextlib.suppress(OSError):
                sock.recv(100)
        if self.process is not None:
            self.process.wait(timeout=30)
        _wait_closed(self.port, 10)

    def kill(self) -> None:
        """``SIGKILL``: the server ends at once, as in a crash (``start`` starts it again)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
        _wait_closed(self.port, 10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(Exception):
                self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateTwemproxy:
    """A twemproxy (Debian's ``nutcracker``) of our own in front of ``server``, one pool with
    that one server and ``auto_eject_hosts: false``.

    With the server down, twemproxy keeps every client link and answers each command at once
    with the error of its own connect, ``-ERR Connection refused``, on old links and new ones
    alike; the first command after the server is back is served. It supports no ``HELLO``
    and no ``CLIENT``, and closes the link of a client that sends one: a redis-py client
    needs ``protocol=2`` and no ``lib_name``/``lib_version``."""

    def __init__(self, server: PrivateRedis) -> None:
        self.binary = find_binary("nutcracker")
        self.server = server
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raptor_db_twemproxy_"))
        self._process: subprocess.Popen[bytes] | None = None
        (self.root / "nutcracker.yml").write_text(
            "raptor:\n"
            f"  listen: 127.0.0.1:{self.port}\n"
            "  redis: true\n"
            "  hash: fnv1a_64\n"
            "  distribution: ketama\n"
            "  timeout: 5000\n"
            "  auto_eject_hosts: false\n"
            "  servers:\n"
            f"   - 127.0.0.1:{server.port}:1\n"
        )

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self.binary, "-c", str(self.root / "nutcracker.yml"),
                "-o", str(self.root / "log"), "-s", str(free_port()),
                "-p", str(self.root / "pid"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port, 30)

    def close(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedisCluster:
    """A Redis cluster of our own: ``masters`` masters with ``replicas`` replicas each, made
    by ``redis-cli --cluster create``. A node that stops is noticed after ``node_timeout_ms``
    (a replica then takes its place); with ``full_coverage`` false the other masters keep
    serving their slots meanwhile, as a cluster configured so does."""

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        full_coverage: bool = False,
    ) -> None:
        self.cli = find_binary("redis-cli")
        options = (
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "yes" if full_coverage else "no",
            # A replica's first full sync starts at once, not after 5 s spent waiting for
            # more replicas to share it (``repl-diskless-sync-delay``).
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip
        self.replicas = replicas
        self.nodes = [
            PrivateRedis(cluster=True, options=options) for _ in range(masters * (1 + replicas))
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every running node says ``cluster_state:ok`` and every replica has
        synced with its master (one that never did cannot take its master's place)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            while b"cluster_state:ok" not in node._command(b"CLUSTER", b"INFO"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster never became ready")
                time.sleep(0.05)
            while True:
                replication = node._command(b"INFO", b"replication")
                if b"role:master" in replication or b"master_link_status:up" in replication:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("a replica never synced with its master")
                time.sleep(0.05)

    def node(self, port: int) -> PrivateRedis:
        return next(node for node in self.nodes if node.port == port)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
