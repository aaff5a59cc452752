"""Prediction quality over synthetic resource traces, through the predictor's real pipeline.

Each trace is a process-memory series (as a fraction of its limit) sampled every 30 s of
simulated time for up to 6 hours, fed to ``PredictiveFailure.tick`` through a scripted sampler
(so the window, the forecast, the alarm and its hysteresis are exactly the runtime's, with the
default options: 60-sample window, 30-minute horizon). Traces:

* ``steady``: flat at 50 % with noise (sigma 1.5 % of the limit). Never fails.
* ``slow_leak``: flat for 1 h, then a leak that reaches the limit 5 h later.
* ``fast_leak``: flat for 2 h, then a leak that reaches the limit in 40 minutes.
* ``spike``: flat at 50 %, a 3-sample spike to 92 % at 2 h, back to 50 %. Never fails.
* ``sawtooth``: GC-like: rises from 40 % to 75 % over 10 minutes, collected back, repeat.
  Never fails.
* ``step``: 40 %, stepping up to 65 % at 3 h (a deploy loading more). Never fails.

A raise (not an escalation) counts as a true positive when it comes after the leak started and
before the limit is reached; any other raise is a false alarm. Recall: failing traces with a
true positive; precision: true positives over raises; lead time: from the first true positive
to the failure.

Run: ``.venv/bin/python benchmarks/bench_prediction.py [--seeds 10]``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from otel_raptor.core.events import Event, FailurePredicted
from otel_raptor.runtime.predictor import PredictiveFailure, PredictorOptions
from otel_raptor.runtime.sampler import ResourceSample
from otel_raptor.runtime.state import Runtime

INTERVAL_S = 30.0
DURATION_S = 6 * 3600.0
LIMIT = 1_000_000_000  # bytes; the traces are fractions of it
NOISE = 0.015
WIDTHS = (6, 6, 6, 9, 16)

Trace = Callable[[float, random.Random], float]


@dataclass(frozen=True)
class Scenario:
    name: str
    value: Trace
    leak_start_s: float | None  # None: this trace never fails


def _steady(t: float, rnd: random.Random) -> float:
    return 0.5 + rnd.gauss(0, NOISE)


def _leak(start: float, base: float, to_limit_s: float) -> Trace:
    def value(t: float, rnd: random.Random) -> float:
        grown = max(0.0, t - start) * (1.0 - base) / to_limit_s
        return base + grown + rnd.gauss(0, NOISE)

    return value


def _spike(t: float, rnd: random.Random) -> float:
    spike = 7200.0 <= t < 7200.0 + 3 * INTERVAL_S
    return (0.92 if spike else 0.5) + rnd.gauss(0, NOISE)


def _sawtooth(t: float, rnd: random.Random) -> float:
    phase = (t % 600.0) / 600.0
    return 0.40 + 0.35 * phase + rnd.gauss(0, NOISE)


def _step(t: float, rnd: random.Random) -> float:
    return (0.65 if t >= 3 * 3600.0 else 0.40) + rnd.gauss(0, NOISE)


SCENARIOS = (
    Scenario("steady", _steady, None),
    Scenario("slow_leak", _leak(3600.0, 0.3, 5 * 3600.0), 3600.0),
    Scenario("fast_leak", _leak(7200.0, 0.3, 40 * 60.0), 7200.0),
    Scenario("spike", _spike, None),
    Scenario("sawtooth", _sawtooth, None),
    Scenario("step", _step, None),
)


class SimClock:
    """Simulated time: advanced by the sampler, never by sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def sleep_async(self, seconds: float) -> None:
        self.now += seconds


class ScriptedSampler:
    """Feeds ``value(t)`` as process RSS against ``LIMIT``, advancing the fake clock."""

    def __init__(self, value: Trace, rnd: random.Random, clock: SimClock) -> None:
        self._value = value
        self._rnd = rnd
        self._clock = clock
        self.t = 0.0
        self.last = 0.0

    def sample(self) -> ResourceSample:
        self.last = self._value(self.t, self._rnd)
        rss = int(self.last * LIMIT)
        sample = ResourceSample(
            timestamp=self.t,
            pid=0,
            cpu_percent=0.0,
            process_cpu_percent=0.0,
            memory_total=4 * LIMIT,
            memory_available=3 * LIMIT,
            memory_used=LIMIT,
            process_rss=rss,
            memory_limit=4 * LIMIT,
            memory_current=LIMIT,
            cgroup_limited=False,
            process_memory_limit=LIMIT,
            disks=(),
            net_errors_per_s=0.0,
            net_drops_per_s=0.0,
            connections=None,
            open_fds=None,
            fd_limit=None,
            threads=1,
        )
        self.t += INTERVAL_S
        self._clock.advance(INTERVAL_S)
        return sample


