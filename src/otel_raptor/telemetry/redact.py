"""Keep secrets out of telemetry: URLs, headers and exception messages, scrubbed.

* ``redact_url`` keeps ``scheme://host:port/path`` and drops the user info, the query string
  and the fragment (query values are where tokens and signatures travel).
* ``redact_headers`` replaces the value of every credential-bearing header with ``REDACTED``.
* ``safe_exception_message`` scrubs an exception's text: URLs as above, query strings of
  bare paths, and ``key=value`` / ``key: value`` / ``KEY 'value'`` pairs whose key names a
  secret.
* ``record_exception`` records an exception on a span the OpenTelemetry way (an
  ``exception`` event with ``exception.type``/``.message``/``.stacktrace``), scrubbed.

Scrubbing errs on the side of hiding: a harmless value under a secret-sounding key is hidden
too. None of these functions raises.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from opentelemetry.trace import Span

from otel_raptor.core.fingerprint import redact_scheme_credentials
from otel_raptor.runtime.safety import report_internal_error

__all__ = [
    "REDACTED",
    "exception_attributes",
    "is_sensitive_header",
    "record_exception",
    "redact_headers",
    "redact_url",
    "safe_exception_message",
    "scrub_text",
]

#: What a hidden value is replaced with (the semantic conventions' placeholder).
REDACTED: Final = "REDACTED"

_SENSITIVE_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
        "x-xsrf-token",
    }
)
# A header whose name contains one of these is hidden whatever its exact name.
_SENSITIVE_NAME_PARTS: Final = (
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "auth",
    "cookie",
    "session",
    "credential",
    "signature",
)

# Words that make a ``key=value`` pair secret. Matched inside longer keys too
# (``db_password``, ``X-Auth-Token``, ``refresh_token``).
_SECRET_KEY_WORDS: Final = (
    r"password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|credentials?|authorization|cookie|session[_-]?id|signature"
    # Short keys, secrets only as the whole key ("sig" is inside "design", "auth" inside
    # "author"): Azure's SAS signature, which travels outside a URL too, an auth value, a JWT,
    # a session id.
    r"|^(?:sig|auth|jwt|sid)$"
)
# Every pattern starts only at the edge of a run of the characters it scans (a lookbehind
# rather than ``\b``), and no pattern nests a repetition inside another, so that scanning
# stays linear even on long runs such as base64 blobs or repeated key words.
# A key is followed by ``=``/``:`` or, like core.fingerprint's ``PASSWORD 'x'``, by white space
# and a quote: the form of SQL that PostgreSQL (``LINE 1: ...``) and MySQL echo in a syntax error.
_PAIR_KEY: Final = re.compile(r"(?<![\w.-])(?P<key>[\w.-]+)(?:[\"']?\s*[=:]\s*|\s+(?=[\"']))")
# Matched only after a secret key: scanning every harmless value too would be quadratic on
# ``a=a=a=...``.
_PAIR_VALUE: Final = re.compile(
    r"\"[^\"]*\""  # "quoted"
    r"|'[^']*'"  # 'quoted'
    r"|(?:Bearer|Basic|Digest|Token|Negotiate)\s+[^\s,;&'\"]+"  # an auth scheme and its token
    r"|[^\s,;&'\")\]}]+",  # a bare value, up to a delimiter
    re.IGNORECASE,
)
_SECRET_KEY: Final = re.compile(_SECRET_KEY_WORDS, re.IGNORECASE)
# ``scheme://`` up to white space or a quote: the whole URL, redacted as a unit.
_URL: Final = re.compile(r"(?<![a-zA-Z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")
# A bare absolute path followed by a query string (``GET /v1/items?sig=abc``).
_PATH_QUERY: Final = re.compile(r"(?P<path>(?<![\w/:.~%-])/[\w\-./~%]*)\?[^\s'\"<>#]*")
_USERINFO_PREFIX: Final = re.compile(r"^[^/?#]*@")

_DEFAULT_MAX_LENGTH: Final = 1024


def redact_url(url: str) -> str:
    """``url`` as ``scheme://host:port/path``: no user info, query string or fragment.

    A string without ``scheme://`` keeps its path, minus anything before an ``@`` in its
    first segment. A string that cannot be parsed becomes ``REDACTED``.
    """
    try:
        parts = urlsplit(url)
        if parts.netloc:
            host = parts.netloc.rpartition("@")[2]
            scheme = f"{parts.scheme}:" if parts.scheme else ""
            return f"{scheme}//{host}{parts.path}"
        # Not ``scheme://...``: ``user:pw@host/path`` would parse its user as a scheme, so
        # work on the raw text: cut the query and fragment, then any user info.
        head = re.split(r"[?#]", url, maxsplit=1)[0]
        return _USERINFO_PREFIX.sub("", head)
    except Exception:  # noqa: BLE001 - unparseable input is hidden, never raised about
        return REDACTED


def is_sensitive_header(name: str) -> bool:
    """Whether a header called ``name`` (any case) carries credentials."""
    lowered = name.lower()
    return lowered in _SENSITIVE_HEADERS or any(part in lowered for part in _SENSITIVE_NAME_PARTS)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with every credential-bearing value replaced by ``REDACTED``.

    Hidden: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``,
    ``X-Api-Key`` and any name containing token, secret, password, passwd, key, auth, cookie,
    session, credential or signature (case-insensitive). Names are kept as given.
    """
    return {
        name: REDACTED if is_sensitive_header(name) else value for name, value in headers.items()
    }


