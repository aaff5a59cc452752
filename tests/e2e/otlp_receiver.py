"""A loopback OTLP/HTTP receiver for end-to-end tests: what a real exporter sent, decoded.

It accepts ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` with
``application/x-protobuf`` bodies, optionally ``Content-Encoding: gzip`` or
``deflate``, decodes them with ``opentelemetry-proto`` and answers ``200`` with an empty export
response, as a collector does. Everything is flattened into plain values so that tests compare
strings and numbers, never protobuf messages::

    with OTLPReceiver() as receiver:
        run_app(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, ...})
        assert receiver.wait_for(lambda: "raptor.errors" in receiver.metrics(), timeout=5)
        [span] = [s for s in receiver.spans() if s.name == "raptor.recovery"]
        assert span.attributes["raptor.recovery.outcome"] == "recovered"

``fail(signal, times=...)`` makes the next exports of a signal (or every export) answer ``503``
so that a test can check that a failing backend never breaks the application; ``hits`` lists
every request with its arrival time and a digest of its body, so a test can tell the
exporter's own (backed-off) retries of one batch from anyone else's.

As a pytest fixture: import ``otlp_receiver`` into a test module and take it as an argument.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otel_raptor.telemetry.instruments import (
    INSTRUMENTATION_NAME,
    INSTRUMENTATION_VERSION,
    INSTRUMENTS,
    LOG_EVENTS,
    SPAN_EVENTS,
    SPANS,
    InstrumentKind,
)

__all__ = [
    "Hit",
    "MetricPoint",
    "ReceivedLog",
    "OTLPReceiver",
    "ReceivedEvent",
    "ReceivedSpan",
    "contract_violations",
    "otlp_receiver",
    "raptor_attribute_values",
    "raptor_telemetry",
]

#: The signals, by URL path.
_PATHS = {"/v1/traces": "traces", "/v1/metrics": "metrics", "/v1/logs": "logs"}
_RESPONSES: dict[str, Any] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}
_MAX_BODY = 64 * 1024 * 1024


# --------------------------------------------------------------------------- flattened data


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """A span event: its name, attributes and time (ns since the epoch)."""

    name: str
    attributes: Mapping[str, Any]
    time_unix_nano: int


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as exported. Ids are lower-case hex; ``parent_span_id`` is ``""`` for a root.

    ``kind`` is ``INTERNAL``, ``CLIENT``, ``SERVER``, ``PRODUCER``, ``CONSUMER`` or
    ``UNSPECIFIED``; ``status`` is ``UNSET``, ``OK`` or ``ERROR``.
    """

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: Mapping[str, Any]
    status: str
    status_message: str
    events: tuple[ReceivedEvent, ...]
    scope_name: str
    scope_version: str
    resource: Mapping[str, Any]
    start_time_unix_nano: int
    end_time_unix_nano: int

    def event_names(self) -> list[str]:
        return [event.name for event in self.events]


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One data point of one metric in one export.

    ``kind`` is ``sum``, ``gauge``, ``histogram``, ``exponential_histogram`` or ``summary``.
    ``value`` is the number of a sum or gauge point and the ``sum`` of a histogram;
    ``count``, ``bucket_counts`` and ``explicit_bounds`` are set for histograms only.
    ``monotonic`` is ``None`` except for sums. Exporters send cumulative points by default, so
    the same series shows up once per export with a growing value: use :meth:`OTLPReceiver.last`.
    """

    name: str
    unit: str
    kind: str
    description: str
    monotonic: bool | None
    attributes: Mapping[str, Any]
    value: float
    count: int
    bucket_counts: tuple[int, ...]
    explicit_bounds: tuple[float, ...]
    time_unix_nano: int
    scope_name: str
    scope_version: str
    resource: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ReceivedLog:
    """One log record: ``event_name`` (``""`` for a plain log), ``body`` (a string, or the
    decoded ``AnyValue``), severity, attributes, time (ns since the epoch), scope, resource."""

    event_name: str
    body: Any
    severity_number: int
    severity_text: str
    attributes: Mapping[str, Any]
    time_unix_nano: int
    scope_name: str
    scope_version: str
    resource: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the receiver read: path, ``time.monotonic()`` arrival, body digest, answer.

    ``digest`` is the SHA-256 of the *decompressed* body: the exporter re-sending one batch
    sends the same bytes, so equal digests mean the same payload.
    """

    signal: str
    path: str
    arrived_at: float
    digest: str
    status: int


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(_any_value(item) for item in value.array_value.values)
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


