from __future__ import annotations

import pytest

from tests.support import background
from tests.support.clock import FakeClock


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
