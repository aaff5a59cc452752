"""The classification engine's logic, on hand-built exceptions.

Classes are faked with the ``__module__``/``__qualname__`` of the real library classes, which is
all the engine looks at; tests/integrations/test_classify_real.py checks the real ones.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import errno
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.classification import (
    NON_HEALTH_CATEGORIES,
    Classification,
    ErrorCategory,
    Severity,
)
from otel_raptor.core.classify import (
    BASE_SEVERITY,
    BUILTIN_RULES,
    DEFAULT_RETRYABLE,
    MAX_CHAIN,
    REPEAT_THRESHOLD,
    Classifier,
    ClassifyContext,
    Rule,
)
from otel_raptor.errors import CircuitOpenError, ConfigError

NOW = 1_700_000_000.0
C = ErrorCategory


def fake(qualified: str, *bases: type[BaseException]) -> type[Exception]:
    """An exception class whose qualified name is ``qualified``."""
    module, _, name = qualified.rpartition(".")
    return type(name, bases or (Exception,), {"__module__": module, "__qualname__": name})


class Response:
    """Stands in for requests/httpx responses; falsy like requests' Response for >= 400."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.headers = headers or {}

    def __bool__(self) -> bool:
        return self.status_code < 400


def caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.fixture
def classifier() -> Classifier:
    return Classifier()


def classify(c: Classifier, exc: BaseException, **kw: Any) -> Classification:
    return c.classify(exc, now_wall=NOW, **kw)


# -- fake library classes -------------------------------------------------------------------------

HttpxConnectError = fake("httpx.ConnectError", fake("httpx.NetworkError"))
# httpx < 0.28 left its classes in the private module where they are defined.
HttpxPrivateConnectError = fake(
    "httpx._exceptions.ConnectError", fake("httpx._exceptions.NetworkError")
)
RequestsConnectionError = fake("requests.exceptions.ConnectionError", OSError)
RequestsHTTPError = fake("requests.exceptions.HTTPError", OSError)
RedisResponseError = fake("redis.exceptions.ResponseError")
RedisConnectionError = fake("redis.exceptions.ConnectionError")
RedisTimeoutError = fake("redis.exceptions.TimeoutError")
PsycopgError = fake("psycopg.Error")
PsycopgOperationalError = fake("psycopg.OperationalError", PsycopgError)
PyMySQLError = fake("pymysql.err.MySQLError")
PyMySQLOperationalError = fake("pymysql.err.OperationalError", PyMySQLError)
SqliteOperationalError = fake("sqlite3.OperationalError")
SqliteError = fake("sqlite3.Error")
SqliteBusy = fake("sqlite3.OperationalError", SqliteError)


def with_attrs(exc: BaseException, **attrs: object) -> BaseException:
    for key, value in attrs.items():
        setattr(exc, key, value)
    return exc


# -- rules ----------------------------------------------------------------------------------------


class TestRuleValidation:
    def test_needs_a_matcher(self) -> None:
        with pytest.raises(ConfigError, match="matcher"):
            Rule(name="x", category=C.TIMEOUT)

    def test_needs_a_name(self) -> None:
        with pytest.raises(ConfigError, match=r"rule\.name"):
            Rule(name="", category=C.TIMEOUT, message="x")

    @pytest.mark.parametrize(
        ("kwargs", "key"),
        [
            ({"status_codes": (99,)}, "status_codes"),
            ({"status_codes": (True,)}, "status_codes"),
            ({"sqlstates": ("2350",)}, "sqlstates"),
            ({"sqlstates": ("23505x",)}, "sqlstates"),
            ({"sqlstate_classes": ("235",)}, "sqlstate_classes"),
            ({"mysql_errnos": (0,)}, "mysql_errnos"),
            ({"sqlite_codes": ("BUSY",)}, "sqlite_codes"),
            ({"exception_types": "httpx.ConnectError"}, "exception_types"),
            ({"exception_types": ("",)}, "exception_types"),
            ({"message": "("}, "message"),
            ({"message": "x", "retryable": "yes"}, "retryable"),
            ({"message": "x", "severity": "dire"}, "severity"),
        ],
    )
    def test_bad_values_name_the_field(self, kwargs: dict[str, Any], key: str) -> None:
        with pytest.raises(ConfigError) as info:
            Rule(name="x", category=C.TIMEOUT, **kwargs)
        assert info.value.key == f"rule.{key}"

    def test_category_value_and_lists_are_accepted(self) -> None:
        rule = Rule(name="x", category="timeout", status_codes=[418])  # type: ignore[arg-type]
        assert rule.category is C.TIMEOUT
        assert rule.status_codes == (418,)
        assert hash(rule)  # frozen and hashable after normalisation

    def test_bad_category(self) -> None:
        with pytest.raises(ConfigError, match=r"rule\.category"):
            Rule(name="x", category="nope", message="x")  # type: ignore[arg-type]

    def test_specificity(self) -> None:
        assert Rule(name="a", category=C.TIMEOUT, status_codes=(408,)).specificity == 3
        assert Rule(name="b", category=C.TIMEOUT, exception_types=("a.B",)).specificity == 2
        both = Rule(name="c", category=C.TIMEOUT, exception_types=("a.B",), message="x")
        assert both.specificity == 3
        assert Rule(name="d", category=C.TIMEOUT, message="x").specificity == 0

    def test_builtin_rule_names_are_unique(self) -> None:
        names = [rule.name for rule in BUILTIN_RULES]
        assert len(names) == len(set(names))

    def test_every_category_has_defaults(self) -> None:
        assert set(BASE_SEVERITY) == set(ErrorCategory)
        assert set(DEFAULT_RETRYABLE) == set(ErrorCategory)

    def test_classifier_options(self) -> None:
        with pytest.raises(ConfigError, match="cache_size"):
            Classifier(cache_size=0)
        with pytest.raises(ConfigError, match="rules"):
            Classifier(rules=["not a rule"])  # type: ignore[list-item]


