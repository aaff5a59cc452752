"""Slow, mostly idle subprocesses that a test module needs, run while the other tests do.

``otel-raptor demo --quick`` takes 28 s of wall time for 2 s of CPU (its schedule is made of
waits); a fresh venv with ``otel-raptor[requests]`` takes 16 s to build. The root conftest
starts each once collection is over, if a selected test uses its fixture (:data:`FIXTURES`),
and moves those tests to the end of the session so that the run has the whole session to
finish; any run still going when the session ends is stopped, and its files removed. The
fixture takes :meth:`BackgroundRun.result`, which runs the command in the foreground if
nothing started it (``--collect-only``, or a plugin that reorders tests).

Nothing here shares state with another test: each run has its own subprocess, temporary
directory and loopback ports, and the demo's PostgreSQL table and function have random names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["FIXTURES", "BackgroundRun", "run_for", "stop_all"]


class BackgroundRun:
    """``command`` in a subprocess of its own, its output in files of a temporary directory
    (not pipes: nobody reads them while the tests run)."""

    def __init__(self, command: list[str], *, env: dict[str, str], timeout: float) -> None:
        self.command = command
        self.env = env
        self.timeout = timeout
        self._directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._result: subprocess.CompletedProcess[str] | None = None

    def start(self) -> None:
        if self._process is not None:
            return
        self._directory = Path(tempfile.mkdtemp(prefix="raptor_background_"))
        command = [part.replace("{directory}", str(self._directory)) for part in self.command]
        with (
            (self._directory / "stdout").open("wb") as stdout,
            (self._directory / "stderr").open("wb") as stderr,
        ):
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=self.env
            )
        self._started = time.monotonic()

    def result(self) -> subprocess.CompletedProcess[str]:
        """The finished run (started now if it was not): exit status and output. A run past
        its timeout is killed, and fails the test with what it printed."""
        if self._result is not None:
            return self._result
        self.start()
        assert self._process is not None
        try:
            self._process.wait(max(self.timeout - (time.monotonic() - self._started), 0.0))
        except subprocess.TimeoutExpired:
            self._kill()
            raise AssertionError(
                f"{self.command} took more than {self.timeout} s:\n"
                + self._read("stdout")
                + self._read("stderr")
            ) from None
        self._result = subprocess.CompletedProcess(
            self.command, self._process.returncode, self._read("stdout"), self._read("stderr")
        )
        return self._result

    @property
    def directory(self) -> Path:
        """The run's own temporary directory (``{directory}`` in its command), kept until
        the session ends."""
        assert self._directory is not None, "not started"
        return self._directory

    def stop(self) -> None:
        """Kill the subprocess if it still runs, and remove its output files."""
        self._kill()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def _read(self, name: str) -> str:
        assert self._directory is not None
        return (self._directory / name).read_text(encoding="utf-8", errors="replace")


def _demo() -> BackgroundRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return BackgroundRun(
        [sys.executable, "-m", "otel_raptor", "demo", "--quick", "--seed", "7"],
        env=env,
        timeout=90,
    )


#: A new venv, ``{directory}/venv``, with ``otel-raptor[requests]`` from this checkout installed
#: by its own pip, and nothing else (tests/e2e/test_fresh_venv.py).
_FRESH_VENV = """
import subprocess, sys, venv
home, root = sys.argv[1:]
venv.EnvBuilder(with_pip=True, clear=True).create(home)
command = [home + "/bin/python", "-m", "pip", "install", "--quiet", root + "[requests]"]
raise SystemExit(subprocess.run(command, check=False).returncode)
"""


def _fresh_venv() -> BackgroundRun:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    return BackgroundRun(
        [sys.executable, "-c", _FRESH_VENV, "{directory}/venv", root], env=env, timeout=540
    )


#: Fixture name -> how to make its run.
FIXTURES = {"demo_output": _demo, "fresh_venv": _fresh_venv}

_RUNS: dict[str, BackgroundRun] = {}


def run_for(fixture: str) -> BackgroundRun:
    """The run that ``fixture`` reads (made, not started, on first use)."""
    if fixture not in _RUNS:
        _RUNS[fixture] = FIXTURES[fixture]()
    return _RUNS[fixture]


def stop_all() -> None:
    for run in _RUNS.values():
        run.stop()
