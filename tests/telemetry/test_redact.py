"""Secrets never reach telemetry: URLs, headers, exception messages and stack traces."""

from __future__ import annotations

import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN

from otel_raptor.telemetry.redact import (
    REDACTED,
    exception_attributes,
    record_exception,
    redact_headers,
    redact_url,
    safe_exception_message,
    scrub_text,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com/v1/items", "https://api.example.com/v1/items"),
        (
            "https://user:pw@api.example.com:8443/v1?token=abc#frag",
            "https://api.example.com:8443/v1",
        ),
        ("http://user@host/p", "http://host/p"),
        ("postgresql://app:s3cret@db.internal:5432/orders", "postgresql://db.internal:5432/orders"),
        ("redis://:hunter2@cache:6379/0", "redis://cache:6379/0"),
        ("http://[::1]:8080/health?x=1", "http://[::1]:8080/health"),
        ("https://h/a;params?q=1", "https://h/a;params"),
        ("//cdn.example.com/lib.js?v=3", "//cdn.example.com/lib.js"),
        ("/v1/items?sig=abc", "/v1/items"),
        ("user:pw@host/path?x=1", "host/path"),
        ("", ""),
        ("http://[::1/broken", REDACTED),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_headers() -> None:
    headers = {
        "Authorization": "Bearer abc",
        "proxy-authorization": "Basic xyz",
        "Cookie": "session=1",
        "Set-Cookie": "id=2",
        "X-Api-Key": "k",
        "X-Amz-Security-Token": "t",
        "X-Client-Secret": "s",
        "X-DB-Password": "p",
        "Idempotency-Key": "i",
        "Content-Type": "application/json",
        "Accept": "*/*",
        "User-Agent": "raptor",
    }
    assert redact_headers(headers) == {
        "Authorization": REDACTED,
        "proxy-authorization": REDACTED,
        "Cookie": REDACTED,
        "Set-Cookie": REDACTED,
        "X-Api-Key": REDACTED,
        "X-Amz-Security-Token": REDACTED,
        "X-Client-Secret": REDACTED,
        "X-DB-Password": REDACTED,
        "Idempotency-Key": REDACTED,
        "Content-Type": "application/json",
        "Accept": "*/*",
        "User-Agent": "raptor",
    }
    assert headers["Authorization"] == "Bearer abc"  # a copy: the input is untouched


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "could not connect to postgresql://app:s3cret@db:5432/orders",
            "could not connect to postgresql://db:5432/orders",
        ),
        (
            "GET https://api.example.com/v1/x?api_key=abc123 failed: 503",
            "GET https://api.example.com/v1/x failed: 503",
        ),
        (
            "host=db port=5432 password=s3cret dbname=x",
            "host=db port=5432 password=REDACTED dbname=x",
        ),
        ('{"user": "bob", "password": "s3cret"}', '{"user": "bob", "password": "REDACTED"}'),
        ("token: 'abc def'", "token: 'REDACTED'"),
        ("Authorization: Bearer eyJhbGciOi.x.y rejected", "Authorization: REDACTED rejected"),
        (
            "db_password=x&access_token=y&page=2",
            "db_password=REDACTED&access_token=REDACTED&page=2",
        ),
        ("requested /v1/items?sig=abc&user=1 too often", "requested /v1/items too often"),
        (
            "bad SAS sv=2022-11-02&se=2026-12-31&sp=r&sig=c2lnbmF0dXJl%3D given",
            "bad SAS sv=2022-11-02&se=2026-12-31&sp=r&sig=REDACTED given",
        ),
        ("design=flat signal=9 sigma=0.5", "design=flat signal=9 sigma=0.5"),
        (
            "auth=hunter2 jwt: eyJ0.e30.x sid=abc123 author=bob inside=x",
            "auth=REDACTED jwt: REDACTED sid=REDACTED author=bob inside=x",
        ),
        (
            'FATAL:  password authentication failed for user "bob"',
            'FATAL:  password authentication failed for user "bob"',
        ),
        ("Connection refused", "Connection refused"),
        ("timeout: 30s", "timeout: 30s"),
    ],
)
def test_safe_exception_message(message: str, expected: str) -> None:
    assert safe_exception_message(RuntimeError(message)) == expected


