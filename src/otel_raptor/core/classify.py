"""Error classification: one taxonomy for the failures of many libraries.

:meth:`Classifier.classify` turns any exception (``BaseException``: cancellation counts) into a
:class:`~otel_raptor.core.classification.Classification`, and :meth:`Classifier.classify_status`
does the same for an HTTP response status. Nothing here imports the libraries it knows about:
exceptions are recognised by the qualified names of the classes along their MRO and by the
signals they carry.

Signals read from each exception
    * class names: ``type.__module__ + "." + type.__qualname__`` for every class of the MRO, also
      spelled without private module segments (``httpx._exceptions.ConnectError`` is also
      ``httpx.ConnectError``; builtins are also bare, ``TimeoutError``);
    * an HTTP status (100-599) from ``exc.response.status_code`` (requests, httpx),
      ``exc.response.status``, ``exc.status`` (aiohttp, ``urllib.error.HTTPError``) or
      ``exc.status_code``; only integers count;
    * a SQLSTATE from ``exc.sqlstate`` (psycopg 3, asyncpg, PyMySQL) or ``exc.pgcode`` (psycopg2);
    * a MySQL error number, ``exc.args[0]``, for PyMySQL and MySQLdb exceptions;
    * ``errno`` for ``OSError`` (except ``ssl.SSLError``, whose ``errno`` is an OpenSSL code);
      for ``socket.gaierror`` and aiohttp's DNS error it is the ``EAI_*`` code;
    * the SQLite error name ``exc.sqlite_errorname`` (``SQLITE_BUSY``; Python 3.11+);
    * the message, ``str(exc)``, only for rules that ask for it.

The chain
    The exception is examined first, then what it wraps, breadth first: ``__cause__``, a
    ``reason`` attribute (urllib3 ``MaxRetryError``, ``urllib.error.URLError``), exceptions
    among its ``args`` (requests and httpcore wrap that way), then ``__context__`` unless it
    was suppressed with ``raise ... from None``. At most :data:`MAX_CHAIN` exceptions are
    looked at, each once (cycles are harmless).

Rules
    A :class:`Rule` is a record: matchers (class names, status codes, SQLSTATEs or SQLSTATE
    classes, MySQL error numbers, errnos, SQLite codes, a message regex) that must *all* match,
    and the category (plus optional ``retryable``/``severity`` overrides) they produce. The
    built-in table is :data:`BUILTIN_RULES`; ``docs/classification.md`` lists every rule.

Precedence, within one exception of the chain (the first of these wins)
    1. user rules registered with ``first=True``, newest first;
    2. *signal* rules: those that match a status, SQLSTATE, error number, errno or SQLite code,
       or a class name *and* a message (redis error prefixes); one naming a more derived class
       beats one naming a base class or none;
    3. *class* rules: the one naming the most derived class of the MRO;
    4. *message* rules (a regex and nothing else): the last resort.
    Ties go to the rule listed first (user rules registered with ``first=False`` come after
    the built-ins).

Precedence along the chain
    Each exception's winning rule has a strength: 4 for a user rule, 3 for a signal rule,
    2 for a class rule, 1 for a rule marked ``defer_to_cause`` (wrappers such as requests'
    ``ConnectionError`` or ``httpx.ConnectError``, whose cause knows better: DNS, TLS,
    refused), 0 for a message rule. The strongest wins; on a tie, the outermost exception
    wins. Nothing matched anywhere: ``unknown``.

What the verdict holds
    ``error_type`` is the HTTP status as a string (``"503"``) when the winning exception
    carries a status >= 400, else the outer exception's qualified class name (builtins bare:
    ``"TimeoutError"``; others ``"httpx.ConnectError"``). ``status_code`` and ``code`` come from
    the winning exception; ``code`` is the MySQL error number, else the SQLSTATE, else the
    SQLite error name, else the errno's symbolic name (``ECONNREFUSED``, ``EAI_AGAIN``).
    ``retry_after`` (seconds) comes from the winning exception's response headers
    (``Retry-After``, then rate-limit reset headers when rate-limited) or its numeric
    ``retry_after`` attribute (``CircuitOpenError``).

Severity
    Each category has a base severity (:data:`BASE_SEVERITY`): ``low`` for cancelled,
    client_error and query; ``medium`` for rate_limit, timeout, connection, dns, concurrency,
    unavailable, integrity and unknown; ``high`` for server_error, tls, authentication and
    authorization; ``critical`` for resource_exhausted. A rule may override it. The context
    then raises it one level for each of: ``recent_occurrences >= REPEAT_THRESHOLD`` (5),
    ``breaker_open``, ``critical``; capped at ``critical``.

Caching
    The verdict without context is cached per exception *shape*: the tuple of (class, status,
    SQLSTATE, MySQL number, errno, SQLite code) of every exception in the chain, plus which
    message rule matched where messages matter. Messages themselves are never keys. The cache
    holds ``cache_size`` shapes (default 1024) and is emptied when full or when the rules
    change. ``retry_after`` and the context are applied after the cache.

Pure: the wall clock is a parameter (``now_wall``), and nothing here reads it, sleeps or locks.
Classifying is safe from many threads; registering rules concurrently is not (the runtime
serialises it).
"""

from __future__ import annotations

import errno as _errno
import math
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.retry_after import HeaderSource, retry_after_from_headers
from otel_raptor.errors import ConfigError

__all__ = [
    "BASE_SEVERITY",
    "BUILTIN_RULES",
    "DEFAULT_CLASSIFIER",
    "DEFAULT_RETRYABLE",
    "MAX_CHAIN",
    "REPEAT_THRESHOLD",
    "Classifier",
    "ClassifyContext",
    "ContextLike",
    "Rule",
    "classify_status",
]

#: How many exceptions of a cause/context chain are examined at most.
MAX_CHAIN: Final = 8

#: ``recent_occurrences`` at or above this raises the severity one level.
REPEAT_THRESHOLD: Final = 5

_C = ErrorCategory

#: The severity a failure of each category starts from, before the context raises it.
BASE_SEVERITY: Final[Mapping[ErrorCategory, Severity]] = {
    _C.CANCELLED: Severity.LOW,
    _C.CLIENT_ERROR: Severity.LOW,
    _C.QUERY: Severity.LOW,
    _C.RATE_LIMIT: Severity.MEDIUM,
    _C.TIMEOUT: Severity.MEDIUM,
    _C.CONNECTION: Severity.MEDIUM,
    _C.DNS: Severity.MEDIUM,
    _C.CONCURRENCY: Severity.MEDIUM,
    _C.UNAVAILABLE: Severity.MEDIUM,
    _C.INTEGRITY: Severity.MEDIUM,
    _C.UNKNOWN: Severity.MEDIUM,
    _C.SERVER_ERROR: Severity.HIGH,
    _C.TLS: Severity.HIGH,
    _C.AUTHENTICATION: Severity.HIGH,
    _C.AUTHORIZATION: Severity.HIGH,
    _C.RESOURCE_EXHAUSTED: Severity.CRITICAL,
}

#: Whether a failure of each category is transient, unless its rule says otherwise
#: (``dns`` is retryable only for ``EAI_AGAIN``; ``resource_exhausted`` only for "too many
#: connections"; ``server_error`` is not for 501/505).
DEFAULT_RETRYABLE: Final[Mapping[ErrorCategory, bool]] = {
    _C.RATE_LIMIT: True,
    _C.TIMEOUT: True,
    _C.CONNECTION: True,
    _C.DNS: False,
    _C.TLS: False,
    _C.AUTHENTICATION: False,
    _C.AUTHORIZATION: False,
    _C.UNAVAILABLE: True,
    _C.SERVER_ERROR: True,
    _C.CLIENT_ERROR: False,
    _C.CONCURRENCY: True,
    _C.INTEGRITY: False,
    _C.QUERY: False,
    _C.RESOURCE_EXHAUSTED: False,
    _C.CANCELLED: False,
    _C.UNKNOWN: False,
}

# Rule groups (precedence within one exception) and strengths (along the chain); see the doc.
_USER = 4
_SIGNAL = 3
_CLASS = 2
_DEFERRED = 1
_MESSAGE = 0
_NOTHING = -1

_K = TypeVar("_K")
_V = TypeVar("_V")

_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_SQLSTATE_CLASS = re.compile(r"[0-9A-Z]{2}")


