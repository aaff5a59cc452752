"""The circuit breaker as a pure state machine: time and randomness come in as arguments.

States and transitions (see ``docs/circuit-breaker.md`` for the full rules)::

    CLOSED ──trip──► OPEN ──open duration elapsed, next acquire──► HALF_OPEN
      ▲                ▲                                               │
      │                └──────────── a counted probe fails ────────────┤
      └───────────── success_threshold probes succeed ─────────────────┘

A breaker opens on **evidence of an outage, not of degradation**: with retries in front of
it, a downstream that still answers 70 % of calls is worth calling, and refusing it would make
the app fail more often than it would without us. So a trip needs one of:

* **a run at low volume** (``CONSECUTIVE_FAILURES``): ``failure_threshold`` counted failures
  in a row while the window holds fewer than ``minimum_calls`` calls (little history: a run
  is the only evidence there is);
* **a long run** (``CONSECUTIVE_FAILURES``): ``max(failure_threshold, minimum_calls)``
  counted failures in a row at any volume. At a 30 % failure rate a run of 20 happens once
  in ``0.3 ** -20`` (about 3e10) calls; a dead downstream produces one in 20 calls;
* **a confident failure rate** (``FAILURE_RATE``): the window holds at least
  ``minimum_calls`` calls and the lower bound of the one-sided 95 % Wilson interval of its
  failure rate is at least the effective threshold. With the defaults (100 calls, 50 %) that
  is 59 failures out of 100, or 14 out of 20. A 30 % degraded downstream essentially never
  trips (per check, ``P ≈ 2e-9`` with 100 calls in the window, ``3e-4`` with 20; at 40 %,
  ``1e-4`` and ``6e-3``), a dead one trips after ``minimum_calls``;
* **a slow-call rate** (``SLOW_CALL_RATE``, only with ``slow_call_duration`` set): the window's
  slow-call rate is at least ``slow_call_rate_threshold``.

* **Open duration** after ``k`` failed probes in a row (``k = 0`` for a trip from CLOSED):
  ``base = min(max_recovery_timeout, recovery_timeout * recovery_backoff_multiplier ** k)``,
  then ``min(max_recovery_timeout, base * (1 + recovery_jitter * (2 * rnd() - 1)))``.
  Growth is off by default (``recovery_backoff_multiplier = 1``), so traffic returns within
  ``recovery_timeout`` plus jitter of a heal however long the outage was. Closing resets ``k``.
* **Half-open**: at most ``half_open_max_calls`` probes in flight; ``success_threshold``
  probe successes close the breaker (clearing the window); a counted probe failure reopens it.
  Probe slots are leases of ``max(recovery_timeout, 1)`` seconds: when every slot is taken
  and the latest probe was admitted that long ago, the probes in flight are presumed stuck
  and stop counting against the cap. A probe that never ends (a call with no timeout to a
  blackholed downstream) would otherwise keep the breaker half-open, refusing every call,
  long after the downstream is back. A presumed-stuck probe that does end within its own
  half-open episode gives its slot back and counts; one that ends in a later episode is late
  (below). Each episode starts with every slot free: the probes still out from earlier ones
  are presumed stuck from then on.
  ``on_health_check`` lets an active health check (outside the core) close an open breaker
  after ``success_threshold`` passing checks in a row, without waiting for user traffic.
* **Ignored categories** (``ignored_categories``, by default the non-health ones: client
  errors, and rate limiting, which is the downstream throttling, not failing) count as neither
  success nor failure: they are tallied in ``failure_counts`` only, leave the window and the
  consecutive-failure count alone, and a probe that ends with one just gives its slot back.
* **Late results**: a ``CALL`` permit's outcome counts only while the breaker is still CLOSED
  and a ``PROBE``'s only while the half-open episode that admitted it is still under way;
  otherwise the outcome only frees the probe slot it held, and only while no later episode
  has started. A state change therefore never counts calls admitted under another state, and
  a probe that hung through one episode never decides the next: its success, from before the
  breaker last reopened, does not help close it, nor does its failure reopen it. An episode
  starts each time the breaker goes half-open, and again when ``forget_probes`` gives up on
  the probes in flight (``reset`` closes the breaker: the next half-open is a new episode).
  Each episode's probes hold their own ``PROBE`` object (see ``Permit``), so telling them
  apart is an identity test on the failure and probe paths only, and nothing is added to
  the CLOSED path. Failures are still tallied in ``failure_counts``, late or not.
* **Unconfirmed failures** (``on_failure(unconfirmed=True)``): a failure that is evidence of
  an outage only when another confirms it, such as a statement that finds its pooled
  connection closed. A reaper of idle sessions closes a whole pool's connections while the
  server serves every new one; counted, the first burst after a quiet spell opened the
  breaker of a healthy server. In CLOSED such a failure counts at once when it continues a run
  (a counted failure came before it, with no success since); otherwise it is held. A success
  drops what is held; the next counted failure (the reconnect that a server which really went
  down refuses) first counts what is held, as if it had counted when it happened. Held
  failures expire after ``UNCONFIRMED_HELD_S`` seconds and are capped at
  ``MAX_UNCONFIRMED_HELD``. A probe's unconfirmed failure is no verdict: it frees its slot.
* **A fresh connection's lost link** (``on_failure(unconfirmed=True, opened_at=t)``): behind
  a pooler (PgBouncer) whose server is dead every connect succeeds, the pooler answering,
  and every statement loses its link: each connect's success dropped what was held, and the
  breaker never opened. A reaper of idle sessions only ends a session idle for at least its
  timeout, so an unconfirmed failure of a statement sent within ``FRESH_CONNECTION_S`` of
  its connection opening (``now - duration - opened_at``) cannot be one. Such a failure
  confirms, and counts (with what is held), when the connection opened after the oldest
  failure held, or within ``FRESH_CONNECTION_S`` after the success that last ended a run or
  dropped held failures (typically the connect that opened it), with no success since that
  ended anything: that success is then taken back, the run and the held failures it ended
  resume, and this failure continues them. In HALF_OPEN such a failure of a connection
  opened since the breaker went half-open is a verdict: the probe failed. A *counted*
  failure with ``opened_at`` (a proxy's own reply that it cannot reach its server, such as
  ProxySQL's 9001, on a connection the proxy just accepted) takes that success back the
  same way, and counts as it would have.
* **Adaptive threshold**: see ``adaptive_failure_rate_threshold`` (it only ever raises the
  configured threshold, for a downstream whose usual failure rate is high).
* **Not judging** (``stop_judging``): when recording a success failed (a bug of ours), the
  breaker would go on seeing failures only and open on a downstream that answers. It then
  stops judging: CLOSED, admitting every call, counting no failure and tripping on nothing,
  until ``reset`` or ``force_open``.

Not thread-safe: ``otel_raptor.runtime.breaker.CircuitBreaker`` holds a lock around it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

from otel_raptor.core.classification import NON_HEALTH_CATEGORIES, ErrorCategory
from otel_raptor.core.numbers import MAX_SECONDS_TEXT, as_finite, as_seconds
from otel_raptor.core.states import CircuitState, Transition, TransitionReason
from otel_raptor.core.window import CallOutcome, CountWindow, SlidingWindow, TimeWindow
from otel_raptor.errors import ConfigError

__all__ = [
    "ADAPTIVE_ALPHA",
    "FRESH_CONNECTION_S",
    "TRIP_CONFIDENCE_Z",
    "UNREACHABLE",
    "Admission",
    "BreakerCore",
    "BreakerSnapshot",
    "CircuitBreakerConfig",
    "Permit",
    "adaptive_failure_rate_threshold",
    "confident_failure_rate",
]

#: Weight of the newest sample in the adaptive baseline (an exponentially weighted average).
ADAPTIVE_ALPHA: Final = 0.2

#: The z-score of the failure-rate rule: 1.645 is a one-sided 95 % interval. The rule trips on
#: the interval's lower bound, so a rate that only looks high by chance does not trip.
TRIP_CONFIDENCE_Z: Final = 1.645
_Z2: Final = TRIP_CONFIDENCE_Z * TRIP_CONFIDENCE_Z

_INF: Final = float("inf")
_DEFAULT_MAX_OPEN_S: Final = 600.0
#: The shortest probe lease (see the module docstring), so that ``recovery_timeout=0`` does
#: not lift the cap on probes in flight.
_MIN_PROBE_LEASE_S: Final = 1.0
#: How long an unconfirmed failure waits for a counted one to confirm it (see the module
#: docstring): an app reconnects within seconds of losing a connection.
UNCONFIRMED_HELD_S: Final = 30.0
#: At most this many unconfirmed failures are held (a pool's connections, at most a window).
MAX_UNCONFIRMED_HELD: Final = 100
#: A statement sent within this many seconds of its connection opening cannot have found it
#: reaped for idleness: no server reaps sessions idle for less than a second (MySQL's
#: ``wait_timeout`` and Redis's ``timeout`` count whole seconds). See the module docstring.
FRESH_CONNECTION_S: Final = 1.0


class Permit(enum.IntEnum):
    """What ``acquire`` granted. Falsy only for ``REJECTED``.

    ``CALL``: a normal call through a closed breaker. ``PROBE``: a half-open trial call that
    holds one of the ``half_open_max_calls`` slots until its outcome (or ``release``) returns
    it. ``REJECTED``: do not run the call.

    Compare a probe permit with ``==``, not ``is``: a half-open episode whose predecessor still
    has probes out hands out its own ``PROBE`` object (same value, name and truth), so that the
    breaker can tell a late probe of an earlier episode from its own (see "Late results" in the
    module docstring). ``CALL`` and ``REJECTED`` are always the members themselves.
    """

    REJECTED = 0
    CALL = 1
    PROBE = 2


#: ``acquire``'s answer: the permit, and the state change it caused (OPEN → HALF_OPEN) if any.
Admission: TypeAlias = tuple[Permit, Transition | None]

_CALL: Final = Permit.CALL
_PROBE: Final = Permit.PROBE
_REJECTED: Final = Permit.REJECTED
_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN
_HALF_OPEN: Final = CircuitState.HALF_OPEN

#: The failures that say the downstream as a whole is out of reach, not one request: a run of
#: them may open the breaker even when one call's retries made it (see
#: ``BreakerCore.on_failure``). Not ``unavailable``: a 503 is an answer, and one route of a
#: live origin may give it to every attempt (a backend of an ingress is down) while every
#: other route answers.
UNREACHABLE: Final = frozenset({ErrorCategory.CONNECTION, ErrorCategory.DNS, ErrorCategory.TLS})
# Preallocated answers, so that admitting or refusing a call without a transition allocates
# nothing.
_ADMIT_CALL: Final[Admission] = (Permit.CALL, None)
_REJECT: Final[Admission] = (Permit.REJECTED, None)
_SUCCESS: Final = int(CallOutcome.SUCCESS)
_FAILURE: Final = int(CallOutcome.FAILURE)
_SLOW_SUCCESS: Final = int(CallOutcome.SLOW_SUCCESS)
_SLOW_FAILURE: Final = int(CallOutcome.SLOW_FAILURE)


def _new_probe_permit() -> Permit:
    """A ``PROBE`` permit that is not ``Permit.PROBE`` itself: equal to it in value, name and
    truth, told apart only by identity. One per half-open episode that needs it, so that a
    late probe's outcome is recognised with an ``is`` test, like ``CALL``'s, and no episode
    number has to be carried or compared (nor wrap around)."""
    # int.__new__ skips Enum.__new__ (which would return the member itself); the member's
    # attributes (_name_, _value_, ...) make name, value and repr read as PROBE (a pickled
    # copy comes back as Permit.PROBE itself).
    permit = int.__new__(Permit, _PROBE.value)
    permit.__dict__.update(_PROBE.__dict__)
    return permit


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return as_finite(value) is not None


def _check_seconds(name: str, value: object, *, zero_ok: bool, allowed: str = "") -> None:
    if as_seconds(value, zero_ok=zero_ok) is None:
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(
            f"breaker.{name}",
            value,
            allowed or f"a number of seconds {bound} and <= {MAX_SECONDS_TEXT}",
        )


def _is_category_set(value: object) -> bool:
    return isinstance(value, frozenset) and all(isinstance(c, ErrorCategory) for c in value)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not (
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    ):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"breaker.{name}", value, allowed)


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerConfig:
    """A circuit breaker's settings. Durations are seconds, rates fractions in [0, 1].

    The first six fields keep the seed's names and defaults. Every field is checked when the
    config is built; a bad value raises ``ConfigError("breaker.<field>", value, allowed)``.

    * ``failure_threshold`` (5, integer >= 1): consecutive counted failures in CLOSED that trip
      while the window holds fewer than ``minimum_calls`` calls (see the module docstring:
      with more history a run must reach ``minimum_calls``, or the rate must be confident).
    * ``recovery_timeout`` (2.0, >= 0): base time OPEN before a probe is let through. Not the
      seed's 60 s: after a heal the app is refused for up to this long (half of it on
      average), while a dead downstream gets only one probe per this long per process
      (``benchmarks/bench_opentime.py``; the study is in ``benchmarks/README.md``).
    * ``success_threshold`` (2, integer >= 1): probe successes in HALF_OPEN that close it.
    * ``timeout`` (30.0, > 0): the seed's field, kept so that its dict shape still loads; no
      breaker reads it. The request timeout integrations apply is
      ``RaptorConfig.request_timeout`` (``OTEL_PYTHON_RAPTOR_REQUEST_TIMEOUT``).
    * ``adaptive_threshold`` (True): learn a baseline failure rate and adapt the rate rule.
    * ``health_check_interval`` (30.0, > 0): seconds between health evaluations: the adaptive
      baseline update while CLOSED and, when an active health check is configured for the
      downstream, the check while OPEN.
    * ``failure_rate_threshold`` (0.5, in (0, 1]): failure rate that trips once the window
      shows it with 95 % confidence (see ``confident_failure_rate``).
    * ``window`` ("count"): ``"count"`` (last ``window_size`` calls) or ``"time"`` (last
      ``window_size`` seconds, in 10 slices).
    * ``window_size`` (100, integer in [1, 1_000_000]): calls or seconds.
    * ``minimum_calls`` (20, integer >= 1): the rate rules apply only with at least this many
      calls in the window. For a count window, values above ``window_size`` act as
      ``window_size``.
    * ``slow_call_duration`` (None = off, else > 0): a call at least this long is slow.
    * ``slow_call_rate_threshold`` (1.0, in (0, 1]): window slow-call rate that trips.
    * ``half_open_max_calls`` (1, integer >= 1): probes in flight at once.
    * ``max_recovery_timeout`` (``None``: 600.0, or ``recovery_timeout`` when that is longer;
      else >= ``recovery_timeout``): cap of the open duration.
    * ``recovery_backoff_multiplier`` (1.0 = off, >= 1): growth of the open duration per failed
      probe. Off by default: with growth, a long outage keeps traffic away for up to
      ``max_recovery_timeout`` after the downstream is back (measured: 2 s growing x2 to 30 s
      answered 35 % of the calls after four heals, 2 s flat 94 %).
    * ``recovery_jitter`` (0.1, in [0, 1]): the open duration is spread by ± this fraction.
    * ``adaptive_min_threshold`` (0.1, in (0, 1]) and ``adaptive_max_threshold`` (0.9, in
      [``adaptive_min_threshold``, 1]): bounds of the adapted rate threshold.
    * ``ignored_categories`` (``NON_HEALTH_CATEGORIES``): failures in these never trip.
    """

    failure_threshold: int = 5
    recovery_timeout: float = 2.0
    success_threshold: int = 2
    timeout: float = 30.0
    adaptive_threshold: bool = True
    health_check_interval: float = 30.0
    failure_rate_threshold: float = 0.5
    window: Literal["count", "time"] = "count"
    window_size: int = 100
    minimum_calls: int = 20
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 1.0
    half_open_max_calls: int = 1
    max_recovery_timeout: float | None = None
    recovery_backoff_multiplier: float = 1.0
    recovery_jitter: float = 0.1
    adaptive_min_threshold: float = 0.1
    adaptive_max_threshold: float = 0.9
    ignored_categories: frozenset[ErrorCategory] = field(default=NON_HEALTH_CATEGORIES)

    def __post_init__(self) -> None:
        _check_int("failure_threshold", self.failure_threshold, 1)
        _check_seconds("recovery_timeout", self.recovery_timeout, zero_ok=True)
        _check_int("success_threshold", self.success_threshold, 1)
        _check_seconds("timeout", self.timeout, zero_ok=False)
        if not isinstance(self.adaptive_threshold, bool):
            raise ConfigError(
                "breaker.adaptive_threshold", self.adaptive_threshold, "True or False"
            )
        _check_seconds("health_check_interval", self.health_check_interval, zero_ok=False)
        if not (_is_number(self.failure_rate_threshold) and 0 < self.failure_rate_threshold <= 1):
            raise ConfigError(
                "breaker.failure_rate_threshold", self.failure_rate_threshold, "a number in (0, 1]"
            )
        if self.window not in ("count", "time"):
            raise ConfigError("breaker.window", self.window, "'count' or 'time'")
        _check_int("window_size", self.window_size, 1, 1_000_000)
        _check_int("minimum_calls", self.minimum_calls, 1)
        if self.slow_call_duration is not None:
            _check_seconds(
                "slow_call_duration",
                self.slow_call_duration,
                zero_ok=False,
                allowed=f"None (off) or a number of seconds > 0 and <= {MAX_SECONDS_TEXT}",
            )
        if not (
            _is_number(self.slow_call_rate_threshold) and 0 < self.slow_call_rate_threshold <= 1
        ):
            raise ConfigError(
                "breaker.slow_call_rate_threshold",
                self.slow_call_rate_threshold,
                "a number in (0, 1]",
            )
        _check_int("half_open_max_calls", self.half_open_max_calls, 1)
        cap = self.max_recovery_timeout
        if cap is None:
            cap = max(_DEFAULT_MAX_OPEN_S, float(self.recovery_timeout))
            object.__setattr__(self, "max_recovery_timeout", cap)
        cap_allowed = (
            f"a number of seconds >= recovery_timeout ({self.recovery_timeout})"
            f" and <= {MAX_SECONDS_TEXT}"
        )
        _check_seconds("max_recovery_timeout", cap, zero_ok=True, allowed=cap_allowed)
        if cap < self.recovery_timeout:
            raise ConfigError("breaker.max_recovery_timeout", cap, cap_allowed)
        if not (
            _is_number(self.recovery_backoff_multiplier) and self.recovery_backoff_multiplier >= 1
        ):
            raise ConfigError(
                "breaker.recovery_backoff_multiplier",
                self.recovery_backoff_multiplier,
                "a finite number >= 1",
            )
        if not (_is_number(self.recovery_jitter) and 0 <= self.recovery_jitter <= 1):
            raise ConfigError("breaker.recovery_jitter", self.recovery_jitter, "a number in [0, 1]")
        if not (_is_number(self.adaptive_min_threshold) and 0 < self.adaptive_min_threshold <= 1):
            raise ConfigError(
                "breaker.adaptive_min_threshold", self.adaptive_min_threshold, "a number in (0, 1]"
            )
        if not (
            _is_number(self.adaptive_max_threshold)
            and self.adaptive_min_threshold <= self.adaptive_max_threshold <= 1
        ):
            raise ConfigError(
                "breaker.adaptive_max_threshold",
                self.adaptive_max_threshold,
                f"a number in [adaptive_min_threshold ({self.adaptive_min_threshold}), 1]",
            )
        if not _is_category_set(self.ignored_categories):
            raise ConfigError(
                "breaker.ignored_categories",
                self.ignored_categories,
                "a frozenset of ErrorCategory",
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> CircuitBreakerConfig:
        """Build a config from the seed's dict shape (``{"failure_threshold": 5, ...}``).

        Unknown keys raise ``ConfigError`` listing the allowed ones. ``ignored_categories`` may
        be any iterable of ``ErrorCategory`` or their string values (``"client_error"``).
        """
        allowed = sorted(f.name for f in fields(cls))
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in allowed:
                raise ConfigError(
                    f"breaker.{key}", value, "a known key, one of " + ", ".join(allowed)
                )
            kwargs[key] = _categories(value) if key == "ignored_categories" else value
        return cls(**kwargs)


def _categories(value: object) -> frozenset[ErrorCategory]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(
            "breaker.ignored_categories", value, "an iterable of ErrorCategory values"
        )
    try:
        return frozenset(ErrorCategory(item) for item in value)
    except ValueError:
        raise ConfigError(
            "breaker.ignored_categories",
            value,
            "an iterable of: " + ", ".join(c.value for c in ErrorCategory),
        ) from None


def adaptive_failure_rate_threshold(
    configured: float, baseline: float | None, low: float, high: float
) -> float:
    """The failure-rate threshold for a service whose usual failure rate is ``baseline``.

    ``configured`` is returned until a baseline exists. Then the rule is::

        max(configured, min(high, max(low, 2 * baseline + 0.1)))

    * Learning only ever raises the threshold: a normally clean service keeps the configured
      one. Lowering it would make a clean service trip on a mild degradation, which with
      retries in front of the breaker the app would have survived.
    * A service whose normal rate sits near the configured threshold gets headroom of
      ``baseline + 0.1`` above its normal rate, up to ``high``: a normal rate of 45 % gives
      ``2 * 0.45 + 0.1 = 1.0``, capped at ``high`` (0.9 by default), so the rate rule needs a
      confident 90 % rather than tripping on every unlucky window at 50 %.
    """
    if baseline is None:
        return configured
    return max(configured, min(high, max(low, 2.0 * baseline + 0.1)))


def confident_failure_rate(failures: int, calls: int) -> float:
    """The lower bound of the one-sided 95 % Wilson interval of ``failures / calls``.

    What the failure-rate rule compares with the threshold: the rate the window shows with
    95 % confidence, so that 12 failures in 20 calls (60 %, lower bound 42 %) does not trip a
    50 % threshold while 59 in 100 (lower bound 50.8 %) does. ``0.0`` for an empty window.
    """
    if calls <= 0:
        return 0.0
    n = float(calls)
    p = failures / n
    spread = TRIP_CONFIDENCE_Z * math.sqrt(p * (1.0 - p) / n + _Z2 / (4.0 * n * n))
    return max(0.0, (p + _Z2 / (2.0 * n) - spread) / (1.0 + _Z2 / n))


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSnapshot:
    """A consistent read of a breaker, for gauges and debugging.

    ``health_score`` is 0-100. ``open_for`` is the current open duration in seconds (``None``
    unless OPEN, or when held open by hand). ``retry_after`` is the seconds until a call would
    be admitted (0.0 when closed or half-open, ``None`` when held open by hand).
    ``failure_counts`` counts every failure seen by category since creation or ``reset``,
    ignored categories included.
    """

    state: CircuitState
    forced_open: bool
    health_score: int
    effective_failure_rate_threshold: float
    baseline_failure_rate: float | None
    window_calls: int
    window_failures: int
    window_slow_calls: int
    consecutive_failures: int
    probes_in_flight: int
    failure_counts: Mapping[ErrorCategory, int]
    open_for: float | None
    retry_after: float | None


class BreakerCore:
    """The breaker's state machine. Every method that depends on time takes ``now`` (seconds,
    monotonic); ``rnd`` returns floats in [0, 1) for the open-duration jitter.

    ``now`` at construction schedules the first adaptive health check. Not thread-safe.
    """

    __slots__ = (
        "_base_open",
        "_baseline",
        "_checks_passed",
        "_config",
        "_consecutive",
        "_effective",
        "_failure_counts",
        "_forced",
        "_half_open_at",
        "_ignored",
        "_interval",
        "_judging",
        "_long_run",
        "_max_open",
        "_may_be_quiet",
        "_min_calls",
        "_next_check",
        "_open_for",
        "_open_until",
        "_probe",
        "_probe_admission",
        "_probe_lease",
        "_probe_lease_ends",
        "_probe_successes",
        "_probes",
        "_probes_stuck",
        "_record",
        "_rnd",
        "_run_calls",
        "_run_calls_needed",
        "_slow_s",
        "_state",
        "_suspended_at",
        "_suspended_calls",
        "_suspended_held",
        "_suspended_held_calls",
        "_suspended_held_since",
        "_suspended_run",
        "_unconfirmed",
        "_unconfirmed_calls",
        "_unconfirmed_since",
        "_window",
        "quiet",
    )

    def __init__(
        self, config: CircuitBreakerConfig, *, now: float, rnd: Callable[[], float]
    ) -> None:
        self._config = config
        self._rnd = rnd
        window: SlidingWindow
        if config.window == "count":
            window = CountWindow(config.window_size)
            self._min_calls = min(config.minimum_calls, config.window_size)
        else:
            window = TimeWindow(float(config.window_size))
            self._min_calls = config.minimum_calls
        # A run this long trips at any volume (see the module docstring).
        self._long_run = max(config.failure_threshold, self._min_calls)
        cap = config.max_recovery_timeout
        self._max_open = float(cap) if cap is not None else _INF  # set by the config, always
        self._window = window
        # A bound method in a slot: one lookup less on the hot path.
        self._record = window.record
        # Only a count window can absorb a success, and only without slow-call detection does
        # a success's duration not matter.
        self._may_be_quiet = config.slow_call_duration is None and isinstance(window, CountWindow)
        #: True while a plain success would change nothing (CLOSED, a window full of
        #: successes, no failure since): see ``succeeded_quietly``. Read without a lock.
        self.quiet = False
        self._ignored = config.ignored_categories
        self._interval = config.health_check_interval
        self._failure_counts = dict.fromkeys(ErrorCategory, 0)
        # The permit of the current half-open episode's probes (see ``_new_episode``).
        self._probe = _PROBE
        self._probe_admission: Admission = (_PROBE, None)  # preallocated, as _ADMIT_CALL
        self._probes = 0  # probes of the current episode in flight
        self._probe_lease = max(config.recovery_timeout, _MIN_PROBE_LEASE_S)
        self._probe_lease_ends = _INF
        self._probes_stuck = 0  # of ``_probes``: those presumed stuck (see the docstring)
        # Two calls make a run evidence, unless one failure is all the user asks for.
        self._run_calls_needed = min(2, config.failure_threshold)
        # Unconfirmed failures held (see the module docstring): how many, of how many calls,
        # since when.
        self._unconfirmed = 0
        self._unconfirmed_calls = 0
        self._unconfirmed_since = 0.0
        # What the latest success that ended something ended (see "A fresh connection's lost
        # link" in the module docstring): the run, its calls, the held failures, and when.
        self._suspended_at = -_INF
        self._suspended_run = 0
        self._suspended_calls = 0
        self._suspended_held = 0
        self._suspended_held_calls = 0
        self._suspended_held_since = 0.0
        self._half_open_at = now  # when the breaker last went half-open
        self._init_state(now)

    def _init_state(self, now: float) -> None:
        self.quiet = False
        config = self._config
        self._judge_again()
        self._state = _CLOSED
        self._forced = False
        self._consecutive = 0
        self._run_calls = 0  # distinct calls in the consecutive run (reset when a run starts)
        self.forget_unconfirmed()
        self._probe_successes = 0
        self._checks_passed = 0
        self._open_until = _INF
        self._open_for: float | None = None
        self._base_open = config.recovery_timeout
        self._baseline: float | None = None
        self._effective = config.failure_rate_threshold
        self._next_check = now + self._interval if config.adaptive_threshold else _INF
        self._window.reset()

    # --- the call path ------------------------------------------------------------------

    def acquire(self, now: float) -> Admission:
        """Ask to run one call at ``now``. Returns the permit and the transition it caused.

        CLOSED: ``CALL``. OPEN: ``REJECTED`` until the open duration has elapsed (forever when
        opened by hand); then the breaker moves to HALF_OPEN (returned as the transition) and
        this call is the first probe. HALF_OPEN: ``PROBE`` while fewer than
        ``half_open_max_calls`` probes are in flight, else ``REJECTED``.
        """
        state = self._state
        if state is _CLOSED:
            return _ADMIT_CALL
        if state is _OPEN:
            if self._forced or now < self._open_until:
                return _REJECT
            transition = self._move(_HALF_OPEN, TransitionReason.RECOVERY_TIMEOUT_ELAPSED, now)
            if self._admit_probe(now):
                return (self._probe, transition)
            return (_REJECTED, transition)
        if self._admit_probe(now):
            return self._probe_admission
        return _REJECT

    def on_success(self, permit: Permit, now: float, duration: float) -> Transition | None:
        """The call admitted with ``permit`` succeeded after ``duration`` seconds."""
        if permit is _CALL and self._state is _CLOSED and duration < self._slow_s:
            window = self._window
            if not window.absorbs_success:
                self._record(_SUCCESS, now)
            if self._consecutive or self._unconfirmed:
                self._suspend(now)
            if now >= self._next_check:
                self._health_check(now)
            self.quiet = self._may_be_quiet and window.absorbs_success
            return None
        return self._on_other_success(permit, now)

    def succeeded_quietly(self, now: float) -> bool:
        """Whether a plain success at ``now`` would change nothing, so that the caller may
        skip recording it (and the lock around it): the breaker is CLOSED, its count window is
        full of successes, no failure came since, slow-call detection is off and no adaptive
        health check is due. Lock-free and approximate by design: a success that races a
        concurrent failure may leave that failure's run one success longer, which only a run
        of ``failure_threshold`` (at low volume) or ``minimum_calls`` failures could turn
        into a trip."""
        return self.quiet and now < self._next_check

    def _on_other_success(self, permit: Permit, now: float) -> Transition | None:
        if permit is self._probe:
            self.quiet = False
            self._end_probe()
            if self._state is _HALF_OPEN:
                # A slow probe still proves the downstream answers: it counts as a success.
                self._probe_successes += 1
                if self._probe_successes >= self._config.success_threshold:
                    return self._close(TransitionReason.PROBES_SUCCEEDED, now)
            return None
        if permit is not _CALL or self._state is not _CLOSED:
            return None  # a late call, or a probe of an earlier episode: nothing to count
        self.quiet = False
        # A slow success.
        self._record(_SLOW_SUCCESS, now)
        if self._consecutive or self._unconfirmed:
            self._suspend(now)
        if now >= self._next_check:
            self._health_check(now)
        window = self._window
        if (
            window.calls(now) >= self._min_calls
            and window.slow_call_rate(now) >= self._config.slow_call_rate_threshold
        ):
            return self._trip(TransitionReason.SLOW_CALL_RATE, now)
        return None

    def on_failure(
        self,
        permit: Permit,
        now: float,
        duration: float,
        category: ErrorCategory,
        *,
        retry: bool = False,
        live_refusal: bool = False,
        unconfirmed: bool = False,
        opened_at: float | None = None,
    ) -> Transition | None:
        """The call admitted with ``permit`` failed after ``duration`` seconds.

        Failures in ``ignored_categories``, and live refusals (``live_refusal``: a server
        refusing what its state cannot serve while it serves the rest, see
        ``Classification.live_refusal``), count as neither success nor failure (a probe's
        slot is given back); every failure is tallied in ``failure_counts``. ``retry``: a
        later attempt of a call whose first attempt failed already. The consecutive rule trips
        only on a run of failures from two calls or more (one with ``failure_threshold=1``),
        or on one whose latest failure says
        the downstream is out of reach (``UNREACHABLE``: refused, DNS, TLS): a timeout, a 500
        or a 503 is about one request as often as about the server, and one call's retries of
        a slow or broken request must not open the breaker of a downstream that answers every
        other. ``unconfirmed``: a failure that counts only once another confirms it (see
        "Unconfirmed failures" in the module docstring). ``opened_at``: when (``now`` units)
        the connection an unconfirmed failure lost (or a counted one ran on) was opened, if
        known (see "A fresh connection's lost link").
        """
        self._failure_counts[category] += 1
        if category in self._ignored or live_refusal or not self._judging:
            if permit is self._probe:
                self._end_probe()
            return None
        if permit is _CALL:
            if self._state is not _CLOSED:
                return None
            self.quiet = False
            if (
                unconfirmed
                and self._consecutive == 0
                and (opened_at is None or not self._confirms(opened_at, now - duration))
            ):
                self._hold_unconfirmed(now, retry=retry)
                return None
            if not unconfirmed and opened_at is not None and self._consecutive == 0:
                # Counted on a fresh connection (a proxy's reply that it cannot reach the
                # server): its connect's success, answered by the proxy, takes nothing away.
                self._confirms(opened_at, now - duration)
            if self._unconfirmed:
                self._count_unconfirmed(now)
            self._record(_SLOW_FAILURE if duration >= self._slow_s else _FAILURE, now)
            if self._consecutive == 0:  # a new run (a success ended the last one)
                self._run_calls = 0
            self._consecutive += 1
            if not retry:
                self._run_calls += 1
            if now >= self._next_check:
                self._health_check(now)
            run_is_evidence = self._run_calls >= self._run_calls_needed or (category in UNREACHABLE)
            return self._check_trip(now, run_is_evidence)
        if permit is self._probe:
            self._end_probe()
            if self._state is _HALF_OPEN and (
                not unconfirmed
                or (
                    opened_at is not None
                    and opened_at >= self._half_open_at
                    and now - duration - opened_at <= FRESH_CONNECTION_S
                )
            ):
                self._base_open = min(
                    self._max_open,
                    self._base_open * self._config.recovery_backoff_multiplier,
                )
                return self._open(TransitionReason.PROBE_FAILED, now)
        return None

    def _suspend(self, now: float) -> None:
        # A success ends the run and drops the held failures; kept aside in case a fresh
        # connection's lost link shows that the success (its connect) was no evidence.
        held = self._unconfirmed
        if held and now - self._unconfirmed_since > UNCONFIRMED_HELD_S:
            held = 0  # expired: nothing to take back
        self._suspended_at = now if held or self._consecutive else -_INF
        self._suspended_run = self._consecutive
        self._suspended_calls = self._run_calls if self._consecutive else 0
        self._suspended_held = held
        self._suspended_held_calls = self._unconfirmed_calls if held else 0
        self._suspended_held_since = self._unconfirmed_since
        self._consecutive = self._unconfirmed = 0

    def _confirms(self, opened_at: float, sent: float) -> bool:
        """Whether a lost link on a connection opened at ``opened_at``, whose statement was
        sent at ``sent``, confirms the outage (see "A fresh connection's lost link"); if it
        takes back the success that ended a run, that run and what it held resume."""
        if sent - opened_at > FRESH_CONNECTION_S:
            return False  # it may have idled long enough to be reaped
        if self._unconfirmed and opened_at >= self._unconfirmed_since:
            return True
        suspended_at = self._suspended_at
        if not (suspended_at <= opened_at <= suspended_at + FRESH_CONNECTION_S):
            return False
        # The success at ``suspended_at`` was this connection's opening (or no better
        # evidence): what it ended resumes. consecutive is 0 here (no success since).
        self._suspended_at = -_INF
        self._consecutive = self._suspended_run
        self._run_calls = self._suspended_calls
        held = self._suspended_held
        if held:
            if self._unconfirmed:
                self._unconfirmed_since = min(self._unconfirmed_since, self._suspended_held_since)
            else:
                self._unconfirmed_since = self._suspended_held_since
                self._unconfirmed_calls = 0
            self._unconfirmed = min(MAX_UNCONFIRMED_HELD, self._unconfirmed + held)
            self._unconfirmed_calls = min(
                self._unconfirmed, self._unconfirmed_calls + self._suspended_held_calls
            )
        return True

    def _hold_unconfirmed(self, now: float, *, retry: bool) -> None:
        if self._unconfirmed and now - self._unconfirmed_since > UNCONFIRMED_HELD_S:
            self.forget_unconfirmed()
        if self._unconfirmed >= MAX_UNCONFIRMED_HELD:
            return
        if not self._unconfirmed:  # the first held: the others' fields are stale
            self._unconfirmed_since = now
            self._unconfirmed_calls = 0
        self._unconfirmed += 1
        if not retry:
            self._unconfirmed_calls += 1

    def _count_unconfirmed(self, now: float) -> None:
        # Confirmed by the counted failure being recorded at ``now``: the held ones join its
        # run (which they started) as if they had counted when they happened.
        held, calls = self._unconfirmed, self._unconfirmed_calls
        fresh = now - self._unconfirmed_since <= UNCONFIRMED_HELD_S
        self.forget_unconfirmed()
        if not fresh:
            return
        if self._consecutive == 0:
            self._run_calls = 0
        record = self._record
        for _ in range(held):
            record(_FAILURE, now)
        self._consecutive += held
        self._run_calls += calls

    def forget_unconfirmed(self) -> None:
        """Drop the unconfirmed failures held (see the module docstring): in a forked child
        they are about the parent's connections, which the child must not use."""
        self._unconfirmed = 0
        self._unconfirmed_calls = 0
        self._unconfirmed_since = 0.0
        self._suspended_at = -_INF

    def release(self, permit: Permit) -> None:
        """The call admitted with ``permit`` ended without a verdict (cancelled): a probe gives
        its slot back (unless an earlier episode's: see "Late results"); nothing is counted."""
        if permit is self._probe:
            self._end_probe()

    def on_health_check(self, *, passed: bool, now: float) -> Transition | None:
        """An active health check of the downstream ran at ``now`` while the breaker may be
        open. ``success_threshold`` passing checks in a row close an automatically OPEN breaker
        (``HEALTH_CHECK_PASSED``) without waiting for a user call to probe it; a failing check
        starts the count again. Ignored unless automatically OPEN (a breaker held open by hand
        stays open; HALF_OPEN is already probing with real calls)."""
        if self._state is not _OPEN or self._forced:
            self._checks_passed = 0
            return None
        if not passed:
            self._checks_passed = 0
            return None
        self._checks_passed += 1
        if self._checks_passed >= self._config.success_threshold:
            return self._close(TransitionReason.HEALTH_CHECK_PASSED, now)
        return None

    def forget_probes(self) -> None:
        """Free every probe slot without a verdict: the probes in flight will never report
        (in a forked child, they belong to threads the child does not have). Nothing is
        counted; a probe that does end later is taken for one of an earlier episode: it frees
        no slot and counts nothing."""
        self._new_episode()

    def stop_judging(self, now: float) -> Transition | None:
        """Stop judging the downstream: recording a success failed (a bug of ours, met by the
        caller), so the breaker would go on counting failures without the successes between
        them and open on a downstream that answers, refusing calls that would succeed.

        From ``now`` on the breaker is CLOSED and stays so: it admits every call, counts no
        failure (``failure_counts`` still tallies them), trips on nothing, runs no adaptive
        health check, and is ``quiet`` (so callers skip recording successes, and with them
        the bookkeeping that failed), until ``reset`` or ``force_open`` gives it its
        judgement back (a breaker held open by hand is left so: nothing is judged while it
        is held). Probe slots are freed. Only plain fields change: the window is left alone,
        since it may be what failed. Returns the transition to CLOSED, if any."""
        if self._forced:
            return None
        self._judging = False
        self._slow_s = _INF  # no success can trip the slow-call rule
        self._next_check = _INF
        self._consecutive = 0
        self.forget_unconfirmed()
        self._checks_passed = 0
        self.forget_probes()
        previous = self._state
        self._state = _CLOSED
        self.quiet = True
        if previous is _CLOSED:
            return None
        self._probe_successes = 0
        self._open_until = _INF
        self._open_for = None
        return Transition(previous, _CLOSED, TransitionReason.BOOKKEEPING_FAILED, now)

    # --- manual control -----------------------------------------------------------------

    def force_open(self, now: float) -> Transition | None:
        """Hold the breaker open until ``force_close`` or ``reset``: every call is rejected and
        ``retry_after`` is ``None``. Returns ``None`` if it was already held open (and an
        OPEN → OPEN transition when an automatically opened breaker becomes held open).
        A breaker that stopped judging (``stop_judging``) judges again once closed."""
        if self._forced:
            return None
        self._judge_again()
        self.quiet = False
        self.forget_unconfirmed()
        previous = self._state
        self._state = _OPEN
        self._forced = True
        self._open_until = _INF
        self._open_for = None
        return Transition(previous, _OPEN, TransitionReason.MANUAL_OPEN, now)

    def force_close(self, now: float) -> Transition | None:
        """Close the breaker now (clearing the window and the open-duration growth, keeping
        the learned baseline and the failure counts). ``None`` if it was already closed."""
        if self._state is _CLOSED:
            return None
        return self._close(TransitionReason.MANUAL_CLOSE, now)

    def reset(self, now: float) -> Transition | None:
        """Back to a new breaker's state: closed, empty window, no baseline, no failure counts.
        Probes still in flight keep their slots until they end or the next half-open episode
        starts; their outcomes count in no later episode. Returns the transition to CLOSED, or
        ``None`` if it was closed already."""
        previous = self._state
        self._init_state(now)
        for category in self._failure_counts:
            self._failure_counts[category] = 0
        if previous is _CLOSED:
            return None
        return Transition(previous, _CLOSED, TransitionReason.MANUAL_CLOSE, now)

    # --- reading ------------------------------------------------------------------------

    @property
    def config(self) -> CircuitBreakerConfig:
        return self._config

    @property
    def state(self) -> CircuitState:
        """The current state. OPEN stays OPEN until a call is asked for after its duration."""
        return self._state

    @property
    def judging(self) -> bool:
        """Whether the breaker judges the downstream (see ``stop_judging``)."""
        return self._judging

    @property
    def forced_open(self) -> bool:
        """Whether the breaker is held open by ``force_open``."""
        return self._forced

    @property
    def consecutive_failures(self) -> int:
        """Counted failures in a row while CLOSED (reset by any success and by closing)."""
        return self._consecutive

    @property
    def probes_in_flight(self) -> int:
        """Probe permits of the latest half-open episode handed out and not yet ended (those
        of earlier episodes, or forgotten by ``forget_probes``, are no longer tracked)."""
        return self._probes

    @property
    def probes_presumed_stuck(self) -> int:
        """Of ``probes_in_flight``, those whose lease ran out: they no longer count against
        ``half_open_max_calls`` (see the module docstring)."""
        return self._probes_stuck

    @property
    def failure_counts(self) -> dict[ErrorCategory, int]:
        """Failures seen per category since creation or ``reset`` (a copy; nonzero only)."""
        return {c: n for c, n in self._failure_counts.items() if n}

    @property
    def open_until(self) -> float | None:
        """When (``now`` units) a probe may go through; ``None`` unless automatically OPEN."""
        if self._state is _OPEN and not self._forced:
            return self._open_until
        return None

    @property
    def open_for(self) -> float | None:
        """The current open duration in seconds; ``None`` unless automatically OPEN."""
        return self._open_for if self._state is _OPEN and not self._forced else None

    @property
    def effective_failure_rate_threshold(self) -> float:
        """The failure-rate threshold in force (adapted, or the configured one)."""
        return self._effective

    @property
    def baseline_failure_rate(self) -> float | None:
        """The learned usual failure rate, or ``None`` before the first health check."""
        return self._baseline

    def retry_after(self, now: float) -> float | None:
        """Seconds until a call would be admitted: 0.0 when CLOSED or HALF_OPEN (a probe slot
        may free up at any moment), the rest of the open duration when OPEN, ``None`` when
        held open by hand."""
        if self._state is not _OPEN:
            return 0.0
        if self._forced:
            return None
        remaining = self._open_until - now
        open_for = self._open_for
        # ``(now + d) - now`` can exceed ``d`` by a rounding error; never report more than d.
        if open_for is not None and remaining > open_for:
            return open_for
        return max(0.0, remaining)

    def health_score(self, now: float) -> int:
        """0-100: OPEN is 0; else ``round(100 * (1 - failure_rate) * (1 - slow_call_rate / 2))``
        over the window, capped at 50 in HALF_OPEN."""
        state = self._state
        if state is _OPEN:
            return 0
        window = self._window
        score = round(
            100.0 * (1.0 - window.failure_rate(now)) * (1.0 - window.slow_call_rate(now) / 2)
        )
        return min(50, score) if state is _HALF_OPEN else score

    def snapshot(self, now: float) -> BreakerSnapshot:
        """A consistent read of everything, for gauges."""
        window = self._window
        return BreakerSnapshot(
            state=self._state,
            forced_open=self._forced,
            health_score=self.health_score(now),
            effective_failure_rate_threshold=self._effective,
            baseline_failure_rate=self._baseline,
            window_calls=window.calls(now),
            window_failures=window.failures(now),
            window_slow_calls=window.slow_calls(now),
            consecutive_failures=self._consecutive,
            probes_in_flight=self._probes,
            failure_counts=MappingProxyType(self.failure_counts),
            open_for=self.open_for,
            retry_after=self.retry_after(now),
        )

    def __repr__(self) -> str:
        return (
            f"BreakerCore(state={self._state.value}, forced_open={self._forced}, "
            f"consecutive_failures={self._consecutive}, probes_in_flight={self._probes})"
        )

    # --- internals ----------------------------------------------------------------------

    def _judge_again(self) -> None:
        self._judging = True
        duration = self._config.slow_call_duration
        self._slow_s = _INF if duration is None else duration

    def _admit_probe(self, now: float) -> bool:
        if self._probes - self._probes_stuck >= self._config.half_open_max_calls:
            if now < self._probe_lease_ends:
                return False
            self._probes_stuck = self._probes
        self._probes += 1
        self._probe_lease_ends = now + self._probe_lease
        return True

    def _new_episode(self) -> None:
        """Start a new probe episode: every slot free, and probes still out from earlier ones
        (presumed stuck, or forgotten) no longer this episode's. Those hold the old permit
        object; a new one is made only when there are any, so that flapping allocates
        nothing."""
        if self._probes:
            probe = _new_probe_permit()
            self._probe = probe
            self._probe_admission = (probe, None)
        self._probes = 0
        self._probes_stuck = 0
        self._probe_lease_ends = _INF

    def _end_probe(self) -> None:
        if self._probes > 0:
            self._probes -= 1
        # Which probe ended is unknown: if it was a stuck one, a live one is taken for stuck
        # until the counts meet again, letting at most one probe too many through.
        self._probes_stuck = min(self._probes_stuck, self._probes)

    def _check_trip(self, now: float, run_is_evidence: bool) -> Transition | None:
        consecutive = self._consecutive
        window = self._window
        calls = window.calls(now)
        if (
            consecutive >= self._config.failure_threshold
            and run_is_evidence
            and (calls < self._min_calls or consecutive >= self._long_run)
        ):
            return self._trip(TransitionReason.CONSECUTIVE_FAILURES, now)
        if calls < self._min_calls:
            return None
        if confident_failure_rate(window.failures(now), calls) >= self._effective:
            return self._trip(TransitionReason.FAILURE_RATE, now)
        if window.slow_call_rate(now) >= self._config.slow_call_rate_threshold:
            # Only reachable with slow-call detection on: otherwise no call is ever slow.
            return self._trip(TransitionReason.SLOW_CALL_RATE, now)
        return None

    def _trip(self, reason: TransitionReason, now: float) -> Transition:
        self._base_open = self._config.recovery_timeout
        return self._open(reason, now)

    def _open(self, reason: TransitionReason, now: float) -> Transition:
        self.quiet = False
        config = self._config
        self._checks_passed = 0
        jitter = config.recovery_jitter
        open_for = self._base_open
        if jitter:
            open_for *= 1.0 + jitter * (2.0 * self._rnd() - 1.0)
        open_for = min(self._max_open, max(0.0, open_for))
        self._open_for = open_for
        self._open_until = now + open_for
        return self._move(_OPEN, reason, now, open_for)

    def _close(self, reason: TransitionReason, now: float) -> Transition:
        self.quiet = False
        previous = self._state
        self._state = _CLOSED
        self._forced = False
        self._consecutive = 0
        self.forget_unconfirmed()
        self._probe_successes = 0
        self._open_until = _INF
        self._open_for = None
        self._base_open = self._config.recovery_timeout
        # The window still describes the outage; a fresh start avoids re-tripping at once.
        self._window.reset()
        if self._config.adaptive_threshold:
            self._next_check = now + self._interval
        return Transition(previous, _CLOSED, reason, now)

    def _move(
        self,
        to_state: CircuitState,
        reason: TransitionReason,
        now: float,
        open_for: float | None = None,
    ) -> Transition:
        self.quiet = False
        self.forget_unconfirmed()
        previous = self._state
        self._state = to_state
        if to_state is _HALF_OPEN:
            self._half_open_at = now
            self._probe_successes = 0
            self._new_episode()
        return Transition(previous, to_state, reason, now, open_for)

    def _health_check(self, now: float) -> None:
        self._next_check = now + self._interval
        window = self._window
        if self._state is not _CLOSED or window.calls(now) < self._min_calls:
            return
        sample = window.failure_rate(now)
        baseline = self._baseline
        baseline = sample if baseline is None else baseline + ADAPTIVE_ALPHA * (sample - baseline)
        self._baseline = baseline
        config = self._config
        self._effective = adaptive_failure_rate_threshold(
            config.failure_rate_threshold,
            baseline,
            config.adaptive_min_threshold,
            config.adaptive_max_threshold,
        )
