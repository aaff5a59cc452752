"""The monitor's configuration: the seed's defaults, the seed's shape, the environment."""

from __future__ import annotations

import pytest

from otel_raptor.config.monitor import (
    MONITOR_ENV_VARIABLES,
    MonitorConfig,
    monitor_config_from_env,
)
from otel_raptor.errors import ConfigError


def test_the_defaults_are_the_seeds_thresholds() -> None:
    config = MonitorConfig()
    assert (config.recovery_time_warning, config.recovery_time_critical) == (5.0, 10.0)
    assert (config.success_rate_warning, config.success_rate_critical) == (80.0, 60.0)
    assert config.error_frequency == 10.0
    assert config.memory_usage == 75.0
    assert config.alert_cooldown == 300.0
    assert config.report_interval == 3600.0
    assert config.metrics_retention == 86_400.0
    assert config.auto_resolve_alerts is True
    assert config.min_recoveries == 20  # Hystrix's 20 requests


def test_the_seeds_mapping_shape() -> None:
    config = MonitorConfig.from_mapping(
        {
            "alert_thresholds": {
                "recovery_time": {"warning": 2.0, "critical": 4.0},
                "success_rate": {"warning": 90, "critical": 70},
                "error_frequency": 5,
                "memory_usage": {"warning": 85},
            },
            "alert_cooldown": 60,
            "report_interval": 600,
            "metrics_retention": 7200,
            "auto_resolve_alerts": False,
            "min_recoveries": 50,
        }
    )
    assert (config.recovery_time_warning, config.recovery_time_critical) == (2.0, 4.0)
    assert (config.success_rate_warning, config.success_rate_critical) == (90, 70)
    assert (config.error_frequency, config.memory_usage) == (5, 85)
    assert (config.alert_cooldown, config.report_interval) == (60, 600)
    assert config.auto_resolve_alerts is False
    assert config.min_recoveries == 50
    assert config.with_values({"alert_cooldown": 1}).alert_cooldown == 1


@pytest.mark.parametrize(
    ("mapping", "key", "allowed"),
    [
        ({"alert_cooldwn": 5}, "monitor.alert_cooldwn", "a known key"),
        ({"alert_thresholds": {"latency": 5}}, "monitor.alert_thresholds.latency", "one of"),
        (
            {"alert_thresholds": {"memory_usage": {"critical": 90}}},
            "monitor.alert_thresholds.memory_usage.critical",
            "warning",
        ),
        ({"recovery_time_warning": 5000}, "monitor.recovery_time_warning", "(0, 3600]"),
        ({"success_rate_warning": 0.8, "success_rate_critical": 0.9}, "monitor", "below"),
        ({"alert_cooldown": -1}, "monitor.alert_cooldown", "seconds"),
        ({"min_recoveries": 0}, "monitor.min_recoveries", "integer"),
        ({"auto_resolve_alerts": "yes"}, "monitor.auto_resolve_alerts", "boolean"),
        ({"recovery_time_critical": 4.0}, "monitor.recovery_time_critical", "above"),
        ({"trend_interval": 600}, "monitor.trend_interval", "evaluation_window"),
        ({"metrics_retention": 60}, "monitor.metrics_retention", "report_interval"),
    ],
)
def test_a_bad_value_in_code_raises_at_once_naming_key_value_and_what_is_allowed(
    mapping: dict[str, object], key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        MonitorConfig.from_mapping(mapping)
    assert raised.value.key.startswith(key)
    assert allowed in raised.value.allowed


def test_the_environment_is_read_and_bad_values_are_reported_once_and_defaulted() -> None:
    reported: list[ConfigError] = []
    values = monitor_config_from_env(
        {
            "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN": "60",
            "OTEL_PYTHON_RAPTOR_MONITOR_AUTO_RESOLVE_ALERTS": "off",
            "OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES": "zero",
            "OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE": "175",
            "OTEL_PYTHON_RAPTOR_MONITOR_ERROR_FREQUENCY": "  ",
            "OTEL_PYTHON_RAPTOR_UNRELATED": "x",
        },
        reported.append,
    )
    assert values == {"alert_cooldown": 60.0, "auto_resolve_alerts": False}
    assert sorted((e.key, e.value) for e in reported) == [
        ("OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE", "175"),
        ("OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES", "zero"),
    ]
    MonitorConfig().with_values(values)  # what it returns is always usable


def test_values_that_contradict_each_other_are_judged_together() -> None:
    reported: list[ConfigError] = []
    # Fine together (90 > 85)...
    together = monitor_config_from_env(
        {
            "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_WARNING": "90",
            "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL": "85",
        },
        reported.append,
    )
    assert together == {"success_rate_warning": 90.0, "success_rate_critical": 85.0}
    assert reported == []
    # ...but not against the default warning (80): reported, and the default kept.
    alone = monitor_config_from_env(
        {"OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL": "85"}, reported.append
    )
    assert alone == {}
    [error] = reported
    assert error.key == "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL"
    assert error.value == "85"
    assert "below success_rate_warning" in error.allowed


def test_a_failing_reporter_does_not_make_it_raise() -> None:
    def explode(error: ConfigError) -> None:
        raise RuntimeError("boom")

    assert monitor_config_from_env({"OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS": "x"}, explode) == {}


def test_every_variable_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "analytics.md").read_text()
    for name, (field_name, _) in MONITOR_ENV_VARIABLES.items():
        assert f"`{name}`" in doc, name
        assert field_name in MonitorConfig.__dataclass_fields__