# -- the standard library -------------------------------------------------------------------------


class TestStandardLibrary:
    @pytest.mark.parametrize(
        ("exc", "category", "retryable", "code"),
        [
            (TimeoutError("timed out"), C.TIMEOUT, True, None),
            (socket.timeout("timed out"), C.TIMEOUT, True, None),  # noqa: UP041 - the alias on purpose
            (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), C.CONNECTION, True,
             "ECONNREFUSED"),
            (ConnectionResetError(errno.ECONNRESET, "reset"), C.CONNECTION, True, "ECONNRESET"),
            (BrokenPipeError(errno.EPIPE, "pipe"), C.CONNECTION, True, "EPIPE"),
            (OSError(errno.ETIMEDOUT, "timed out"), C.TIMEOUT, True, "ETIMEDOUT"),
            (OSError(errno.EMFILE, "too many files"), C.RESOURCE_EXHAUSTED, False, "EMFILE"),
            (OSError(errno.ENOSPC, "disk full"), C.RESOURCE_EXHAUSTED, False, "ENOSPC"),
            (OSError(errno.EADDRNOTAVAIL, "no port"), C.RESOURCE_EXHAUSTED, True,
             "EADDRNOTAVAIL"),
            (MemoryError(), C.RESOURCE_EXHAUSTED, False, None),
            (socket.gaierror(socket.EAI_AGAIN, "try again"), C.DNS, True, "EAI_AGAIN"),
            (socket.gaierror(socket.EAI_NONAME, "unknown"), C.DNS, False, "EAI_NONAME"),
            (socket.gaierror("no code"), C.DNS, False, None),
            (ssl.SSLCertVerificationError(1, "certificate verify failed"), C.TLS, False, None),
            (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER]"), C.TLS, False, None),
            (ssl.SSLEOFError(8, "EOF occurred"), C.CONNECTION, True, None),
            (asyncio.CancelledError(), C.CANCELLED, False, None),
            (concurrent.futures.CancelledError(), C.CANCELLED, False, None),
            (asyncio.IncompleteReadError(b"", 10), C.CONNECTION, True, None),
        ],
    )  # fmt: skip
    def test_table(
        self,
        classifier: Classifier,
        exc: BaseException,
        category: ErrorCategory,
        retryable: bool,
        code: str | None,
    ) -> None:
        result = classify(classifier, exc)
        assert (result.category, result.retryable, result.code) == (category, retryable, code)

    def test_unknown(self, classifier: Classifier) -> None:
        result = classify(classifier, ValueError("bad input 42"))
        assert result == Classification(
            category=C.UNKNOWN,
            severity=Severity.MEDIUM,
            retryable=False,
            error_type="ValueError",
            rule="",
        )

    @pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
    def test_non_cancellation_base_exceptions_are_unknown(
        self, classifier: Classifier, exc: BaseException
    ) -> None:
        assert classify(classifier, exc).category is C.UNKNOWN

    def test_oserror_without_a_known_errno(self, classifier: Classifier) -> None:
        assert classify(classifier, FileNotFoundError(errno.ENOENT, "x")).category is C.UNKNOWN

    def test_error_type(self, classifier: Classifier) -> None:
        assert classify(classifier, TimeoutError()).error_type == "TimeoutError"
        assert classify(classifier, socket.gaierror()).error_type == "socket.gaierror"
        assert classify(classifier, HttpxConnectError()).error_type == "httpx.ConnectError"
        assert classify(classifier, asyncio.CancelledError()).error_type == (
            "asyncio.exceptions.CancelledError"
        )

    def test_circuit_open_error_carries_its_retry_after(self, classifier: Classifier) -> None:
        result = classify(classifier, CircuitOpenError("db", retry_after=2.5))
        assert (result.category, result.retryable, result.retry_after) == (
            C.UNAVAILABLE,
            False,
            2.5,
        )


# -- signals --------------------------------------------------------------------------------------


