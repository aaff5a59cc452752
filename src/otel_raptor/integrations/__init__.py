"""One thin module per hooked library; each imports its library lazily.

:data:`INTEGRATIONS` maps an integration's name (as used by ``OTEL_PYTHON_RAPTOR_INTEGRATIONS``)
to the ``"module:Class"`` path of a class implementing
:class:`~otel_raptor.integrations._base.Integration`. The instrumentor imports only the ones it
installs, so importing this package imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["INTEGRATIONS"]

#: name -> ``"module:Class"``, in installation order.
INTEGRATIONS: Mapping[str, str] = MappingProxyType(
    {
        "requests": "otel_raptor.integrations.requests:RequestsIntegration",
        "httpx": "otel_raptor.integrations.httpx:HttpxIntegration",
        "asyncio": "otel_raptor.integrations.asyncio:AsyncioIntegration",
        "psycopg": "otel_raptor.integrations.db.psycopg:PsycopgIntegration",
        "psycopg2": "otel_raptor.integrations.db.psycopg2:Psycopg2Integration",
        "asyncpg": "otel_raptor.integrations.db.asyncpg:AsyncpgIntegration",
        "pymysql": "otel_raptor.integrations.db.pymysql:PyMySQLIntegration",
        "redis": "otel_raptor.integrations.db.redis:RedisIntegration",
        "sqlite3": "otel_raptor.integrations.db.sqlite3:SQLiteIntegration",
    }
)
