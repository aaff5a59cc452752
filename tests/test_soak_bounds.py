"""A short soak (``benchmarks/soak_bounds.py``): unbounded variety in, bounded telemetry out.

Under ``RaptorInstrumentor().instrument(max_services=16)`` with SDK providers, a stream of
HTTP calls to many origins (ids, query-string tokens, ``Authorization`` headers, faults),
SQL with literals against sqlite3 and the shared databases, Redis keys holding tokens and
guards named per call. Nothing sent as a secret may be exported, and every metric attribute
stays within its documented cap (here the services' cap is 16, so the caps are reached).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Any

import pytest

from tests.support.services import services_required

_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "soak_bounds.py"


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("soak_bounds", _PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_bounds"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    from otel_raptor.runtime.state import Runtime, set_runtime

    previous = set_runtime(Runtime())
    try:
        result: dict[str, Any] = _soak_module().soak(
            calls=320, checkpoint=80, servers=4, with_services=True, max_services=16
        )
    finally:
        fresh = set_runtime(previous)
        if fresh is not None:
            fresh.health.stop()
    return result


def test_nothing_sent_as_a_secret_is_exported(report: dict[str, Any]) -> None:
    assert report["secrets_in_spans"] == []
    assert report["secrets_in_metrics"] == []
    # Monitor patterns and logs may name a service or exception class the app made (with an
    # id in it), or a table (sqlite's message names it unquoted), never a secret.
    marks = ("sEcReTtOkEn", "pAsSwOrD", "sqlLiTeRaL", "qSTRing")
    for found in report["secrets_in_monitor_patterns"] + report["secrets_in_logs"]:
        assert not any(mark in found for mark in marks), found


def test_metric_attributes_stay_within_their_caps(report: dict[str, Any]) -> None:
    values = report["metric_attribute_values"]
    assert report["services_past_the_cap"], "the soak must bring more services than the cap"
    assert values["raptor.service"] <= 16 + 1  # the first 16 names, then ``other``
    assert values.get("raptor.circuit_breaker.name", 0) <= 16 + 1
    assert values.get("server.address", 0) <= 16
    assert values.get("server.port", 0) <= 16
    assert values.get("error.type", 0) <= 128 + 1  # then ``_OTHER``
    assert values.get("db.response.status_code", 0) <= 64 + 1
    for key in ("raptor.error.category", "raptor.recovery.give_up_reason"):
        assert values.get(key, 0) <= 32 + 1


def test_runtime_registries_stay_within_max_services(report: dict[str, Any]) -> None:
    sizes = report["samples"][-1]["sizes"]
    for path in ("runtime._services", "runtime._downstreams", "runtime.breakers._breakers"):
        assert sizes[path] <= 16 + 1, path


def test_services_were_reachable() -> None:
    # The soak skips a database it cannot reach; with RAPTOR_REQUIRE_SERVICES it must not.
    if not services_required():
        pytest.skip("shared services not required")
    soak = _soak_module()
    assert all(soak._reachable(port) for port in (5432, 3306, 6379))
