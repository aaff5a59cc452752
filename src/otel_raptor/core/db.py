"""Database decisions, pure: may a failed call be replayed, and is a failed transaction a
conflict worth running again?

Two questions, answered without I/O, clock or driver imports (the integrations in
``otel_raptor.integrations.db`` and ``otel_raptor.db`` supply the facts):

**Statement level** (:func:`replay_safe_after`): after *this* failure, may the same call be
sent again on the same client? What the server did with it decides, and that depends on the
failure as much as on the call:

=============  ===========  ====================  =========================================
operation      transaction  failure               replayed
=============  ===========  ====================  =========================================
connect        any          any                   yes (nothing was executed)
batch          any          any                   never (``executemany``, a pipeline that
                                                  writes, a SQL ``CALL``: part of it may
                                                  have run, or been committed)
statement      open         any                   never (the whole transaction must be
                                                  redone: :func:`otel_raptor.db.run_transaction`)
statement      none         ``NOT_SENT``          yes, if the client can still send
statement      none         ``ROLLED_BACK``       yes (the server undid it and asks for a retry)
statement      none         ``TIMED_OUT``         never (it ran out of its time, and would
                                                  most likely run as long again)
statement      none         ``FAILED``            only a read-only statement
statement      none         ``UNKNOWN``           only a read-only statement, on a client
                                                  that can still send
=============  ===========  ====================  =========================================

"No transaction" means autocommit with no explicit transaction open *before* the call (a
driver in non-autocommit mode opens one implicitly, so its statements are never replayed).
A client "can still send" when its connection survived the failure (a server error, a
cancelled statement) or when it reconnects by itself (redis-py).

**Transaction level** (:func:`is_transaction_conflict`): a transaction that failed with a
serialization failure (``40001``), a deadlock (``40P01``, MySQL ``1213``), a lock wait
timeout (MySQL ``1205``) or a busy/locked SQLite database was rolled back by the server (or
is rolled back by the caller) and may be run again from the start. Nothing else is.
"""

from __future__ import annotations

import enum
from typing import Final

from otel_raptor.core.classification import Classification

__all__ = [
    "CONFLICT_MYSQL_ERRORS",
    "CONFLICT_SQLSTATES",
    "REDIS_NOT_EXECUTED",
    "REDIS_READ_ONLY_COMMANDS",
    "FailurePoint",
    "Operation",
    "conflict_code",
    "is_transaction_conflict",
    "redis_read_only",
    "replay_safe_after",
]


class Operation(str, enum.Enum):
    """What kind of call failed."""

    #: Opening a connection: nothing was executed, so it may always be tried again.
    CONNECT = "connect"
    #: One statement (or one Redis command, or a read-only pipeline).
    STATEMENT = "statement"
    #: Several statements sent as one call (``executemany``, a Redis pipeline that writes):
    #: when it fails, part of it may have been applied.
    BATCH = "batch"

    def __str__(self) -> str:
        return self.value


class FailurePoint(str, enum.Enum):
    """How far a failed call got, as far as the failure tells."""

    #: Nothing reached the server (the connection could not be opened, or was known dead
    #: before sending).
    NOT_SENT = "not_sent"
    #: The server refused or rolled the statement back and says a retry may succeed
    #: (serialization failure, deadlock, lock wait timeout, SQLite busy/locked, Redis
    #: ``LOADING``/``TRYAGAIN``/``MASTERDOWN``/``CLUSTERDOWN``).
    ROLLED_BACK = "rolled_back"
    #: The server answered with another error: in autocommit the statement had no effect, but
    #: it may fail the same way again (a statement timeout, a server error).
    FAILED = "failed"
    #: The call was sent and no answer came (connection lost, client-side timeout): the server
    #: may have acted on it.
    UNKNOWN = "unknown"
    #: The statement ran out of its time and was cancelled on the server (asyncpg's own
    #: ``timeout=``/``command_timeout``, the caller's statement timeout; SQLSTATE ``57014``): run
    #: again, it would most likely take as long, holding the caller that much longer again.
    TIMED_OUT = "timed_out"

    def __str__(self) -> str:
        return self.value


_CONNECT: Final = Operation.CONNECT
_BATCH: Final = Operation.BATCH
_NOT_SENT: Final = FailurePoint.NOT_SENT
_ROLLED_BACK: Final = FailurePoint.ROLLED_BACK
_TIMED_OUT: Final = FailurePoint.TIMED_OUT