def _header_value_errors() -> list[Exception]:
    """What requests and h11 (under httpx) raise for a token read with its newline: the
    header's value, token and all, with no ``key=`` in front of it."""
    import h11
    import requests

    errors: list[Exception] = []
    bad = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.U0lHTkVE\n"
    try:
        requests.Request("GET", "http://api.internal/", headers={"Authorization": bad}).prepare()
    except requests.exceptions.InvalidHeader as error:
        errors.append(error)
    try:
        h11.Request(method="GET", target="/", headers=[("Host", "h"), ("Authorization", bad)])
    except h11.LocalProtocolError as error:
        errors.append(error)
    basic = "Basic dXNlcjpodW50ZXIy "
    try:
        h11.Request(method="GET", target="/", headers=[("Host", "h"), ("Authorization", basic)])
    except h11.LocalProtocolError as error:
        errors.append(error)
    assert len(errors) == 3
    return errors


def test_a_credential_after_its_scheme_word_is_hidden_without_a_key() -> None:
    for error in _header_value_errors():
        message = safe_exception_message(error)
        assert "eyJhbGciOiJIUzI1NiJ9" not in message, message
        assert "dXNlcjpodW50ZXIy" not in message, message
        assert REDACTED in message
        stacktrace = exception_attributes(error)["exception.stacktrace"]
        assert "eyJhbGciOiJIUzI1NiJ9" not in stacktrace
        assert "dXNlcjpodW50ZXIy" not in stacktrace
    # A word of the sentence after a scheme word stays.
    assert scrub_text("Basic auth failed; token expired") == "Basic auth failed; token expired"


_SECRET = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), max_codepoint=0x7F),
    min_size=8,
    max_size=24,
)
_KEY = st.sampled_from(
    [
        "password",
        "PASSWORD",
        "db_password",
        "api_key",
        "apikey",
        "access_token",
        "secret",
        "client_secret",
        "X-Auth-Token",
        "session_id",
        "pwd",
        "signature",
    ]
)
_FORM = st.sampled_from(["{k}={v}", "{k}: {v}", '"{k}": "{v}"', "{k}='{v}'", "{k} = {v}"])


@given(_KEY, _SECRET, _FORM, st.text(max_size=20), st.text(max_size=20))
def test_secret_pairs_never_survive(key: str, secret: str, form: str, pre: str, post: str) -> None:
    assume(secret not in pre and secret not in post)
    assume(secret not in REDACTED)  # the placeholder itself is what a secret turns into
    message = f"{pre} {form.format(k=key, v=secret)} {post}"
    assert secret not in safe_exception_message(ValueError(message))


@given(_SECRET, _SECRET, st.sampled_from(["http", "https", "postgresql", "redis", "amqp"]))
def test_url_credentials_and_queries_never_survive(user: str, secret: str, scheme: str) -> None:
    assume(secret not in REDACTED)
    message = f"failed: {scheme}://{user}:{secret}@host.example:1234/path?q={secret}#x{secret}"
    scrubbed = safe_exception_message(OSError(message))
    assert secret not in scrubbed
    assert f"{scheme}://host.example:1234/path" in scrubbed


def test_long_messages_are_cut_after_scrubbing() -> None:
    message = "x" * 2000 + " password=hunter22"
    out = safe_exception_message(RuntimeError(message), max_length=100)
    assert len(out) == 100
    assert out.endswith("…")
    assert "hunter22" not in safe_exception_message(RuntimeError(message))


def test_an_unprintable_exception_does_not_raise() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert (
        safe_exception_message(Weird())
        == "<unprintable test_an_unprintable_exception_does_not_raise.<locals>.Weird>"
    )


def _raise_with_secret() -> None:
    try:
        raise KeyError("lookup of token=inner-secret failed")
    except KeyError as inner:
        raise ConnectionError("https://bob:outer-secret@api/x?key=q-secret") from inner


