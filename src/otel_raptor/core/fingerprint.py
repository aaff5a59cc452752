"""Error fingerprints: the exception type, its category and its message with the values taken out.

Two failures belong to the same *pattern* when they differ only in the values interpolated into
their message: ``user 4711 not found`` and ``user 815 not found`` are one bug, ``connection to
10.0.0.7:5432 refused`` and ``connection to 10.0.0.9:5432 refused`` one outage. Sentry groups
messages this way ("parameterization", ``sentry/grouping/parameterization.py``); the
placeholders here follow its names.

``normalize_message`` replaces, in one left-to-right pass, in this order of precedence:

======================  =====================================================  ===============
what                    example                                                placeholder
======================  =====================================================  ===============
secret ``key=value``    ``password=hunter2``, ``token: abc``, ``PASSWORD 'x'``  ``<redacted>`` value
credential after its    ``Bearer eyJhbGci...``, ``token a1b2c3``                ``<redacted>``
scheme word
server's fields         PostgreSQL's ``DETAIL: Key (id)=(7) ...``,           ``<detail>``
                        ``HINT:``, ``CONTEXT:``, ``QUERY:``, ``WHERE:`` (all
                        that follows)
statement echo          PostgreSQL's ``LINE 1: SELECT ...`` (to the end),       ``<sql>``
                        MySQL's ``near 'SELECT ...' at line 1``
query string            ``/orders?sig=abc&code=xyz`` (a path's, after ``?``)   ``?<query>``
e-mail                  ``ops@example.com``                                    ``<email>``
URL                     ``https://api.example.com/v1/items?id=3``              ``<url>``
timestamp               ``2024-05-01T12:00:00Z``, ``2024-05-01 12:00:00.123``  ``<timestamp>``
UUID                    ``6f1c6c4e-5e8f-4a57-9a89-2b1d2f6f3d7a``               ``<uuid>``
IPv4 / IPv6             ``10.0.0.7``, ``::1``, ``fe80::1ff:fe23:4567:890a``    ``<ip>``
hex                     ``0x7f3a``, ``9f86d081884c7d65`` (8+ digits, a digit)  ``<hex>``
JSON Web Token          ``eyJhbGciOiJIUzI1NiJ9.eyJzdWIi...``                   ``<redacted>``
opaque token            ``AKIAIOSFODNN7EXAMPLE`` (20+ characters)              ``<redacted>``
duration                ``30s``, ``2.5ms``, ``10min`` (a number and its unit)  ``<duration>``
quoted value            ``'users_123'``, ``"abc"``, ``'bob smith'``             ``<quoted>``
number                  ``42``, ``-3.5``, ``1e-3``                             ``<int>``/``<float>``
======================  =====================================================  ===============

A double-quoted text with blanks is a sentence (MySQL wraps its messages in them): kept, its
own values replaced. A single-quoted one is a value (SQL's literals, Python's reprs).
Numbers glued to letters (``utf8``, ``v2``, ``Errno``) are kept: they are part of a name, not a
value. Whitespace runs collapse to one space, and the message is cut to ``MAX_MESSAGE_CHARS``
before any of this, so the work per message is bounded. A secret's value never survives into a
template (templates appear in log events); the key stays so the pattern still reads.

Credentials with no key in front of them are found by their shape. After ``Bearer``, ``Basic``
or ``Token`` (any case) a word that looks like a credential (a digit, one of ``+/=``, or mixed
case: ``token abc123`` but not ``token expired``) is redacted, the scheme word kept. A JSON Web
Token (``eyJ...`` header, ``.``-separated parts) is redacted wherever it is. So is an *opaque
token*: a run of 20 or more of ``A-Z a-z 0-9 _ + -`` (and ``=`` padding) that mixes letters and
digits, or changes case at least every third character (``sk-proj-AbCdEf...``), unless its
parts are words in one case, numbers and short names (``shard_replica_set_0001``,
``ERR_TLS_V2``: names). A run that is not one is normalised like any other text; hex ids and
UUIDs keep their own placeholders (they come first). A long CamelCase name with a digit in it
(``Http2ConnectionTerminated``) is taken for a token: a coarser pattern, never a leak. This is
a net, not a guarantee: a short password in free text (``pw hunter2``) has no shape to find.

``fingerprint(error_type, category, template)`` is a 16-hex-digit BLAKE2b digest of the three:
stable across processes and versions, and short enough to be a bounded, opaque id.

Pure: standard library only, no state.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_TEMPLATE_CHARS",
    "PLACEHOLDERS",
    "fingerprint",
    "normalize_message",
    "redact_scheme_credentials",
]

#: Characters of a raw message looked at; the rest is ignored (bounded work per message).
MAX_MESSAGE_CHARS: Final = 512
#: Characters of a template kept (after normalisation).
MAX_TEMPLATE_CHARS: Final = 256

#: Every placeholder ``normalize_message`` can write.
PLACEHOLDERS: Final = (
    "<redacted>",
    "<detail>",
    "<sql>",
    "<query>",
    "<email>",
    "<url>",
    "<timestamp>",
    "<uuid>",
    "<ip>",
    "<hex>",
    "<duration>",
    "<quoted>",
    "<float>",
    "<int>",
)

# Keys whose values are secrets (the same words as telemetry.redact, which core cannot import).
_SECRET_KEYS: Final = (
    r"password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|credentials?|authorization|cookie|session[_-]?id|signature"
)

_OCTET: Final = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4: Final = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# IPv6: at least two groups around a `::`, or the full eight; good enough to catch what
# socket errors print (`::1`, `fe80::1`, `2001:db8::8a2e:370:7334`) without eating `a::b` names.
_H16: Final = r"[0-9A-Fa-f]{1,4}"
_IPV6: Final = (
    rf"(?:{_H16}:){{7}}{_H16}"
    rf"|(?:{_H16}:){{1,6}}:(?:{_H16}(?::{_H16}){{0,5}})?"
    rf"|::(?:{_H16}(?::{_H16}){{0,6}})"
)

# One alternation, tried left to right at each position: the first branch that matches wins,
# so the order is the precedence of the table above. Each branch starts at a boundary (a
# lookbehind, not ``\b``, so `_` and `.` count as part of a word where they should) and has
# no nested repetition: the scan stays linear on long inputs.
# A secret's key: one of the words above, glued to at most 20 more name characters
# (``db_password``, ``X-Auth-Token``, ``refresh_token``), then ``=`` or ``:``; its value is
# quoted, a ``Bearer``/``Basic`` credential, or runs to the next separator. Applied before the
# rest and only to messages that contain one of the words (a cheap C-level scan).
# Short keys that are secrets only as a whole key (``auth=``, ``jwt=``, ``sid=``, Azure's
# ``sig=``): inside a longer name they are other words (``author``, ``inside``, ``signal``).
_SHORT_SECRET_KEYS: Final = r"(?<![\w-])(?:auth|jwt|sid|sig)(?=[\"']?\s*[=:])"
_SECRET_WORD: Final = re.compile(rf"{_SECRET_KEYS}|{_SHORT_SECRET_KEYS}", re.IGNORECASE)
_SECRET_PAIR: Final = re.compile(
    rf"(?P<key>(?:(?:{_SECRET_KEYS})[\w-]{{0,20}}|{_SHORT_SECRET_KEYS})"
    r"(?:[\"']?\s*[=:]\s*|\s+(?=[\"'])))"
    r"(?P<value>\"[^\"]*\"|'[^']*'|(?:Bearer|Basic)\s+[^\s,;&)\]}]+|[^\s,;&)\]}]+)",
    re.IGNORECASE,
)

# One alternation, tried left to right at each position: the first branch that matches wins,
# so the order is the precedence of the table above. Each branch starts at a boundary (a
# lookbehind, not ``\b``, so `_` and `.` count as part of a word where they should), nests no
# repetition and bounds every run it scans before it can fail: a message of n characters costs
# O(n) however it is built (``a.a.a.a...`` included).
_BRANCHES: Final = (
    r"(?P<email>(?<![.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8})",
    r"(?P<url>(?<![+.-])[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s'\"<>)\]},]{1,512})",
    r"(?P<timestamp>(?<![.:-])\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?"
    r"(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?)?(?![\w:]))",
    r"(?P<uuid>(?<!-)[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}"
    r"-[0-9A-Fa-f]{12}(?![\w-]))",
    rf"(?P<ip>(?<![.:])(?:{_IPV4}(?!\w|\.\d)|(?:{_IPV6})(?![\w:])))",
    r"(?P<hex>(?<!\.)(?:0[xX][0-9A-Fa-f]{1,64}|[0-9A-Fa-f]{8,128})(?![\w.]))",
    # A JSON Web Token: a base64url JSON header (``{"`` is ``eyJ``), two or more
    # ``.``-separated parts (the signature may be empty, a JWE has five).
    r"(?P<jwt>(?<!\.)eyJ[A-Za-z0-9_-]{1,512}(?:\.[A-Za-z0-9_-]{0,512}){2,4}(?![\w.<-]))",
    # A run of 20+ token characters: an API key, a session id, a base64 secret, or a
    # long name (``_replace`` tells which). Not glued to a placeholder (``<``), so that a
    # template normalises to itself.
    r"(?P<token>[A-Za-z0-9][A-Za-z0-9_+-]{19,511}={0,2}(?![\w+=<-]))",
    r"(?P<duration>(?<!\.)\d{1,20}(?:\.\d{1,20})?(?:ms|us|µs|ns|s|sec|secs|seconds?"
    r"|m|min|minutes?|h|hours?)(?!\w))",
    # A double-quoted sentence (``(1062, "Duplicate entry '42' for key 'PRIMARY'")``)
    # is text: kept, and its own values replaced. Single quotes hold values, blanks
    # or not: SQL literals (``'bob smith'``), Python reprs.
    # An HTTP status line (httpx: ``Server error '503 Service Unavailable'``) keeps
    # its reason phrase: 500 and 503 are different failures.
    r"(?P<status>'(?:[1-5]\d\d) (?P<reason>[A-Z][A-Za-z -]{0,40})'(?!\w))",
    r"(?P<quoted>\"[^\"\s]{0,200}\"|'[^']{0,200}'(?!\w))",
    r"(?P<float>(?<!\.)[-+]?(?:\d{1,64}\.\d{1,64}(?:[eE][-+]?\d{1,4})?"
    r"|\d{1,64}[eE][-+]?\d{1,4})(?![\w.]))",
    r"(?P<int>(?<!\.)[-+]?\d{1,64}(?![\w]|\.\d))",
)


def _alternation(branches: tuple[str, ...]) -> re.Pattern[str]:
    # Every branch starts where no word character precedes: said once up front, this rejects
    # the positions inside words with one check instead of one per branch.
    return re.compile(r"(?<!\w)(?:" + "|".join(branches) + ")")


_PATTERN: Final = _alternation(_BRANCHES)
# The same without the opaque-token branch: what a run of token characters that is a name,
# not a token, is normalised with (its numbers still become placeholders).
_PATTERN_NO_TOKEN: Final = _alternation(
    tuple(branch for branch in _BRANCHES if not branch.startswith("(?P<token>"))
)
_SPACES: Final = re.compile(r"\s+")
# The statement a server echoes back holds its literals (and, in ``ALTER USER ... PASSWORD``,
# secrets): PostgreSQL's ``LINE n:`` runs to the end of the message (the caret line follows),
# MySQL's ``near '...' at line n`` quotes it, nested quotes and all.
_PG_ECHO: Final = re.compile(r"\bLINE \d{1,9}: .*")
# PostgreSQL's fields after the message hold the data itself: ``DETAIL: Key (email)=(...)``,
# ``Failing row contains (...)``, the statement a function ran (``CONTEXT: SQL statement``),
# the query (``QUERY:``). psycopg and psycopg2 put them in the exception's text; the
# message's first line says what went wrong, so the fields go whole.
_PG_FIELDS: Final = re.compile(r"\b(?:DETAIL|HINT|CONTEXT|QUERY|WHERE):\s.*")
_MYSQL_ECHO: Final = re.compile(r"\bnear '.{0,512}' at line \d{1,9}")
# A query string after a path or a host (``url: /orders?sig=abc``): a full URL is the
# ``<url>`` branch's, but urllib3 prints the path alone.
_QUERY: Final = re.compile(r"(?<=[\w/>])\?(?=[\w.\[\]-]{1,64}=)[^\s'\"()]{1,512}")


# A credential after its scheme word, without a key (``invalid bearer token eyJ...``,
# ``token abc123 expired``, ``refresh_token abc123``): the word after it, dotted parts and
# ``=`` padding included. The value may not itself be a scheme word, so that in
# ``bearer token X`` the scan moves on to ``token X``; ``_credential`` decides whether the
# value is a credential or a word of the sentence. Not glued to a placeholder (``<``), so
# that a template normalises to itself.
_SCHEME: Final = re.compile(
    r"(?<![A-Za-z0-9])(?P<scheme>bearer|basic|token)(?P<gap>\s{1,5})"
    r"(?!(?:bearer|basic|token)(?![\w~+/=-]))"
    r"(?P<value>[A-Za-z0-9_~+/-]{1,512}(?:\.[A-Za-z0-9_~+/-]{1,512}){0,4}={0,2})(?![\w~+/=<-])",
    re.IGNORECASE,
)
_SCHEME_WORD: Final = re.compile(r"bearer|basic|token", re.IGNORECASE)
# How often an opaque token changes case at least (one change every this many characters):
# random base62 changes every second character, ``ConnectionRefusedError`` every fourth.
_CASE_CHANGE_EVERY: Final = 3
# Separators of the parts of a long name (``shard_replica_set_0001``, ``ERR_TLS_V2``), and the
# length up to which a part mixing letters and digits in one case is a name (``utf8``, ``v2``).
_TOKEN_SEPARATORS: Final = re.compile(r"[_+=-]")
_SHORT_NAME: Final = 4


def _redact(match: re.Match[str]) -> str:
    return f"{match.group('key')}<redacted>"


def _case_changes(text: str) -> int:
    changes = 0
    previous = 0  # 1 upper, -1 lower, 0 neither
    for char in text:
        case = 1 if char.isupper() else -1 if char.islower() else 0
        if case and previous and case != previous:
            changes += 1
        if case:
            previous = case
    return changes


def _credential(value: str) -> bool:
    """Whether the word after ``Bearer``/``Basic``/``Token`` looks like a credential rather
    than a word of the sentence (``token expired``)."""
    if any(char.isdigit() or char in "+/=" for char in value):
        return True
    return any(char.isupper() for char in value[1:]) and any(char.islower() for char in value)


def _redact_scheme(match: re.Match[str], placeholder: str = "<redacted>") -> str:
    if not _credential(match.group("value")):
        return match.group(0)
    return f"{match.group('scheme')}{match.group('gap')}{placeholder}"


def redact_scheme_credentials(text: str, placeholder: str) -> str:
    """``text`` with the credential after each ``Bearer``, ``Basic`` or ``Token`` (by its
    shape, see the module docstring) replaced by ``placeholder``, the scheme word kept."""
    if _SCHEME_WORD.search(text) is None:
        return text
    return _SCHEME.sub(lambda match: _redact_scheme(match, placeholder), text)


def _is_word(part: str) -> bool:
    """A number, a word in one case (``replica``, ``ERROR``), or a short name (``v2``)."""
    if part.isdigit():
        return True
    one_case = part.islower() or part.isupper()
    return one_case and (part.isalpha() or len(part) <= _SHORT_NAME)


def _opaque(token: str) -> bool:
    """Whether a run of 20+ token characters is a key or a token rather than a name: letters
    and digits mixed, or frequent changes of case, and not only lower-case words and
    numbers (``shard_replica_set_0001``)."""
    if all(_is_word(part) for part in _TOKEN_SEPARATORS.split(token) if part):
        return False
    if any(char.isdigit() for char in token) and any(char.isalpha() for char in token):
        return True
    return _case_changes(token) * _CASE_CHANGE_EVERY >= len(token)


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "status":
        return f"'<int> {match.group('reason')}'"
    if kind == "hex":
        text = match.group(0)
        if text[:2] in ("0x", "0X"):
            return "<hex>"
        if text.isdigit():
            return "<int>"  # a long number, not an id in hex
        if not any(char.isdigit() for char in text):
            return text  # a word made of the letters a-f (`deadbeef`, `defaced`)
        return "<hex>"
    if kind == "jwt":
        return "<redacted>"
    if kind == "token":
        text = match.group(0)
        return "<redacted>" if _opaque(text) else _PATTERN_NO_TOKEN.sub(_replace, text)
    return f"<{kind}>"


def normalize_message(message: str) -> str:
    """``message`` with its values replaced by placeholders (see the module docstring).

    The result is at most ``MAX_TEMPLATE_CHARS`` long; an empty or all-blank message gives
    ``""``.
    """
    text = _SPACES.sub(" ", message[:MAX_MESSAGE_CHARS]).strip()
    if not text:
        return ""
    if ": " in text:
        text = _PG_FIELDS.sub("<detail>", text)
    if "LINE " in text:
        text = _PG_ECHO.sub("LINE <int>: <sql>", text)
    if "near '" in text:
        text = _MYSQL_ECHO.sub("near <sql> at line <int>", text)
    if _SECRET_WORD.search(text) is not None:
        text = _SECRET_PAIR.sub(_redact, text)
    if _SCHEME_WORD.search(text) is not None:
        text = _SCHEME.sub(_redact_scheme, text)
    text = _PATTERN.sub(_replace, text)
    if "?" in text:  # after the URLs have become <url>: what is left is a bare path's
        text = _QUERY.sub("?<query>", text)
    return text[:MAX_TEMPLATE_CHARS]


def fingerprint(error_type: str, category: str, template: str) -> str:
    """The pattern id of a failure: 16 lower-case hex digits (BLAKE2b, 64 bits)."""
    key = f"{error_type}\x00{category}\x00{template}".encode("utf-8", "replace")
    return hashlib.blake2b(key, digest_size=8).hexdigest()
