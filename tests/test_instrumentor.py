from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from otel_raptor import ConfigError, RaptorInstrumentor, RetryPolicy, classify
from otel_raptor import environment_variables as ev
from otel_raptor import instrumentor as instrumentor_module
from otel_raptor.core.events import ErrorClassified
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.runtime.state import Runtime, get_runtime
from tests.support.runtime import process_runtime

# --- fake integrations, loaded by "module:Class" like the real ones ------------------------------

calls: list[str] = []
# The library of FakeLater: a module each test writes (see ``later_library``) and imports.
LATER = "raptor_test_later_library"


class _Fake:
    name = ""
    library = "json"  # importable
    fail = False

    def __init__(self) -> None:
        self.settings: IntegrationSettings | None = None

    def install(self, settings: IntegrationSettings) -> None:
        calls.append(f"install {self.name}")
        self.settings = settings
        installed[self.name] = self
        if self.fail:
            raise RuntimeError("boom")

    def uninstall(self) -> None:
        calls.append(f"uninstall {self.name}")


installed: dict[str, _Fake] = {}


class FakeRequests(_Fake):
    name = "requests"


class FakeHttpx(_Fake):
    name = "httpx"


class FakeAsyncio(_Fake):
    name = "asyncio"


class FakeLater(_Fake):
    """An integration whose library the app has not imported yet."""

    name = "later"
    library = LATER


class FakeLaterFailing(FakeLater):
    fail = True


class MissingLibrary(_Fake):
    name = "httpx"
    library = "no_such_library_for_raptor_tests"


class Failing(_Fake):
    name = "httpx"
    fail = True


FAKES = {
    "requests": f"{__name__}:FakeRequests",
    "httpx": f"{__name__}:FakeHttpx",
    "asyncio": f"{__name__}:FakeAsyncio",
}


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    with process_runtime() as fresh:
        yield fresh


