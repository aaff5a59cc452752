"""``otel-raptor demo``: the same workload against the same faults, plain and under raptor.

One loopback server plays a fault schedule (``server.Schedule``); a few client workers call it
with ``requests`` (``workload``) for the length of the schedule, twice: first plain, then
with ``RaptorInstrumentor`` installed. The run ends with a side-by-side table of measured
numbers (``report``) and a digest of the telemetry raptor emitted. See ``docs/demo.md``.

Telemetry goes to an in-memory SDK reader and exporter (printed at the end) and, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or a per-signal endpoint) is set, also to OTLP over the
protocol named by ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_raptor._demo.database import DatabaseRun, render_database, run_database_phase
from otel_raptor._demo.report import (
    BreakerChange,
    RunSummary,
    render_phases,
    render_table,
    render_telemetry,
    render_transitions,
    summarize,
)
from otel_raptor._demo.server import FaultServer, Phase, Schedule
from otel_raptor._demo.workload import Tally, WorkloadOptions, run_workload
from otel_raptor.core.breaker import CircuitBreakerConfig, confident_failure_rate
from otel_raptor.core.events import BreakerTransitioned, Event
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

_SERVICE_NAME = "otel-raptor-demo"


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """What ``otel-raptor demo`` runs.

    * ``quick`` (False): the ~5 s schedule (``Schedule.quick()``) and faster timeouts, for tests.
    * ``seed`` (42, any int): seeds the server's random 503s; both runs use it.
    * ``workers`` (4, integer in [1, 64]): concurrent client workers.
    """

    quick: bool = False
    seed: int = 42
    workers: int = 4

    def __post_init__(self) -> None:
        seed: object = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError("demo.seed", seed, "an integer")
        self.workload  # noqa: B018 - validates ``workers`` now, not at the first run

    @property
    def schedule(self) -> Schedule:
        return Schedule.quick() if self.quick else Schedule()

    @property
    def workload(self) -> WorkloadOptions:
        # The per-request timeout ends a hang well within the hang phase.
        return WorkloadOptions(
            workers=self.workers, interval=0.1, timeout=0.3 if self.quick else 1.0
        )

    @property
    def retry(self) -> RetryPolicy:
        """Retries sized for a demo: short backoff, ``Retry-After`` always honoured."""
        return RetryPolicy(
            max_retries=3,
            base_delay=0.05 if self.quick else 0.1,
            max_delay=0.5 if self.quick else 1.0,
            max_retry_after=5.0,
        )

    @property
    def breaker(self) -> CircuitBreakerConfig:
        """A breaker sized for a demo: it opens when the calls of the last second show a 70 %
        failure rate with 95 % confidence (at least 7 calls, all failed) or after 10 failures
        in a row, and probes every second (0.3 s quick) until the server answers again.

        Neither rule is within reach of the flaky and rate-limited phases (about a third of
        the attempts fail there, and 429s do not count), while an outage makes every attempt
        fail. In the hang the workers make too few calls a second for the rate rule, so the
        run of 10 is what usually opens it. The adaptive threshold is off so that the breaker
        behaves the same from the first second on.
        """
        recovery = 0.3 if self.quick else 1.0
        return CircuitBreakerConfig(
            failure_threshold=10,
            failure_rate_threshold=0.7,
            window="time",
            window_size=1,
            minimum_calls=4,
            adaptive_threshold=False,
            recovery_timeout=recovery,
            max_recovery_timeout=recovery,
            success_threshold=2,
            timeout=self.workload.timeout,
        )


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Both runs' summaries (for tests and embedding)."""

    plain: RunSummary
    raptor: RunSummary
    transitions: tuple[BreakerChange, ...]
    #: The database phase's plain and raptor runs.
    database: tuple[DatabaseRun, DatabaseRun] | None = None


