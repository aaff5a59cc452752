"""A fresh process-wide runtime for a test, and the previous one put back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from otel_raptor.runtime.state import Runtime, set_runtime

__all__ = ["process_runtime"]


@contextlib.contextmanager
def process_runtime(**options: Any) -> Iterator[Runtime]:
    """``Runtime(**options)`` as the process-wide runtime while the block runs; its health
    checker (a thread, once a check is registered) is stopped afterwards."""
    fresh = Runtime(**options)
    previous = set_runtime(fresh)
    try:
        yield fresh
    finally:
        set_runtime(previous)
        fresh.health.stop()