@pytest.mark.parametrize("huge", [10**400, -(10**400)], ids=["big", "negative"])
def test_a_huge_integer_is_a_config_error_not_an_overflow(huge: int) -> None:
    with pytest.raises(ConfigError) as raised:
        MonitorConfig.from_mapping({"report_interval": huge})
    assert raised.value.key == "monitor.report_interval"
    assert "seconds in [60, 86400]" in raised.value.allowed
    with pytest.raises(ConfigError, match=r"monitor\.alert_cooldown"):
        MonitorConfig(alert_cooldown=huge)


def test_only_the_variable_that_does_not_fit_is_reported_and_dropped() -> None:
    reported: list[ConfigError] = []
    values = monitor_config_from_env(
        {
            "OTEL_PYTHON_RAPTOR_MONITOR_ENABLED": "false",
            # Above the default critical threshold (10): it is the one that does not fit.
            "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING": "20",
        },
        reported.append,
    )
    assert values == {"enabled": False}
    [error] = reported
    assert (error.key, error.value) == ("OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING", "20")
    assert "recovery_time_critical" in error.allowed


def test_variables_that_only_fit_together_are_accepted_in_any_order() -> None:
    reported: list[ConfigError] = []
    values = monitor_config_from_env(
        {
            # The warning comes first and does not fit with the default critical (10) alone.
            "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING": "20",
            "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL": "30",
        },
        reported.append,
    )
    assert values == {"recovery_time_warning": 20.0, "recovery_time_critical": 30.0}
    assert reported == []


def _documented_monitor_variables() -> list[tuple[str, str, str]]:
    """(field, variable, default) of each row of docs/analytics.md's configuration table."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "analytics.md").read_text()
    section = doc.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("OTEL_PYTHON_RAPTOR_MONITOR_"):
            rows.append((cells[0], cells[1], cells[2]))
    assert len(rows) == len(MONITOR_ENV_VARIABLES)
    return rows


@pytest.mark.parametrize(("field", "name", "default"), _documented_monitor_variables())
def test_each_documented_default_is_the_default(field: str, name: str, default: str) -> None:
    assert MONITOR_ENV_VARIABLES[name][0] == field
    reported: list[ConfigError] = []
    values = monitor_config_from_env({name: default}, reported.append)
    assert reported == []
    assert MonitorConfig.from_mapping(values) == MonitorConfig(), (name, default)
