"""``otel-raptor demo``: the whole thing in a subprocess, plus the server's own accounting.

The subprocess tests run ``python -m otel_raptor demo --quick`` (28 s of waiting, run in the
background while the other tests run: tests/support/background.py) and check that the table
is there, that it compares both runs, and that the measured numbers tell the story the demo
exists to tell. The server tests check the two measurements the table relies on that are
easy to get wrong: Retry-After accounting and the refused half of the outage.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests

from otel_raptor._demo.server import CLIENT_HEADER, FaultServer, Phase, Schedule
from otel_raptor.errors import ConfigError
from tests.support import background

_TINY = 0.001


def _cells(output: str, label: str) -> tuple[str, str]:
    """The plain and raptor cells of the table row ``label``."""
    for line in output.splitlines():
        if line.startswith(label + " "):
            cells = re.split(r"\s{2,}", line[len(label) :].strip())
            assert len(cells) == 2, line
            return cells[0], cells[1]
    raise AssertionError(f"no row {label!r} in:\n{output}")


def _percent(cell: str) -> float:
    assert cell.endswith(" %"), cell
    return float(cell[:-2])


def _millis(cell: str) -> float:
    assert cell.endswith(" ms"), cell
    return float(cell[:-3])


@pytest.fixture(scope="module")
def demo_output() -> str:
    """``python -m otel_raptor demo --quick --seed 7`` (no ``OTEL_*`` variables): started in
    the background as the session began (tests/support/background.py; these tests run
    last), as it spends 28 s waiting."""
    result = background.run_for("demo_output").result()
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_table_compares_both_runs(demo_output: str) -> None:
    assert re.search(r"^ +plain +raptor$", demo_output, re.MULTILINE)
    plain_calls, raptor_calls = _cells(demo_output, "calls made")
    assert int(plain_calls) > 50
    assert int(raptor_calls) > 20
    plain_rate, raptor_rate = map(_percent, _cells(demo_output, "success rate"))
    assert 0 < plain_rate < 100
    assert raptor_rate >= plain_rate


def test_latencies_are_measured(demo_output: str) -> None:
    plain_p50, raptor_p50 = map(_millis, _cells(demo_output, "latency p50"))
    plain_p99, raptor_p99 = map(_millis, _cells(demo_output, "latency p99"))
    assert 0 < plain_p50 <= plain_p99
    assert 0 < raptor_p50 <= raptor_p99
    # The plain run sat out its 0.3 s timeout against the hanging server.
    assert plain_p99 >= 250


def test_raptor_respects_retry_after_and_spares_the_dead_server(demo_output: str) -> None:
    plain_early, raptor_early = map(int, _cells(demo_output, "requests before Retry-After expired"))
    assert plain_early > 0  # plain ignores Retry-After: the server saw it
    assert raptor_early == 0
    plain_reads, raptor_reads = map(int, _cells(demo_output, "outage: requests read by the server"))
    plain_refused, raptor_refused = map(int, _cells(demo_output, "outage: connections refused"))
    assert plain_refused > 10  # it kept knocking on the closed port
    assert raptor_refused < plain_refused
    assert raptor_reads + raptor_refused < plain_reads + plain_refused


def test_the_breaker_and_telemetry_show_up(demo_output: str) -> None:
    plain, raptor = _cells(demo_output, "breaker transitions")
    assert plain == "-"
    assert int(raptor) >= 2  # at least opened, then half-opened to probe
    assert "closed -> open" in demo_output
    for name in ("raptor.errors", "raptor.retries", "raptor.circuit_breaker.transitions"):
        assert re.search(rf"^  {re.escape(name)} +\d+", demo_output, re.MULTILINE), name
    assert "raptor.recovery" in demo_output


def test_the_database_phase(demo_output: str) -> None:
    """PostgreSQL when one answers (the proxied outage included), SQLite otherwise."""
    assert "Database phase: " in demo_output
    assert _cells(demo_output, "acknowledged writes lost") == ("0", "0")
    assert _cells(demo_output, "writes applied twice") == ("0", "0")
    plain, raptor = _cells(demo_output, "acknowledged, conflicts")
    assert float(raptor.split(" %")[0]) > float(plain.split(" %")[0])  # conflicts retried
    if "Database phase: PostgreSQL" in demo_output:
        plain_wait, raptor_wait = map(_millis, _cells(demo_output, "failed call (outage), p50"))
        assert plain_wait >= 1000  # it waited out its connect timeout
        assert raptor_wait < 100  # the breaker answered at once
        assert "closed -> open" in demo_output.rsplit("Database phase: ", maxsplit=1)[-1]


# -- the server's measurements ---------------------------------------------------------------


def test_the_server_counts_requests_sent_before_its_retry_after_expired() -> None:
    schedule = Schedule(healthy=_TINY, flaky=_TINY, rate_limited=30.0, quota=2)
    with FaultServer(schedule) as server:
        server.begin_run()
        time.sleep(0.01)
        with requests.Session() as polite, requests.Session() as other:
            polite.headers[CLIENT_HEADER] = "polite"
            other.headers[CLIENT_HEADER] = "other"
            codes = [polite.get(server.url("/x"), timeout=2).status_code for _ in range(3)]
            refused = polite.get(server.url("/x"), timeout=2)
            assert other.get(server.url("/x"), timeout=2).status_code == 200
        log = server.end_run()
    assert codes == [200, 200, 429]
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert [(r.client, r.status, r.early) for r in log.requests] == [
        ("polite", 200, False),
        ("polite", 200, False),
        ("polite", 429, False),
        ("polite", 429, True),  # sent right after being told to wait a second
        ("other", 200, False),  # the quota and the Retry-After are per client
    ]
    assert log.early == 1
    assert {r.phase for r in log.requests} == {Phase.RATE_LIMITED}


def test_the_server_refuses_connections_during_the_outage_then_listens_again() -> None:
    schedule = Schedule(
        healthy=_TINY,
        flaky=_TINY,
        rate_limited=_TINY,
        outage_hang=_TINY,
        outage_refused=0.4,
        recovered=5.0,
    )
    with FaultServer(schedule) as server:
        assert requests.get(server.url("/"), timeout=2).status_code == 200  # idle: healthy
        server.begin_run()
        time.sleep(0.1)
        assert server.phase() is Phase.OUTAGE_REFUSED
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        time.sleep(0.45)
        assert server.phase() is Phase.RECOVERED
        assert requests.get(server.url("/"), timeout=2).status_code == 200
        log = server.end_run()
    assert [(r.phase, r.status) for r in log.requests] == [(Phase.RECOVERED, 200)]


def test_a_bad_schedule_is_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"demo\.schedule\.flaky"):
        Schedule(flaky=0)
    with pytest.raises(ConfigError, match=r"demo\.schedule\.retry_after"):
        Schedule(retry_after=0)
    assert Schedule.quick().total == pytest.approx(5.2)
    assert Schedule().total == pytest.approx(22.0)
