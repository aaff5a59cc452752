from __future__ import annotations

import dataclasses
import math
import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.classification import Severity
from otel_raptor.core.memory import (
    CachePriority,
    CleanupLevel,
    EffectivenessLearner,
    MemoryOptions,
    PressureLevel,
    PressureTracker,
    cleanup_level_for_pressure,
    cleanup_level_for_severity,
    plan_cleanup,
    pressure_level,
)
from otel_raptor.errors import ConfigError

THRESHOLDS = (70.0, 85.0, 95.0)


def test_defaults_are_the_seed_memory_config() -> None:
    options = MemoryOptions()
    assert options.auto_cleanup is True
    assert options.cleanup_interval == 300.0
    assert options.max_cache_age == 3600.0
    assert options.max_working_age == 1800.0
    assert options.cleanup_batch_size == 100
    assert options.thresholds == THRESHOLDS


@pytest.mark.parametrize(
    ("kwargs", "key", "allowed"),
    [
        ({"warning_threshold": 0}, "memory.thresholds.warning", "(0, 100]"),
        ({"emergency_threshold": 101}, "memory.thresholds.emergency", "(0, 100]"),
        ({"critical_threshold": 70}, "memory.thresholds.critical", "must increase"),
        ({"emergency_threshold": 80}, "memory.thresholds.emergency", "must increase"),
        ({"warning_threshold": math.nan}, "memory.thresholds.warning", "(0, 100]"),
        ({"cleanup_interval": 0}, "memory.cleanup_interval", "> 0"),
        ({"cleanup_interval": "300"}, "memory.cleanup_interval", "> 0"),
        ({"cleanup_batch_size": 0}, "memory.cleanup_batch_size", ">= 1"),
        ({"cleanup_batch_size": 1.5}, "memory.cleanup_batch_size", ">= 1"),
        ({"max_working_age": 4000}, "memory.max_working_age", "max_cache_age=3600"),
        ({"auto_cleanup": "yes"}, "memory.auto_cleanup", "true or false"),
        ({"hysteresis": 50}, "memory.hysteresis", "[0, 50)"),
        # Fractions for percentages: a level that could never be left again.
        ({"warning_threshold": 0.7}, "memory.thresholds.warning", "not a fraction"),
        ({"warning_threshold": 3}, "memory.thresholds.warning", "above memory.hysteresis (5)"),
        ({"cooldown": -1}, "memory.cooldown", ">= 0"),
        ({"backoff_max": 10}, "memory.backoff_max", "backoff_base=300"),
    ],
)
def test_bad_options_name_key_value_and_range(
    kwargs: dict[str, object], key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        MemoryOptions(**kwargs)  # type: ignore[arg-type]
    assert caught.value.key == key
    assert caught.value.value == next(iter(kwargs.values())) or math.isnan(
        caught.value.value  # type: ignore[arg-type]
    )
    assert allowed in caught.value.allowed


def test_from_mapping_reads_the_seed_nested_thresholds_and_rejects_unknown_keys() -> None:
    options = MemoryOptions.from_mapping(
        {"cleanup_interval": 60, "thresholds": {"warning": 50, "critical": 60, "emergency": 90}}
    )
    assert options.thresholds == (50.0, 60.0, 90.0)
    assert options.cleanup_interval == 60
    with pytest.raises(ConfigError) as caught:
        MemoryOptions.from_mapping({"cleanup_intervall": 60})
    assert caught.value.key == "memory.cleanup_intervall"
    assert "cleanup_interval" in caught.value.allowed
    with pytest.raises(ConfigError) as caught:
        MemoryOptions.from_mapping({"thresholds": {"severe": 90}})
    assert caught.value.key == "memory.thresholds.severe"
    with pytest.raises(ConfigError) as caught:
        MemoryOptions.from_mapping({"thresholds": {"warning": 90}})
    assert caught.value.key == "memory.thresholds.critical"


@pytest.mark.parametrize(
    ("percent", "level"),
    [
        (0.0, PressureLevel.NORMAL),
        (69.9, PressureLevel.NORMAL),
        (70.0, PressureLevel.WARNING),
        (84.9, PressureLevel.WARNING),
        (85.0, PressureLevel.CRITICAL),
        (95.0, PressureLevel.EMERGENCY),
        (130.0, PressureLevel.EMERGENCY),
    ],
)
def test_levels_going_up(percent: float, level: PressureLevel) -> None:
    assert pressure_level(percent, THRESHOLDS, hysteresis=5.0) is level


def test_going_down_needs_the_hysteresis_margin() -> None:
    tracker = PressureTracker(MemoryOptions())
    change = tracker.update(0.96)
    assert change is not None
    assert (change.previous, change.level, change.usage_ratio) == (
        PressureLevel.NORMAL,
        PressureLevel.EMERGENCY,
        0.96,
    )
    assert tracker.update(0.94) is None  # within 5 points of 95: stays
    assert tracker.update(0.901) is None
    change = tracker.update(0.89)  # below 90: emergency left, and 89 >= 85 - 5 holds critical
    assert change is not None
    assert change.level is PressureLevel.CRITICAL
    change = tracker.update(0.70)  # below 80, still >= 70 - 5: warning
    assert change is not None
    assert change.level is PressureLevel.WARNING
    assert tracker.update(0.66) is None
    change = tracker.update(0.649)
    assert change is not None
    assert change.level is PressureLevel.NORMAL


@given(st.lists(st.floats(min_value=0.0, max_value=1.2), min_size=1, max_size=50))
def test_a_series_hovering_at_a_threshold_does_not_flap(jitter: list[float]) -> None:
    tracker = PressureTracker(MemoryOptions())
    tracker.update(0.86)
    for value in jitter:
        # Every reading within +-4 points of the critical threshold: at most one change.
        assert tracker.update(0.81 + 0.08 * value / 1.2) is None


@given(st.floats(min_value=0.0, max_value=150.0), st.sampled_from(list(PressureLevel)))
def test_the_level_never_drops_below_the_raw_level_nor_rises_above_it_and_current(
    percent: float, current: PressureLevel
) -> None:
    raw = pressure_level(percent, THRESHOLDS)
    held = pressure_level(percent, THRESHOLDS, current=current, hysteresis=5.0)
    assert raw.rank <= held.rank <= max(raw.rank, current.rank)


def test_cleanup_levels_for_pressure_and_severity() -> None:
    assert cleanup_level_for_pressure(PressureLevel.NORMAL) is None
    assert cleanup_level_for_pressure(PressureLevel.WARNING) is CleanupLevel.STANDARD
    assert cleanup_level_for_pressure(PressureLevel.CRITICAL) is CleanupLevel.CRITICAL
    assert cleanup_level_for_pressure(PressureLevel.EMERGENCY) is CleanupLevel.EMERGENCY
    assert cleanup_level_for_severity(Severity.LOW) is None
    assert cleanup_level_for_severity(Severity.MEDIUM) is CleanupLevel.STANDARD
    assert cleanup_level_for_severity(Severity.HIGH) is CleanupLevel.CRITICAL
    assert cleanup_level_for_severity(Severity.CRITICAL) is CleanupLevel.EMERGENCY


CACHES = [
    ("low", CachePriority.LOW, None),
    ("normal", CachePriority.NORMAL, 600.0),
    ("high", CachePriority.HIGH, None),
]


def test_plans_per_level() -> None:
    options = MemoryOptions()
    standard = plan_cleanup(CleanupLevel.STANDARD, CACHES, options)
    assert dict(standard.expire) == {"low": 3600.0, "normal": 600.0, "high": 3600.0}
    assert standard.clear == ()
    assert standard.gc_generations == (0, 1)
    assert standard.trim is False

    critical = plan_cleanup(CleanupLevel.CRITICAL, CACHES, options)
    assert critical.clear == ("low",)
    assert dict(critical.expire) == {"normal": 600.0, "high": 1800.0}
    assert critical.gc_generations == (2,)
    assert critical.trim is False

    emergency = plan_cleanup(CleanupLevel.EMERGENCY, CACHES, options)
    assert emergency.clear == ("low", "normal", "high")
    assert dict(emergency.expire) == {}
    assert emergency.gc_generations == (2,)
    assert emergency.trim is True


def test_learner_backs_off_a_useless_level_and_a_useful_run_resets_it() -> None:
    options = MemoryOptions(ineffective_runs=3, backoff_base=100.0, backoff_max=350.0)
    learner = EffectivenessLearner(options)
    level = CleanupLevel.STANDARD
    now = 0.0
    for _ in range(2):
        assert learner.decide(level, now).run
        learner.record(level, bytes_freed=1000, entries_evicted=0, now=now)
    assert learner.decide(level, now).run  # two useless runs: not yet
    learner.record(level, bytes_freed=0, entries_evicted=0, now=now)
    decision = learner.decide(level, 10.0)
    assert (decision.run, decision.skip_until) == (False, 100.0)
    assert learner.decide(CleanupLevel.CRITICAL, 10.0).run  # levels are learned apart
    assert learner.decide(level, 100.0).run  # one probe when the back-off ends
    learner.record(level, bytes_freed=0, entries_evicted=0, now=100.0)
    assert learner.decide(level, 299.0).skip_until == 300.0  # doubled
    learner.record(level, bytes_freed=0, entries_evicted=0, now=300.0)
    assert learner.decide(level, 301.0).skip_until == 650.0  # 400 capped at 350
    assert learner.useless_runs(level) == 5
    learner.record(level, bytes_freed=0, entries_evicted=1, now=650.0)
    assert learner.useless_runs(level) == 0
    assert learner.decide(level, 650.0).run
    learner.record(level, bytes_freed=options.min_effective_bytes, entries_evicted=0, now=701)
    assert learner.useless_runs(level) == 0


def test_the_docs_option_table_gives_every_option_its_default() -> None:
    # docs/memory.md's "Configuration" table: `300 s`, `70 / 85 / 95 %`, `1 MiB`, `True`, ...
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "memory.md"
    section = doc.read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1]
    units = {"s": 1, "%": 1, "points": 1, "MiB": 2**20}
    documented: dict[str, object] = {}
    for line in section.split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0].split("(or")[0])
        if len(cells) != 3 or not names:
            continue
        text = cells[1].strip("`")
        if text in ("True", "False"):
            documented[names[0]] = text == "True"
            continue
        values = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)]
        unit = text.split()[-1] if not text.split()[-1][0].isdigit() else ""
        assert len(values) == len(names), (cells[0], text)
        for name, value in zip(names, values, strict=True):
            documented[name] = value * units[unit] if unit else value
    defaults = {f.name: f.default for f in dataclasses.fields(MemoryOptions)}
    assert documented == defaults