class TestSignals:
    @pytest.mark.parametrize(
        ("status", "category", "retryable"),
        [
            (429, C.RATE_LIMIT, True),
            (408, C.TIMEOUT, True),
            (504, C.TIMEOUT, True),
            (401, C.AUTHENTICATION, False),
            (403, C.AUTHORIZATION, False),
            (502, C.UNAVAILABLE, True),
            (503, C.UNAVAILABLE, True),
            (500, C.SERVER_ERROR, True),
            (501, C.CLIENT_ERROR, False),
            (505, C.CLIENT_ERROR, False),
            (599, C.SERVER_ERROR, True),
            (404, C.CLIENT_ERROR, False),
            (409, C.CLIENT_ERROR, False),
        ],
    )
    def test_status_on_a_response(
        self, classifier: Classifier, status: int, category: ErrorCategory, retryable: bool
    ) -> None:
        exc = with_attrs(RequestsHTTPError("x"), response=Response(status))
        result = classify(classifier, exc)
        assert (result.category, result.retryable) == (category, retryable)
        assert result.status_code == status
        assert result.error_type == str(status)

    def test_retry_after_from_the_response(self, classifier: Classifier) -> None:
        exc = with_attrs(RequestsHTTPError(), response=Response(429, {"retry-after": "7"}))
        assert classify(classifier, exc).retry_after == 7.0

    def test_retry_after_http_date_uses_now_wall(self, classifier: Classifier) -> None:
        headers = {"Retry-After": "Tue, 14 Nov 2023 22:14:00 GMT"}  # NOW + 40 s
        exc = with_attrs(RequestsHTTPError(), response=Response(503, headers))
        assert classify(classifier, exc).retry_after == 40.0

    def test_aiohttp_style_status_and_headers(self, classifier: Classifier) -> None:
        aiohttp_error = fake("aiohttp.client_exceptions.ClientResponseError")
        exc = with_attrs(aiohttp_error(), status=503, headers={"Retry-After": "3"})
        result = classify(classifier, exc)
        assert (result.category, result.status_code, result.retry_after) == (
            C.UNAVAILABLE,
            503,
            3.0,
        )

    def test_non_integer_status_is_ignored(self, classifier: Classifier) -> None:
        # redis-py puts the error prefix in ``status_code``; it is not an HTTP status.
        exc = with_attrs(RedisResponseError("x"), status_code="WRONGTYPE")
        assert classify(classifier, exc).status_code is None

    def test_redirect_status_is_not_an_error_type(self, classifier: Classifier) -> None:
        exc = with_attrs(fake("httpx.HTTPStatusError")(), response=Response(302))
        result = classify(classifier, exc)
        assert (result.category, result.error_type, result.status_code) == (
            C.UNKNOWN,
            "httpx.HTTPStatusError",
            302,
        )

    @pytest.mark.parametrize(
        ("sqlstate", "category", "retryable"),
        [
            ("23505", C.INTEGRITY, False),
            ("23503", C.INTEGRITY, False),
            ("42601", C.QUERY, False),
            ("42P01", C.QUERY, False),
            ("42501", C.AUTHORIZATION, False),
            ("57014", C.CANCELLED, False),  # a statement timeout or cancel: the caller's limit
            ("25P03", C.CANCELLED, False),
            ("P0001", C.QUERY, False),  # RAISE EXCEPTION in PL/pgSQL
            ("2BP01", C.QUERY, False),
            ("55006", C.QUERY, False),  # psycopg raises it as OperationalError: not a lost link
            ("40P01", C.CONCURRENCY, True),
            ("40001", C.CONCURRENCY, True),
            ("55P03", C.CONCURRENCY, True),
            ("28P01", C.AUTHENTICATION, False),
            ("28000", C.AUTHENTICATION, False),
            ("53300", C.RESOURCE_EXHAUSTED, True),
            ("53100", C.RESOURCE_EXHAUSTED, False),
            ("08006", C.CONNECTION, True),
            ("57P01", C.CONNECTION, True),
            ("57P02", C.CONNECTION, True),
            ("57P03", C.UNAVAILABLE, True),
            ("XX000", C.SERVER_ERROR, False),
            ("57P04", C.UNAVAILABLE, True),  # the database was dropped: out, for this session
            ("58030", C.UNAVAILABLE, True),  # the server's disk fails
        ],
    )
    def test_sqlstate(
        self, classifier: Classifier, sqlstate: str, category: ErrorCategory, retryable: bool
    ) -> None:
        for attr in ("sqlstate", "pgcode"):  # psycopg 3 / asyncpg, psycopg2
            result = classify(classifier, with_attrs(PsycopgError("x"), **{attr: sqlstate}))
            assert (result.category, result.retryable, result.code) == (
                category,
                retryable,
                sqlstate,
            )

    @pytest.mark.parametrize(
        ("number", "category"),
        [
            (1062, C.INTEGRITY),
            (1451, C.INTEGRITY),
            (1048, C.INTEGRITY),
            (1064, C.QUERY),
            (1146, C.QUERY),
            (1054, C.QUERY),
            (1045, C.AUTHENTICATION),
            (1142, C.AUTHORIZATION),
            (1044, C.AUTHORIZATION),
            (1213, C.CONCURRENCY),
            (1205, C.CONCURRENCY),
            (1040, C.RESOURCE_EXHAUSTED),
        ],
    )
    def test_mysql_errno(
        self, classifier: Classifier, number: int, category: ErrorCategory
    ) -> None:
        result = classify(classifier, PyMySQLOperationalError(number, "message"))
        assert (result.category, result.code) == (category, str(number))

    @pytest.mark.parametrize(
        ("message", "category"),
        [
            ("The MariaDB server is running with the --read-only option so it cannot execute "
             "this statement", C.UNAVAILABLE),
            ("The MySQL server is running with the --super-read-only option so it cannot "
             "execute this statement", C.UNAVAILABLE),
            # The statement's doing (SELECT ... INTO OUTFILE, LOAD DATA outside the allowed
            # directory): it opened the breaker of a healthy server.
            ("The MySQL server is running with the --secure-file-priv option so it cannot "
             "execute this statement", C.QUERY),
        ],
    )  # fmt: skip
    def test_mysql_1290_is_unavailable_only_when_read_only(
        self, classifier: Classifier, message: str, category: ErrorCategory
    ) -> None:
        result = classify(classifier, PyMySQLOperationalError(1290, message))
        assert (result.category, result.code) == (category, "1290")

    def test_mysql_errno_beats_its_sqlstate(self, classifier: Classifier) -> None:
        # MariaDB reports 1142 (table access denied) with SQLSTATE 42000, a syntax-error class.
        exc = with_attrs(PyMySQLOperationalError(1142, "denied"), sqlstate="42000")
        assert classify(classifier, exc).category is C.AUTHORIZATION

    def test_mysql_too_many_connections_is_retryable(self, classifier: Classifier) -> None:
        assert classify(classifier, PyMySQLOperationalError(1040, "x")).retryable is True

    def test_args_zero_only_counts_for_mysql_classes(self, classifier: Classifier) -> None:
        assert classify(classifier, ValueError(1062, "x")).category is C.UNKNOWN

    @pytest.mark.parametrize(
        ("name", "category"),
        [
            ("SQLITE_BUSY", C.CONCURRENCY),
            ("SQLITE_BUSY_SNAPSHOT", C.CONCURRENCY),
            ("SQLITE_LOCKED", C.CONCURRENCY),
            ("SQLITE_CONSTRAINT_UNIQUE", C.INTEGRITY),
            ("SQLITE_FULL", C.RESOURCE_EXHAUSTED),
        ],
    )
    def test_sqlite_codes(self, classifier: Classifier, name: str, category: ErrorCategory) -> None:
        exc = with_attrs(SqliteBusy("whatever"), sqlite_errorname=name)
        result = classify(classifier, exc)
        assert (result.category, result.code) == (category, name)

    @pytest.mark.parametrize(
        ("message", "category"),
        [
            ("database is locked", C.CONCURRENCY),
            ("database table is locked", C.CONCURRENCY),
            ('near "SELEC": syntax error', C.QUERY),
            ("no such table: t", C.QUERY),
            ("disk I/O error", C.UNKNOWN),
        ],
    )
    def test_sqlite_messages_without_codes(
        self, classifier: Classifier, message: str, category: ErrorCategory
    ) -> None:
        assert classify(classifier, SqliteOperationalError(message)).category is category

    @pytest.mark.parametrize(
        ("exc", "category", "retryable"),
        [
            (RedisResponseError("WRONGTYPE Operation against a key"), C.QUERY, False),
            (RedisResponseError("NOPERM User x has no permissions"), C.AUTHORIZATION, False),
            (RedisResponseError("LOADING Redis is loading the dataset"), C.UNAVAILABLE, True),
            (RedisResponseError("BUSY Redis is busy running a script"), C.UNAVAILABLE, True),
            (RedisResponseError("MASTERDOWN Link with MASTER is down"), C.UNAVAILABLE, True),
            (RedisResponseError("OOM command not allowed"), C.RESOURCE_EXHAUSTED, False),
            (RedisResponseError("WRONGPASS invalid username-password pair"), C.AUTHENTICATION,
             False),
            (RedisResponseError("unknown command 'FOO'"), C.QUERY, False),
            (RedisConnectionError("max number of clients reached"), C.RESOURCE_EXHAUSTED, True),
            (fake("redis.exceptions.NoPermissionError", RedisResponseError)("no perm"),
             C.AUTHORIZATION, False),
            (fake("redis.exceptions.AuthenticationError", RedisConnectionError)("bad"),
             C.AUTHENTICATION, False),
            (fake("redis.exceptions.BusyLoadingError", RedisConnectionError)("loading"),
             C.UNAVAILABLE, True),
        ],
    )  # fmt: skip
    def test_redis(
        self, classifier: Classifier, exc: BaseException, category: ErrorCategory, retryable: bool
    ) -> None:
        result = classify(classifier, exc)
        assert (result.category, result.retryable) == (category, retryable)

    @pytest.mark.parametrize(
        ("message", "rule"),
        [
            ("Connection refused", "redis.proxy_unreachable"),
            ("Host is unreachable", "redis.proxy_unreachable"),
            ("No route to host", "redis.proxy_unreachable"),
            # Also a forwarded command whose answer the proxy waited for in vain.
            ("Connection timed out", "redis.ResponseError"),
            # A pipeline's, annotated by redis-py (args may span lines).
            ("Command # 2 (GET k) of pipeline caused error: Connection refused",
             "redis.proxy_unreachable"),
            ("Command # 1 (SET k a\nb) of pipeline caused error: No route to host",
             "redis.proxy_unreachable"),
            # redis.asyncio quotes the reply as a tuple.
            ("Command # 1 (GET k) of pipeline caused error: ('Connection refused',)",
             "redis.proxy_unreachable"),
            ("Command # 1 (GET k) of pipeline caused error: ('Connection refused'",
             "redis.ResponseError"),
            ("Command # 1 (GET k) of pipeline caused error: Connection timed out",
             "redis.ResponseError"),
            ("Connection refused by policy", "redis.ResponseError"),
        ],
    )  # fmt: skip
    def test_a_proxys_reply_that_it_cannot_reach_the_server(
        self, classifier: Classifier, message: str, rule: str
    ) -> None:
        # twemproxy's ``-ERR Connection refused`` (redis-py strips the ``ERR ``).
        result = classify(classifier, RedisResponseError(message))
        assert result.rule == rule
        if rule == "redis.proxy_unreachable":
            assert result.category is C.CONNECTION
            assert result.counts_against_health

    @pytest.mark.parametrize(
        ("message", "rule"),
        [
            ("BUSY Redis is busy running a script.", "redis.LOADING"),
            # A pipeline's, annotated by redis-py (args may span lines).
            ("Command # 1 (INCRBY k 1) of pipeline caused error: BUSY Redis is busy",
             "redis.LOADING"),
            ("Command # 3 (SET k a\nb) of pipeline caused error: TRYAGAIN Multiple keys",
             "redis.LOADING"),
            # redis.asyncio quotes the reply as a tuple (repr: double quotes around a quote).
            ("Command # 1 (GET k) of pipeline caused error: ('BUSY Redis is busy',)",
             "redis.LOADING"),
            ("Command # 2 (SET k a\nb) of pipeline caused error: ('BUSY Redis is busy',)",
             "redis.LOADING"),
            ("Command # 1 (GET k) of pipeline caused error: (\"MASTERDOWN set to 'no'.\",)",
             "redis.LOADING"),
            # Not a "not executed" reply: the word elsewhere.
            ("Command # 1 (GET BUSY) of pipeline caused error: ('wrong kind',)",
             "redis.ResponseError"),
            ("Command # 1 (GET k) of pipeline caused error: ('BUSYNESS',)", "redis.ResponseError"),
        ],
    )  # fmt: skip
    def test_a_not_executed_reply_inside_a_pipeline(
        self, classifier: Classifier, message: str, rule: str
    ) -> None:
        result = classify(classifier, RedisResponseError(message))
        assert result.rule == rule
        if rule == "redis.LOADING":
            assert (result.category, result.counts_against_health) == (C.UNAVAILABLE, True)

    @pytest.mark.parametrize(
        ("number", "message", "rule"),
        [
            (9001, "Max connect timeout reached while reaching hostgroup 0 after 10000ms",
             "mysql.proxy_unreachable"),
            (9002, "Max connect failure while reaching hostgroup 0", "mysql.proxy_unreachable"),
            # The session's own doing: a command ProxySQL does not support, a locked hostgroup.
            (9003, "Command not supported", ""),
            (9006, "ProxySQL Error: connection is locked to hostgroup 0 but trying to reach "
                   "hostgroup 1", ""),
        ],
    )  # fmt: skip
    def test_proxysql_could_not_reach_a_server(
        self, classifier: Classifier, number: int, message: str, rule: str
    ) -> None:
        result = classify(classifier, PyMySQLOperationalError(number, message))
        assert result.rule == rule
        if rule:
            assert (result.category, result.retryable) == (C.CONNECTION, True)
            assert result.code == str(number)

    @pytest.mark.parametrize(
        "exc",
        [
            RedisResponseError("OOM command not allowed when used memory > 'maxmemory'."),
            RedisResponseError("READONLY You can't write against a read only replica."),
            fake("redis.exceptions.OutOfMemoryError", RedisResponseError)("command not allowed"),
            fake("redis.exceptions.ReadOnlyError", RedisResponseError)("read only replica"),
            PyMySQLOperationalError(1290, "The MariaDB server is running with --read-only"),
            with_attrs(PsycopgOperationalError("could not extend file"), sqlstate="53100"),
        ],
    )  # fmt: skip
    def test_writes_refused_by_a_live_server_are_live_refusals(
        self, classifier: Classifier, exc: BaseException
    ) -> None:
        result = classify(classifier, exc)
        assert result.live_refusal
        assert not result.counts_against_health
        assert result.category not in NON_HEALTH_CATEGORIES  # the category stays what it is

    @pytest.mark.parametrize(
        "exc",
        [
            RedisResponseError("BUSY Redis is busy running a script"),
            RedisResponseError("LOADING Redis is loading the dataset"),
            PyMySQLOperationalError(1047, "WSREP has not yet prepared node"),
            with_attrs(PsycopgOperationalError("too many clients"), sqlstate="53300"),
        ],
    )
    def test_a_server_refusing_everything_is_no_live_refusal(
        self, classifier: Classifier, exc: BaseException
    ) -> None:
        result = classify(classifier, exc)
        assert not result.live_refusal
        assert result.counts_against_health

    def test_a_rule_live_refusal_must_be_a_bool(self) -> None:
        with pytest.raises(ConfigError, match=r"rule\.live_refusal.*'yes'.*True or False"):
            Rule(name="x", category=C.QUERY, message="x", live_refusal="yes")  # type: ignore[arg-type]

    def test_private_module_segments_may_be_left_out(self, classifier: Classifier) -> None:
        result = classify(classifier, caused(HttpxPrivateConnectError(), TimeoutError()))
        assert result.category is C.TIMEOUT
        alone = classify(classifier, HttpxPrivateConnectError("no cause"))
        assert (alone.category, alone.rule) == (C.CONNECTION, "httpx.network")


