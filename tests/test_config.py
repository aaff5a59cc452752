from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from otel_raptor import CircuitBreakerConfig, ConfigError, RetryPolicy
from otel_raptor import environment_variables as ev
from otel_raptor.config import (
    DownstreamOverride,
    DownstreamPolicy,
    RaptorConfig,
    config_from_env,
    config_from_toml,
)
from otel_raptor.config import environment as environment_module


class Reports:
    """Collects what ``load`` reports."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def __call__(self, error: ConfigError) -> None:
        self.errors.append(error)

    @property
    def keys(self) -> list[str]:
        return [error.key for error in self.errors]


def load(
    kwargs: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> tuple[RaptorConfig, Reports]:
    reports = Reports()
    config = RaptorConfig.load(kwargs=kwargs or {}, environ=environ or {}, report=reports)
    return config, reports


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "raptor.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the environment --------------------------------------------------------------


def test_nothing_given_is_the_defaults() -> None:
    config, reports = load()
    assert config == RaptorConfig()
    assert reports.errors == []
    assert config.retry == RetryPolicy()
    assert config.breaker == CircuitBreakerConfig()
    assert config.integrations is None
    assert config.policy_for("example.com", 443, "https").timeout == 30.0


def test_every_environment_variable_is_parsed() -> None:
    environ = {
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "5",
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: "0.5",
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "20",
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_BACKOFF_MULTIPLIER: "3",
        ev.OTEL_PYTHON_RAPTOR_RETRY_JITTER: "Equal",
        ev.OTEL_PYTHON_RAPTOR_RETRY_DEADLINE: "12.5",
        ev.OTEL_PYTHON_RAPTOR_RETRY_ATTEMPT_TIMEOUT: "2",
        ev.OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT: "yes",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD: "7",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT: "15",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD: "3",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT: "4.5",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_RATE_THRESHOLD: "0.25",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_WINDOW: "time",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_WINDOW_SIZE: "60",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS: "10",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_HALF_OPEN_MAX_CALLS: "2",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_KEY: "HOST",
        ev.OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO: "0.1",
        ev.OTEL_PYTHON_RAPTOR_RETRY_BUDGET_MIN_RETRIES_PER_SECOND: "2",
        ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES: "32",
        ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS: " requests , asyncio ",
        ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "On",
    }
    config, reports = load(environ=environ)
    assert reports.errors == []
    assert config.retry == RetryPolicy(
        max_retries=5,
        base_delay=0.5,
        max_delay=20.0,
        backoff_multiplier=3.0,
        jitter="equal",
        deadline=12.5,
        attempt_timeout=2.0,
    )
    assert config.breaker == CircuitBreakerConfig(
        failure_threshold=7,
        recovery_timeout=15.0,
        success_threshold=3,
        timeout=4.5,
        failure_rate_threshold=0.25,
        window="time",
        window_size=60,
        minimum_calls=10,
        half_open_max_calls=2,
    )
    assert config.retry_non_idempotent is True
    assert config.breaker_key == "host"
    assert config.retry_budget_ratio == 0.1
    assert config.retry_budget_min_retries_per_second == 2.0
    assert config.max_services == 32
    assert config.integrations == frozenset({"requests", "asyncio"})
    assert config.asyncio_timeouts is True
    # The breaker timeout is the default request timeout.
    assert config.policy_for("a.example", 80).timeout == 4.5
    assert config.policy_for("a.example", 80).retry_non_idempotent is True


def test_every_documented_variable_is_read_and_in_the_docs() -> None:
    names = {getattr(ev, name) for name in ev.__all__}
    assert names - {ev.OTEL_PYTHON_RAPTOR_CONFIG} == set(environment_module._ENV)
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for name in names:
        assert f"`{name}`" in docs, name


def _documented_variables() -> list[tuple[str, str, str]]:
    """(variable, default, allowed) of each row of docs/configuration.md's variable table."""
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = docs.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`OTEL_PYTHON_RAPTOR_"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    assert len(rows) == len(ev.__all__)
    return rows


@pytest.mark.parametrize(
    ("name", "default"),
    [(name, default) for name, default, _ in _documented_variables() if default != "unset"],
)
def test_each_documented_default_is_the_default(name: str, default: str) -> None:
    # Setting a variable to the default the table gives it changes nothing.
    config, reports = load(environ={name: default})
    assert reports.errors == []
    assert config == RaptorConfig(), name


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        (name, allowed)
        for name, _, allowed in _documented_variables()
        if allowed.startswith("integer")
    ],
)
def test_each_documented_integer_range_is_the_one_enforced(name: str, allowed: str) -> None:
    # "integer >= 1" must take any larger integer; "integer in [1, 100000]" stops there.
    match = re.match(r"integer (?:>= (\d+)|in \[(\d+), (\d+)\])", allowed)
    assert match is not None, allowed
    low = int(match.group(1) or match.group(2))
    high = int(match.group(3)) if match.group(3) else 10**9
    for value, accepted in ((low, True), (high, True), (low - 1, False)):
        _, reports = load(environ={name: str(value)})
        assert (reports.keys == []) is accepted, (name, value, reports.errors)
    if match.group(3):
        _, reports = load(environ={name: str(high + 1)})
        assert reports.keys == [name]


def test_the_documented_example_file_loads_and_keeps_the_default_retries(tmp_path: Path) -> None:
    # Users copy this file: its [retry] table spells out the defaults, so it must not narrow
    # retry_on (a list without unavailable/rate_limit silently stops 503 and 429 retries).
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    example = docs.split("## The TOML file", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(write(tmp_path, example))})
    assert reports.errors == []
    assert config.retry == RetryPolicy()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("all", None), ("ALL", None), ("none", frozenset()), ("httpx", frozenset({"httpx"}))],
)
def test_integrations_variable(raw: str, expected: frozenset[str] | None) -> None:
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS: raw})
    assert reports.errors == []
    assert config.integrations == expected


@pytest.mark.parametrize("path", ["/he alth", "/a\tb", "/a\x7fb"])
def test_a_health_check_path_urllib_would_refuse_is_rejected(path: str) -> None:
    # urllib raises InvalidURL for it on every check, so the breaker was never checked.
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH: "/ok"})
    assert config.health_check_path == "/ok"
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH: path})
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH]
    assert config.health_check_path is None
    with pytest.raises(ConfigError, match="health_check_path"):
        load(kwargs={"health_check_path": path})


def test_an_unknown_integration_in_the_variable_is_explained_in_the_variables_words() -> None:
    # The code's message offered "None (every installed one)"; in this variable `none` means
    # no integration at all, the opposite of what a reader following that message wanted.
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS: "requests,sqlite"})
    assert config.integrations is None  # the default: every installed one
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS]
    assert reports.errors[0].allowed.startswith("all (every installed one), none, ")
    assert "None" not in reports.errors[0].allowed


def test_optional_seconds_accept_none_and_empty_values_count_as_unset() -> None:
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_RETRY_DEADLINE: "None",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "  ",
        }
    )
    assert reports.errors == []
    assert config.retry.deadline is None
    assert config.retry.max_retries == RetryPolicy().max_retries  # the default


def test_config_from_env_is_pure_and_reports_unparsable_values() -> None:
    overrides, problems = config_from_env(
        {
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "4",
            ev.OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT: "soon",
            ev.OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT: "maybe",
            "UNRELATED": "x",
        }
    )
    assert overrides == {"retry.max_retries": 4}
    assert [(p.key, p.value) for p in problems] == [
        (ev.OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT, "maybe"),
        (ev.OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT, "soon"),
    ]
    assert "true/false" in problems[0].allowed
    assert problems[1].allowed == "a number"


def test_a_bad_value_is_reported_once_and_leaves_the_other_keys_intact() -> None:
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: "2",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "abc",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "6",
        }
    )
    assert len(reports.errors) == 1
    error = reports.errors[0]
    assert (error.key, error.value, error.allowed) == (
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY,
        "abc",
        "a number",
    )
    assert config.retry.base_delay == 2.0
    assert config.retry.max_retries == 6
    assert config.retry.max_delay == 300.0


def test_a_value_out_of_range_is_reported_with_what_is_allowed() -> None:
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: "2",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "1",  # below the base delay
            ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD: "0",
            ev.OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT: "9",
            ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS: "requests,grpc",
            ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES: "12",
        }
    )
    by_key = {error.key: error for error in reports.errors}
    assert set(by_key) == {
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY,
        ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD,
        ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS,
    }
    assert by_key[ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY].value == "1"
    assert ">= retry.base_delay (2.0)" in by_key[ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY].allowed
    assert by_key[ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD].allowed == "an integer >= 1"
    assert (
        "asyncio, asyncpg, httpx, psycopg, psycopg2, pymysql, redis, requests, sqlite3"
        in by_key[ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS].allowed
    )
    assert "OTEL_PYTHON_RAPTOR_INTEGRATIONS='requests,grpc'" in str(
        by_key[ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS]
    )
    assert (config.retry.base_delay, config.retry.max_delay) == (2.0, 300.0)
    assert config.breaker.failure_threshold == 5
    assert config.breaker.timeout == 9.0
    assert config.integrations is None
    assert config.max_services == 12


def test_values_that_only_fit_together_are_accepted_in_any_order() -> None:
    # A base delay above the default cap is fine when the cap is raised too.
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: "500",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "1000",
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "-1",
        }
    )
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES]
    assert (config.retry.base_delay, config.retry.max_delay) == (500.0, 1000.0)


def test_a_value_that_conflicts_with_a_default_names_the_conflict() -> None:
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY: "500"})
    [error] = reports.errors
    assert error.key == ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY
    assert error.value == "500"
    assert "retry.max_delay=300.0" in error.allowed
    assert config.retry.base_delay == 1.0


# --- precedence --------------------------------------------------------------------------------


def test_precedence_is_kwargs_then_env_then_file_then_defaults_key_by_key(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
        max_services = 64
        [retry]
        max_retries = 5
        base_delay = 2.0
        max_delay = 40.0
        [breaker]
        failure_threshold = 9
        timeout = 8.0
        """,
    )
    environ = {
        ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path),
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "6",
        ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "50",
        ev.OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD: "10",
    }
    config, reports = load(kwargs={"recovery_config": {"max_retries": 7}}, environ=environ)
    assert reports.errors == []
    assert config.retry.max_retries == 7  # kwargs
    assert config.retry.max_delay == 50.0  # env
    assert config.retry.base_delay == 2.0  # file
    assert config.retry.backoff_multiplier == 2.0  # default
    assert config.breaker.failure_threshold == 10  # env
    assert config.breaker.timeout == 8.0  # file
    assert config.max_services == 64  # file


def test_a_bad_env_value_falls_back_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[retry]\nmax_retries = 5\n")
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path),
            ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES: "many",
        }
    )
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES]
    assert config.retry.max_retries == 5


def test_a_whole_policy_in_kwargs_wins_over_env_and_file() -> None:
    policy = RetryPolicy(max_retries=1, base_delay=0.1)
    config, reports = load(
        kwargs={"retry": policy}, environ={ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "50"}
    )
    assert config.retry is policy
    assert reports.errors == []


def test_config_file_kwarg_overrides_the_env_path(tmp_path: Path) -> None:
    first = write(tmp_path, "max_services = 10\n")
    second = tmp_path / "other.toml"
    second.write_text("max_services = 20\n")
    config, _ = load(
        kwargs={"config_file": second}, environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(first)}
    )
    assert config.max_services == 20


# --- kwargs ------------------------------------------------------------------------------------


def test_the_seed_dict_shapes_are_accepted() -> None:
    config, _ = load(
        kwargs={
            "recovery_config": {
                "max_retries": 2,
                "base_delay": 0.5,
                "max_delay": 10.0,
                "backoff_multiplier": 3.0,
            },
            "circuit_breaker_config": {
                "failure_threshold": 3,
                "recovery_timeout": 30.0,
                "success_threshold": 1,
                "timeout": 5.0,
            },
            "retry_budget": {"ratio": 0.5},
        }
    )
    assert config.retry == RetryPolicy(
        max_retries=2, base_delay=0.5, max_delay=10.0, backoff_multiplier=3.0
    )
    assert config.breaker == CircuitBreakerConfig(
        failure_threshold=3, recovery_timeout=30.0, success_threshold=1, timeout=5.0
    )
    assert config.retry_budget_ratio == 0.5
    alias, _ = load(kwargs={"retry": {"max_retries": 2}, "breaker": {"failure_threshold": 3}})
    assert (alias.retry.max_retries, alias.breaker.failure_threshold) == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "key", "value"),
    [
        ({"recovery_config": {"max_delay": -1}}, "retry.max_delay", -1),
        ({"retry": {"retries": 5}}, "retry.retries", 5),
        ({"circuit_breaker_config": {"failure_threshold": 0}}, "breaker.failure_threshold", 0),
        ({"retry": 3}, "retry", 3),
        ({"integrations": ["requests", "grpc"]}, "integrations", ["requests", "grpc"]),
        ({"breaker_key": "url"}, "breaker_key", "url"),
        ({"max_services": 0}, "max_services", 0),
        ({"retry_budget_ratio": -0.1}, "retry_budget.ratio", -0.1),
        ({"retry_budget": {"ttl": 3}}, "retry_budget", {"ttl": 3}),
        ({"retry_non_idempotent": "yes"}, "retry_non_idempotent", "yes"),
        ({"asyncio_timeouts": 1}, "asyncio_timeouts", 1),
        ({"asyncio_timeouts": None}, "asyncio_timeouts", None),
        ({"unknown_option": 1}, "unknown_option", 1),
        (
            {"retry": {"max_retries": 1}, "recovery_config": {"max_retries": 2}},
            "recovery_config",
            {"max_retries": 2},
        ),
        ({"downstreams": {"a.example": {"timeout": -1}}}, "downstreams['a.example'].timeout", -1),
        (
            {"downstreams": {"a.example": {"colour": "red"}}},
            "downstreams['a.example'].colour",
            "red",
        ),
        (
            {"downstreams": {"a.example": {"retry": {"max_retries": -2}}}},
            "downstreams['a.example'].retry.max_retries",
            -2,
        ),
        ({"downstreams": [{"pattern": ""}]}, "downstream.pattern", ""),
        ({"downstreams": "a.example"}, "downstreams", "a.example"),
    ],
)
def test_a_bad_kwarg_raises_at_once_naming_key_value_and_allowed(
    kwargs: dict[str, Any], key: str, value: object
) -> None:
    reports = Reports()
    with pytest.raises(ConfigError) as caught:
        RaptorConfig.load(kwargs=kwargs, environ={}, report=reports)
    assert caught.value.key == key
    assert caught.value.value == value
    assert caught.value.allowed
    assert reports.errors == []


def test_downstreams_in_kwargs_by_pattern_or_as_overrides() -> None:
    config, _ = load(
        kwargs={
            "retry": {"max_retries": 4, "base_delay": 0.2},
            "downstreams": {
                "*.internal": {"retry": {"max_retries": 1}, "timeout": 2.0},
                "pay.example.com": DownstreamOverride(pattern="ignored", enabled=False),
            },
        }
    )
    internal = config.policy_for("db.internal", 5432)
    assert internal.retry == RetryPolicy(max_retries=1, base_delay=0.2)  # completed from global
    assert internal.timeout == 2.0
    assert config.policy_for("pay.example.com", 443, "https").enabled is False
    assert config.downstreams[1].pattern == "pay.example.com"
    sequence, _ = load(kwargs={"downstreams": [DownstreamOverride(pattern="x", timeout=1.0)]})
    assert sequence.policy_for("x").timeout == 1.0


# --- the TOML file -----------------------------------------------------------------------------

EXAMPLE = """
integrations = ["requests", "httpx"]
breaker_key = "host"
retry_non_idempotent = false

[retry]
max_retries = 4
base_delay = 0.5
retry_on = ["timeout", "connection"]

[breaker]
failure_threshold = 6
timeout = 10.0

[retry_budget]
ratio = 0.1
min_retries_per_second = 1.0

[[downstreams]]
pattern = "*.internal"
timeout = 5.0
retry = { max_retries = 1 }
failover_urls = ["http://backup.internal:8080"]

[[downstreams]]
pattern = "API.example.com:8443"
breaker = { failure_threshold = 2 }
stale_if_error = true
stale_max_age = 60.0
retry_non_idempotent = true

[[downstreams]]
pattern = "*.example.com"
enabled = false
"""


def test_the_toml_shape(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path)})
    assert reports.errors == []
    assert config.integrations == frozenset({"requests", "httpx"})
    assert config.breaker_key == "host"
    assert config.retry.max_retries == 4
    assert config.retry.retry_on is not None
    assert {c.value for c in config.retry.retry_on} == {"timeout", "connection"}
    assert config.breaker.failure_threshold == 6
    assert (config.retry_budget_ratio, config.retry_budget_min_retries_per_second) == (0.1, 1.0)
    assert [o.pattern for o in config.downstreams] == [
        "*.internal",
        "API.example.com:8443",
        "*.example.com",
    ]

    internal = config.policy_for("db.internal", 5432)
    assert internal.timeout == 5.0
    assert internal.retry.max_retries == 1
    assert internal.retry.base_delay == 0.5  # inherited from [retry]
    assert internal.failover_urls == ("http://backup.internal:8080",)
    assert internal.breaker == config.breaker

    api = config.policy_for("api.EXAMPLE.com", 8443, "https")
    assert api.breaker.failure_threshold == 2
    assert api.breaker.timeout == 10.0  # inherited from [breaker]
    assert api.timeout == 10.0  # the resolved breaker's timeout
    assert api.stale_if_error is True
    assert api.stale_max_age == 60.0
    assert api.retry_non_idempotent is True

    # The port is part of the pattern: on 443 the next override matches instead.
    assert config.policy_for("api.example.com", None, "https").enabled is False
    assert config.policy_for("www.example.com", 80).enabled is False
    other = config.policy_for("example.org", 443, "https")
    assert other == DownstreamPolicy(
        retry=config.retry, breaker=config.breaker, timeout=10.0, retry_non_idempotent=False
    )


def test_config_from_toml_text_and_its_problems() -> None:
    overrides, problems = config_from_toml(
        text="""
        colour = "red"
        retry = 3
        [breaker]
        failure_threshold = 2
        [retry_budget]
        ttl = 1
        """
    )
    assert overrides == {"breaker.failure_threshold": 2}
    assert [p.key for p in problems] == ["<toml>:colour", "<toml>:retry", "<toml>:retry_budget.ttl"]


def test_bad_file_values_are_reported_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        max_services = 0
        [retry]
        max_retries = 5
        max_delay = "long"
        [[downstreams]]
        pattern = "*.internal"
        timeout = 5.0
        retry = { max_retries = 1, jitter = "bogus" }
        stale_if_error = "yes"
        [[downstreams]]
        timeout = 1.0
        [[downstreams]]
        pattern = "b.example"
        timeout = 2.0
        """,
    )
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path)})
    name = str(path)
    assert sorted(reports.keys) == sorted(
        [
            f"{name}:max_services",
            f"{name}:retry.max_delay",
            f"{name}:downstreams[0].retry.jitter",
            f"{name}:downstreams[0].stale_if_error",
            f"{name}:downstreams[1].pattern",
        ]
    )
    assert config.max_services == 256
    assert config.retry.max_retries == 5
    internal = config.policy_for("x.internal", 80)
    assert (internal.timeout, internal.retry.max_retries, internal.stale_if_error) == (
        5.0,
        1,
        False,
    )
    assert internal.retry.jitter == "full"
    assert [o.pattern for o in config.downstreams] == ["*.internal", "b.example"]


def test_an_unreadable_or_invalid_file_is_reported_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(missing)})
    assert config == RaptorConfig()
    [error] = reports.errors
    assert (error.key, error.value) == (ev.OTEL_PYTHON_RAPTOR_CONFIG, str(missing))
    assert "FileNotFoundError" in error.allowed

    broken = write(tmp_path, "[retry\nmax_retries = 1\n")
    _, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(broken)})
    [error] = reports.errors
    assert error.allowed.startswith("valid TOML")


# --- policy_for --------------------------------------------------------------------------------


def test_policy_for_is_cached_per_scheme_host_and_port() -> None:
    config = RaptorConfig(downstreams=(DownstreamOverride(pattern="*.internal", timeout=1.0),))
    first = config.policy_for("a.internal", 80)
    assert config.policy_for("a.internal", 80) is first
    assert config.policy_for("a.internal", 81) is not first
    assert config.policy_for("b.example", 80) is config.policy_for("c.example", 80)  # default


def test_policy_cache_is_bounded() -> None:
    config = RaptorConfig(downstreams=(DownstreamOverride(pattern="*.internal", timeout=1.0),))
    for index in range(1500):
        config.policy_for(f"h{index}.internal", 80)
    assert 0 < len(config._cache) <= 1024
    assert config.policy_for("h1.internal", 80).timeout == 1.0


@pytest.mark.parametrize(
    ("pattern", "host", "port", "scheme", "matches"),
    [
        ("*.internal", "db.internal", 5432, "http", True),
        ("*.internal", "internal", None, "http", False),
        ("*.INTERNAL", "Db.Internal.", None, "http", True),
        ("api.example.com:8443", "api.example.com", 8443, "https", True),
        ("api.example.com:8443", "api.example.com", None, "https", False),
        ("api.example.com:443", "api.example.com", None, "https", True),
        ("api.example.com:80", "api.example.com", None, "http", True),
        ("*:9000", "anything.local", 9000, "http", True),
        ("10.0.0.?", "10.0.0.7", 80, "http", True),
        ("[::1]:8080", "::1", 8080, "http", True),
        ("::1", "[::1]", 8080, "http", True),
    ],
)
def test_patterns(pattern: str, host: str, port: int | None, scheme: str, matches: bool) -> None:
    config = RaptorConfig(downstreams=(DownstreamOverride(pattern=pattern, timeout=1.5),))
    assert (config.policy_for(host, port, scheme).timeout == 1.5) is matches


def test_first_matching_override_wins() -> None:
    config = RaptorConfig(
        downstreams=(
            DownstreamOverride(pattern="a.example", timeout=1.0),
            DownstreamOverride(pattern="*.example", timeout=2.0, stale_if_error=True),
        )
    )
    first = config.policy_for("a.example")
    assert (first.timeout, first.stale_if_error) == (1.0, False)
    assert config.policy_for("b.example").timeout == 2.0


def test_an_override_an_earlier_one_hides_is_refused_in_code_and_dropped_from_a_file(
    tmp_path: Path,
) -> None:
    # First match wins: after "*.internal", an override for reports-db.internal never applies.
    with pytest.raises(ConfigError) as raised:
        RaptorConfig(
            downstreams=(
                DownstreamOverride(pattern="*.internal", timeout=5.0),
                DownstreamOverride(pattern="reports-db.internal:5432", statement_timeout=0),
            )
        )
    assert raised.value.key == "downstreams[1].pattern"
    assert "'*.internal'" in raised.value.allowed
    path = write(
        tmp_path,
        '[[downstreams]]\npattern = "*.internal"\ntimeout = 5.0\n'
        '[[downstreams]]\npattern = "reports-db.internal:5432"\nstatement_timeout = 0\n'
        '[[downstreams]]\npattern = "api.example.com"\ntimeout = 2.0\n',
    )
    config, reports = load(kwargs={"config_file": str(path)})
    assert reports.keys == [f"{path}:downstreams[1].pattern"]
    assert [d.pattern for d in config.downstreams] == ["*.internal", "api.example.com"]
    assert config.policy_for("reports-db.internal", 5432).statement_timeout == 30.0
    # A wildcard pattern listed twice, or anything after "*", is just as unreachable (it
    # was accepted without a word).
    for first, second in (("*.internal", "*.INTERNAL."), ("*", "db-*.internal:5432")):
        with pytest.raises(ConfigError, match=r"downstreams\[1\]\.pattern"):
            RaptorConfig(
                downstreams=(
                    DownstreamOverride(pattern=first, timeout=5.0),
                    DownstreamOverride(pattern=second, timeout=1.0),
                )
            )
    path = write(tmp_path, '[[downstreams]]\npattern = "*"\n[[downstreams]]\npattern = "*"\n')
    config, reports = load(kwargs={"config_file": str(path)})
    assert reports.keys == [f"{path}:downstreams[1].pattern"]
    assert [d.pattern for d in config.downstreams] == ["*"]
    # Overlaps that leave the later one some calls are fine: narrow first, a port the
    # earlier one does not name, a pattern with wildcards.
    RaptorConfig(
        downstreams=(
            DownstreamOverride(pattern="reports-db.internal:5432", statement_timeout=0),
            DownstreamOverride(pattern="*.internal:8443", timeout=1.0),
            DownstreamOverride(pattern="*.internal", timeout=5.0),
            DownstreamOverride(pattern="db-*.internal", timeout=2.0),
        )
    )


# --- the option values themselves --------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: DownstreamOverride(pattern=" x"), "downstream.pattern"),
        # A URL, path or userinfo never matches a host: the override would silently not apply.
        (lambda: DownstreamOverride(pattern="https://api.example.com"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="api.example.com/v1"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="user@api.example.com"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="api .example.com"), "downstream.pattern"),
        # A port that is no port, or an unclosed bracket, matches nothing either.
        (lambda: DownstreamOverride(pattern="api.example.com:https"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="api.example.com:"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="[::1"), "downstream.pattern"),
        (lambda: DownstreamOverride(pattern="x", timeout=0), "downstream.timeout"),
        (lambda: DownstreamOverride(pattern="x", retry={"max_retries": 1}), "downstream.retry"),
        (
            lambda: DownstreamOverride(pattern="x", failover_urls=("ftp://a",)),
            "downstream.failover_urls",
        ),
        (
            lambda: DownstreamOverride(pattern="x", failover_urls="http://a"),
            "downstream.failover_urls",
        ),
        (lambda: DownstreamOverride(pattern="x", stale_max_age=-1.0), "downstream.stale_max_age"),
        (lambda: DownstreamOverride(pattern="x", fallback=3), "downstream.fallback"),
        (lambda: DownstreamOverride(pattern="x", enabled=1), "downstream.enabled"),
        (lambda: DownstreamPolicy(timeout=float("nan")), "downstream.timeout"),
        (lambda: DownstreamPolicy(stale_max_age=0), "downstream.stale_max_age"),
        (
            lambda: RaptorConfig(retry_budget_min_retries_per_second=-1),
            "retry_budget.min_retries_per_second",
        ),
        (lambda: RaptorConfig(downstreams=("x",)), "downstreams"),
        (lambda: RaptorConfig(breaker={"failure_threshold": 1}), "breaker"),
    ],
)
def test_option_values_are_validated(build: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build()
    assert caught.value.key == key


def test_failover_urls_are_stored_as_a_tuple() -> None:
    override = DownstreamOverride(pattern="x", failover_urls=["https://b.example"])  # type: ignore[arg-type]
    assert override.failover_urls == ("https://b.example",)
    assert RaptorConfig(integrations="httpx, asyncio").integrations == frozenset(  # type: ignore[arg-type]
        {"httpx", "asyncio"}
    )


# --- the monitor's settings ---------------------------------------------------------------------


def test_the_monitor_table_and_variables_configure_the_monitor(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[monitor]
alert_cooldown = 60
report_interval = 600
alert_thresholds = { success_rate = { warning = 90, critical = 70 } }
min_recoveries = -3
""",
    )
    config, reports = load(
        {"config_file": path}, {"OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL": "120"}
    )
    monitor = config.monitor
    assert monitor.alert_cooldown == 60  # the file
    assert monitor.report_interval == 120  # the environment wins over the file
    assert (monitor.success_rate_warning, monitor.success_rate_critical) == (90, 70)
    # A bad value is reported under its file key and keeps its default.
    assert reports.keys == [f"{path}:monitor.min_recoveries"]
    assert monitor.min_recoveries == RaptorConfig().monitor.min_recoveries


def test_an_unreadable_monitor_table_is_reported() -> None:
    overrides, problems = config_from_toml(text="monitor = 3\n")
    assert "monitor" not in overrides
    assert [p.key for p in problems] == ["<toml>:monitor"]


# --- the database statement timeout -------------------------------------------------------------


def test_statement_timeout_from_every_layer(tmp_path: Path) -> None:
    assert RaptorConfig().policy_for("db.internal", 5432, "postgresql").statement_timeout == 30.0
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT: "12.5"})
    assert (config.statement_timeout, reports.errors) == (12.5, [])
    path = write(
        tmp_path,
        'statement_timeout = 0\n[[downstreams]]\npattern = "reports.internal:5432"\n'
        "statement_timeout = 300\n",
    )
    config, reports = load(kwargs={"config_file": path})
    assert reports.errors == []
    assert config.policy_for("orders.internal", 5432, "postgresql").statement_timeout == 0.0
    assert config.policy_for("reports.internal", 5432, "postgresql").statement_timeout == 300.0
    config, _ = load(kwargs={"config_file": path, "statement_timeout": 5})
    assert config.policy_for("orders.internal", 5432, "postgresql").statement_timeout == 5.0


@pytest.mark.parametrize("bad", [-1, "30", float("inf"), True, None])
def test_a_bad_statement_timeout_raises_in_code(bad: object) -> None:
    with pytest.raises(ConfigError) as raised:
        RaptorConfig.load(kwargs={"statement_timeout": bad}, environ={}, report=Reports())
    assert raised.value.key == "statement_timeout"
    assert "0: off" in raised.value.allowed
    with pytest.raises(ConfigError, match=r"downstream\.statement_timeout"):
        DownstreamOverride(pattern="db", statement_timeout=-1 if bad is None else bad)  # type: ignore[arg-type]


def test_a_bad_statement_timeout_in_the_environment_falls_back() -> None:
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT: "-3"})
    assert config.statement_timeout == 30.0
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT]


# --- recording asyncio timeouts -----------------------------------------------------------------


def test_asyncio_timeouts_is_off_by_default_and_set_from_every_layer(tmp_path: Path) -> None:
    assert RaptorConfig().asyncio_timeouts is False
    config, reports = load(kwargs={"asyncio_timeouts": True})
    assert (config.asyncio_timeouts, reports.errors) == (True, [])
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "TRUE"})
    assert (config.asyncio_timeouts, reports.errors) == (True, [])
    path = write(tmp_path, "asyncio_timeouts = true\n")
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path)})
    assert (config.asyncio_timeouts, reports.errors) == (True, [])
    # Code over the environment over the file.
    config, _ = load(
        kwargs={"config_file": path},
        environ={ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "off"},
    )
    assert config.asyncio_timeouts is False
    config, _ = load(
        kwargs={"asyncio_timeouts": False},
        environ={ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "on"},
    )
    assert config.asyncio_timeouts is False


def test_a_bad_asyncio_timeouts_is_reported_and_falls_back(tmp_path: Path) -> None:
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "sometimes"})
    assert config.asyncio_timeouts is False
    [error] = reports.errors
    assert (error.key, error.value) == (ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS, "sometimes")
    assert "true/false" in error.allowed

    path = write(tmp_path, 'asyncio_timeouts = "yes"\nmax_services = 12\n')
    config, reports = load(environ={ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path)})
    assert (config.asyncio_timeouts, config.max_services) == (False, 12)
    [error] = reports.errors
    assert (error.key, error.value, error.allowed) == (f"{path}:asyncio_timeouts", "yes", "a bool")

    # A bad variable falls back to the file's value, not straight to the default.
    good = write(tmp_path, "asyncio_timeouts = true\n")
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_CONFIG: str(good),
            ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS: "2",
        }
    )
    assert config.asyncio_timeouts is True
    assert reports.keys == [ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS]


def test_a_bad_asyncio_timeouts_in_code_raises() -> None:
    with pytest.raises(ConfigError) as raised:
        RaptorConfig(asyncio_timeouts="true")  # type: ignore[arg-type]
    assert (raised.value.key, raised.value.value, raised.value.allowed) == (
        "asyncio_timeouts",
        "true",
        "a bool",
    )


# --- layers are merged before values are checked against each other -----------------------------


def test_monitor_environment_and_file_values_are_judged_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[monitor]\nreport_interval = 7200\n")
    environ = {
        ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path),
        "OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION": "3600",
    }
    config, reports = load(environ=environ)  # used to raise ConfigError
    # The environment wins over the file: the file's value that contradicts it falls back.
    assert config.monitor.metrics_retention == 3600
    assert config.monitor.report_interval == RaptorConfig().monitor.report_interval
    [error] = reports.errors
    assert (error.key, error.value) == (f"{path}:monitor.report_interval", 7200)
    assert "metrics_retention" in error.allowed
    # A file value that only fits with an environment value is kept.
    path = write(tmp_path, "[monitor]\nmetrics_retention = 1000\n")
    config, reports = load(
        environ={
            ev.OTEL_PYTHON_RAPTOR_CONFIG: str(path),
            "OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL": "600",
        }
    )
    assert (config.monitor.report_interval, config.monitor.metrics_retention) == (600, 1000)
    assert reports.errors == []


def test_only_the_monitor_variable_that_does_not_fit_falls_back() -> None:
    config, reports = load(
        environ={
            "OTEL_PYTHON_RAPTOR_MONITOR_ENABLED": "false",
            "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING": "20",  # > the critical (10)
        }
    )
    assert config.monitor.enabled is False
    assert config.monitor.recovery_time_warning == 5.0
    [error] = reports.errors
    assert (error.key, error.value) == ("OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING", "20")


def test_monitor_file_values_that_only_fit_together_are_accepted_in_any_order(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "[monitor]\nrecovery_time_warning = 20.0\nrecovery_time_critical = 30.0\n"
        "alert_thresholds = { success_rate = { critical = 85, warning = 90 } }\n",
    )
    config, reports = load(kwargs={"config_file": path})
    assert (config.monitor.recovery_time_warning, config.monitor.recovery_time_critical) == (
        20.0,
        30.0,
    )
    assert (config.monitor.success_rate_warning, config.monitor.success_rate_critical) == (90, 85)
    assert reports.errors == []


def test_a_bad_monitor_key_in_the_file_loses_only_itself(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[monitor]\nalert_cooldown = 60\nalert_cooldwn = 5\n"
        "alert_thresholds = { memory_usage = { warning = 85, critical = 95 } }\n",
    )
    config, reports = load(kwargs={"config_file": path})
    assert (config.monitor.alert_cooldown, config.monitor.memory_usage) == (60, 85)
    assert reports.keys == [
        f"{path}:monitor.alert_cooldwn",
        f"{path}:monitor.alert_thresholds.memory_usage.critical",
    ]


def test_a_huge_integer_for_a_monitor_duration_is_reported_or_raised(tmp_path: Path) -> None:
    path = write(tmp_path, f"[monitor]\nalert_cooldown = 60\nreport_interval = {10**400}\n")
    config, reports = load(kwargs={"config_file": path})  # used to raise OverflowError
    assert (config.monitor.alert_cooldown, config.monitor.report_interval) == (60, 3600)
    assert reports.keys == [f"{path}:monitor.report_interval"]
    with pytest.raises(ConfigError) as raised:
        load(kwargs={"monitor": {"report_interval": 10**400}})
    assert raised.value.key == "monitor.report_interval"


def test_a_partial_retry_mapping_in_code_is_judged_with_the_other_layers(tmp_path: Path) -> None:
    environ = {ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "1000"}
    # Used to raise "invalid retry.max_delay=300.0", a value nobody set.
    config, reports = load(kwargs={"retry": {"base_delay": 500}}, environ=environ)
    assert (config.retry.base_delay, config.retry.max_delay) == (500, 1000)
    assert reports.errors == []
    config, _ = load(kwargs={"recovery_config": {"base_delay": 500}}, environ=environ)
    assert config.retry.max_delay == 1000
    # The same for the breaker: a cap below the default recovery timeout, with a lower one.
    path = write(tmp_path, "[breaker]\nrecovery_timeout = 10.0\n")
    config, reports = load(kwargs={"breaker": {"max_recovery_timeout": 30}, "config_file": path})
    assert (config.breaker.recovery_timeout, config.breaker.max_recovery_timeout) == (10, 30)
    assert reports.errors == []


def test_code_wins_over_a_layer_value_that_contradicts_it(tmp_path: Path) -> None:
    config, reports = load(
        kwargs={"retry": {"base_delay": 5, "max_delay": 10}},
        environ={ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "2"},
    )
    assert (config.retry.base_delay, config.retry.max_delay) == (5, 10)
    assert reports.errors == []  # the variable's key is set in code: not even read
    config, reports = load(
        kwargs={"retry": {"base_delay": 5}},
        environ={ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY: "2"},
    )
    assert (config.retry.base_delay, config.retry.max_delay) == (5, 300)
    [error] = reports.errors
    assert (error.key, error.value) == (ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY, "2")
    path = write(tmp_path, "[monitor]\nreport_interval = 7200\n")
    config, reports = load(kwargs={"monitor": {"metrics_retention": 3600}, "config_file": path})
    assert (config.monitor.metrics_retention, config.monitor.report_interval) == (3600, 3600)
    assert reports.keys == [f"{path}:monitor.report_interval"]


def test_a_code_value_that_fits_with_nothing_left_raises_naming_the_code_key(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "[retry]\nmax_delay = 100.0\n")
    reports = Reports()
    with pytest.raises(ConfigError) as raised:
        RaptorConfig.load(
            kwargs={"retry": {"base_delay": 500}, "config_file": path},
            environ={},
            report=reports,
        )
    assert (raised.value.key, raised.value.value) == ("retry.base_delay", 500)
    assert "retry.max_delay" in raised.value.allowed
    assert reports.errors == []  # nothing is reported when the code is wrong
    with pytest.raises(ConfigError) as raised:
        load(kwargs={"monitor": {"recovery_time_warning": 20}})
    assert (raised.value.key, raised.value.value) == ("monitor.recovery_time_warning", 20)
    config, _ = load(
        kwargs={"monitor": {"recovery_time_warning": 20}},
        environ={"OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL": "30"},
    )
    assert (config.monitor.recovery_time_warning, config.monitor.recovery_time_critical) == (20, 30)


def test_a_misspelt_variable_is_reported_with_the_name_it_resembles() -> None:
    config, reports = load(
        environ={
            "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRY": "7",  # ..._RETRIES
            "otel_python_raptor_max_services": "9",  # variables are case-sensitive
            "OTEL_PYTHON_RAPTOR_NONSENSE": "1",
            ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES: "50",
            "OTEL_PYTHON_RAPTOR_MONITOR_ENABLED": "false",  # the monitor's own: known
        }
    )
    assert config.max_services == 50
    assert config.retry.max_retries == RetryPolicy().max_retries
    assert sorted(reports.keys) == [
        "OTEL_PYTHON_RAPTOR_NONSENSE",
        "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRY",
        "otel_python_raptor_max_services",
    ]
    allowed = {error.key: error.allowed for error in reports.errors}
    assert (
        "did you mean OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES?"
        in allowed["OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRY"]
    )
    assert (
        "did you mean OTEL_PYTHON_RAPTOR_MAX_SERVICES?"
        in allowed["otel_python_raptor_max_services"]
    )
