"""``RaptorConfig``: every setting of the instrumentor, and loading it with its precedence."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

from otel_raptor import environment_variables as env
from otel_raptor.config._values import (
    _DEFAULT_PORTS,
    _POLICY_CACHE_SIZE,
    _TOP_DOTTED,
    _TOP_FIELDS,
    BreakerKey,
    Overrides,
    Report,
    _check_flag,
    _check_path,
    _check_seconds,
    _check_statement_timeout,
    _integrations,
)
from otel_raptor.config.downstream import (
    DownstreamOverride,
    DownstreamPolicy,
    _Matcher,
    hidden_overrides,
)
from otel_raptor.config.environment import _ENV, _ENV_NAMES, config_from_env
from otel_raptor.config.file import config_from_toml
from otel_raptor.config.monitor import (
    MONITOR_ENV_VARIABLES,
    MonitorConfig,
    _flatten,
    _monitor_env_values,
    _monitor_table_values,
)
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.numbers import SERVICE_CAP_TEXT, is_service_cap
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError

__all__ = ["RaptorConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RaptorConfig:
    """Everything the instrumentor needs, validated.

    Defaults are the seed's: ``RetryPolicy()`` (4 retries, 1 s base delay, 300 s cap, x2) and
    ``CircuitBreakerConfig()`` (5 failures, 60 s recovery, 2 successes; its ``timeout``, 30 s,
    is read by no breaker).
    ``retry_budget_ratio`` (>= 0, default 0.2) and ``retry_budget_min_retries_per_second``
    (>= 0, default 10.0) shape each downstream's retry budget. ``integrations`` ``None``
    means every integration whose library is installed; otherwise a subset of
    :data:`ALL_INTEGRATIONS` (any iterable of names, or a comma-separated string, is
    accepted and stored as a frozenset). ``breaker_key`` ``origin`` keys breakers by
    ``scheme://host:port``, ``host`` by host only. ``max_services`` (integer in
    [1, 100 000], default 256) caps the distinct downstreams tracked.
    ``retry_non_idempotent`` (default False) also retries POST/PATCH without an
    ``Idempotency-Key``. ``downstreams`` are the per-downstream
    overrides, first match wins. ``request_timeout`` (seconds > 0, or ``None`` for the
    library's own default; default 30.0) is applied to requests whose caller set no timeout.
    When no layer sets it, the seed's ``breaker.timeout`` (``CIRCUIT_BREAKER_CONFIG``'s
    ``timeout``, ``OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT``) stands in for it.
    ``statement_timeout`` (seconds >= 0, default 30.0; 0 turns it off) is the statement
    timeout the database integrations set where neither the application nor the server set
    one (per server through ``downstreams``; see ``docs/databases.md``).
    ``asyncio_timeouts`` (default False) makes the asyncio integration record a
    ``TimeoutError`` leaving ``asyncio.wait_for`` or ``asyncio.timeout`` as an error; off,
    those two are not hooked at all, since a handled timeout is usually control flow (a
    polling loop), not a failure.

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
    request_timeout: float | None = 30.0
    health_check_path: str | None = None
    statement_timeout: float = 30.0
    asyncio_timeouts: bool = False
    downstreams: tuple[DownstreamOverride, ...] = ()
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
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
        if not is_service_cap(max_services):
            raise ConfigError("max_services", max_services, SERVICE_CAP_TEXT)
        _check_flag("retry_non_idempotent", self.retry_non_idempotent, optional=False)
        _check_seconds("request_timeout", self.request_timeout)
        _check_path("health_check_path", self.health_check_path)
        _check_statement_timeout("statement_timeout", self.statement_timeout, optional=False)
        setattr_(self, "statement_timeout", float(self.statement_timeout))
        _check_flag("asyncio_timeouts", self.asyncio_timeouts, optional=False)
        downstreams: object = self.downstreams
        if isinstance(downstreams, (str, bytes, Mapping)) or not isinstance(downstreams, Iterable):
            raise ConfigError("downstreams", downstreams, "a sequence of DownstreamOverride")
        overrides = tuple(downstreams)
        if not all(isinstance(o, DownstreamOverride) for o in overrides):
            raise ConfigError("downstreams", downstreams, "a sequence of DownstreamOverride")
        for index, earlier in hidden_overrides(overrides):
            raise ConfigError(
                f"downstreams[{index}].pattern", overrides[index].pattern, _hidden_allowed(earlier)
            )
        setattr_(self, "downstreams", overrides)
        setattr_(self, "_matchers", tuple(_Matcher(o) for o in overrides))
        setattr_(
            self,
            "_default_policy",
            DownstreamPolicy(
                retry=self.retry,
                breaker=self.breaker,
                timeout=self.request_timeout,
                statement_timeout=self.statement_timeout,
                retry_non_idempotent=self.retry_non_idempotent,
                health_check_path=self.health_check_path,
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
            timeout=pick(override.timeout, base.timeout),
            statement_timeout=pick(override.statement_timeout, base.statement_timeout),
            retry_non_idempotent=pick(override.retry_non_idempotent, base.retry_non_idempotent),
            failover_urls=pick(override.failover_urls, base.failover_urls),
            stale_if_error=pick(override.stale_if_error, base.stale_if_error),
            stale_max_age=pick(override.stale_max_age, base.stale_max_age),
            fallback=override.fallback,
            enabled=pick(override.enabled, base.enabled),
            health_check_path=pick(override.health_check_path, base.health_check_path),
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
          ``integrations``, ``breaker_key``, ``max_services``, ``retry_non_idempotent``,
          ``request_timeout``, ``health_check_path``, ``statement_timeout``,
          ``asyncio_timeouts``;
        - ``downstreams``: ``{pattern: mapping or DownstreamOverride}`` or a sequence of
          :class:`DownstreamOverride` (or mappings with a ``pattern``); a mapping's
          ``retry``/``breaker`` may be partial mappings, completed from the global ones.
          They come before the file's ``[[downstreams]]``, so they win on the same host;
        - ``monitor``: a :class:`MonitorConfig` (taken whole) or the seed's
          ``MONITOR_CONFIG`` mapping (other fields still come from the environment, the
          file's ``[monitor]`` table or the defaults);
        - ``config_file``: the TOML file's path.

        The layers are merged key by key before values are checked against each other, so
        a partial mapping in code (``retry={"base_delay": 500}``) is judged together with
        the ``max_delay`` the environment or the file sets. A bad kwarg raises
        :class:`ConfigError` at once (key, value, allowed). A bad environment or file value
        (alone, or against the values that win over it) is passed to ``report`` once and its
        key falls back to the next layer down; the other keys are unaffected. Values that
        only make sense together are accepted in any order.
        """
        given = dict(kwargs or {})
        code = _from_kwargs(given)

        def shown(error: ConfigError) -> None:
            # Show an environment variable's value as it was written, not as parsed.
            if (error.key in _ENV or error.key in MONITOR_ENV_VARIABLES) and error.key in environ:
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
            fields_ = _with_code(
                RetryPolicy.from_mapping, "retry", code.groups["retry"], layers("retry"), shown
            )
            retry = RetryPolicy.from_mapping(fields_)
        breaker = code.breaker_config
        if breaker is None:
            fields_ = _with_code(
                CircuitBreakerConfig.from_mapping,
                "breaker",
                code.groups["breaker"],
                layers("breaker"),
                shown,
            )
            breaker = CircuitBreakerConfig.from_mapping(fields_)
        top = _settle(_build_top, "", code.groups[""], layers(""), shown)
        if "request_timeout" not in top:
            # The seed had no request timeout of its own: its breaker ``timeout`` was it.
            top["request_timeout"] = breaker.timeout

        downstreams: list[DownstreamOverride] = []
        for where, spec in code.downstreams:
            strict = _downstream(spec, where, retry, breaker, None)  # raises, or is one
            assert strict is not None
            downstreams.append(strict)
        in_code = len(downstreams)
        raw = file_values.get("downstreams", ())
        file_places = []
        for index, spec in enumerate(raw if isinstance(raw, (list, tuple)) else ()):
            where = f"{file_name}:downstreams[{index}]"
            override = _downstream(spec, where, retry, breaker, shown)
            if override is not None:
                downstreams.append(override)
                file_places.append(where)
        monitor = code.monitor_config
        if monitor is None:
            monitor = _monitor(
                code.groups["monitor"], file_values.get("monitor"), file_name, environ, shown
            )
        # An override no call can reach (an earlier one matches all of its calls) is a
        # mistake: in code it raises (__post_init__); in the file it is reported and dropped,
        # so that the rest still loads.
        hidden = {
            index: earlier
            for index, earlier in hidden_overrides(tuple(downstreams))
            if index >= in_code
        }
        for index, earlier in hidden.items():
            pattern = downstreams[index].pattern
            shown(
                ConfigError(
                    f"{file_places[index - in_code]}.pattern", pattern, _hidden_allowed(earlier)
                )
            )
        downstreams = [d for index, d in enumerate(downstreams) if index not in hidden]
        values: dict[str, Any] = {  # Any: every value is validated by __post_init__
            **top,
            "retry": retry,
            "breaker": breaker,
            "downstreams": tuple(downstreams),
            "monitor": monitor,
        }
        return cls(**values)


def _hidden_allowed(earlier: str) -> str:
    return (
        f"a pattern that some call reaches: {earlier!r}, listed before it, matches every call"
        " it names, and the first match wins (list the narrower override first)"
    )


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
    if _attempt(build, everything, group, "", None) is None:
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
                error = _attempt(build, trial, group, key, value)
                if error is not None:
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


def _attempt(
    build: Callable[[Mapping[str, object]], object],
    values: Mapping[str, object],
    group: str,
    key: str,
    value: object,
) -> ConfigError | None:
    """Why ``build(values)`` fails, or ``None``. A value from the environment or the file
    that breaks a check in an unexpected way (a ``TypeError`` for a list where a word was
    due) is a bad value like any other: reported, not raised."""
    try:
        build(values)
    except ConfigError as error:
        return error
    except Exception as error:  # noqa: BLE001 - outside input must not stop the app
        return ConfigError(
            _dotted(group, key), value, f"a valid value ({type(error).__name__}: {error})"
        )
    return None


def _with_code(
    build: Callable[[Mapping[str, object]], object],
    group: str,
    fixed: Mapping[str, object],
    layers: Sequence[tuple[Mapping[str, object], Callable[[str], str]]],
    report: Report,
) -> dict[str, object]:
    """Merge one object's fields: ``fixed`` (from code) over the ``layers`` (environment,
    file), as :func:`_settle` does, then check the code's values on the merged result.

    A partial mapping in code is judged with the values the layers give it (a
    ``base_delay`` of 500 is fine with the environment's ``max_delay`` of 1000). A layer's
    value that contradicts the code's is reported and falls back; a code value that fits
    with nothing left raises :class:`ConfigError`, named after the code's key, and then
    nothing is reported.
    """
    if not fixed:
        return _settle(build, group, {}, layers, report)
    held: list[ConfigError] = []
    try:
        accepted = _settle(build, group, fixed, layers, held.append)
        build(accepted)
    except ConfigError as error:
        raise _blamed(error, group, fixed) from None
    for problem in held:
        report(problem)
    return accepted


def _blamed(error: ConfigError, group: str, fixed: Mapping[str, object]) -> ConfigError:
    """``error``, raised while checking the code's values ``fixed``, named after them: a
    check that fails on a value the code did not set (a default) blames the code's."""
    if error.key.rpartition(".")[2] in fixed:
        return error
    if len(fixed) == 1:
        [(key, value)] = fixed.items()
        dotted = _dotted(group, key)
        return _renamed(error, dotted, dotted, value)
    return ConfigError(
        group,
        dict(fixed),
        f"settings consistent with {error.key}={error.value!r} ({error.allowed})",
    )


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
    monitor_config: MonitorConfig | None = None
    downstreams: list[tuple[str, object]] = field(default_factory=list)
    config_file: str = ""


_KWARGS: Final = (
    "asyncio_timeouts",
    "breaker",
    "breaker_key",
    "circuit_breaker_config",
    "config_file",
    "downstreams",
    "integrations",
    "max_services",
    "health_check_path",
    "monitor",
    "recovery_config",
    "request_timeout",
    "retry",
    "retry_budget",
    "retry_budget_min_retries_per_second",
    "retry_budget_ratio",
    "retry_non_idempotent",
    "statement_timeout",
)


def _from_kwargs(given: Mapping[str, object]) -> _Code:
    code = _Code(groups={"retry": {}, "breaker": {}, "": {}, "monitor": {}})
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
        # Checked in ``load``, once merged with the environment and the file: the keys it
        # leaves out come from there.
        code.groups["retry"] = dict(retry)
    elif retry is not None:
        raise ConfigError("retry", retry, "a RetryPolicy or a mapping of its fields")
    breaker = given.get("breaker", given.get("circuit_breaker_config"))
    if isinstance(breaker, CircuitBreakerConfig):
        code.breaker_config = breaker
    elif isinstance(breaker, Mapping):
        code.groups["breaker"] = dict(breaker)  # checked in ``load``, like ``retry``
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
    monitor = given.get("monitor")
    if isinstance(monitor, MonitorConfig):
        code.monitor_config = monitor
    elif isinstance(monitor, Mapping):
        code.groups["monitor"] = _flatten(monitor)  # an unknown key raises here
    elif monitor is not None:
        raise ConfigError("monitor", monitor, "a MonitorConfig or a mapping of its settings")
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


def _build_monitor(values: Mapping[str, object]) -> MonitorConfig:
    return MonitorConfig(**values)  # type: ignore[arg-type]  # values are validated here


def _monitor(
    fixed: Mapping[str, object],
    table: object,
    file_name: str,
    environ: Mapping[str, str],
    report: Report,
) -> MonitorConfig:
    """The monitor's settings: ``fixed`` (``monitor=`` in code, flattened) over the
    ``OTEL_PYTHON_RAPTOR_MONITOR_*`` variables over the file's ``[monitor]`` table over the
    defaults, merged key by key and then checked together, like the other settings."""
    from_env = _monitor_env_values(environ, report)
    from_file: dict[str, tuple[object, str]] = {}
    if isinstance(table, Mapping):
        from_file, problems = _monitor_table_values(table)
        for problem in problems:
            report(ConfigError(f"{file_name}:{problem.key}", problem.value, problem.allowed))

    def env_name(dotted: str) -> str:
        return from_env[dotted.removeprefix("monitor.")][1]

    def file_key(dotted: str) -> str:
        return f"{file_name}:monitor.{from_file[dotted.removeprefix('monitor.')][1]}"

    layers = [
        ({key: value for key, (value, _) in from_env.items()}, env_name),
        ({key: value for key, (value, _) in from_file.items()}, file_key),
    ]
    return _build_monitor(_with_code(_build_monitor, "monitor", fixed, layers, report))
