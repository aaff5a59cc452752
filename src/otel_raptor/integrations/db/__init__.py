"""The database integrations: one module per driver, on :mod:`._common`.

``psycopg`` (psycopg 3, sync and async), ``psycopg2``, ``asyncpg``, ``pymysql``, ``redis``
(sync, ``redis.asyncio``, pipelines, cluster) and ``sqlite3``. Each imports its driver only
when installed; importing this package imports none of them. See ``docs/databases.md``.
"""

from __future__ import annotations

__all__: list[str] = []