# -- precedence -----------------------------------------------------------------------------------


class TestPrecedence:
    def test_signal_beats_class_on_the_same_exception(self, classifier: Classifier) -> None:
        timeout_with_status = with_attrs(fake("httpx.ReadTimeout")(), response=Response(429))
        result = classify(classifier, timeout_with_status)
        assert (result.category, result.rule) == (C.RATE_LIMIT, "http.429")

    def test_most_derived_class_wins(self, classifier: Classifier) -> None:
        base = fake("urllib3.exceptions.TimeoutError")
        connect_timeout = fake("urllib3.exceptions.ConnectTimeoutError", base)
        new_connection = fake("urllib3.exceptions.NewConnectionError", connect_timeout)
        name_resolution = fake("urllib3.exceptions.NameResolutionError", new_connection)
        assert classify(classifier, connect_timeout()).category is C.TIMEOUT
        assert classify(classifier, new_connection()).category is C.CONNECTION
        assert classify(classifier, name_resolution()).category is C.DNS

    def test_wrapper_defers_to_its_cause(self, classifier: Classifier) -> None:
        tls = caused(HttpxConnectError(), ssl.SSLCertVerificationError(1, "verify failed"))
        assert classify(classifier, tls).category is C.TLS
        dns = caused(HttpxConnectError(), socket.gaierror(socket.EAI_AGAIN, "again"))
        result = classify(classifier, dns)
        assert (result.category, result.retryable, result.error_type) == (
            C.DNS,
            True,
            "httpx.ConnectError",
        )

    def test_wrapper_alone_still_classifies(self, classifier: Classifier) -> None:
        result = classify(classifier, caused(HttpxConnectError(), OSError("no errno")))
        assert (result.category, result.rule) == (C.CONNECTION, "httpx.network")

    def test_outer_wins_a_tie(self, classifier: Classifier) -> None:
        # asyncio.wait_for raises TimeoutError from the CancelledError of the inner task.
        exc = caused(TimeoutError(), asyncio.CancelledError())
        assert classify(classifier, exc).category is C.TIMEOUT

    def test_outer_class_beats_inner_message(self, classifier: Classifier) -> None:
        exc = caused(RedisTimeoutError("x"), Exception("too many requests"))
        assert classify(classifier, exc).category is C.TIMEOUT

    def test_stronger_inner_signal_beats_outer_class(self, classifier: Classifier) -> None:
        exc = caused(TimeoutError(), with_attrs(PsycopgError(), sqlstate="40P01"))
        assert classify(classifier, exc).category is C.CONCURRENCY

    def test_unknown_outer_uses_the_cause(self, classifier: Classifier) -> None:
        result = classify(classifier, caused(ValueError("wrapped"), TimeoutError()))
        assert (result.category, result.error_type) == (C.TIMEOUT, "ValueError")

    @staticmethod
    def _raise_while_handling(*, suppress: bool) -> None:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError:
            if suppress:
                raise RuntimeError("while handling") from None
            raise RuntimeError("while handling")  # noqa: B904 - the implicit context is the point

    def test_context_is_followed_unless_suppressed(self, classifier: Classifier) -> None:
        with pytest.raises(RuntimeError) as implicit:
            self._raise_while_handling(suppress=False)
        assert classify(classifier, implicit.value).category is C.CONNECTION
        with pytest.raises(RuntimeError) as suppressed:
            self._raise_while_handling(suppress=True)
        assert classify(classifier, suppressed.value).category is C.UNKNOWN

    def test_exceptions_in_args_and_reason_are_followed(self, classifier: Classifier) -> None:
        max_retry = fake("urllib3.exceptions.MaxRetryError")()
        max_retry.reason = socket.gaierror(socket.EAI_NONAME, "x")  # type: ignore[attr-defined]
        outer = RequestsConnectionError(max_retry)
        result = classify(classifier, outer)
        assert (result.category, result.code) == (C.DNS, "EAI_NONAME")

    def test_mysql_connect_error_defers_to_the_oserror(self, classifier: Classifier) -> None:
        exc = PyMySQLOperationalError(2003, "Can't connect")
        exc.__context__ = socket.gaierror(socket.EAI_NONAME, "unknown host")
        assert classify(classifier, exc).category is C.DNS
        exc.__context__ = TimeoutError("timed out")
        assert classify(Classifier(), exc).category is C.TIMEOUT

    def test_cycles_are_harmless(self, classifier: Classifier) -> None:
        a, b = ValueError("a"), ValueError("b")
        a.__cause__, b.__cause__ = b, a
        a.__context__ = a
        assert classify(classifier, a).category is C.UNKNOWN

    def test_chain_is_bounded(self, classifier: Classifier) -> None:
        root: BaseException = TimeoutError()
        exc = root
        for _ in range(MAX_CHAIN - 1):
            exc = caused(ValueError(), exc)
        assert classify(classifier, exc).category is C.TIMEOUT  # exactly MAX_CHAIN links
        assert classify(classifier, caused(ValueError(), exc)).category is C.UNKNOWN

    def test_messages_are_the_last_resort(self, classifier: Classifier) -> None:
        assert classify(classifier, Exception("HTTP 429 Too Many Requests")).category is (
            C.RATE_LIMIT
        )
        assert classify(classifier, Exception("operation timed out")).category is C.TIMEOUT
        assert classify(classifier, Exception("all good")).category is C.UNKNOWN

    def test_message_rules_in_the_chain_lose_to_any_class(self, classifier: Classifier) -> None:
        exc = caused(Exception("rate limited"), ConnectionRefusedError(errno.ECONNREFUSED, "x"))
        assert classify(classifier, exc).category is C.CONNECTION


