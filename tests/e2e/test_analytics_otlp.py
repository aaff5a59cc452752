"""End to end: a flaky loopback workload under ``opentelemetry-instrument`` produces an alert and
an insight, which arrive as OTLP log records (decoded with opentelemetry-proto).

The application is ``examples/app.py``, which has no resilience or monitoring code: the
launcher loads ``RaptorInstrumentor``, which hooks requests and starts the monitor. The
``OTEL_PYTHON_RAPTOR_MONITOR_*`` variables shorten the monitor's windows so that it concludes
within seconds; the SDK's OTLP log exporter (the distro's default) sends what it concludes to
an in-test receiver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from otel_raptor.runtime.monitor import RULE_ERROR_FREQUENCY, RULE_SUCCESS_RATE
from otel_raptor.telemetry.instruments import (
    ATTR_ALERT_NAME,
    ATTR_ALERT_SEVERITY,
    ATTR_ERROR_CATEGORY,
    ATTR_INSIGHT_EVIDENCE,
    ATTR_INSIGHT_KIND,
    ATTR_INSIGHT_RECOMMENDATION,
    ATTR_SERVICE,
    INSTRUMENTATION_NAME,
    LOG_ALERT_FIRING,
    LOG_INSIGHT,
    METRIC_ALERT_NOTIFICATIONS,
    METRIC_INSIGHTS,
    METRIC_RECOVERY_RESULTS,
)
from tests.e2e.otlp_receiver import OTLPReceiver, contract_violations
from tests.e2e.test_otlp_auto import configurator_path, launcher
from tests.support.services import require_module

__all__ = ["configurator_path", "launcher"]  # fixtures, imported to be used here

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "app.py"

MONITOR_ENV = {
    # Quick retries, and a breaker that stays closed so every /stock call is retried.
    "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY": "0.01",
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY": "0.05",
    "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD": "100",
    "OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS": "1000",
    "OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO": "10",
    # The monitor: alerts at once, with a minute's window and small minimum volumes.
    "OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR": "0",
    "OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES": "3",
    "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW": "60",
    "OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_INTERVAL": "0.2",
    "OTEL_PYTHON_RAPTOR_MONITOR_TREND_INTERVAL": "1",
    "OTEL_PYTHON_RAPTOR_MONITOR_MIN_ERRORS": "3",
    "APP_WAIT_FOR_INSIGHTS": "15",
}


@dataclass
class Run:
    stdout: str
    stderr: str
    receiver: OTLPReceiver


@pytest.fixture(scope="module")
def run(launcher: Path, configurator_path: str | None) -> Run:
    require_module("requests")
    receiver = OTLPReceiver().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APP_"))}
        env.update(receiver.env("raptor-analytics", logs=True))
        env.update(MONITOR_ENV)
        if configurator_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (configurator_path, env.get("PYTHONPATH", "")) if p
            )
        completed = subprocess.run(
            [str(launcher), sys.executable, str(APP)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        # The log processor exports at shutdown; give a late batch a moment to be read.
        receiver.wait_for(lambda: bool(receiver.events(LOG_INSIGHT.name)), timeout=5)
    finally:
        receiver.stop()
    assert receiver.errors == []
    return Run(completed.stdout, completed.stderr, receiver)


def _stock(run: Run) -> str:
    [line] = [line for line in run.stdout.splitlines() if "success rate 0%" in line]
    return line.split(": ", 1)[0]


def test_the_app_ran_its_workload_unchanged(run: Run) -> None:
    statuses = json.loads(run.stdout.splitlines()[0].split(": ", 1)[1].replace("'", '"'))
    assert statuses == [200] * 6 + [503] * 6
    assert "insight futile_retries" in run.stdout, run.stdout + run.stderr


def test_an_alert_arrives_as_an_otlp_log_record(run: Run) -> None:
    stock = _stock(run)
    firing = [
        r for r in run.receiver.events(LOG_ALERT_FIRING.name) if r.attributes[ATTR_SERVICE] == stock
    ]
    names = {r.attributes[ATTR_ALERT_NAME] for r in firing}
    assert {RULE_SUCCESS_RATE, RULE_ERROR_FREQUENCY} <= names, names
    [critical] = [
        r
        for r in firing
        if r.attributes[ATTR_ALERT_NAME] == RULE_SUCCESS_RATE
        and r.attributes[ATTR_ALERT_SEVERITY] == "critical"
    ]
    assert critical.severity_text == "ERROR"
    assert critical.body.startswith(f"0 % of the recoveries at {stock} succeed")
    assert critical.attributes["raptor.alert.threshold"] == 60.0
    assert critical.scope_name == INSTRUMENTATION_NAME
    assert critical.resource["service.name"] == "raptor-analytics"
    assert critical.time_unix_nano > 0


def test_an_insight_arrives_as_an_otlp_log_record(run: Run) -> None:
    stock = _stock(run)
    [insight] = [
        r for r in run.receiver.events(LOG_INSIGHT.name) if r.attributes[ATTR_SERVICE] == stock
    ]
    assert insight.attributes[ATTR_INSIGHT_KIND] == "futile_retries"
    assert insight.attributes[ATTR_ERROR_CATEGORY] == "unavailable"
    assert insight.body.startswith(f"retries on 503 (unavailable) at {stock} never succeed")
    assert insight.attributes[ATTR_INSIGHT_RECOMMENDATION].startswith("stop retrying unavailable")
    evidence = json.loads(insight.attributes[ATTR_INSIGHT_EVIDENCE])
    assert evidence["succeeded"] == 0
    assert evidence["retried"] >= 3


def test_the_log_events_and_metrics_follow_the_contract(run: Run) -> None:
    assert contract_violations(run.receiver) == []
    metrics = run.receiver.metrics()
    for spec in (METRIC_ALERT_NOTIFICATIONS, METRIC_INSIGHTS, METRIC_RECOVERY_RESULTS):
        assert spec.name in metrics, spec.name
    # No message, URL or template ever became a metric attribute.
    for points in metrics.values():
        for point in points:
            values = [str(value) for value in point.attributes.values()]
            assert not [value for value in values if "/stock" in value], point