def _kind(value: int) -> str:
    return str(trace_pb2.Span.SpanKind.Name(value)).removeprefix("SPAN_KIND_")


def _status(value: int) -> str:
    return str(trace_pb2.Status.StatusCode.Name(value)).removeprefix("STATUS_CODE_")


def _flatten_traces(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope
            spans.extend(
                ReceivedSpan(
                    name=span.name,
                    kind=_kind(span.kind),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes=_attributes(span.attributes),
                    status=_status(span.status.code),
                    status_message=span.status.message,
                    events=tuple(
                        ReceivedEvent(e.name, _attributes(e.attributes), e.time_unix_nano)
                        for e in span.events
                    ),
                    scope_name=scope.name,
                    scope_version=scope.version,
                    resource=resource,
                    start_time_unix_nano=span.start_time_unix_nano,
                    end_time_unix_nano=span.end_time_unix_nano,
                )
                for span in scope_spans.spans
            )
    return spans


def _flatten_logs(request: logs_service_pb2.ExportLogsServiceRequest) -> list[ReceivedLog]:
    records: list[ReceivedLog] = []
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            scope = scope_logs.scope
            records.extend(
                ReceivedLog(
                    event_name=getattr(record, "event_name", ""),
                    body=_any_value(record.body),
                    severity_number=int(record.severity_number),
                    severity_text=record.severity_text,
                    attributes=_attributes(record.attributes),
                    time_unix_nano=record.time_unix_nano,
                    scope_name=scope.name,
                    scope_version=scope.version,
                    resource=resource,
                )
                for record in scope_logs.log_records
            )
    return records


def _number(point: metrics_pb2.NumberDataPoint) -> float:
    return point.as_int if point.WhichOneof("value") == "as_int" else point.as_double


def _flatten_metrics(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> list[MetricPoint]:
    points: list[MetricPoint] = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data") or ""
                common = {
                    "name": metric.name,
                    "unit": metric.unit,
                    "kind": kind,
                    "description": metric.description,
                    "scope_name": scope.name,
                    "scope_version": scope.version,
                    "resource": resource,
                }
                if kind in ("sum", "gauge"):
                    data = getattr(metric, kind)
                    monotonic = data.is_monotonic if kind == "sum" else None
                    points.extend(
                        MetricPoint(
                            **common,
                            monotonic=monotonic,
                            attributes=_attributes(p.attributes),
                            value=_number(p),
                            count=0,
                            bucket_counts=(),
                            explicit_bounds=(),
                            time_unix_nano=p.time_unix_nano,
                        )
                        for p in data.data_points
                    )
                elif kind in ("histogram", "exponential_histogram", "summary"):
                    data = getattr(metric, kind)
                    points.extend(
                        MetricPoint(
                            **common,
                            monotonic=None,
                            attributes=_attributes(p.attributes),
                            value=p.sum,
                            count=p.count,
                            bucket_counts=tuple(getattr(p, "bucket_counts", ())),
                            explicit_bounds=tuple(getattr(p, "explicit_bounds", ())),
                            time_unix_nano=p.time_unix_nano,
                        )
                        for p in data.data_points
                    )
    return points


# --------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the exporter's requests.Session expects.
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr log."""

    def do_POST(self) -> None:
        receiver = self.server.receiver
        signal = _PATHS.get(self.path.split("?", 1)[0])
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if signal is None or not 0 <= length <= _MAX_BODY:
            self._answer(404 if signal is None else 400, b"")
            return
        body = self.rfile.read(length)
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        except (OSError, ValueError, zlib.error) as error:
            receiver._record_error(f"{signal}: {error}")
            self._answer(400, b"")
            return
        status = receiver._accept(signal, self.path, body)
        payload = _RESPONSES[signal]().SerializeToString() if status == 200 else b""
        self._answer(status, payload)

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OTLPReceiver


@dataclass(eq=False)
class OTLPReceiver:
    """A threaded OTLP/HTTP receiver on ``127.0.0.1``, ephemeral port (see the module doc)."""

    _server: _Server | None = field(init=False, default=None)
    _port: int = field(init=False, default=0)
    _thread: threading.Thread | None = field(init=False, default=None)
    _cond: threading.Condition = field(init=False, default_factory=threading.Condition)
    _spans: list[ReceivedSpan] = field(init=False, default_factory=list)
    _points: list[MetricPoint] = field(init=False, default_factory=list)
    _logs: list[ReceivedLog] = field(init=False, default_factory=list)
    _hits: list[Hit] = field(init=False, default_factory=list)
    _errors: list[str] = field(init=False, default_factory=list)
    # signal ("traces"/"metrics"/"logs"/"*") -> exports still to refuse (-1: all of them)
    _failing: dict[str, int] = field(init=False, default_factory=dict)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> OTLPReceiver:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (still known after :meth:`stop`)."""
        if not self._port:
            raise RuntimeError("the receiver was never started")
        return self._port

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends the path)."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, service_name: str, *, logs: bool = False) -> dict[str, str]:
        """The ``OTEL_*`` variables that send an SDK's traces and metrics (and with ``logs``,
        its log records) here over OTLP/HTTP (protobuf), quickly: spans and logs batched for
        100 ms, metrics exported every 500 ms."""
        return {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_LOGS_EXPORTER": "otlp" if logs else "none",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_BLRP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": service_name,
        }

    # -- failure injection -----------------------------------------------------------------

    def fail(self, signal: str = "*", *, times: int | None = None) -> None:
        """Answer ``503`` to the next ``times`` exports of ``signal`` (``traces``,
        ``metrics``, ``logs`` or ``*`` for any); ``times=None`` refuses them all until
        :meth:`heal`."""
        if signal not in ("*", *_RESPONSES):
            raise ValueError(f"unknown signal {signal!r}")
        with self._cond:
            self._failing[signal] = -1 if times is None else times

    def heal(self) -> None:
        """Accept every export again."""
        with self._cond:
            self._failing.clear()

    # -- what arrived ------------------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        """Every span accepted so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    def logs(self) -> list[ReceivedLog]:
        """Every log record accepted so far, in arrival order."""
        with self._cond:
            return list(self._logs)

    def events(self, name: str) -> list[ReceivedLog]:
        """The log records whose event name is ``name``."""
        return [record for record in self.logs() if record.event_name == name]

    def metrics(self) -> dict[str, list[MetricPoint]]:
        """Every metric data point accepted so far, by metric name, in arrival order."""
        result: dict[str, list[MetricPoint]] = {}
        with self._cond:
            for point in self._points:
                result.setdefault(point.name, []).append(point)
        return result

    def series(self, name: str) -> dict[frozenset[tuple[str, Any]], MetricPoint]:
        """The latest point of each series (distinct attribute set) of metric ``name``: with
        cumulative temporality, the series' total so far."""
        latest: dict[frozenset[tuple[str, Any]], MetricPoint] = {}
        for point in self.metrics().get(name, []):
            latest[frozenset(point.attributes.items())] = point
        return latest

    def last(self, name: str, **attributes: Any) -> MetricPoint | None:
        """The latest point of metric ``name`` whose attributes include ``attributes``
        (keys with dots are passed as ``**{"raptor.service": ...}``)."""
        for point in reversed(self.metrics().get(name, [])):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                return point
        return None

    @property
    def hits(self) -> list[Hit]:
        """Every export request read (accepted or refused), in arrival order."""
        with self._cond:
            return list(self._hits)

    @property
    def errors(self) -> list[str]:
        """Bodies that could not be decoded (a test should expect none)."""
        with self._cond:
            return list(self._errors)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked after each export) or ``timeout``
        seconds pass; returns the last result."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._cond:
            self._spans.clear()
            self._points.clear()
            self._logs.clear()
            self._hits.clear()
            self._errors.clear()

    # -- internals -----------------------------------------------------------------------------

    def _refuse(self, signal: str) -> bool:
        for key in (signal, "*"):
            left = self._failing.get(key)
            if left is None or left == 0:
                continue
            if left > 0:
                self._failing[key] = left - 1
            return True
        return False

    def _record_error(self, message: str) -> None:
        with self._cond:
            self._errors.append(message)
            self._cond.notify_all()

    def _accept(self, signal: str, path: str, body: bytes) -> int:
        """Decode and store one export; the status to answer."""
        digest = hashlib.sha256(body).hexdigest()
        arrived = time.monotonic()
        with self._cond:
            refused = self._refuse(signal)
        spans: list[ReceivedSpan] = []
        points: list[MetricPoint] = []
        logs: list[ReceivedLog] = []
        status = 503 if refused else 200
        if not refused:
            try:
                if signal == "traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    spans = _flatten_traces(request)
                elif signal == "metrics":
                    metrics = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    points = _flatten_metrics(metrics)
                elif signal == "logs":
                    logs = _flatten_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body))
            except Exception as error:  # a malformed body is the test's finding, not a crash
                self._record_error(f"{signal}: cannot decode: {error!r}")
                status = 400
        with self._cond:
            self._hits.append(Hit(signal, path, arrived, digest, status))
            self._spans.extend(spans)
            self._points.extend(points)
            self._logs.extend(logs)
            self._cond.notify_all()
        return status