# -- user rules -----------------------------------------------------------------------------------


class TestUserRules:
    def test_first_rule_beats_builtins(self, classifier: Classifier) -> None:
        classifier.register_rule(
            Rule(name="mine", category=C.UNAVAILABLE, exception_types=("TimeoutError",))
        )
        result = classify(classifier, TimeoutError())
        assert (result.category, result.rule) == (C.UNAVAILABLE, "mine")

    def test_first_rule_on_the_cause_beats_builtin_signals_outside(
        self, classifier: Classifier
    ) -> None:
        api_error = fake("myapp.ApiError")
        classifier.register_rule(
            Rule(name="api", category=C.CONCURRENCY, exception_types=("myapp.ApiError",))
        )
        outer = caused(with_attrs(RequestsHTTPError(), response=Response(500)), api_error())
        assert classify(classifier, outer).rule == "api"

    def test_newest_first_rule_wins(self, classifier: Classifier) -> None:
        older = Rule(name="older", category=C.QUERY, message="boom")
        newer = Rule(name="newer", category=C.INTEGRITY, message="boom")
        classifier.register_rule(older)
        classifier.register_rule(newer)
        assert classify(classifier, Exception("boom")).rule == "newer"
        assert classifier.rules[:2] == (newer, older)

    def test_last_rule_is_a_fallback(self, classifier: Classifier) -> None:
        mine = fake("myapp.Flaky", TimeoutError)
        fallback = Rule(name="flaky", category=C.UNAVAILABLE, exception_types=("myapp.Flaky",))
        classifier.register_rule(fallback, first=False)
        assert classify(classifier, mine()).rule == "flaky"  # most derived class still wins
        loses_tie = Rule(name="late", category=C.UNAVAILABLE, status_codes=(429,))
        classifier.register_rule(loses_tie, first=False)
        exc = with_attrs(RequestsHTTPError(), response=Response(429))
        assert classify(classifier, exc).rule == "http.429"
        assert classifier.rules[-1] is loses_tie

    def test_overrides(self, classifier: Classifier) -> None:
        classifier.register_rule(
            Rule(
                name="teapot",
                category=C.CLIENT_ERROR,
                status_codes=(418,),
                retryable=True,
                severity=Severity.CRITICAL,
            )
        )
        result = classify(classifier, with_attrs(RequestsHTTPError(), response=Response(418)))
        assert (result.rule, result.retryable, result.severity) == (
            "teapot",
            True,
            Severity.CRITICAL,
        )

    def test_remove_rule(self, classifier: Classifier) -> None:
        rule = Rule(name="mine", category=C.UNAVAILABLE, exception_types=("TimeoutError",))
        classifier.register_rule(rule)
        assert classifier.remove_rule(rule) is True
        assert classifier.remove_rule(rule) is False
        assert classify(classifier, TimeoutError()).category is C.TIMEOUT

    def test_register_rejects_non_rules(self, classifier: Classifier) -> None:
        with pytest.raises(ConfigError):
            classifier.register_rule("timeout")  # type: ignore[arg-type]

    def test_custom_rule_set(self) -> None:
        only = Rule(name="only", category=C.TIMEOUT, message="slow")
        classifier = Classifier(rules=[only])
        assert classify(classifier, Exception("slow")).rule == "only"
        assert classify(classifier, TimeoutError()).category is C.UNKNOWN


