"""The ``OTEL_PYTHON_RAPTOR_*`` environment variables, one per knob.

Each is read once, when the instrumentor is instrumented. An empty value counts as unset. A
value that cannot be used is reported once (logger ``otel_raptor``, naming the variable, the
value and what is allowed) and that knob keeps its default: a typo in the environment never
stops the application. ``docs/configuration.md`` lists every variable with its default.

Durations are seconds (decimals allowed). Booleans accept ``true``/``false``, ``1``/``0``,
``yes``/``no``, ``on``/``off`` (any case). Optional durations also accept ``none``.
"""

from __future__ import annotations

__all__ = [
    "OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS",
    "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_RATE_THRESHOLD",
    "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD",
    "OTEL_PYTHON_RAPTOR_BREAKER_HALF_OPEN_MAX_CALLS",
    "OTEL_PYTHON_RAPTOR_BREAKER_KEY",
    "OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS",
    "OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT",
    "OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD",
    "OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT",
    "OTEL_PYTHON_RAPTOR_BREAKER_WINDOW",
    "OTEL_PYTHON_RAPTOR_BREAKER_WINDOW_SIZE",
    "OTEL_PYTHON_RAPTOR_CONFIG",
    "OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH",
    "OTEL_PYTHON_RAPTOR_INTEGRATIONS",
    "OTEL_PYTHON_RAPTOR_MAX_SERVICES",
    "OTEL_PYTHON_RAPTOR_RECOVERY_BACKOFF_MULTIPLIER",
    "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY",
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY",
    "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES",
    "OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT",
    "OTEL_PYTHON_RAPTOR_RETRY_ATTEMPT_TIMEOUT",
    "OTEL_PYTHON_RAPTOR_RETRY_BUDGET_MIN_RETRIES_PER_SECOND",
    "OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO",
    "OTEL_PYTHON_RAPTOR_RETRY_DEADLINE",
    "OTEL_PYTHON_RAPTOR_RETRY_JITTER",
    "OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT",
    "OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT",
]

# --- retries (``RetryPolicy``) ----------------------------------------------------------------

OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES = "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_RETRIES"
"""Retries after the first attempt: an integer >= 0, default ``4``; ``0`` disables retries."""

OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY = "OTEL_PYTHON_RAPTOR_RECOVERY_BASE_DELAY"
"""Backoff before the first retry, seconds >= 0, default ``1.0``."""

OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY = "OTEL_PYTHON_RAPTOR_RECOVERY_MAX_DELAY"
"""Cap of the backoff (before jitter), seconds >= the base delay, default ``300.0``."""

OTEL_PYTHON_RAPTOR_RECOVERY_BACKOFF_MULTIPLIER = "OTEL_PYTHON_RAPTOR_RECOVERY_BACKOFF_MULTIPLIER"
"""Growth of the backoff per retry, a number >= 1, default ``2.0``."""

OTEL_PYTHON_RAPTOR_RETRY_JITTER = "OTEL_PYTHON_RAPTOR_RETRY_JITTER"
"""How the backoff is randomised: ``full`` (default), ``equal`` or ``none``."""

OTEL_PYTHON_RAPTOR_RETRY_DEADLINE = "OTEL_PYTHON_RAPTOR_RETRY_DEADLINE"
"""Overall limit of one logical call, retries included, seconds > 0 or ``none`` (default)."""

OTEL_PYTHON_RAPTOR_RETRY_ATTEMPT_TIMEOUT = "OTEL_PYTHON_RAPTOR_RETRY_ATTEMPT_TIMEOUT"
"""Timeout of each attempt, seconds > 0 or ``none`` (default)."""

OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT = "OTEL_PYTHON_RAPTOR_RETRY_NON_IDEMPOTENT"
"""Also retry POST/PATCH without an ``Idempotency-Key`` header: a boolean, default ``false``."""

# --- circuit breakers (``CircuitBreakerConfig``) ----------------------------------------------

OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD = "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_THRESHOLD"
"""Failures in a row that open a breaker while its window holds fewer than ``minimum_calls``
calls (with more history a run must reach ``minimum_calls``): an integer >= 1, default ``5``."""

OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT = "OTEL_PYTHON_RAPTOR_BREAKER_RECOVERY_TIMEOUT"
"""Seconds a breaker stays open before a probe, >= 0, default ``60.0``."""

OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD = "OTEL_PYTHON_RAPTOR_BREAKER_SUCCESS_THRESHOLD"
"""Probe successes that close a half-open breaker: an integer >= 1, default ``2``."""

OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT = "OTEL_PYTHON_RAPTOR_BREAKER_TIMEOUT"
"""The seed's name for the request timeout (``CIRCUIT_BREAKER_CONFIG['timeout']``), seconds
> 0: used when ``OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT`` is not set. No breaker reads it."""

OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT = "OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT"
"""Timeout applied to a request whose caller set none, seconds > 0 or ``none`` (the library's
own default), default ``30.0``."""

OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT = "OTEL_PYTHON_RAPTOR_STATEMENT_TIMEOUT"
"""Statement timeout the database integrations set on a connection where neither the
application nor the server set one, seconds >= 0, default ``30.0``; ``0`` turns it off."""

OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_RATE_THRESHOLD = (
    "OTEL_PYTHON_RAPTOR_BREAKER_FAILURE_RATE_THRESHOLD"
)
"""Failure rate in the window that opens a breaker, in (0, 1], default ``0.5``."""

OTEL_PYTHON_RAPTOR_BREAKER_WINDOW = "OTEL_PYTHON_RAPTOR_BREAKER_WINDOW"
"""Kind of the failure-rate window: ``count`` (default, last N calls) or ``time`` (last N s)."""

OTEL_PYTHON_RAPTOR_BREAKER_WINDOW_SIZE = "OTEL_PYTHON_RAPTOR_BREAKER_WINDOW_SIZE"
"""Calls (or seconds) in the failure-rate window: an integer in [1, 1000000], default ``100``."""

OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS = "OTEL_PYTHON_RAPTOR_BREAKER_MINIMUM_CALLS"
"""Calls in the window before the rate rule applies, and the run of failures that opens a
breaker at any volume: an integer >= 1, default ``20``."""

OTEL_PYTHON_RAPTOR_BREAKER_HALF_OPEN_MAX_CALLS = "OTEL_PYTHON_RAPTOR_BREAKER_HALF_OPEN_MAX_CALLS"
"""Probes in flight at once in a half-open breaker: an integer >= 1, default ``1``."""

OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH = "OTEL_PYTHON_RAPTOR_HEALTH_CHECK_PATH"
"""A path (``/health``) that raptor GETs on an HTTP origin whose breaker is open, every
``health_check_interval``; ``success_threshold`` answers below 400 in a row close the breaker
without waiting for user traffic. Default ``none`` (off)."""

OTEL_PYTHON_RAPTOR_BREAKER_KEY = "OTEL_PYTHON_RAPTOR_BREAKER_KEY"
"""What one breaker covers: ``origin`` (default, ``scheme://host:port``) or ``host``."""

# --- retry budget and cardinality -------------------------------------------------------------

OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO = "OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO"
"""Retries allowed per call to one downstream, long-run, a number >= 0, default ``0.2``."""

OTEL_PYTHON_RAPTOR_RETRY_BUDGET_MIN_RETRIES_PER_SECOND = (
    "OTEL_PYTHON_RAPTOR_RETRY_BUDGET_MIN_RETRIES_PER_SECOND"
)
"""Retries per second allowed to one downstream regardless of traffic, >= 0, default ``10.0``."""

OTEL_PYTHON_RAPTOR_MAX_SERVICES = "OTEL_PYTHON_RAPTOR_MAX_SERVICES"
"""Distinct downstreams tracked (breakers, budgets, metric series): an integer in [1, 100000],
default ``256``; the excess share the ``other`` service."""

# --- what to hook, and the file ---------------------------------------------------------------

OTEL_PYTHON_RAPTOR_INTEGRATIONS = "OTEL_PYTHON_RAPTOR_INTEGRATIONS"
"""Comma-separated integrations to install, from ``requests``, ``httpx``, ``asyncio``,
``psycopg``, ``psycopg2``, ``asyncpg``, ``pymysql``, ``redis``, ``sqlite3``; ``all`` (the
default: each one whose library is installed) or ``none``."""

OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS = "OTEL_PYTHON_RAPTOR_ASYNCIO_TIMEOUTS"
"""Record a ``TimeoutError`` leaving ``asyncio.wait_for`` or ``asyncio.timeout`` as an
``asyncio`` timeout error: a boolean, default ``false``. A handled timeout is usually a polling
loop's normal path, so by default those two are not even hooked; a task's timeout that nothing
retrieves reaches the loop's exception handler and is recorded either way."""

OTEL_PYTHON_RAPTOR_CONFIG = "OTEL_PYTHON_RAPTOR_CONFIG"
"""Path of a TOML file with the same settings and per-downstream overrides (``[[downstreams]]``);
see ``docs/configuration.md``. Environment variables override the file."""
