from __future__ import annotations

import asyncio
import asyncio.tasks
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_raptor import ErrorCategory, RaptorInstrumentor, RetryPolicy, resilient
from otel_raptor import environment_variables as ev
from otel_raptor.config import RaptorConfig
from otel_raptor.core.events import ErrorClassified, Event
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.asyncio import AsyncioIntegration
from otel_raptor.runtime import safety
from otel_raptor.runtime.state import Runtime, set_runtime

ORIGINAL_WAIT_FOR = asyncio.wait_for
ORIGINAL_HANDLER = vars(asyncio.BaseEventLoop)["call_exception_handler"]
ORIGINAL_AEXIT = (
    vars(asyncio.timeouts.Timeout)["__aexit__"] if sys.version_info >= (3, 11) else None
)


class Recorder:
    def __init__(self, runtime: Runtime) -> None:
        self.events: list[Event] = []
        runtime.bus.subscribe(self.events.append)

    def classified(self, service: str = "asyncio") -> list[ErrorClassified]:
        return [e for e in self.events if isinstance(e, ErrorClassified) and e.service == service]


@pytest.fixture
def runtime() -> Runtime:
    return Runtime()


@pytest.fixture
def recorder(runtime: Runtime) -> Recorder:
    return Recorder(runtime)


@pytest.fixture
def integration(runtime: Runtime) -> Iterator[AsyncioIntegration]:
    """Installed with the defaults: timeouts are not recorded."""
    subject = AsyncioIntegration()
    subject.install(IntegrationSettings(runtime=runtime, config=RaptorConfig()))
    yield subject
    subject.uninstall()
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR


def timing(runtime: Runtime) -> IntegrationSettings:
    return IntegrationSettings(runtime=runtime, config=RaptorConfig(asyncio_timeouts=True))


@pytest.fixture
def timed(runtime: Runtime) -> Iterator[AsyncioIntegration]:
    """Installed with ``asyncio_timeouts=True``."""
    subject = AsyncioIntegration()
    subject.install(timing(runtime))
    yield subject
    subject.uninstall()
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR
    assert vars(asyncio.BaseEventLoop)["call_exception_handler"] is ORIGINAL_HANDLER
    if ORIGINAL_AEXIT is not None:
        assert vars(asyncio.timeouts.Timeout)["__aexit__"] is ORIGINAL_AEXIT


def run(coro: Any) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# --- the loop exception handler ------------------------------------------------------------------


@pytest.mark.usefixtures("integration")
def test_an_exception_in_a_callback_is_recorded_and_the_users_handler_still_runs(
    recorder: Recorder,
) -> None:
    seen: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: seen.append(context))

        def boom() -> None:
            raise ConnectionResetError("peer went away")

        loop.call_soon(boom)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    run(main())
    assert len(seen) == 1
    assert isinstance(seen[0]["exception"], ConnectionResetError)
    [event] = recorder.classified()
    assert event.classification.category is ErrorCategory.CONNECTION
    assert event.classification.error_type == "ConnectionResetError"
    assert event.attempt == 1


