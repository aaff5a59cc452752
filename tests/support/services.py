"""Reaching the real services the integration tests need.

A test that needs a service skips with a clear reason when it is absent, unless
``RAPTOR_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where an absent service is a failure.
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = [
    "MYSQL",
    "POSTGRES",
    "REDIS",
    "require_service",
    "services_required",
]

POSTGRES = ("127.0.0.1", int(os.environ.get("RAPTOR_TEST_PG_PORT", "5432")))
MYSQL = ("127.0.0.1", int(os.environ.get("RAPTOR_TEST_MYSQL_PORT", "3306")))
REDIS = ("127.0.0.1", int(os.environ.get("RAPTOR_TEST_REDIS_PORT", "6379")))


def services_required() -> bool:
    return os.environ.get("RAPTOR_REQUIRE_SERVICES", "") not in ("", "0", "false", "no")


def _reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, address: tuple[str, int]) -> None:
    """Skip (or, in CI, fail) unless ``address`` accepts TCP connections."""
    if _reachable(address):
        return
    message = f"{name} is not reachable on {address[0]}:{address[1]}"
    if services_required():
        pytest.fail(f"{message} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def require_module(name: str) -> object:
    """Import ``name`` or skip (fail in CI) with a clear reason."""
    try:
        return __import__(name)
    except ImportError:
        if services_required():
            pytest.fail(f"{name} is not installed and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(f"{name} is not installed")
