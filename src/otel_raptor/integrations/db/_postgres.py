"""What the PostgreSQL drivers (psycopg, psycopg2, asyncpg) share: the server a connection
string points at, how far a failed call got (every driver carries the SQLSTATE), and the
default statement timeout."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any, Final

from otel_raptor.core.classification import Classification
from otel_raptor.core.db import FailurePoint, conflict_code
from otel_raptor.integrations.db._common import (
    DbTarget,
    Server,
    ended_by_server,
    is_not_sent,
    policy_timeout_ms,
)

__all__ = [
    "SYSTEM",
    "failure_point",
    "refine_statement_failure",
    "server",
    "server_of_params",
    "statement_timeout_query",
]

#: The semantic-convention ``db.system.name``.
SYSTEM: Final = "postgresql"
DEFAULT_PORT: Final = 5432
# SQLSTATEs after which the connection is gone: connection exceptions, and the server shutting
# the session down.
_GONE_PREFIX: Final = "08"
_GONE: Final = frozenset({"57P01", "57P02", "57P03", "57P05"})


def failure_point(
    error: BaseException, classification: Classification
) -> tuple[FailurePoint, bool]:
    """How far a failed PostgreSQL call got, and whether its connection can still send."""
    if is_not_sent(error):
        return FailurePoint.NOT_SENT, True
    if conflict_code(classification) is not None:
        return FailurePoint.ROLLED_BACK, True
    sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate.startswith(_GONE_PREFIX) or sqlstate in _GONE:
            return FailurePoint.UNKNOWN, False
        return FailurePoint.FAILED, True
    # No SQLSTATE: the client lost the connection (or found it closed), and the server's
    # answer, if any, never arrived.
    return FailurePoint.UNKNOWN, False


# The server ended the session: an administrator's ``pg_terminate_backend`` (a reaper of idle
# connections) or a shutdown (57P01), a crash of another backend (57P02). psycopg2 loses the
# server's message, and with it the SQLSTATE: its "server closed the connection unexpectedly"
# is also what a network or a proxy cutting connections says, which must count.
_ENDED_SQLSTATES: Final = frozenset({"57P01", "57P02"})


def refine_statement_failure(
    error: BaseException, classification: Classification
) -> Classification:
    """A statement (never a connect) that finds its session ended by the server counts
    against the breaker only once a failed reconnect confirms it (``ended_by_server``): a
    server shutting down or restarting fails the reconnects that follow; one that reaped an
    idle session accepts them."""
    if classification.code in _ENDED_SQLSTATES:
        return ended_by_server(classification, "pg.session_ended")
    return classification


def _port(value: object) -> int | None:
    try:
        return int(str(value).split(",")[0])
    except (TypeError, ValueError):
        return None


def server(host: str | None, port: object, database: str | None) -> Server:
    """A PostgreSQL server; host names are compared in lower case, socket paths as they are."""
    name = host or "localhost"
    if not name.startswith("/"):
        name = name.lower()
    return Server(SYSTEM, name, _port(port), database)


def server_of_params(params: Mapping[str, Any]) -> Server:
    """The server a libpq parameter mapping (completed by the ``PG*`` environment variables)
    points at. Only the host, port and database are read: never a password."""
    user = params.get("user") or os.environ.get("PGUSER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in this environment
            user = ""
    return server(
        str(params.get("host") or os.environ.get("PGHOST") or "localhost"),
        params.get("port") or os.environ.get("PGPORT") or DEFAULT_PORT,
        str(params.get("dbname") or params.get("database") or os.environ.get("PGDATABASE") or user),
    )


def statement_timeout_query(target: DbTarget) -> bytes | None:
    """The query that sets ``target``'s default statement timeout, or ``None`` (none set).

    One round trip, and only where nothing chose a timeout, not even ``0`` ("none", on
    purpose): the application (libpq ``options``, ``PGOPTIONS``: source ``client``), the role
    or the database (``ALTER ROLE``/``ALTER DATABASE ... SET statement_timeout``: ``user``,
    ``database``, ``database user``), the server's configuration (``configuration file``,
    ``command line``, ...). ``pg_settings`` tells these from PostgreSQL's built-in default
    (source ``default``); the value alone cannot, as an explicit ``0`` reads the same.
    """
    ms = policy_timeout_ms(target)
    if not ms:
        return None
    return (
        b"SELECT set_config('statement_timeout', '%dms', false) FROM pg_settings "
        b"WHERE name = 'statement_timeout' AND source = 'default'" % ms
    )