@pytest.mark.usefixtures("integration")
def test_a_task_exception_never_retrieved_is_recorded_and_the_default_handler_logs_it(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise TimeoutError("slow")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()

    run(main())
    [event] = recorder.classified()
    assert event.classification.category is ErrorCategory.TIMEOUT
    assert "Task exception was never retrieved" in caplog.text  # the default handler ran


def test_a_loop_created_before_install_is_covered(runtime: Runtime, recorder: Recorder) -> None:
    loop = asyncio.new_event_loop()
    subject = AsyncioIntegration()
    subject.install(IntegrationSettings(runtime=runtime, config=RaptorConfig()))
    try:
        loop.set_exception_handler(lambda loop, context: None)
        loop.call_exception_handler({"message": "x", "exception": BrokenPipeError()})
        loop.call_exception_handler({"message": "no exception here"})
    finally:
        subject.uninstall()
        loop.close()
    assert [e.classification.error_type for e in recorder.classified()] == ["BrokenPipeError"]


def test_our_own_failure_never_reaches_the_app(
    timed: AsyncioIntegration,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    safety._reset_for_tests()

    # Our publish is broken below, so no event may reach the bus. (A subscriber that raises
    # would prove nothing: the bus swallows subscriber errors.)
    published: list[Event] = []
    runtime.bus.subscribe(published.append)

    def broken_publish(exc: BaseException) -> None:
        raise RuntimeError("our bug")

    monkeypatch.setattr(timed, "_publish", broken_publish)
    seen: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda loop, context: seen.append(context["message"]))
        loop.call_exception_handler({"message": "m", "exception": ValueError()})

        async def times_out() -> None:
            await asyncio.wait_for(asyncio.sleep(1), 0.001)

        with pytest.raises(asyncio.TimeoutError):
            loop.run_until_complete(times_out())
    finally:
        loop.close()
    assert seen == ["m"]
    assert published == []
    assert "asyncio.exception_handler" in caplog.text
    assert "asyncio.timeout" in caplog.text


# --- timeouts: not recorded by default -----------------------------------------------------------


@pytest.mark.usefixtures("integration")
def test_by_default_a_handled_timeout_is_not_recorded_and_asyncio_is_untouched(
    recorder: Recorder,
) -> None:
    # Only the loop's exception handler is hooked: wait_for and Timeout are asyncio's own.
    assert vars(asyncio.BaseEventLoop)["call_exception_handler"] is not ORIGINAL_HANDLER
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR
    assert asyncio.tasks.wait_for is ORIGINAL_WAIT_FOR
    if ORIGINAL_AEXIT is not None:
        assert vars(asyncio.timeouts.Timeout)["__aexit__"] is ORIGINAL_AEXIT

    async def main() -> int:
        # The idiomatic polling loop: a timeout is its normal path, not a failure.
        queue: asyncio.Queue[int] = asyncio.Queue()
        idle = 0
        for _ in range(5):
            try:
                await asyncio.wait_for(queue.get(), 0.001)
            except TimeoutError:
                idle += 1
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
        return idle

    assert run(main()) == 5
    assert recorder.classified() == []


@pytest.mark.usefixtures("integration")
def test_by_default_a_timeout_nothing_retrieves_is_still_recorded_once(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def polls() -> None:
        await asyncio.wait_for(asyncio.sleep(1), 0.001)  # nothing handles it

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(polls())
        while not task.done():
            await asyncio.sleep(0.001)
        del task
        gc.collect()

    run(main())
    [event] = recorder.classified()
    assert event.classification.category is ErrorCategory.TIMEOUT
    assert "Task exception was never retrieved" in caplog.text


# --- timeouts, with asyncio_timeouts=True --------------------------------------------------------


@pytest.mark.usefixtures("timed")
def test_a_wait_for_timeout_is_recorded_and_re_raised_unchanged(recorder: Recorder) -> None:
    caught: list[BaseException] = []

    async def main() -> None:
        try:
            await asyncio.wait_for(asyncio.sleep(1), 0.001)
        except TimeoutError as exc:
            caught.append(exc)
        assert await asyncio.wait_for(asyncio.sleep(0, "done"), 1) == "done"

    run(main())
    assert len(caught) == 1
    [event] = recorder.classified()
    assert event.classification.category is ErrorCategory.TIMEOUT


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
@pytest.mark.usefixtures("timed")
def test_an_asyncio_timeout_is_recorded_once(recorder: Recorder) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(loop.time() + 0.001):
                await asyncio.sleep(1)
        async with asyncio.timeout(1):  # no timeout, nothing recorded
            await asyncio.sleep(0)

    run(main())
    assert [e.classification.category for e in recorder.classified()] == [ErrorCategory.TIMEOUT] * 2


@pytest.mark.parametrize("asyncio_timeouts", [True, False])
def test_a_guarded_attempt_timeout_is_left_to_the_guard(
    runtime: Runtime, recorder: Recorder, asyncio_timeouts: bool
) -> None:
    subject = AsyncioIntegration()
    config = RaptorConfig(asyncio_timeouts=asyncio_timeouts)
    subject.install(IntegrationSettings(runtime=runtime, config=config))

    @resilient(
        service="slow-service",
        retry=RetryPolicy(max_retries=1, base_delay=0.0, attempt_timeout=0.001),
        runtime=runtime,
    )
    async def slow() -> None:
        await asyncio.sleep(1)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await slow()

    try:
        run(main())
    finally:
        subject.uninstall()
    assert recorder.classified() == []
    assert len(recorder.classified("slow-service")) == 2


def test_nothing_is_recorded_without_subscribers(runtime: Runtime) -> None:
    subject = AsyncioIntegration()
    subject.install(timing(runtime))
    try:

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.sleep(1), 0.001)

        run(main())
    finally:
        subject.uninstall()
    assert not runtime.bus.has_subscribers


# --- install / uninstall -------------------------------------------------------------------------


def test_uninstall_restores_every_original(runtime: Runtime) -> None:
    subject = AsyncioIntegration()
    settings = timing(runtime)
    subject.install(settings)
    assert asyncio.wait_for is not ORIGINAL_WAIT_FOR
    assert asyncio.tasks.wait_for is asyncio.wait_for
    assert asyncio.wait_for.__wrapped__ is ORIGINAL_WAIT_FOR  # type: ignore[attr-defined]
    assert asyncio.iscoroutinefunction(asyncio.wait_for)
    subject.install(settings)  # installing twice does not wrap twice
    assert asyncio.wait_for.__wrapped__ is ORIGINAL_WAIT_FOR  # type: ignore[attr-defined]
    subject.uninstall()
    subject.uninstall()  # and uninstalling twice is harmless
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR
    assert asyncio.tasks.wait_for is ORIGINAL_WAIT_FOR
    assert vars(asyncio.BaseEventLoop)["call_exception_handler"] is ORIGINAL_HANDLER
    if ORIGINAL_AEXIT is not None:
        assert vars(asyncio.timeouts.Timeout)["__aexit__"] is ORIGINAL_AEXIT
    subject.install(settings)  # install → uninstall → install works
    assert asyncio.wait_for is not ORIGINAL_WAIT_FOR
    subject.uninstall()
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR
    # Each install reads the config afresh: reinstalled with the defaults, no timeout hook.
    subject.install(IntegrationSettings(runtime=runtime, config=RaptorConfig()))
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR
    subject.uninstall()
    assert vars(asyncio.BaseEventLoop)["call_exception_handler"] is ORIGINAL_HANDLER


def test_a_wrapper_installed_over_ours_is_kept_and_ours_passes_through(
    runtime: Runtime, recorder: Recorder
) -> None:
    subject = AsyncioIntegration()
    subject.install(timing(runtime))
    ours = asyncio.wait_for

    async def theirs(*args: Any, **kwargs: Any) -> Any:
        return await ours(*args, **kwargs)

    asyncio.wait_for = theirs
    try:
        subject.uninstall()
        assert asyncio.wait_for is theirs

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.sleep(1), 0.001)

        run(main())
        assert recorder.classified() == []
    finally:
        asyncio.wait_for = ORIGINAL_WAIT_FOR
    assert asyncio.tasks.wait_for is ORIGINAL_WAIT_FOR