# -- caching --------------------------------------------------------------------------------------


class TestCaching:
    def test_same_shape_is_one_cached_verdict(self, classifier: Classifier) -> None:
        first = classify(classifier, ConnectionRefusedError(errno.ECONNREFUSED, "one"))
        second = classify(classifier, ConnectionRefusedError(errno.ECONNREFUSED, "two"))
        assert first is second
        assert classifier.cached_shapes == 1

    def test_different_signals_are_different_shapes(self, classifier: Classifier) -> None:
        refused = classify(classifier, ConnectionRefusedError(errno.ECONNREFUSED, "x"))
        reset = classify(classifier, ConnectionRefusedError(errno.ECONNRESET, "x"))
        assert (refused.code, reset.code) == ("ECONNREFUSED", "ECONNRESET")
        assert classifier.cached_shapes == 2

    def test_messages_are_not_cache_keys(self, classifier: Classifier) -> None:
        locked = classify(classifier, SqliteOperationalError("database is locked"))
        syntax = classify(classifier, SqliteOperationalError("near x: syntax error"))
        for n in range(50):
            classify(classifier, SqliteOperationalError(f"other problem {n}"))
        assert (locked.category, syntax.category) == (C.CONCURRENCY, C.QUERY)
        assert classifier.cached_shapes == 1
        again = classify(classifier, SqliteOperationalError("database is locked"))
        assert again is locked

    def test_register_rule_clears_the_cache(self, classifier: Classifier) -> None:
        classify(classifier, TimeoutError())
        assert classifier.cached_shapes == 1
        classifier.register_rule(Rule(name="x", category=C.UNAVAILABLE, message="never"))
        assert classifier.cached_shapes == 0

    def test_cache_is_bounded(self) -> None:
        classifier = Classifier(cache_size=4)
        for code in range(1, 20):
            classify(classifier, OSError(code, "x"))
        assert 1 <= classifier.cached_shapes <= 4

    def test_context_and_retry_after_do_not_pollute_the_cache(self, classifier: Classifier) -> None:
        plain = classify(classifier, TimeoutError())
        raised = classify(classifier, TimeoutError(), context={"critical": True})
        assert raised.severity is Severity.HIGH
        assert classify(classifier, TimeoutError()) is plain
        slow = with_attrs(RequestsHTTPError(), response=Response(429, {"Retry-After": "1"}))
        fast = with_attrs(RequestsHTTPError(), response=Response(429, {"Retry-After": "9"}))
        assert classify(classifier, slow).retry_after == 1.0
        assert classify(classifier, fast).retry_after == 9.0

    @given(
        status=st.one_of(st.none(), st.integers(min_value=0, max_value=700), st.text(max_size=3)),
        sqlstate=st.one_of(st.none(), st.text(alphabet="0123456789APXZ", min_size=5, max_size=5)),
        err=st.one_of(st.none(), st.integers(min_value=-10, max_value=200)),
        message=st.text(max_size=30),
    )
    def test_cached_and_fresh_verdicts_agree(
        self, status: object, sqlstate: str | None, err: int | None, message: str
    ) -> None:
        exc = OSError(err, message) if err is not None else PsycopgOperationalError(message)
        with_attrs(exc, status=status, sqlstate=sqlstate)
        shared = Classifier()
        warm = shared.classify(exc, now_wall=NOW)
        assert shared.classify(exc, now_wall=NOW) == warm
        assert Classifier().classify(exc, now_wall=NOW) == warm
        assert warm.category in set(ErrorCategory)


