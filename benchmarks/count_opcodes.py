"""CPython opcodes one call executes, raptor's own and in all, counted with ``sys.settrace``.

A companion to ``count_overhead.py`` (whose set-up it reuses): where callgrind counts machine
instructions, this counts the bytecode instructions the interpreter runs per call, by code
object, over ``--calls`` calls after a warm-up. It takes seconds, needs no valgrind, and is
deterministic; an opcode is not a fixed cost (a ``CALL`` of a C function may be hundreds of
instructions), so read it next to the instruction counts.

    .venv/bin/python benchmarks/count_opcodes.py psycopg raptor [--calls 50] [--by-code]
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import count_overhead  # the benchmarks directory is not a package


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("target", choices=count_overhead.TARGETS)
    parser.add_argument("config", help="plain, pass-through, raptor, 'raptor, timeout 0'")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--url", help="the HTTP targets' server (see count_overhead.py)")
    parser.add_argument("--by-code", action="store_true", help="raptor's opcodes per function")
    options = parser.parse_args(argv)
    run = count_overhead._calls(options.target, options.config, options.url)
    run(count_overhead.WARMUP)
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            code = frame.f_code
            counts[code.co_filename, code.co_name, code.co_firstlineno] += 1
        return tracer

    gc.disable()
    sys.settrace(tracer)
    try:
        run(options.calls)
    finally:
        sys.settrace(None)
    n = options.calls
    ours = {key: value for key, value in counts.items() if "otel_raptor" in key[0]}
    print(
        f"{options.target} {options.config}: {sum(counts.values()) / n:.1f} opcodes per call, "
        f"{sum(ours.values()) / n:.1f} of them raptor's"
    )
    if options.by_code:
        for (filename, name, line), value in sorted(ours.items(), key=lambda item: -item[1]):
            print(f"  {value / n:7.1f}  {filename.rpartition('otel_raptor/')[2]}:{line} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
