"""Configuration of the error-recovery monitor and the error analytics.

``MonitorConfig`` is a frozen, validated value with the seed's thresholds as defaults. It is
built three ways, with the same rules as the rest of the configuration:

* in code: ``MonitorConfig(alert_cooldown=60)`` or ``MonitorConfig.from_mapping(mapping)``
  with the seed's dict shape (or the ``[monitor]`` table of the TOML file): a bad value raises
  :class:`~otel_raptor.errors.ConfigError` at once, naming the key, the value and what is
  allowed, and so does an unknown key;
* from the environment: ``monitor_config_from_env(environ, report)`` reads the
  ``OTEL_PYTHON_RAPTOR_MONITOR_*`` variables below. It never raises: a bad value is reported
  once through ``report`` and that key keeps its default.

The seed's shape::

    MONITOR_CONFIG = {
        "alert_thresholds": {
            "recovery_time": {"warning": 5.0, "critical": 10.0},   # seconds (p95)
            "success_rate": {"warning": 80, "critical": 60},       # percent of recoveries
            "error_frequency": 10,                                 # failed attempts a minute
            "memory_usage": 75,                                    # percent of the limit
        },
        "alert_cooldown": 300,         # seconds: one notification per alert per cooldown
        "report_interval": 3600,       # seconds between raptor.report events
        "metrics_retention": 86400,    # seconds of finished reports kept in memory
        "auto_resolve_alerts": True,
    }

Every field of ``MonitorConfig`` is also accepted at the top level under its own name
(``recovery_time_warning``, ``min_recoveries``, ...). This module is a leaf: standard library
only, importable from every layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from otel_raptor.errors import ConfigError

__all__ = [
    "MONITOR_ENV_VARIABLES",
    "MonitorConfig",
    "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN",
    "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR",
    "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_RESOLVE_AFTER",
    "OTEL_PYTHON_RAPTOR_MONITOR_AUTO_RESOLVE_ALERTS",
    "OTEL_PYTHON_RAPTOR_MONITOR_ENABLED",
    "OTEL_PYTHON_RAPTOR_MONITOR_ERROR_FREQUENCY",
    "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_INTERVAL",
    "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW",
    "OTEL_PYTHON_RAPTOR_MONITOR_INSIGHTS_PER_MINUTE",
    "OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE",
    "OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION",
    "OTEL_PYTHON_RAPTOR_MONITOR_MIN_ERRORS",
    "OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES",
    "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL",
    "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING",
    "OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL",
    "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL",
    "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_WARNING",
    "OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS",
    "OTEL_PYTHON_RAPTOR_MONITOR_TREND_INTERVAL",
    "monitor_config_from_env",
]

# --- the environment variables (docs/analytics.md lists them with their defaults) ----------

OTEL_PYTHON_RAPTOR_MONITOR_ENABLED = "OTEL_PYTHON_RAPTOR_MONITOR_ENABLED"
"""Run the error-recovery monitor and the analytics under ``RaptorInstrumentor``: a boolean,
default ``true``."""

OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING = (
    "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING"
)
"""p95 recovery time of a service above which ``RaptorRecoveryTimeHigh`` warns: seconds in
(0, 3600], default ``5.0``."""

OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL = (
    "OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL"
)
"""p95 recovery time above which ``RaptorRecoveryTimeHigh`` is critical: seconds in (0, 3600],
above the warning threshold, default ``10.0``."""

OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_WARNING = "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_WARNING"
"""Recovery success rate below which ``RaptorRecoverySuccessRateLow`` warns: percent in
(0, 100], default ``80``."""

OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL = (
    "OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL"
)
"""Recovery success rate below which ``RaptorRecoverySuccessRateLow`` is critical: percent in
(0, 100], below the warning threshold, default ``60``."""

OTEL_PYTHON_RAPTOR_MONITOR_ERROR_FREQUENCY = "OTEL_PYTHON_RAPTOR_MONITOR_ERROR_FREQUENCY"
"""Failed attempts a minute of one service above which ``RaptorErrorFrequencyHigh`` warns: a
number > 0, default ``10``."""

OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE = "OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE"
"""Memory use (percent of the effective, cgroup-aware limit) above which
``RaptorMemoryUsageHigh`` warns: percent in (0, 100], default ``75``."""

OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN = "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN"
"""At most one firing notification per alert per this many seconds: >= 0, default ``300``."""

OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL = "OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL"
"""Seconds between two ``raptor.report`` events: >= 60, default ``3600``."""

OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION = "OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION"
"""Seconds for which finished reports are kept in memory (``monitor.reports()``, at most 48
of them): >= the report interval, default ``86400``."""

OTEL_PYTHON_RAPTOR_MONITOR_AUTO_RESOLVE_ALERTS = "OTEL_PYTHON_RAPTOR_MONITOR_AUTO_RESOLVE_ALERTS"
"""Resolve an alert by itself once its condition has cleared for ``alert_resolve_after``
seconds: a boolean, default ``true``."""

OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW = "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW"
"""Seconds of recent data the alert rules and ``get_current_metrics()`` look at (the ``[5m]``
of the Prometheus rules): in [60, 3600], default ``300``."""

OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_INTERVAL = "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_INTERVAL"
"""Seconds between two evaluations of the alert rules: in (0, 300], default ``15``."""

OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR = "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR"
"""Seconds a condition must hold before its alert fires (Prometheus' ``for:``): >= 0, default
``60``."""

OTEL_PYTHON_RAPTOR_MONITOR_ALERT_RESOLVE_AFTER = "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_RESOLVE_AFTER"
"""Seconds a condition must have cleared before a firing alert resolves: >= 0, default
``120``."""

OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES = "OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES"
"""Recoveries of a service in the evaluation window before its success rate or recovery time
may alert: an integer >= 1, default ``20``."""

OTEL_PYTHON_RAPTOR_MONITOR_MIN_ERRORS = "OTEL_PYTHON_RAPTOR_MONITOR_MIN_ERRORS"
"""Errors (or recoveries) of a series in one trend interval before a trend insight may be
raised on it: an integer >= 1, default ``10``."""

OTEL_PYTHON_RAPTOR_MONITOR_TREND_INTERVAL = "OTEL_PYTHON_RAPTOR_MONITOR_TREND_INTERVAL"
"""Seconds per point of the trend series (baselines learn one point per interval): in
[1, 3600], default ``60``."""

OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS = "OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS"
"""Error patterns listed per service in a report: an integer in [1, 100], default ``10``
(each service's sketch keeps 4x as many counters, at least 32)."""

OTEL_PYTHON_RAPTOR_MONITOR_INSIGHTS_PER_MINUTE = "OTEL_PYTHON_RAPTOR_MONITOR_INSIGHTS_PER_MINUTE"
"""``raptor.insight`` events announced a minute at most (the rest are kept, not announced): an
integer >= 1, default ``10``."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(key: str, value: object, low: float, high: float, *, open_low: bool, unit: str) -> None:
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    valid = _is_number(value)
    if valid:
        try:
            number = float(value)  # type: ignore[arg-type]  # a number, checked above
        except OverflowError:  # an int too large for a float (10**400)
            valid = False
        else:
            valid = (
                math.isfinite(number) and low <= number <= high and not (open_low and number == low)
            )
    if not valid:
        raise ConfigError(key, value, f"{unit} in {bounds}")


def _integer(key: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(key, value, f"an integer in [{low}, {high}]")


_DAY: Final = 86_400.0
_YEAR: Final = 366 * _DAY

# field -> (low, high, low excluded?, unit) for the numbers; the rest are below.
_RANGES: Final[dict[str, tuple[float, float, bool, str]]] = {
    "recovery_time_warning": (0.0, 3600.0, True, "seconds"),
    "recovery_time_critical": (0.0, 3600.0, True, "seconds"),
    "success_rate_warning": (0.0, 100.0, True, "percent"),
    "success_rate_critical": (0.0, 100.0, True, "percent"),
    "memory_usage": (0.0, 100.0, True, "percent"),
    "error_frequency": (0.0, 1e9, True, "failed attempts a minute"),
    "alert_cooldown": (0.0, _DAY, False, "seconds"),
    "alert_for": (0.0, _DAY, False, "seconds"),
    "alert_resolve_after": (0.0, _DAY, False, "seconds"),
    "report_interval": (60.0, _DAY, False, "seconds"),
    "metrics_retention": (60.0, _YEAR, False, "seconds"),
    "evaluation_window": (60.0, 3600.0, False, "seconds"),
    "evaluation_interval": (0.0, 300.0, True, "seconds"),
    "trend_interval": (1.0, 3600.0, False, "seconds"),
}
_INTEGERS: Final[dict[str, tuple[int, int]]] = {
    "min_recoveries": (1, 1_000_000),
    "min_errors": (1, 1_000_000),
    "top_patterns": (1, 100),
    "insights_per_minute": (1, 10_000),
}


def _check_field(name: str, value: object) -> None:
    """Raise ``ConfigError`` unless ``value`` is allowed for the field ``name`` on its own."""
    key = f"monitor.{name}"
    if name in _RANGES:
        low, high, open_low, unit = _RANGES[name]
        _number(key, value, low, high, open_low=open_low, unit=unit)
    elif name in _INTEGERS:
        _integer(key, value, *_INTEGERS[name])
    elif not isinstance(value, bool):
        raise ConfigError(key, value, "a boolean")


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorConfig:
    """The monitor's knobs (see the module docstring and ``docs/analytics.md``).

    Thresholds: ``recovery_time_warning``/``_critical`` (seconds, p95 of a service's
    recoveries, default 5/10), ``success_rate_warning``/``_critical`` (percent of recoveries
    that succeed, 80/60), ``error_frequency`` (failed attempts a minute, 10),
    ``memory_usage`` (percent of the effective limit, 75). Alerts: ``alert_cooldown`` (300 s),
    ``alert_for`` (60 s pending before firing), ``alert_resolve_after`` (120 s cleared before
    resolving), ``auto_resolve_alerts`` (true), ``min_recoveries`` (20 in the window before a
    rate may alert). Windows: ``evaluation_window`` (300 s), ``evaluation_interval`` (15 s),
    ``report_interval`` (3600 s), ``metrics_retention`` (86400 s). Analytics:
    ``trend_interval`` (60 s), ``min_errors`` (10 per interval before a trend insight),
    ``top_patterns`` (10 per service), ``insights_per_minute`` (10). ``enabled``: whether
    ``RaptorInstrumentor`` runs the monitor (true).
    """

    enabled: bool = True
    recovery_time_warning: float = 5.0
    recovery_time_critical: float = 10.0
    success_rate_warning: float = 80.0
    success_rate_critical: float = 60.0
    error_frequency: float = 10.0
    memory_usage: float = 75.0
    alert_cooldown: float = 300.0
    report_interval: float = 3600.0
    metrics_retention: float = _DAY
    auto_resolve_alerts: bool = True
    evaluation_window: float = 300.0
    evaluation_interval: float = 15.0
    alert_for: float = 60.0
    alert_resolve_after: float = 120.0
    min_recoveries: int = 20
    min_errors: int = 10
    trend_interval: float = 60.0
    top_patterns: int = 10
    insights_per_minute: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.recovery_time_critical <= self.recovery_time_warning:
            raise ConfigError(
                "monitor.recovery_time_critical",
                self.recovery_time_critical,
                f"seconds above recovery_time_warning ({self.recovery_time_warning:g})",
            )
        if self.success_rate_critical >= self.success_rate_warning:
            raise ConfigError(
                "monitor.success_rate_critical",
                self.success_rate_critical,
                f"a percentage below success_rate_warning ({self.success_rate_warning:g})",
            )
        if self.trend_interval > self.evaluation_window:
            raise ConfigError(
                "monitor.trend_interval",
                self.trend_interval,
                f"seconds <= evaluation_window ({self.evaluation_window:g})",
            )
        if self.metrics_retention < self.report_interval:
            raise ConfigError(
                "monitor.metrics_retention",
                self.metrics_retention,
                f"seconds >= report_interval ({self.report_interval:g})",
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> MonitorConfig:
        """A config from the seed's dict shape (or the ``[monitor]`` TOML table), completed
        with the defaults. Raises ``ConfigError`` for an unknown key or a bad value."""
        return cls(**_flatten(mapping))

    def with_values(self, values: Mapping[str, object]) -> MonitorConfig:
        """This config with ``values`` (field names or the seed's shape) replacing its own."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(_flatten(values))
        return type(self)(**current)


_FIELDS: Final = tuple(f.name for f in fields(MonitorConfig))
_THRESHOLDS: Final = {
    "recovery_time": ("recovery_time_warning", "recovery_time_critical"),
    "success_rate": ("success_rate_warning", "success_rate_critical"),
    "error_frequency": ("error_frequency", None),
    "memory_usage": ("memory_usage", None),
}


def _flatten(mapping: Mapping[str, object]) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise ConfigError("monitor", mapping, "a mapping of monitor settings")
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == "alert_thresholds":
            flat.update(_thresholds(value))
        elif key in _FIELDS:
            flat[key] = value
        else:
            raise ConfigError(
                f"monitor.{key}",
                value,
                "a known key: alert_thresholds, " + ", ".join(_FIELDS),
            )
    return flat


def _thresholds(value: object) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError("monitor.alert_thresholds", value, "a mapping of thresholds")
    flat: dict[str, object] = {}
    for name, given in value.items():
        targets = _THRESHOLDS.get(name)
        if targets is None:
            raise ConfigError(
                f"monitor.alert_thresholds.{name}", given, "one of " + ", ".join(_THRESHOLDS)
            )
        warning, critical = targets
        if isinstance(given, Mapping):
            for level, number in given.items():
                if level == "warning":
                    flat[warning] = number
                elif level == "critical" and critical is not None:
                    flat[critical] = number
                else:
                    allowed = "warning" if critical is None else "warning or critical"
                    raise ConfigError(f"monitor.alert_thresholds.{name}.{level}", number, allowed)
        else:
            flat[warning] = given
    return flat


# --- the environment ------------------------------------------------------------------------

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("a boolean: true/false, 1/0, yes/no, on/off")


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(value):
        raise ValueError("a finite number")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("an integer") from None


#: Every ``OTEL_PYTHON_RAPTOR_MONITOR_*`` variable: the field it sets and its parser.
MONITOR_ENV_VARIABLES: Final[Mapping[str, tuple[str, Callable[[str], object]]]] = {
    OTEL_PYTHON_RAPTOR_MONITOR_ENABLED: ("enabled", _parse_bool),
    OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_WARNING: ("recovery_time_warning", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL: ("recovery_time_critical", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_WARNING: ("success_rate_warning", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_SUCCESS_RATE_CRITICAL: ("success_rate_critical", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_ERROR_FREQUENCY: ("error_frequency", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_MEMORY_USAGE: ("memory_usage", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN: ("alert_cooldown", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL: ("report_interval", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION: ("metrics_retention", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_AUTO_RESOLVE_ALERTS: ("auto_resolve_alerts", _parse_bool),
    OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW: ("evaluation_window", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_INTERVAL: ("evaluation_interval", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR: ("alert_for", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_ALERT_RESOLVE_AFTER: ("alert_resolve_after", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES: ("min_recoveries", _parse_int),
    OTEL_PYTHON_RAPTOR_MONITOR_MIN_ERRORS: ("min_errors", _parse_int),
    OTEL_PYTHON_RAPTOR_MONITOR_TREND_INTERVAL: ("trend_interval", _parse_float),
    OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS: ("top_patterns", _parse_int),
    OTEL_PYTHON_RAPTOR_MONITOR_INSIGHTS_PER_MINUTE: ("insights_per_minute", _parse_int),
}


def monitor_config_from_env(
    environ: Mapping[str, str], report: Callable[[ConfigError], None]
) -> dict[str, object]:
    """The ``OTEL_PYTHON_RAPTOR_MONITOR_*`` settings in ``environ``, by field name.

    Unset and empty variables are skipped. A value that does not parse, is out of range, or
    does not fit with the other values read here and the defaults (a critical success rate
    above the warning one) is reported through ``report`` (a ``ConfigError`` naming the
    variable, the value and what is allowed) and left out: that key keeps its default.
    Values that only make sense together (a warning of 20 s with a critical of 30 s) are
    accepted in any order, and only the values that do not fit are reported. Never raises;
    pure (``environ`` is any mapping).

    :meth:`RaptorConfig.load <otel_raptor.config.RaptorConfig.load>` judges these values
    together with the file's ``[monitor]`` table instead (see ``_monitor_env_values``).
    """
    read = _monitor_env_values(environ, report)
    values: dict[str, object] = {}
    try:
        pending = {field_name: value for field_name, (value, _) in read.items()}
        progress = True
        failures: dict[str, ConfigError] = {}
        while pending and progress:
            progress = False
            failures = {}
            for field_name, value in list(pending.items()):
                trial = {**values, field_name: value}
                try:
                    MonitorConfig(**trial)  # type: ignore[arg-type]  # checked here
                except ConfigError as error:
                    failures[field_name] = error
                else:
                    values = trial
                    del pending[field_name]
                    progress = True
        for field_name, failure in failures.items():
            name = read[field_name][1]
            allowed = failure.allowed
            if failure.key != f"monitor.{field_name}":
                allowed = f"a value consistent with {failure.key}={failure.value!r} ({allowed})"
            _safely(report, ConfigError(name, environ[name], allowed))
    except Exception:  # noqa: BLE001 - never raise from here
        return {}
    return values


def _monitor_env_values(
    environ: Mapping[str, str], report: Callable[[ConfigError], None]
) -> dict[str, tuple[object, str]]:
    """Each ``OTEL_PYTHON_RAPTOR_MONITOR_*`` value in ``environ`` that is fine on its own, by
    field name, with its variable's name. A value that does not parse or is out of range is
    reported (the variable, the value as written, what is allowed) and left out. Checks
    between fields are the caller's. Never raises."""
    values: dict[str, tuple[object, str]] = {}
    for name, (field_name, parse) in MONITOR_ENV_VARIABLES.items():
        raw = environ.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            value = parse(raw.strip())
            _check_field(field_name, value)
        except ValueError as error:  # ConfigError is a ValueError
            allowed = error.allowed if isinstance(error, ConfigError) else str(error)
            _safely(report, ConfigError(name, raw, allowed))
            continue
        values[field_name] = (value, name)
    return values


def _monitor_table_values(
    table: Mapping[str, object],
) -> tuple[dict[str, tuple[object, str]], list[ConfigError]]:
    """The settings of a ``[monitor]`` table (the seed's shape), by field name, each with its
    key in the table (``alert_thresholds.recovery_time.warning``), and the keys that are not
    known, as problems named ``monitor.<key>``. Unlike :func:`_flatten`, a bad key does not
    lose the others. Values are not checked here."""
    values: dict[str, tuple[object, str]] = {}
    problems: list[ConfigError] = []
    for key, value in table.items():
        if key in _FIELDS:
            values[key] = (value, key)
        elif key != "alert_thresholds":
            problems.append(
                ConfigError(
                    f"monitor.{key}", value, "a known key: alert_thresholds, " + ", ".join(_FIELDS)
                )
            )
        elif not isinstance(value, Mapping):
            problems.append(
                ConfigError("monitor.alert_thresholds", value, "a mapping of thresholds")
            )
        else:
            for name, given in value.items():
                levels = given.items() if isinstance(given, Mapping) else [(None, given)]
                for level, number in levels:
                    try:
                        flat = _thresholds({name: number if level is None else {level: number}})
                    except ConfigError as error:
                        problems.append(error)
                        continue
                    where = f"alert_thresholds.{name}" + ("" if level is None else f".{level}")
                    for field_name, checked in flat.items():
                        values[field_name] = (checked, where)
    return values, problems


def _safely(report: Callable[[ConfigError], None], error: ConfigError) -> None:
    # A failing reporter must not make this function raise.
    with contextlib.suppress(Exception):
        report(error)
