"""Active health checks: close an open breaker when its downstream is back, without waiting
for user traffic to probe it.

A check is a callable that returns whether the downstream is healthy (raising counts as
unhealthy); it must bound its own duration (an HTTP check uses a timeout). One daemon thread
per :class:`HealthChecker` runs the checks of the breakers that are OPEN, each at most every
``health_check_interval`` seconds of its breaker's config, and reports them to the breaker
(``CircuitBreaker.health_check``): ``success_threshold`` passes in a row close it. A closed
breaker is never checked, so a healthy system costs nothing.

The thread starts with the first registered check, stops when the last one is unregistered,
with :meth:`HealthChecker.stop` or at interpreter exit, and restarts in a forked child when it
was running in the parent. At most ``max_checks`` checks are kept (one per breaker;
registering again replaces).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from otel_raptor.core.states import CircuitState
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.clock import SYSTEM_CLOCK, Clock
from otel_raptor.runtime.forksafe import after_fork_in_child, register_lock
from otel_raptor.runtime.safety import report_internal_error

__all__ = ["HealthCheck", "HealthChecker"]

#: A health check: ``True`` when the downstream is healthy. Raising counts as unhealthy.
HealthCheck = Callable[[], bool]

#: How often the thread wakes to see which checks are due (seconds).
TICK_S: Final = 0.5
_OPEN: Final = CircuitState.OPEN


@dataclass(slots=True)
class _Check:
    breaker: CircuitBreaker
    check: HealthCheck
    next_at: float


class HealthChecker:
    """Runs the active health checks of open breakers (see the module docstring)."""

    __slots__ = ("__weakref__", "_checks", "_clock", "_lock", "_max", "_stop", "_thread")

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, max_checks: int = 256) -> None:
        self._clock = clock
        self._max = max_checks
        self._checks: dict[str, _Check] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        register_lock(self, "_lock")
        after_fork_in_child(self, HealthChecker._after_fork_in_child)
        _live.add(self)

    def register(self, breaker: CircuitBreaker, check: HealthCheck) -> bool:
        """Check ``breaker``'s downstream with ``check`` while it is open; ``False`` when the
        checker is full (the breaker then reopens for traffic on its own recovery timeout)."""
        with self._lock:
            if breaker.name not in self._checks and len(self._checks) >= self._max:
                return False
            self._checks[breaker.name] = _Check(breaker, check, -float("inf"))
        self._ensure_running()
        return True

    def unregister(self, breaker: CircuitBreaker, check: HealthCheck | None = None) -> bool:
        """Stop checking ``breaker`` (only if its check is ``check``, when given); ``False``
        when another breaker of its name, or another check, was registered since. The thread
        stops with the last check: nothing is left for it to do."""
        with self._lock:
            entry = self._checks.get(breaker.name)
            if entry is None or entry.breaker is not breaker:
                return False
            if check is not None and entry.check is not check:
                return False
            del self._checks[breaker.name]
            if not self._checks and self._thread is not None:
                # Not joined: a check in flight may take its whole timeout, and the caller
                # (``uninstrument()``) must not wait for it. The loop ends at its next wake.
                self._stop.set()
                self._thread = None
        return True

    def items(self) -> list[tuple[CircuitBreaker, HealthCheck]]:
        """Every registered check with its breaker (a copy)."""
        with self._lock:
            return [(entry.breaker, entry.check) for entry in self._checks.values()]

    def run_due(self) -> int:
        """Run every due check of an open breaker now; how many ran. (The thread calls it;
        tests call it with a fake clock.)"""
        now = self._clock.monotonic()
        with self._lock:
            due = [
                entry
                for entry in self._checks.values()
                if entry.breaker.state is _OPEN
                and entry.next_at <= now
                # Held open by hand (maintenance): its verdict is ignored, so the check would
                # only send requests to a downstream the operator has taken out of traffic.
                and not entry.breaker._core.forced_open
            ]
            for entry in due:
                entry.next_at = now + entry.breaker.config.health_check_interval
        ran = 0
        for entry in due:
            if self._checks.get(entry.breaker.name) is not entry:
                continue  # unregistered while an earlier check of this round ran
            ran += 1
            try:
                passed = _passed(entry.check())
            except Exception:  # noqa: BLE001 - a failing check means unhealthy
                passed = False
            try:
                entry.breaker.health_check(passed=passed)
            except Exception as bug:  # noqa: BLE001
                report_internal_error("health.report", bug)
        return ran

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._checks)

    def _ensure_running(self) -> None:
        if self.running:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._loop, args=(self._stop,), name="otel-raptor-health", daemon=True
            )
            self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            try:
                self.run_due()
            except Exception as bug:  # noqa: BLE001 - the checker must survive our bugs
                report_internal_error("health.loop", bug)

    def _after_fork_in_child(self) -> None:
        was_running = self._thread is not None
        self._thread = None
        self._stop = threading.Event()
        if was_running and self._checks:
            self._ensure_running()


def _passed(result: object) -> bool:
    """Whether a check's result is a pass. An awaitable (a check that is a coroutine
    function in disguise) is truthy but says nothing: it fails, and is closed unawaited."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        _warn_awaitable()
        return False
    return bool(result)


def _warn_awaitable() -> None:
    global _warned_awaitable  # noqa: PLW0603 - said once per process
    if _warned_awaitable:
        return
    _warned_awaitable = True
    logging.getLogger("otel_raptor").warning(
        "otel_raptor: a health check returned an awaitable; checks must be plain functions "
        "returning a bool, so it counts as failing"
    )


_warned_awaitable = False
_live: weakref.WeakSet[HealthChecker] = weakref.WeakSet()


def _stop_all() -> None:
    for checker in list(_live):
        checker.stop(timeout=0.5)


atexit.register(_stop_all)
