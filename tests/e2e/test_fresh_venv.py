"""The README's zero-code steps, exactly, in a fresh virtual environment.

``pip install 'otel-raptor[requests]'`` (from this checkout) into a new venv with nothing else
in it, then ``opentelemetry-instrument python app.py`` with only the standard ``OTEL_*``
variables that point the OTLP exporter at a collector (here an in-test receiver) and make
raptor's retries quick. The app (tests/e2e/apps/flaky_client.py) has no telemetry or
resilience code of its own. Raptor's spans and metrics must arrive, decoded: the launcher
sets the SDK up through the configurator that ``otel-raptor`` brings (opentelemetry-distro).

Installing takes tens of seconds (pip reuses its cache), in the background while the other
tests run (tests/support/background.py). Without a package index the test skips with the
reason, or fails under ``RAPTOR_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_raptor.telemetry.instruments import METRIC_ERRORS, METRIC_RETRIES, SPAN_RECOVERY
from tests.e2e.otlp_receiver import OTLPReceiver
from tests.support import background
from tests.support.faulty_http import FaultyHTTPServer, ok, status
from tests.support.services import services_required

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "e2e" / "apps" / "flaky_client.py"


@pytest.fixture(scope="module")
def fresh_venv() -> Path:
    """A new venv with ``otel-raptor[requests]`` from this checkout, and nothing else: built
    in the background as the session began (tests/support/background.py; this test runs
    last)."""
    run = background.run_for("fresh_venv")
    installed = run.result()
    if installed.returncode != 0:
        reason = f"pip could not install otel-raptor[requests]: {installed.stderr[-2000:]}"
        if services_required():
            pytest.fail(f"{reason} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(reason)
    return run.directory / "venv"


def test_zero_code_exports_raptor_spans_and_metrics(fresh_venv: Path) -> None:
    python = fresh_venv / "bin" / "python"
    launcher = fresh_venv / "bin" / "opentelemetry-instrument"
    assert launcher.exists(), "otel-raptor must bring the launcher"
    # Nothing of this checkout leaks in: the venv's own otel_raptor is the installed one.
    where = subprocess.run(
        [str(python), "-c", "import otel_raptor, sys; print(otel_raptor.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert str(fresh_venv) in where, where

    with (
        OTLPReceiver() as receiver,
        FaultyHTTPServer([status(503), status(503), ok("recovered")]) as server,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHON"))}
        env.update(
            {
                # What the README tells a user to set: where the collector is.
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "fresh-venv-app",
                # Quick exports and retries, so the test does not wait.
                "OTEL_METRIC_EXPORT_INTERVAL": "500",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY": "0.01",
                "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY": "0.05",
            }
        )
        completed = subprocess.run(
            [str(launcher), str(python), str(APP), server.url("/"), "--breaker-wait", "0"],
            cwd=str(fresh_venv),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        results = next(
            json.loads(line.removeprefix("RESULT "))
            for line in completed.stdout.splitlines()
            if line.startswith("RESULT ")
        )
        assert results[0] == {"phase": "recover", "status": 200}  # recovered by retries
        assert receiver.wait_for(
            lambda: (
                METRIC_RETRIES.name in receiver.metrics()
                and any(s.name == SPAN_RECOVERY.name for s in receiver.spans())
            ),
            timeout=10,
        ), (receiver.metrics().keys(), completed.stderr[-2000:])
    recovery = [s for s in receiver.spans() if s.name == SPAN_RECOVERY.name]
    assert recovery[0].attributes["raptor.recovery.outcome"] == "recovered"
    assert METRIC_ERRORS.name in receiver.metrics()
    assert sys.executable != str(python)  # the app ran in the fresh venv, not ours
