"""How long a server asked us to wait: ``Retry-After`` and rate-limit reset headers.

* ``Retry-After`` (RFC 9110 §10.2.3) is either delay-seconds (``"120"``) or an HTTP-date
  (``"Wed, 21 Oct 2015 07:28:00 GMT"``). A date in the past, or a negative delay, means "now":
  ``0.0``. Fractional delays (``"1.5"``) are accepted although the RFC only allows integers,
  because real servers send them. Anything else is ``None`` (absent), never an error.
* ``RateLimit-Reset`` (IETF ``draft-ietf-httpapi-ratelimit-headers``) is delay-seconds.
* ``X-RateLimit-Reset`` has no standard: GitHub and others send Unix epoch seconds, some send
  epoch milliseconds, some delay-seconds. Values >= 1e12 are read as epoch milliseconds, values
  >= 1e9 (September 2001) as epoch seconds, smaller ones as delay-seconds.

A date or an epoch is a time on the server's clock, and ours may be minutes off it (containers,
VMs): read against ``now_wall``, a skew of ten minutes turns "in 30 s" into ten and a half
minutes of refused calls, or into no wait at all. So when the response carries a usable
``Date`` header (RFC 9110 §6.6.1, the server's clock when it answered), the wait is the time
named minus that ``Date``; ``now_wall`` (our Unix time in seconds) is only the fallback.

Every result is capped at :data:`MAX_RETRY_AFTER_S` (one day): a larger value is either a bug
or a "come back tomorrow" that no retry loop should sit through, and the retry policy decides
whether a wait that long is worth it at all.

Pure: the wall clock is a parameter, and nothing here raises on bad input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol

__all__ = [
    "MAX_RETRY_AFTER_S",
    "HeaderSource",
    "parse_reset_seconds",
    "parse_retry_after",
    "retry_after_from_headers",
]

#: The largest wait any parser here returns, in seconds (one day).
MAX_RETRY_AFTER_S = 86_400.0

_EPOCH_MS_FROM = 1e12
_EPOCH_S_FROM = 1e9

# ASCII digits only: str.isdigit() would accept "²" or Arabic-Indic digits.
_DELAY = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_NEGATIVE_DELAY = re.compile(r"-[0-9]+(?:\.[0-9]+)?")


class HeaderSource(Protocol):
    """Anything with a dict-like ``get``: a ``dict``, ``requests``' ``CaseInsensitiveDict``,
    ``httpx.Headers``, aiohttp's ``CIMultiDictProxy``, ``http.client.HTTPMessage``."""

    def get(self, key: str, /) -> object: ...


def _cap(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def parse_retry_after(
    value: str | None, *, now_wall: float, date: str | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, in ``[0, MAX_RETRY_AFTER_S]``.

    ``value`` is delay-seconds or an HTTP-date. An HTTP-date is read against ``date`` (the
    response's ``Date`` header) when that is a valid HTTP-date, else against ``now_wall`` (the
    current Unix time in seconds). Negative delays and past dates give ``0.0``; ``None``,
    blanks and garbage give ``None``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY.fullmatch(text):
        return _cap(float(text))
    if _NEGATIVE_DELAY.fullmatch(text):
        return 0.0
    when = _http_date(text)
    if when is None:
        return None
    delta = when - _server_now(date, now_wall)
    return _cap(delta) if math.isfinite(delta) else None


def parse_reset_seconds(
    value: str | None, *, now_wall: float, epoch_allowed: bool, date: str | None = None
) -> float | None:
    """Seconds until a rate-limit window resets, in ``[0, MAX_RETRY_AFTER_S]``, or ``None``.

    With ``epoch_allowed`` (``X-RateLimit-Reset``), large values are Unix epoch seconds (>= 1e9)
    or milliseconds (>= 1e12), read against ``date`` (the response's ``Date`` header) when that
    is a valid HTTP-date, else against ``now_wall``; otherwise (``RateLimit-Reset``) the value
    is always delay-seconds.
    """
    if value is None:
        return None
    text = value.strip()
    if _NEGATIVE_DELAY.fullmatch(text):
        return 0.0
    if not _DELAY.fullmatch(text):
        return None
    number = float(text)
    if epoch_allowed and number >= _EPOCH_MS_FROM:
        return _cap(number / 1000.0 - _server_now(date, now_wall))
    if epoch_allowed and number >= _EPOCH_S_FROM:
        return _cap(number - _server_now(date, now_wall))
    return _cap(number)


def _http_date(text: str) -> float | None:
    """An HTTP-date as Unix seconds, or ``None`` when ``text`` is not one."""
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # parsedate_to_datetime returns a naive datetime for "-0000"; RFC 9110 dates are UTC.
        when = when.replace(tzinfo=UTC)
    try:
        seconds = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def _server_now(date: str | None, now_wall: float) -> float:
    """The server's clock when it answered (its ``Date``), else ours."""
    if date is not None:
        server_now = _http_date(date.strip())
        if server_now is not None:
            return server_now
    return now_wall


def retry_after_from_headers(
    headers: HeaderSource | None, *, now_wall: float, rate_limited: bool = True
) -> float | None:
    """The server's requested wait in seconds, from response headers, or ``None``.

    Looks at ``Retry-After`` first. Then, only when ``rate_limited`` (the response is a 429 or
    the caller otherwise knows it was throttled) or when the matching ``*-Remaining`` header is
    ``0``, at ``RateLimit-Reset`` and ``X-RateLimit-Reset``: many APIs send those on *every*
    response, and a 500 from such an API is no reason to wait for the quota window to reset.
    Dates and epochs are read against the response's ``Date`` when it has a valid one, else
    against ``now_wall`` (see the module docstring).

    Header names are matched case-insensitively, whatever ``headers`` is: a plain ``dict`` with
    any spelling, or a case-insensitive header object. ``bytes`` values are decoded as Latin-1.
    """
    if headers is None:
        return None
    value = _header(headers, "Retry-After")
    if value is not None:
        retry_after = parse_retry_after(value, now_wall=now_wall, date=_header(headers, "Date"))
        if retry_after is not None:
            return retry_after
    if rate_limited or _header(headers, "RateLimit-Remaining") == "0":
        reset = parse_reset_seconds(
            _header(headers, "RateLimit-Reset"), now_wall=now_wall, epoch_allowed=False
        )
        if reset is not None:
            return reset
    if rate_limited or _header(headers, "X-RateLimit-Remaining") == "0":
        value = _header(headers, "X-RateLimit-Reset")
        if value is not None:
            return parse_reset_seconds(
                value, now_wall=now_wall, epoch_allowed=True, date=_header(headers, "Date")
            )
    return None


def _header(headers: HeaderSource, name: str) -> str | None:
    """``headers[name]`` looked up case-insensitively, as a stripped ``str``, or ``None``."""
    try:
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
        if value is None:
            value = _scan(headers, name.lower())
    except Exception:  # noqa: BLE001 - a broken header object must not break classification
        return None
    return _text(value)


def _scan(headers: object, lowered: str) -> object:
    # A plain dict is case-sensitive: "RETRY-AFTER" or "retry-After" only turn up by scanning.
    items = getattr(headers, "items", None)
    if items is None:
        return None
    pairs: Iterable[tuple[object, object]] = items()
    for key, value in pairs:
        key_text = _text(key)
        if key_text is not None and key_text.lower() == lowered:
            return value
    return None


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").strip()
    return None