def replay_safe_after(
    operation: Operation,
    failure: FailurePoint,
    *,
    in_transaction: bool,
    read_only: bool,
    can_send: bool,
) -> bool:
    """Whether a call that failed with ``failure`` may be sent again (the table above).

    ``in_transaction``: an explicit or implicit transaction was open before the call.
    ``read_only``: the call has no side effect (for SQL,
    :func:`~otel_raptor.core.replay.sql_replay_safe` outside a transaction; for Redis,
    :func:`redis_read_only`). ``can_send``: the client can send again after this failure
    (its connection survived, or it reconnects by itself).
    """
    if operation is _CONNECT:
        return True
    if operation is _BATCH or in_transaction or failure is _TIMED_OUT:
        return False
    if failure is _ROLLED_BACK:
        return True
    if not can_send:
        return False
    return failure is _NOT_SENT or read_only


#: SQLSTATEs of a transaction the server rolled back and that may succeed when run again:
#: ``serialization_failure`` and ``deadlock_detected``.
CONFLICT_SQLSTATES: Final = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error numbers of the same kind: ``ER_LOCK_DEADLOCK`` (the transaction was
#: rolled back) and ``ER_LOCK_WAIT_TIMEOUT`` (the statement was; the caller rolls back the rest).
CONFLICT_MYSQL_ERRORS: Final = frozenset({"1213", "1205"})
_SQLITE_CONFLICTS: Final = ("SQLITE_BUSY", "SQLITE_LOCKED")
# Python < 3.11 has no ``sqlite_errorname``: the classifier recognises busy/locked by message.
_SQLITE_RULES: Final = frozenset({"sqlite.busy", "sqlite.locked"})


def conflict_code(classification: Classification) -> str | None:
    """The SQLSTATE, MySQL error number or SQLite error name that makes ``classification`` a
    transaction conflict (see :func:`is_transaction_conflict`), else ``None``."""
    code = classification.code
    if code is not None:
        if code in CONFLICT_SQLSTATES or code in CONFLICT_MYSQL_ERRORS:
            return code
        if code.startswith(_SQLITE_CONFLICTS):
            return code
    if classification.rule in _SQLITE_RULES:
        return code or "SQLITE_BUSY"
    return None


def is_transaction_conflict(classification: Classification) -> bool:
    """Whether a transaction that failed so may be run again from its start: a serialization
    failure (``40001``), a deadlock (``40P01``, MySQL ``1213``), a lock wait timeout (MySQL
    ``1205``) or a busy or locked SQLite database. Any other failure is not a conflict."""
    return conflict_code(classification) is not None


#: Redis commands without side effects (upper case): replaying one cannot change data. A
#: command not listed here is treated as a write.
REDIS_READ_ONLY_COMMANDS: Final = frozenset(
    {
        "BITCOUNT", "BITPOS", "DBSIZE", "ECHO", "EXISTS", "EXPIRETIME", "GEODIST", "GEOHASH",
        "GEOPOS", "GEOSEARCH", "GET", "GETBIT", "GETRANGE", "HEXISTS", "HGET", "HGETALL",
        "HKEYS", "HLEN", "HMGET", "HRANDFIELD", "HSCAN", "HSTRLEN", "HVALS", "INFO", "KEYS",
        "LINDEX", "LLEN", "LPOS", "LRANGE", "MGET", "PEXPIRETIME", "PFCOUNT", "PING", "PTTL",
        "RANDOMKEY", "SCAN", "SCARD", "SDIFF", "SINTER", "SINTERCARD", "SISMEMBER",
        "SMEMBERS", "SMISMEMBER", "SRANDMEMBER", "SSCAN", "STRLEN", "SUBSTR", "SUNION", "TIME",
        "TTL", "TYPE", "XLEN", "XRANGE", "XREVRANGE", "ZCARD", "ZCOUNT", "ZDIFF", "ZINTER",
        "ZLEXCOUNT", "ZMSCORE", "ZRANDMEMBER", "ZRANGE", "ZRANGEBYLEX", "ZRANGEBYSCORE",
        "ZRANK", "ZREVRANGE", "ZREVRANGEBYLEX", "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCAN",
        "ZSCORE", "ZUNION",
    }
)  # fmt: skip

#: redis-py exception classes (qualified names) for a reply meaning the command was not
#: executed and may succeed later: the server is loading its data, asks to try again, or has
#: lost its primary or its cluster.
REDIS_NOT_EXECUTED: Final = frozenset(
    {
        "redis.exceptions.BusyLoadingError",
        "redis.exceptions.TryAgainError",
        "redis.exceptions.MasterDownError",
        "redis.exceptions.ClusterDownError",
    }
)


def redis_read_only(command: object) -> bool:
    """Whether the Redis command named ``command`` (``str`` or ``bytes``, any case) has no side
    effect (:data:`REDIS_READ_ONLY_COMMANDS`)."""
    if isinstance(command, bytes):
        command = command.decode("latin-1")
    if not isinstance(command, str):
        return False
    return command in REDIS_READ_ONLY_COMMANDS or command.upper() in REDIS_READ_ONLY_COMMANDS
