"""Gauges past the caps: one point per attribute set, and a folded alarm is never hidden.

The SDK keeps only the last observation of an attribute set in one callback, so readings that
fold into one set (``other``, or one name from two sinks) must be merged by the sink.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.events import ErrorClassified, MemoryPressureChanged
from otel_raptor.core.prediction import ResourceSnapshot
from otel_raptor.core.states import CircuitState
from otel_raptor.runtime import safety
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink
from tests.support.clock import FakeClock
from tests.telemetry.test_sink import CONNECTION, trip

STATE = "raptor.circuit_breaker.state"
HEALTH = "raptor.circuit_breaker.health"
THRESHOLD = "raptor.circuit_breaker.failure_rate_threshold"
TOKENS = "raptor.retry_budget.tokens"
NAME = "raptor.circuit_breaker.name"

Point = tuple[dict[str, Any], Any]


class Collector:
    """Sinks installed on one meter provider, read through the SDK's in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer_provider = TracerProvider()
        self.sinks: list[TelemetrySink] = []

    def install(self, runtime: Runtime, **caps: int) -> TelemetrySink:
        sink = TelemetrySink(
            runtime=runtime,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **caps,
        )
        sink.install()
        self.sinks.append(sink)
        return sink

    def points(self) -> dict[str, list[Point]]:
        """Every data point by metric, as exported: duplicates kept, not collapsed."""
        found: dict[str, list[Point]] = {}
        data = self.reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    found[metric.name] = [
                        (dict(point.attributes or {}), point.value)  # type: ignore[union-attr]  # gauges only
                        for point in metric.data.data_points
                    ]
        return found

    def close(self) -> None:
        for sink in self.sinks:
            sink.uninstall()
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


@pytest.fixture
def collector() -> Iterator[Collector]:
    safety._reset_for_tests()
    found = Collector()
    yield found
    found.close()
    safety._reset_for_tests()


def one_point_per_set(points: list[Point]) -> dict[frozenset[tuple[str, Any]], Any]:
    sets = Counter(frozenset(attributes.items()) for attributes, _ in points)
    assert [s for s, n in sets.items() if n > 1] == []
    return {frozenset(attributes.items()): value for attributes, value in points}


def states(points: list[Point]) -> dict[str, dict[str, Any]]:
    """State gauge values by breaker name, then by state; exactly one 1 per breaker."""
    one_point_per_set(points)
    found: dict[str, dict[str, Any]] = {}
    for attributes, value in points:
        found.setdefault(attributes[NAME], {})[attributes["raptor.circuit_breaker.state"]] = value
    for name, values in found.items():
        assert sorted(values) == ["closed", "half_open", "open"], name
        assert sorted(values.values()) == [0, 0, 1], name
    return found


def by_name(points: list[Point], key: str) -> dict[str, Any]:
    one_point_per_set(points)
    return {attributes[key]: value for attributes, value in points}


def current(values: dict[str, Any]) -> str:
    (state,) = [state for state, value in values.items() if value == 1]
    return state


def test_the_last_breaker_under_the_cap_keeps_its_own_points_once_other_has_tripped(
    collector: Collector,
) -> None:
    # The sink folds with the runtime's cap. The shared "other" breaker trips (its events
    # reach the sink first); the last named breaker, which the runtime keeps as its own,
    # must not fold into "other" then: its open state would be hidden behind other's.
    cap = 4
    runtime = Runtime(clock=FakeClock(), max_services=cap)
    collector.install(runtime, max_services=cap, max_breakers=cap)
    names = [f"https://tenant{i}.example:443" for i in range(cap)]
    for name in names:
        runtime.breakers.get(name)
    other = runtime.breakers.get("https://one-more.example:443")
    assert other.name == "other"
    trip(other)
    other.reset()
    collector.points()  # a periodic collection in between
    trip(runtime.breakers.get(names[-1]))

    found = states(collector.points()[STATE])
    assert sorted(found) == sorted([*names, "other"])
    assert current(found[names[-1]]) == "open"
    assert current(found["other"]) == "closed"
    assert all(current(found[name]) == "closed" for name in names[:-1])


def test_the_last_service_under_the_cap_keeps_its_own_budget_point(
    collector: Collector,
) -> None:
    cap = 3
    runtime = Runtime(clock=FakeClock(), max_services=cap)
    sink = collector.install(runtime, max_services=cap, max_breakers=cap)
    names = [runtime.service(f"svc{i}") for i in range(cap)]
    assert runtime.service("svc-past-the-cap") == "other"
    sink.publish(ErrorClassified("other", CONNECTION, 1))  # "other" reaches the sink first
    for name in [*names, "other"]:
        runtime.downstream(name)
    now = runtime.clock.monotonic()
    while runtime.withdraw(runtime.downstream(names[-1]), now):
        pass  # the last service spends its whole budget

    tokens = by_name(collector.points()[TOKENS], "raptor.service")
    expected = runtime.budget_tokens()
    assert sorted(tokens) == sorted([*names, "other"])
    assert tokens == expected
    assert tokens[names[-1]] < tokens["other"]


