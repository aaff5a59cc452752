"""Fork safety: every lock, thread and singleton of otel_raptor works in a forked child, even
when other threads held our locks (or were busy inside them) at the moment of the fork.

Each scenario runs in a fresh interpreter (a subprocess), forks there, and exercises the child
under an alarm: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_script(script: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


HELD_LOCKS = """
import os, signal, sys, threading, time, traceback, warnings
warnings.simplefilter("ignore")
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from otel_raptor import ErrorCategory, Guard, RaptorInstrumentor, RetryPolicy, register_rule
from otel_raptor.core.classify import Rule
from otel_raptor.integrations._http import StaleEntry
from otel_raptor.runtime import safety, state
from otel_raptor.runtime.keys import private_digest
from otel_raptor.runtime.memory import get_memory_controller
from otel_raptor.integrations import requests as raptor_requests

reader = InMemoryMetricReader()
RaptorInstrumentor().instrument(
    tracer_provider=TracerProvider(), meter_provider=MeterProvider(metric_readers=[reader])
)
runtime = state.get_runtime()
guard = Guard("svc", retry=RetryPolicy(max_retries=2, base_delay=0.0), runtime=runtime)
guard.call(lambda: 1)
downstream = runtime.downstream("svc")
breaker = guard.breaker
controller = get_memory_controller()
assert controller.running
installed = raptor_requests._installed
monitor = RaptorInstrumentor().error_recovery_monitor
assert monitor is not None and monitor.running
digest_in_parent = private_digest("secret")

# Threads that hold our locks across the fork: the before-fork hook waits for each at most
# 0.5 s, then gives up on it; the child must get fresh ones either way.
held = [
    runtime._lock,
    downstream._lock,
    breaker._lock,
    runtime.bus._lock,
    safety._box.lock,
    installed.stale._lock,
    controller._lock,
    monitor._lock,
]
ready, release = threading.Barrier(len(held) + 1), threading.Event()

def hold(lock):
    with lock:
        ready.wait()
        release.wait()

for lock in held:
    threading.Thread(target=hold, args=(lock,), daemon=True).start()
ready.wait()

pid = os.fork()
if pid == 0:
    signal.alarm(30)
    try:
        # Every component works, and no lock is left held by a thread that is gone.
        assert all(not lock.locked() for lock in (
            runtime._lock, downstream._lock, breaker._lock, runtime.bus._lock,
            safety._box.lock, installed.stale._lock, controller._lock, monitor._lock,
        ))
        assert guard.call(lambda: 41) + 1 == 42
        attempts = []
        def flaky():
            attempts.append(1)
            if len(attempts) < 2:
                raise ConnectionResetError(104, "reset")
            return "recovered"
        assert guard.call(flaky) == "recovered"
        assert runtime.note_failure("svc", "timeout") >= 1
        assert runtime.withdraw(downstream, runtime.clock.monotonic()) in (True, False)
        safety.report_internal_error("fork.test", RuntimeError("logged, not raised"))
        register_rule(Rule(name="fork", category=ErrorCategory.QUERY, message="forked"))
        installed.stale.put(b"k", StaleEntry(200, "OK", (), b"x", None, "http://a/", 0.0))
        assert len(installed.stale) == 1
        reader.collect()
        # Threads and secrets are the child's own.
        assert controller.running, "the memory controller restarts in the child"
        assert monitor.running, "so does the error-recovery monitor"
        monitor.record_recovery_attempt_sync(
            error_type="TimeoutError",
            recovery_time=10.0,
            success=True,
            strategy="retry_with_backoff",
        )
        assert monitor.get_current_metrics()
        assert private_digest("secret") != digest_in_parent
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
release.set()
_, status = os.waitpid(pid, 0)
# The parent's own locks were never touched by the fork.
assert guard.call(lambda: "parent") == "parent"
RaptorInstrumentor().uninstrument()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_threads_hold_our_locks_works() -> None:
    result = run_script(HELD_LOCKS)
    assert result.returncode == 0, result.stderr


BUSY_THREADS = """
import os, signal, sys, threading, traceback, warnings
warnings.simplefilter("ignore")
from otel_raptor import CircuitBreakerConfig, Guard, RetryPolicy
from otel_raptor.runtime.state import Runtime

runtime = Runtime()
guard = Guard(
    "busy",
    retry=RetryPolicy(max_retries=1, base_delay=0.0),
    breaker=CircuitBreakerConfig(window_size=50, minimum_calls=10_000, failure_threshold=10_000),
    runtime=runtime,
)
stop = threading.Event()

def boom():
    raise TimeoutError("slow")

def work():
    # Mutates the breaker window, the budget and the repeat counters as fast as it can.
    n = 0
    while not stop.is_set():
        n += 1
        try:
            guard.call(boom if n % 3 == 0 else (lambda: n))
        except TimeoutError:
            pass

threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
for thread in threads:
    thread.start()
failures = 0
for _ in range(60):
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        try:
            # State forked mid-update by busy threads is whole: the before-fork hook took
            # every lock, so no total is torn.
            window = guard.breaker._core._window
            ring = bytes(window._ring)
            assert window._calls == sum(1 for code in ring if code), (window, ring)
            assert window._failures == sum(1 for code in ring if code in (2, 4)), window
            assert guard.call(lambda: "ok") == "ok"
            runtime.downstream("busy").tokens(runtime.clock.monotonic())
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    failures += os.waitstatus_to_exitcode(status) != 0
stop.set()
sys.exit(1 if failures else 0)
"""


def test_children_forked_from_busy_threads_see_whole_state() -> None:
    result = run_script(BUSY_THREADS)
    assert result.returncode == 0, result.stderr


PROBE_IN_FLIGHT = """
import os, signal, sys, threading, time, traceback
from otel_raptor import CircuitBreakerConfig, CircuitOpenError, CircuitState, Guard
from otel_raptor.runtime.state import Runtime

runtime = Runtime()
guard = Guard(
    "probed",
    retry=0,
    breaker=CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.05, recovery_jitter=0),
    runtime=runtime,
)

def refused():
    raise ConnectionRefusedError(111, "refused")

try:
    guard.call(refused)
except ConnectionRefusedError:
    pass
time.sleep(0.1)
probing, release = threading.Event(), threading.Event()

def probe():
    probing.set()
    release.wait(10)
    return "late"

thread = threading.Thread(target=guard.call, args=(probe,))
thread.start()
probing.wait(10)
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    try:
        # The probe runs in a thread the child does not have: its slot must not stay taken,
        # or the half-open breaker refuses every call of the child for ever.
        assert guard.breaker.state is CircuitState.HALF_OPEN
        assert guard.call(lambda: "ok") == "ok"
        assert guard.call(lambda: "ok") == "ok"
        assert guard.breaker.state is CircuitState.CLOSED
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
_, status = os.waitpid(pid, 0)
release.set()
thread.join()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_probe_in_flight_at_the_fork_does_not_wedge_the_childs_breaker() -> None:
    result = run_script(PROBE_IN_FLIGHT)
    assert result.returncode == 0, result.stderr