@dataclass(eq=False)
class _Telemetry:
    """SDK providers for the demo: in memory always, OTLP too when configured."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    otlp: str | None = None

    @classmethod
    def create(cls, environ: Mapping[str, str]) -> _Telemetry:
        # Our service name, unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say otherwise.
        resource = Resource.create({"service.name": _SERVICE_NAME}).merge(
            OTELResourceDetector().detect()
        )
        spans = InMemorySpanExporter()
        metrics = InMemoryMetricReader()
        readers: list[MetricReader] = [metrics]
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        otlp = _otlp_target(environ)
        if otlp is not None:
            span_exporter, metric_exporter = _otlp_exporters(environ)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            interval = None if environ.get("OTEL_METRIC_EXPORT_INTERVAL") else 5000.0
            readers.append(
                PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval)
            )
        meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        return cls(tracer_provider, meter_provider, spans, metrics, otlp)

    def shutdown(self) -> None:
        # Flushes the OTLP exporters, if any.
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _otlp_target(environ: Mapping[str, str]) -> str | None:
    for key in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ):
        if environ.get(key):
            return environ[key]
    return None


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _otlp_exporters(environ: Mapping[str, str]) -> tuple[SpanExporter, MetricExporter]:
    """The real OTLP exporters; they read their endpoint, headers etc. from the environment."""
    span_exporter: SpanExporter
    metric_exporter: MetricExporter
    if _protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcSpanExporter,
        )

        span_exporter = GrpcSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as HttpSpanExporter,
        )

        span_exporter = HttpSpanExporter()
    if _protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter as GrpcMetricExporter,
        )

        metric_exporter = GrpcMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter as HttpMetricExporter,
        )

        metric_exporter = HttpMetricExporter()
    return span_exporter, metric_exporter


class _Progress:
    """One updating line on a terminal; a line per phase change (and every 5 s) otherwise."""

    def __init__(self, out: TextIO, label: str, server: FaultServer, tally: Tally) -> None:
        self._out = out
        self._label = label
        self._server = server
        self._tally = tally
        self._tty = out.isatty()
        self._total = server.schedule.total

    def _line(self) -> str:
        started = self._server.started_at
        elapsed = 0.0 if started is None else time.monotonic() - started
        phase = self._server.phase()
        done, ok = self._tally.snapshot()
        where = "finishing" if elapsed >= self._total else (phase.value if phase else "-")
        return (
            f"  {self._label:<7}{min(elapsed, self._total):5.1f}/{self._total:.1f} s  "
            f"{where:<15} calls {done:>5}  ok {ok:>5}  failed {done - ok:>5}"
        )

    def wait(self, threads: list[threading.Thread]) -> None:
        last_phase: Phase | None = None
        last_print = 0.0
        while alive := [t for t in threads if t.is_alive()]:
            phase = self._server.phase()
            now = time.monotonic()
            if self._tty:
                self._out.write("\r" + self._line())
                self._out.flush()
            elif phase is not last_phase or now - last_print >= 5.0:
                self._out.write(self._line() + "\n")
                self._out.flush()
                last_phase, last_print = phase, now
            alive[0].join(timeout=0.1)
        self._out.write(("\r" if self._tty else "") + self._line() + "\n")
        self._out.flush()


def _one_run(
    label: str,
    server: FaultServer,
    options: DemoOptions,
    out: TextIO,
    transitions: list[BreakerChange] | None,
) -> RunSummary:
    tally = Tally()
    started = server.begin_run()
    progress = _Progress(out, label, server, tally)
    try:
        workload = run_workload(
            server.url(),
            server.schedule,
            options.workload,
            started=started,
            tally=tally,
            wait=progress.wait,
        )
    finally:
        log = server.end_run()
    return summarize(label, workload, log, server.schedule, transitions)


def _describe(options: DemoOptions) -> str:
    schedule = options.schedule
    what = {
        Phase.HEALTHY: "every request answered 200",
        Phase.FLAKY: f"{schedule.error_rate:.0%} of requests answered 503 (seeded random)",
        Phase.RATE_LIMITED: (
            f"{schedule.quota} requests per client per {schedule.retry_after} s, beyond that"
            f" 429 with Retry-After: {schedule.retry_after}"
        ),
        Phase.OUTAGE_HANG: "outage: connections accepted, requests read, never answered",
        Phase.OUTAGE_REFUSED: "outage: listening socket closed, connections refused",
        Phase.RECOVERED: "every request answered 200 again",
    }
    work = options.workload
    retry = options.retry
    breaker = options.breaker
    lines = ["Fault schedule (seconds since the start of each run):"]
    lines += [
        f"  {s.start:5.1f} - {s.end:4.1f}  {s.phase.value:<15} {what[s.phase]}"
        for s in schedule.spans()
    ]
    lines += [
        f"Client: {work.workers} workers, each a requests.Session calling GET /orders/<n> every"
        f" {work.interval * 1000:.0f} ms with timeout={work.timeout:g} s.",
        f"Raptor: up to {retry.max_retries} retries (backoff from {retry.base_delay:g} s, x"
        f"{retry.backoff_multiplier:g}, full jitter, Retry-After honoured).",
        f"        Breaker per origin: opens when the last {breaker.window_size} s of calls"
        f" show a {breaker.failure_rate_threshold:.0%} failure rate",
        f"        with 95% confidence (at least {_fewest_failures_that_trip(breaker)} calls, all"
        f" failed) or after {breaker.failure_threshold} failures in a row;",
        f"        probes after"
        f" {breaker.recovery_timeout:g} s; closes after {breaker.success_threshold} good"
        " probes.",
    ]
    return "\n".join(lines)


def _fewest_failures_that_trip(breaker: CircuitBreakerConfig) -> int:
    """The shortest all-failed window the failure-rate rule trips on, for the header."""
    calls = max(1, breaker.minimum_calls)
    # Bounded: the bound of n failures out of n stays below 1, so a threshold of 1 never trips.
    while confident_failure_rate(calls, calls) < breaker.failure_rate_threshold and calls < 10_000:
        calls += 1
    return calls


def run_demo(
    options: DemoOptions | None = None,
    *,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> DemoResult:
    """Run the demo, writing to ``out`` (default ``sys.stdout``); return the measured results.

    ``environ`` (default ``os.environ``) decides the OTLP export. Raises ``ImportError`` when
    ``requests`` or the instrumentor cannot be imported.
    """
    options = options or DemoOptions()
    stream = out if out is not None else sys.stdout
    env = os.environ if environ is None else environ
    from otel_raptor.instrumentor import RaptorInstrumentor  # noqa: PLC0415

    schedule = options.schedule
    stream.write(
        "otel-raptor demo: one loopback server with scripted faults, the same client workload"
        " twice:\nfirst plain, then under RaptorInstrumentor.\n\n"
    )
    stream.write(_describe(options) + "\n\n")
    telemetry = _Telemetry.create(env)
    transitions: list[BreakerChange] = []
    with FaultServer(schedule, seed=options.seed) as server:
        stream.write(f"Server on {server.url()}\n")
        plain = _one_run("plain", server, options, stream, None)

        instrumentor = RaptorInstrumentor()
        instrumentor.instrument(
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
            retry=options.retry,
            breaker=options.breaker,
            integrations=["requests"],
        )
        try:
            unsubscribe = _watch_breakers(server, transitions)
            try:
                raptor = _one_run("raptor", server, options, stream, transitions)
            finally:
                unsubscribe()
            # Before uninstrument(): the breaker gauges report only while the sink is installed.
            metrics = telemetry.metrics.get_metrics_data()
        finally:
            instrumentor.uninstrument()
    spans = telemetry.spans.get_finished_spans()
    stream.write("\n" + render_table(plain, raptor) + "\n\n")
    stream.write(render_phases(plain, raptor, schedule) + "\n\n")
    stream.write(render_transitions(transitions, schedule) + "\n\n")
    target = (
        f"also exported over OTLP to {telemetry.otlp}"
        if telemetry.otlp
        else "console only; set OTEL_EXPORTER_OTLP_ENDPOINT to send it to a collector"
    )
    stream.write(f"Telemetry of the raptor run ({target}):\n")
    stream.write(render_telemetry(metrics, spans) + "\n\n")
    stream.flush()
    database = _database_phase(options, telemetry, stream, env)
    telemetry.shutdown()
    return DemoResult(plain, raptor, tuple(transitions), database)


def _database_phase(
    options: DemoOptions, telemetry: _Telemetry, stream: TextIO, environ: Mapping[str, str]
) -> tuple[DatabaseRun, DatabaseRun]:
    """The same idea against a database: PostgreSQL when one answers, SQLite otherwise."""
    from otel_raptor.instrumentor import RaptorInstrumentor  # noqa: PLC0415

    def instrument() -> Callable[[], None]:
        instrumentor = RaptorInstrumentor()
        instrumentor.instrument(
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
            retry=options.retry,
            breaker=options.breaker,
            integrations=["psycopg", "sqlite3"],
            memory=False,
        )
        return instrumentor.uninstrument  # type: ignore[no-any-return]  # BaseInstrumentor is untyped

    stream.write("Database phase: the same two runs against a database ...\n")
    stream.flush()
    plain, raptor = run_database_phase(quick=options.quick, instrument=instrument, environ=environ)
    stream.write(render_database(plain, raptor, quick=options.quick) + "\n")
    stream.flush()
    return plain, raptor


def _watch_breakers(server: FaultServer, sink: list[BreakerChange]) -> Callable[[], None]:
    from otel_raptor.runtime.state import get_runtime  # noqa: PLC0415

    def on_event(event: Event) -> None:
        if isinstance(event, BreakerTransitioned):
            started = server.started_at
            at = 0.0 if started is None else time.monotonic() - started
            sink.append(
                BreakerChange(
                    at,
                    event.breaker,
                    event.from_state.value,
                    event.to_state.value,
                    event.reason.value,
                )
            )

    return get_runtime().bus.subscribe(on_event)
