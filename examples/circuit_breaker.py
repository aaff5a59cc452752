"""The circuit breaker: fail fast while a downstream is down, probe, close again.

    python examples/circuit_breaker.py

``payments`` answers 200, then 503 three times, then is back. After three consecutive
failures the breaker opens (with so few calls behind it, fewer than ``minimum_calls``, a run
of ``failure_threshold`` is the evidence it needs) and calls fail at once with
``CircuitOpenError`` (the server is not even asked); after ``recovery_timeout`` a probe goes
through, succeeds and, with the second successful probe, the breaker closes.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from _loopback import LoopbackServer

import otel_raptor
from otel_raptor import BreakerTransitioned, CircuitOpenError, Event, get_resilient_client


def fetch(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.load(response))


def on_event(event: Event) -> None:
    if isinstance(event, BreakerTransitioned):
        print(f"  breaker {event.breaker}: {event.from_state} -> {event.to_state} ({event.reason})")


async def main() -> None:
    otel_raptor.get_runtime().bus.subscribe(on_event)
    breaker = get_resilient_client().add_circuit_breaker(
        "payments", {"failure_threshold": 3, "recovery_timeout": 0.5, "success_threshold": 2}
    )
    with LoopbackServer() as server:
        server.script("/charge", 200, 503, 503, 503, 200)  # down for three calls, then back
        url = server.url("/charge")
        for call in range(1, 8):
            started = time.perf_counter()
            try:
                body = await breaker.call(fetch, url)
                outcome = f"ok {body['status']}"
            except CircuitOpenError as error:
                outcome = f"refused at once (retry in {error.retry_after:.2f} s)"
            except Exception as error:  # noqa: BLE001 - an example: show what happened
                outcome = f"failed: {type(error).__name__} {getattr(error, 'code', '')}"
            took = (time.perf_counter() - started) * 1000
            print(f"call {call}: {outcome} in {took:.1f} ms; breaker {breaker.state}")
        print("waiting for the recovery timeout...")
        await asyncio.sleep(0.6)
        for call in (8, 9):
            body = await breaker.call(fetch, url)
            print(f"call {call}: probe ok {body['status']}; breaker {breaker.state}")
        print(
            f"9 calls, {server.hits['/charge']} reached the server: the refused ones cost it"
            " nothing"
        )
        print(f"health score {breaker.health_score:.0f}/100")


if __name__ == "__main__":
    asyncio.run(main())
