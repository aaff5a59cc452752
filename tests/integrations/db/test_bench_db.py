"""``benchmarks/bench_db.py --mode paired`` runs and reports, on tiny sizes (its numbers are
the benchmark's business, not the suite's): a benchmark that stopped working would otherwise
go unnoticed until someone needed its figures."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).parents[3] / "benchmarks" / "bench_db.py"


@pytest.mark.usefixtures("postgres", "mysql", "redis_server")
def test_the_paired_measurement_reports_every_driver() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--mode", "paired", "--pairs", "300", "--warmup", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for driver in ("psycopg", "asyncpg", "pymysql", "redis"):
        for row in ("plain", "bare hook", "raptor", "raptor/bare hook"):
            assert re.search(rf"^{driver} +{re.escape(row)} +[+-]?\d", out, re.M), (driver, row)
        assert re.search(rf"^{driver}: raptor's hook adds [+-]\d", out, re.M), driver
    for driver in ("psycopg", "asyncpg", "pymysql"):  # the servers' statement timeout
        assert re.search(rf"^{driver} +plain \+ timeout +[+-]\d", out, re.M), driver