def test_breakers_folded_by_a_lower_sink_cap_report_the_worst_of_them(
    collector: Collector,
) -> None:
    runtime = Runtime(clock=FakeClock())
    collector.install(runtime, max_breakers=2)
    runtime.breakers.get("a")
    runtime.breakers.get("b")
    # Folded: a loosened one first, then an open one between two closed ones; the alarming
    # reading is never the last, the one the SDK would keep.
    loose = runtime.breakers.get("c", CircuitBreakerConfig(failure_rate_threshold=0.9))
    opened = runtime.breakers.get("d")
    runtime.breakers.get("e")
    collector.points()  # the sink meets the names in this order: "a" and "b" keep theirs
    trip(opened)

    points = collector.points()
    found = states(points[STATE])
    assert sorted(found) == ["a", "b", "other"]
    assert current(found["other"]) == "open"
    assert by_name(points[HEALTH], NAME) == {"a": 100, "b": 100, "other": 0}
    assert loose.snapshot().effective_failure_rate_threshold == 0.9
    assert by_name(points[THRESHOLD], NAME) == {"a": 0.5, "b": 0.5, "other": 0.9}


def test_a_half_open_breaker_outranks_closed_ones_and_open_outranks_it(
    collector: Collector,
) -> None:
    clock = FakeClock()
    runtime = Runtime(clock=clock)
    collector.install(runtime, max_breakers=1)
    runtime.breakers.get("named")
    probing = runtime.breakers.get("probing")
    runtime.breakers.get("closed")
    collector.points()  # the sink meets "named" first: the other two fold into "other"
    trip(probing)
    longest_open = probing.config.max_recovery_timeout
    assert longest_open is not None
    clock.advance(longest_open + 1)
    probing.acquire()  # the probe turns it half-open
    assert probing.state is CircuitState.HALF_OPEN
    assert current(states(collector.points()[STATE])["other"]) == "half_open"
    trip(runtime.breakers.get("closed"))
    assert current(states(collector.points()[STATE])["other"]) == "open"


def test_services_folded_by_a_lower_sink_cap_report_the_lowest_budget(
    collector: Collector,
) -> None:
    runtime = Runtime(clock=FakeClock())
    collector.install(runtime, max_services=1)
    for name in ("a", "b", "c", "d"):
        runtime.downstream(name)
    now = runtime.clock.monotonic()
    while runtime.withdraw(runtime.downstream("c"), now):
        pass

    tokens = by_name(collector.points()[TOKENS], "raptor.service")
    assert tokens == {"a": runtime.budget_tokens()["a"], "other": runtime.budget_tokens()["c"]}
    assert tokens["other"] < tokens["a"]


def test_two_sinks_reporting_one_breaker_name_show_it_open(collector: Collector) -> None:
    # Two runtimes with a breaker of the same name, their sinks on one meter provider.
    first, second = Runtime(clock=FakeClock()), Runtime(clock=FakeClock())
    collector.install(first)
    collector.install(second)
    trip(first.breakers.get("db"))
    second.breakers.get("db")

    points = collector.points()
    assert current(states(points[STATE])["db"]) == "open"
    assert by_name(points[HEALTH], NAME) == {"db": 0}


def test_two_sinks_report_the_worst_memory_pressure(collector: Collector) -> None:
    first, second = Runtime(clock=FakeClock()), Runtime(clock=FakeClock())
    collector.install(first)
    collector.install(second)
    first.bus.publish(MemoryPressureChanged("critical", "warning", 0.87))
    second.bus.publish(MemoryPressureChanged("normal", "warning", 0.5))

    points = collector.points()
    levels = by_name(points["raptor.memory.pressure.level"], "raptor.memory.pressure.level")
    assert levels == {"normal": 0, "warning": 0, "critical": 1, "emergency": 0}
    assert [value for _, value in points["raptor.memory.pressure"]] == [0.87]


def test_resources_past_their_cap_report_the_alarming_reading(collector: Collector) -> None:
    runtime = Runtime(clock=FakeClock())
    collector.install(runtime)
    named = [f"r{i:02}" for i in range(16)]
    # Past the 16 resource names: the worst reading sits in the middle of the folded ones.
    utilization = {**dict.fromkeys(named, 0.1), "x1": 0.2, "x2": 0.95, "x3": 0.3}
    probability = {**dict.fromkeys(named, 0.1), "x1": 0.2, "x2": 0.9, "x3": 0.3}
    time_left = {**dict.fromkeys(named, 600.0), "x1": 500.0, "x2": 30.0, "x3": 400.0}
    runtime.resource_snapshot = lambda: ResourceSnapshot(
        utilization=utilization, time_to_exhaustion_s=time_left, probability=probability
    )

    points = collector.points()
    resource = "raptor.resource"
    assert by_name(points["raptor.resource.utilization"], resource)["other"] == 0.95
    assert by_name(points["raptor.prediction.probability"], resource)["other"] == 0.9
    assert by_name(points["raptor.prediction.time_to_exhaustion"], resource)["other"] == 30.0


def test_the_other_breaker_itself_is_not_counted_against_the_cap() -> None:
    runtime = Runtime(clock=FakeClock(), max_services=2)
    sink = TelemetrySink(
        runtime=runtime,
        tracer_provider=TracerProvider(),
        meter_provider=MeterProvider(),
        max_breakers=2,
    )
    attributes = sink._attrs
    assert [attributes.breaker(n) for n in ("other", "a", "b", "c", "other")] == [
        "other",
        "a",
        "b",
        "other",
        "other",
    ]
    assert [attributes.service(n) for n in ("other", "s1", "other")] == ["other", "s1", "other"]
