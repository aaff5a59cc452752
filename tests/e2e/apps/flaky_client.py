"""An application with no resilience code of its own, run by the e2e tests.

``python flaky_client.py URL [--client requests|httpx|httpx-async] [--breaker-wait S]`` makes
five GETs against ``URL`` (a ``tests/support/faulty_http.py`` server the test scripts), each
inside an application span ``app <phase>``:

1. ``/recover``: the server answers 503, 503, then 200: recovered by retries under raptor;
2. ``/outage``: 503, 503, 503: retries give up (one call's 503s alone are not an outage: one
   route may be broken);
3. ``/outage`` again (``tripped``): its 503 is the second call's failure in a row, which opens
   the breaker; its retry is refused and the caller gets that 503;
4. ``/outage`` once more (``rejected``): refused at once by the open breaker, with an error the
   library's own ``except`` clause catches;
5. after ``--breaker-wait`` seconds, ``/healed``: the half-open probe succeeds, the breaker
   closes.

It prints one line ``RESULT <json>``: per call the status code, or the exception's type and
whether it was caught as the library's connection error and is a ``CircuitOpenError``. It then
simply returns: flushing telemetry is left to whatever set the SDK up (``opentelemetry-instrument``
registers an ``atexit`` shutdown of its providers).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

PHASES = (
    ("recover", "/recover"),
    ("outage", "/outage"),
    ("tripped", "/outage"),
    ("rejected", "/outage"),
)
HEALED = ("healed", "/healed")


def _is_circuit_open(error: BaseException) -> bool:
    try:
        from otel_raptor import CircuitOpenError
    except ImportError:
        return False
    return isinstance(error, CircuitOpenError)


def _outcome(call: Callable[[], int], connection_error: type[BaseException]) -> dict[str, Any]:
    try:
        return {"status": call()}
    except connection_error as error:
        return {
            "error": f"{type(error).__module__}.{type(error).__qualname__}",
            "library_connection_error": True,
            "circuit_open": _is_circuit_open(error),
        }
    except Exception as error:
        return {
            "error": f"{type(error).__module__}.{type(error).__qualname__}",
            "library_connection_error": False,
            "circuit_open": _is_circuit_open(error),
        }


def _run_sync(client_name: str, base: str, breaker_wait: float) -> list[dict[str, Any]]:
    tracer = trace.get_tracer("flaky_client")
    if client_name == "requests":
        import requests

        session = requests.Session()

        def get(path: str) -> int:
            return session.get(base + path, timeout=5).status_code

        connection_error: type[BaseException] = requests.exceptions.ConnectionError
    else:
        import httpx

        client = httpx.Client(timeout=5)

        def get(path: str) -> int:
            return client.get(base + path).status_code

        connection_error = httpx.ConnectError
    results = []
    for index, (phase, path) in enumerate((*PHASES, HEALED)):
        if index == len(PHASES):
            time.sleep(breaker_wait)
        with tracer.start_as_current_span(f"app {phase}"):
            results.append(
                {"phase": phase, **_outcome(functools.partial(get, path), connection_error)}
            )
    return results


async def _run_async(base: str, breaker_wait: float) -> list[dict[str, Any]]:
    import httpx

    tracer = trace.get_tracer("flaky_client")
    results = []
    async with httpx.AsyncClient(timeout=5) as client:
        for phase, path in (*PHASES, HEALED):
            if phase == HEALED[0]:
                await asyncio.sleep(breaker_wait)
            with tracer.start_as_current_span(f"app {phase}"):
                try:
                    outcome: dict[str, Any] = {
                        "status": (await client.get(base + path)).status_code
                    }
                except Exception as error:
                    outcome = {
                        "error": f"{type(error).__module__}.{type(error).__qualname__}",
                        "library_connection_error": isinstance(error, httpx.ConnectError),
                        "circuit_open": _is_circuit_open(error),
                    }
            results.append({"phase": phase, **outcome})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument(
        "--client", choices=("requests", "httpx", "httpx-async"), default="requests"
    )
    parser.add_argument("--breaker-wait", type=float, default=0.6)
    args = parser.parse_args()
    base = args.url.rstrip("/")
    if args.client == "httpx-async":
        results = asyncio.run(_run_async(base, args.breaker_wait))
    else:
        results = _run_sync(args.client, base, args.breaker_wait)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
