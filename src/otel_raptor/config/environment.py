"""Reading the ``OTEL_PYTHON_RAPTOR_*`` environment variables (a pure function of a mapping)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Final

from otel_raptor import environment_variables as env
from otel_raptor.config._values import (
    Overrides,
    _parse_bool,
    _parse_float,
    _parse_int,
    _parse_integrations,
    _parse_optional_seconds,
    _parse_path,
    _parse_word,
)
from otel_raptor.config.monitor import MONITOR_ENV_VARIABLES
from otel_raptor.errors import ConfigError

__all__ = ["KNOWN_VARIABLES", "config_from_env"]

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
    env.OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT: ("request_timeout", _parse_optional_seconds),
    env.OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH: ("health_check_path", _parse_path),
    env.OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT: ("statement_timeout", _parse_float),
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
    env.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: ("asyncio_timeouts", _parse_bool),
}
_ENV_NAMES: Final = {dotted: name for name, (dotted, _) in _ENV.items()}
_PREFIX: Final = "OTEL_PYTHON_RAPTOR_"
#: Every variable raptor reads (the monitor's and the file's included).
KNOWN_VARIABLES: Final = frozenset((*_ENV, *MONITOR_ENV_VARIABLES, env.OTEL_PYTHON_RAPTOR_CONFIG))


_SUFFIXES: Final = {name[len(_PREFIX) :]: name for name in KNOWN_VARIABLES}


def _unknown(name: str, raw: str) -> ConfigError:
    # Compared without the prefix, which every candidate shares.
    close = difflib.get_close_matches(name[len(_PREFIX) :].upper(), _SUFFIXES, n=1, cutoff=0.75)
    hint = f"did you mean {_SUFFIXES[close[0]]}?" if close else "see docs/configuration.md"
    return ConfigError(name, raw, f"a variable raptor reads ({hint})")


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
    # A misspelt variable would otherwise be ignored without a word (in any case: a
    # lower-case name is not the variable on Linux either).
    for name, raw in environ.items():
        if name[: len(_PREFIX)].upper() == _PREFIX and name not in KNOWN_VARIABLES:
            problems.append(_unknown(name, raw))
    return overrides, problems
