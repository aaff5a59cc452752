"""Replay safety: may a failed operation be sent again without doubling a side effect?

A retry repeats the whole operation. When the first try reached the server before failing
(a timeout after the request was written, a reset before the response), the server may have
acted on it; repeating a payment or an ``INSERT`` then does it twice. So only operations that
are safe to repeat are retried, and the checks here err on the side of "no".

HTTP (RFC 9110 §9.2.2): a request may be repeated when its method is idempotent, when it
carries an ``Idempotency-Key`` header (the server then deduplicates), or when the caller opts
in; and in every case only when its body can be sent again (not a consumed stream).

SQL: a single read-only statement outside an explicit transaction. Inside a transaction a
replay on a new connection would silently run outside it, and after an error PostgreSQL
rejects every further statement of the transaction anyway. The statement check is a cheap,
bounded scan (the first :data:`SQL_SCAN_LIMIT` characters), not a parser; see
:func:`sql_replay_safe`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "IDEMPOTENT_METHODS",
    "SQL_SCAN_LIMIT",
    "http_replay_safe",
    "names_idempotency_key",
    "sql_ends_transaction",
    "sql_may_commit_partway",
    "sql_replay_safe",
]

#: Methods RFC 9110 defines as idempotent (upper case).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: ``sql_replay_safe`` reads at most this many characters; longer statements are not safe.
SQL_SCAN_LIMIT = 2048

_IDEMPOTENCY_KEY = "idempotency-key"


_ABSENT: Final = object()


def _idempotency_key(headers: Mapping[str, object] | Mapping[bytes, object]) -> object:
    """The value ``headers`` give ``Idempotency-Key`` (``None`` included), else ``_ABSENT``."""
    # Case-insensitive header classes (requests, httpx, multidict) answer the two common
    # spellings directly; a plain dict falls through to the scan below.
    for spelling in ("Idempotency-Key", _IDEMPOTENCY_KEY):
        try:
            return headers[spelling]  # type: ignore[index]  # str key on a maybe-bytes mapping
        except (KeyError, TypeError):
            continue
    items: Iterable[tuple[object, object]] = headers.items()
    for key, value in items:
        name = key.decode("latin-1") if isinstance(key, bytes) else key
        if isinstance(name, str) and name.lower() == _IDEMPOTENCY_KEY:
            return value
    return _ABSENT


def _has_idempotency_key(headers: Mapping[str, object] | Mapping[bytes, object]) -> bool:
    value = _idempotency_key(headers)
    return value is not _ABSENT and _non_empty(value)


def names_idempotency_key(headers: Mapping[str, object] | Mapping[bytes, object]) -> bool:
    """Whether ``headers`` have an ``Idempotency-Key`` entry at all (any case), even one whose
    value is ``None`` or empty: requests drops a session header that a request sets to
    ``None``, so such an entry decides for the request, and it says "no key"."""
    return _idempotency_key(headers) is not _ABSENT


def _non_empty(value: object) -> bool:
    if isinstance(value, (str, bytes)):
        return bool(value.strip())
    return value is not None


def http_replay_safe(
    method: str | bytes,
    headers: Mapping[str, object] | Mapping[bytes, object] | None,
    *,
    body_replayable: bool,
    retry_non_idempotent: bool = False,
) -> bool:
    """Whether an HTTP request may be sent again.

    True when the body can be sent again (``body_replayable``: no body, or bytes rather than
    a consumed stream or generator) *and* one of: ``method`` is in
    :data:`IDEMPOTENT_METHODS` (any case), ``headers`` has a non-empty ``Idempotency-Key``
    (any case; ``str`` or ``bytes`` keys), or ``retry_non_idempotent`` is set by the caller.
    """
    if not body_replayable:
        return False
    if retry_non_idempotent:
        return True
    if isinstance(method, bytes):
        method = method.decode("latin-1")
    if method in IDEMPOTENT_METHODS or method.upper() in IDEMPOTENT_METHODS:
        return True
    return headers is not None and _has_idempotency_key(headers)


# Leading whitespace, ``-- line`` comments and ``/* block */`` comments. Each alternative
# consumes at least one character and nothing follows the group, so a failed alternative never
# makes the engine backtrack into earlier repetitions: linear in the text's length.
_LEADING_NOISE = re.compile(r"(?:\s|--[^\n]*|/\*.*?\*/|\()*", re.DOTALL)
_FIRST_WORD = re.compile(r"\w+")
_READ_ONLY_FIRST_WORDS = frozenset({"select", "show", "explain", "values", "with"})
# Anything that writes, locks or has an effect that outlives the statement. Matched anywhere,
# comments and string literals included: a false match only costs a retry, a miss could cost a
# duplicate write. ``update`` also covers ``FOR [NO KEY] UPDATE``; ``lock`` covers MySQL's
# ``LOCK IN SHARE MODE``; ``into`` covers ``SELECT ... INTO`` (a new table, or a file).
# Whole words, except the families that are prefixes (``pg_advisory_lock``, ``lo_import``).
_WORDS = frozenset(
    {
        "insert", "update", "delete", "merge", "upsert", "into", "lock", "nextval", "setval",
        "next",  # only as NEXT VALUE FOR s (MariaDB, standard SQL): nextval by another name
        "pg_notify", "pg_terminate_backend", "pg_cancel_backend", "get_lock", "release_lock",
        "release_all_locks",
    }
)  # fmt: skip
# ``pg_try_advisory`` too: a lock taken by a statement the client gave up on stays taken, and
# a replay takes it again (advisory locks stack, so one unlock no longer frees it). Logical
# decoding's ``get`` consumes what it returns (a replay loses the first batch); ``emit``,
# ``create``, ``drop`` and the replication-origin functions change server state.
_PREFIXES = frozenset(
    {
        "pg_advisory", "pg_try_advisory", "dblink", "lo_", "pg_logical_slot_get",
        "pg_logical_emit", "pg_create_", "pg_drop_", "pg_replication_",
    }
)  # fmt: skip
# One alternation of plain literals, so the engine can skip ahead on their first characters;
# word boundaries are checked in Python for the few candidates it finds (``\b`` in the pattern
# makes the search about 20 times slower).
_CANDIDATES = re.compile(
    "|".join(sorted((*_WORDS, *_PREFIXES, "share", ":="), key=lambda w: (-len(w), w)))
)
_FOR_SHARE = re.compile(r"for\s+(?:key\s+)?share(?!\w)")
# ``next`` alone is a read too (``FETCH NEXT 10 ROWS ONLY``, a column named ``next``).
_VALUE_FOR = re.compile(r"\s+value\s+for(?!\w)")


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _has_side_effect(text: str, position: int) -> bool:
    """Whether ``text`` (lower case) has a side-effect marker at or after ``position``."""
    end_of_text = len(text)
    for match in _CANDIDATES.finditer(text, position):
        word = match.group()
        if word == ":=":
            return True
        start, end = match.span()
        if start > 0 and _is_word_char(text[start - 1]):
            # Inside a longer word (``blocked``, ``hello_x``); no candidate can start within
            # a run of word characters either, so skipping past this one misses nothing.
            continue
        if word in _PREFIXES:
            return True
        if end < end_of_text and _is_word_char(text[end]):
            continue
        if word == "share":
            if _FOR_SHARE.search(text, position) is not None:
                return True
        elif word == "next":
            if _VALUE_FOR.match(text, end) is not None:
                return True
        else:
            return True
    return False


def sql_replay_safe(
    statement: str | bytes | None, *, in_transaction: bool, opt_in: bool = False
) -> bool:
    """Whether a SQL statement may be executed again after a failure.

    Never inside an explicit transaction (``in_transaction``), whatever ``opt_in`` says.
    Otherwise ``opt_in`` (the caller vouches for it) makes any statement safe. Without it the
    statement must be visible (not ``None``), at most :data:`SQL_SCAN_LIMIT` characters, and:

    - begin, after whitespace, comments and opening parentheses, with ``SELECT``, ``SHOW``,
      ``EXPLAIN``, ``VALUES`` or ``WITH``;
    - be a single statement: no ``;`` except trailing ones;
    - contain none of ``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``, ``UPSERT``, ``INTO``,
      ``LOCK``, ``FOR SHARE``/``FOR KEY SHARE`` (and ``FOR UPDATE`` through ``UPDATE``), the
      side-effecting functions ``nextval``, ``setval``, ``pg_advisory*``, ``pg_notify``,
      ``pg_terminate_backend``, ``pg_cancel_backend``, ``dblink*``, ``lo_*``, ``get_lock``,
      ``release_lock``, or a ``:=`` assignment, as whole words in any case, anywhere (so a
      data-modifying CTE or an ``EXPLAIN ANALYZE DELETE`` is refused).

    A ``SELECT`` that calls a user-defined function with side effects cannot be told apart
    from a read; operations calling such functions should be marked not replay safe by the
    caller. The scan costs a few microseconds; integrations may cache it per statement.
    """
    if in_transaction:
        return False
    if opt_in:
        return True
    if statement is None or len(statement) > SQL_SCAN_LIMIT:
        return False
    if isinstance(statement, bytes):
        statement = statement.decode("utf-8", "replace")
    text = statement.lower()
    start = _LEADING_NOISE.match(text)
    position = 0 if start is None else start.end()
    first = _FIRST_WORD.match(text, position)
    if first is None or first.group() not in _READ_ONLY_FIRST_WORDS:
        return False
    if ";" in text.rstrip("; \t\r\n"):
        return False
    return not _has_side_effect(text, position)


# The statements that end a transaction: COMMIT and ROLLBACK (``ROLLBACK TO SAVEPOINT`` too),
# and PostgreSQL's END and ABORT.
_TRANSACTION_ENDS: Final = frozenset({"commit", "rollback", "end", "abort"})


def sql_ends_transaction(statement: object) -> bool:
    """Whether ``statement`` (``str`` or ``bytes``; anything else is not) begins, after
    whitespace and comments, with ``COMMIT``, ``ROLLBACK``, ``END`` or ``ABORT`` (any case).

    Such a statement must never be refused by a breaker: refused, it leaves the connection
    inside its transaction (asyncpg's ``Transaction``, a pool's reset and raptor's own
    ``run_transaction`` send them as plain statements), and everything the application runs
    on that connection afterwards joins a transaction nobody commits."""
    if isinstance(statement, bytes):
        statement = statement[:SQL_SCAN_LIMIT].decode("utf-8", "replace")
    if not isinstance(statement, str):
        return False
    text = statement[:SQL_SCAN_LIMIT].lower()
    start = _LEADING_NOISE.match(text)
    first = _FIRST_WORD.match(text, 0 if start is None else start.end())
    return first is not None and first.group() in _TRANSACTION_ENDS


# Statements that run a procedure or a code block, which may commit as it goes.
_PARTWAY: Final = frozenset({"call", "do"})


def sql_may_commit_partway(statement: object) -> bool:
    """Whether ``statement`` may have committed part of its work when it fails: it begins,
    after whitespace and comments, with ``CALL`` or ``DO`` (a procedure or block, which may
    ``COMMIT`` inside; in MySQL's autocommit every statement of a procedure commits on its
    own), or it cannot be read (not ``str`` or ``bytes``: a composed query object).

    Such a statement is never replayed, not even after a deadlock or a serialization failure:
    the server rolled back only the work since the last commit inside it."""
    if isinstance(statement, bytes):
        statement = statement[:SQL_SCAN_LIMIT].decode("utf-8", "replace")
    if not isinstance(statement, str):
        return True
    text = statement[:SQL_SCAN_LIMIT].lower()
    start = _LEADING_NOISE.match(text)
    first = _FIRST_WORD.match(text, 0 if start is None else start.end())
    return first is not None and first.group() in _PARTWAY
