"""Instructions raptor adds to one call, counted rather than timed.

``bench_http.py`` and ``bench_db.py`` time a loopback round trip, and on a shared VM their
noise (interquartile ranges of ±10 % on some hosts) can be wider than the 1.5 % and 2 %
targets. This counts work instead. For each target the same child process runs once per
configuration under valgrind's callgrind, which collects only inside one ``functools.reduce``
call that makes ``--calls`` calls; imports, set-up, warm-up and every other thread are left
out. The figures are instructions per call and what raptor adds, also as a share of the plain
call's instructions. They repeat from run to run and from host to host (same CPython, same
libraries), whatever else the machine is doing.

What the share is not: the wall-clock overhead. It counts the client's user-space
instructions only: the kernel's loopback work and the server's are left out, so the
denominator is smaller than the round trip's real cost. And an instruction is not a fixed
time: code that runs once per request between two requests' worth of other work misses the
CPU caches more than the request's own code does. The share says how much work raptor adds;
``bench_http.py`` and ``bench_db.py`` say what that work costs on a given machine.

Targets: ``httpx`` and ``requests`` (a GET to ``bench_http.py``'s loopback server), and
``psycopg``, ``asyncpg``, ``pymysql`` (``SELECT 1``) and ``redis`` (``GET``) against the
servers ``bench_db.py`` uses. Configurations: ``plain``; ``pass-through`` (a plain function
on the method raptor hooks, calling the original: the least any hook of that shape costs);
``raptor`` (``RaptorInstrumentor`` with SDK providers, its timer-driven threads left out: see
``_instrument``); and for the databases ``raptor, timeout 0`` (no default statement timeout).
Each call includes the benchmarks' own timing of it (two ``perf_counter`` reads), in every
configuration alike. The garbage collector is off while counting (see ``child``), and
``PYTHONHASHSEED`` is fixed.

``--cache-sim`` also simulates the caches (valgrind's ``--cache-sim=yes``: the host's L1 and
last-level geometry) and reports L1 instruction and data misses per call: for code that runs
once between two round trips' worth of other work, distinct cache lines touched say more about
its time than its instructions do.

    .venv/bin/python benchmarks/count_overhead.py [--target httpx ...] [--calls N] [--jobs J]
        [--config pass-through ...] [--cache-sim]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_db  # noqa: E402 - the benchmarks directory is not a package
import bench_http  # noqa: E402

HTTP_TARGETS = ("httpx", "requests")
DB_TARGETS = ("psycopg", "asyncpg", "pymysql", "redis")
TARGETS = HTTP_TARGETS + DB_TARGETS
# Per target: an httpx or requests round trip is 8 to 60 times a database call's client work.
DEFAULT_CALLS = {"httpx": 300, "requests": 300}
DB_CALLS = 3000
WARMUP = 200
# The C function inside which callgrind collects (``--toggle-collect``).
COLLECTED = "functools_reduce"


def configurations(target: str) -> tuple[str, ...]:
    if target in HTTP_TARGETS:
        return ("plain", "pass-through", "raptor")
    return ("plain", "pass-through", "raptor", "raptor, timeout 0")


def _pass_through(target: str) -> None:
    """The cheapest hook there is, on the method raptor hooks: a plain function that calls
    the original with what it was given. What any hook of this shape costs, before it does
    anything (the databases' is ``bench_db``'s bare hook)."""
    if target in DB_TARGETS:
        bench_db.patch_bare_hook(target)
        return
    if target == "httpx":
        import httpx

        owner: Any = httpx.Client
    else:
        import requests

        owner = requests.Session
    original = owner.send

    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    owner.send = hook


# ------------------------------------------------------------------------------ the child


def _instrument(config: str) -> None:
    """``config``'s raptor, without the threads that run on timers rather than per call
    (the memory controller, the monitor, a batch span processor): under valgrind, which runs
    everything tens of times slower, a timer fires that many times as often per call as it
    would natively, and the main thread pays for handing them the GIL."""
    if config == "plain":
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from otel_raptor import RaptorInstrumentor

    extra = {"statement_timeout": 0} if config.endswith("timeout 0") else {}
    RaptorInstrumentor().instrument(
        tracer_provider=TracerProvider(shutdown_on_exit=False),
        meter_provider=MeterProvider(
            metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False
        ),
        memory=False,
        monitor=False,
        **extra,
    )


def _calls(target: str, config: str, url: str | None) -> Callable[[int], object]:
    """Set up ``target`` under ``config``; a function making ``n`` calls."""
    if config == "pass-through":
        _pass_through(target)
    else:
        _instrument(config)
    if target in HTTP_TARGETS:
        assert url is not None
        get = bench_http._client(target, url)

        def run_http(n: int) -> None:
            perf_counter = time.perf_counter
            for _ in range(n):
                start = perf_counter()
                get()
                perf_counter() - start

        return run_http
    return bench_db._statement(target)


def child(target: str, config: str, calls: int, url: str | None) -> None:
    run = _calls(target, config, url)
    run(WARMUP)
    # No collection while counting: when one runs depends on other threads' allocations (the
    # counter is process-wide), so the counts would vary by whole collections from run to
    # run. Raptor's hooks leave no garbage of their own (what they allocate dies with the
    # call), so no collection's cost is theirs.
    gc.collect()
    gc.disable()
    functools.reduce(lambda _, __: run(calls), [None], None)


# ----------------------------------------------------------------------------- the parent


#: callgrind's events summed into what the report shows (``--cache-sim``): L1 misses, with
#: data reads' and writes' together.
L1_MISSES = {"I1 misses": ("I1mr",), "D1 misses": ("D1mr", "D1mw")}


def _main_thread_events(directory: Path) -> dict[str, int]:
    """The events collected on the main thread (callgrind's ``-01`` file): ``Ir``, and with
    ``--cache-sim=yes`` the L1 and last-level misses."""
    [main] = directory.glob("callgrind.out*-01")
    text = main.read_text()
    names = re.search(r"^events:\s*(.+)$", text, re.MULTILINE)
    summary = re.search(r"^summary:\s*(.+)$", text, re.MULTILINE)
    if names is None or summary is None:
        raise RuntimeError(f"no events or summary in {main}")
    return dict(zip(names.group(1).split(), map(int, summary.group(1).split()), strict=False))


def count(
    target: str, config: str, calls: int, url: str | None, *, cache_sim: bool = False
) -> dict[str, float]:
    """Instructions (``Ir``) per call of ``target`` under ``config``, and with ``cache_sim``
    its L1 misses per call (:data:`L1_MISSES`)."""
    with tempfile.TemporaryDirectory(prefix="raptor-count-") as scratch:
        directory = Path(scratch)
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--toggle-collect={COLLECTED}",
            "--separate-threads=yes",
            f"--cache-sim={'yes' if cache_sim else 'no'}",
            f"--callgrind-out-file={directory}/callgrind.out",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            target,
            config,
            "--calls",
            str(calls),
        ]
        if url is not None:
            command += ["--url", url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        # Every process would otherwise hash strings with its own seed, and dictionary
        # probes (hence the counts) would differ from run to run.
        env["PYTHONHASHSEED"] = "0"
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{target}/{config} failed:\n{result.stderr[-2000:]}")
        events = _main_thread_events(directory)
    counted = {"Ir": events["Ir"] / calls}
    if cache_sim:
        for shown, names in L1_MISSES.items():
            counted[shown] = sum(events[name] for name in names) / calls
    return counted


def report(results: dict[tuple[str, str], dict[str, float]], targets: Sequence[str]) -> None:
    misses = [name for name in L1_MISSES if name in next(iter(results.values()))]
    print(
        f"\n{'target':<9} {'configuration':<18} {'instructions/call':>18}"
        f" {'added':>10} {'added %':>8}"
        + "".join(f" {name + '/call':>15} {'added':>8}" for name in misses)
    )
    for target in targets:
        plain = results[target, "plain"]
        for config in configurations(target):
            if (target, config) not in results:
                continue
            counted = results[target, config]
            value = counted["Ir"]
            added = value - plain["Ir"]
            shown = (
                "" if config == "plain" else f"{added:>+10,.0f} {added / plain['Ir'] * 100:>+7.2f}%"
            )
            line = f"{target:<9} {config:<18} {value:>18,.0f} {shown:>19}"
            for name in misses:
                more = "" if config == "plain" else f"{counted[name] - plain[name]:>+8.1f}"
                line += f" {counted[name]:>15.1f} {more:>8}"
            print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", choices=TARGETS, action="append", help="default: all")
    parser.add_argument("--calls", type=int, help="calls counted per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--config",
        action="append",
        help="only these configurations (plain is always counted; default: all)",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches: L1 instruction and data misses per call (slower)",
    )
    parser.add_argument("--child", nargs=2, metavar=("TARGET", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        target, config = args.child
        child(target, config, args.calls, args.url)
        return 0

    if subprocess.run(["valgrind", "--version"], capture_output=True, check=False).returncode:
        print("valgrind is needed (Debian package valgrind)", file=sys.stderr)
        return 2
    targets = tuple(args.target or TARGETS)
    print(bench_http.describe_machine(), flush=True)
    server = None
    url = None
    if any(target in HTTP_TARGETS for target in targets):
        server = bench_http._spawn(["--serve"])
        url = f"http://127.0.0.1:{int(bench_http._pipes(server)[1].readline())}/"
    started = time.monotonic()
    try:
        wanted = {"plain", *args.config} if args.config else None
        runs = [
            (target, config)
            for target in targets
            for config in configurations(target)
            if wanted is None or config in wanted
        ]

        def one(run: tuple[str, str]) -> dict[str, float]:
            target, config = run
            calls = args.calls or DEFAULT_CALLS.get(target, DB_CALLS)
            url_of = url if target in HTTP_TARGETS else None
            return count(target, config, calls, url_of, cache_sim=args.cache_sim)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            counted = list(pool.map(one, runs))
        report(dict(zip(runs, counted, strict=True)), targets)
        print(f"({time.monotonic() - started:.0f} s)")
    finally:
        if server is not None:
            with contextlib.suppress(OSError):
                bench_http._pipes(server)[0].close()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