def test_exception_attributes_are_semconv_and_scrubbed() -> None:
    with pytest.raises(ConnectionError) as info:
        _raise_with_secret()
    attributes = exception_attributes(info.value)
    assert attributes["exception.type"] == "ConnectionError"  # builtins are bare
    assert attributes["exception.message"] == "https://api/x"
    stack = attributes["exception.stacktrace"]
    assert "_raise_with_secret" in stack
    assert "KeyError" in stack  # the chained cause is kept...
    for secret in ("inner-secret", "outer-secret", "q-secret"):
        assert secret not in stack  # ...but scrubbed
    assert exception_attributes(RuntimeError.__new__(RuntimeError))["exception.type"] == (
        "RuntimeError"
    )


def test_exception_type_is_qualified_outside_builtins() -> None:
    from otel_raptor.errors import CircuitOpenError

    assert exception_attributes(CircuitOpenError("db"))["exception.type"] == (
        "otel_raptor.errors.CircuitOpenError"
    )


def test_record_exception_adds_a_scrubbed_exception_event() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("call") as span:
        record_exception(span, ValueError("password=hunter2 rejected"), escaped=True)
    (finished,) = exporter.get_finished_spans()
    (event,) = finished.events
    assert event.name == "exception"
    attributes = dict(event.attributes or {})
    assert attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "password=REDACTED rejected"
    assert "hunter2" not in str(attributes)


def test_record_exception_on_a_non_recording_span_is_a_no_op() -> None:
    touched: list[str] = []

    class NotRecording:
        def is_recording(self) -> bool:
            return False

        def __getattr__(self, name: str) -> object:
            touched.append(name)
            raise AssertionError(f"{name} used on a span that does not record")

    span = NotRecording()
    assert record_exception(span, ValueError("x")) is None  # type: ignore[arg-type, func-returns-value]
    assert touched == []
    assert record_exception(INVALID_SPAN, ValueError("x")) is None  # type: ignore[func-returns-value]


@pytest.mark.parametrize(
    "unit",
    [
        "a",
        "a.",
        "/.",
        "token",
        "passwordtoken",
        "a=",
        "http:",
        "x://",
        "/a?",
        "a@",
        "=",
        "a ",
        "pwd '",
        "a \t",
    ],
)
def test_scrubbing_is_linear_on_adversarial_input(unit: str) -> None:
    # A backtracking pattern takes minutes on these; a linear scan, milliseconds.
    text = unit * (100_000 // len(unit))
    start = time.perf_counter()
    scrub_text(text)
    assert time.perf_counter() - start < 1.0


def test_scrub_text_leaves_plain_text_alone() -> None:
    text = 'Traceback (most recent call last):\n  File "app.py", line 3\nValueError: bad input'
    assert scrub_text(text) == text


@pytest.mark.parametrize(
    "message",
    [
        # PostgreSQL echoes the statement of a syntax error (LINE 1: ...), MySQL quotes it.
        "unrecognized role option \"x\"\nLINE 1: ALTER ROLE bob WITH PASSWORD 'hunter22' x",
        "You have an error in your SQL syntax near 'PASSWORD \"hunter22\"' at line 1",
        "pwd  'hunter22'",
    ],
)
def test_a_quoted_secret_after_its_key_word_and_a_space_is_hidden(message: str) -> None:
    # The words core.fingerprint hides in error patterns (its `PASSWORD 'x'` form) must not
    # reach exception.message through record_exception either.
    scrubbed = safe_exception_message(RuntimeError(message))
    assert "hunter22" not in scrubbed, scrubbed
    assert REDACTED in scrubbed
    # A harmless quoted word after a harmless key stays.
    assert scrub_text("for user 'bob'") == "for user 'bob'"


def test_a_password_echoed_by_a_real_postgresql_syntax_error_is_hidden() -> None:
    from tests.support.services import POSTGRES, require_service

    require_service("PostgreSQL", POSTGRES)
    psycopg = pytest.importorskip("psycopg")
    host, port = POSTGRES
    with (
        psycopg.connect(host=host, port=port, dbname="test", user="postgres") as connection,
        pytest.raises(psycopg.Error) as caught,
    ):
        connection.execute("ALTER ROLE postgres WITH PASSWORD 'hunter22' garbage")
    assert "hunter22" in str(caught.value)  # the server did echo it
    attributes = exception_attributes(caught.value)
    assert "hunter22" not in attributes["exception.message"]
    assert "hunter22" not in attributes["exception.stacktrace"]