def test_from_import_before_install_is_not_affected(runtime: Runtime, recorder: Recorder) -> None:
    from asyncio import wait_for  # bound before the hook exists

    subject = AsyncioIntegration()
    subject.install(timing(runtime))
    try:

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await wait_for(asyncio.sleep(1), 0.001)

        run(main())
    finally:
        subject.uninstall()
    # On 3.12+ wait_for is built on asyncio.timeout, whose hook still sees it.
    expected = 1 if sys.version_info >= (3, 12) else 0
    assert len(recorder.classified()) == expected


# --- through the instrumentor --------------------------------------------------------------------


def errors_by_service(reader: InMemoryMetricReader) -> dict[str, int]:
    """``raptor.errors`` summed by ``raptor.service``."""
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "raptor.errors":
                    continue
                for point in metric.data.data_points:
                    service = str((point.attributes or {}).get("raptor.service"))
                    value = int(point.value)  # type: ignore[union-attr]  # a counter's points
                    counts[service] = counts.get(service, 0) + value
    return counts


@pytest.mark.parametrize(("variable", "recorded"), [(None, 0), ("true", 3), ("maybe", 0)])
def test_an_idle_polling_consumer_counts_no_errors_unless_opted_in(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, recorded: int
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_PYTHON_RAPTOR_"):
            monkeypatch.delenv(name)
    if variable is not None:
        monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS, variable)
    previous = set_runtime(Runtime())
    reader = InMemoryMetricReader()
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(
        meter_provider=MeterProvider(metric_readers=[reader]),
        integrations=["asyncio"],
        monitor=False,
        memory=False,
    )
    try:
        assert instrumentor.installed_integrations == ("asyncio",)
        assert (asyncio.wait_for is ORIGINAL_WAIT_FOR) is (recorded == 0)

        async def consumer() -> int:
            queue: asyncio.Queue[int] = asyncio.Queue()
            idle = 0
            for _ in range(3):
                try:
                    await asyncio.wait_for(queue.get(), 0.001)
                except TimeoutError:
                    idle += 1  # nothing queued yet: this loop's normal path
            return idle

        assert run(consumer()) == 3
        assert errors_by_service(reader).get("asyncio", 0) == recorded
    finally:
        instrumentor.uninstrument()
        set_runtime(previous)
    assert asyncio.wait_for is ORIGINAL_WAIT_FOR


