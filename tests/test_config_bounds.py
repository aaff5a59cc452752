"""Durations have an upper bound: one that sleeps, lock waits, socket timeouts and the
database servers can take. Above it a value is a configuration error (in code) or a reported
value that falls back (from the environment), never an ``OverflowError`` in a user's call."""

from __future__ import annotations

from typing import Any

import pytest

from otel_raptor import ConfigError, RetryPolicy
from otel_raptor import environment_variables as ev
from otel_raptor.config import DownstreamOverride, DownstreamPolicy, RaptorConfig
from otel_raptor.core.numbers import MAX_SECONDS, as_finite, as_seconds
from otel_raptor.runtime.state import Runtime


def load(kwargs: dict[str, Any], environ: dict[str, str]) -> tuple[RaptorConfig, list[str]]:
    reported: list[ConfigError] = []
    config = RaptorConfig.load(kwargs=kwargs, environ=environ, report=reported.append)
    return config, [error.key for error in reported]


@pytest.mark.parametrize(
    ("value", "number"),
    [(1, 1.0), (2.5, 2.5), (True, None), ("1", None), (None, None), (float("nan"), None),
     (float("inf"), None), (10**400, None), (-(10**400), None), (10**20, 1e20)],
)  # fmt: skip
def test_a_finite_number_is_an_int_or_float_that_fits_a_float(
    value: object, number: object
) -> None:
    assert as_finite(value) == number


def test_a_duration_is_at_most_the_bound() -> None:
    assert as_seconds(MAX_SECONDS, zero_ok=False) == MAX_SECONDS
    assert as_seconds(MAX_SECONDS + 1, zero_ok=False) is None
    assert as_seconds(0, zero_ok=True) == 0.0
    assert as_seconds(0, zero_ok=False) is None
    assert as_seconds(-0.5, zero_ok=True) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("request_timeout", 1e10),
        ("request_timeout", 10**400),
        ("statement_timeout", 1e10),  # PostgreSQL refuses it at every connect
        ("statement_timeout", 2_147_484),
    ],
)
def test_in_code_an_overlong_duration_is_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load({key: value}, {})
    assert caught.value.key == key
    assert caught.value.value is value


def test_the_longest_statement_timeout_postgresql_takes_is_accepted() -> None:
    config, reported = load({"statement_timeout": 2_147_483}, {})
    assert config.statement_timeout == 2_147_483
    assert reported == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (ev.OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT, "1e10"),
        (ev.OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT, "1e10"),
        (ev.OTEL_PYTHON_RAPTOR_RETRY_DEADLINE, "1e10"),
        (ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY, "1e10"),
    ],
)
def test_from_the_environment_an_overlong_duration_is_reported_and_falls_back(
    variable: str, value: str
) -> None:
    config, reported = load({}, {variable: value, ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES: "50"})
    assert reported == [variable]
    defaults = RaptorConfig()
    assert (config.request_timeout, config.statement_timeout) == (
        defaults.request_timeout,
        defaults.statement_timeout,
    )
    assert (config.retry.deadline, config.retry.max_delay) == (
        defaults.retry.deadline,
        defaults.retry.max_delay,
    )
    assert config.max_services == 50  # only the bad key fell back


def test_per_downstream_durations_are_bounded_too() -> None:
    with pytest.raises(ConfigError, match=r"downstream\.timeout"):
        DownstreamOverride(pattern="api", timeout=1e10)
    with pytest.raises(ConfigError, match=r"downstream\.stale_max_age"):
        DownstreamOverride(pattern="api", stale_max_age=10**400)
    with pytest.raises(ConfigError, match=r"downstream\.stale_max_age"):
        DownstreamPolicy(retry=RetryPolicy(), stale_max_age=1e10)


def test_max_services_has_an_upper_bound_in_code_and_from_the_environment() -> None:
    # A cap of 1e20 bounds neither memory nor metric cardinality.
    with pytest.raises(ConfigError, match=r"max_services.*1, 100000"):
        RaptorConfig(max_services=10**20)
    with pytest.raises(ConfigError, match=r"max_services"):
        Runtime(max_services=100_001)
    runtime = Runtime()  # reconfigured in place, the same bound holds (it used to take any)
    with pytest.raises(ConfigError, match=r"max_services.*1, 100000"):
        runtime.configure(max_services=10**20)
    assert runtime.max_services == Runtime().max_services
    assert RaptorConfig(max_services=100_000).max_services == 100_000
    config, reported = load({}, {ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES: "99999999999999999999"})
    assert reported == [ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES]
    assert config.max_services == RaptorConfig().max_services
