"""Every metric instrument, span, span event, log event and attribute key otel_raptor emits.

This module is the contract: ``docs/telemetry.md`` mirrors it table for table, dashboards and
alert rules rely on it, and ``tests/telemetry/test_docs_table.py`` fails when the two differ.
Rename nothing here without a changelog entry.

Conventions (OpenTelemetry): dotted lower-case names under ``raptor.``; semantic-convention
keys where one exists (``error.type``, ``server.address``, ...); UCUM units (``s``, ``1``,
``{error}``); no ``_total`` suffix (exporters add it); the meter and the tracer are both named
``otel_raptor``, carry the package version and ``SCHEMA_URL``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    ObservableCounter,
    ObservableGauge,
    Observation,
)

from otel_raptor._version import __version__

__all__ = [
    "ATTRIBUTES",
    "ATTR_ALERT_NAME",
    "ATTR_ALERT_SEVERITY",
    "ATTR_ALERT_STATE",
    "ATTR_ALERT_THRESHOLD",
    "ATTR_ALERT_VALUE",
    "ATTR_INSIGHT_EVIDENCE",
    "ATTR_INSIGHT_KIND",
    "ATTR_INSIGHT_RECOMMENDATION",
    "ATTR_RECOVERY_RESULT",
    "ATTR_REPORT_DURATION",
    "ATTR_BREAKER_FROM_STATE",
    "ATTR_BREAKER_NAME",
    "ATTR_BREAKER_OPEN_DURATION",
    "ATTR_BREAKER_RETRY_AFTER",
    "ATTR_BREAKER_STATE",
    "ATTR_BREAKER_TO_STATE",
    "ATTR_BREAKER_TRANSITION_REASON",
    "ATTR_DB_NAMESPACE",
    "ATTR_DB_RESPONSE_STATUS_CODE",
    "ATTR_DB_SYSTEM_NAME",
    "ATTR_ERROR_CATEGORY",
    "ATTR_ERROR_SEVERITY",
    "ATTR_ERROR_TYPE",
    "ATTR_HTTP_REQUEST_METHOD",
    "ATTR_HTTP_REQUEST_RESEND_COUNT",
    "ATTR_HTTP_RESPONSE_STATUS_CODE",
    "ATTR_INTERNAL_SITE",
    "ATTR_MEMORY_BYTES_FREED",
    "ATTR_MEMORY_CLEANUP_LEVEL",
    "ATTR_MEMORY_CLEANUP_TRIGGER",
    "ATTR_MEMORY_ENTRIES_EVICTED",
    "ATTR_MEMORY_PRESSURE_LEVEL",
    "ATTR_PREDICTION_CONFIDENCE",
    "ATTR_PREDICTION_PROBABILITY",
    "ATTR_PREDICTION_SEVERITY",
    "ATTR_PREDICTION_STATE",
    "ATTR_PREDICTION_TIME_TO_EXHAUSTION",
    "ATTR_PREVENTION_ACTION",
    "ATTR_PREVENTION_OUTCOME",
    "ATTR_PREVENTION_SKIP_REASON",
    "ATTR_RECOVERY_ATTEMPT",
    "ATTR_RECOVERY_ATTEMPTS",
    "ATTR_RECOVERY_GIVE_UP_REASON",
    "ATTR_RECOVERY_OUTCOME",
    "ATTR_RECOVERY_STRATEGY",
    "ATTR_RESOURCE",
    "ATTR_RETRY_DELAY",
    "ATTR_SERVER_ADDRESS",
    "ATTR_SERVER_PORT",
    "ATTR_SERVICE",
    "AttributeSpec",
    "AttributeType",
    "EVENT_BREAKER_REJECTION",
    "EVENT_BREAKER_TRANSITION",
    "EVENT_ERROR",
    "EVENT_RETRY",
    "EVENT_RETRY_BUDGET_EXHAUSTED",
    "GaugeCallback",
    "INSTRUMENTATION_NAME",
    "INSTRUMENTATION_VERSION",
    "INSTRUMENTS",
    "InstrumentKind",
    "InstrumentSpec",
    "Instruments",
    "LOG_ALERT_FIRING",
    "LOG_ALERT_RESOLVED",
    "LOG_EVENTS",
    "LOG_INSIGHT",
    "LOG_REPORT",
    "LogEventSpec",
    "METRIC_ALERTS_ACTIVE",
    "METRIC_ALERT_NOTIFICATIONS",
    "METRIC_BREAKER_FAILURE_RATE_THRESHOLD",
    "METRIC_BREAKER_HEALTH",
    "METRIC_BREAKER_REJECTIONS",
    "METRIC_BREAKER_STATE",
    "METRIC_BREAKER_TRANSITIONS",
    "METRIC_ERRORS",
    "METRIC_INSIGHTS",
    "METRIC_INTERNAL_ERRORS",
    "METRIC_MEMORY_CLEANUPS",
    "METRIC_MEMORY_FREED",
    "METRIC_MEMORY_PRESSURE",
    "METRIC_MEMORY_PRESSURE_LEVEL",
    "METRIC_PREDICTIONS",
    "METRIC_PREDICTION_PROBABILITY",
    "METRIC_PREDICTION_TIME_TO_EXHAUSTION",
    "METRIC_PREVENTION_ACTIONS",
    "METRIC_RECOVERIES",
    "METRIC_RECOVERY_ATTEMPTS_MADE",
    "METRIC_RECOVERY_DURATION",
    "METRIC_RECOVERY_RESULTS",
    "METRIC_RESOURCE_UTILIZATION",
    "METRIC_RETRIES",
    "METRIC_RETRY_BUDGET_EXHAUSTED",
    "METRIC_RETRY_BUDGET_TOKENS",
    "MONITOR_INSTRUMENTS",
    "MonitorInstruments",
    "RECOVERY_DURATION_BUCKETS",
    "SCHEMA_URL",
    "SPANS",
    "SPAN_EVENTS",
    "SPAN_MEMORY_CLEANUP",
    "SPAN_PREDICTION",
    "SPAN_RECOVERY",
    "SpanEventSpec",
    "SpanSpec",
    "create_gauges",
    "create_instruments",
    "create_monitor_instruments",
]

#: Name of the meter and of the tracer (the instrumentation scope).
INSTRUMENTATION_NAME: Final = "otel_raptor"
#: Version of the instrumentation scope: the package version.
INSTRUMENTATION_VERSION: Final = __version__
#: The semantic-conventions version the ``error.type``/``server.*``/``http.*`` keys follow.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.44.0"

# ------------------------------------------------------------------------------------ keys

ATTR_SERVICE: Final = "raptor.service"
ATTR_ERROR_CATEGORY: Final = "raptor.error.category"
ATTR_ERROR_SEVERITY: Final = "raptor.error.severity"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_RECOVERY_STRATEGY: Final = "raptor.recovery.strategy"
ATTR_RECOVERY_OUTCOME: Final = "raptor.recovery.outcome"
ATTR_RECOVERY_GIVE_UP_REASON: Final = "raptor.recovery.give_up_reason"
ATTR_RECOVERY_ATTEMPTS: Final = "raptor.recovery.attempts"
ATTR_RECOVERY_ATTEMPT: Final = "raptor.recovery.attempt"
ATTR_RETRY_DELAY: Final = "raptor.retry.delay"
ATTR_BREAKER_NAME: Final = "raptor.circuit_breaker.name"
ATTR_BREAKER_STATE: Final = "raptor.circuit_breaker.state"
ATTR_BREAKER_FROM_STATE: Final = "raptor.circuit_breaker.from_state"
ATTR_BREAKER_TO_STATE: Final = "raptor.circuit_breaker.to_state"
ATTR_BREAKER_TRANSITION_REASON: Final = "raptor.circuit_breaker.transition.reason"
ATTR_BREAKER_OPEN_DURATION: Final = "raptor.circuit_breaker.open_duration"
ATTR_BREAKER_RETRY_AFTER: Final = "raptor.circuit_breaker.retry_after"
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_SERVER_PORT: Final = "server.port"
ATTR_DB_SYSTEM_NAME: Final = "db.system.name"
ATTR_DB_NAMESPACE: Final = "db.namespace"
ATTR_DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"
ATTR_HTTP_REQUEST_METHOD: Final = "http.request.method"
ATTR_HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
ATTR_HTTP_REQUEST_RESEND_COUNT: Final = "http.request.resend_count"
ATTR_RESOURCE: Final = "raptor.resource"
ATTR_PREDICTION_SEVERITY: Final = "raptor.prediction.severity"
ATTR_PREDICTION_STATE: Final = "raptor.prediction.state"
ATTR_PREDICTION_PROBABILITY: Final = "raptor.prediction.probability"
ATTR_PREDICTION_TIME_TO_EXHAUSTION: Final = "raptor.prediction.time_to_exhaustion"
ATTR_PREDICTION_CONFIDENCE: Final = "raptor.prediction.confidence"
ATTR_PREVENTION_ACTION: Final = "raptor.prevention.action"
ATTR_PREVENTION_OUTCOME: Final = "raptor.prevention.outcome"
ATTR_PREVENTION_SKIP_REASON: Final = "raptor.prevention.skip_reason"
ATTR_MEMORY_PRESSURE_LEVEL: Final = "raptor.memory.pressure.level"
ATTR_MEMORY_CLEANUP_LEVEL: Final = "raptor.memory.cleanup.level"
ATTR_MEMORY_CLEANUP_TRIGGER: Final = "raptor.memory.cleanup.trigger"
ATTR_MEMORY_BYTES_FREED: Final = "raptor.memory.cleanup.bytes_freed"
ATTR_MEMORY_ENTRIES_EVICTED: Final = "raptor.memory.cleanup.entries_evicted"
ATTR_RECOVERY_RESULT: Final = "raptor.recovery.result"
ATTR_ALERT_NAME: Final = "raptor.alert.name"
ATTR_ALERT_SEVERITY: Final = "raptor.alert.severity"
ATTR_ALERT_STATE: Final = "raptor.alert.state"
ATTR_ALERT_VALUE: Final = "raptor.alert.value"
ATTR_ALERT_THRESHOLD: Final = "raptor.alert.threshold"
ATTR_INSIGHT_KIND: Final = "raptor.insight.kind"
ATTR_INSIGHT_RECOMMENDATION: Final = "raptor.insight.recommendation"
ATTR_INSIGHT_EVIDENCE: Final = "raptor.insight.evidence"
ATTR_REPORT_DURATION: Final = "raptor.report.duration"
ATTR_INTERNAL_SITE: Final = "raptor.internal.site"


class AttributeType(str, enum.Enum):
    """The OpenTelemetry value type of an attribute (the docs table's *Type* column)."""

    STRING = "string"
    INT = "int"
    DOUBLE = "double"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class AttributeSpec:
    """One attribute key: its type, its values and the bound on its distinct values."""

    key: str
    type: AttributeType
    values: str
    bound: str


ATTRIBUTES: Final[tuple[AttributeSpec, ...]] = (
    AttributeSpec(
        key=ATTR_SERVICE,
        type=AttributeType.STRING,
        values=(
            "downstream name: `scheme://host:port` of an HTTP origin (the host alone with "
            "`breaker_key = host`), or a guard's service; `other` past the cap"
        ),
        bound="256 (first distinct names win, the rest fold into `other`)",
    ),
    AttributeSpec(
        key=ATTR_ERROR_CATEGORY,
        type=AttributeType.STRING,
        values="an `ErrorCategory` value (`timeout`, `rate_limit`, ...)",
        bound="16 (capped at 32, then `other`)",
    ),
    AttributeSpec(
        key=ATTR_ERROR_SEVERITY,
        type=AttributeType.STRING,
        values="`low`, `medium`, `high`, `critical`",
        bound="4",
    ),
    AttributeSpec(
        key=ATTR_ERROR_TYPE,
        type=AttributeType.STRING,
        values="exception class (`httpx.ConnectTimeout`) or HTTP status code (`503`)",
        bound="128 (then `_OTHER`)",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_STRATEGY,
        type=AttributeType.STRING,
        values="a `Strategy` value (`retry_with_backoff`, `fail_fast`, ...)",
        bound="7",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_OUTCOME,
        type=AttributeType.STRING,
        values="`recovered`, `fallback`, `failed`, `rejected`, `budget_exhausted`",
        bound="5",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_GIVE_UP_REASON,
        type=AttributeType.STRING,
        values="`attempts_exhausted`, `not_retryable`, `deadline`, `breaker_rejected`, ...;"
        " absent when recovered",
        bound="32 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_ATTEMPTS,
        type=AttributeType.INT,
        values="attempts made (0 when the breaker refused the call at once)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_ATTEMPT,
        type=AttributeType.INT,
        values="number of the attempt that failed, from 1",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_RETRY_DELAY,
        type=AttributeType.DOUBLE,
        values="seconds until the next attempt starts, >= 0",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_NAME,
        type=AttributeType.STRING,
        values="breaker name (the service by default); `other` past the cap",
        bound="256 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_STATE,
        type=AttributeType.STRING,
        values="`closed`, `open`, `half_open`",
        bound="3",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_FROM_STATE,
        type=AttributeType.STRING,
        values="`closed`, `open`, `half_open`",
        bound="3",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_TO_STATE,
        type=AttributeType.STRING,
        values="`closed`, `open`, `half_open`",
        bound="3",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_TRANSITION_REASON,
        type=AttributeType.STRING,
        values="a `TransitionReason` value (`consecutive_failures`, `probe_failed`, "
        "`health_check_passed`, ...)",
        bound="10",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_OPEN_DURATION,
        type=AttributeType.DOUBLE,
        values="seconds the breaker stays open (absent when held open by hand)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_BREAKER_RETRY_AFTER,
        type=AttributeType.DOUBLE,
        values="seconds until the breaker admits a call (absent when held open by hand)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_SERVER_ADDRESS,
        type=AttributeType.STRING,
        values="semconv: host name or IP of an integration's downstream; for HTTP, the host "
        "the request's `Host` header names when it names another than the URL's (absent for "
        "`other` and for your own guards)",
        bound="one per `raptor.service`",
    ),
    AttributeSpec(
        key=ATTR_SERVER_PORT,
        type=AttributeType.INT,
        values="semconv: port of an integration's downstream (absent with `breaker_key = "
        "host`, for `other` and for your own guards)",
        bound="one per `raptor.service`",
    ),
    AttributeSpec(
        key=ATTR_DB_SYSTEM_NAME,
        type=AttributeType.STRING,
        values="semconv: `postgresql`, `mysql`, `redis` or `sqlite` (a database integration's "
        "downstream; absent otherwise)",
        bound="one per `raptor.service`",
    ),
    AttributeSpec(
        key=ATTR_DB_NAMESPACE,
        type=AttributeType.STRING,
        values="semconv: the database name, the Redis database number or the SQLite file "
        "(database integrations)",
        bound="one per `raptor.service`",
    ),
    AttributeSpec(
        key=ATTR_DB_RESPONSE_STATUS_CODE,
        type=AttributeType.STRING,
        values="semconv: the SQLSTATE (`40001`), MySQL error number (`1213`) or SQLite error "
        "name (`SQLITE_BUSY`) of a database failure; absent when the server sent none",
        bound="64 (then `_OTHER`)",
    ),
    AttributeSpec(
        key=ATTR_HTTP_REQUEST_METHOD,
        type=AttributeType.STRING,
        values="semconv: `GET`, `POST`, ... or `_OTHER` (integration spans)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_HTTP_RESPONSE_STATUS_CODE,
        type=AttributeType.INT,
        values="semconv: the HTTP status code (integration spans)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_HTTP_REQUEST_RESEND_COUNT,
        type=AttributeType.INT,
        values="semconv: on a contrib HTTP client span, the resend's number (1 for the first"
        " retry; absent on the first attempt)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_INTERNAL_SITE,
        type=AttributeType.STRING,
        values="where otel_raptor met a bug of its own: a code site (`drive.refusal`, "
        "`telemetry.install`, `httpx.stale_lookup`, ...)",
        bound="256 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_RESOURCE,
        type=AttributeType.STRING,
        values="`memory`, `process_memory`, `disk`, `file_descriptors`, `cpu`",
        bound="16 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_PREDICTION_SEVERITY,
        type=AttributeType.STRING,
        values="`low`, `medium`, `high`, `critical`",
        bound="4",
    ),
    AttributeSpec(
        key=ATTR_PREDICTION_STATE,
        type=AttributeType.STRING,
        values="`raised` (or escalated), `cleared`",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_PREDICTION_PROBABILITY,
        type=AttributeType.DOUBLE,
        values="probability of exhaustion within the horizon, 0 to 1",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_PREDICTION_TIME_TO_EXHAUSTION,
        type=AttributeType.DOUBLE,
        values="seconds until the trend reaches the limit (absent when it does not)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_PREDICTION_CONFIDENCE,
        type=AttributeType.DOUBLE,
        values="trust in the trend, 0 to 1",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_PREVENTION_ACTION,
        type=AttributeType.STRING,
        values="`memory_cleanup`, `gc_collect`, `shed_load`, or a user action's name",
        bound="32 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_PREVENTION_OUTCOME,
        type=AttributeType.STRING,
        values="`ok`, `failed`, `skipped`",
        bound="3",
    ),
    AttributeSpec(
        key=ATTR_PREVENTION_SKIP_REASON,
        type=AttributeType.STRING,
        values="`cooldown`, `below_severity`, `overrunning`, `no_controller`, "
        "`controller_declined` (only with outcome `skipped`)",
        bound="5",
    ),
    AttributeSpec(
        key=ATTR_MEMORY_PRESSURE_LEVEL,
        type=AttributeType.STRING,
        values="`normal`, `warning`, `critical`, `emergency`",
        bound="4 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_MEMORY_CLEANUP_LEVEL,
        type=AttributeType.STRING,
        values="`standard`, `critical`, `emergency`",
        bound="3 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_MEMORY_CLEANUP_TRIGGER,
        type=AttributeType.STRING,
        values="`manual`, `pressure`, `prediction`, `scheduled`",
        bound="4 (then `other`)",
    ),
    AttributeSpec(
        key=ATTR_MEMORY_BYTES_FREED,
        type=AttributeType.INT,
        values="bytes the cleanup freed (RSS before minus after; 0 when it grew)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_MEMORY_ENTRIES_EVICTED,
        type=AttributeType.INT,
        values="cache entries the cleanup evicted",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_RECOVERY_RESULT,
        type=AttributeType.STRING,
        values="`succeeded_without_retry`, `succeeded_with_retry`, `failed_with_retry`,"
        " `failed_without_retry`",
        bound="4",
    ),
    AttributeSpec(
        key=ATTR_ALERT_NAME,
        type=AttributeType.STRING,
        values="`RaptorRecoveryTimeHigh`, `RaptorRecoverySuccessRateLow`,"
        " `RaptorErrorFrequencyHigh`, `RaptorMemoryUsageHigh`, `RaptorCircuitBreakerOpen`",
        bound="5",
    ),
    AttributeSpec(
        key=ATTR_ALERT_SEVERITY,
        type=AttributeType.STRING,
        values="`warning`, `critical`",
        bound="2",
    ),
    AttributeSpec(
        key=ATTR_ALERT_STATE,
        type=AttributeType.STRING,
        values="`firing`, `resolved`",
        bound="2",
    ),
    AttributeSpec(
        key=ATTR_ALERT_VALUE,
        type=AttributeType.DOUBLE,
        values="the value that breached the threshold (seconds, percent or a rate a minute)",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_ALERT_THRESHOLD,
        type=AttributeType.DOUBLE,
        values="the threshold of the rule, in the unit of the value",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_INSIGHT_KIND,
        type=AttributeType.STRING,
        values="an `InsightKind` value (`error_spike`, `futile_retries`, ...)",
        bound="8",
    ),
    AttributeSpec(
        key=ATTR_INSIGHT_RECOMMENDATION,
        type=AttributeType.STRING,
        values="one concrete recommendation, a sentence",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_INSIGHT_EVIDENCE,
        type=AttributeType.STRING,
        values="the numbers behind the insight, a JSON object of name to number",
        bound="not on metrics",
    ),
    AttributeSpec(
        key=ATTR_REPORT_DURATION,
        type=AttributeType.DOUBLE,
        values="seconds the report covers",
        bound="not on metrics",
    ),
)

# ----------------------------------------------------------------------------- instruments


class InstrumentKind(str, enum.Enum):
    """How an instrument records (the docs table's *Kind* column)."""

    COUNTER = "counter"
    HISTOGRAM = "histogram"
    OBSERVABLE_GAUGE = "observable gauge"
    OBSERVABLE_COUNTER = "observable counter"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class InstrumentSpec:
    """One metric instrument. ``attributes`` lists every key a data point may carry
    (conditional ones included); ``bucket_boundaries`` is the explicit-bucket advice of a
    histogram (seconds for ``s``), empty for other kinds."""

    name: str
    kind: InstrumentKind
    unit: str
    attributes: tuple[str, ...]
    description: str
    bucket_boundaries: tuple[float, ...] = ()


#: Recovery times span a quick reconnect (milliseconds) to a long rate-limit wait (minutes).
RECOVERY_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

METRIC_ERRORS: Final = InstrumentSpec(
    name="raptor.errors",
    kind=InstrumentKind.COUNTER,
    unit="{error}",
    attributes=(
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_ERROR_SEVERITY,
        ATTR_ERROR_TYPE,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
        ATTR_DB_RESPONSE_STATUS_CODE,
    ),
    description="Failed attempts, as classified.",
)
METRIC_RETRIES: Final = InstrumentSpec(
    name="raptor.retries",
    kind=InstrumentKind.COUNTER,
    unit="{retry}",
    attributes=(
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_RECOVERY_STRATEGY,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="Retries scheduled after a failed attempt.",
)
METRIC_RECOVERIES: Final = InstrumentSpec(
    name="raptor.recoveries",
    kind=InstrumentKind.COUNTER,
    unit="{recovery}",
    attributes=(
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_RECOVERY_STRATEGY,
        ATTR_RECOVERY_OUTCOME,
        ATTR_RECOVERY_GIVE_UP_REASON,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="Logical calls that needed recovery, by how they ended.",
)
METRIC_RECOVERY_DURATION: Final = InstrumentSpec(
    name="raptor.recovery.duration",
    kind=InstrumentKind.HISTOGRAM,
    unit="s",
    attributes=(
        ATTR_SERVICE,
        ATTR_RECOVERY_STRATEGY,
        ATTR_RECOVERY_OUTCOME,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="Time from the first attempt's start to the end of recovery.",
    bucket_boundaries=RECOVERY_DURATION_BUCKETS,
)
METRIC_RETRY_BUDGET_EXHAUSTED: Final = InstrumentSpec(
    name="raptor.retry_budget.exhausted",
    kind=InstrumentKind.COUNTER,
    unit="{retry}",
    attributes=(
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="Retries refused because the downstream's retry budget was empty.",
)
METRIC_BREAKER_TRANSITIONS: Final = InstrumentSpec(
    name="raptor.circuit_breaker.transitions",
    kind=InstrumentKind.COUNTER,
    unit="{transition}",
    attributes=(
        ATTR_BREAKER_NAME,
        ATTR_BREAKER_FROM_STATE,
        ATTR_BREAKER_TO_STATE,
        ATTR_BREAKER_TRANSITION_REASON,
    ),
    description="Circuit-breaker state changes.",
)
METRIC_BREAKER_REJECTIONS: Final = InstrumentSpec(
    name="raptor.circuit_breaker.rejections",
    kind=InstrumentKind.COUNTER,
    unit="{call}",
    attributes=(ATTR_BREAKER_NAME, ATTR_BREAKER_STATE),
    description="Calls refused by an open or saturated half-open breaker.",
)
METRIC_BREAKER_STATE: Final = InstrumentSpec(
    name="raptor.circuit_breaker.state",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(ATTR_BREAKER_NAME, ATTR_BREAKER_STATE),
    description="1 for the breaker's current state, 0 for each other state.",
)
METRIC_BREAKER_HEALTH: Final = InstrumentSpec(
    name="raptor.circuit_breaker.health",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="%",
    attributes=(ATTR_BREAKER_NAME,),
    description="Health score, 0 (open) to 100 (no failures in the window).",
)
METRIC_BREAKER_FAILURE_RATE_THRESHOLD: Final = InstrumentSpec(
    name="raptor.circuit_breaker.failure_rate_threshold",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(ATTR_BREAKER_NAME,),
    description="Failure rate (0 to 1) that trips the breaker: the adapted threshold in force.",
)
METRIC_RETRY_BUDGET_TOKENS: Final = InstrumentSpec(
    name="raptor.retry_budget.tokens",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="{token}",
    attributes=(
        ATTR_SERVICE,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="Retries the downstream's retry budget would allow right now.",
)
METRIC_INTERNAL_ERRORS: Final = InstrumentSpec(
    name="raptor.internal.errors",
    kind=InstrumentKind.OBSERVABLE_COUNTER,
    unit="{error}",
    attributes=(ATTR_INTERNAL_SITE,),
    description=(
        "Bugs otel_raptor met in itself and stepped aside from (the call went on without it),"
        " since the process started."
    ),
)

METRIC_PREDICTIONS: Final = InstrumentSpec(
    name="raptor.predictions",
    kind=InstrumentKind.COUNTER,
    unit="{prediction}",
    attributes=(ATTR_RESOURCE, ATTR_PREDICTION_SEVERITY),
    description="Exhaustion alarms raised (or escalated), by resource and severity.",
)
METRIC_PREVENTION_ACTIONS: Final = InstrumentSpec(
    name="raptor.prevention.actions",
    kind=InstrumentKind.COUNTER,
    unit="{action}",
    attributes=(
        ATTR_RESOURCE,
        ATTR_PREVENTION_ACTION,
        ATTR_PREVENTION_OUTCOME,
        ATTR_PREVENTION_SKIP_REASON,
    ),
    description="Prevention actions run (or skipped) after a prediction, by outcome (and why "
    "skipped).",
)
METRIC_MEMORY_CLEANUPS: Final = InstrumentSpec(
    name="raptor.memory.cleanups",
    kind=InstrumentKind.COUNTER,
    unit="{cleanup}",
    attributes=(ATTR_MEMORY_CLEANUP_LEVEL, ATTR_MEMORY_CLEANUP_TRIGGER),
    description="Memory cleanups run, by level and trigger.",
)
METRIC_MEMORY_FREED: Final = InstrumentSpec(
    name="raptor.memory.freed",
    kind=InstrumentKind.COUNTER,
    unit="By",
    attributes=(ATTR_MEMORY_CLEANUP_LEVEL,),
    description="Bytes of RSS freed by memory cleanups.",
)
METRIC_RESOURCE_UTILIZATION: Final = InstrumentSpec(
    name="raptor.resource.utilization",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(ATTR_RESOURCE,),
    description="Usage over the effective limit (0 to 1) at the latest sample.",
)
METRIC_PREDICTION_TIME_TO_EXHAUSTION: Final = InstrumentSpec(
    name="raptor.prediction.time_to_exhaustion",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="s",
    attributes=(ATTR_RESOURCE,),
    description="Seconds until the trend reaches the limit; absent when it does not.",
)
METRIC_PREDICTION_PROBABILITY: Final = InstrumentSpec(
    name="raptor.prediction.probability",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(ATTR_RESOURCE,),
    description="Probability (0 to 1) that the resource runs out within the horizon.",
)
METRIC_MEMORY_PRESSURE: Final = InstrumentSpec(
    name="raptor.memory.pressure",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(),
    description=(
        "This process's memory over its effective limit, 0 to 1: the cgroup's working set"
        " inside a memory-limited cgroup, else the RSS over physical memory (the memory"
        " controller's ratio; the machine's is `raptor.resource.utilization`)."
    ),
)
METRIC_MEMORY_PRESSURE_LEVEL: Final = InstrumentSpec(
    name="raptor.memory.pressure.level",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="1",
    attributes=(ATTR_MEMORY_PRESSURE_LEVEL,),
    description="1 for the current memory pressure level, 0 for each other level.",
)

METRIC_ALERTS_ACTIVE: Final = InstrumentSpec(
    name="raptor.alerts.active",
    kind=InstrumentKind.OBSERVABLE_GAUGE,
    unit="{alert}",
    attributes=(ATTR_ALERT_NAME, ATTR_ALERT_SEVERITY),
    description="Alerts of the in-process monitor firing now, by rule and severity (0: none).",
)
METRIC_ALERT_NOTIFICATIONS: Final = InstrumentSpec(
    name="raptor.alert.notifications",
    kind=InstrumentKind.COUNTER,
    unit="{notification}",
    attributes=(ATTR_ALERT_NAME, ATTR_ALERT_SEVERITY, ATTR_ALERT_STATE, ATTR_SERVICE),
    description="Alert notifications sent (raptor.alert.firing and .resolved log events).",
)
METRIC_INSIGHTS: Final = InstrumentSpec(
    name="raptor.insights",
    kind=InstrumentKind.COUNTER,
    unit="{insight}",
    attributes=(ATTR_INSIGHT_KIND, ATTR_SERVICE),
    description="Insights announced (raptor.insight log events), by kind.",
)
METRIC_RECOVERY_RESULTS: Final = InstrumentSpec(
    name="raptor.recovery.results",
    kind=InstrumentKind.COUNTER,
    unit="{call}",
    attributes=(ATTR_SERVICE, ATTR_ERROR_CATEGORY, ATTR_RECOVERY_STRATEGY, ATTR_RECOVERY_RESULT),
    description="Logical calls that needed recovery, by resilience4j's four kinds of result.",
)
METRIC_RECOVERY_ATTEMPTS_MADE: Final = InstrumentSpec(
    name="raptor.recovery.attempts_made",
    kind=InstrumentKind.COUNTER,
    unit="{attempt}",
    attributes=(ATTR_SERVICE, ATTR_RECOVERY_STRATEGY, ATTR_RECOVERY_OUTCOME),
    description="Attempts made by logical calls that needed recovery, the first one included.",
)

#: The instruments the error-recovery monitor records (``telemetry.monitoring``); the event
#: sink records the others.
MONITOR_INSTRUMENTS: Final[tuple[InstrumentSpec, ...]] = (
    METRIC_ALERTS_ACTIVE,
    METRIC_ALERT_NOTIFICATIONS,
    METRIC_INSIGHTS,
    METRIC_RECOVERY_RESULTS,
    METRIC_RECOVERY_ATTEMPTS_MADE,
)

#: Every instrument, in the order of the docs table.
INSTRUMENTS: Final[tuple[InstrumentSpec, ...]] = (
    METRIC_ERRORS,
    METRIC_RETRIES,
    METRIC_RECOVERIES,
    METRIC_RECOVERY_DURATION,
    METRIC_RETRY_BUDGET_EXHAUSTED,
    METRIC_BREAKER_TRANSITIONS,
    METRIC_BREAKER_REJECTIONS,
    METRIC_BREAKER_STATE,
    METRIC_BREAKER_HEALTH,
    METRIC_BREAKER_FAILURE_RATE_THRESHOLD,
    METRIC_RETRY_BUDGET_TOKENS,
    METRIC_INTERNAL_ERRORS,
    METRIC_PREDICTIONS,
    METRIC_PREVENTION_ACTIONS,
    METRIC_MEMORY_CLEANUPS,
    METRIC_MEMORY_FREED,
    METRIC_RESOURCE_UTILIZATION,
    METRIC_PREDICTION_TIME_TO_EXHAUSTION,
    METRIC_PREDICTION_PROBABILITY,
    METRIC_MEMORY_PRESSURE,
    METRIC_MEMORY_PRESSURE_LEVEL,
    *MONITOR_INSTRUMENTS,
)

# ------------------------------------------------------------------------ spans and events


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanSpec:
    """A span otel_raptor starts: its name, kind and every attribute key it may carry."""

    name: str
    kind: str
    attributes: tuple[str, ...]
    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanEventSpec:
    """A span event: its name, every attribute key it may carry and where it is recorded."""

    name: str
    attributes: tuple[str, ...]
    description: str


SPAN_RECOVERY: Final = SpanSpec(
    name="raptor.recovery",
    kind="INTERNAL",
    attributes=(
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_RECOVERY_STRATEGY,
        ATTR_RECOVERY_OUTCOME,
        ATTR_RECOVERY_ATTEMPTS,
        ATTR_RECOVERY_GIVE_UP_REASON,
        ATTR_ERROR_TYPE,
        ATTR_SERVER_ADDRESS,
        ATTR_SERVER_PORT,
        ATTR_DB_SYSTEM_NAME,
        ATTR_DB_NAMESPACE,
    ),
    description="One logical call that needed recovery, from its first attempt to the end.",
)

SPAN_PREDICTION: Final = SpanSpec(
    name="raptor.prediction",
    kind="INTERNAL",
    attributes=(
        ATTR_RESOURCE,
        ATTR_PREDICTION_STATE,
        ATTR_PREDICTION_SEVERITY,
        ATTR_PREDICTION_PROBABILITY,
        ATTR_PREDICTION_TIME_TO_EXHAUSTION,
        ATTR_PREDICTION_CONFIDENCE,
    ),
    description="An exhaustion alarm was raised, escalated or cleared (an instant).",
)
SPAN_MEMORY_CLEANUP: Final = SpanSpec(
    name="raptor.memory.cleanup",
    kind="INTERNAL",
    attributes=(
        ATTR_MEMORY_CLEANUP_LEVEL,
        ATTR_MEMORY_CLEANUP_TRIGGER,
        ATTR_MEMORY_BYTES_FREED,
        ATTR_MEMORY_ENTRIES_EVICTED,
    ),
    description="One memory cleanup, from its start to its end.",
)

EVENT_ERROR: Final = SpanEventSpec(
    name="raptor.error",
    attributes=(
        ATTR_RECOVERY_ATTEMPT,
        ATTR_ERROR_CATEGORY,
        ATTR_ERROR_SEVERITY,
        ATTR_ERROR_TYPE,
        ATTR_DB_RESPONSE_STATUS_CODE,
    ),
    description="An attempt failed (on `raptor.recovery`).",
)
EVENT_RETRY: Final = SpanEventSpec(
    name="raptor.retry",
    attributes=(
        ATTR_RECOVERY_ATTEMPT,
        ATTR_RETRY_DELAY,
        ATTR_ERROR_CATEGORY,
        ATTR_RECOVERY_STRATEGY,
    ),
    description="A retry was scheduled after the failed attempt (on `raptor.recovery`).",
)
EVENT_RETRY_BUDGET_EXHAUSTED: Final = SpanEventSpec(
    name="raptor.retry_budget.exhausted",
    attributes=(ATTR_ERROR_CATEGORY,),
    description="A retry was wanted, but the retry budget was empty (on `raptor.recovery`).",
)
EVENT_BREAKER_TRANSITION: Final = SpanEventSpec(
    name="raptor.circuit_breaker.transition",
    attributes=(
        ATTR_BREAKER_NAME,
        ATTR_BREAKER_FROM_STATE,
        ATTR_BREAKER_TO_STATE,
        ATTR_BREAKER_TRANSITION_REASON,
        ATTR_BREAKER_OPEN_DURATION,
    ),
    description="A breaker changed state (on the span current at that moment).",
)
EVENT_BREAKER_REJECTION: Final = SpanEventSpec(
    name="raptor.circuit_breaker.rejection",
    attributes=(ATTR_BREAKER_NAME, ATTR_BREAKER_STATE, ATTR_BREAKER_RETRY_AFTER),
    description="A breaker refused a call (on the span current at that moment).",
)

#: Every span otel_raptor starts.
SPANS: Final[tuple[SpanSpec, ...]] = (SPAN_RECOVERY, SPAN_PREDICTION, SPAN_MEMORY_CLEANUP)
#: Every span event otel_raptor records.
SPAN_EVENTS: Final[tuple[SpanEventSpec, ...]] = (
    EVENT_ERROR,
    EVENT_RETRY,
    EVENT_RETRY_BUDGET_EXHAUSTED,
    EVENT_BREAKER_TRANSITION,
    EVENT_BREAKER_REJECTION,
)

# ------------------------------------------------------------------------------ log events


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEventSpec:
    """A log-record event (OpenTelemetry Logs API, ``event_name``): its name, severity, every
    attribute key it may carry and what its body holds."""

    name: str
    severity: str
    attributes: tuple[str, ...]
    body: str
    description: str


LOG_ALERT_FIRING: Final = LogEventSpec(
    name="raptor.alert.firing",
    severity="`WARN` (warning), `ERROR` (critical)",
    attributes=(
        ATTR_ALERT_NAME,
        ATTR_ALERT_SEVERITY,
        ATTR_SERVICE,
        ATTR_ALERT_VALUE,
        ATTR_ALERT_THRESHOLD,
    ),
    body="the alert's message, a sentence with the numbers",
    description="An alert of the in-process monitor started firing (one per cooldown).",
)
LOG_ALERT_RESOLVED: Final = LogEventSpec(
    name="raptor.alert.resolved",
    severity="`INFO`",
    attributes=(
        ATTR_ALERT_NAME,
        ATTR_ALERT_SEVERITY,
        ATTR_SERVICE,
        ATTR_ALERT_VALUE,
        ATTR_ALERT_THRESHOLD,
    ),
    body="the alert's last message",
    description="A firing alert whose condition has cleared for a while resolved.",
)
LOG_INSIGHT: Final = LogEventSpec(
    name="raptor.insight",
    severity="`INFO`",
    attributes=(
        ATTR_INSIGHT_KIND,
        ATTR_SERVICE,
        ATTR_ERROR_CATEGORY,
        ATTR_INSIGHT_RECOMMENDATION,
        ATTR_INSIGHT_EVIDENCE,
    ),
    body="what was found, a sentence with the numbers",
    description="The analytics found something (deduplicated and rate-limited).",
)
LOG_REPORT: Final = LogEventSpec(
    name="raptor.report",
    severity="`INFO`",
    attributes=(ATTR_REPORT_DURATION,),
    body="the report as a JSON object (`MonitorReport.as_dict()`)",
    description="The monitor's report of the period that just ended (every report_interval).",
)

#: Every log-record event otel_raptor emits.
LOG_EVENTS: Final[tuple[LogEventSpec, ...]] = (
    LOG_ALERT_FIRING,
    LOG_ALERT_RESOLVED,
    LOG_INSIGHT,
    LOG_REPORT,
)

# ---------------------------------------------------------------------------- construction

#: An observable gauge's callback (the OpenTelemetry API shape, without generators).
GaugeCallback = Callable[[CallbackOptions], Iterable[Observation]]


@dataclass(frozen=True, slots=True)
class Instruments:
    """The synchronous instruments, created once per meter by ``create_instruments``."""

    errors: Counter
    retries: Counter
    recoveries: Counter
    recovery_duration: Histogram
    retry_budget_exhausted: Counter
    breaker_transitions: Counter
    breaker_rejections: Counter
    predictions: Counter
    prevention_actions: Counter
    memory_cleanups: Counter
    memory_freed: Counter


def _counter(meter: Meter, spec: InstrumentSpec) -> Counter:
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)


def create_instruments(meter: Meter) -> Instruments:
    """Create every counter and histogram of ``INSTRUMENTS`` on ``meter``."""
    return Instruments(
        errors=_counter(meter, METRIC_ERRORS),
        retries=_counter(meter, METRIC_RETRIES),
        recoveries=_counter(meter, METRIC_RECOVERIES),
        recovery_duration=meter.create_histogram(
            METRIC_RECOVERY_DURATION.name,
            unit=METRIC_RECOVERY_DURATION.unit,
            description=METRIC_RECOVERY_DURATION.description,
            explicit_bucket_boundaries_advisory=METRIC_RECOVERY_DURATION.bucket_boundaries,
        ),
        retry_budget_exhausted=_counter(meter, METRIC_RETRY_BUDGET_EXHAUSTED),
        breaker_transitions=_counter(meter, METRIC_BREAKER_TRANSITIONS),
        breaker_rejections=_counter(meter, METRIC_BREAKER_REJECTIONS),
        predictions=_counter(meter, METRIC_PREDICTIONS),
        prevention_actions=_counter(meter, METRIC_PREVENTION_ACTIONS),
        memory_cleanups=_counter(meter, METRIC_MEMORY_CLEANUPS),
        memory_freed=_counter(meter, METRIC_MEMORY_FREED),
    )


def create_gauges(
    meter: Meter, callbacks: Mapping[InstrumentSpec, GaugeCallback]
) -> tuple[ObservableGauge | ObservableCounter, ...]:
    """Create every observable instrument (gauges, and the ``raptor.internal.errors``
    counter) of ``INSTRUMENTS`` that the event sink reports (all but ``MONITOR_INSTRUMENTS``)
    on ``meter``, each read by ``callbacks[spec]``. One missing from ``callbacks`` raises
    ``KeyError``: every documented observable instrument must be backed by a callback."""
    created: list[ObservableGauge | ObservableCounter] = []
    for spec in INSTRUMENTS:
        if spec in MONITOR_INSTRUMENTS:
            continue
        if spec.kind is InstrumentKind.OBSERVABLE_GAUGE:
            create: Callable[..., ObservableGauge | ObservableCounter] = (
                meter.create_observable_gauge
            )
        elif spec.kind is InstrumentKind.OBSERVABLE_COUNTER:
            create = meter.create_observable_counter
        else:
            continue
        created.append(
            create(
                spec.name,
                callbacks=[callbacks[spec]],
                unit=spec.unit,
                description=spec.description,
            )
        )
    return tuple(created)


@dataclass(frozen=True, slots=True)
class MonitorInstruments:
    """The error-recovery monitor's instruments, created once per meter."""

    alert_notifications: Counter
    insights: Counter
    recovery_results: Counter
    recovery_attempts_made: Counter
    alerts_active: ObservableGauge


def create_monitor_instruments(meter: Meter, alerts_active: GaugeCallback) -> MonitorInstruments:
    """Create every instrument of ``MONITOR_INSTRUMENTS`` on ``meter``; ``alerts_active``
    reads the ``raptor.alerts.active`` gauge."""
    return MonitorInstruments(
        alert_notifications=_counter(meter, METRIC_ALERT_NOTIFICATIONS),
        insights=_counter(meter, METRIC_INSIGHTS),
        recovery_results=_counter(meter, METRIC_RECOVERY_RESULTS),
        recovery_attempts_made=_counter(meter, METRIC_RECOVERY_ATTEMPTS_MADE),
        alerts_active=meter.create_observable_gauge(
            METRIC_ALERTS_ACTIVE.name,
            callbacks=[alerts_active],
            unit=METRIC_ALERTS_ACTIVE.unit,
            description=METRIC_ALERTS_ACTIVE.description,
        ),
    )
