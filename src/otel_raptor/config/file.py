"""Reading the TOML file named by ``OTEL_PYTHON_RAPTOR_CONFIG`` (a pure function of a path
or a text)."""

from __future__ import annotations

import os
import tomllib
from typing import Final

from otel_raptor import environment_variables as env
from otel_raptor.config._values import _TOP_FIELDS, Overrides
from otel_raptor.errors import ConfigError

__all__ = ["config_from_toml"]

_TOP_TABLES: Final = ("retry", "breaker", "retry_budget")
_TOP_SCALARS: Final = (
    "integrations",
    "breaker_key",
    "max_services",
    "retry_non_idempotent",
    "request_timeout",
    "health_check_path",
    "statement_timeout",
    "asyncio_timeouts",
)
_FILE_KEYS: Final = (*_TOP_TABLES, *_TOP_SCALARS, "downstreams", "monitor")


def config_from_toml(
    path: str | os.PathLike[str] | None = None, *, text: str | None = None
) -> tuple[Overrides, list[ConfigError]]:
    """The settings in a TOML file (``path``) or string (``text``), by dotted key.

    The shape (every part optional)::

        integrations = ["requests", "httpx"]
        breaker_key = "origin"          # or "host"
        max_services = 256
        retry_non_idempotent = false
        request_timeout = 30.0           # the request timeout where the caller set none
        health_check_path = "/health"    # actively check open HTTP origins
        asyncio_timeouts = false         # record wait_for/asyncio.timeout timeouts

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

    An unreadable file, invalid TOML or an unknown key is returned as a problem; the rest is
    kept. The ``[[downstreams]]`` tables are returned raw under ``downstreams`` and checked by
    :meth:`RaptorConfig.load`.
    """
    name = os.fspath(path) if path is not None else "<toml>"
    overrides: Overrides = {}
    problems: list[ConfigError] = []
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
        document = tomllib.loads(text)
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
                        ConfigError(
                            f"{name}:{dotted}",
                            item,
                            "a known key, one of ratio, min_retries_per_second",
                        )
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
        elif key == "monitor":
            if not isinstance(value, dict):
                problems.append(ConfigError(f"{name}:{key}", value, "a [monitor] table"))
                continue
            overrides["monitor"] = dict(value)  # checked by RaptorConfig.load
        else:
            overrides[key] = value
    return overrides, problems
