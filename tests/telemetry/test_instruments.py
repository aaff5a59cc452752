"""The instrument registry: OpenTelemetry naming rules, and code that matches it."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from otel_raptor.core.timeseries import DURATION_BUCKETS
from otel_raptor.errors import ConfigError
from otel_raptor.telemetry import instruments
from otel_raptor.telemetry.attributes import (
    AttributeCache,
    BoundedValues,
    MetricAttributes,
)
from otel_raptor.telemetry.instruments import (
    ATTRIBUTES,
    INSTRUMENTS,
    LOG_EVENTS,
    MONITOR_INSTRUMENTS,
    RECOVERY_DURATION_BUCKETS,
    SPAN_EVENTS,
    SPANS,
    InstrumentKind,
    InstrumentSpec,
    LogEventSpec,
    SpanEventSpec,
    SpanSpec,
    create_gauges,
    create_instruments,
    create_monitor_instruments,
)

# UCUM units we allow: seconds, dimensionless, and annotations in braces.
_UNIT = re.compile(r"^(s|1|%|By|\{[a-z_]+\})$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SEMCONV = {
    "error.type",
    "server.address",
    "server.port",
    "http.request.method",
    "http.response.status_code",
    "http.request.resend_count",
    "db.system.name",
    "db.namespace",
    "db.response.status_code",
}


def test_names_follow_opentelemetry_rules() -> None:
    names = [spec.name for spec in INSTRUMENTS]
    assert len(names) == len(set(names))
    for spec in INSTRUMENTS:
        assert _NAME.match(spec.name), spec.name
        assert spec.name.startswith("raptor.")
        assert not spec.name.endswith(("_total", ".total", "_count", "_seconds")), spec.name
        assert _UNIT.match(spec.unit), (spec.name, spec.unit)
        assert spec.description.endswith("."), spec.name
    for event in LOG_EVENTS:
        assert _NAME.match(event.name), event.name
        assert event.description.endswith("."), event.name
    for key in (a.key for a in ATTRIBUTES):
        assert _NAME.match(key), key
        assert key.startswith("raptor.") or key in _SEMCONV, key


def test_every_key_used_is_declared_and_every_declared_key_is_used() -> None:
    declared = [a.key for a in ATTRIBUTES]
    assert len(declared) == len(set(declared))
    used: set[str] = set()
    specs: tuple[InstrumentSpec | SpanSpec | SpanEventSpec | LogEventSpec, ...] = (
        *INSTRUMENTS,
        *SPANS,
        *SPAN_EVENTS,
        *LOG_EVENTS,
    )
    for spec in specs:
        assert len(spec.attributes) == len(set(spec.attributes)), spec.name
        assert set(spec.attributes) <= set(declared), spec.name
        used |= set(spec.attributes)
    # The semconv request keys are declared for the integrations' own spans, and the resend
    # count for the contrib HTTP client spans raptor's span processor marks.
    assert set(declared) - used == {
        "http.request.method",
        "http.response.status_code",
        "http.request.resend_count",
    }


def test_metric_attributes_are_all_bounded() -> None:
    by_key = {a.key: a for a in ATTRIBUTES}
    for spec in INSTRUMENTS:
        for key in spec.attributes:
            # Strings, but for semconv's integer server.port (one per service, like the name).
            expected = (
                instruments.AttributeType.INT
                if key == "server.port"
                else instruments.AttributeType.STRING
            )
            assert by_key[key].type is expected, (spec.name, key)
            assert by_key[key].bound != "not on metrics", (spec.name, key)


def test_only_the_histogram_has_buckets_and_they_increase() -> None:
    for spec in INSTRUMENTS:
        assert bool(spec.bucket_boundaries) == (spec.kind is InstrumentKind.HISTOGRAM)
    assert list(RECOVERY_DURATION_BUCKETS) == sorted(set(RECOVERY_DURATION_BUCKETS))
    # The monitor's in-process percentiles use the same buckets as the exported histogram,
    # so that they agree with histogram_quantile over it.
    assert DURATION_BUCKETS == RECOVERY_DURATION_BUCKETS
    assert RECOVERY_DURATION_BUCKETS[0] == 0.005
    assert RECOVERY_DURATION_BUCKETS[-1] == 300.0


def test_the_schema_url_is_a_known_semconv_version() -> None:
    schemas = pytest.importorskip("opentelemetry.semconv.schemas")
    assert instruments.SCHEMA_URL in {s.value for s in schemas.Schemas}


def test_create_builds_exactly_the_registry() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("test")
    created = create_instruments(meter)
    for counter in (
        created.errors,
        created.retries,
        created.recoveries,
        created.retry_budget_exhausted,
        created.breaker_transitions,
        created.breaker_rejections,
        created.predictions,
        created.prevention_actions,
        created.memory_cleanups,
        created.memory_freed,
    ):
        counter.add(1)
    created.recovery_duration.record(0.3)

    def one(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1)]

    gauges = {
        spec: one
        for spec in INSTRUMENTS
        if spec.kind in (InstrumentKind.OBSERVABLE_GAUGE, InstrumentKind.OBSERVABLE_COUNTER)
        and spec not in MONITOR_INSTRUMENTS
    }
    create_gauges(meter, gauges)
    monitor = create_monitor_instruments(meter, one)
    for counter in (
        monitor.alert_notifications,
        monitor.insights,
        monitor.recovery_results,
        monitor.recovery_attempts_made,
    ):
        counter.add(1)

    data = reader.get_metrics_data()
    assert data is not None
    (metrics,) = [sm.metrics for rm in data.resource_metrics for sm in rm.scope_metrics]
    assert {(m.name, m.unit, m.description) for m in metrics} == {
        (s.name, s.unit, s.description) for s in INSTRUMENTS
    }
    (histogram,) = [m for m in metrics if m.name == "raptor.recovery.duration"]
    (point,) = histogram.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == RECOVERY_DURATION_BUCKETS


def test_a_gauge_without_a_callback_is_a_bug() -> None:
    meter = MeterProvider().get_meter("test")
    with pytest.raises(KeyError):
        create_gauges(meter, {})


def test_the_monitor_instruments_are_in_the_registry() -> None:
    assert set(MONITOR_INSTRUMENTS) <= set(INSTRUMENTS)
    assert [spec.name for spec in INSTRUMENTS[-len(MONITOR_INSTRUMENTS) :]] == [
        spec.name for spec in MONITOR_INSTRUMENTS
    ]


# ------------------------------------------------------------------------ attributes.py


def test_bounded_values_let_the_first_n_through() -> None:
    fold = BoundedValues(2, "other")
    assert [fold(v) for v in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "b",
    ]
    assert len(fold) == 2


@given(st.lists(st.text(max_size=3), max_size=60), st.integers(1, 10))
def test_bounded_values_never_exceed_the_limit(values: list[str], limit: int) -> None:
    fold = BoundedValues(limit, "other")
    out = [fold(v) for v in values]
    assert len(set(out) - {"other"}) <= limit
    first = list(dict.fromkeys(values))[:limit]
    assert all(o == v for o, v in zip(out, values, strict=True) if v in first)


def test_bounded_values_hold_under_threads() -> None:
    fold = BoundedValues(10, "other")
    barrier = threading.Barrier(8)
    results: list[str] = []

    def work(offset: int) -> None:
        barrier.wait()
        results.extend(fold(f"v{offset * 100 + i}") for i in range(50))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(set(results) - {"other"}) == 10


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3"])
def test_limits_are_validated(limit: object) -> None:
    with pytest.raises(ConfigError, match="limit"):
        BoundedValues(limit, "other")  # type: ignore[arg-type]  # testing validation
    with pytest.raises(ConfigError, match="max_cached_attribute_sets"):
        AttributeCache(("a",), max_entries=limit)  # type: ignore[arg-type]


def test_attribute_cache_reuses_one_mapping_and_is_bounded() -> None:
    cache = AttributeCache(("k1", "k2"), max_entries=2)
    first = cache.get(("a", "b"))
    assert first == {"k1": "a", "k2": "b"}
    assert cache.get(("a", "b")) is first
    cache.get(("c", "d"))
    past = cache.get(("e", "f"))
    assert past == {"k1": "e", "k2": "f"}
    assert cache.get(("e", "f")) is not past  # not cached: the cache is full
    assert len(cache) == 2
    with pytest.raises(ValueError, match="zip"):
        cache.get(("only-one",))


def test_metric_attribute_sets_match_the_registry() -> None:
    described = {
        "s": {
            "server.address": "a.test",
            "server.port": 5432,
            "db.system.name": "postgresql",
            "db.namespace": "orders",
        }
    }
    attrs = MetricAttributes(describe=lambda service: described.get(service, {}))
    keys = {spec.name: spec.attributes for spec in INSTRUMENTS}

    def check(spec: InstrumentSpec, mapping: object, *, optional: tuple[str, ...] = ()) -> None:
        assert isinstance(mapping, dict)
        assert set(spec.attributes) - set(optional) <= set(mapping) <= set(spec.attributes)

    # A service nobody described (your own guards, ``other``) has no server.* keys.
    assert "server.address" not in attrs.errors("mine", "timeout", "low", "T")

    check(instruments.METRIC_ERRORS, attrs.errors("s", "timeout", "low", "T", "40001"))
    check(
        instruments.METRIC_ERRORS,
        attrs.errors("s", "timeout", "low", "T"),
        optional=("db.response.status_code",),
    )
    check(instruments.METRIC_RETRIES, attrs.retries("s", "timeout", "reconnect"))
    gave_up = attrs.recoveries("s", "timeout", "reconnect", "failed", "deadline")
    assert set(gave_up) == set(keys["raptor.recoveries"])
    recovered = attrs.recoveries("s", "timeout", "reconnect", "recovered", "")
    assert set(recovered) == set(keys["raptor.recoveries"]) - {"raptor.recovery.give_up_reason"}
    check(instruments.METRIC_RECOVERY_DURATION, attrs.recovery_duration("s", "r", "o"))
    check(instruments.METRIC_RETRY_BUDGET_EXHAUSTED, attrs.retry_budget_exhausted("s", "c"))
    check(instruments.METRIC_BREAKER_TRANSITIONS, attrs.transitions("b", "closed", "open", "x"))
    check(instruments.METRIC_BREAKER_REJECTIONS, attrs.rejections("b", "open"))
    check(instruments.METRIC_BREAKER_STATE, attrs.breaker_state("b", "open"))
    check(instruments.METRIC_BREAKER_HEALTH, attrs.breaker_only("b"))
    check(instruments.METRIC_BREAKER_FAILURE_RATE_THRESHOLD, attrs.breaker_only("b"))
    check(instruments.METRIC_RETRY_BUDGET_TOKENS, attrs.service_only("s"))


def test_folding_caps() -> None:
    attrs = MetricAttributes(max_services=1, max_breakers=1)
    assert [attrs.service(s) for s in ("a", "b", "a")] == ["a", "other", "a"]
    assert [attrs.breaker(s) for s in ("x", "y")] == ["x", "other"]
    types = [attrs.error_type(f"E{i}") for i in range(130)]
    assert types[127] == "E127"
    assert types[128:] == ["_OTHER", "_OTHER"]
    assert [attrs.category(f"c{i}") for i in range(33)][-1] == "other"
    assert [attrs.give_up_reason(f"r{i}") for i in range(33)][-1] == "other"
    assert [attrs.db_status_code(f"{i:05d}") for i in range(65)][-2:] == ["00063", "_OTHER"]
