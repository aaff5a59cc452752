"""The monitor's conclusions as OpenTelemetry data: log-record events, counters and a gauge.

``MonitorTelemetry(monitor, logger_provider=, meter_provider=)`` listens to an
:class:`~otel_raptor.runtime.monitor.ErrorRecoveryMonitor` and emits, through the Logs API
(``opentelemetry._logs``, one record per event with an ``event_name``):

* ``raptor.alert.firing`` / ``raptor.alert.resolved``: each alert notification (the cooldown
  already applied), with the rule, severity, service, value and threshold as attributes and the
  alert's sentence as the body;
* ``raptor.insight``: each announced insight (deduplicated and rate-limited by the monitor),
  with the kind, service, category, recommendation and evidence;
* ``raptor.report``: the periodic report, its body the report as JSON;

and records the counters ``raptor.alert.notifications``, ``raptor.insights``,
``raptor.recovery.results`` (resilience4j's four kinds) and ``raptor.recovery.attempts_made``,
plus the observable gauge ``raptor.alerts.active`` (read from the monitor at collection time).
``telemetry/instruments.py`` declares them all (``MONITOR_INSTRUMENTS``, ``LOG_EVENTS``).

Everything runs on the monitor's thread (or whichever thread asked the monitor for a result),
never on the application's call path. Attribute values are bounded: services are capped (the
excess is ``other``), categories too; no message, URL or fingerprint is ever a metric
attribute. Nothing here raises: a failing provider is reported once and skipped.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import _logs, metrics
from opentelemetry._logs import LoggerProvider, LogRecord, SeverityNumber
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.util.types import AttributeValue

from otel_raptor.core.alerts import AlertNotification, AlertSeverity, AlertState
from otel_raptor.core.events import RecoveryFinished
from otel_raptor.core.insights import Insight
from otel_raptor.core.recovery_stats import result_kind
from otel_raptor.core.reports import MonitorReport
from otel_raptor.runtime.monitor import ErrorRecoveryMonitor
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.telemetry.attributes import (
    DEFAULT_MAX_SERVICES,
    MAX_CATEGORIES,
    OTHER,
    BoundedValues,
)
from otel_raptor.telemetry.instruments import (
    ATTR_ALERT_NAME,
    ATTR_ALERT_SEVERITY,
    ATTR_ALERT_STATE,
    ATTR_ALERT_THRESHOLD,
    ATTR_ALERT_VALUE,
    ATTR_ERROR_CATEGORY,
    ATTR_INSIGHT_EVIDENCE,
    ATTR_INSIGHT_KIND,
    ATTR_INSIGHT_RECOMMENDATION,
    ATTR_RECOVERY_OUTCOME,
    ATTR_RECOVERY_RESULT,
    ATTR_RECOVERY_STRATEGY,
    ATTR_REPORT_DURATION,
    ATTR_SERVICE,
    INSTRUMENTATION_NAME,
    INSTRUMENTATION_VERSION,
    LOG_ALERT_FIRING,
    LOG_ALERT_RESOLVED,
    LOG_INSIGHT,
    LOG_REPORT,
    SCHEMA_URL,
    MonitorInstruments,
    create_monitor_instruments,
)

__all__ = ["MonitorTelemetry"]

_NS_PER_S: Final = 1_000_000_000
#: Distinct attribute sets kept per counter; past it they are rebuilt on each record.
_MAX_CACHED: Final = 4096


class MonitorTelemetry:
    """Emits what ``monitor`` concludes (see the module docstring).

    ``logger_provider`` and ``meter_provider`` default to the global ones (resolved when
    first used). ``max_services`` caps the distinct service names in metric attributes (256).
    :meth:`install` starts listening and registers the gauge; :meth:`uninstall` stops (the
    gauge then reports nothing for this monitor: OpenTelemetry cannot unregister it).
    """

    __slots__ = (
        "__weakref__",
        "_attributes",
        "_categories",
        "_installed",
        "_instruments",
        "_logger",
        "_meter_provider",
        "_monitor",
        "_remove",
        "_services",
    )

    def __init__(
        self,
        monitor: ErrorRecoveryMonitor,
        *,
        logger_provider: LoggerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        max_services: int = DEFAULT_MAX_SERVICES,
    ) -> None:
        self._monitor = monitor
        self._meter_provider = meter_provider
        self._services = BoundedValues(max_services, OTHER, key="telemetry.max_services")
        self._categories = BoundedValues(MAX_CATEGORIES, OTHER)
        self._attributes: dict[tuple[object, ...], Mapping[str, AttributeValue]] = {}
        self._logger = _logger(logger_provider)
        self._instruments: MonitorInstruments | None = None
        self._remove: Any = None
        self._installed = False

    @property
    def monitor(self) -> ErrorRecoveryMonitor:
        return self._monitor

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Listen to the monitor and register the instruments. Idempotent; never raises."""
        if self._installed:
            return
        try:
            hub = _hub_for(self._meter_provider)
            self._instruments = hub.add(self)
            self._remove = self._monitor.add_listener(self)
            self._installed = True
        except Exception as error:  # noqa: BLE001 - telemetry must not stop the app
            report_internal_error("telemetry.monitor.install", error)

    def uninstall(self) -> None:
        self._installed = False
        remove, self._remove = self._remove, None
        try:
            if remove is not None:
                remove()
            _hub_for(self._meter_provider).remove(self)
        except Exception as error:  # noqa: BLE001
            report_internal_error("telemetry.monitor.uninstall", error)

    # --- the listener ---------------------------------------------------------------------

    def on_recoveries(self, finished: Sequence[RecoveryFinished]) -> None:
        instruments = self._instruments
        if instruments is None:
            return
        for event in finished:
            service = self._services(event.service)
            category = self._categories(event.category)
            strategy = event.strategy.value
            kind = result_kind(event.outcome.value, event.attempts).value
            instruments.recovery_results.add(
                1,
                self._cached(
                    (service, category, strategy, kind),
                    {
                        ATTR_SERVICE: service,
                        ATTR_ERROR_CATEGORY: category,
                        ATTR_RECOVERY_STRATEGY: strategy,
                        ATTR_RECOVERY_RESULT: kind,
                    },
                ),
            )
            if event.attempts > 0:
                outcome = event.outcome.value
                instruments.recovery_attempts_made.add(
                    event.attempts,
                    self._cached(
                        (service, strategy, outcome),
                        {
                            ATTR_SERVICE: service,
                            ATTR_RECOVERY_STRATEGY: strategy,
                            ATTR_RECOVERY_OUTCOME: outcome,
                        },
                    ),
                )

    def on_alert(self, notification: AlertNotification) -> None:
        alert = notification.alert
        service = self._services(alert.service) if alert.service else ""
        firing = notification.state is AlertState.FIRING
        instruments = self._instruments
        if instruments is not None:
            attributes: dict[str, AttributeValue] = {
                ATTR_ALERT_NAME: alert.name,
                ATTR_ALERT_SEVERITY: alert.severity,
                ATTR_ALERT_STATE: notification.state.value,
            }
            if service:
                attributes[ATTR_SERVICE] = service
            key = (alert.name, alert.severity, notification.state.value, service)
            instruments.alert_notifications.add(1, self._cached(key, attributes))
        if firing:
            spec, severity = LOG_ALERT_FIRING, _alert_severity(alert.severity)
        else:
            spec, severity = LOG_ALERT_RESOLVED, SeverityNumber.INFO
        record: dict[str, AttributeValue] = {
            ATTR_ALERT_NAME: alert.name,
            ATTR_ALERT_SEVERITY: alert.severity,
            ATTR_ALERT_VALUE: _finite(alert.value),
            ATTR_ALERT_THRESHOLD: _finite(alert.threshold),
        }
        if alert.service:
            record[ATTR_SERVICE] = alert.service
        self._emit(spec.name, severity, alert.message, record, alert.since)

    def on_insight(self, insight: Insight) -> None:
        service = self._services(insight.service)
        instruments = self._instruments
        if instruments is not None:
            key = (insight.kind.value, service)
            instruments.insights.add(
                1,
                self._cached(key, {ATTR_INSIGHT_KIND: insight.kind.value, ATTR_SERVICE: service}),
            )
        record: dict[str, AttributeValue] = {
            ATTR_INSIGHT_KIND: insight.kind.value,
            ATTR_SERVICE: insight.service,
            ATTR_INSIGHT_RECOMMENDATION: insight.recommendation,
            ATTR_INSIGHT_EVIDENCE: json.dumps(dict(insight.evidence), sort_keys=True),
        }
        if insight.category:
            record[ATTR_ERROR_CATEGORY] = insight.category
        self._emit(LOG_INSIGHT.name, SeverityNumber.INFO, insight.summary, record, None)

    def on_report(self, report: MonitorReport) -> None:
        body = json.dumps(report.as_dict(), sort_keys=True, default=_json_default)
        record: dict[str, AttributeValue] = {ATTR_REPORT_DURATION: report.duration_s}
        self._emit(LOG_REPORT.name, SeverityNumber.INFO, body, record, report.ended_at)

    # --- helpers ----------------------------------------------------------------------------

    def _cached(
        self, key: tuple[object, ...], attributes: Mapping[str, AttributeValue]
    ) -> Mapping[str, AttributeValue]:
        found = self._attributes.get(key)
        if found is not None:
            return found
        if len(self._attributes) < _MAX_CACHED:
            self._attributes[key] = attributes
        return attributes

    def _emit(
        self,
        name: str,
        severity: SeverityNumber,
        body: str,
        attributes: Mapping[str, AttributeValue],
        at: float | None,
    ) -> None:
        timestamp = None if at is None else int(at * _NS_PER_S)
        try:
            self._logger.emit(
                timestamp=timestamp,
                severity_number=severity,
                severity_text=severity.name,
                body=body,
                attributes=attributes,
                event_name=name,
            )
        except TypeError:
            # An API older than the keyword form (< 1.35): a LogRecord, the event name as an
            # attribute, as the Events API used to write it.
            try:
                self._logger.emit(
                    LogRecord(
                        timestamp=timestamp,
                        severity_number=severity,
                        severity_text=severity.name,
                        body=body,
                        attributes={**attributes, "event.name": name},
                    )
                )
            except Exception as error:  # noqa: BLE001
                report_internal_error("telemetry.monitor.emit", error)
        except Exception as error:  # noqa: BLE001 - a failing exporter must not stop us
            report_internal_error("telemetry.monitor.emit", error)


