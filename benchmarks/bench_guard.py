"""What a guarded *successful* call costs, against the bare call and against peers.

Every contender wraps the same trivial function and is measured in the same run, in
interleaved rounds (so that frequency scaling and noisy neighbours hit them all alike); the
best round of each is kept, as ``timeit`` recommends. Reported: nanoseconds per call, the
overhead over the bare call, and that overhead as a ratio to otel-raptor's.

    make bench            # or: .venv/bin/python benchmarks/bench_guard.py [--rounds N]

Contenders: the bare call; ``@resilient`` (breaker + retry policy armed); otel-raptor's
``CircuitBreaker.call_sync`` alone; pybreaker; circuitbreaker; tenacity; stamina. A peer
that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from collections.abc import Callable
from typing import Any


def work(x: int) -> int:
    return x + 1


def contenders() -> dict[str, Callable[[int], Any]]:
    from otel_raptor import CircuitBreakerConfig, RetryPolicy, Runtime, resilient
    from otel_raptor.runtime.breaker import CircuitBreaker

    runtime = Runtime()  # private, so the process-wide one stays untouched
    found: dict[str, Callable[[int], Any]] = {"bare call": work}
    found["otel-raptor @resilient (breaker + retry)"] = resilient(
        service="bench",
        retry=RetryPolicy(max_retries=3),
        breaker=CircuitBreakerConfig(),
        runtime=runtime,
    )(work)
    breaker = CircuitBreaker("bench-breaker")
    found["otel-raptor CircuitBreaker.call_sync"] = lambda x: breaker.call_sync(work, x)

    try:
        import pybreaker

        found["pybreaker"] = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)(work)
    except ImportError:
        print("note: pybreaker not installed, skipped", file=sys.stderr)
    try:
        from circuitbreaker import circuit

        found["circuitbreaker"] = circuit(failure_threshold=5, recovery_timeout=60)(work)
    except ImportError:
        print("note: circuitbreaker not installed, skipped", file=sys.stderr)
    try:
        import tenacity

        found["tenacity (retry only)"] = tenacity.retry(
            stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_exponential()
        )(work)
    except ImportError:
        print("note: tenacity not installed, skipped", file=sys.stderr)
    try:
        import stamina

        found["stamina (retry only)"] = stamina.retry(on=ConnectionError, attempts=4)(work)
    except ImportError:
        print("note: stamina not installed, skipped", file=sys.stderr)
    return found


def measure(fns: dict[str, Callable[[int], Any]], rounds: int, number: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds = timeit.timeit(lambda fn=fn: fn(1), number=number)  # type: ignore[misc]
            best[name] = min(best[name], seconds / number)
    # timeit's own lambda call is part of every figure, the bare call's included, so it
    # cancels out of the overheads below.
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args(argv)

    fns = contenders()
    for fn in fns.values():  # warm up, and check every contender answers correctly
        assert fn(1) == 2
    best = measure(fns, args.rounds, args.number)
    bare = best["bare call"]
    raptor_name = "otel-raptor @resilient (breaker + retry)"
    raptor = best[raptor_name] - bare

    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"best of {args.rounds} rounds x {args.number} calls, one process"
    )
    print(f"{'contender':44} {'ns/call':>9} {'overhead ns':>12} {'vs raptor':>10}")
    for name, seconds in best.items():
        overhead = seconds - bare
        ratio = "" if name == "bare call" else f"{overhead / raptor:9.1f}x"
        print(f"{name:44} {seconds * 1e9:9.0f} {overhead * 1e9:12.0f} {ratio:>10}")
    verdict = "meets" if raptor < 1e-6 else "MISSES"
    print(
        f"\n@resilient adds {raptor * 1e9:.0f} ns per successful call: {verdict} the < 1 µs target"
    )
    if "pybreaker" in best:
        faster = raptor < best["pybreaker"] - bare
        print(
            f"breaker + retry {'is' if faster else 'is NOT'} cheaper than pybreaker's breaker alone"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