# -- severity and context -------------------------------------------------------------------------


class TestSeverity:
    def test_base_severities(self, classifier: Classifier) -> None:
        assert classify(classifier, asyncio.CancelledError()).severity is Severity.LOW
        assert classify(classifier, TimeoutError()).severity is Severity.MEDIUM
        assert classify(classifier, ssl.SSLError(1, "x")).severity is Severity.HIGH
        assert classify(classifier, MemoryError()).severity is Severity.CRITICAL

    @pytest.mark.parametrize(
        ("context", "expected"),
        [
            (ClassifyContext(), Severity.MEDIUM),
            (ClassifyContext(recent_occurrences=REPEAT_THRESHOLD - 1), Severity.MEDIUM),
            (ClassifyContext(recent_occurrences=REPEAT_THRESHOLD), Severity.HIGH),
            (ClassifyContext(breaker_open=True), Severity.HIGH),
            (ClassifyContext(critical=True), Severity.HIGH),
            (ClassifyContext(critical=True, breaker_open=True), Severity.CRITICAL),
            (
                ClassifyContext(critical=True, breaker_open=True, recent_occurrences=99),
                Severity.CRITICAL,
            ),
        ],
    )
    def test_context_raises_severity(
        self, classifier: Classifier, context: ClassifyContext, expected: Severity
    ) -> None:
        assert classify(classifier, TimeoutError(), context=context).severity is expected

    def test_capped_at_critical(self, classifier: Classifier) -> None:
        ctx = ClassifyContext(critical=True)
        assert classify(classifier, MemoryError(), context=ctx).severity is Severity.CRITICAL

    def test_mapping_context_equals_dataclass(self, classifier: Classifier) -> None:
        mapping = {"service": "db", "breaker_open": True, "recent_occurrences": 5}
        dataclass_ctx = ClassifyContext(service="db", breaker_open=True, recent_occurrences=5)
        assert classify(classifier, TimeoutError(), context=mapping) == classify(
            classifier, TimeoutError(), context=dataclass_ctx
        )
        assert classify(classifier, TimeoutError(), context=mapping).severity is Severity.CRITICAL

    @pytest.mark.parametrize(
        "context",
        [
            {"critcal": True},
            {"recent_occurrences": -1},
            {"recent_occurrences": True},
            {"critical": "yes"},
            {"service": 3},
            ["critical"],
        ],
    )
    def test_bad_context(self, classifier: Classifier, context: object) -> None:
        with pytest.raises(ConfigError):
            classify(classifier, TimeoutError(), context=context)

    def test_context_does_not_change_anything_else(self, classifier: Classifier) -> None:
        plain = classify(classifier, TimeoutError())
        raised = classify(classifier, TimeoutError(), context={"critical": True})
        assert (raised.category, raised.retryable, raised.rule, raised.error_type) == (
            plain.category,
            plain.retryable,
            plain.rule,
            plain.error_type,
        )


