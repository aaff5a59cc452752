"""``RaptorInstrumentor().instrument()`` installs every database integration whose driver is
installed, ``OTEL_PYTHON_RAPTOR_INTEGRATIONS`` selects them, and ``uninstrument()`` puts every
hooked function back."""

from __future__ import annotations

import sqlite3

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
}


def test_instrument_installs_every_database_integration() -> None:
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(memory=False)
    try:
        assert instrumentor.installed_integrations[3:] == DATABASES
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