@pytest.fixture
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """A started receiver, stopped after the test."""
    receiver = OTLPReceiver().start()
    try:
        yield receiver
    finally:
        with contextlib.suppress(Exception):
            receiver.stop()


# ------------------------------------------------------------------- the telemetry contract

_KINDS = {
    InstrumentKind.COUNTER: "sum",
    InstrumentKind.HISTOGRAM: "histogram",
    InstrumentKind.OBSERVABLE_GAUGE: "gauge",
    InstrumentKind.OBSERVABLE_COUNTER: "sum",
}
_COUNTERS = (InstrumentKind.COUNTER, InstrumentKind.OBSERVABLE_COUNTER)


def contract_violations(receiver: OTLPReceiver) -> list[str]:
    """Every way what ``receiver`` holds departs from ``otel_raptor.telemetry.instruments``.

    A ``raptor.*`` metric must be listed in ``INSTRUMENTS`` with the same unit, kind (a
    counter arrives as a monotonic sum) and a subset of its attribute keys, under the
    ``otel_raptor`` scope at the package version. A ``raptor.*`` span must be in ``SPANS``
    with its kind and attribute keys; a ``raptor.*`` span event (on any span: breaker events
    land on the app's spans) must be in ``SPAN_EVENTS`` with its attribute keys; a log record
    with a ``raptor.*`` event name must be in ``LOG_EVENTS`` with its attribute keys, under the
    ``otel_raptor`` scope.
    """
    problems: list[str] = []
    instruments = {spec.name: spec for spec in INSTRUMENTS}
    for name, points in sorted(receiver.metrics().items()):
        if not name.startswith("raptor."):
            continue
        spec = instruments.get(name)
        if spec is None:
            problems.append(f"metric {name} is not in INSTRUMENTS")
            continue
        for point in points:
            where = f"metric {name} {dict(point.attributes)}"
            if point.unit != spec.unit:
                problems.append(f"{where}: unit {point.unit!r}, documented {spec.unit!r}")
            if point.kind != _KINDS[spec.kind]:
                problems.append(f"{where}: kind {point.kind!r}, documented {spec.kind}")
            if spec.kind in _COUNTERS and point.monotonic is not True:
                problems.append(f"{where}: a counter must arrive as a monotonic sum")
            extra = set(point.attributes) - set(spec.attributes)
            if extra:
                problems.append(f"{where}: undocumented attribute keys {sorted(extra)}")
            if (point.scope_name, point.scope_version) != (
                INSTRUMENTATION_NAME,
                INSTRUMENTATION_VERSION,
            ):
                problems.append(
                    f"{where}: scope {point.scope_name} {point.scope_version}, expected"
                    f" {INSTRUMENTATION_NAME} {INSTRUMENTATION_VERSION}"
                )
    spans = {spec.name: spec for spec in SPANS}
    events = {spec.name: spec for spec in SPAN_EVENTS}
    for span in receiver.spans():
        if span.name.startswith("raptor."):
            span_spec = spans.get(span.name)
            if span_spec is None:
                problems.append(f"span {span.name} is not in SPANS")
            else:
                if span.kind != span_spec.kind:
                    problems.append(f"span {span.name}: kind {span.kind}, not {span_spec.kind}")
                extra = set(span.attributes) - set(span_spec.attributes)
                if extra:
                    problems.append(f"span {span.name}: undocumented keys {sorted(extra)}")
                if span.scope_name != INSTRUMENTATION_NAME:
                    problems.append(f"span {span.name}: scope {span.scope_name}")
        for event in span.events:
            if not event.name.startswith("raptor."):
                continue
            event_spec = events.get(event.name)
            if event_spec is None:
                problems.append(f"span event {event.name} is not in SPAN_EVENTS")
                continue
            extra = set(event.attributes) - set(event_spec.attributes)
            if extra:
                problems.append(f"span event {event.name}: undocumented keys {sorted(extra)}")
    log_events = {spec.name: spec for spec in LOG_EVENTS}
    for record in receiver.logs():
        if not record.event_name.startswith("raptor."):
            continue
        log_spec = log_events.get(record.event_name)
        if log_spec is None:
            problems.append(f"log event {record.event_name} is not in LOG_EVENTS")
            continue
        extra = set(record.attributes) - set(log_spec.attributes)
        if extra:
            problems.append(f"log event {record.event_name}: undocumented keys {sorted(extra)}")
        if record.scope_name != INSTRUMENTATION_NAME:
            problems.append(f"log event {record.event_name}: scope {record.scope_name}")
    return problems


