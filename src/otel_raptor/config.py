"""Configuration of the instrumentor: what it hooks and how each downstream is treated.

Precedence: ``RaptorInstrumentor().instrument(**kwargs)`` > ``OTEL_PYTHON_RAPTOR_*``
environment variables > the TOML file named by ``OTEL_PYTHON_RAPTOR_CONFIG`` > defaults,
decided key by key: an environment variable that sets the base delay leaves the file's
maximum delay in force.

Values given in code are validated at once and a bad one raises
:class:`~otel_raptor.errors.ConfigError`. Values from the environment or the file arrive at
start-up through the launcher, where an exception would stop every other instrumentor: each
bad one is handed to ``report`` once (the instrumentor logs it, logger ``otel_raptor``) and
that key falls back to the next layer down (the file, then the default). A bad value never
takes the good values next to it down with it.

This module is a leaf above ``core``: it builds core option values, nothing else. Reading
the environment and the file are pure functions of their inputs (:func:`config_from_env`
takes the mapping, :func:`config_from_toml` the path or text), so tests never patch
``os.environ``. See ``docs/configuration.md``.
"""

from __future__ import annotations

import fnmatch
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeAlias

from otel_raptor import environment_variables as env
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError

__all__ = [
    "ALL_INTEGRATIONS",
    "DownstreamOverride",
    "DownstreamPolicy",
    "Overrides",
    "RaptorConfig",
    "config_from_env",
    "config_from_toml",
]

#: Every integration the instrumentor knows, by the name ``..._INTEGRATIONS`` uses.
ALL_INTEGRATIONS = frozenset({"requests", "httpx", "asyncio"})

BreakerKey = Literal["origin", "host"]

#: A fallback for one downstream: given the error (or the failing response), return what the
#: caller should get instead. Code only: it cannot come from a file.
Fallback = Callable[[Any], Any]

#: Settings read from the environment or a file, by dotted key (``retry.max_delay``,
#: ``breaker.timeout``, ``retry_budget.ratio``, ``integrations``, ``breaker_key``,
#: ``max_services``, ``retry_non_idempotent``; ``downstreams`` holds the file's raw
#: ``[[downstreams]]`` tables). Values are parsed but not yet validated against each other:
#: :meth:`RaptorConfig.load` does that.
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
_SECONDS_OR_NONE: Final = "None, or a finite number of seconds > 0"


def _is_number(value: object) -> bool:
    # bool is an int, but ``timeout=True`` is a bug, not a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_seconds(key: str, value: object) -> None:
    if value is not None and not (_is_number(value) and value > 0):  # type: ignore[operator]
        raise ConfigError(key, value, _SECONDS_OR_NONE)


def _check_flag(key: str, value: object, *, optional: bool) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(key, value, "None (inherit), True or False" if optional else "a bool")