# -- rules --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One classification rule: matchers that must all match, and the verdict they give.

    ``name`` is reported as ``Classification.rule`` (keep it short and stable). Matchers, each
    optional but at least one required; within one matcher any listed value matches:

    * ``exception_types``: qualified class names matched along the MRO (``"httpx.ConnectError"``,
      ``"builtins.TimeoutError"`` or just ``"TimeoutError"``; private module segments such as
      ``_exceptions`` may be left out);
    * ``status_codes``: HTTP statuses (100-599);
    * ``sqlstates`` (5 characters) and ``sqlstate_classes`` (their first 2); when both are
      given, either may match;
    * ``mysql_errnos``: MySQL/MariaDB error numbers;
    * ``errnos``: ``OSError.errno`` values (``EAI_*`` codes for ``socket.gaierror``);
    * ``sqlite_codes``: SQLite error names, primary (``SQLITE_BUSY``) or extended
      (``SQLITE_CONSTRAINT_UNIQUE``);
    * ``message``: a regular expression searched (case-insensitively) in ``str(exc)``.

    ``retryable`` and ``severity`` override the category's defaults when set.
    ``live_refusal`` marks a refusal by a live downstream of calls its state cannot serve
    (full memory, read-only) while it serves others: never counted toward opening a breaker
    (see :attr:`Classification.live_refusal`).
    ``defer_to_cause`` marks a wrapper whose cause is the better witness: its match only
    counts when nothing in the chain matches a real rule (strength 1, see the module doc).
    """

    name: str
    category: ErrorCategory
    retryable: bool | None = None
    severity: Severity | None = None
    exception_types: tuple[str, ...] = ()
    status_codes: tuple[int, ...] = ()
    sqlstates: tuple[str, ...] = ()
    sqlstate_classes: tuple[str, ...] = ()
    mysql_errnos: tuple[int, ...] = ()
    errnos: tuple[int, ...] = ()
    sqlite_codes: tuple[str, ...] = ()
    message: str | None = None
    defer_to_cause: bool = False
    live_refusal: bool = False
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name: object = self.name  # typed str, but checked: rules come from user code
        if not isinstance(name, str) or not name:
            raise ConfigError("rule.name", self.name, "a non-empty string")
        try:
            object.__setattr__(self, "category", ErrorCategory(self.category))
        except ValueError:
            raise ConfigError(
                "rule.category", self.category, "an ErrorCategory or its value"
            ) from None
        if self.severity is not None:
            try:
                object.__setattr__(self, "severity", Severity(self.severity))
            except ValueError:
                raise ConfigError("rule.severity", self.severity, "a Severity or None") from None
        if self.retryable is not None and not isinstance(self.retryable, bool):
            raise ConfigError("rule.retryable", self.retryable, "True, False or None")
        if not isinstance(self.live_refusal, bool):
            raise ConfigError("rule.live_refusal", self.live_refusal, "True or False")
        self._normalise("exception_types", str, bool, "class names like 'a.B'")
        self._normalise("status_codes", int, lambda v: 100 <= v <= 599, "HTTP statuses 100-599")
        self._normalise("sqlstates", str, _SQLSTATE.fullmatch, "5-character SQLSTATEs")
        self._normalise(
            "sqlstate_classes", str, _SQLSTATE_CLASS.fullmatch, "2-character SQLSTATE classes"
        )
        self._normalise("mysql_errnos", int, lambda v: v > 0, "positive MySQL error numbers")
        self._normalise("errnos", int, lambda v: True, "integers")
        self._normalise(
            "sqlite_codes", str, lambda v: v.startswith("SQLITE_"), "names like 'SQLITE_BUSY'"
        )
        if self.message is not None:
            try:
                object.__setattr__(self, "_pattern", re.compile(self.message, re.IGNORECASE))
            except (re.error, TypeError):
                raise ConfigError(
                    "rule.message", self.message, "a valid regular expression"
                ) from None
        if not (self.exception_types or self.message is not None or self._has_signal()):
            raise ConfigError(f"rule {self.name}", "no matcher", "at least one matcher")

    def _normalise(
        self, key: str, kind: type, valid: Callable[[Any], object], allowed: str
    ) -> None:
        value = getattr(self, key)
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"rule.{key}", value, f"a tuple of {allowed}")
        items = tuple(value)
        for item in items:
            if not isinstance(item, kind) or isinstance(item, bool) or not valid(item):
                raise ConfigError(f"rule.{key}", item, allowed)
        object.__setattr__(self, key, items)

    def _has_signal(self) -> bool:
        return bool(
            self.status_codes
            or self.sqlstates
            or self.sqlstate_classes
            or self.mysql_errnos
            or self.errnos
            or self.sqlite_codes
        )

    @property
    def specificity(self) -> int:
        """3 for a signal rule (incl. class + message), 2 for a class rule, 0 for a message rule."""
        if self._has_signal() or (self.exception_types and self.message is not None):
            return _SIGNAL
        return _CLASS if self.exception_types else _MESSAGE

    @property
    def status_only(self) -> bool:
        """Whether a bare HTTP status (no exception) can satisfy this rule."""
        return bool(self.status_codes) and not (
            self.exception_types
            or self.message is not None
            or self.sqlstates
            or self.sqlstate_classes
            or self.mysql_errnos
            or self.errnos
            or self.sqlite_codes
        )


def _status(
    name: str, category: ErrorCategory, codes: Iterable[int], *, retryable: bool | None = None
) -> Rule:
    return Rule(
        name=f"http.{name}", category=category, status_codes=tuple(codes), retryable=retryable
    )


def _sqlstate(
    name: str,
    category: ErrorCategory,
    *codes: str,
    retryable: bool | None = None,
    live_refusal: bool = False,
) -> Rule:
    """Five characters: a SQLSTATE; two: a SQLSTATE class."""
    return Rule(
        name=f"sqlstate.{name}",
        category=category,
        sqlstates=tuple(c for c in codes if len(c) == 5),
        sqlstate_classes=tuple(c for c in codes if len(c) == 2),
        retryable=retryable,
        live_refusal=live_refusal,
    )


def _mysql(
    name: str,
    category: ErrorCategory,
    *errnos: int,
    retryable: bool | None = None,
    defer_to_cause: bool = False,
    live_refusal: bool = False,
) -> Rule:
    return Rule(
        name=f"mysql.{name}",
        category=category,
        mysql_errnos=errnos,
        retryable=retryable,
        defer_to_cause=defer_to_cause,
        live_refusal=live_refusal,
    )


def _sqlite(name: str, category: ErrorCategory, *codes: str) -> Rule:
    return Rule(name=f"sqlite.{name}", category=category, sqlite_codes=codes)


def _errno_rule(
    name: str,
    category: ErrorCategory,
    *names: str,
    types: tuple[str, ...] = (),
    retryable: bool | None = None,
) -> Rule | None:
    """A rule on the errno constants this platform has (errno, then ``socket.EAI_*``)."""
    values = tuple(
        v for n in names if isinstance(v := getattr(_errno, n, getattr(socket, n, None)), int)
    )
    if not values:
        return None
    return Rule(
        name=name, category=category, errnos=values, exception_types=types, retryable=retryable
    )


def _types(
    name: str,
    category: ErrorCategory,
    *types: str,
    message: str | None = None,
    retryable: bool | None = None,
    defer: bool = False,
    live_refusal: bool = False,
) -> Rule:
    return Rule(
        name=name,
        category=category,
        exception_types=types,
        message=message,
        retryable=retryable,
        defer_to_cause=defer,
        live_refusal=live_refusal,
    )


def _text(
    name: str, category: ErrorCategory, pattern: str, *, retryable: bool | None = None
) -> Rule:
    return Rule(name=f"text.{name}", category=category, message=pattern, retryable=retryable)


_GAI = ("socket.gaierror", "aiohttp.client_exceptions.ClientConnectorDNSError")
_PG_CONNECT = ("psycopg.OperationalError", "psycopg2.OperationalError")
_RESPONSE = "redis.exceptions.ResponseError"
_AIO = "aiohttp.client_exceptions."
_DNS_TEXT = (
    r"name or service not known|nodename nor servname|could not translate host name"
    r"|failed to resolve host|getaddrinfo failed|no address associated with hostname"
)

# The table is laid out by hand, one rule per entry; the formatter would stretch it fourfold.
# fmt: off
# raptor's own refusal. Its driver-flavoured subclasses inherit the driver's SQLSTATE (asyncpg's
# ``08000``) or carry its error number (PyMySQL's 2003), signals that would read as a lost
# connection, retryable: within the refusal it competes as a user rule does (registered
# ``first=True`` rules still win), so a refusal is never retried nor counted by a guard around
# the driver's code; along a chain of exceptions it is a class rule.
_CIRCUIT_OPEN: Final = _types(
    "circuit_open", _C.UNAVAILABLE, "otel_raptor.errors.CircuitOpenError", retryable=False
)

_TABLE: tuple[Rule | None, ...] = (
    # -- HTTP statuses ----------------------------------------------------------------------------
    _status("429", _C.RATE_LIMIT, (429,)),
    _status("timeout", _C.TIMEOUT, (408, 504)),
    _status("authentication", _C.AUTHENTICATION, (401, 407)),
    _status("403", _C.AUTHORIZATION, (403,)),
    _status("unavailable", _C.UNAVAILABLE, (502, 503)),
    # 501/505: the server does not support what this request asks for (a method, an HTTP
    # version), as a 405 would say: nothing about its health, so it never trips a breaker.
    _status("not_implemented", _C.CLIENT_ERROR, (501, 505), retryable=False),
    _status("5xx", _C.SERVER_ERROR, range(500, 600)),
    _status("4xx", _C.CLIENT_ERROR, range(400, 500)),
    # -- MySQL / MariaDB error numbers (listed before SQLSTATEs: PyMySQL carries both) ------------
    _mysql("integrity", _C.INTEGRITY,
           1022, 1048, 1062, 1169, 1216, 1217, 1451, 1452, 1557, 1586, 3819, 4025),
    _mysql("query", _C.QUERY,
           1049, 1050, 1051, 1052, 1054, 1060, 1061, 1064, 1091, 1109, 1146, 1149, 1305),
    _mysql("access_denied", _C.AUTHENTICATION, 1045),
    _mysql("privilege", _C.AUTHORIZATION, 1044, 1142, 1143, 1227, 1370),
    _mysql("deadlock", _C.CONCURRENCY, 1213),
    _mysql("lock_wait_timeout", _C.CONCURRENCY, 1205),
    _mysql("too_many_connections", _C.RESOURCE_EXHAUSTED, 1040, 1203, retryable=True),
    _mysql("user_limit", _C.RATE_LIMIT, 1226),
    _mysql("out_of_resources", _C.RESOURCE_EXHAUSTED, 1021, 1037, 1041),
    # One table at its size limit (a MEMORY or temporary table: 1114), one query out of its
    # sort buffer (1038): that table's or query's doing, not the server running out.
    _mysql("statement_limit", _C.QUERY, 1038, 1114),
    _mysql("timeout", _C.TIMEOUT, 1159, 1161),
    # The server stopped a statement that ran past its time limit (MariaDB max_statement_time,
    # MySQL max_execution_time): the same statement would most likely run as long again. The
    # limit is the caller's (as SQLite's interrupt): cancelled, and no sign the server is out.
    _mysql("statement_timeout", _C.CANCELLED, 1969, 3024, retryable=False),
    _mysql("server_shutdown", _C.UNAVAILABLE, 1053),
    # Read-only after a failover (--read-only, super_read_only, 1836 read-only mode): the
    # server still answers reads, so a refused write is not evidence of an outage.
    _mysql("read_only", _C.UNAVAILABLE, 1836, live_refusal=True),
    Rule(name="mysql.read_only_option", category=_C.UNAVAILABLE, mysql_errnos=(1290,),
         message=r"read.only", live_refusal=True),
    # 1290 names whichever option prevents the statement: --secure-file-priv refusing a
    # SELECT ... INTO OUTFILE or a LOAD DATA is the statement's doing, not the server's state.
    _mysql("option_prevents", _C.QUERY, 1290),
    # A Galera node not ready refuses everything.
    _mysql("node_not_ready", _C.UNAVAILABLE, 1047),
    # 4031 (MySQL 8.0.24+, ER_CLIENT_INTERACTION_TIMEOUT): the server's farewell to a session
    # idle past wait_timeout, as 1927 is a KILL's: the session is gone, the server is up.
    _mysql("connection_lost", _C.CONNECTION, 1152, 1158, 1160, 1927, 4031),
    _mysql("unknown_host", _C.DNS, 2005),
    # ProxySQL's own replies to a statement it could not take to any server of its hostgroup:
    # 9001 (ER_PROXYSQL_MAX_CONN_TIMEOUT, "Max connect timeout reached while reaching hostgroup
    # N after M ms") and 9002 (ER_PROXYSQL_MAX_CONN_FAILURES, "Max connect failure while
    # reaching hostgroup N"), sent while connecting to a backend: the statement never left the
    # proxy, whose link stays open. The proxy's failed connect, as a refused one of ours (the
    # PyMySQL integration marks it not sent). Not 9003-9007: a command ProxySQL does not
    # support, or a session locked on another hostgroup, are the session's own doing.
    _mysql("proxy_unreachable", _C.CONNECTION, 9001, 9002),
    # Client side "can't connect" / "lost": the OSError in __context__ tells refused/DNS/timeout.
    _mysql("connect", _C.CONNECTION, 2002, 2003, 2006, 2013, 2055, defer_to_cause=True),
    # What the statement itself brought on: SIGNAL (1644), a subquery of many rows (1242), a
    # column count (1136), an unknown variable (1193).
    _mysql("statement", _C.QUERY, 1136, 1193, 1242, 1644),
    # -- SQLSTATEs (PostgreSQL, and the standard classes) -----------------------------------------
    # A statement timeout or a cancel request: sent again, the statement would most likely run
    # as long again (or be cancelled again), holding a connection for another full timeout.
    # The limit or the cancel is the caller's: cancelled, and no sign the server is out.
    _sqlstate("query_canceled", _C.CANCELLED, "57014", retryable=False),
    _sqlstate("idle_in_transaction_timeout", _C.CANCELLED, "25P03"),  # the session's own limit
    # So is idle_session_timeout: the server ended a session left idle (a pool's stale
    # connection learns it on its next use); it is up and answering.
    _sqlstate("idle_session_timeout", _C.CANCELLED, "57P05"),
    _sqlstate("admin_shutdown", _C.CONNECTION, "57P01", "57P02"),
    _sqlstate("cannot_connect_now", _C.UNAVAILABLE, "57P03"),
    # The database was dropped under the session; the server's disk fails.
    _sqlstate("database_gone", _C.UNAVAILABLE, "57P04", "58030"),
    _sqlstate("transaction_integrity", _C.INTEGRITY, "40002"),
    _sqlstate("concurrency", _C.CONCURRENCY, "40001", "40P01", "55P03", "40"),
    _sqlstate("insufficient_privilege", _C.AUTHORIZATION, "42501"),
    _sqlstate("authentication", _C.AUTHENTICATION, "28"),
    _sqlstate("too_many_connections", _C.RESOURCE_EXHAUSTED, "53300", retryable=True),
    # A full disk refuses writes; reads go on.
    _sqlstate("disk_full", _C.RESOURCE_EXHAUSTED, "53100", live_refusal=True),
    # A limit the configuration sets on one statement or session (temp_file_limit): the
    # query's doing, like a statement timeout, not the server running out.
    _sqlstate("configuration_limit", _C.QUERY, "53400"),
    # Out of memory (53200) and the rest of class 53: not retried, read or write. Replaying a
    # write in autocommit would apply nothing twice (the ERROR rolled its implicit transaction
    # back), but it is no use: sent again at once, the statement meets the same shortage, and
    # a query that ran a backend out of memory, retried, may bring the kernel's OOM killer
    # onto the whole server.
    _sqlstate("insufficient_resources", _C.RESOURCE_EXHAUSTED, "53"),
    _sqlstate("connection", _C.CONNECTION, "08"),
    _sqlstate("integrity", _C.INTEGRITY, "23", "44"),
    _sqlstate("query", _C.QUERY, "42", "22", "0A", "3D", "3F", "25", "54"),
    _sqlstate("system_error", _C.SERVER_ERROR, "58"),
    # Every other class the server answers with is about the statement, the transaction or
    # the session it ran in, not about the server being reachable (psycopg raises some of
    # them as OperationalError, which alone would read as a lost connection).
    _sqlstate("statement", _C.QUERY, "09", "0B", "0F", "0L", "0P", "0Z", "20", "21", "24",
              "26", "27", "2B", "2D", "2F", "34", "38", "39", "3B", "45", "55", "72", "HV", "P0"),
    _sqlstate("internal_error", _C.SERVER_ERROR, "XX", "F0", retryable=False),
    # -- SQLite error names (Python 3.11+; older versions fall back to messages below) ------------
    _sqlite("busy", _C.CONCURRENCY, "SQLITE_BUSY", "SQLITE_LOCKED"),
    _sqlite("constraint", _C.INTEGRITY, "SQLITE_CONSTRAINT"),
    _sqlite("full", _C.RESOURCE_EXHAUSTED, "SQLITE_FULL", "SQLITE_NOMEM"),
    _sqlite("interrupt", _C.CANCELLED, "SQLITE_INTERRUPT"),
    # The database file cannot be opened, was moved or removed under an open connection, or
    # its disk fails: SQLite's "out".
    _sqlite("cantopen", _C.UNAVAILABLE,
            "SQLITE_CANTOPEN", "SQLITE_READONLY_DBMOVED", "SQLITE_IOERR"),
    # -- errno (OSError) --------------------------------------------------------------------------
    _errno_rule("dns.EAI_AGAIN", _C.DNS, "EAI_AGAIN", types=_GAI, retryable=True),
    _errno_rule("dns.not_found", _C.DNS, "EAI_NONAME", "EAI_NODATA", "EAI_FAIL",
                "EAI_ADDRFAMILY", types=_GAI),
    _errno_rule("errno.connection", _C.CONNECTION, "ECONNREFUSED", "ECONNRESET",
                "ECONNABORTED", "EPIPE", "ENOTCONN", "ESHUTDOWN", "EHOSTUNREACH",
                "ENETUNREACH", "ENETDOWN", "EHOSTDOWN", "ENETRESET"),
    _errno_rule("errno.ETIMEDOUT", _C.TIMEOUT, "ETIMEDOUT"),
    _errno_rule("errno.EADDRNOTAVAIL", _C.RESOURCE_EXHAUSTED, "EADDRNOTAVAIL", retryable=True),
    _errno_rule("errno.resources", _C.RESOURCE_EXHAUSTED,
                "EMFILE", "ENFILE", "ENOSPC", "ENOMEM", "EDQUOT", "ENOBUFS"),
    # -- redis error replies (redis-py maps some prefixes to classes and strips them) -------------
    _types("redis.max_clients", _C.RESOURCE_EXHAUSTED, "redis.exceptions.ConnectionError",
           _RESPONSE, message=r"max number of clients reached", retryable=True),
    _types("redis.WRONGTYPE", _C.QUERY, _RESPONSE, message=r"^WRONGTYPE\b"),
    _types("redis.NOPERM", _C.AUTHORIZATION, _RESPONSE, message=r"^NOPERM\b"),
    _types("redis.WRONGPASS", _C.AUTHENTICATION, _RESPONSE,
           message=r"^(WRONGPASS|NOAUTH)\b|invalid password"),
    # A server at maxmemory refuses writes (OOM), a replica refuses them (READONLY): reads go
    # on, so neither is evidence of an outage.
    _types("redis.OOM", _C.RESOURCE_EXHAUSTED, _RESPONSE, message=r"^OOM\b", live_refusal=True),
    _types("redis.READONLY", _C.UNAVAILABLE, _RESPONSE, message=r"^READONLY\b",
           live_refusal=True),
    # Replies saying the command was not executed. ``BUSY`` (a script or function holds the
    # server) has no class of its own in redis-py, and in a pipeline it comes annotated, the
    # command quoted as it is (line breaks included) and, by redis.asyncio, the reply as a
    # tuple (``('BUSY Redis is busy ...',)``): missed, an asyncio pipeline's BUSY was an
    # ordinary error reply, never sent again nor counted, where a sync one was both.
    _types("redis.LOADING", _C.UNAVAILABLE, _RESPONSE,
           message=r"^(Command # \d+ \((?s:.*)\) of pipeline caused error: (\(['\"])?)?"
                   r"(LOADING|BUSY|MASTERDOWN|TRYAGAIN|CLUSTERDOWN)\b"),
    # A proxy whose server cannot be reached (twemproxy) answers each command with the error
    # of its own connect, ``-ERR Connection refused``, and keeps the client's link: the
    # command was never forwarded, and the proxy's reconnect failed. In a pipeline each
    # command gets it, and redis-py annotates the first (redis.asyncio quotes the reply as a
    # tuple: ``('Connection refused',)``). A script's own error reply may read the same: the
    # redis integration tells them apart by the command (see there). Not ``Connection timed
    # out``: also a forwarded command's lost answer.
    _types("redis.proxy_unreachable", _C.CONNECTION, _RESPONSE,
           message=r"^(Command # \d+ \((?s:.*)\) of pipeline caused error: (\(')?)?"
                   r"(Connection refused|No route to host|Network is unreachable"
                   r"|Host is unreachable|Network is down|Host is down)(?(2)',\))$"),
    # -- psycopg / psycopg2 connection failures (no SQLSTATE; the message is all there is) --------
    _types("pg.dns_again", _C.DNS, *_PG_CONNECT,
           message=r"temporary failure in name resolution", retryable=True),
    _types("pg.dns", _C.DNS, *_PG_CONNECT, message=_DNS_TEXT),
    _types("pg.authentication", _C.AUTHENTICATION, *_PG_CONNECT,
           message=r"password authentication failed|no password supplied"
                   r"|role \"[^\"]*\" does not exist|authentication failed"),
    _types("pg.authorization", _C.AUTHORIZATION, *_PG_CONNECT, message=r"permission denied"),
    # 53300 (libpq gives psycopg no SQLSTATE for a failed connection): the server's limit, or
    # a role's or a database's CONNECTION LIMIT. Read as a plain connection failure, one
    # connect's retries alone opened the breaker of a server that serves everyone else.
    _types("pg.too_many_connections", _C.RESOURCE_EXHAUSTED, *_PG_CONNECT,
           message=r"too many clients|remaining connection slots are reserved"
                   r"|too many connections for (role|database)",
           retryable=True),
    _types("pg.unavailable", _C.UNAVAILABLE, *_PG_CONNECT,
           message=r"the database system is (starting up|shutting down|in recovery mode"
                   r"|not yet accepting connections)"),
    _types("pg.no_database", _C.QUERY, *_PG_CONNECT,
           message=r"database \"[^\"]*\" does not exist"),
    _types("pg.timeout", _C.TIMEOUT, *_PG_CONNECT, message=r"timeout expired|timed out"),
    _types("pg.tls", _C.TLS, *_PG_CONNECT, message=r"certificate verify failed|SSL error"),
    # -- sqlite3 messages -------------------------------------------------------------------------
    _types("sqlite.locked", _C.CONCURRENCY, "sqlite3.OperationalError",
           message=r"database( table| schema)? is locked|database is busy"),
    _types("sqlite.unopenable", _C.UNAVAILABLE, "sqlite3.OperationalError",
           message=r"unable to open database file"),
    _types("sqlite.query", _C.QUERY, "sqlite3.OperationalError",
           message=r"syntax error|no such (table|column|function|index|collation)"
                   r"|has no column named|incomplete input|ambiguous column|already exists"),
    # -- urllib3 retries exhausted on a status list -----------------------------------------------
    _types("urllib3.too_many_429", _C.RATE_LIMIT, "urllib3.exceptions.ResponseError",
           message=r"too many 429 error responses"),
    # -- class names: the standard library --------------------------------------------------------
    _types("cancelled", _C.CANCELLED, "asyncio.exceptions.CancelledError",
           "concurrent.futures._base.CancelledError"),
    _types("timeout", _C.TIMEOUT, "builtins.TimeoutError", "asyncio.exceptions.TimeoutError",
           "concurrent.futures._base.TimeoutError"),
    _types("connection", _C.CONNECTION, "builtins.ConnectionError",
           "asyncio.exceptions.IncompleteReadError", "http.client.IncompleteRead"),
    _types("dns", _C.DNS, "socket.gaierror", "socket.herror"),
    # The peer hung up mid-handshake: a dropped connection, not a certificate problem.
    _types("tls.eof", _C.CONNECTION, "ssl.SSLEOFError", "ssl.SSLZeroReturnError"),
    _types("tls", _C.TLS, "ssl.SSLError"),
    _types("memory", _C.RESOURCE_EXHAUSTED, "builtins.MemoryError"),
    _types("urllib.URLError", _C.CONNECTION, "urllib.error.URLError", defer=True),
    _CIRCUIT_OPEN,
    # -- requests ---------------------------------------------------------------------------------
    _types("requests.ConnectionError", _C.CONNECTION, "requests.exceptions.ConnectionError",
           "requests.exceptions.ProxyError", defer=True),
    _types("requests.SSLError", _C.TLS, "requests.exceptions.SSLError", defer=True),
    _types("requests.Timeout", _C.TIMEOUT, "requests.exceptions.Timeout",
           "requests.exceptions.ConnectTimeout"),
    _types("requests.ChunkedEncodingError", _C.CONNECTION,
           "requests.exceptions.ChunkedEncodingError"),
    _types("requests.RetryError", _C.UNAVAILABLE, "requests.exceptions.RetryError", defer=True),
    _types("requests.client_error", _C.CLIENT_ERROR, "requests.exceptions.TooManyRedirects",
           "requests.exceptions.InvalidURL", "requests.exceptions.MissingSchema",
           "requests.exceptions.InvalidSchema", "requests.exceptions.URLRequired",
           "requests.exceptions.InvalidHeader"),
    # -- urllib3 ----------------------------------------------------------------------------------
    _types("urllib3.wrapper", _C.CONNECTION, "urllib3.exceptions.MaxRetryError",
           "urllib3.exceptions.NewConnectionError", "urllib3.exceptions.ProtocolError",
           "urllib3.exceptions.ProxyError", defer=True),
    _types("urllib3.NameResolutionError", _C.DNS, "urllib3.exceptions.NameResolutionError"),
    _types("urllib3.timeout", _C.TIMEOUT, "urllib3.exceptions.TimeoutError"),
    _types("urllib3.SSLError", _C.TLS, "urllib3.exceptions.SSLError", defer=True),
    _types("urllib3.IncompleteRead", _C.CONNECTION, "urllib3.exceptions.IncompleteRead",
           "urllib3.exceptions.InvalidChunkLength"),
    _types("urllib3.EmptyPoolError", _C.RESOURCE_EXHAUSTED,
           "urllib3.exceptions.EmptyPoolError", retryable=True),
    _types("urllib3.ResponseError", _C.UNAVAILABLE, "urllib3.exceptions.ResponseError"),
    _types("urllib3.LocationValueError", _C.CLIENT_ERROR,
           "urllib3.exceptions.LocationValueError"),
    # -- httpx / httpcore / h11 -------------------------------------------------------------------
    _types("httpx.timeout", _C.TIMEOUT, "httpx.TimeoutException", "httpcore.TimeoutException"),
    _types("httpx.network", _C.CONNECTION, "httpx.NetworkError", "httpx.ProxyError",
           "httpcore.NetworkError", "httpcore.ProxyError", defer=True),
    _types("httpx.RemoteProtocolError", _C.CONNECTION, "httpx.RemoteProtocolError",
           "httpcore.RemoteProtocolError", "h11.RemoteProtocolError"),
    _types("httpx.client_error", _C.CLIENT_ERROR, "httpx.LocalProtocolError",
           "httpx.UnsupportedProtocol", "httpx.InvalidURL", "httpx.TooManyRedirects",
           "httpcore.LocalProtocolError", "httpcore.UnsupportedProtocol"),
    # -- aiohttp ----------------------------------------------------------------------------------
    _types("aiohttp.connection", _C.CONNECTION, _AIO + "ClientConnectionError",
           _AIO + "ClientOSError", _AIO + "ClientConnectorError",
           _AIO + "ServerConnectionError", defer=True),
    _types("aiohttp.dns", _C.DNS, _AIO + "ClientConnectorDNSError"),
    _types("aiohttp.tls", _C.TLS, _AIO + "ClientSSLError", _AIO + "ServerFingerprintMismatch"),
    _types("aiohttp.timeout", _C.TIMEOUT, _AIO + "ServerTimeoutError"),
    _types("aiohttp.disconnected", _C.CONNECTION, _AIO + "ServerDisconnectedError",
           _AIO + "ClientPayloadError", _AIO + "ClientConnectionResetError"),
    _types("aiohttp.client_error", _C.CLIENT_ERROR, _AIO + "InvalidURL",
           _AIO + "TooManyRedirects", _AIO + "NonHttpUrlClientError"),
    # -- PostgreSQL drivers -----------------------------------------------------------------------
    _types("psycopg.ConnectionTimeout", _C.TIMEOUT, "psycopg.errors.ConnectionTimeout"),
    _types("pg.OperationalError", _C.CONNECTION, *_PG_CONNECT, defer=True),
    # The drivers' own checks, made in the client (a closed cursor or connection): the app's
    # doing, never a sign that the server is unwell. (PyMySQL's InterfaceError(0, '') is also
    # what a connection lost earlier says on its next use; that loss counted when it
    # happened, and new connections to a dead server count by themselves.)
    _types("dbapi.InterfaceError", _C.CLIENT_ERROR, "psycopg.InterfaceError",
           "psycopg2.InterfaceError", "pymysql.err.InterfaceError", "sqlite3.InterfaceError"),
    # psycopg's own check of the same kind, raised as an OperationalError: what a connection
    # the app closed, or lost earlier, says on its next use (psycopg2 says it with an
    # InterfaceError). Counted, a worker looping on its dead connection kept a healthy
    # server's breaker open for every caller.
    _types("psycopg.connection_closed", _C.CLIENT_ERROR, "psycopg.OperationalError",
           message=r"^the connection is closed$"),
    # asyncpg's own checks, made in the client before anything is sent (another operation in
    # progress on the connection, a closed connection, a bad argument): the app's doing, and
    # never a sign that the server is unwell.
    _types("asyncpg.DataError", _C.QUERY, "asyncpg.exceptions.DataError"),
    _types("asyncpg.client_error", _C.CLIENT_ERROR, "asyncpg.exceptions.InterfaceError",
           "asyncpg.exceptions.InternalClientError"),
    # -- DB-API classes (psycopg, psycopg2, PyMySQL, sqlite3) -------------------------------------
    _types("dbapi.IntegrityError", _C.INTEGRITY, "psycopg.IntegrityError",
           "psycopg2.IntegrityError", "pymysql.err.IntegrityError", "sqlite3.IntegrityError"),
    _types("dbapi.ProgrammingError", _C.QUERY, "psycopg.ProgrammingError",
           "psycopg2.ProgrammingError", "pymysql.err.ProgrammingError",
           "sqlite3.ProgrammingError", "psycopg.DataError", "psycopg2.DataError",
           "pymysql.err.DataError", "sqlite3.DataError"),
    # -- redis classes ----------------------------------------------------------------------------
    _types("redis.AuthenticationError", _C.AUTHENTICATION,
           "redis.exceptions.AuthenticationError",
           "redis.exceptions.AuthenticationWrongNumberOfArgsError"),
    _types("redis.NoPermissionError", _C.AUTHORIZATION, "redis.exceptions.AuthorizationError",
           "redis.exceptions.NoPermissionError"),
    _types("redis.unavailable", _C.UNAVAILABLE, "redis.exceptions.BusyLoadingError",
           "redis.exceptions.MasterDownError", "redis.exceptions.ClusterDownError",
           "redis.exceptions.TryAgainError"),
    _types("redis.ReadOnlyError", _C.UNAVAILABLE, "redis.exceptions.ReadOnlyError",
           live_refusal=True),
    _types("redis.OutOfMemoryError", _C.RESOURCE_EXHAUSTED, "redis.exceptions.OutOfMemoryError",
           live_refusal=True),
    _types("redis.MaxConnectionsError", _C.RESOURCE_EXHAUSTED,
           "redis.exceptions.MaxConnectionsError", retryable=True),
    _types("redis.TimeoutError", _C.TIMEOUT, "redis.exceptions.TimeoutError"),
    _types("redis.ConnectionError", _C.CONNECTION, "redis.exceptions.ConnectionError",
           defer=True),
    _types("redis.WatchError", _C.CONCURRENCY, "redis.exceptions.WatchError"),
    _types("redis.ResponseError", _C.QUERY, _RESPONSE, "redis.exceptions.DataError"),
    # -- messages alone: the last resort ----------------------------------------------------------
    _text("rate_limit", _C.RATE_LIMIT, r"too many requests|rate[ _-]?limit|throttl"),
    _text("locked", _C.CONCURRENCY, r"database( table)? is locked|deadlock"),
    _text("too_many_connections", _C.RESOURCE_EXHAUSTED,
          r"too many (connections|clients)|max(imum)? number of clients", retryable=True),
    _text("dns_again", _C.DNS, r"temporary failure in name resolution", retryable=True),
    _text("dns", _C.DNS, _DNS_TEXT),
    _text("tls", _C.TLS, r"certificate verify failed|wrong version number|ssl handshake"),
    _text("connection", _C.CONNECTION,
          r"connection (refused|reset|aborted)|broken pipe|remote end closed"
          r"|server disconnected"),
    _text("timeout", _C.TIMEOUT, r"\btime(d)?[ _-]?out\b"),
    _text("unavailable", _C.UNAVAILABLE, r"service unavailable|temporarily unavailable"),
)
# fmt: on

#: The built-in rules, in tie-break order (the module doc says how they combine; the docs
#: list them by category).
BUILTIN_RULES: Final[tuple[Rule, ...]] = tuple(r for r in _TABLE if r is not None)


# -- context ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassifyContext:
    """What the caller knows beyond the exception, used to raise the severity.

    ``service`` names the downstream (informational); ``critical`` marks it as one the
    application cannot do without; ``breaker_open`` says its circuit breaker is open;
    ``recent_occurrences`` (>= 0) counts failures of the same category in the caller's recent
    window. See the module doc for the rule.
    """

    service: str | None = None
    critical: bool = False
    breaker_open: bool = False
    recent_occurrences: int = 0

    def __post_init__(self) -> None:
        if self.service is not None and not isinstance(self.service, str):
            raise ConfigError("context.service", self.service, "a string or None")
        if not isinstance(self.critical, bool):
            raise ConfigError("context.critical", self.critical, "True or False")
        if not isinstance(self.breaker_open, bool):
            raise ConfigError("context.breaker_open", self.breaker_open, "True or False")
        count: object = self.recent_occurrences
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(
                "context.recent_occurrences", self.recent_occurrences, "an integer >= 0"
            )

    @property
    def severity_steps(self) -> int:
        """How many levels this context raises a severity (0-3)."""
        return (self.recent_occurrences >= REPEAT_THRESHOLD) + self.breaker_open + self.critical

    @classmethod
    def coerce(cls, context: ContextLike) -> ClassifyContext | None:
        """``context`` as a :class:`ClassifyContext`; a mapping uses the field names as keys.

        Raises :class:`~otel_raptor.errors.ConfigError` on an unknown key or a bad value.
        """
        if context is None or isinstance(context, ClassifyContext):
            return context
        if not isinstance(context, Mapping):
            raise ConfigError("context", context, "a ClassifyContext, a mapping or None")
        try:
            return cls(**context)  # type: ignore[arg-type]  # values are checked in __post_init__
        except TypeError:  # an unknown (or non-string) key
            unknown = sorted(map(str, set(context) - _CONTEXT_KEYS))
            raise ConfigError("context", unknown, f"keys among {_CONTEXT_NAMES}") from None


_CONTEXT_KEYS = frozenset(f.name for f in fields(ClassifyContext))
_CONTEXT_NAMES = ", ".join(sorted(_CONTEXT_KEYS))

#: What ``context=`` accepts: a :class:`ClassifyContext`, a mapping with its field names, or None.
ContextLike = ClassifyContext | Mapping[str, object] | None


# -- the engine ---------------------------------------------------------------------------------

# A shape: (class, HTTP status, SQLSTATE, MySQL error number, errno, SQLite error name).
_Shape = tuple[type, int | None, str | None, int | None, int | None, str | None]


@dataclass(frozen=True, slots=True)
class _Entry:
    """A rule in the classifier's order, with what the precedence needs precomputed."""

    rule: Rule
    position: int
    group: int
    strength: int
    retryable: bool
    severity: Severity