def _scrub_pairs(text: str) -> str:
    # A loop rather than ``re.sub``: a value is matched only after a secret key, and after a
    # harmless ``key=`` the scan resumes at its value, which may hold a secret pair
    # (``q=password=x``).
    pieces: list[str] = []
    start = position = 0
    while True:
        match = _PAIR_KEY.search(text, position)
        if match is None:
            break
        position = match.end()
        if _SECRET_KEY.search(match.group("key")) is None:
            continue
        value = _PAIR_VALUE.match(text, position)
        if value is None:
            continue
        quote = value.group(0)[0]
        hidden = f"{quote}{REDACTED}{quote}" if quote in ('"', "'") else REDACTED
        pieces.append(text[start:position])
        pieces.append(hidden)
        start = position = value.end()
    if not pieces:
        return text
    pieces.append(text[start:])
    return "".join(pieces)


def scrub_text(text: str) -> str:
    """``text`` with URLs redacted (``redact_url``), query strings of bare paths dropped,
    the values of secret-named ``key=value``/``key: value``/``KEY 'value'`` pairs and the
    credential after a ``Bearer``/``Basic``/``Token`` word replaced by ``REDACTED``. Linear in
    the length of ``text``."""
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    text = _PATH_QUERY.sub(r"\g<path>", text)
    # Then credentials with no key in front: requests and h11 quote a bad header's value
    # whole (a token read with its newline), ``... header value: 'Bearer eyJ...\n'``.
    return redact_scheme_credentials(_scrub_pairs(text), REDACTED)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break error reporting
        return f"<unprintable {type(exc).__qualname__}>"


def safe_exception_message(exc: BaseException, *, max_length: int = _DEFAULT_MAX_LENGTH) -> str:
    """``str(exc)``, scrubbed (``scrub_text``) and cut to ``max_length`` characters (default
    1024; an ellipsis marks a cut). Scrubbing runs before the cut, so a cut never reveals half
    a secret."""
    try:
        message = scrub_text(_message(exc))
    except Exception:  # noqa: BLE001 - hide everything rather than risk a leak
        return REDACTED
    if len(message) > max_length:
        return message[: max(0, max_length - 1)] + "…"
    return message


def _exception_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return f"{module}.{cls.__qualname__}" if module and module != "builtins" else cls.__qualname__


def exception_attributes(exc: BaseException) -> dict[str, str]:
    """The ``exception.*`` attributes of ``exc`` (semantic conventions), scrubbed:
    ``exception.type`` (qualified class name, bare for builtins), ``exception.message``
    (``safe_exception_message``) and ``exception.stacktrace`` (``scrub_text`` of the
    formatted traceback, chained exceptions included)."""
    try:
        stacktrace = scrub_text(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
    except Exception:  # noqa: BLE001 - hide everything rather than risk a leak
        stacktrace = REDACTED
    return {
        "exception.type": _exception_type(exc),
        "exception.message": safe_exception_message(exc),
        "exception.stacktrace": stacktrace,
    }


def record_exception(span: Span, exc: BaseException, *, escaped: bool = False) -> None:
    """Record ``exc`` on ``span`` as an ``exception`` event with scrubbed attributes.

    Use it instead of ``span.record_exception(exc)``, which would export ``str(exc)`` and the
    traceback verbatim. ``escaped`` says the exception left the span's scope. Never raises.
    """
    try:
        if not span.is_recording():
            return
        span.record_exception(exc, attributes=exception_attributes(exc), escaped=escaped)
    except Exception as error:  # noqa: BLE001 - recording an error must not raise another
        report_internal_error("telemetry.record_exception", error)
