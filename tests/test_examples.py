"""Every example runs, against its own loopback server, and prints real values.

Each script is run as a newcomer would (``python examples/<name>.py``) in a fresh interpreter;
the test checks its exit status and the lines that carry the numbers it measured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import require_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: example -> patterns its output must match (each one somewhere in stdout).
EXPECTED: dict[str, tuple[str, ...]] = {
    "basic_error_recovery.py": (
        r"first call failed: HTTP 503; classified as unavailable \(medium\), retryable=True",
        r"recovered=True strategy=retry_with_backoff attempts=3 in \d+\.\d\d s",
        r"down for good: success=True strategy=failover attempts=\d+ -> .*'cached'",
        r"server hits: \{'/orders': 3, '/down': \d+\}",
    ),
    "circuit_breaker.py": (
        r"breaker payments: closed -> open \(consecutive_failures\)",
        r"call 5: refused at once \(retry in 0\.\d\d s\)",
        r"breaker payments: half_open -> closed \(probes_succeeded\)",
        r"9 calls, 6 reached the server",
    ),
    "predictive_monitoring.py": (
        r"process RSS \d+\.\d MiB, \d+ threads, \d+ open file descriptors",
        r"process_memory +\d+\.\d% of its limit",
        r"20 failed calls to http://127\.0\.0\.1:\d+; errors since the last sample: catalog",
        # A forecast that would raise an alarm (probability >= 0.8), as the example says.
        r"forecast of a leak: runs out in 110 s, p=0\.(8|9)\d within 5 min",
        r"disk +value 0\.\d{3} of 1,",  # a fraction, not rounded to "0 of 1"
    ),
    "memory_optimization.py": (
        r"cache responses +300 entries, priority low",
        r"server answered 300 requests",
        r"critical cleanup: evicted \{'responses': 300, 'products': 0\}, cleared \['responses'\]",
        r"left: 0 responses, 300 products",
    ),
    "performance_monitoring.py": (
        r"ALERT firing: \[warning\] RaptorRecoveryTimeHigh: p95 recovery time of http",
        r"ALERT firing: \[warning\] RaptorRecoverySuccessRateLow: 67 % of the recoveries",
        r"http://127\.0\.0\.1:\d+: 12 recoveries, success 67%, p95 \d+ ms",
        r"pattern at http://127\.0\.0\.1:\d+: 20x 503 'HTTP Error <int>: Service Unavailable'",
        r"retry_with_backoff on unavailable at http://127\.0\.0\.1:\d+: 8 recovered with retry,"
        r" 4 failed with retry",
    ),
    "app.py": (
        # /stock's first call fails all five attempts (four retries) and the breaker stays
        # closed: one call's 503s are not an outage on their own (one route may be broken).
        # The second call's first 503 continues the run over two calls: the breaker opens
        # and that call ends with its 503 at once, so /stock is hit 5 + 1 times.
        r"statuses seen by the app: \[200, 200, 200, 200, 200, 200, 503, 503,"
        r" 'RequestsCircuitOpen'",
        r"requests that reached the servers: /catalog 12, /stock 6\n",
        r"http://127\.0\.0\.1:\d+: 6 recoveries, success rate 100%, 6 failed attempts",
    ),
    "breaker_demo.py": (),
}


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_example_runs_and_prints_real_values(name: str) -> None:
    if name in ("app.py", "breaker_demo.py"):
        require_module("requests")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APP_"))}
    env["APP_WAIT_FOR_INSIGHTS"] = "0"
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "Traceback" not in completed.stderr, output
    for pattern in EXPECTED[name]:
        assert re.search(pattern, completed.stdout), f"{name}: no {pattern!r} in\n{output}"
