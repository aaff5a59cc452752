"""The asyncio integration: unhandled loop exceptions (and, opted in, timeouts) become
classified events.

What it hooks, and why this way:

- ``asyncio.BaseEventLoop.call_exception_handler``, on the class. Every loop derived from
  ``BaseEventLoop`` (the selector and proactor loops, so every loop ``asyncio.run``,
  ``new_event_loop`` or a custom policy creates, including loops that existed before
  instrumentation) reports an unhandled error through this method: a task whose exception
  was never retrieved, an exception in a callback, and so on. The wrapper classifies the
  context's ``exception`` and publishes ``ErrorClassified(service="asyncio")``, then calls
  the original method, which runs the handler set with ``loop.set_exception_handler`` or the
  default one exactly as before. Setting a handler on each loop instead would miss existing
  loops and change what ``loop.get_exception_handler()`` returns. Loops that do not derive
  from ``BaseEventLoop`` (uvloop's) are not covered. This is the only hook by default.

The two below are installed only with ``asyncio_timeouts`` set
(``OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS``). A ``TimeoutError`` leaving ``wait_for`` is usually
no failure: the polling loop ``await asyncio.wait_for(queue.get(), 1.0)`` / ``except
TimeoutError: continue`` (or an idle ``redis.asyncio`` pubsub's ``get_message(timeout=...)``)
times out on its normal path, and recording each would count an idle consumer as a failing
service and fire the error alerts. Without them, a timeout that escapes a task nobody awaits
still reaches the loop's exception handler ("Task exception was never retrieved") and the
hook above records it, and a guarded call's attempt timeout is recorded by its guard; nothing
in ``asyncio`` is replaced, so there is no cost either.

- ``asyncio.wait_for`` (and ``asyncio.tasks.wait_for``): a ``TimeoutError`` leaving it is
  published as a classified timeout and re-raised unchanged. It is looked up as a module
  attribute, so code that ran ``from asyncio import wait_for`` before instrumentation keeps
  the original function and is not recorded (on Python 3.12+, where ``wait_for`` is built on
  ``asyncio.timeout``, the next hook still records it).
- ``asyncio.timeouts.Timeout.__aexit__`` (Python 3.11+), which ``asyncio.timeout`` and
  ``asyncio.timeout_at`` use: likewise.

A timeout is recorded once: the ``Timeout`` inside a hooked ``wait_for`` (3.12+) leaves it to
the ``wait_for`` hook, and a per-attempt timeout of a guarded call (``@resilient``, whose
guard bounds it with ``asyncio.timeout``) is left to the guard, which classifies it for its own
service. ``uninstall()`` puts every original back (``asyncio.wait_for is original``); if
something wrapped our hook meanwhile, the hook is left in place but passes straight through.
Recording never raises into the app: our failures go to ``report_internal_error``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from types import CodeType, FrameType
from typing import Any

from otel_raptor.core.classify import ClassifyContext
from otel_raptor.core.events import ErrorClassified
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.runtime import drive
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import Runtime

__all__ = ["SERVICE", "AsyncioIntegration"]

#: The service name of every event this integration publishes.
SERVICE = "asyncio"


class _Patch:
    """One attribute replaced on a module or class, and how to put it back."""

    __slots__ = ("attribute", "original", "owner", "replacement")

    def __init__(self, owner: Any, attribute: str, original: Any, replacement: Any) -> None:
        self.owner = owner
        self.attribute = attribute
        self.original = original
        self.replacement = replacement

    def apply(self) -> None:
        setattr(self.owner, self.attribute, self.replacement)

    def revert(self) -> None:
        # Only if ours is still the one installed: never drop someone else's wrapper.
        if vars(self.owner).get(self.attribute) is self.replacement:
            setattr(self.owner, self.attribute, self.original)


def _caller_code(frame: FrameType | None) -> CodeType | None:
    back = frame.f_back if frame is not None else None
    return back.f_code if back is not None else None


class AsyncioIntegration:
    """Records unhandled event-loop exceptions, and asyncio timeouts when the config's
    ``asyncio_timeouts`` is set (see the module doc)."""

    name = "asyncio"
    library = "asyncio"

    def __init__(self) -> None:
        self._runtime: Runtime | None = None
        self._patches: list[_Patch] = []
        self._active = False
        self._service = SERVICE
        # Code objects of callers whose timeouts are recorded elsewhere (see module doc).
        self._wait_for_code: CodeType | None = None
        self._wrapper_code: CodeType | None = None
        # The drivers that bound a guarded call's attempt (``asyncio.timeout``, or ``wait_for``).
        self._guard_codes: frozenset[CodeType] = frozenset(
            (drive.run_async.__code__, drive._drive_async.__code__, drive._within.__code__)
        )

    @property
    def installed(self) -> bool:
        return self._active

    def install(self, settings: IntegrationSettings) -> None:
        """Hook the event loop class, and ``wait_for`` and ``Timeout`` when
        ``settings.config.asyncio_timeouts`` is set; a no-op if installed."""
        if self._active:
            return
        import asyncio  # noqa: PLC0415 - the library is imported only when it is hooked

        self._runtime = settings.runtime
        self._service = settings.runtime.service(SERVICE)
        patches: list[_Patch] = []

        loop_class = asyncio.BaseEventLoop
        handler = vars(loop_class)["call_exception_handler"]
        patches.append(
            _Patch(
                loop_class,
                "call_exception_handler",
                handler,
                self._wrap_exception_handler(handler),
            )
        )

        if settings.config.asyncio_timeouts:
            patches.extend(self._timeout_patches())

        self._patches = patches
        self._active = True
        for patch in patches:
            patch.apply()

    def _timeout_patches(self) -> list[_Patch]:
        import asyncio  # noqa: PLC0415
        import asyncio.tasks  # noqa: PLC0415

        patches: list[_Patch] = []
        wait_for = asyncio.wait_for
        wrapped_wait_for = self._wrap_wait_for(wait_for)
        self._wait_for_code = getattr(wait_for, "__code__", None)
        self._wrapper_code = wrapped_wait_for.__code__
        patches.append(_Patch(asyncio, "wait_for", wait_for, wrapped_wait_for))
        if vars(asyncio.tasks).get("wait_for") is wait_for:
            patches.append(_Patch(asyncio.tasks, "wait_for", wait_for, wrapped_wait_for))

        from asyncio import timeouts  # noqa: PLC0415

        aexit = vars(timeouts.Timeout)["__aexit__"]
        patches.append(
            _Patch(timeouts.Timeout, "__aexit__", aexit, self._wrap_timeout_aexit(aexit))
        )
        return patches

    def uninstall(self) -> None:
        """Put every original back; a no-op when not installed."""
        self._active = False
        patches, self._patches = self._patches, []
        for patch in reversed(patches):
            try:
                patch.revert()
            except Exception as error:  # noqa: BLE001 - revert the others regardless
                report_internal_error("asyncio.uninstall", error)

    # --- the hooks ----------------------------------------------------------------------

    def _wrap_exception_handler(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        @functools.wraps(original)
        def call_exception_handler(loop: Any, context: dict[str, Any]) -> Any:
            if integration._active:
                integration._on_loop_exception(context)
            return original(loop, context)

        return call_exception_handler

    def _wrap_wait_for(self, original: Callable[..., Any]) -> Callable[..., Any]:
        import asyncio  # noqa: PLC0415

        integration = self
        timeout_error = asyncio.TimeoutError  # the builtin TimeoutError on 3.11+

        @functools.wraps(original)
        async def wait_for(*args: Any, **kwargs: Any) -> Any:
            try:
                return await original(*args, **kwargs)
            except timeout_error as exc:
                if integration._active:
                    integration._on_timeout(exc, sys._getframe())
                raise

        return wait_for

    def _wrap_timeout_aexit(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        @functools.wraps(original)
        async def __aexit__(timeout: Any, exc_type: Any, exc_val: Any, exc_tb: Any) -> Any:
            try:
                return await original(timeout, exc_type, exc_val, exc_tb)
            except TimeoutError as exc:
                if integration._active:
                    integration._on_timeout(exc, sys._getframe())
                raise

        return __aexit__

    # --- recording (never raises) -------------------------------------------------------

    def _on_loop_exception(self, context: Mapping[str, Any]) -> None:
        try:
            exc = context.get("exception")
            if isinstance(exc, BaseException):
                self._publish(exc)
        except Exception as error:  # noqa: BLE001 - the app's handler must still run
            report_internal_error("asyncio.exception_handler", error)

    def _on_timeout(self, exc: BaseException, frame: FrameType) -> None:
        try:
            caller = _caller_code(frame)
            if caller is None:
                pass
            elif caller in self._guard_codes:
                return  # a guarded call's attempt timeout: the guard records it
            elif caller is self._wait_for_code and _caller_code(frame.f_back) is (
                self._wrapper_code
            ):
                return  # the Timeout inside our wait_for hook (3.12+): recorded there
            self._publish(exc)
        except Exception as error:  # noqa: BLE001 - the timeout must still propagate as is
            report_internal_error("asyncio.timeout", error)

    def _publish(self, exc: BaseException) -> None:
        runtime = self._runtime
        if runtime is None or not runtime.bus.has_subscribers:
            return
        service = self._service
        classification = classify(exc, context=ClassifyContext(service=service))
        runtime.bus.publish(ErrorClassified(service, classification, 1, exc))