@dataclass
class Result:
    raises: int = 0
    true_positives: int = 0
    detected: bool = False
    lead_s: float | None = None
    hours: float = 0.0


def run(scenario: Scenario, seed: int, options: PredictorOptions) -> Result:
    rnd = random.Random(seed)
    clock = SimClock()
    runtime = Runtime(clock=clock)
    sampler = ScriptedSampler(scenario.value, rnd, clock)
    predictor = PredictiveFailure(options, sampler=sampler, runtime=runtime, clock=clock)
    raises: list[float] = []  # when each alarm went up (escalations excluded)
    up = False

    def on_event(event: Event) -> None:
        nonlocal up
        if not isinstance(event, FailurePredicted):
            return
        if event.cleared:
            up = False
        elif not up:
            up = True
            raises.append(sampler.t - INTERVAL_S)

    runtime.bus.subscribe(on_event)
    failed_at: float | None = None
    while sampler.t < DURATION_S:
        predictor.tick()
        if scenario.leak_start_s is not None and sampler.last >= 1.0:
            failed_at = sampler.t - INTERVAL_S
            break
    leak = scenario.leak_start_s
    result = Result(raises=len(raises))
    if leak is not None:
        end = failed_at if failed_at is not None else math.inf
        hits = [at for at in raises if leak <= at < end]
        result.true_positives = len(hits)
        result.detected = bool(hits) and failed_at is not None
        if result.detected and failed_at is not None:
            result.lead_s = failed_at - hits[0]
        result.hours = leak / 3600.0
    else:
        result.hours = sampler.t / 3600.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    options = PredictorOptions(resources=("process_memory",), builtin_actions=False)
    horizon = options.horizon_s
    print(
        f"interval {INTERVAL_S:.0f} s, horizon {horizon:.0f} s, window {options.window} samples,"
        f" {args.seeds} seeds per trace, noise sigma {NOISE:.1%} of the limit"
    )
    started = time.perf_counter()
    all_raises = all_tp = failing = detected = 0
    false_alarms = 0
    quiet_hours = 0.0
    leads: dict[str, list[float]] = {}
    header = ("trace", "raises", "true+", "false+", "detected", "lead s (median)")
    print(
        f"{header[0]:<10} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], WIDTHS, strict=True))
    )
    for scenario in SCENARIOS:
        raises = tps = found = 0
        trace_leads: list[float] = []
        for seed in range(args.seeds):
            result = run(scenario, seed, options)
            raises += result.raises
            tps += result.true_positives
            quiet_hours += result.hours
            if scenario.leak_start_s is not None:
                found += result.detected
                if result.lead_s is not None:
                    trace_leads.append(result.lead_s)
        false = raises - tps
        all_raises += raises
        all_tp += tps
        false_alarms += false
        if scenario.leak_start_s is not None:
            failing += args.seeds
            detected += found
            leads[scenario.name] = trace_leads
        lead = f"{statistics.median(trace_leads):.0f}" if trace_leads else "-"
        det = f"{found}/{args.seeds}" if scenario.leak_start_s is not None else "-"
        row = (raises, tps, false, det, lead)
        print(
            f"{scenario.name:<10} "
            + " ".join(f"{c:>{w}}" for c, w in zip(row, WIDTHS, strict=True))
        )
    precision = all_tp / all_raises if all_raises else math.nan
    recall = detected / failing if failing else math.nan
    per_hour = false_alarms / quiet_hours if quiet_hours else 0.0
    print()
    print(f"precision            {precision:.1%}   (target >= 90 %)")
    print(f"recall               {recall:.1%}   (target >= 90 %)")
    print(f"false alarms / hour  {per_hour:.3f}   (over {quiet_hours:.0f} h without a leak)")
    for name, values in leads.items():
        median = statistics.median(values) if values else math.nan
        verdict = "met" if median >= horizon / 2 else "MISSED"
        print(f"median lead {name:<9} {median:.0f} s   (target >= {horizon / 2:.0f} s: {verdict})")
    misses = []
    if not precision >= 0.9:
        misses.append("precision")
    if not recall >= 0.9:
        misses.append("recall")
    if any(not (statistics.median(v) if v else 0) >= horizon / 2 for v in leads.values()):
        misses.append("lead time")
    print("targets: " + ("all met" if not misses else "MISSED: " + ", ".join(misses)))
    print(f"(ran in {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
