"""Fork safety: a lock of a database integration held by another thread at ``fork()`` does
not deadlock the child (it is registered with ``runtime.forksafe``)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading

import pytest

from otel_raptor.integrations.db import sqlite3 as integration
from otel_raptor.integrations.db.sqlite3 import SQLiteIntegration
from tests.integrations.db.conftest import Install


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Forking while another thread holds our lock is the point: Python 3.12+ warns of it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_builds_targets_while_the_parent_held_the_lock(install: Install) -> None:
    install(SQLiteIntegration)
    state = integration._installed
    assert state is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with state._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: a new database needs a new target, under that lock
        signal.alarm(5)
        try:
            conn = sqlite3.connect(":memory:")
            conn.execute("SELECT 1")
            os._exit(0 if hasattr(conn, integration.TARGET_ATTRIBUTE) else 3)
        except BaseException:
            os._exit(1)
    release.set()
    holder.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
