"""``RaptorInstrumentor``: one line (or ``opentelemetry-instrument``) for resilience + telemetry.

``RaptorInstrumentor().instrument(**kwargs)`` loads the configuration (kwargs >
``OTEL_PYTHON_RAPTOR_*`` > the TOML file > defaults, see :mod:`otel_raptor.config`),
reconfigures the process-wide runtime, installs the telemetry sink (spans and metrics for
every runtime event) and then each enabled integration whose library is installed.
``uninstrument()`` undoes all of it, integrations first, in reverse order, and forgets the
circuit breakers and health checks they made, so a later ``instrument()`` starts afresh.

An integration whose library the app has not imported yet is *deferred*: a wrapt post-import
hook installs it when the app imports the library (before that ``import`` statement returns),
so ``instrument()`` never imports a library the app does not use. Importing every installed
driver up front cost an httpx-only process 340 modules, 28 MB and 0.3-0.6 s.

What may raise and what may not. A bad keyword argument is the caller's mistake in code: it
raises :class:`~otel_raptor.errors.ConfigError` before anything is changed. Everything else
(a bad environment or file value, an integration that fails to import or install, a broken
telemetry provider) is logged once on the ``otel_raptor`` logger and the rest carries on:
under ``opentelemetry-instrument`` an exception here would stop every instrumentor loaded
after this one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,  # that module starts with '# type: ignore'; strict mypy needs both ignores
)

from otel_raptor import environment_variables as env_names
from otel_raptor.config import RaptorConfig
from otel_raptor.config.environment import KNOWN_VARIABLES
from otel_raptor.config.monitor import MonitorConfig
from otel_raptor.errors import ConfigError
from otel_raptor.integrations import INTEGRATIONS
from otel_raptor.integrations._base import Integration, IntegrationSettings
from otel_raptor.integrations._http import INTEGRATION_CHECK, ResendCountSpanProcessor
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.health import HealthCheck
from otel_raptor.runtime.memory import SimpleMemoryController, get_memory_controller
from otel_raptor.runtime.monitor import (
    ErrorRecoveryMonitor,
    process_monitor,
    set_error_recovery_monitor,
)
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import RecoveryScope, Runtime, get_runtime
from otel_raptor.telemetry.monitoring import MonitorTelemetry
from otel_raptor.telemetry.sink import TelemetrySink

__all__ = ["RaptorInstrumentor"]

_logger = logging.getLogger("otel_raptor")
_PREFIX = "OTEL_PYTHON_RAPTOR_"
# How the configuration's errors about an unknown key (file) or keyword (code) begin.
_UNKNOWN_KEY = "a known key"
_UNKNOWN_KEYWORD = "a known keyword"
#: ``instrument()`` keywords that are the instrumentor's, not the configuration's.
_OWN_KEYWORDS = ("tracer_provider", "meter_provider", "logger_provider", "memory")
#: The provider keywords: the method each provider must have, and what it is.
_PROVIDERS = {
    "tracer_provider": ("get_tracer", "TracerProvider"),
    "meter_provider": ("get_meter", "MeterProvider"),
    "logger_provider": ("get_logger", "LoggerProvider"),
}
#: The keyword that names the TOML file in code.
_CONFIG_FILE = "config_file"

# Messages of configuration problems already logged: instrument → uninstrument → instrument
# must not repeat them. Bounded, since values come from outside.
_MAX_REPORTED = 256
_reported: set[str] = set()
_reported_box = LockBox()


def _report_config(error: ConfigError) -> None:
    """Log a bad environment or file value once; its key falls back to its default."""
    message = str(error)
    with _reported_box.lock:
        if message in _reported:
            return
        if len(_reported) >= _MAX_REPORTED:
            _reported.clear()
        _reported.add(message)
    _logger.warning("otel_raptor configuration: %s; ignoring it%s", message, _what_applies(error))


def _what_applies(error: ConfigError) -> str:
    """What takes the place of the value ``error`` reports: the next layer down."""
    if error.key in (env_names.OTEL_PYTHON_RAPTOR_CONFIG, _CONFIG_FILE):
        return " (the environment and the defaults apply)"  # the file as a whole
    if error.allowed.startswith(_UNKNOWN_KEY):
        return ""  # a key raptor does not read: nothing falls back
    if not error.key.upper().startswith(_PREFIX):
        return " (the default applies)"  # a file's value: only the defaults lie below it
    if error.key not in KNOWN_VARIABLES:
        return ""  # a variable raptor does not read: nothing falls back
    return " (the file's value or the default applies)"


@dataclass(slots=True)
class _Installed:
    """What one ``instrument()`` changed, to undo it exactly."""

    config: RaptorConfig
    runtime: Runtime
    sink: TelemetrySink | None
    previous_scope: RecoveryScope
    previous_budget: tuple[float, float]
    previous_max_services: int
    #: The runtime's breakers and health checks (by breaker name) before: the app's.
    previous_breakers: dict[str, CircuitBreaker]
    previous_checks: dict[str, HealthCheck]
    integrations: list[Integration]
    #: What every integration is handed, deferred ones included.
    settings: IntegrationSettings
    #: Integrations waiting for the app to import their library: library name -> them.
    deferred: dict[str, list[Integration]] = field(default_factory=dict)


# Guards ``RaptorInstrumentor._installed`` and its ``integrations``/``deferred`` against the
# post-import hooks, which run in whichever thread imports a library. Never held across an
# import or an install: the importing thread holds that library's module lock while its hook
# runs, so waiting on an import under this lock could deadlock with it.
_deferred_box = LockBox()
# Libraries with a post-import hook registered that has not fired yet (wrapt fires a hook
# once and cannot take one back), so that instrument cycles never stack hooks.
_watched: set[str] = set()


class RaptorInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # BaseInstrumentor is untyped
    """Zero-code resilience for requests, httpx, asyncio and the database drivers (psycopg,
    psycopg2, asyncpg, PyMySQL, redis-py, sqlite3), with OpenTelemetry telemetry.

    ``instrument()`` keyword arguments: ``tracer_provider``, ``meter_provider`` and
    ``logger_provider`` (default: the global ones), ``memory`` (the memory controller:
    ``True``, ``False``, a controller or a mapping), ``monitor`` (the error-recovery monitor
    and analytics: ``True``, ``False``, an ``ErrorRecoveryMonitor`` or the seed's mapping),
    plus everything :meth:`RaptorConfig.load` accepts (``retry`` /
    ``recovery_config``, ``breaker`` / ``circuit_breaker_config``, ``retry_budget``,
    ``retry_budget_ratio``, ``integrations``, ``breaker_key``, ``max_services``,
    ``retry_non_idempotent``, ``request_timeout``, ``health_check_path``, ``statement_timeout``,
    ``asyncio_timeouts``, ``downstreams``, ``config_file``). With no arguments it does
    exactly what ``opentelemetry-instrument`` does.

    Like every ``BaseInstrumentor`` it is a singleton: ``RaptorInstrumentor()`` returns the
    same object each time, and instrumenting twice does nothing the second time.
    """

    # Class-level defaults: BaseInstrumentor is a singleton whose ``__init__`` runs on every
    # ``RaptorInstrumentor()``, so instance state must not be (re)set there.
    _installed: _Installed | None = None
    _memory: SimpleMemoryController | None = None
    #: Whether ``instrument()`` started ``_memory`` (else the app runs it: left running).
    _memory_started: bool = False
    _monitoring: _Monitoring | None = None
    _lock = threading.Lock()

    def instrumentation_dependencies(self) -> Collection[str]:
        # Each integration checks for its own library: a missing one must not disable the rest.
        return ()

    @property
    def config(self) -> RaptorConfig | None:
        """The configuration in force, or ``None`` when not instrumented."""
        installed = self._installed
        return installed.config if installed is not None else None

    @property
    def installed_integrations(self) -> tuple[str, ...]:
        """Names of the integrations installed now, in installation order."""
        installed = self._installed
        if installed is None:
            return ()
        return tuple(integration.name for integration in installed.integrations)

    @property
    def deferred_integrations(self) -> tuple[str, ...]:
        """Names of the integrations waiting for the app to import their library (each is
        installed by that ``import``)."""
        installed = self._installed
        if installed is None:
            return ()
        with _deferred_box.lock:
            waiting = [i.name for pending in installed.deferred.values() for i in pending]
        return tuple(waiting)

    def _instrument(self, **kwargs: Any) -> None:
        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        logger_provider = kwargs.pop("logger_provider", None)
        _check_provider("tracer_provider", tracer_provider)
        _check_provider("meter_provider", meter_provider)
        _check_provider("logger_provider", logger_provider)
        memory_spec = kwargs.pop("memory", True)
        monitor_spec = _monitor_spec(kwargs.pop("monitor", True))
        if isinstance(monitor_spec, (MonitorConfig, Mapping)):
            kwargs["monitor"] = monitor_spec  # merged over the environment and the file
        # A bad kwarg raises here, before anything has changed.
        try:
            config = _load_config(kwargs, os.environ)
        except ConfigError as error:
            if not error.allowed.startswith(_UNKNOWN_KEYWORD):
                raise
            allowed = f"{error.allowed}, {', '.join(_OWN_KEYWORDS)}"  # taken out above
            raise ConfigError(error.key, error.value, allowed) from None
        if config is None:  # not even the defaults load: leave the app alone
            return
        try:
            memory = _memory_controller(memory_spec)
        except ConfigError:
            raise  # a bad memory= mapping: the caller's mistake, said at once
        except Exception as error:  # noqa: BLE001 - psutil cannot read this process (a sandbox)
            report_internal_error("instrumentor.memory", error)
            memory = None
        with self._lock:
            if self._installed is not None:
                return
            try:
                self._install(config, tracer_provider, meter_provider, memory)
            except Exception as error:  # noqa: BLE001 - never stop the app (or the launcher)
                report_internal_error("instrumentor.instrument", error)
            self._memory = memory
            self._memory_started = memory is not None and not memory.running
            if memory is not None:
                try:
                    memory.start()
                except Exception as error:  # noqa: BLE001
                    report_internal_error("instrumentor.memory", error)
            self._monitoring = _start_monitor(monitor_spec, config, logger_provider, meter_provider)

    def _install(
        self,
        config: RaptorConfig,
        tracer_provider: Any,
        meter_provider: Any,
        memory: SimpleMemoryController | None,
    ) -> None:
        runtime = get_runtime()
        installed = _Installed(
            config=config,
            runtime=runtime,
            sink=None,
            previous_scope=runtime.recovery_scope,
            previous_budget=(runtime.budget_ratio, runtime.budget_min_retries_per_second),
            previous_max_services=runtime.max_services,
            previous_breakers=dict(runtime.breakers.items()),
            previous_checks={breaker.name: check for breaker, check in runtime.health.items()},
            integrations=[],
            settings=IntegrationSettings(runtime=runtime, config=config, memory=memory),
        )
        with _deferred_box.lock:
            self._installed = installed
        try:
            runtime.configure(
                budget_ratio=config.retry_budget_ratio,
                budget_min_retries_per_second=config.retry_budget_min_retries_per_second,
                max_services=config.max_services,
            )
        except Exception as error:  # noqa: BLE001 - validated already; never stop the app
            report_internal_error("instrumentor.configure_runtime", error)
        installed.sink = _install_sink(runtime, config, tracer_provider, meter_provider)
        _add_resend_count_processor(tracer_provider)
        settings = installed.settings
        for name, target in INTEGRATIONS.items():
            if config.integrations is not None and name not in config.integrations:
                continue
            integration = _load_integration(name, target)
            if integration is None:
                continue
            library = integration.library
            if library not in sys.modules:
                self._defer(installed, library, integration)
            elif _install_integration(integration, settings):
                with _deferred_box.lock:
                    installed.integrations.append(integration)

    def _defer(self, installed: _Installed, library: str, integration: Integration) -> None:
        """Install ``integration`` when the app imports ``library``."""
        with _deferred_box.lock:
            installed.deferred.setdefault(library, []).append(integration)
            register = library not in _watched
            _watched.add(library)
        if register:
            # Fires at once (in this thread) when the library was imported meanwhile.
            wrapt.register_post_import_hook(_library_imported, library)

    def _install_deferred(self, library: str) -> None:
        """Install the integrations waiting for ``library``, which has just been imported."""
        with _deferred_box.lock:
            installed = self._installed
            if installed is None:
                return
            waiting = installed.deferred.pop(library, ())
        for integration in waiting:
            if not _install_integration(integration, installed.settings):
                continue
            with _deferred_box.lock:
                current = self._installed is installed
                if current:
                    installed.integrations.append(integration)
            if not current:  # uninstrumented while it was being installed
                _uninstall_integration(integration)

    @property
    def memory_controller(self) -> SimpleMemoryController | None:
        """The memory controller ``instrument()`` runs (``memory=False``: none).
        ``uninstrument()`` stops it only if ``instrument()`` started it."""
        return self._memory

    @property
    def error_recovery_monitor(self) -> ErrorRecoveryMonitor | None:
        """The error-recovery monitor ``instrument()`` runs (``monitor=False``: none)."""
        monitoring = self._monitoring
        return monitoring.monitor if monitoring is not None else None

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            monitoring, self._monitoring = self._monitoring, None
            if monitoring is not None:
                monitoring.stop()
            memory, self._memory = self._memory, None
            started, self._memory_started = self._memory_started, False
            if memory is not None and started:
                try:
                    memory.stop(timeout=1.0)
                except Exception as error:  # noqa: BLE001
                    report_internal_error("instrumentor.memory", error)
            with _deferred_box.lock:
                installed, self._installed = self._installed, None
                if installed is None:
                    return
                installed.deferred.clear()
                integrations = list(installed.integrations)
            for integration in reversed(integrations):
                _uninstall_integration(integration)
            try:
                _forget_what_integrations_made(installed)
            except Exception as error:  # noqa: BLE001
                report_internal_error("instrumentor.forget", error)
            runtime = installed.runtime
            sink = installed.sink
            if sink is not None:
                ours = runtime.recovery_scope == sink.recovery_scope
                try:
                    sink.uninstall()
                except Exception as error:  # noqa: BLE001
                    report_internal_error("instrumentor.uninstall telemetry", error)
                if ours:
                    runtime.recovery_scope = installed.previous_scope
            try:
                ratio, floor = installed.previous_budget
                runtime.configure(
                    budget_ratio=ratio,
                    budget_min_retries_per_second=floor,
                    max_services=installed.previous_max_services,
                )
            except Exception as error:  # noqa: BLE001
                report_internal_error("instrumentor.restore_runtime", error)


def _load_config(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> RaptorConfig | None:
    """The configuration: ``kwargs`` over ``environ`` over the file over the defaults.

    Raises :class:`ConfigError` only for a bad keyword argument (the caller's mistake in
    code). A bad environment or file value is reported by ``RaptorConfig.load`` and never
    raises; should one get past it anyway (our bug), as little as possible is dropped: one
    environment variable, else the file, else the environment, else both (the kwargs
    alone). Never raises anything else; ``None`` only if not even the defaults load.
    """
    # Checked here, not by the strict pass below: that pass cannot read the file (should
    # reading it be what fails, it would take every layer with it), so it leaves it out.
    in_code = _code_config_file(kwargs.get(_CONFIG_FILE))
    report = _report_config if in_code is None else _report_code_file
    environ = dict(environ)  # one snapshot for every attempt
    try:
        return RaptorConfig.load(kwargs=kwargs, environ=environ, report=report)
    except Exception as error:  # noqa: BLE001 - sorted out below
        failure = error
    config_env = env_names.OTEL_PYTHON_RAPTOR_CONFIG
    code = {key: value for key, value in kwargs.items() if key != _CONFIG_FILE}
    without_file = {key: value for key, value in environ.items() if key != config_env}
    raptor_env = {key: value for key, value in without_file.items() if key.startswith(_PREFIX)}
    try:
        alone = RaptorConfig.load(kwargs=code, environ={}, report=report)
    except ConfigError:
        # The kwargs fail without any environment or file: the caller's mistake.
        if isinstance(failure, ConfigError):
            raise failure from None
        raise
    except Exception as error:  # noqa: BLE001 - our bug with these kwargs: use the defaults
        report_internal_error("instrumentor.config", error)
        try:
            return RaptorConfig()
        except Exception as fatal:  # noqa: BLE001 - never stop the app
            report_internal_error("instrumentor.config defaults", fatal)
            return None
    report_internal_error("instrumentor.config", failure)
    file_only = {config_env: environ[config_env]} if config_env in environ else {}
    attempts: list[tuple[str, Mapping[str, Any], Mapping[str, str]]] = [
        (name, kwargs, {k: v for k, v in environ.items() if k != name}) for name in raptor_env
    ]
    attempts.append(("the configuration file", code, without_file))
    attempts.append(("every OTEL_PYTHON_RAPTOR_* variable", kwargs, file_only))
    for dropped, attempt_kwargs, attempt_environ in attempts:
        try:
            config = RaptorConfig.load(
                kwargs=attempt_kwargs, environ=attempt_environ, report=report
            )
        except Exception:  # noqa: BLE001 - try dropping more
            continue
        _logger.warning("otel_raptor configuration: ignoring %s (%s)", dropped, failure)
        return config
    _logger.warning(
        "otel_raptor configuration: ignoring the environment and the file (%s)", failure
    )
    return alone


def _code_config_file(value: object) -> str | None:
    """``config_file=``: the path of an existing file, or ``None`` (also for ``""``, as an
    empty ``OTEL_PYTHON_RAPTOR_CONFIG`` counts as unset). A path given in code that names no
    file is the caller's mistake and raises; the same path in the variable is reported by
    ``RaptorConfig.load`` and the rest loads."""
    if value is None:
        return None
    path: object = None
    if isinstance(value, (str, os.PathLike)):
        # TypeError: a __fspath__ that returns neither str nor bytes.
        with contextlib.suppress(TypeError):
            path = os.fspath(value)
    if not isinstance(path, str):
        raise ConfigError(_CONFIG_FILE, value, "a path (a str or an os.PathLike), or None")
    if not path:
        return None
    if not os.path.isfile(path):
        raise ConfigError(_CONFIG_FILE, value, "the path of an existing TOML file")
    return path


def _report_code_file(error: ConfigError) -> None:
    """``_report_config`` for a load whose file ``config_file=`` names: the file's problems
    as a whole (unreadable, not TOML) are that keyword's, not the variable's (maybe unset)."""
    if error.key == env_names.OTEL_PYTHON_RAPTOR_CONFIG:
        error = ConfigError(_CONFIG_FILE, error.value, error.allowed)
    _report_config(error)


def _check_provider(key: str, provider: object) -> None:
    """A provider keyword is ``None`` (the global provider) or has its ``get_*`` method: any
    other value would only fail later, inside telemetry, where it is logged and telemetry is
    silently off."""
    method, kind = _PROVIDERS[key]
    if provider is not None and not callable(getattr(provider, method, None)):
        raise ConfigError(key, provider, f"a {kind} (an object with {method}()), or None")


def _forget_what_integrations_made(installed: _Installed) -> None:
    """Forget the circuit breakers and health checks the integrations made, so that the next
    ``instrument()`` applies its own settings and nothing stays open from this one.

    The runtime is process-wide and the app's guards share its breaker registry and health
    checker, so only what the integrations made goes: the health checks they registered
    (marked ``INTEGRATION_CHECK``), and the breakers new since ``instrument()`` that belong
    to a downstream an integration met (integrations name each one with
    ``Runtime.describe``; guards never do; the shared ``other`` is never forgotten). A guard
    the app made meanwhile under the very name of such a downstream keeps the breaker it
    shares with it, but later guards of that name get a new one. The downstreams (retry
    budget, ``Retry-After`` cooldown) stay: their budget shape is the runtime's, restored by
    ``uninstrument()`` and set by each ``instrument()``, while the balance and the cooldown
    are what the downstream did and said; and guards keep a downstream for their lifetime
    (it is never replaced).
    """
    runtime = installed.runtime
    for breaker, check in runtime.health.items():
        if installed.previous_checks.get(breaker.name) is not check and getattr(
            check, INTEGRATION_CHECK, False
        ):
            runtime.health.unregister(breaker, check)
    for name, breaker in runtime.breakers.items():
        if installed.previous_breakers.get(name) is not breaker and runtime.description(name):
            runtime.breakers.forget(breaker)


def _memory_controller(spec: object) -> SimpleMemoryController | None:
    """``memory=``: ``True`` (the process-wide controller), ``False``, a controller, or the
    seed's ``MEMORY_CONFIG`` mapping (the process-wide controller, configured with it)."""
    if spec is False:
        return None
    if spec is True:
        return get_memory_controller()
    if isinstance(spec, SimpleMemoryController):
        return spec
    if isinstance(spec, Mapping):
        # Configured in place, not replaced: the caches an app registered on it beforehand
        # (as the docs say to) would stay on a controller nobody starts.
        controller = get_memory_controller()
        controller._reconfigure(spec)
        return controller
    raise ConfigError("memory", spec, "True, False, a SimpleMemoryController or a mapping")


# --- the error-recovery monitor (issue 9) -------------------------------------------------------


@dataclass(slots=True)
class _Monitoring:
    """The monitor ``instrument()`` runs, its telemetry, whether it started it and whether
    it is the process-wide monitor it made (closed again by ``uninstrument()``)."""

    monitor: ErrorRecoveryMonitor
    telemetry: MonitorTelemetry | None
    started: bool
    owned: bool

    def stop(self) -> None:
        try:
            if self.telemetry is not None:
                self.telemetry.uninstall()
            if self.owned and self.started:
                self.monitor.close()  # stops listening to the bus too
            elif self.started:
                self.monitor.stop(timeout=1.0)
        except Exception as error:  # noqa: BLE001
            report_internal_error("instrumentor.monitor", error)


def _monitor_spec(
    spec: object,
) -> ErrorRecoveryMonitor | MonitorConfig | Mapping[str, object] | bool:
    """``monitor=``: ``True`` (the process-wide monitor, configured by the
    ``OTEL_PYTHON_RAPTOR_MONITOR_*`` variables over the file's ``[monitor]`` table), ``False``,
    a monitor, a ``MonitorConfig``, or the seed's ``MONITOR_CONFIG`` mapping (over the
    variables and the file). A bad value raises ``ConfigError`` (in ``RaptorConfig.load``,
    before anything changes)."""
    if isinstance(spec, (bool, ErrorRecoveryMonitor, MonitorConfig, Mapping)):
        return spec  # a mapping is checked by ``RaptorConfig.load``, over the other layers
    raise ConfigError(
        "monitor", spec, "True, False, an ErrorRecoveryMonitor, a MonitorConfig or a mapping"
    )


_DEFAULT_MONITOR_CONFIG: Final = MonitorConfig()


def _start_monitor(
    spec: ErrorRecoveryMonitor | MonitorConfig | Mapping[str, object] | bool,
    raptor_config: RaptorConfig,
    logger_provider: Any,
    meter_provider: Any,
) -> _Monitoring | None:
    """Start the monitor ``spec`` names and its telemetry; ``None`` when off or broken."""
    if spec is False:
        return None
    try:
        owned = not isinstance(spec, ErrorRecoveryMonitor)
        if isinstance(spec, ErrorRecoveryMonitor):
            monitor = spec
            set_error_recovery_monitor(monitor)
        else:
            # ``monitor=`` (a MonitorConfig or a mapping) went into ``RaptorConfig.load``.
            config = raptor_config.monitor
            if not config.enabled:
                return None
            # Nothing set anywhere (kwarg, environment, file): a monitor the app configured
            # in code keeps its config rather than being reset to the defaults.
            monitor = process_monitor(None if config == _DEFAULT_MONITOR_CONFIG else config)
        started = not monitor.running
        monitor.start()
    except Exception as error:  # noqa: BLE001 - resilience works without the monitor
        report_internal_error("instrumentor.monitor", error)
        return None
    try:
        telemetry = MonitorTelemetry(
            monitor,
            logger_provider=logger_provider,
            meter_provider=meter_provider,
            max_services=raptor_config.max_services,
        )
        telemetry.install()  # never raises
    except Exception as error:  # noqa: BLE001 - the monitor works without its telemetry
        report_internal_error("instrumentor.monitor_telemetry", error)
        return _Monitoring(monitor, None, started, owned)
    return _Monitoring(monitor, telemetry, started, owned)


# SDK tracer providers that already carry our span processor (an SDK provider cannot remove a
# processor, so instrument -> uninstrument -> instrument must not add a second one).
_providers_with_resend_count: weakref.WeakSet[Any] = weakref.WeakSet()


def _add_resend_count_processor(tracer_provider: Any) -> None:
    """Make the contrib HTTP client spans of resends carry ``http.request.resend_count``.

    The contrib requests/httpx instrumentations do not set it themselves; a span processor is
    the only way to reach their spans. Only an SDK provider (one with ``add_span_processor``)
    can take it; with the global provider, it is the one set when ``instrument()`` runs (under
    ``opentelemetry-instrument``, the SDK configurator sets it first). After ``uninstrument``
    the processor stays but does nothing: it only acts while a raptor resend is in flight.
    """
    try:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        add = getattr(provider, "add_span_processor", None)
        if add is None or provider in _providers_with_resend_count:
            return
        add(ResendCountSpanProcessor())
        _providers_with_resend_count.add(provider)
    except Exception as error:  # noqa: BLE001 - telemetry detail: never stop the app
        report_internal_error("instrumentor.resend_count", error)


def _install_sink(
    runtime: Runtime, config: RaptorConfig, tracer_provider: Any, meter_provider: Any
) -> TelemetrySink | None:
    try:
        sink = TelemetrySink(
            runtime=runtime,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            max_services=config.max_services,
            max_breakers=config.max_services,
        )
        sink.install()
    except Exception as error:  # noqa: BLE001 - resilience still works without telemetry
        report_internal_error("instrumentor.telemetry", error)
        return None
    return sink


def _load_integration(name: str, target: str) -> Integration | None:
    """Import and instantiate one integration (not its library); ``None`` when its library is
    not installed or the integration fails to load."""
    try:
        module_name, _, class_name = target.partition(":")
        integration: Integration = getattr(importlib.import_module(module_name), class_name)()
        if not _importable(integration.library):
            _logger.debug("otel_raptor: %s is not installed; skipping its integration", name)
            return None
    except Exception as error:  # noqa: BLE001 - one broken integration must not stop the rest
        report_internal_error(f"instrumentor.load {name}", error)
        return None
    return integration


def _install_integration(integration: Integration, settings: IntegrationSettings) -> bool:
    """Install one integration; ``False`` (reported, and undone) when it failed."""
    try:
        # Imported already, but perhaps still executing in another thread: wait for it.
        importlib.import_module(integration.library)
        integration.install(settings)
    except Exception as error:  # noqa: BLE001 - one broken integration must not stop the rest
        report_internal_error(f"instrumentor.install {integration.name}", error)
        _uninstall_integration(integration)  # undo whatever it did before failing
        return False
    return True


def _uninstall_integration(integration: Integration) -> None:
    try:
        integration.uninstall()
    except Exception as error:  # noqa: BLE001 - uninstall the others regardless
        report_internal_error(f"instrumentor.uninstall {integration.name}", error)


def _library_imported(module: ModuleType) -> None:
    """The post-import hook: runs inside the app's ``import`` of a library, which an exception
    here would fail, so it never raises."""
    try:
        library = module.__name__
        with _deferred_box.lock:
            _watched.discard(library)
        RaptorInstrumentor()._install_deferred(library)
    except Exception as error:  # noqa: BLE001 - never break the app's import
        report_internal_error("instrumentor.deferred_install", error)


def _importable(library: str) -> bool:
    """Whether ``library`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


register_lock(RaptorInstrumentor, "_lock")
