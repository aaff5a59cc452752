"""Per-downstream settings: the resolved policy of one downstream, and the overrides by host
pattern that produce it (first match wins)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from otel_raptor.config._values import (
    Fallback,
    _check_flag,
    _check_path,
    _check_seconds,
    _check_statement_timeout,
    _urls,
)
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.numbers import MAX_SECONDS_TEXT, as_seconds
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError

__all__ = ["DownstreamOverride", "DownstreamPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamPolicy:
    """How calls to one downstream (``scheme://host:port``) are treated, fully resolved.

    ``timeout`` is the request timeout in seconds applied when the caller passed none
    (``None``: leave the library's default, which for requests is to wait forever).
    ``retry_non_idempotent`` opts POST/PATCH into retries (default off: only idempotent
    methods or requests with an ``Idempotency-Key`` header are replayed). ``failover_urls``
    are base URLs tried in order when the primary gives up. ``stale_if_error`` serves the last
    good response to a GET (no older than ``stale_max_age`` seconds, > 0) when the call fails.
    ``enabled=False`` leaves the downstream alone entirely. ``statement_timeout`` (seconds
    >= 0, default 30.0; 0 turns it off) is the statement timeout a database integration sets
    on a connection to this server when neither the application nor the server set one
    (``docs/databases.md``).
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    timeout: float | None = 30.0
    statement_timeout: float = 30.0
    retry_non_idempotent: bool = False
    failover_urls: tuple[str, ...] = ()
    stale_if_error: bool = False
    stale_max_age: float = 300.0
    fallback: Fallback | None = None
    enabled: bool = True
    health_check_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError("downstream.retry", self.retry, "a RetryPolicy")
        if not isinstance(self.breaker, CircuitBreakerConfig):
            raise ConfigError("downstream.breaker", self.breaker, "a CircuitBreakerConfig")
        _check_seconds("downstream.timeout", self.timeout)
        _check_statement_timeout(
            "downstream.statement_timeout", self.statement_timeout, optional=False
        )
        _check_flag("downstream.retry_non_idempotent", self.retry_non_idempotent, optional=False)
        object.__setattr__(
            self, "failover_urls", _urls("downstream.failover_urls", self.failover_urls)
        )
        _check_flag("downstream.stale_if_error", self.stale_if_error, optional=False)
        if as_seconds(self.stale_max_age, zero_ok=False) is None:
            raise ConfigError(
                "downstream.stale_max_age",
                self.stale_max_age,
                f"a number of seconds > 0 and <= {MAX_SECONDS_TEXT}",
            )
        if self.fallback is not None and not callable(self.fallback):
            raise ConfigError("downstream.fallback", self.fallback, "None or a callable")
        _check_flag("downstream.enabled", self.enabled, optional=False)
        _check_path("downstream.health_check_path", self.health_check_path)


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamOverride:
    """Settings for the downstreams whose host (or ``host:port``) matches ``pattern``.

    ``pattern`` is an ``fnmatch`` pattern, case-insensitive (``*.internal``,
    ``api.example.com:8443``): with a ``:port`` suffix it is matched against ``host:port``
    (the scheme's default port when the URL has none), otherwise against the host alone.
    Fields left ``None`` inherit from the global settings; ``timeout`` inherits the
    (resolved) ``request_timeout``. The first matching override wins, in the order given.
    ``failover_urls`` may be given as any sequence; it is stored as a tuple.
    ``statement_timeout`` (seconds >= 0, 0: off) applies to database servers matching the
    pattern (``db.internal:5432``).
    """

    pattern: str
    retry: RetryPolicy | None = None
    breaker: CircuitBreakerConfig | None = None
    timeout: float | None = None
    statement_timeout: float | None = None
    retry_non_idempotent: bool | None = None
    failover_urls: tuple[str, ...] | None = None
    stale_if_error: bool | None = None
    stale_max_age: float | None = None
    fallback: Fallback | None = None
    enabled: bool | None = None
    health_check_path: str | None = None

    def __post_init__(self) -> None:
        pattern: object = self.pattern
        if (
            not isinstance(pattern, str)
            or not pattern.strip()
            # A URL (``https://api.example.com``), a path or ``user@host`` is matched against
            # hosts and could never match one: the override would silently never apply.
            or any(c in "/@" or c.isspace() for c in pattern)
            or _bad_port_or_bracket(pattern)
        ):
            raise ConfigError(
                "downstream.pattern",
                pattern,
                "a non-empty fnmatch pattern of a host or host:port such as '*.internal' or"
                " 'api.example.com:443' (not a URL)",
            )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError("downstream.retry", self.retry, "None or a RetryPolicy")
        if self.breaker is not None and not isinstance(self.breaker, CircuitBreakerConfig):
            raise ConfigError("downstream.breaker", self.breaker, "None or a CircuitBreakerConfig")
        _check_seconds("downstream.timeout", self.timeout)
        _check_statement_timeout(
            "downstream.statement_timeout", self.statement_timeout, optional=True
        )
        _check_flag("downstream.retry_non_idempotent", self.retry_non_idempotent, optional=True)
        if self.failover_urls is not None:
            object.__setattr__(
                self, "failover_urls", _urls("downstream.failover_urls", self.failover_urls)
            )
        _check_flag("downstream.stale_if_error", self.stale_if_error, optional=True)
        _check_seconds("downstream.stale_max_age", self.stale_max_age)
        if self.fallback is not None and not callable(self.fallback):
            raise ConfigError("downstream.fallback", self.fallback, "None or a callable")
        _check_flag("downstream.enabled", self.enabled, optional=True)
        _check_path("downstream.health_check_path", self.health_check_path)


def _bad_port_or_bracket(pattern: str) -> bool:
    """A ``host:port`` pattern whose port is no port (``api.example.com:https``, ``host:``),
    or an unclosed ``[``: either matches nothing, so the override would silently never
    apply. (A bare IPv6 address has more than one colon, and is left alone.)"""
    head, sep, tail = pattern.rpartition(":")
    if pattern.startswith("[") and "]" not in pattern:
        return True
    single_colon = sep and head and ":" not in head
    return bool(single_colon and not (tail and all(c in "0123456789*?[]!" for c in tail)))


class _Matcher:
    """One override's compiled pattern."""

    __slots__ = ("override", "regex", "with_port")

    def __init__(self, override: DownstreamOverride) -> None:
        pattern = override.pattern.lower()
        head, sep, tail = pattern.rpartition(":")
        # ``host:port`` unless the colon belongs to a bare IPv6 address.
        self.with_port = bool(
            sep
            and head
            and tail
            and all(c in "0123456789*?[]!" for c in tail)
            and (":" not in head or (head.startswith("[") and head.endswith("]")))
        )
        if self.with_port and head.startswith("[") and ":" in head:
            # A bracketed IPv6 literal: to fnmatch, brackets are a character class.
            pattern = f"[[]{head[1:-1]}[]]:{tail}"
        self.regex = re.compile(fnmatch.translate(pattern))
        self.override = override

    def hides(self, later: _Matcher) -> bool:
        """Whether this matcher, listed first, takes every call that ``later`` names, so
        that ``later`` can never apply (first match wins). Told only for a ``later`` that
        names one host (or ``host:port``) outright; a pattern with wildcards is assumed to
        keep some calls of its own, unless it is this very pattern or this one is ``*``."""
        pattern = later.override.pattern.lower().rstrip(".")
        own = self.override.pattern.lower().rstrip(".")
        if own in (pattern, "*"):
            return True
        if any(c in "*?[]" for c in pattern):
            return False
        host = pattern.rpartition(":")[0] if later.with_port else pattern
        if self.with_port:
            if not later.with_port:
                return False  # which port the call uses is not known here
            return self.regex.match(pattern) is not None
        return self.regex.match(host) is not None


def hidden_overrides(overrides: tuple[DownstreamOverride, ...]) -> list[tuple[int, str]]:
    """``(index, pattern of the earlier override that hides it)`` for every override that can
    never apply, because an earlier one matches every call it names."""
    matchers = [_Matcher(o) for o in overrides]
    found = []
    for index, later in enumerate(matchers):
        for earlier in matchers[:index]:
            if earlier.hides(later):
                found.append((index, earlier.override.pattern))
                break
    return found