def _alert_severity(severity: str) -> SeverityNumber:
    return SeverityNumber.ERROR if severity == AlertSeverity.CRITICAL.value else SeverityNumber.WARN


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _json_default(value: object) -> object:
    return str(value)


def _logger(provider: LoggerProvider | None) -> _logs.Logger:
    try:
        return _logs.get_logger(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            logger_provider=provider,
            schema_url=SCHEMA_URL,
        )
    except Exception as error:  # noqa: BLE001 - a broken provider must not stop the app
        report_internal_error("telemetry.logger", error)
        return _logs.NoOpLogger(INSTRUMENTATION_NAME)


class _Hub:
    """The monitor instruments of one meter provider, shared by every ``MonitorTelemetry``
    installed on it (an SDK meter ignores a second registration of a name)."""

    __slots__ = ("_instruments", "_lock", "_members")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: tuple[MonitorTelemetry, ...] = ()
        self._instruments: MonitorInstruments | None = None

    def add(self, member: MonitorTelemetry) -> MonitorInstruments:
        with self._lock:
            if member not in self._members:
                self._members = (*self._members, member)
            if self._instruments is None:
                self._instruments = create_monitor_instruments(
                    _meter(member._meter_provider), self._observe
                )
            return self._instruments

    def remove(self, member: MonitorTelemetry) -> None:
        with self._lock:
            self._members = tuple(m for m in self._members if m is not member)

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        # Summed over the members: every monitor reports 0 for each of its rules that is not
        # firing, and a gauge keeps the last of two observations with the same attributes,
        # so one monitor's 0 would hide another's firing alert.
        counts: dict[tuple[str, str], int] = {}
        for member in self._members:
            if not member._installed:
                continue
            try:
                for key, count in member._monitor.alert_counts().items():
                    counts[key] = counts.get(key, 0) + count
            except Exception as error:  # noqa: BLE001 - a gauge must not fail a collection
                report_internal_error("telemetry.gauge raptor.alerts.active", error)
        return [
            Observation(count, {ATTR_ALERT_NAME: name, ATTR_ALERT_SEVERITY: severity})
            for (name, severity), count in sorted(counts.items())
        ]


class _Global:
    """The hub key of the global meter provider, whichever object it is now."""


_GLOBAL: Final = _Global()
_hubs_lock = threading.Lock()
_hubs: weakref.WeakKeyDictionary[object, _Hub] = weakref.WeakKeyDictionary()


def _hub_for(provider: MeterProvider | None) -> _Hub:
    key: object = provider
    if provider is None or provider is metrics.get_meter_provider():
        key = _GLOBAL
    with _hubs_lock:
        try:
            hub = _hubs.get(key)
            if hub is None:
                hub = _hubs[key] = _Hub()
        except TypeError:  # not weakly referenceable: not shared
            hub = _Hub()
    return hub


def _meter(provider: MeterProvider | None) -> Meter:
    try:
        return metrics.get_meter(
            INSTRUMENTATION_NAME,
            INSTRUMENTATION_VERSION,
            meter_provider=provider,
            schema_url=SCHEMA_URL,
        )
    except Exception as error:  # noqa: BLE001
        report_internal_error("telemetry.meter", error)
        return metrics.NoOpMeter(INSTRUMENTATION_NAME)
