"""Memory optimization: register caches, watch the pressure, clean up at the right level.

    python examples/memory_optimization.py

Responses fetched from a loopback server fill two caches: a plain dict of low priority
(entries older than ``max_age`` are expired) and an ``lru_cache`` function of high priority.
A ``critical`` cleanup evicts the expired entries, clears the low-priority cache and runs a
full collection, and says what it freed.
"""

from __future__ import annotations

import asyncio
import functools
import time
import urllib.request

from _loopback import LoopbackServer

from otel_raptor import SimpleMemoryController

MEMORY_CONFIG = {
    "auto_cleanup": True,
    "cleanup_interval": 300,
    "max_cache_age": 3600,
    "max_working_age": 1800,
    "cleanup_batch_size": 100,
}


async def main() -> None:
    controller = SimpleMemoryController(MEMORY_CONFIG)
    with LoopbackServer() as server:
        responses: dict[str, bytes] = {}

        @functools.lru_cache(maxsize=1024)
        def product(sku: int) -> bytes:
            with urllib.request.urlopen(server.url(f"/ok?sku={sku}"), timeout=5) as reply:
                return bytes(reply.read()) * 512  # a "rendered page", ~20 KiB

        controller.register_cache("responses", responses, priority="low", max_age=0.2)
        controller.register_cache("products", product, priority="high")
        for sku in range(300):
            page = product(sku)
            responses[f"/sku/{sku}"] = page + b"x" * (sku % 7)
        stats = controller.get_memory_stats()
        print(
            f"RSS {stats['process']['rss'] / 2**20:.1f} MiB"  # type: ignore[index]
            f" ({stats['limit']['source']} limit {stats['limit']['bytes'] / 2**30:.1f} GiB,"  # type: ignore[index]
            f" pressure {stats['pressure']['level']})"
        )  # type: ignore[index]
        for name, cache in dict(stats["caches"]).items():  # type: ignore[call-overload]
            print(f"  cache {name:<10} {cache['entries']} entries, priority {cache['priority']}")
        print(f"server answered {server.hits['/ok']} requests")
        time.sleep(0.3)  # the responses are now older than their max_age
        result = await controller.manual_cleanup("critical")
        print(
            f"critical cleanup: evicted {dict(result.evicted)}, cleared {list(result.cleared)},"
            f" gc found {result.gc_collected} objects,"
            f" RSS {result.rss_before / 2**20:.1f} -> {result.rss_after / 2**20:.1f} MiB"
            f" ({result.bytes_freed / 2**20:.1f} MiB freed) in {result.duration_s * 1000:.0f} ms"
        )
        print(f"left: {len(responses)} responses, {product.cache_info().currsize} products")


if __name__ == "__main__":
    asyncio.run(main())