@dataclass(frozen=True, slots=True)
class _TypeInfo:
    names: Mapping[str, int]  # qualified name (every spelling) -> position in the MRO
    depth: int
    error_type: str
    has_errno: bool
    gai_errno: bool
    mysql: bool
    sqlite: bool
    plain: bool  # only standard-library classes: no response, SQLSTATE or reason to look for


@dataclass(frozen=True, slots=True)
class _LinkPlan:
    """For one shape: message rules to try in order, then the rule that wins without them."""

    candidates: tuple[_Entry, ...]
    fallback: _Entry | None
    max_strength: int


@dataclass(slots=True)
class _ChainPlan:
    links: tuple[_LinkPlan, ...]
    fixed: tuple[Classification, int] | None = None
    by_choice: dict[tuple[int, int], Classification] = field(default_factory=dict)


@dataclass(slots=True)
class _State:
    entries: tuple[_Entry, ...]
    user_first: tuple[Rule, ...]
    builtin: tuple[Rule, ...]
    user_last: tuple[Rule, ...]
    status_entries: tuple[_Entry, ...]
    chains: dict[tuple[_Shape, ...], _ChainPlan] = field(default_factory=dict)
    links: dict[_Shape, _LinkPlan] = field(default_factory=dict)
    statuses: dict[int, Classification] = field(default_factory=dict)
    raised: dict[tuple[int, int], tuple[Classification, Classification]] = field(
        default_factory=dict
    )