def raptor_telemetry(receiver: OTLPReceiver) -> list[str]:
    """A line for every piece of raptor telemetry ``receiver`` holds (``[]``: none at all):
    ``raptor.*`` spans, span events and metrics, and anything in the ``otel_raptor`` scope."""
    found = [
        f"span {span.name}"
        for span in receiver.spans()
        if span.name.startswith("raptor.") or span.scope_name == INSTRUMENTATION_NAME
    ]
    found.extend(
        f"span event {event.name} on {span.name}"
        for span in receiver.spans()
        for event in span.events
        if event.name.startswith("raptor.")
    )
    found.extend(
        f"metric {name}"
        for name, points in receiver.metrics().items()
        if name.startswith("raptor.") or any(p.scope_name == INSTRUMENTATION_NAME for p in points)
    )
    return found


def raptor_attribute_values(receiver: OTLPReceiver) -> set[str]:
    """Every string value of every attribute of raptor telemetry (spans, their events, the
    raptor events on other spans, metric points): where a downstream's name would show."""
    values: set[str] = set()

    def add(attributes: Mapping[str, Any]) -> None:
        values.update(v for v in attributes.values() if isinstance(v, str))

    for span in receiver.spans():
        if span.name.startswith("raptor."):
            add(span.attributes)
        for event in span.events:
            if event.name.startswith("raptor."):
                add(event.attributes)
    for name, points in receiver.metrics().items():
        if name.startswith("raptor."):
            for point in points:
                add(point.attributes)
    return values
