"""``RaptorInstrumentor().instrument()`` installs every database integration whose driver is
installed, ``OTEL_PYTHON_RAPTOR_INTEGRATIONS`` selects them, and ``uninstrument()`` puts every
hooked function back. This module imports the drivers, so they are hooked at once; the last
test checks, in a fresh process, that each is hooked by the app's own import instead."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import asyncpg
import psycopg
import psycopg2
import pymysql.cursors
import pytest
import redis

from otel_raptor import RaptorInstrumentor
from otel_raptor import environment_variables as ev

DATABASES = ("psycopg", "psycopg2", "asyncpg", "pymysql", "redis", "sqlite3")
ORIGINALS = {
    "psycopg": (psycopg.Cursor, "execute", psycopg.Cursor.execute),
    "psycopg2": (psycopg2, "connect", psycopg2.connect),
    "pymysql": (pymysql.cursors.Cursor, "execute", pymysql.cursors.Cursor.execute),
    "redis": (redis.Redis, "execute_command", redis.Redis.execute_command),
    "sqlite3": (sqlite3, "connect", sqlite3.connect),
    "asyncpg": (asyncpg, "connect", asyncpg.connect),
}


def test_instrument_installs_every_database_integration() -> None:
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(memory=False)
    try:
        installed = instrumentor.installed_integrations
        assert tuple(name for name in installed if name in DATABASES) == DATABASES
        for owner, name, original in ORIGINALS.values():
            assert getattr(owner, name) is not original
    finally:
        instrumentor.uninstrument()
    for owner, name, original in ORIGINALS.values():
        assert getattr(owner, name) is original


def test_the_environment_selects_integrations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_INTEGRATIONS, "redis,sqlite3")
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(memory=False)
    try:
        assert instrumentor.installed_integrations == ("redis", "sqlite3")
        assert psycopg.Cursor.execute is ORIGINALS["psycopg"][2]
    finally:
        instrumentor.uninstrument()


FRESH_PROCESS = """
import json, sys
before = set(sys.modules)
from otel_raptor import RaptorInstrumentor
instrumentor = RaptorInstrumentor()
instrumentor.instrument(memory=False, monitor=False)
imported = sorted(m.split(".")[0] for m in set(sys.modules) - before)
deferred = instrumentor.deferred_integrations
import redis
from psycopg2 import connect
import pymysql.cursors
hooked = [redis.Redis.execute_command, connect, pymysql.cursors.Cursor.execute]
installed = instrumentor.installed_integrations
instrumentor.uninstrument()
import psycopg2
originals = [redis.Redis.execute_command, psycopg2.connect, pymysql.cursors.Cursor.execute]
replaced = [h is not o for h, o in zip(hooked, originals)]
print(json.dumps([imported, deferred, installed, replaced]))
"""


def test_drivers_are_hooked_when_the_app_imports_them() -> None:
    """In a fresh process, ``instrument()`` imports no driver (nor requests, nor httpx): each
    is hooked by the app's own ``import``, ``from ... import`` included."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    imported, deferred, installed, replaced = json.loads(result.stdout)
    libraries = {"requests", "httpx", *DATABASES}
    assert not libraries & set(imported)
    assert set(deferred) <= libraries
    assert {"redis", "psycopg2", "pymysql", "psycopg", "asyncpg"} <= set(deferred)
    assert {"redis", "psycopg2", "pymysql"} <= set(installed)
    # What the app got after its import was the hook, and uninstrument() put the original back.
    assert replaced == [True, True, True]
