"""Shared fixtures of the database integration tests.

``install(Integration, **options)`` installs one integration on a fresh runtime with fast
settings (retries after 10-50 ms, a breaker that opens after 3 failures in a row and probes
after 0.5 s) and records the runtime's events in ``install.events``; everything is uninstalled
after the test. Tables and keys are named ``raptor_db_<test>_<random>`` (``unique_name``), so
tests never collide on the shared servers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from otel_raptor.config import DownstreamOverride, RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.events import Event
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.runtime.state import Runtime
from tests.support.services import MYSQL, POSTGRES, REDIS, require_service

PG_DSN = f"host={POSTGRES[0]} port={POSTGRES[1]} dbname=test user=postgres"
PG_URL = f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/test"
MYSQL_KWARGS: dict[str, Any] = {
    "host": MYSQL[0],
    "port": MYSQL[1],
    "user": "root",
    "password": "",
    "database": "test",
}


class Installed:
    """What ``install`` set up: the runtime, its events, and the integration."""

    def __init__(self, runtime: Runtime, integration: Any) -> None:
        self.runtime = runtime
        self.integration = integration
        self.events: list[Event] = []
        runtime.bus.subscribe(self.events.append)

    def of(self, kind: type, service: str | None = None) -> list[Any]:
        """The events of type ``kind`` (about ``service`` only, when given)."""
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (
                service is None
                or getattr(e, "service", None) == service
                or getattr(e, "breaker", None) == service
            )
        ]


def fast_config(
    *,
    max_retries: int = 3,
    attempt_timeout: float | None = None,
    failure_threshold: int = 3,
    minimum_calls: int = 20,
    recovery_timeout: float = 0.5,
    statement_timeout: float = 30.0,
    downstreams: tuple[DownstreamOverride, ...] = (),
    **config: Any,
) -> RaptorConfig:
    return RaptorConfig(
        retry=RetryPolicy(
            max_retries=max_retries,
            base_delay=0.01,
            max_delay=0.05,
            attempt_timeout=attempt_timeout,
        ),
        breaker=CircuitBreakerConfig(
            failure_threshold=failure_threshold,
            minimum_calls=minimum_calls,
            recovery_timeout=recovery_timeout,
            max_recovery_timeout=max(recovery_timeout, 1.0),
            recovery_jitter=0.0,
            success_threshold=1,
        ),
        statement_timeout=statement_timeout,
        downstreams=downstreams,
        **config,
    )


Install = Callable[..., Installed]


async def cancel_acknowledged(con: Any) -> None:
    """Wait until the server has acknowledged the cancellation of ``con``'s timed-out statement.

    asyncpg sends the CancelRequest on a second connection in the background, and the next
    statement on ``con`` first waits for its acknowledgement within that statement's own
    timeout: past it, asyncpg terminates ``con`` and raises TimeoutError before sending
    anything. On a loaded machine the cancel round trip outlasts a short timeout, so a test
    timing out statements one after another on one connection must wait here in between, or
    its next TimeoutError is that wait's (and the statement after it finds ``con`` closed).
    Private to asyncpg, but its own pool waits this way before releasing a connection."""
    await con._protocol._wait_for_cancellation()


@pytest.fixture
def install() -> Iterator[Install]:
    done: list[Any] = []

    def run(integration_type: type, **options: Any) -> Installed:
        runtime = Runtime()
        integration = integration_type()
        integration.install(IntegrationSettings(runtime=runtime, config=fast_config(**options)))
        done.append(integration)
        return Installed(runtime, integration)

    yield run
    for integration in reversed(done):
        integration.uninstall()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    test = "".join(c if c.isalnum() else "_" for c in request.node.name)[:30].lower()
    return f"raptor_db_{test}_{secrets.token_hex(4)}"


@pytest.fixture
def postgres() -> None:
    require_service("PostgreSQL", POSTGRES)


@pytest.fixture
def mysql() -> None:
    require_service("MariaDB", MYSQL)


@pytest.fixture
def redis_server() -> None:
    require_service("Redis", REDIS)


def create_pg_flaky(execute: Callable[[str], object], name: str) -> None:
    """A table ``name (v int)``, a sequence, and ``name_flaky(n, sqlstate)``: raises
    ``sqlstate`` the first ``n`` times it runs (a sequence counts: no rollback undoes it)."""
    execute(f"CREATE TABLE {name} (v int)")
    execute(f"CREATE SEQUENCE {name}_seq")
    execute(
        f"""CREATE FUNCTION {name}_flaky(times int, code text) RETURNS int
        LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('{name}_seq') <= times THEN
                RAISE EXCEPTION 'injected %', code USING ERRCODE = code;
            END IF;
            RETURN 1;
        END $$"""
    )


def drop_pg_flaky(execute: Callable[[str], object], name: str) -> None:
    execute(f"DROP TABLE IF EXISTS {name}")
    execute(f"DROP FUNCTION IF EXISTS {name}_flaky(int, text)")
    execute(f"DROP SEQUENCE IF EXISTS {name}_seq")
