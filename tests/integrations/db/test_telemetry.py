"""What a database failure looks like in telemetry: the server's ``db.*`` and ``server.*``
attributes on every raptor metric point and span, ``db.response.status_code`` on errors, and
never SQL text or parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.sink import TelemetrySink
from tests.integrations.db.conftest import PG_DSN, create_pg_flaky, drop_pg_flaky, fast_config
from tests.support.dbservers import free_port
from tests.support.services import POSTGRES

pytestmark = pytest.mark.usefixtures("postgres")

SECRET = "s3cr3t-parameter"


@pytest.fixture
def table(unique_name: str) -> Iterator[str]:
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        create_pg_flaky(cur.execute, unique_name)
    yield unique_name
    with admin.cursor() as cur:
        drop_pg_flaky(cur.execute, unique_name)
    admin.close()


@pytest.fixture
def telemetry() -> Iterator[tuple[InMemoryMetricReader, InMemorySpanExporter]]:
    runtime = Runtime()
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = TelemetrySink(
        runtime=runtime,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    sink.install()
    integration = PsycopgIntegration()
    integration.install(IntegrationSettings(runtime=runtime, config=fast_config(max_retries=1)))
    yield reader, exporter
    integration.uninstall()
    sink.uninstall()


def points(reader: InMemoryMetricReader) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(
                    dict(point.attributes or {}) for point in metric.data.data_points
                )
    return found


def test_db_attributes_on_metrics_and_spans_and_never_sql(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter], table: str
) -> None:
    reader, exporter = telemetry
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"SELECT {table}_flaky(1, '40001'), %s::text", (SECRET,))
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute(f"SELECT {table}_flaky(10, '40001'), %s::text", (SECRET,))
    server = {
        "db.system.name": "postgresql",
        "server.address": POSTGRES[0],
        "server.port": POSTGRES[1],
        "db.namespace": "test",
    }
    metrics = points(reader)
    [errors] = [p for p in metrics["raptor.errors"] if p["raptor.service"].startswith("postgresql")]
    assert errors.items() >= {**server, "db.response.status_code": "40001"}.items()
    for name in ("raptor.retries", "raptor.recoveries", "raptor.recovery.duration"):
        for point in metrics[name]:
            assert point.items() >= server.items(), name
    [span, _] = [s for s in exporter.get_finished_spans() if s.name == "raptor.recovery"]
    assert dict(span.attributes or {}).items() >= server.items()
    [error_event, *_] = [e for e in span.events if e.name == "raptor.error"]
    assert dict(error_event.attributes or {})["db.response.status_code"] == "40001"
    # Neither the statement nor its parameters, anywhere.
    everything = [value for values in metrics.values() for p in values for value in p.values()]
    for finished in exporter.get_finished_spans():
        everything += list((finished.attributes or {}).values())
        for event in finished.events:
            everything += list((event.attributes or {}).values())
    texts = [str(value) for value in everything]
    assert not [t for t in texts if "SELECT" in t.upper() or SECRET in t or table in t]


def test_a_refused_connection_has_no_db_status_code(
    telemetry: tuple[InMemoryMetricReader, InMemorySpanExporter],
) -> None:
    reader, _ = telemetry
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host=127.0.0.1 port={free_port()} dbname=test user=postgres")
    [errors] = points(reader)["raptor.errors"]
    assert errors["db.system.name"] == "postgresql"
    assert "db.response.status_code" not in errors
