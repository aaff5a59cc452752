"""The vocabulary the configuration modules share: names, checks and value parsers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, TypeAlias

from otel_raptor.core.numbers import MAX_SECONDS_TEXT, as_finite, as_seconds
from otel_raptor.errors import ConfigError

__all__ = [
    "ALL_INTEGRATIONS",
    "BreakerKey",
    "Fallback",
    "Overrides",
    "Report",
]

ALL_INTEGRATIONS = frozenset(
    {
        "requests",
        "httpx",
        "asyncio",
        "psycopg",
        "psycopg2",
        "asyncpg",
        "pymysql",
        "redis",
        "sqlite3",
    }
)

BreakerKey = Literal["origin", "host"]

#: A fallback for one downstream: given the error (or the failing response), return what the
#: caller should get instead. Code only: it cannot come from a file.
Fallback = Callable[[Any], Any]

#: Settings read from the environment or a file, by dotted key (``retry.max_delay``,
#: ``request_timeout``, ``retry_budget.ratio``, ``integrations``, ``breaker_key``,
#: ``max_services``, ``retry_non_idempotent``, ``asyncio_timeouts``; ``downstreams`` holds
#: the file's raw ``[[downstreams]]`` tables). Values are parsed but not yet validated against
#: each other: :meth:`RaptorConfig.load` does that.
Overrides: TypeAlias = dict[str, object]

#: Reports one bad value from the environment or the file.
Report: TypeAlias = Callable[[ConfigError], None]

# Distinct (scheme, host, port) kept by ``policy_for``; past it the cache starts over. Hosts
# are bounded in practice, but never trust that.
_POLICY_CACHE_SIZE: Final = 1024

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_BOOLEANS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}

_INTEGRATIONS_ALLOWED: Final = "None (every installed one), or a subset of: " + ", ".join(
    sorted(ALL_INTEGRATIONS)
)
_SECONDS_OR_NONE: Final = f"None, or a number of seconds > 0 and <= {MAX_SECONDS_TEXT}"
#: PostgreSQL's ``statement_timeout`` is a 32-bit count of milliseconds (about 24.8 days);
#: a longer one is refused by the server at every connect.
MAX_STATEMENT_TIMEOUT: Final = 2_147_483.0


# dotted key -> RaptorConfig field
_TOP_FIELDS: Final = {
    "retry_budget.ratio": "retry_budget_ratio",
    "retry_budget.min_retries_per_second": "retry_budget_min_retries_per_second",
    "integrations": "integrations",
    "breaker_key": "breaker_key",
    "max_services": "max_services",
    "retry_non_idempotent": "retry_non_idempotent",
    "request_timeout": "request_timeout",
    "health_check_path": "health_check_path",
    "statement_timeout": "statement_timeout",
    "asyncio_timeouts": "asyncio_timeouts",
}
_TOP_DOTTED: Final = {field_: dotted for dotted, field_ in _TOP_FIELDS.items()}


def _is_number(value: object) -> bool:
    # bool is an int, but ``timeout=True`` is a bug, not a number.
    return as_finite(value) is not None


def _check_seconds(key: str, value: object) -> None:
    if value is not None and as_seconds(value, zero_ok=False) is None:
        raise ConfigError(key, value, _SECONDS_OR_NONE)


def _check_statement_timeout(key: str, value: object, *, optional: bool) -> None:
    if optional and value is None:
        return
    seconds = as_finite(value)
    if seconds is None or not 0.0 <= seconds <= MAX_STATEMENT_TIMEOUT:
        raise ConfigError(
            key,
            value,
            ("None (inherit), or " if optional else "")
            + "a number of seconds in [0, 2147483] (0: off)",
        )


def _check_flag(key: str, value: object, *, optional: bool) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(key, value, "None (inherit), True or False" if optional else "a bool")


def _is_url_path(value: str) -> bool:
    # A space or control character makes urllib refuse the URL (http.client's InvalidURL) on
    # every health check: the breaker would never be checked, and nothing would say why.
    return value.startswith("/") and not any(c <= " " or c == "\x7f" for c in value)


_PATH_ALLOWED: Final = "a URL path starting with / (such as /health), without spaces"


def _check_path(key: str, value: object) -> None:
    if value is not None and not (isinstance(value, str) and _is_url_path(value)):
        raise ConfigError(key, value, "None, or " + _PATH_ALLOWED)


def _urls(key: str, value: object) -> tuple[str, ...]:
    allowed = "a sequence of base URLs starting with http:// or https://"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(key, value, allowed)
    urls = tuple(value)
    for url in urls:
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise ConfigError(key, value, allowed)
    return urls


def _integrations(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in (p.strip().lower() for p in value.split(",")) if part]
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise ConfigError("integrations", value, _INTEGRATIONS_ALLOWED)
    names = list(value)
    if not all(isinstance(name, str) for name in names) or not set(names) <= ALL_INTEGRATIONS:
        raise ConfigError("integrations", value, _INTEGRATIONS_ALLOWED)
    return frozenset(names)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("an integer") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(value):
        raise ValueError("a finite number")
    return value


def _parse_optional_seconds(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return _parse_float(text)
    except ValueError:
        raise ValueError(_SECONDS_OR_NONE) from None


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError("a boolean: true/false, 1/0, yes/no, on/off") from None


def _parse_path(text: str) -> str | None:
    if text.lower() == "none":
        return None
    if not _is_url_path(text):
        raise ValueError("none, or " + _PATH_ALLOWED)
    return text


def _parse_word(text: str) -> str:
    return text.lower()


def _parse_integrations(text: str) -> frozenset[str] | None:
    word = text.lower()
    if word == "all":
        return None
    if word == "none":
        return frozenset()
    names = frozenset(part for part in (p.strip() for p in word.split(",")) if part)
    if not names <= ALL_INTEGRATIONS:
        # Said here in the variable's own words: the code's message offers ``None`` for "every
        # installed one", and ``none`` in this variable means no integration at all.
        raise ValueError(
            "all (every installed one), none, or a comma list of: "
            + ", ".join(sorted(ALL_INTEGRATIONS))
        )
    return names
