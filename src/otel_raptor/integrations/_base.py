"""The contract between the instrumentor and one integration.

The instrumentor imports an integration class lazily (by its ``"module:Class"`` path in
:data:`otel_raptor.integrations.INTEGRATIONS`), instantiates it with no arguments, checks that
``library`` is importable with :func:`importlib.util.find_spec`, and calls ``install`` with the
shared settings. ``uninstall`` must restore every original exactly and be safe to call twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from otel_raptor.config import RaptorConfig
from otel_raptor.runtime.memory import SimpleMemoryController
from otel_raptor.runtime.state import Runtime

__all__ = ["Integration", "IntegrationSettings"]


@dataclass(frozen=True, slots=True)
class IntegrationSettings:
    """What every integration is handed: the process-wide runtime, the resolved config, and
    the memory controller the instrumentor runs (``None`` with ``memory=False``), with which
    an integration registers the caches of its own."""

    runtime: Runtime
    config: RaptorConfig
    memory: SimpleMemoryController | None = None


class Integration(Protocol):
    """One hooked library.

    ``name`` is the key used by ``OTEL_PYTHON_RAPTOR_INTEGRATIONS`` (``requests``, ``httpx``,
    ``asyncio``); ``library`` is the import name checked with ``find_spec`` before ``install``
    (the library itself is imported only inside ``install``).
    """

    name: str
    library: str

    def install(self, settings: IntegrationSettings) -> None:
        """Hook the library. May raise: the instrumentor reports it and carries on."""
        ...

    def uninstall(self) -> None:
        """Restore every original exactly; a no-op when not installed."""
        ...