# --- @resilient on coroutine functions, through a real loop --------------------------------------


def test_cancellation_propagates_at_once_and_is_never_retried(runtime: Runtime) -> None:
    calls = 0

    @resilient(retry=RetryPolicy(max_retries=5, base_delay=0.0), runtime=runtime, service="svc")
    async def waits_forever(started: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.get_running_loop().create_task(waits_forever(started))
        await started.wait()
        task.cancel()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loop.time() - began < 0.5
        assert task.cancelled()

    run(main())
    assert calls == 1


def test_a_coroutine_raising_cancelled_error_is_not_retried(runtime: Runtime) -> None:
    calls = 0

    @resilient(retry=RetryPolicy(max_retries=5, base_delay=0.0), runtime=runtime, service="svc")
    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await cancelled()

    run(main())
    assert calls == 1


def test_cancelling_during_the_backoff_stops_at_once(runtime: Runtime) -> None:
    calls = 0

    @resilient(retry=RetryPolicy(max_retries=5, base_delay=30.0, jitter="none"), runtime=runtime)
    async def flaky(failed: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        failed.set()
        raise ConnectionResetError

    async def main() -> None:
        failed = asyncio.Event()
        task = asyncio.get_running_loop().create_task(flaky(failed))
        await failed.wait()
        await asyncio.sleep(0.01)  # now sleeping 30 s before the retry
        loop = asyncio.get_running_loop()
        began = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loop.time() - began < 0.5

    run(main())
    assert calls == 1


def test_other_tasks_keep_running_while_a_guarded_call_backs_off(runtime: Runtime) -> None:
    attempts = 0

    @resilient(retry=RetryPolicy(max_retries=1, base_delay=0.05, jitter="none"), runtime=runtime)
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionResetError
        return "ok"

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.get_running_loop().create_task(ticker())
        result = await flaky()
        tick_task.cancel()
        return result, ticks

    result, ticks = run(main())
    assert (result, attempts) == ("ok", 2)
    assert ticks >= 3  # the loop was not blocked during the 50 ms backoff