@pytest.fixture
def instrumentor(monkeypatch: pytest.MonkeyPatch, runtime: Runtime) -> Iterator[RaptorInstrumentor]:
    for name in list(os.environ):
        if name.startswith("OTEL_PYTHON_RAPTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(instrumentor_module, "INTEGRATIONS", dict(FAKES))
    monkeypatch.setattr(instrumentor_module, "_reported", set())
    calls.clear()
    installed.clear()
    subject = RaptorInstrumentor()
    yield subject
    if subject.is_instrumented_by_opentelemetry:
        subject.uninstrument()


def test_it_is_a_singleton_exported_lazily() -> None:
    import otel_raptor

    assert RaptorInstrumentor() is RaptorInstrumentor()
    assert otel_raptor.RaptorInstrumentor is instrumentor_module.RaptorInstrumentor
    assert RaptorInstrumentor().instrumentation_dependencies() == ()


def test_instrument_uninstrument_instrument(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    instrumentor.instrument()
    assert instrumentor.is_instrumented_by_opentelemetry
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
    settings = installed["requests"].settings
    assert settings is not None
    assert settings.runtime is runtime
    assert settings.config is instrumentor.config
    instrumentor.uninstrument()
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert instrumentor.config is None
    assert instrumentor.installed_integrations == ()
    instrumentor.instrument()
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
    instrumentor.uninstrument()
    assert (
        calls
        == [
            "install requests",
            "install httpx",
            "install asyncio",
            "uninstall asyncio",
            "uninstall httpx",
            "uninstall requests",
        ]
        * 2
    )


def test_instrumenting_twice_installs_once(instrumentor: RaptorInstrumentor) -> None:
    instrumentor.instrument()
    instrumentor.instrument()
    RaptorInstrumentor().instrument(integrations=["requests"])
    assert calls == ["install requests", "install httpx", "install asyncio"]
    # A direct second call of the hook is guarded too.
    instrumentor._instrument()
    assert len(calls) == 3


def test_integrations_are_chosen_by_kwarg(instrumentor: RaptorInstrumentor) -> None:
    instrumentor.instrument(integrations=["asyncio", "requests"])
    assert instrumentor.installed_integrations == ("requests", "asyncio")


def test_integrations_are_chosen_by_env_var(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS, "httpx")
    instrumentor.instrument()
    assert instrumentor.installed_integrations == ("httpx",)
    instrumentor.uninstrument()
    instrumentor.instrument(integrations=["requests"])  # kwargs beat the environment
    assert instrumentor.installed_integrations == ("requests",)


def test_an_integration_whose_library_is_missing_is_skipped(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "httpx", f"{__name__}:MissingLibrary")
    instrumentor.instrument()
    assert instrumentor.installed_integrations == ("requests", "asyncio")
    assert "install httpx" not in calls


def test_a_failing_integration_does_not_stop_the_others(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "httpx", f"{__name__}:Failing")
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "requests", f"{__name__}:Nowhere")
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument()
    assert instrumentor.is_instrumented_by_opentelemetry
    assert instrumentor.installed_integrations == ("asyncio",)
    # The failed one is asked to undo what it did before failing.
    assert calls == ["install httpx", "uninstall httpx", "install asyncio"]
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "instrumentor.install httpx" in messages
    assert "instrumentor.load requests" in messages


@pytest.fixture
def later_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable module not imported yet; its body records its import in ``calls``."""
    source = tmp_path / f"{LATER}.py"
    source.write_text(f"from {__name__} import calls\ncalls.append('import {LATER}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(LATER, None)
    yield source
    sys.modules.pop(LATER, None)


def _import_later() -> object:
    return importlib.import_module(LATER)


def test_an_integration_is_installed_when_the_app_imports_its_library(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch, later_library: Path
) -> None:
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "later", f"{__name__}:FakeLater")
    instrumentor.instrument()
    # instrument() did not import it: the app has not.
    assert LATER not in sys.modules
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
    assert instrumentor.deferred_integrations == ("later",)
    _import_later()
    # Installed by the import itself, after the module's body ran and before it returned.
    assert calls[-2:] == [f"import {LATER}", "install later"]
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio", "later")
    assert instrumentor.deferred_integrations == ()
    assert installed["later"].settings is installed["requests"].settings
    instrumentor.uninstrument()
    assert calls[-4:] == [
        "uninstall later",
        "uninstall asyncio",
        "uninstall httpx",
        "uninstall requests",
    ]


def test_a_library_imported_after_uninstrument_is_left_alone(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch, later_library: Path
) -> None:
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "later", f"{__name__}:FakeLater")
    # Instrument cycles before the import register one hook, and the import installs once.
    for _ in range(3):
        instrumentor.instrument()
        instrumentor.uninstrument()
    assert instrumentor.deferred_integrations == ()
    _import_later()
    assert "install later" not in calls
    sys.modules.pop(LATER)
    instrumentor.instrument()
    _import_later()
    assert calls.count("install later") == 1


def test_a_deferred_install_that_fails_does_not_fail_the_import(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    later_library: Path,
) -> None:
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "later", f"{__name__}:FakeLaterFailing")
    instrumentor.instrument()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        module = _import_later()
    assert module is sys.modules[LATER]
    assert calls[-3:] == [f"import {LATER}", "install later", "uninstall later"]
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
    assert "instrumentor.install later" in " ".join(r.getMessage() for r in caplog.records)


def test_a_library_imported_in_another_thread_while_instrumenting_is_installed_once(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch, later_library: Path
) -> None:
    """The library's import is under way in another thread when ``instrument()`` looks (the
    module is in ``sys.modules``, still executing): the install waits for the import, and
    neither side deadlocks."""
    later_library.write_text(
        f"import time\nfrom {__name__} import calls\ntime.sleep(0.3)\n"
        f"calls.append('import {LATER}')\n"
    )
    monkeypatch.setitem(instrumentor_module.INTEGRATIONS, "later", f"{__name__}:FakeLater")
    importer = threading.Thread(target=_import_later)
    importer.start()
    deadline = time.monotonic() + 5
    while LATER not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.001)
    assert LATER in sys.modules
    instrumentor.instrument()
    importer.join(timeout=5)
    assert not importer.is_alive()
    assert calls.count("install later") == 1
    assert calls.index(f"import {LATER}") < calls.index("install later")
    assert "later" in instrumentor.installed_integrations


def test_a_bad_kwarg_raises_and_changes_nothing(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    with pytest.raises(ConfigError) as caught:
        instrumentor.instrument(recovery_config={"max_retries": -1})
    assert (caught.value.key, caught.value.value) == ("retry.max_retries", -1)
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert calls == []
    assert not runtime.bus.has_subscribers
    instrumentor.instrument()  # and a good call afterwards works
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")


def test_a_bad_env_value_is_logged_once_and_the_app_starts(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES, "lots")
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY, "0.25")
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument()
        instrumentor.uninstrument()
        instrumentor.instrument()
    warnings = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert warnings == [
        "otel_raptor configuration: invalid OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES='lots': "
        "expected an integer; ignoring it (the file's value or the default applies)"
    ]
    assert instrumentor.config is not None
    assert instrumentor.config.retry.max_retries == RetryPolicy().max_retries  # the default
    assert instrumentor.config.retry.base_delay == 0.25


def test_each_warning_says_what_takes_the_ignored_values_place(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "raptor.toml"
    config_file.write_text("[retry]\nmax_retries = -1\n[breaker]\nthreshold = 3\n", "utf-8")
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_CONFIG, str(config_file))
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRY", "7")
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument()
    warnings = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    endings = sorted(message.rpartition("; ")[2] for message in warnings)
    # The file's value: the default takes its place. A variable or a key raptor does not
    # read: nothing does.
    assert endings == ["ignoring it", "ignoring it", "ignoring it (the default applies)"], warnings
    instrumentor.uninstrument()
    caplog.clear()
    config_file.write_text("[retry\n", encoding="utf-8")  # not TOML: the file as a whole
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument()
    warnings = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert [w.rpartition("; ")[2] for w in warnings if "valid TOML" in w] == [
        "ignoring it (the environment and the defaults apply)"
    ], warnings


def test_an_unknown_keyword_lists_every_keyword_instrument_takes(
    instrumentor: RaptorInstrumentor,
) -> None:
    with pytest.raises(ConfigError) as raised:
        instrumentor.instrument(tracer_provder=None)
    assert "tracer_provider" in raised.value.allowed
    assert "retry_budget_ratio" in raised.value.allowed


def test_the_runtime_is_configured_and_restored(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    before = (runtime.budget_ratio, runtime.budget_min_retries_per_second, runtime.max_services)
    instrumentor.instrument(
        retry_budget={"ratio": 0.5, "min_retries_per_second": 1}, max_services=8
    )
    assert (runtime.budget_ratio, runtime.budget_min_retries_per_second) == (0.5, 1.0)
    assert runtime.max_services == 8
    assert runtime.breakers.max_breakers == 8
    assert runtime.budget("svc").ratio == 0.5
    instrumentor.uninstrument()
    assert (
        runtime.budget_ratio,
        runtime.budget_min_retries_per_second,
        runtime.max_services,
    ) == before
    assert runtime.budget("svc").ratio == before[0]


def test_telemetry_is_installed_with_the_given_providers_and_removed(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    scope_before = runtime.recovery_scope
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    assert runtime.recovery_scope is not scope_before
    event = ErrorClassified("api.example:443", classify(ConnectionResetError()), 1)
    runtime.bus.publish(event)

    def errors_counted() -> float:
        data = reader.get_metrics_data()
        points = [
            point.value
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "raptor.errors"
            for point in metric.data.data_points
        ]
        return sum(points)

    assert errors_counted() == 1
    instrumentor.uninstrument()
    assert runtime.recovery_scope is scope_before
    assert not runtime.bus.has_subscribers
    runtime.bus.publish(event)
    assert errors_counted() == 1


# --- packaging and the launcher ------------------------------------------------------------------


def test_the_entry_point_is_registered() -> None:
    [entry_point] = [
        ep
        for ep in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
        if ep.name == "raptor"
    ]
    assert entry_point.value == "otel_raptor.instrumentor:RaptorInstrumentor"
    assert entry_point.load() is RaptorInstrumentor


def test_no_missing_library_disables_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.instrumentation import dependencies

    distribution = importlib.metadata.distribution("otel-raptor")
    requires = distribution.requires or []
    assert not [r for r in requires if 'extra == "instruments"' in r]
    assert {r.split(";")[0] for r in requires if 'extra == "instruments-any"' in r} == {
        "requests>=2.0",
        "httpx>=0.18",
        "psycopg>=3.1",
        "psycopg2>=2.9",
        "psycopg2-binary>=2.9",
        "asyncpg>=0.29",
        "pymysql>=1.1",
        "redis>=5",
        "otel-raptor",
    }
    assert dependencies.get_dist_dependency_conflicts(distribution) is None

    real_version = dependencies.version

    def version(name: str) -> str:
        if name in {"requests", "httpx", "psycopg", "psycopg2", "psycopg2-binary", "asyncpg"} | {
            "pymysql",
            "redis",
        }:
            raise dependencies.PackageNotFoundError(name)
        return real_version(name)

    # No HTTP or database library installed: the plugin still loads (for asyncio).
    monkeypatch.setattr(dependencies, "version", version)
    assert dependencies.get_dist_dependency_conflicts(distribution) is None


SCRIPT = textwrap.dedent(
    """
    import sys
    from otel_raptor import RaptorInstrumentor
    print("raptor", RaptorInstrumentor().is_instrumented_by_opentelemetry)
    """
)


def _run_under_opentelemetry_instrument(tmp_path: Path, **extra_env: str) -> str:
    launcher = Path(sys.executable).with_name("opentelemetry-instrument")
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "PYTEST_"))
    }
    env.update(
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_PYTHON_RAPTOR_INTEGRATIONS="asyncio",
        **extra_env,
    )
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [str(launcher), sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_opentelemetry_instrument_loads_it(tmp_path: Path) -> None:
    assert _run_under_opentelemetry_instrument(tmp_path) == "raptor True"


def test_disabled_instrumentations_turns_it_off(tmp_path: Path) -> None:
    output = _run_under_opentelemetry_instrument(
        tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="raptor"
    )
    assert output == "raptor False"


def test_importing_the_package_does_not_import_opentelemetry_instrumentation() -> None:
    code = (
        "import sys, otel_raptor; "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('opentelemetry.instrumentation', 'otel_raptor.telemetry', "
        "'otel_raptor.instrumentor'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_process_wide_runtime_is_the_one_configured(instrumentor: RaptorInstrumentor) -> None:
    instrumentor.instrument(max_services=5)
    assert get_runtime().max_services == 5


def test_instrument_runs_the_memory_controller_and_uninstrument_stops_it() -> None:
    from otel_raptor import SimpleMemoryController
    from otel_raptor.instrumentor import RaptorInstrumentor

    controller = SimpleMemoryController(check_interval=60)
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(memory=controller, integrations=[])
    try:
        assert instrumentor.memory_controller is controller
        assert controller.running
    finally:
        instrumentor.uninstrument()
    assert not controller.running
    assert instrumentor.memory_controller is None


def test_a_memory_mapping_configures_the_process_wide_controller_keeping_its_caches() -> None:
    # The docs say: register your caches on get_memory_controller(). An app that did so
    # before instrument(memory={...}) had them on a controller that was then replaced and
    # never started: its caches were never cleaned.
    from otel_raptor.instrumentor import RaptorInstrumentor
    from otel_raptor.runtime import memory as memory_module

    memory_module.set_memory_controller(None)
    controller = memory_module.get_memory_controller()
    cache = {1: 1}
    controller.register_cache("sessions", cache, priority="low")
    instrumentor = RaptorInstrumentor()
    settings = {"check_interval": 60, "thresholds": {"warning": 60, "critical": 80}}
    instrumentor.instrument(memory=settings, integrations=[], monitor=False)
    try:
        assert instrumentor.memory_controller is controller
        assert memory_module.get_memory_controller() is controller
        assert controller.running
        assert controller.options.check_interval == 60
        assert controller.options.thresholds == (60, 80, 95)
        controller.cleanup("critical")
        assert cache == {}
    finally:
        instrumentor.uninstrument()
        memory_module.set_memory_controller(None)
    assert not controller.running


def test_memory_kwarg_is_validated() -> None:
    from otel_raptor import ConfigError
    from otel_raptor.instrumentor import RaptorInstrumentor

    with pytest.raises(ConfigError, match="memory"):
        RaptorInstrumentor().instrument(memory="yes")
    with pytest.raises(ConfigError, match=r"memory\."):
        RaptorInstrumentor().instrument(memory={"cleanup_batch_size": 0})


def test_a_process_psutil_cannot_read_still_gets_instrumented(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # In some sandboxes (no /proc, a seccomp profile) psutil.Process() is refused: the memory
    # controller cannot run there, and the app must start anyway, with everything else on.
    import psutil

    from otel_raptor.instrumentor import RaptorInstrumentor
    from otel_raptor.runtime import memory as memory_module

    def refused(*args: object, **kwargs: object) -> None:
        raise psutil.AccessDenied(pid=None, msg="sandboxed")

    monkeypatch.setattr(memory_module.psutil, "Process", refused)
    memory_module.set_memory_controller(None)  # the next one is made now, and fails
    instrumentor = RaptorInstrumentor()
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument(integrations=[], monitor=False)
    try:
        assert instrumentor.config is not None
        assert instrumentor.memory_controller is None
        assert any("instrumentor.memory" in r.getMessage() for r in caplog.records)
    finally:
        instrumentor.uninstrument()
        memory_module.set_memory_controller(None)


# --- the error-recovery monitor (issue 9) -----------------------------------------------------


def test_instrument_runs_the_monitor_on_the_runtime_and_uninstrument_closes_it(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    from otel_raptor.runtime.monitor import process_monitor

    instrumentor.instrument()
    monitor = instrumentor.error_recovery_monitor
    assert monitor is not None
    assert monitor.runtime is runtime
    assert monitor.running
    assert process_monitor() is monitor  # the process-wide one
    instrumentor.uninstrument()
    assert instrumentor.error_recovery_monitor is None
    assert monitor.closed
    assert not monitor.running
    assert not runtime.bus.has_subscribers


def test_the_apps_monitor_taken_before_instrument_is_configured_not_replaced(
    instrumentor: RaptorInstrumentor, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's pattern: take the process-wide monitor and add a callback, at import
    # time; instrument() runs later, with monitor settings in the environment. The monitor
    # was replaced (and the app's closed): its callback never heard of an alert again.
    from otel_raptor import get_error_recovery_monitor

    monitor = get_error_recovery_monitor()
    heard: list[str] = []
    monitor.add_alert_callback(lambda alert: heard.append(alert.name))
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_ALERT_FOR", "0")
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_EVALUATION_WINDOW", "60")
    instrumentor.instrument()
    try:
        assert instrumentor.error_recovery_monitor is monitor
        assert not monitor.closed
        assert (monitor.config.alert_for, monitor.config.evaluation_window) == (0, 60)
        for _ in range(15):  # 15 failed attempts a minute: RaptorErrorFrequencyHigh
            classified = classify(TimeoutError("slow"))
            runtime.bus.publish(ErrorClassified("api.internal:443", classified, 1))
        assert [alert.name for alert in monitor.get_active_alerts()] == ["RaptorErrorFrequencyHigh"]
        assert heard == ["RaptorErrorFrequencyHigh"]
    finally:
        instrumentor.uninstrument()
        monitor.close()


def test_a_monitor_the_app_configured_in_code_keeps_its_config_when_nothing_else_is_set(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    from otel_raptor import ErrorRecoveryMonitor, MonitorConfig
    from otel_raptor.runtime.monitor import set_error_recovery_monitor

    monitor = ErrorRecoveryMonitor(MonitorConfig(success_rate_warning=90.0), runtime=runtime)
    set_error_recovery_monitor(monitor)
    instrumentor.instrument()  # no monitor kwarg, variable or file
    try:
        assert instrumentor.error_recovery_monitor is monitor
        assert monitor.config.success_rate_warning == 90.0
    finally:
        instrumentor.uninstrument()
        monitor.close()


def test_the_monitor_can_be_turned_off_by_kwarg_or_environment(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch, runtime: Runtime
) -> None:
    instrumentor.instrument(monitor=False)
    assert instrumentor.error_recovery_monitor is None
    instrumentor.uninstrument()
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_ENABLED", "false")
    instrumentor.instrument()
    assert instrumentor.error_recovery_monitor is None


def test_monitor_settings_come_from_the_kwarg_over_the_environment(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_ALERT_COOLDOWN", "30")
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL", "soon")
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_MIN_RECOVERIES", "50")
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument(monitor={"min_recoveries": 5})
    monitor = instrumentor.error_recovery_monitor
    assert monitor is not None
    assert monitor.config.alert_cooldown == 30  # the environment
    assert monitor.config.min_recoveries == 5  # the kwarg wins
    assert monitor.config.report_interval == 3600  # a bad value keeps its default...
    logged = [r.getMessage() for r in caplog.records]
    assert sum("OTEL_PYTHON_RAPTOR_MONITOR_REPORT_INTERVAL" in m for m in logged) == 1  # ...once


def test_a_bad_monitor_kwarg_raises_before_anything_changes(
    instrumentor: RaptorInstrumentor,
) -> None:
    with pytest.raises(ConfigError, match=r"monitor\.alert_cooldwn"):
        instrumentor.instrument(monitor={"alert_cooldwn": 5})
    assert not instrumentor.is_instrumented_by_opentelemetry
    with pytest.raises(ConfigError, match="monitor"):
        instrumentor.instrument(monitor="yes")


def test_the_monitor_logs_through_the_given_logger_provider(
    instrumentor: RaptorInstrumentor, runtime: Runtime
) -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import (
        InMemoryLogRecordExporter,
        SimpleLogRecordProcessor,
    )

    from otel_raptor import ErrorRecoveryMonitor

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    mine = ErrorRecoveryMonitor({"alert_for": 0}, runtime=runtime, memory_reader=lambda: 0.95)
    instrumentor.instrument(monitor=mine, logger_provider=provider)
    assert instrumentor.error_recovery_monitor is mine
    [alert] = mine.get_active_alerts()
    [record] = exporter.get_finished_logs()
    assert record.log_record.event_name == "raptor.alert.firing"
    assert record.log_record.attributes is not None
    assert record.log_record.attributes["raptor.alert.name"] == alert.name
    instrumentor.uninstrument()
    assert not mine.closed  # the caller's monitor: stopped, not closed
    mine.close()


# --- environment and file values never stop instrument() (rule 3) ------------------------------


def test_environment_and_file_monitor_values_that_contradict_do_not_raise(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    path = tmp_path / "raptor.toml"
    path.write_text("max_services = 50\n[monitor]\nreport_interval = 7200\n")
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_CONFIG, str(path))
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_METRICS_RETENTION", "3600")
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument()  # used to raise ConfigError
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
    config = instrumentor.config
    assert config is not None
    assert config.max_services == 50  # the rest of the file applies
    assert (config.monitor.metrics_retention, config.monitor.report_interval) == (3600, 3600)
    warnings = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{path}:monitor.report_interval=7200" in warnings[0]


def test_partial_mappings_in_code_are_merged_over_the_environment_first(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY, "1000")
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_RECOVERY_TIME_CRITICAL", "30")
    instrumentor.instrument(retry={"base_delay": 500}, monitor={"recovery_time_warning": 20})
    config = instrumentor.config
    assert config is not None
    assert (config.retry.base_delay, config.retry.max_delay) == (500, 1000)
    monitor = instrumentor.error_recovery_monitor
    assert monitor is not None
    assert (monitor.config.recovery_time_warning, monitor.config.recovery_time_critical) == (20, 30)


def test_a_code_value_that_fits_with_nothing_left_still_raises(
    instrumentor: RaptorInstrumentor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "raptor.toml"
    path.write_text("[retry]\nmax_delay = 100.0\n")
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_CONFIG, str(path))
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES, "50")
    with pytest.raises(ConfigError) as caught:
        instrumentor.instrument(retry={"base_delay": 500})
    assert (caught.value.key, caught.value.value) == ("retry.base_delay", 500)
    assert not instrumentor.is_instrumented_by_opentelemetry
    with pytest.raises(ConfigError, match=r"monitor\.recovery_time_warning"):
        instrumentor.instrument(monitor={"recovery_time_warning": 20})
    assert not instrumentor.is_instrumented_by_opentelemetry


@pytest.mark.parametrize("failure", [RuntimeError("bug"), ConfigError("x", 1, "y")])
@pytest.mark.parametrize("culprit", ["variable", "file"])
def test_a_loading_bug_drops_only_what_triggers_it(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    failure: Exception,
    culprit: str,
) -> None:
    from otel_raptor.config import RaptorConfig

    path = tmp_path / "raptor.toml"
    path.write_text("[retry]\nmax_retries = 7\n")
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_CONFIG, str(path))
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_MAX_SERVICES, "50")
    monkeypatch.setenv("OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS", "5")
    real = RaptorConfig.load

    def buggy(**arguments: Any) -> RaptorConfig:
        environ = arguments["environ"]
        if culprit == "variable":
            triggered = "OTEL_PYTHON_RAPTOR_MONITOR_TOP_PATTERNS" in environ
        else:
            triggered = ev.OTEL_PYTHON_RAPTOR_CONFIG in environ
        if triggered:
            raise failure
        return real(**arguments)

    monkeypatch.setattr(RaptorConfig, "load", buggy)
    instrumentor.instrument(breaker_key="host")  # used to raise, or to drop every layer
    config = instrumentor.config
    assert config is not None
    assert config.breaker_key == "host"  # the kwargs
    assert config.max_services == 50  # the environment
    # Only what triggered the bug is lost: that variable, or else the file.
    assert config.retry.max_retries == (7 if culprit == "variable" else 4)
    assert config.monitor.top_patterns == (10 if culprit == "variable" else 5)
    assert instrumentor.installed_integrations == ("requests", "httpx", "asyncio")
