from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.support import background
from tests.support.clock import FakeClock

# Hypothesis' per-example wall-clock deadline (200 ms) measures the machine, not the code: on
# a 2-CPU CI runner, with the background runs below and the servers' own work, an example of
# a few milliseconds can miss it, and the test fails as "flaky". The properties under test
# take their time from injected clocks; their speed is the benchmarks' business.
settings.register_profile("raptor", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("raptor")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- slow, mostly idle subprocesses run while the other tests do (tests/support/background.py)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read a background run go last: the run has the session to finish."""
    later = [item for item in items if _background_fixtures(item)]
    if later:
        items[:] = [item for item in items if not _background_fixtures(item)] + later


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for name in sorted({name for item in session.items for name in _background_fixtures(item)}):
        background.run_for(name).start()


def pytest_sessionfinish() -> None:
    background.stop_all()


def _background_fixtures(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ())) & background.FIXTURES.keys()
