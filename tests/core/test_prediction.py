"""The alarm state machine: thresholds, hysteresis, escalation, no flapping."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.classification import Severity
from otel_raptor.core.forecast import Forecast, forecast
from otel_raptor.core.prediction import Alarm, AlarmOptions, Cleared, Raised, severity_of
from otel_raptor.errors import ConfigError

OPTIONS = AlarmOptions(horizon_s=1000.0, clear_after=3)


def fc(probability: float = 0.0, tte: float | None = None, confidence: float = 1.0) -> Forecast:
    return Forecast(
        time_to_exhaustion_s=tte, probability=probability, confidence=confidence, slope=0.0
    )


def test_raises_on_probability() -> None:
    alarm = Alarm(OPTIONS)
    assert alarm.evaluate(fc(0.79)) is None
    result = alarm.evaluate(fc(0.8))
    assert result == Raised(fc(0.8), Severity.MEDIUM)
    assert alarm.raised


def test_raises_on_time_to_exhaustion_only_with_confidence() -> None:
    alarm = Alarm(OPTIONS)
    assert alarm.evaluate(fc(0.1, tte=900.0, confidence=0.49)) is None
    result = alarm.evaluate(fc(0.1, tte=900.0, confidence=0.5))
    assert isinstance(result, Raised)
    assert result.severity is Severity.MEDIUM


def test_a_level_at_the_limit_raises_whatever_the_confidence_and_never_clears() -> None:
    # At the limit there is no extrapolation to distrust: a short window (low confidence) or
    # a flat series at the limit (probability about 0.5) must still raise, and stay raised.
    options = AlarmOptions(horizon_s=1000.0, clear_threshold=0.6, raise_threshold=0.9)
    alarm = Alarm(options)
    at_limit = fc(0.5, tte=0.0, confidence=0.0)
    result = alarm.evaluate(at_limit)
    assert isinstance(result, Raised)
    assert result.severity is Severity.CRITICAL
    for _ in range(10):
        assert alarm.evaluate(at_limit) is None
    assert alarm.raised
    assert Alarm(options).evaluate(fc(0.5, tte=1.0, confidence=0.0)) is None


def test_clears_only_after_k_quiet_evaluations() -> None:
    alarm = Alarm(OPTIONS)
    alarm.evaluate(fc(0.9))
    assert alarm.evaluate(fc(0.1)) is None
    assert alarm.evaluate(fc(0.1)) is None
    assert alarm.evaluate(fc(0.5)) is None  # between thresholds: resets the quiet run
    assert alarm.evaluate(fc(0.1)) is None
    assert alarm.evaluate(fc(0.1)) is None
    assert alarm.evaluate(fc(0.1)) == Cleared(fc(0.1))
    assert not alarm.raised


def test_a_near_time_to_exhaustion_keeps_it_raised() -> None:
    alarm = Alarm(OPTIONS)
    alarm.evaluate(fc(0.9))
    for _ in range(5):  # 1400 s < 1.5 x 1000 s
        assert alarm.evaluate(fc(0.1, tte=1400.0)) is None
    assert alarm.raised
    for _ in range(2):
        alarm.evaluate(fc(0.1, tte=1600.0))
    assert isinstance(alarm.evaluate(fc(0.1, tte=1600.0)), Cleared)


def test_severity_rises_are_reported_once() -> None:
    alarm = Alarm(OPTIONS)
    assert alarm.evaluate(fc(0.85, tte=900.0)) == Raised(fc(0.85, tte=900.0), Severity.MEDIUM)
    assert alarm.evaluate(fc(0.85, tte=800.0)) is None
    assert alarm.evaluate(fc(0.9, tte=400.0)) == Raised(
        fc(0.9, tte=400.0), Severity.HIGH, escalated=True
    )
    assert alarm.evaluate(fc(0.99, tte=200.0)) == Raised(
        fc(0.99, tte=200.0), Severity.CRITICAL, escalated=True
    )
    assert alarm.evaluate(fc(0.85, tte=900.0)) is None  # never de-escalates while raised
    assert alarm.severity is Severity.CRITICAL


def test_severity_of() -> None:
    assert severity_of(fc(0.5, tte=200.0), 1000.0) is Severity.CRITICAL
    assert severity_of(fc(0.0, tte=0.0), 1000.0) is Severity.CRITICAL
    assert severity_of(fc(0.99, tte=900.0), 1000.0) is Severity.MEDIUM
    assert severity_of(fc(0.5, tte=400.0), 1000.0) is Severity.HIGH
    assert severity_of(fc(0.95), 1000.0) is Severity.HIGH
    assert severity_of(fc(0.9), 1000.0) is Severity.MEDIUM


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"horizon_s": 0}, "prediction.horizon_s"),
        ({"raise_threshold": 1.5}, "prediction.raise_threshold"),
        ({"clear_threshold": 0.9}, "prediction.clear_threshold"),
        ({"min_confidence": -0.1}, "prediction.min_confidence"),
        ({"clear_after": 0}, "prediction.clear_after"),
        ({"clear_after": True}, "prediction.clear_after"),
        ({"clear_margin": 0.5}, "prediction.clear_margin"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AlarmOptions(**kwargs)  # type: ignore[arg-type]  # deliberately wrong
    assert caught.value.key == key
    assert key in str(caught.value)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    level=st.floats(0.2, 0.7),
    noise=st.floats(0.001, 0.03),
)
def test_a_noisy_stable_series_never_flaps(seed: int, level: float, noise: float) -> None:
    rnd = random.Random(seed)
    alarm = Alarm(AlarmOptions(horizon_s=1800.0))
    window: collections.deque[tuple[float, float]] = collections.deque(maxlen=60)
    transitions = 0
    for i in range(240):  # two hours at 30 s
        window.append((i * 30.0, level + rnd.gauss(0, noise)))
        if len(window) >= 30 and alarm.evaluate(forecast(window, 1.0, horizon=1800.0)):
            transitions += 1
    assert transitions == 0


def test_the_docs_alarm_table_gives_every_option_its_default() -> None:
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "prediction.md"
    section = doc.read_text(encoding="utf-8").split("## Alarms: thresholds and hysteresis", 1)[1]
    documented = {}
    for line in section.split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+`", cells[0]):
            documented[cells[0].strip("`")] = float(cells[1])
    defaults = {f.name: f.default for f in dataclasses.fields(AlarmOptions)}
    assert documented == defaults