class Classifier:
    """Classifies exceptions and HTTP statuses with a list of rules (see the module doc).

    ``rules`` are the built-in rules (default :data:`BUILTIN_RULES`); ``cache_size`` (>= 1,
    default 1024) bounds each cache. Thread-safe for classifying; serialise ``register_rule``
    and ``remove_rule`` calls yourself (the runtime's functions do).
    """

    __slots__ = ("_cache_size", "_state", "_types")

    def __init__(self, rules: Iterable[Rule] = BUILTIN_RULES, *, cache_size: int = 1024) -> None:
        size: object = cache_size
        if not isinstance(size, int) or isinstance(size, bool) or cache_size < 1:
            raise ConfigError("classifier.cache_size", cache_size, "an integer >= 1")
        builtin = tuple(rules)
        for rule in builtin:
            if not isinstance(rule, Rule):
                raise ConfigError("classifier.rules", rule, "Rule instances")
        self._cache_size = cache_size
        self._types: dict[type, _TypeInfo] = {}
        self._state = self._build((), builtin, ())

    # -- rules -----------------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule in tie-break order: user rules (``first=True``), built-ins, user rules."""
        state = self._state
        return state.user_first + state.builtin + state.user_last

    def register_rule(self, rule: Rule, *, first: bool = True) -> None:
        """Add ``rule`` and empty the caches.

        ``first=True`` (default): the rule beats every built-in and every earlier user rule,
        wherever it matches in the chain. ``first=False``: the rule competes like a built-in of
        its specificity and loses ties to them (a fallback for your own exception types).
        """
        if not isinstance(rule, Rule):
            raise ConfigError("register_rule.rule", rule, "a Rule")
        state = self._state
        if first:
            self._state = self._build((rule, *state.user_first), state.builtin, state.user_last)
        else:
            self._state = self._build(state.user_first, state.builtin, (*state.user_last, rule))

    def remove_rule(self, rule: Rule) -> bool:
        """Remove a rule added with :meth:`register_rule`; ``False`` if it was not there."""
        state = self._state
        first = tuple(r for r in state.user_first if r is not rule)
        last = tuple(r for r in state.user_last if r is not rule)
        if len(first) + len(last) == len(state.user_first) + len(state.user_last):
            return False
        self._state = self._build(first, state.builtin, last)
        return True

    @property
    def cached_shapes(self) -> int:
        """How many exception shapes the verdict cache holds now."""
        return len(self._state.chains)

    def _build(
        self, user_first: tuple[Rule, ...], builtin: tuple[Rule, ...], user_last: tuple[Rule, ...]
    ) -> _State:
        entries: list[_Entry] = []
        for position, rule in enumerate((*user_first, *builtin, *user_last)):
            group = (
                _USER if position < len(user_first) or rule is _CIRCUIT_OPEN else rule.specificity
            )
            strength = _DEFERRED if rule.defer_to_cause and group != _USER else group
            if rule is _CIRCUIT_OPEN:
                # Along the chain, a class rule: an error the app raised while it handled a
                # refusal (its fallback's own timeout) carries it as context, and is that error.
                strength = _CLASS
            retryable = rule.retryable
            if retryable is None:
                retryable = DEFAULT_RETRYABLE[rule.category]
            severity = rule.severity or BASE_SEVERITY[rule.category]
            entries.append(_Entry(rule, position, group, strength, retryable, severity))
        status_entries = tuple(e for e in entries if e.rule.status_only)
        return _State(tuple(entries), user_first, builtin, user_last, status_entries)

    # -- classification --------------------------------------------------------------------------

    def classify(
        self, exc: BaseException, *, now_wall: float, context: ContextLike = None
    ) -> Classification:
        """The verdict on ``exc``; ``now_wall`` is the Unix time in seconds (for HTTP dates).

        ``context`` (a :class:`ClassifyContext` or a mapping of its fields) only raises the
        severity. Never raises for odd exceptions; raises ``ConfigError`` for a bad context.
        """
        ctx = None if context is None else ClassifyContext.coerce(context)
        state = self._state
        links, shapes = self._walk(exc)
        plan = state.chains.get(shapes)
        if plan is None:
            plan = self._plan_chain(state, shapes)
        if plan.fixed is not None:
            base, winner = plan.fixed
        else:
            base, winner = self._resolve(state, plan, links, shapes)
        info = self._types.get(shapes[winner][0])
        if ctx is None and base.status_code is None and info is not None and info.plain:
            return base  # nothing left to add: no response, no retry_after attribute, no context
        retry_after = _retry_after_of(base, links[winner], now_wall)
        return _adjust(state, base, retry_after, ctx, self._cache_size)

    def classify_status(
        self,
        status_code: int,
        headers: HeaderSource | None = None,
        *,
        now_wall: float,
        context: ContextLike = None,
    ) -> Classification | None:
        """The verdict on an HTTP response with ``status_code``; ``None`` below 400.

        Only rules that need nothing but a status apply. ``error_type`` is the status as a
        string; ``retry_after`` comes from ``headers`` (see :mod:`.retry_after`).
        """
        ctx = ClassifyContext.coerce(context)
        if status_code < 400:
            return None
        state = self._state
        base = state.statuses.get(status_code)
        if base is None:
            base = self._status_verdict(state, status_code)
        retry_after = retry_after_from_headers(
            headers, now_wall=now_wall, rate_limited=base.category is _C.RATE_LIMIT
        )
        return _adjust(state, base, retry_after, ctx, self._cache_size)

    def _status_verdict(self, state: _State, status_code: int) -> Classification:
        best: _Entry | None = None
        for entry in state.status_entries:
            if status_code in entry.rule.status_codes and (
                best is None or (entry.group, -entry.position) > (best.group, -best.position)
            ):
                best = entry
        base = _verdict(best, str(status_code), status_code, None)
        _store(state.statuses, status_code, base, self._cache_size)
        return base

    # -- shapes and plans ------------------------------------------------------------------------

    def _type_info(self, cls: type) -> _TypeInfo:
        info = self._types.get(cls)
        if info is not None:
            return info
        names: dict[str, int] = {}
        for depth, klass in enumerate(cls.__mro__):
            if klass is object:
                continue
            for name in _spellings(klass):
                names.setdefault(name, depth)
        info = _TypeInfo(
            names=names,
            depth=len(cls.__mro__),
            error_type=_error_type(cls),
            has_errno=issubclass(cls, OSError) and "ssl.SSLError" not in names,
            gai_errno=any(n in names for n in _GAI),
            mysql=any(n in names for n in _MYSQL_FAMILIES),
            sqlite="sqlite3.Error" in names,
            plain=all(
                str(getattr(k, "__module__", "")) in _PLAIN_MODULES
                for k in cls.__mro__
                if k is not object
            ),
        )
        if len(self._types) >= self._cache_size:
            self._types.clear()
        self._types[cls] = info
        return info

    def _walk(self, exc: BaseException) -> tuple[list[BaseException], tuple[_Shape, ...]]:
        """The chain (see the module doc) and the shape of each exception in it."""
        types = self._types
        links = [exc]
        shapes: list[_Shape] = []
        seen: set[int] | None = None
        index = 0
        while index < len(links):
            current = links[index]
            index += 1
            cls = type(current)
            info = types.get(cls)
            if info is None:
                info = self._type_info(cls)
            shapes.append(_shape(current, cls, info))
            if len(links) >= MAX_CHAIN:
                continue
            children = _children(current, info)
            if not children:
                continue
            if seen is None:
                seen = {id(link) for link in links}
            for child in children:
                if id(child) not in seen and len(links) < MAX_CHAIN:
                    seen.add(id(child))
                    links.append(child)
        return links, tuple(shapes)

    def _plan_link(self, state: _State, shape: _Shape) -> _LinkPlan:
        plan = state.links.get(shape)
        if plan is not None:
            return plan
        info = self._types.get(shape[0]) or self._type_info(shape[0])
        ranked: list[tuple[tuple[int, int, int], _Entry]] = []
        for entry in state.entries:
            depth = _match(entry.rule, info, shape)
            if depth is not None:
                mro_rank = 0 if entry.group in (_USER, _MESSAGE) else -depth
                ranked.append(((entry.group, mro_rank, -entry.position), entry))
        ranked.sort(key=lambda item: item[0], reverse=True)
        candidates: list[_Entry] = []
        fallback: _Entry | None = None
        for _, entry in ranked:
            if entry.rule.message is None:
                fallback = entry
                break
            candidates.append(entry)
        strengths = [e.strength for e in candidates]
        if fallback is not None:
            strengths.append(fallback.strength)
        plan = _LinkPlan(tuple(candidates), fallback, max(strengths, default=_NOTHING))
        _store(state.links, shape, plan, self._cache_size)
        return plan

    def _plan_chain(self, state: _State, shapes: tuple[_Shape, ...]) -> _ChainPlan:
        plan = _ChainPlan(tuple(self._plan_link(state, shape) for shape in shapes))
        # Decide without messages if possible: then the verdict is fixed for this shape.
        winner, entry, needs_message = _pick(plan.links, None)
        if not needs_message:
            plan.fixed = (_verdict_for(state, shapes, winner, entry, self._types), winner)
        _store(state.chains, shapes, plan, self._cache_size)
        return plan

    def _resolve(
        self,
        state: _State,
        plan: _ChainPlan,
        links: list[BaseException],
        shapes: tuple[_Shape, ...],
    ) -> tuple[Classification, int]:
        winner, entry, _ = _pick(plan.links, links)
        choice = (winner, entry.position if entry is not None else -1)
        base = plan.by_choice.get(choice)
        if base is None:
            base = _verdict_for(state, shapes, winner, entry, self._types)
            if len(plan.by_choice) < 64:  # bounded by the rules that can match; a safety cap
                plan.by_choice[choice] = base
        return base, winner