# -- responses ------------------------------------------------------------------------------------


class TestClassifyStatus:
    def test_success_is_none(self, classifier: Classifier) -> None:
        assert classifier.classify_status(200, now_wall=NOW) is None
        assert classifier.classify_status(399, now_wall=NOW) is None

    def test_rate_limit_with_retry_after(self, classifier: Classifier) -> None:
        result = classifier.classify_status(429, {"Retry-After": "12"}, now_wall=NOW)
        assert result == Classification(
            category=C.RATE_LIMIT,
            severity=Severity.MEDIUM,
            retryable=True,
            error_type="429",
            retry_after=12.0,
            status_code=429,
            rule="http.429",
        )

    def test_rate_limit_reset_header(self, classifier: Classifier) -> None:
        headers = {"X-RateLimit-Reset": str(int(NOW) + 20), "X-RateLimit-Remaining": "0"}
        result = classifier.classify_status(429, headers, now_wall=NOW)
        assert result is not None
        assert result.retry_after == 20.0

    def test_503_and_context(self, classifier: Classifier) -> None:
        result = classifier.classify_status(503, None, now_wall=NOW, context={"critical": True})
        assert result is not None
        assert (result.category, result.severity, result.retry_after) == (
            C.UNAVAILABLE,
            Severity.HIGH,
            None,
        )

    def test_only_status_rules_apply(self, classifier: Classifier) -> None:
        classifier.register_rule(Rule(name="conflict", category=C.CONCURRENCY, status_codes=(409,)))
        classifier.register_rule(
            Rule(name="cls", category=C.TLS, status_codes=(410,), exception_types=("a.B",))
        )
        conflict = classifier.classify_status(409, now_wall=NOW)
        gone = classifier.classify_status(410, now_wall=NOW)
        assert conflict is not None
        assert gone is not None
        assert (conflict.category, gone.category) == (C.CONCURRENCY, C.CLIENT_ERROR)

    def test_odd_status_is_unknown(self, classifier: Classifier) -> None:
        result = classifier.classify_status(600, now_wall=NOW)
        assert result is not None
        assert result.category is C.UNKNOWN


# -- robustness and purity ------------------------------------------------------------------------


class TestRobustness:
    def test_properties_that_raise(self, classifier: Classifier) -> None:
        class Hostile(Exception):
            @property
            def response(self) -> object:
                raise RuntimeError("no")

            @property
            def reason(self) -> object:
                raise RuntimeError("no")

            def __str__(self) -> str:
                raise RuntimeError("no")

        assert classify(classifier, Hostile()).category is C.UNKNOWN

    def test_args_replaced(self, classifier: Classifier) -> None:
        exc = ValueError()
        exc.args = ()
        assert classify(classifier, exc).category is C.UNKNOWN

    def test_core_module_imports_no_clock(self) -> None:
        from otel_raptor.core import classify as module
        from otel_raptor.core import retry_after

        forbidden = {"time", "threading", "asyncio", "opentelemetry", "wrapt", "psutil"}
        for mod in (module, retry_after):
            tree = ast.parse(Path(str(mod.__file__)).read_text())
            imported = {
                alias.name.split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
            } | {
                (node.module or "").split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)
            }
            assert not imported & forbidden, mod.__name__


def test_docs_list_every_builtin_rule() -> None:
    docs = Path(__file__).parents[2] / "docs" / "classification.md"
    text = docs.read_text()
    missing = [rule.name for rule in BUILTIN_RULES if f"`{rule.name}`" not in text]
    assert not missing, f"docs/classification.md lacks {missing}"
