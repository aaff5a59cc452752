"""Message normalisation and fingerprints (Sentry-style parameterization).

Real messages from real libraries are in tests/integrations/test_fingerprint_real.py; these are
the rules one by one, the bounds, and the property that values never leak into a template.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.fingerprint import (
    MAX_TEMPLATE_CHARS,
    fingerprint,
    normalize_message,
)


@pytest.mark.parametrize(
    ("message", "template"),
    [
        ("user 4711 not found", "user <int> not found"),
        ("balance is -3.5 after 1e-3 fee", "balance is <float> after <float> fee"),
        ("request 6f1c6c4e-5e8f-4a57-9a89-2b1d2f6f3d7a failed", "request <uuid> failed"),
        ("object at 0x7f3a2c1d5e50", "object at <hex>"),
        ("sha a94a8fe5ccb19ba61c4c0873d391e987982fbbd3", "sha <hex>"),
        ("connect to 10.0.0.7:5432 refused", "connect to <ip>:<int> refused"),
        ("reset by fe80::1ff:fe23:4567:890a and ::1", "reset by <ip> and <ip>"),
        ("mail ops@example.com bounced", "mail <email> bounced"),
        ("GET https://api.example.com/v1/items?id=3 failed", "GET <url> failed"),
        ("at 2024-05-01T12:00:00.123Z and 2024-05-01 12:00:00", "at <timestamp> and <timestamp>"),
        ("timed out after 30s (2.5ms)", "timed out after <duration> (<duration>)"),
        ("relation 'users_123' does not exist", "relation <quoted> does not exist"),
        ('database "shop_1" does not exist', "database <quoted> does not exist"),
        # A quoted sentence is text: its values are replaced, its words kept.
        (
            "(1062, \"Duplicate entry '42' for key 'PRIMARY'\")",
            '(<int>, "Duplicate entry <quoted> for key <quoted>")',
        ),
        ("too many\n   spaces\there", "too many spaces here"),
        # Single quotes hold values, blanks or not; a status line keeps its reason phrase.
        ("KeyError: 'bob smith'", "KeyError: <quoted>"),
        (
            "Server error '503 Service Unavailable' for url 'http://h/x'",
            "Server error '<int> Service Unavailable' for url <quoted>",
        ),
        # What a server echoes of a statement is the statement: its literals, its secrets.
        (
            "syntax error at or near \"FOO\"\nLINE 1: SELECT 'my secret' FROM t\n    ^",
            "syntax error at or near <quoted> LINE <int>: <sql>",
        ),
        (
            '(1064, "You have an error in your SQL syntax; check the manual for the right syntax'
            " to use near 'SELECT 'other secret phrase' FROM nope' at line 1\")",
            '(<int>, "You have an error in your SQL syntax; check the manual for the right syntax'
            ' to use near <sql> at line <int>")',
        ),
        # PostgreSQL's fields after the message carry the rows and statements themselves.
        (
            'duplicate key value violates unique constraint "users_pkey"\n'
            "DETAIL:  Key (email_name)=(Alice Smith) already exists.",
            "duplicate key value violates unique constraint <quoted> <detail>",
        ),
        (
            'null value in column "email" of relation "users" violates not-null constraint\n'
            "DETAIL:  Failing row contains (null, hunter2pass).",
            "null value in column <quoted> of relation <quoted> violates not-null constraint"
            " <detail>",
        ),
        (
            "division by zero\nCONTEXT:  SQL statement \"SELECT 'secret' / 0\"\n"
            "PL/pgSQL function f() line 3 at PERFORM",
            "division by zero <detail>",
        ),
        # A bare path's query string goes whole (urllib3 prints the path without the host).
        (
            "Max retries exceeded with url: /orders?sig=AbC&code=xyz (Caused by X)",
            "Max retries exceeded with url: /orders?<query> (Caused by X)",
        ),
        # Names with digits in them are names, not values.
        ("utf8 codec in v2 of http2 at [Errno 111]", "utf8 codec in v2 of http2 at [Errno <int>]"),
        ("deadbeef is a word", "deadbeef is a word"),
    ],
)
def test_values_become_placeholders(message: str, template: str) -> None:
    assert normalize_message(message) == template


@pytest.mark.parametrize(
    "message",
    [
        "login failed: password=hunter2",
        "login failed: PASSWORD: 'hunter2'",
        "bad header Authorization: Bearer hunter2",
        "db_password=hunter2 in dsn",
        'config {"api_key": "hunter2"}',
        "token=hunter2&other=1",
        "ALTER USER nobody WITH PASSWORD 'hunter2 horse'",
        "bad credentials auth=hunter2xyz",
        "expired jwt: hunter2.payload.sig",
        "unknown session sid=hunter2abc",
        "SAS rejected: sp=r&sig=hunter2%3D",
    ],
)
def test_secrets_never_reach_a_template(message: str) -> None:
    template = normalize_message(message)
    assert "hunter2" not in template
    assert "<redacted>" in template


def test_short_secret_keys_count_only_as_whole_keys() -> None:
    # "auth", "sid" and "sig" are secrets as keys of their own, other words inside a name.
    assert normalize_message("author: bob inside: lab design: flat") == (
        "author: bob inside: lab design: flat"
    )


@pytest.mark.parametrize(
    ("message", "template"),
    [
        # A credential after its scheme word, with no key in front: the scheme word stays.
        (
            "Authorization header: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sflKxwRJSM",
            "Authorization header: Bearer <redacted>",
        ),
        ("auth with Basic dXNlcjpwYXNz failed", "auth with Basic <redacted> failed"),
        ("token abcdefXYZ123ghijk expired", "token <redacted> expired"),
        ("refresh_token a1b2c3 revoked", "refresh_token <redacted> revoked"),
        # A JSON Web Token wherever it is (``bearer token`` is two words, then the token).
        (
            "401 Unauthorized: invalid bearer token"
            " eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sflKxwRJSMeKKF2QT4fwpM",
            "<int> Unauthorized: invalid bearer token <redacted>",
        ),
        # Opaque tokens: 20+ characters mixing letters and digits, or changing case often.
        (
            "AWS AccessKeyId AKIAIOSFODNN7EXAMPLE is invalid",
            "AWS AccessKeyId <redacted> is invalid",
        ),
        (
            "Incorrect API key provided: sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz. See the docs",
            "Incorrect API key provided: <redacted>. See the docs",
        ),
        ("session abcDEF123xyzSESSIONVALUE expired", "session <redacted> expired"),
    ],
)
def test_credentials_without_a_key_are_redacted(message: str, template: str) -> None:
    assert normalize_message(message) == template


@pytest.mark.parametrize(
    ("message", "template"),
    [
        # Words after a scheme word are words of the sentence.
        ("Token expired", "Token expired"),
        ("invalid token provided", "invalid token provided"),
        ("Bearer realm=api rejected the request", "Bearer realm=api rejected the request"),
        ("basic auth failed for user bob", "basic auth failed for user bob"),
        ("Tokenizer failed at 3", "Tokenizer failed at <int>"),
        # Long names are names: class names, constants, lower-case words and numbers.
        ("HTTPSConnectionPoolTimeout occurred", "HTTPSConnectionPoolTimeout occurred"),
        ("ERR_CONNECTION_REFUSED_BY_UPSTREAM", "ERR_CONNECTION_REFUSED_BY_UPSTREAM"),
        ("shard_replica_set_0001 is down", "shard_replica_set_0001 is down"),
        (
            "connection-pool-exhausted-for-db-replica-2",
            "connection-pool-exhausted-for-db-replica-<int>",
        ),
        ("user-12345678901234567890 missing", "user-<int> missing"),
        (
            "module psycopg2.errors.UniqueViolation raised",
            "module psycopg2.errors.UniqueViolation raised",
        ),
        # Ids keep their own placeholders.
        ("sha a94a8fe5ccb19ba61c4c0873d391e987982fbbd3", "sha <hex>"),
        (
            "GET /v1/users/8f14e45fceea167a5a36dedd4bea2543/orders failed",
            "GET /v1/users/<hex>/orders failed",
        ),
    ],
)
def test_ordinary_words_and_names_are_not_taken_for_credentials(
    message: str, template: str
) -> None:
    assert normalize_message(message) == template


def test_opaque_tokens_share_one_pattern() -> None:
    # Two sessions, one bug: the token is a value like any other.
    first = normalize_message("session abcDEF123xyzSESSIONVALUE expired")
    second = normalize_message("session Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2 expired")
    assert first == second == "session <redacted> expired"


def test_messages_differing_only_in_values_share_a_fingerprint() -> None:
    first = normalize_message("user 4711 not found at 10.0.0.7")
    second = normalize_message("user 815 not found at 10.0.0.9")
    assert first == second
    assert fingerprint("KeyError", "unknown", first) == fingerprint("KeyError", "unknown", second)
    # ...but type and category are part of the identity.
    assert fingerprint("KeyError", "unknown", first) != fingerprint("LookupError", "unknown", first)
    assert fingerprint("KeyError", "unknown", first) != fingerprint("KeyError", "query", first)


def test_a_fingerprint_is_16_hex_digits_and_stable() -> None:
    value = fingerprint("TimeoutError", "timeout", "read timed out after <duration>")
    assert len(value) == 16
    int(value, 16)
    # Stable across processes and versions: a fixed digest of the three parts.
    assert value == fingerprint("TimeoutError", "timeout", "read timed out after <duration>")
    # The same digest in every process and version (BLAKE2b-64 of the three parts): a change
    # here would split every pattern of a fleet in two.
    assert value == "e420e2495e65d3f9"


def test_empty_and_blank_messages() -> None:
    assert normalize_message("") == ""
    assert normalize_message("   \n\t ") == ""


@pytest.mark.parametrize(
    "hostile",
    ["a." * 300, "1." * 300, "1:" * 300, "a@" * 300, "@a." * 200, "'" + "a" * 600, "x" * 5000],
)
def test_the_work_per_message_is_bounded(hostile: str) -> None:
    # Inputs that make naive patterns backtrack quadratically; each must stay fast. The bound
    # is generous (a shared CI machine), the point is "not seconds".
    started = time.perf_counter()
    template = normalize_message(hostile)
    assert time.perf_counter() - started < 0.05
    assert len(template) <= MAX_TEMPLATE_CHARS


@given(
    prefix=st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=30),
    number=st.integers(min_value=0, max_value=10**12),
    suffix=st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=30),
)
def test_standalone_numbers_never_survive(prefix: str, number: int, suffix: str) -> None:
    template = normalize_message(f"{prefix} {number} {suffix}")
    assert str(number) not in template.split()


@given(st.text(max_size=600))
def test_normalising_is_total_bounded_and_idempotent(text: str) -> None:
    template = normalize_message(text)
    assert len(template) <= MAX_TEMPLATE_CHARS
    assert normalize_message(template) == template