def _store(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    # Emptying a full cache is cheaper than LRU bookkeeping on every hit, and shapes are few.
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _pick(
    plans: tuple[_LinkPlan, ...], links: list[BaseException] | None
) -> tuple[int, _Entry | None, bool]:
    """(winning link index, its entry or None, whether a message has to be read).

    With ``links=None`` this only finds out whether messages are needed: it stops at the first
    message rule it would have to try.
    """
    best_index, best_entry, best_strength = 0, None, _NOTHING
    for index, plan in enumerate(plans):
        if plan.max_strength <= best_strength:
            continue  # even its best rule cannot beat an outer exception's match
        entry = plan.fallback
        if plan.candidates:
            if links is None:
                return 0, None, True
            message = _message_of(links[index])
            for candidate in plan.candidates:
                pattern = candidate.rule._pattern
                if pattern is not None and pattern.search(message):
                    entry = candidate
                    break
        if entry is not None and entry.strength > best_strength:
            best_index, best_entry, best_strength = index, entry, entry.strength
    return best_index, best_entry, False


def _verdict_for(
    state: _State,
    shapes: tuple[_Shape, ...],
    winner: int,
    entry: _Entry | None,
    types: Mapping[type, _TypeInfo],
) -> Classification:
    shape = shapes[winner]
    status = shape[1]
    outer = types.get(shapes[0][0])
    error_type = outer.error_type if outer is not None else _error_type(shapes[0][0])
    if status is not None and status >= 400:
        error_type = str(status)
    info = types.get(shape[0])
    return _verdict(entry, error_type, status, _code_of(shape, info))


def _verdict(
    entry: _Entry | None, error_type: str, status: int | None, code: str | None
) -> Classification:
    if entry is None:
        return Classification(
            category=_C.UNKNOWN,
            severity=BASE_SEVERITY[_C.UNKNOWN],
            retryable=False,
            error_type=error_type,
            status_code=status,
            code=code,
            rule="",
        )
    return Classification(
        category=entry.rule.category,
        severity=entry.severity,
        retryable=entry.retryable,
        error_type=error_type,
        status_code=status,
        code=code,
        rule=entry.rule.name,
        live_refusal=entry.rule.live_refusal,
    )


def _retry_after_of(base: Classification, winner: BaseException, now_wall: float) -> float | None:
    retry_after: float | None = None
    if base.status_code is not None:
        retry_after = retry_after_from_headers(
            _headers_of(winner),
            now_wall=now_wall,
            rate_limited=base.category is _C.RATE_LIMIT,
        )
    if retry_after is None:
        retry_after = _retry_after_attribute(winner)
    return retry_after


def _adjust(
    state: _State,
    base: Classification,
    retry_after: float | None,
    ctx: ClassifyContext | None,
    limit: int,
) -> Classification:
    steps = ctx.severity_steps if ctx is not None else 0
    if retry_after is None:
        if steps == 0:
            return base  # the cached, shared instance: frozen, so sharing is safe
        # Building a frozen record costs more than the rest of a cached classification; keep
        # the (at most three) raised variants of each verdict. The entry holds ``base``, so its
        # id cannot be reused while the entry exists.
        key = (id(base), steps)
        hit = state.raised.get(key)
        if hit is not None and hit[0] is base:
            return hit[1]
        raised = _rebuilt(base, None, steps)
        _store(state.raised, key, (base, raised), limit)
        return raised
    return _rebuilt(base, retry_after, steps)


def _rebuilt(base: Classification, retry_after: float | None, steps: int) -> Classification:
    return Classification(
        category=base.category,
        severity=base.severity.raised(steps),
        retryable=base.retryable,
        error_type=base.error_type,
        retry_after=retry_after,
        status_code=base.status_code,
        code=base.code,
        rule=base.rule,
        live_refusal=base.live_refusal,
    )


# -- reading exceptions -------------------------------------------------------------------------

_MYSQL_FAMILIES = ("pymysql.err.MySQLError", "MySQLdb._exceptions.MySQLError")
# Exceptions made only of these modules' classes carry no response, SQLSTATE, reason or
# retry_after; skipping those reads keeps the common case (a socket error) cheap.
_PLAIN_MODULES = frozenset(
    {"builtins", "asyncio.exceptions", "concurrent.futures._base", "socket", "ssl", "http.client"}
)
_EAI_NAMES: Mapping[int, str] = {
    value: name
    for name in dir(socket)
    if name.startswith("EAI_") and isinstance(value := getattr(socket, name), int)
}


def _spellings(cls: type) -> tuple[str, ...]:
    module = str(getattr(cls, "__module__", "") or "")
    qualname = str(getattr(cls, "__qualname__", "") or getattr(cls, "__name__", ""))
    real = f"{module}.{qualname}"
    if module == "builtins":
        return (real, qualname)
    public = ".".join(p for i, p in enumerate(module.split(".")) if i == 0 or not p.startswith("_"))
    return (real,) if public == module else (real, f"{public}.{qualname}")


def _error_type(cls: type) -> str:
    module = str(getattr(cls, "__module__", "") or "")
    qualname = str(getattr(cls, "__qualname__", "") or getattr(cls, "__name__", "?"))
    return qualname if module in ("builtins", "") else f"{module}.{qualname}"


def _get(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a property that raises is just "no signal"
        return None


def _children(exc: BaseException, info: _TypeInfo) -> list[BaseException]:
    """What ``exc`` wraps, in the order the module doc gives."""
    children: list[BaseException] = []
    cause = exc.__cause__
    if cause is not None:
        children.append(cause)
    if not info.plain:
        reason = _get(exc, "reason")
        if isinstance(reason, BaseException):
            children.append(reason)
    args = exc.args
    if type(args) is tuple:  # a subclass may have replaced args with anything
        for arg in args[:4]:
            if isinstance(arg, BaseException):
                children.append(arg)
    context = exc.__context__
    if context is not None and not exc.__suppress_context__:
        children.append(context)
    return children


def _shape(exc: BaseException, cls: type, info: _TypeInfo) -> _Shape:
    err = getattr(exc, "errno", None) if info.has_errno else None  # an OSError slot: cannot raise
    if type(err) is not int:
        err = None
    if info.plain:
        return (cls, None, None, None, err, None)
    try:
        return _fast_shape(exc, cls, info, err)
    except Exception:  # noqa: BLE001 - a property raised: read each signal defensively
        return (
            cls,
            _status_of(exc),
            _sqlstate_of(exc),
            _mysql_errno_of(exc) if info.mysql else None,
            err,
            _sqlite_code_of(exc) if info.sqlite else None,
        )


def _fast_shape(exc: BaseException, cls: type, info: _TypeInfo, err: int | None) -> _Shape:
    """The signals, read with plain ``getattr`` (the caller retries defensively if one raises)."""
    status = None
    response = getattr(exc, "response", None)
    if response is not None:  # not truthiness: requests' Response is falsy for 4xx/5xx
        status = _valid_status(getattr(response, "status_code", None))
        if status is None:
            status = _valid_status(getattr(response, "status", None))
    if status is None:
        status = _valid_status(getattr(exc, "status", None))
        if status is None:
            status = _valid_status(getattr(exc, "status_code", None))
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        sqlstate = getattr(exc, "pgcode", None)
    if sqlstate is not None and not (isinstance(sqlstate, str) and _SQLSTATE.fullmatch(sqlstate)):
        sqlstate = None
    sqlite = _sqlite_code_of(exc) if info.sqlite else None
    return (cls, status, sqlstate, _mysql_errno_of(exc) if info.mysql else None, err, sqlite)


def _valid_status(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return int(value)
    return None


def _status_of(exc: BaseException) -> int | None:
    response = _get(exc, "response")
    if response is not None:  # not truthiness: requests' Response is falsy for 4xx/5xx
        status = _valid_status(_get(response, "status_code"))
        if status is None:
            status = _valid_status(_get(response, "status"))
        if status is not None:
            return status
    status = _valid_status(_get(exc, "status"))
    if status is None:
        status = _valid_status(_get(exc, "status_code"))
    return status


def _sqlstate_of(exc: BaseException) -> str | None:
    code = _get(exc, "sqlstate")
    if code is None:
        code = _get(exc, "pgcode")
    if isinstance(code, str) and _SQLSTATE.fullmatch(code):
        return code
    return None


def _mysql_errno_of(exc: BaseException) -> int | None:
    args = exc.args
    if args and isinstance(args[0], int) and not isinstance(args[0], bool) and args[0] > 0:
        return args[0]
    return None


def _errno_of(exc: BaseException) -> int | None:
    code = _get(exc, "errno")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    return None


def _sqlite_code_of(exc: BaseException) -> str | None:
    name = _get(exc, "sqlite_errorname")
    if isinstance(name, str) and name.startswith("SQLITE_"):
        return name
    return None


def _message_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ just has no message
        return ""


def _headers_of(exc: BaseException) -> HeaderSource | None:
    response = _get(exc, "response")
    headers = _get(response, "headers") if response is not None else _get(exc, "headers")
    if headers is None or not callable(_get(headers, "get")):
        return None
    return headers  # type: ignore[return-value]  # it has a callable .get: duck-typed


def _retry_after_attribute(exc: BaseException) -> float | None:
    value = _get(exc, "retry_after")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return None


def _code_of(shape: _Shape, info: _TypeInfo | None) -> str | None:
    _, _, sqlstate, mysql, err, sqlite = shape
    if mysql is not None:
        return str(mysql)
    if sqlstate is not None:
        return sqlstate
    if sqlite is not None:
        return sqlite
    if err is not None:
        if info is not None and info.gai_errno:
            return _EAI_NAMES.get(err, str(err))
        return _errno.errorcode.get(err, str(err))
    return None


def _match(rule: Rule, info: _TypeInfo, shape: _Shape) -> int | None:
    """The MRO depth at which ``rule``'s non-message matchers all hold, or ``None``.

    Rules without class names match at ``info.depth`` (the least specific position).
    """
    _, status, sqlstate, mysql, err, sqlite = shape
    if rule.status_codes and status not in rule.status_codes:
        return None
    if (rule.sqlstates or rule.sqlstate_classes) and (
        sqlstate is None
        or (sqlstate not in rule.sqlstates and sqlstate[:2] not in rule.sqlstate_classes)
    ):
        return None
    if rule.mysql_errnos and mysql not in rule.mysql_errnos:
        return None
    if rule.errnos and err not in rule.errnos:
        return None
    if rule.sqlite_codes:
        if sqlite is None:
            return None
        primary = "_".join(sqlite.split("_", 2)[:2])
        if sqlite not in rule.sqlite_codes and primary not in rule.sqlite_codes:
            return None
    if not rule.exception_types:
        return info.depth
    depths = [info.names[n] for n in rule.exception_types if n in info.names]
    return min(depths) if depths else None


#: The classifier behind ``otel_raptor.classify``: the built-in rules plus registered ones.
DEFAULT_CLASSIFIER: Final = Classifier()


def classify_status(
    status_code: int,
    headers: HeaderSource | None = None,
    *,
    now_wall: float,
    context: ContextLike = None,
) -> Classification | None:
    """:meth:`Classifier.classify_status` on :data:`DEFAULT_CLASSIFIER` (user rules included)."""
    return DEFAULT_CLASSIFIER.classify_status(
        status_code, headers, now_wall=now_wall, context=context
    )
