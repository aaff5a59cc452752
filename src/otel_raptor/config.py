"""Configuration of the instrumentor: what it hooks and how each downstream is treated.

Precedence: ``RaptorInstrumentor().instrument(**kwargs)`` > ``OTEL_PYTHON_RAPTOR_*``
environment variables > the TOML file named by ``OTEL_PYTHON_RAPTOR_CONFIG`` > defaults.

Values given in code are validated at once and a bad one raises
:class:`~otel_raptor.errors.ConfigError`. Values from the environment or the file arrive at
start-up through the launcher, where an exception would stop every other instrumentor: each
bad one is reported once (logger ``otel_raptor``, same message) and that key keeps its default.

This module is a leaf above ``core``: it builds core option values, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy

__all__ = [
    "ALL_INTEGRATIONS",
    "DownstreamOverride",
    "DownstreamPolicy",
    "RaptorConfig",
]

#: Every integration the instrumentor knows, by the name ``..._INTEGRATIONS`` uses.
ALL_INTEGRATIONS = frozenset({"requests", "httpx", "asyncio"})

BreakerKey = Literal["origin", "host"]

#: A fallback for one downstream: given the error (or the failing response), return what the
#: caller should get instead. Code only: it cannot come from a file.
Fallback = Callable[[Any], Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamPolicy:
    """How calls to one downstream (``scheme://host:port``) are treated, fully resolved.

    ``timeout`` is the request timeout in seconds applied when the caller passed none
    (``None``: leave the library's default, which for requests is to wait forever).
    ``retry_non_idempotent`` opts POST/PATCH into retries (default off: only idempotent
    methods or requests with an ``Idempotency-Key`` header are replayed). ``failover_urls``
    are base URLs tried in order when the primary gives up. ``stale_if_error`` serves the last
    good response to a GET (no older than ``stale_max_age`` seconds) when the call fails.
    ``enabled=False`` leaves the downstream alone entirely.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    timeout: float | None = 30.0
    retry_non_idempotent: bool = False
    failover_urls: tuple[str, ...] = ()
    stale_if_error: bool = False
    stale_max_age: float = 300.0
    fallback: Fallback | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamOverride:
    """Settings for the downstreams whose host (or ``host:port``) matches ``pattern``.

    ``pattern`` is an ``fnmatch`` pattern, case-insensitive (``*.internal``,
    ``api.example.com:8443``). Fields left ``None`` inherit from the global settings.
    The first matching override wins, in the order given.
    """

    pattern: str
    retry: RetryPolicy | None = None
    breaker: CircuitBreakerConfig | None = None
    timeout: float | None = None
    retry_non_idempotent: bool | None = None
    failover_urls: tuple[str, ...] | None = None
    stale_if_error: bool | None = None
    stale_max_age: float | None = None
    fallback: Fallback | None = None
    enabled: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RaptorConfig:
    """Everything the instrumentor needs, validated.

    Defaults are the seed's: ``RetryPolicy()`` (3 retries, 1 s base delay, 300 s cap, x2) and
    ``CircuitBreakerConfig()`` (5 failures, 60 s recovery, 2 successes, 30 s timeout).
    ``integrations`` ``None`` means every integration whose library is installed.
    ``breaker_key`` ``origin`` keys breakers by ``scheme://host:port``, ``host`` by host only.
    The default request timeout is ``breaker.timeout`` (the seed's ``timeout=30.0``).
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retry_budget_ratio: float = 0.2
    retry_budget_min_retries_per_second: float = 10.0
    integrations: frozenset[str] | None = None
    breaker_key: BreakerKey = "origin"
    max_services: int = 256
    retry_non_idempotent: bool = False
    downstreams: tuple[DownstreamOverride, ...] = ()
