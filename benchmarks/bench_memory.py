"""A cache-heavy workload whose memo cache grows without bound, with and without the controller.

The workload memoizes ``render(key)`` (4 KiB of bytes per key) in a plain ``dict``. Keys come
from a hot window that slides forward over a growing key space (recent keys are reused, old
ones never again), so an unmanaged cache grows for ever while most of it is dead weight.

Each mode runs in its own subprocess, so peak RSS (``ru_maxrss``) is clean:

- ``none``: no controller.
- ``scheduled``: ``SimpleMemoryController`` with a short ``cleanup_interval`` and
  ``max_cache_age`` (seconds of the run, scaled down from the defaults 300 s / 3600 s), so the
  standard level's age-based eviction is what bounds the cache.
- ``pressure``: the default thresholds (70/85/95 %) against a simulated 512 MiB container
  limit (``--limit-mib``); cleanups happen only on pressure crossings.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--steps N] [--limit-mib M]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

VALUE_BYTES = 4096


def workload(mode: str, steps: int, limit_mib: int) -> dict[str, float]:
    import psutil

    from otel_raptor.runtime.memory import MemoryLimit, SimpleMemoryController
    from otel_raptor.runtime.state import Runtime

    cache: dict[int, bytes] = {}
    controller: SimpleMemoryController | None = None
    process = psutil.Process()
    if mode == "scheduled":
        controller = SimpleMemoryController(
            runtime=Runtime(),
            cleanup_interval=0.5,
            max_cache_age=2.0,
            max_working_age=1.0,
            check_interval=0.1,
            cooldown=0.0,
            # Scaled down like the intervals: until entries are max_cache_age old, the first
            # standard runs free nothing, and the default 300 s back-off would outlast the run.
            backoff_base=1.0,
            backoff_max=4.0,
        )
    elif mode == "pressure":
        limit = limit_mib << 20

        def container() -> MemoryLimit:
            rss = int(process.memory_info().rss)
            return MemoryLimit(limit, "cgroup", rss)

        controller = SimpleMemoryController(
            runtime=Runtime(),
            limit_reader=container,
            check_interval=0.1,
            cooldown=0.5,
            cleanup_interval=3600,
            max_cache_age=2.0,
            max_working_age=1.0,
        )
    if controller is not None:
        # low: the critical level may clear it whole; it is only a cache.
        controller.register_cache("render", cache, priority="low")
        controller.start()

    rnd = random.Random(42)
    hits = 0
    started = time.perf_counter()
    for step in range(steps):
        head = step // 4  # the key space grows by one key every four lookups
        key = max(0, head - int(rnd.expovariate(1 / 200)))
        value = cache.get(key)
        if value is None:
            value = bytes((key % 251 + 1,)) * VALUE_BYTES  # the "expensive" render
            cache[key] = value
        else:
            hits += 1
        if step % 1000 == 0:
            time.sleep(0.001)  # an app does other things; lets the controller's thread run
    elapsed = time.perf_counter() - started
    cleanups = 0
    if controller is not None:
        controller.stop()
        stats = controller.get_memory_stats()
        cleanups = len(stats["cleanups"])  # type: ignore[arg-type]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_rss_mib": peak_kib / 1024,
        "hit_rate": hits / steps,
        "final_entries": len(cache),
        "seconds": elapsed,
        "cleanups_recorded": cleanups,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3_000_000)
    parser.add_argument("--limit-mib", type=int, default=512)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(workload(args.child, args.steps, args.limit_mib)))
        return
    results = {}
    for mode in ("none", "scheduled", "pressure"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--steps",
                str(args.steps),
                "--limit-mib",
                str(args.limit_mib),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["none"]["peak_rss_mib"]
    print(f"{args.steps} lookups, {VALUE_BYTES} B values, simulated limit {args.limit_mib} MiB")
    print(
        f"{'mode':<10} {'peak RSS MiB':>12} {'vs none':>8} {'hit rate':>9} {'entries':>8} "
        f"{'seconds':>8} {'cleanups':>9}"
    )
    for mode, r in results.items():
        change = (r["peak_rss_mib"] - base) / base
        print(
            f"{mode:<10} {r['peak_rss_mib']:>12.1f} {change:>+8.0%} {r['hit_rate']:>9.3f} "
            f"{r['final_entries']:>8.0f} {r['seconds']:>8.2f} {r['cleanups_recorded']:>9.0f}"
        )


if __name__ == "__main__":
    main()
