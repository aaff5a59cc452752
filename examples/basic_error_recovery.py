"""Basic error recovery: classify an error that already happened and recover from it.

    python examples/basic_error_recovery.py

A loopback server answers ``/orders`` with 503 twice, then 200. The first call fails; the
recovery engine classifies the error (``unavailable``, retryable), picks a strategy
(``retry_with_backoff``) and retries ``retry_func`` until it succeeds. A second endpoint is
down for good: there, the retries give up and ``fallback_func`` answers instead.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from _loopback import LoopbackServer

from otel_raptor import classify, get_production_error_recovery


def fetch(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.load(response))


async def main() -> None:
    engine = get_production_error_recovery()
    with LoopbackServer() as server:
        server.script("/orders", 503, 503, 200)
        url = server.url("/orders")
        try:
            fetch(url)
        except urllib.error.HTTPError as error:
            verdict = classify(error)
            print(
                f"first call failed: HTTP {error.code}; classified as {verdict.category}"
                f" ({verdict.severity}), retryable={verdict.retryable}"
            )
            result = await engine.handle_error(
                error,
                {
                    "service_name": "orders",
                    "max_retries": 3,
                    "retry_func": lambda: fetch(url),  # passing it is the opt-in to repeat it
                },
            )
            print(
                f"recovered={result.success} strategy={result.strategy}"
                f" attempts={result.attempts} in {result.duration_s:.2f} s -> {result.value}"
            )
        down = server.url("/down")
        try:
            fetch(down)
        except urllib.error.HTTPError as error:
            result = await engine.handle_error(
                error,
                {
                    "service_name": "inventory",
                    "max_retries": 2,
                    "retry_func": lambda: fetch(down),
                    "fallback_func": lambda exc: {"path": "/down", "status": "cached"},
                },
            )
            print(
                f"down for good: success={result.success} strategy={result.strategy}"
                f" attempts={result.attempts} -> {result.value}"
            )
        print(f"server hits: {dict(server.hits)}")


if __name__ == "__main__":
    asyncio.run(main())