def _urls(key: str, value: object) -> tuple[str, ...]:
    allowed = "a sequence of base URLs starting with http:// or https://"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(key, value, allowed)
    urls = tuple(value)
    for url in urls:
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise ConfigError(key, value, allowed)
    return urls


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamPolicy:
    """How calls to one downstream (``scheme://host:port``) are treated, fully resolved.

    ``timeout`` is the request timeout in seconds applied when the caller passed none
    (``None``: leave the library's default, which for requests is to wait forever).
    ``retry_non_idempotent`` opts POST/PATCH into retries (default off: only idempotent
    methods or requests with an ``Idempotency-Key`` header are replayed). ``failover_urls``
    are base URLs tried in order when the primary gives up. ``stale_if_error`` serves the last
    good response to a GET (no older than ``stale_max_age`` seconds, > 0) when the call fails.
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

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError("downstream.retry", self.retry, "a RetryPolicy")
        if not isinstance(self.breaker, CircuitBreakerConfig):
            raise ConfigError("downstream.breaker", self.breaker, "a CircuitBreakerConfig")
        _check_seconds("downstream.timeout", self.timeout)
        _check_flag("downstream.retry_non_idempotent", self.retry_non_idempotent, optional=False)
        object.__setattr__(
            self, "failover_urls", _urls("downstream.failover_urls", self.failover_urls)
        )
        _check_flag("downstream.stale_if_error", self.stale_if_error, optional=False)
        if not (_is_number(self.stale_max_age) and self.stale_max_age > 0):
            raise ConfigError(
                "downstream.stale_max_age", self.stale_max_age, "a finite number of seconds > 0"
            )
        if self.fallback is not None and not callable(self.fallback):
            raise ConfigError("downstream.fallback", self.fallback, "None or a callable")
        _check_flag("downstream.enabled", self.enabled, optional=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamOverride:
    """Settings for the downstreams whose host (or ``host:port``) matches ``pattern``.

    ``pattern`` is an ``fnmatch`` pattern, case-insensitive (``*.internal``,
    ``api.example.com:8443``): with a ``:port`` suffix it is matched against ``host:port``
    (the scheme's default port when the URL has none), otherwise against the host alone.
    Fields left ``None`` inherit from the global settings; ``timeout`` inherits the
    (resolved) ``breaker.timeout``. The first matching override wins, in the order given.
    ``failover_urls`` may be given as any sequence; it is stored as a tuple.
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

    def __post_init__(self) -> None:
        pattern: object = self.pattern
        if not isinstance(pattern, str) or not pattern.strip() or pattern != pattern.strip():
            raise ConfigError(
                "downstream.pattern", pattern, "a non-empty fnmatch pattern such as '*.internal'"
            )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError("downstream.retry", self.retry, "None or a RetryPolicy")
        if self.breaker is not None and not isinstance(self.breaker, CircuitBreakerConfig):
            raise ConfigError("downstream.breaker", self.breaker, "None or a CircuitBreakerConfig")
        _check_seconds("downstream.timeout", self.timeout)
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


@dataclass(frozen=True, slots=True, kw_only=True)
class RaptorConfig:
    """Everything the instrumentor needs, validated.

    Defaults are the seed's: ``RetryPolicy()`` (3 retries, 1 s base delay, 300 s cap, x2) and
    ``CircuitBreakerConfig()`` (5 failures, 60 s recovery, 2 successes, 30 s timeout).
    ``retry_budget_ratio`` (>= 0, default 0.2) and ``retry_budget_min_retries_per_second``
    (>= 0, default 10.0) shape each downstream's retry budget. ``integrations`` ``None``
    means every integration whose library is installed; otherwise a subset of
    :data:`ALL_INTEGRATIONS` (any iterable of names, or a comma-separated string, is
    accepted and stored as a frozenset). ``breaker_key`` ``origin`` keys breakers by
    ``scheme://host:port``, ``host`` by host only. ``max_services`` (integer >= 1, default
    256) caps the distinct downstreams tracked. ``retry_non_idempotent`` (default False) also
    retries POST/PATCH without an ``Idempotency-Key``. ``downstreams`` are the per-downstream
    overrides, first match wins. The default request timeout is ``breaker.timeout`` (the
    seed's ``timeout=30.0``).

    Build one with :meth:`load` to apply kwargs, environment and file with their precedence.
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
    # Derived in __post_init__; the cache makes ``policy_for`` one dict lookup per request.
    _matchers: tuple[_Matcher, ...] = field(init=False, repr=False, compare=False)
    _default_policy: DownstreamPolicy = field(init=False, repr=False, compare=False)
    _cache: dict[tuple[str, str, int | None], DownstreamPolicy] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError("retry", self.retry, "a RetryPolicy")
        if not isinstance(self.breaker, CircuitBreakerConfig):
            raise ConfigError("breaker", self.breaker, "a CircuitBreakerConfig")
        # The budget's own checks name the keys ``retry_budget.<field>``.
        RetryBudget(
            ratio=self.retry_budget_ratio,
            min_retries_per_second=self.retry_budget_min_retries_per_second,
        )
        setattr_(self, "retry_budget_ratio", float(self.retry_budget_ratio))
        setattr_(
            self,
            "retry_budget_min_retries_per_second",
            float(self.retry_budget_min_retries_per_second),
        )
        setattr_(self, "integrations", _integrations(self.integrations))
        if self.breaker_key not in ("origin", "host"):
            raise ConfigError("breaker_key", self.breaker_key, "'origin' or 'host'")
        max_services: object = self.max_services
        if not isinstance(max_services, int) or isinstance(max_services, bool) or max_services < 1:
            raise ConfigError("max_services", max_services, "an integer >= 1")
        _check_flag("retry_non_idempotent", self.retry_non_idempotent, optional=False)
        downstreams: object = self.downstreams
        if isinstance(downstreams, (str, bytes, Mapping)) or not isinstance(downstreams, Iterable):
            raise ConfigError("downstreams", downstreams, "a sequence of DownstreamOverride")
        overrides = tuple(downstreams)
        if not all(isinstance(o, DownstreamOverride) for o in overrides):
            raise ConfigError("downstreams", downstreams, "a sequence of DownstreamOverride")
        setattr_(self, "downstreams", overrides)
        setattr_(self, "_matchers", tuple(_Matcher(o) for o in overrides))
        setattr_(
            self,
            "_default_policy",
            DownstreamPolicy(
                retry=self.retry,
                breaker=self.breaker,
                timeout=self.breaker.timeout,
                retry_non_idempotent=self.retry_non_idempotent,
            ),
        )

    # --- per downstream -------------------------------------------------------------------

    def policy_for(
        self, host: str, port: int | None = None, scheme: str = "http"
    ) -> DownstreamPolicy:
        """The resolved policy for ``scheme://host:port``: the first override whose pattern
        matches, merged over the global settings (or the globals alone).

        ``port`` ``None`` means the scheme's default port. Called per request, so the answer
        is cached per ``(scheme, host, port)`` (at most 1024 entries): a hit is one lookup.
        """
        key = (scheme, host, port)
        cache = self._cache
        policy = cache.get(key)
        if policy is None:
            policy = self._resolve(host, port, scheme)
            if len(cache) >= _POLICY_CACHE_SIZE:
                cache.clear()
            cache[key] = policy
        return policy

    def _resolve(self, host: str, port: int | None, scheme: str) -> DownstreamPolicy:
        if not self._matchers:
            return self._default_policy
        bare = host.lower().rstrip(".")
        if bare.startswith("[") and bare.endswith("]"):
            bare = bare[1:-1]
        if port is None:
            port = _DEFAULT_PORTS.get(scheme.lower())
        bracketed = f"[{bare}]" if ":" in bare else bare
        host_port = f"{bracketed}:{port}" if port is not None else bracketed
        for matcher in self._matchers:
            subject = host_port if matcher.with_port else bare
            if matcher.regex.match(subject) is not None:
                return self._merge(matcher.override)
        return self._default_policy

    def _merge(self, override: DownstreamOverride) -> DownstreamPolicy:
        base = self._default_policy
        breaker = override.breaker if override.breaker is not None else base.breaker

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return DownstreamPolicy(
            retry=pick(override.retry, base.retry),
            breaker=breaker,
            timeout=pick(override.timeout, breaker.timeout),
            retry_non_idempotent=pick(override.retry_non_idempotent, base.retry_non_idempotent),
            failover_urls=pick(override.failover_urls, base.failover_urls),
            stale_if_error=pick(override.stale_if_error, base.stale_if_error),
            stale_max_age=pick(override.stale_max_age, base.stale_max_age),
            fallback=override.fallback,
            enabled=pick(override.enabled, base.enabled),
        )

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        *,
        kwargs: Mapping[str, object] | None = None,
        environ: Mapping[str, str],
        report: Report,
    ) -> RaptorConfig:
        """Apply ``kwargs`` over ``environ``'s ``OTEL_PYTHON_RAPTOR_*`` variables over the
        TOML file (``config_file=`` in ``kwargs``, else ``OTEL_PYTHON_RAPTOR_CONFIG``) over
        the defaults.

        ``kwargs`` keys (each optional):

        - ``retry`` or ``recovery_config``: a :class:`RetryPolicy` (taken whole) or a mapping
          of its fields (the seed's ``RECOVERY_CONFIG`` shape; other fields still come from
          the environment, the file or the defaults);
        - ``breaker`` or ``circuit_breaker_config``: likewise for
          :class:`CircuitBreakerConfig` (the seed's ``CIRCUIT_BREAKER_CONFIG`` shape);
        - ``retry_budget``: a mapping with ``ratio`` and/or ``min_retries_per_second``;
        - ``retry_budget_ratio``, ``retry_budget_min_retries_per_second``,
          ``integrations``, ``breaker_key``, ``max_services``, ``retry_non_idempotent``;
        - ``downstreams``: ``{pattern: mapping or DownstreamOverride}`` or a sequence of
          :class:`DownstreamOverride` (or mappings with a ``pattern``); a mapping's
          ``retry``/``breaker`` may be partial mappings, completed from the global ones.
          They come before the file's ``[[downstreams]]``, so they win on the same host;
        - ``config_file``: the TOML file's path.

        A bad kwarg raises :class:`ConfigError` at once (key, value, allowed). A bad
        environment or file value is passed to ``report`` once and its key falls back to
        the next layer down; the other keys are unaffected.
        """
        given = dict(kwargs or {})
        code = _from_kwargs(given)

        def shown(error: ConfigError) -> None:
            # Show an environment variable's value as it was written, not as parsed.
            if error.key in _ENV and error.key in environ:
                error = ConfigError(error.key, environ[error.key], error.allowed)
            report(error)

        env_values, problems = config_from_env(environ)
        for problem in problems:
            shown(problem)
        file_values: Overrides = {}
        path = code.config_file or environ.get(env.OTEL_PYTHON_RAPTOR_CONFIG, "").strip()
        file_name = str(path)
        if path:
            file_values, problems = config_from_toml(path)
            for problem in problems:
                shown(problem)

        def layers(group: str) -> list[tuple[dict[str, object], Callable[[str], str]]]:
            return [
                (_group_values(env_values, group), lambda dotted: _ENV_NAMES[dotted]),
                (_group_values(file_values, group), lambda dotted: f"{file_name}:{dotted}"),
            ]

        retry = code.retry_policy
        if retry is None:
            fields_ = _settle(
                RetryPolicy.from_mapping, "retry", code.groups["retry"], layers("retry"), shown
            )
            retry = RetryPolicy.from_mapping(fields_)
        breaker = code.breaker_config
        if breaker is None:
            fields_ = _settle(
                CircuitBreakerConfig.from_mapping,
                "breaker",
                code.groups["breaker"],
                layers("breaker"),
                shown,
            )
            breaker = CircuitBreakerConfig.from_mapping(fields_)
        top = _settle(_build_top, "", code.groups[""], layers(""), shown)

        downstreams = [
            _downstream(spec, where, retry, breaker, None) for where, spec in code.downstreams
        ]
        raw = file_values.get("downstreams", ())
        for index, spec in enumerate(raw if isinstance(raw, (list, tuple)) else ()):
            where = f"{file_name}:downstreams[{index}]"
            override = _downstream(spec, where, retry, breaker, shown)
            if override is not None:
                downstreams.append(override)
        values: dict[str, Any] = {  # Any: every value is validated by __post_init__
            **top,
            "retry": retry,
            "breaker": breaker,
            "downstreams": tuple(d for d in downstreams if d is not None),
        }
        return cls(**values)


# --- the top-level keys, by dotted name ---------------------------------------------------------

# dotted key -> RaptorConfig field
_TOP_FIELDS: Final = {
    "retry_budget.ratio": "retry_budget_ratio",
    "retry_budget.min_retries_per_second": "retry_budget_min_retries_per_second",
    "integrations": "integrations",
    "breaker_key": "breaker_key",
    "max_services": "max_services",
    "retry_non_idempotent": "retry_non_idempotent",
}
_TOP_DOTTED: Final = {field_: dotted for dotted, field_ in _TOP_FIELDS.items()}


def _build_top(values: Mapping[str, object]) -> RaptorConfig:
    return RaptorConfig(**values)  # type: ignore[arg-type]  # values are validated here


def _group_values(overrides: Overrides, group: str) -> dict[str, object]:
    """The overrides of one group (``retry``, ``breaker``, ``""`` for the top level), by
    field name."""
    if group:
        prefix = group + "."
        return {k[len(prefix) :]: v for k, v in overrides.items() if k.startswith(prefix)}
    return {_TOP_FIELDS[k]: v for k, v in overrides.items() if k in _TOP_FIELDS}


def _dotted(group: str, field_: str) -> str:
    return f"{group}.{field_}" if group else _TOP_DOTTED.get(field_, field_)


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


def _settle(
    build: Callable[[Mapping[str, object]], object],
    group: str,
    fixed: Mapping[str, object],
    layers: Sequence[tuple[Mapping[str, object], Callable[[str], str]]],
    report: Report | None,
) -> dict[str, object]:
    """Merge one object's fields: ``fixed`` (from code, already valid) over the ``layers``
    (highest precedence first), keeping every value that ``build`` accepts.

    ``report`` ``None`` means strict: the whole set must build, or its ``ConfigError`` is
    raised. Otherwise each field tries its layers' values in order; a value that cannot
    join the accepted ones is reported and the next layer's (or the default) is used. The
    rounds repeat while they make progress, so values that only make sense together (a
    base delay above the default cap, with a higher cap) are accepted in any order.
    """
    slots: dict[str, list[tuple[object, str]]] = {}
    for values, name_of in layers:
        for key, value in values.items():
            if key not in fixed:
                slots.setdefault(key, []).append((value, name_of(_dotted(group, key))))
    accepted = dict(fixed)
    everything = {**accepted, **{key: options[0][0] for key, options in slots.items()}}
    if report is None or not slots:
        build(everything)
        return everything
    try:
        build(everything)
    except ConfigError:
        pass
    else:
        return everything
    failures: dict[str, list[tuple[object, str, ConfigError]]] = {}
    pending = dict(slots)
    progress = True
    while pending and progress:
        progress = False
        for key, options in list(pending.items()):
            failures[key] = []
            for value, name in options:
                trial = {**accepted, key: value}
                try:
                    build(trial)
                except ConfigError as error:
                    failures[key].append((value, name, error))
                else:
                    accepted = trial
                    del pending[key]
                    progress = True
                    break
    for key in slots:
        for value, name, failure in failures.get(key, ()):
            report(_renamed(failure, name, _dotted(group, key), value))
    return accepted


def _renamed(error: ConfigError, name: str, dotted: str, value: object) -> ConfigError:
    """``error`` raised while applying ``value`` to ``dotted``, named as its source knows it."""
    if error.key == dotted or error.key.endswith("." + dotted.rpartition(".")[2]):
        return ConfigError(name, value, error.allowed)
    return ConfigError(
        name, value, f"a value consistent with {error.key}={error.value!r} ({error.allowed})"
    )


# --- kwargs -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Code:
    """What ``load``'s kwargs said, validated."""

    groups: dict[str, dict[str, object]]
    retry_policy: RetryPolicy | None = None
    breaker_config: CircuitBreakerConfig | None = None
    downstreams: list[tuple[str, object]] = field(default_factory=list)
    config_file: str = ""


_KWARGS: Final = (
    "breaker",
    "breaker_key",
    "circuit_breaker_config",
    "config_file",
    "downstreams",
    "integrations",
    "max_services",
    "recovery_config",
    "retry",
    "retry_budget",
    "retry_budget_min_retries_per_second",
    "retry_budget_ratio",
    "retry_non_idempotent",
)


def _from_kwargs(given: Mapping[str, object]) -> _Code:
    code = _Code(groups={"retry": {}, "breaker": {}, "": {}})
    for key, value in given.items():
        if key not in _KWARGS:
            raise ConfigError(key, value, "a known keyword, one of " + ", ".join(_KWARGS))
    if "retry" in given and "recovery_config" in given:
        raise ConfigError("recovery_config", given["recovery_config"], "unset when retry= is set")
    if "breaker" in given and "circuit_breaker_config" in given:
        raise ConfigError(
            "circuit_breaker_config", given["circuit_breaker_config"], "unset when breaker= is set"
        )
    retry = given.get("retry", given.get("recovery_config"))
    if isinstance(retry, RetryPolicy):
        code.retry_policy = retry
    elif isinstance(retry, Mapping):
        RetryPolicy.from_mapping(retry)  # raises at once, naming the key
        code.groups["retry"] = dict(retry)
    elif retry is not None:
        raise ConfigError("retry", retry, "a RetryPolicy or a mapping of its fields")
    breaker = given.get("breaker", given.get("circuit_breaker_config"))
    if isinstance(breaker, CircuitBreakerConfig):
        code.breaker_config = breaker
    elif isinstance(breaker, Mapping):
        CircuitBreakerConfig.from_mapping(breaker)
        code.groups["breaker"] = dict(breaker)
    elif breaker is not None:
        raise ConfigError("breaker", breaker, "a CircuitBreakerConfig or a mapping of its fields")
    top: dict[str, object] = {}
    budget = given.get("retry_budget")
    if budget is not None:
        if not isinstance(budget, Mapping) or not set(budget) <= {
            "ratio",
            "min_retries_per_second",
        }:
            raise ConfigError(
                "retry_budget", budget, "a mapping with keys ratio and/or min_retries_per_second"
            )
        for name, value in budget.items():
            top[_TOP_FIELDS[f"retry_budget.{name}"]] = value
    for name in _TOP_FIELDS.values():
        if name in given:
            top[name] = given[name]
    _build_top(top)  # raises at once
    code.groups[""] = top
    downstreams = given.get("downstreams")
    if isinstance(downstreams, Mapping):
        for pattern, given_spec in downstreams.items():
            spec: object = given_spec
            if isinstance(given_spec, DownstreamOverride):
                spec = _replace_pattern(given_spec, pattern)
            elif isinstance(given_spec, Mapping):
                spec = {**given_spec, "pattern": pattern}
            code.downstreams.append((f"downstreams[{pattern!r}]", spec))
    elif isinstance(downstreams, Iterable) and not isinstance(downstreams, (str, bytes)):
        for index, spec in enumerate(downstreams):
            code.downstreams.append((f"downstreams[{index}]", spec))
    elif downstreams is not None:
        raise ConfigError(
            "downstreams",
            downstreams,
            "a mapping of pattern to settings, or a sequence of DownstreamOverride",
        )
    config_file = given.get("config_file")
    if config_file is not None:
        if not isinstance(config_file, (str, os.PathLike)):
            raise ConfigError("config_file", config_file, "a path")
        code.config_file = os.fspath(config_file)
    return code


def _replace_pattern(override: DownstreamOverride, pattern: object) -> DownstreamOverride:
    values = {f.name: getattr(override, f.name) for f in fields(DownstreamOverride)}
    values["pattern"] = pattern
    return DownstreamOverride(**values)


# --- downstreams --------------------------------------------------------------------------------

_DOWNSTREAM_SCALARS: Final = frozenset(
    f.name for f in fields(DownstreamOverride) if f.name not in ("pattern", "retry", "breaker")
)


def _field_values(value: object) -> dict[str, object]:
    return {f.name: getattr(value, f.name) for f in fields(value)}  # type: ignore[arg-type]


def _downstream(
    spec: object,
    where: str,
    retry: RetryPolicy,
    breaker: CircuitBreakerConfig,
    report: Report | None,
) -> DownstreamOverride | None:
    """One per-downstream override; ``report`` ``None`` means strict (raise)."""
    if isinstance(spec, DownstreamOverride):
        return spec
    if not isinstance(spec, Mapping):
        problem = ConfigError(where, spec, "a table (mapping) with at least a pattern")
        if report is None:
            raise problem
        report(problem)
        return None
    pattern = spec.get("pattern")
    try:
        DownstreamOverride(pattern=pattern)  # type: ignore[arg-type]  # validated here
    except ConfigError as error:
        if report is None:
            raise
        report(ConfigError(f"{where}.pattern", pattern, error.allowed))
        return None
    fixed: dict[str, object] = {"pattern": pattern}
    scalars: dict[str, object] = {}
    for key, value in spec.items():
        if key == "pattern":
            continue
        if key in ("retry", "breaker"):
            built = _downstream_object(key, value, where, retry, breaker, report)
            if built is not None:
                fixed[key] = built
        elif key in _DOWNSTREAM_SCALARS:
            scalars[key] = value
        else:
            problem = ConfigError(
                f"{where}.{key}",
                value,
                "a known key, one of pattern, retry, breaker, "
                + ", ".join(sorted(_DOWNSTREAM_SCALARS)),
            )
            if report is None:
                raise problem
            report(problem)

    def build(values: Mapping[str, object]) -> DownstreamOverride:
        return DownstreamOverride(**fixed, **values)  # type: ignore[arg-type]  # validated

    def name_of(dotted: str) -> str:
        return f"{where}.{dotted}"

    if report is None:
        try:
            return build(scalars)
        except ConfigError as error:
            key = error.key.rpartition(".")[2]
            raise ConfigError(f"{where}.{key}", error.value, error.allowed) from None
    accepted = _settle(build, "", {}, [(scalars, name_of)], report)
    return build(accepted)


def _downstream_object(
    kind: str,
    value: object,
    where: str,
    retry: RetryPolicy,
    breaker: CircuitBreakerConfig,
    report: Report | None,
) -> RetryPolicy | CircuitBreakerConfig | None:
    """A downstream's ``retry``/``breaker``: an object taken whole, or a partial mapping
    completed from the global one."""
    cls: Any = RetryPolicy if kind == "retry" else CircuitBreakerConfig
    if isinstance(value, cls):
        return value  # type: ignore[no-any-return]  # checked by isinstance
    base = _field_values(retry if kind == "retry" else breaker)
    if not isinstance(value, Mapping):
        problem = ConfigError(f"{where}.{kind}", value, f"a table (mapping) of {kind} settings")
        if report is None:
            raise problem
        report(problem)
        return None

    def build(values: Mapping[str, object]) -> object:
        return cls.from_mapping({**base, **values})

    if report is None:
        try:
            return build(value)  # type: ignore[return-value]  # cls is one of the two
        except ConfigError as error:
            raise ConfigError(f"{where}.{error.key}", error.value, error.allowed) from None
    accepted = _settle(build, kind, {}, [(dict(value), lambda dotted: f"{where}.{dotted}")], report)
    return build(accepted) if accepted else None  # type: ignore[return-value]


# --- the environment ----------------------------------------------------------------------------


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


def _parse_word(text: str) -> str:
    return text.lower()


def _parse_integrations(text: str) -> frozenset[str] | None:
    word = text.lower()
    if word == "all":
        return None
    if word == "none":
        return frozenset()
    return frozenset(part for part in (p.strip() for p in word.split(",")) if part)


# env var -> (dotted key, parser); a parser raises ValueError("<what is allowed>").
_ENV: Final[dict[str, tuple[str, Callable[[str], object]]]] = {
    env.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: ("retry.max_retries", _parse_int),
    env.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: ("retry.base_delay", _parse_float),
    env.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: ("retry.max_delay", _parse_float),
    env.OTEL_PYTHON_RAPTOR_RECOVERY_BACKOFF_MULTIPLIER: (
        "retry.backoff_multiplier",
        _parse_float,
    ),
    env.OTEL_PYTHON_RAPTOR_RETRY_JITTER: ("retry.jitter", _parse_word),
    env.OTEL_PYTHON_RAPTOR_RETRY_DEADLINE: ("retry.deadline", _parse_optional_seconds),
    env.OTEL_PYTHON_RAPTOR_RETRY_ATTEMPT_TIMEOUT: (
        "retry.attempt_timeout",
        _parse_optional_seconds,
    ),
    env.OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT: ("retry_non_idempotent", _parse_bool),
    env.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD: ("breaker.failure_threshold", _parse_int),
    env.OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT: ("breaker.recovery_timeout", _parse_float),
    env.OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD: ("breaker.success_threshold", _parse_int),
    env.OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT: ("breaker.timeout", _parse_float),
    env.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_RATE_THRESHOLD: (
        "breaker.failure_rate_threshold",
        _parse_float,
    ),
    env.OTEL_PYTHON_RAPTOR_BREAKER_WINDOW: ("breaker.window", _parse_word),
    env.OTEL_PYTHON_RAPTOR_BREAKER_WINDOW_SIZE: ("breaker.window_size", _parse_int),
    env.OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS: ("breaker.minimum_calls", _parse_int),
    env.OTEL_PYTHON_RAPTOR_BREAKER_HALF_OPEN_MAX_CALLS: (
        "breaker.half_open_max_calls",
        _parse_int,
    ),
    env.OTEL_PYTHON_RAPTOR_BREAKER_KEY: ("breaker_key", _parse_word),
    env.OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO: ("retry_budget.ratio", _parse_float),
    env.OTEL_PYTHON_RAPTOR_RETRY_BUDGET_MIN_RETRIES_PER_SECOND: (
        "retry_budget.min_retries_per_second",
        _parse_float,
    ),
    env.OTEL_PYTHON_RAPTOR_MAX_SERVICES: ("max_services", _parse_int),
    env.OTEL_PYTHON_RAPTOR_INTEGRATIONS: ("integrations", _parse_integrations),
}
_ENV_NAMES: Final = {dotted: name for name, (dotted, _) in _ENV.items()}


def config_from_env(environ: Mapping[str, str]) -> tuple[Overrides, list[ConfigError]]:
    """The ``OTEL_PYTHON_RAPTOR_*`` settings in ``environ``, parsed, by dotted key.

    Unset and empty variables are skipped. A value that does not parse (``abc`` for a
    number) is left out and returned as a problem naming the variable, the value and what
    is allowed. Range checks (``max_retries >= 0``) and checks between keys happen in
    :meth:`RaptorConfig.load`. ``OTEL_PYTHON_RAPTOR_CONFIG`` is not read here.
    """
    overrides: Overrides = {}
    problems: list[ConfigError] = []
    for name, (dotted, parse) in _ENV.items():
        raw = environ.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            overrides[dotted] = parse(raw.strip())
        except ValueError as error:
            problems.append(ConfigError(name, raw, str(error)))
    return overrides, problems


# --- the file -----------------------------------------------------------------------------------

_TOP_TABLES: Final = ("retry", "breaker", "retry_budget")
_TOP_SCALARS: Final = ("integrations", "breaker_key", "max_services", "retry_non_idempotent")
_FILE_KEYS: Final = (*_TOP_TABLES, *_TOP_SCALARS, "downstreams")


def _toml_parser() -> Callable[[str], dict[str, Any]] | None:
    """``tomllib.loads`` (3.11+), else ``tomli.loads`` when installed, else ``None``."""
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415 - only this function needs it

        return tomllib.loads
    try:
        module = importlib.import_module("tomli")
    except ImportError:
        return None
    loads: Callable[[str], dict[str, Any]] = module.loads
    return loads


def config_from_toml(
    path: str | os.PathLike[str] | None = None, *, text: str | None = None
) -> tuple[Overrides, list[ConfigError]]:
    """The settings in a TOML file (``path``) or string (``text``), by dotted key.

    The shape (every part optional)::

        integrations = ["requests", "httpx"]
        breaker_key = "origin"          # or "host"
        max_services = 256
        retry_non_idempotent = false

        [retry]                          # RetryPolicy fields
        max_retries = 3
        [breaker]                        # CircuitBreakerConfig fields
        failure_threshold = 5
        [retry_budget]
        ratio = 0.2
        min_retries_per_second = 10.0

        [[downstreams]]                  # first match wins
        pattern = "*.internal"
        timeout = 5.0
        retry = { max_retries = 1 }      # completed from [retry]

    An unreadable file, invalid TOML, a missing TOML parser (Python 3.10 without ``tomli``)
    or an unknown key is returned as a problem; the rest is kept. The ``[[downstreams]]``
    tables are returned raw under ``downstreams`` and checked by :meth:`RaptorConfig.load`.
    """
    name = os.fspath(path) if path is not None else "<toml>"
    overrides: Overrides = {}
    problems: list[ConfigError] = []
    loads = _toml_parser()
    if loads is None:
        problems.append(
            ConfigError(
                env.OTEL_PYTHON_RAPTOR_CONFIG,
                name,
                "a TOML file readable on this Python: install tomli (Python < 3.11)",
            )
        )
        return overrides, problems
    if text is None:
        if path is None:
            raise TypeError("config_from_toml() needs a path or text=")
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            problems.append(
                ConfigError(
                    env.OTEL_PYTHON_RAPTOR_CONFIG,
                    name,
                    f"a readable UTF-8 TOML file ({type(error).__name__}: {error})",
                )
            )
            return overrides, problems
    try:
        document = loads(text)
    except ValueError as error:  # tomllib.TOMLDecodeError is a ValueError
        problems.append(ConfigError(env.OTEL_PYTHON_RAPTOR_CONFIG, name, f"valid TOML ({error})"))
        return overrides, problems
    for key, value in document.items():
        if key not in _FILE_KEYS:
            problems.append(
                ConfigError(f"{name}:{key}", value, "a known key, one of " + ", ".join(_FILE_KEYS))
            )
        elif key in _TOP_TABLES:
            if not isinstance(value, dict):
                problems.append(ConfigError(f"{name}:{key}", value, f"a [{key}] table"))
                continue
            for sub, item in value.items():
                dotted = f"{key}.{sub}"
                if key == "retry_budget" and dotted not in _TOP_FIELDS:
                    problems.append(
                        ConfigError(f"{name}:{dotted}", item, "ratio or min_retries_per_second")
                    )
                    continue
                overrides[dotted] = item
        elif key == "downstreams":
            if not isinstance(value, list):
                problems.append(
                    ConfigError(f"{name}:{key}", value, "an array of tables ([[downstreams]])")
                )
                continue
            overrides["downstreams"] = tuple(value)
        else:
            overrides[key] = value
    return overrides, problems
