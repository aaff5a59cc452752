"""A retry recovering and a breaker opening, against a real loopback HTTP server.

Run with ``python examples/breaker_demo.py`` (``make demo`` runs the bigger demo). The server
follows a script: healthy, then a burst of 503s that
retries ride out, then a hard outage (the port closes) that opens the breaker so calls fail
fast instead of waiting, then recovery, where a probe closes the breaker again.
Every decision the library makes is printed as it is published on the event bus.
"""

from __future__ import annotations

import http.server
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import otel_raptor
from otel_raptor import (
    BreakerTransitioned,
    CallRejected,
    CircuitBreakerConfig,
    CircuitOpenError,
    Event,
    RecoveryFinished,
    RetryPolicy,
    RetryScheduled,
    resilient,
)


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    failures_left = 0
    hits = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.hits += 1
        if cls.failures_left > 0:
            cls.failures_left -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"fresh data"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the demo's output readable


class Server:
    def __init__(self, port: int = 0) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), ScriptedHandler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


started = time.monotonic()


def say(message: str) -> None:
    print(f"  {time.monotonic() - started:6.2f}s  {message}")


def narrate(event: Event) -> None:
    if isinstance(event, RetryScheduled):
        c = event.classification
        say(
            f"↻ retry {event.attempt} in {event.delay_s * 1000:.0f} ms "
            f"({c.category.value}, {c.error_type}, strategy {event.strategy.value})"
        )
    elif isinstance(event, BreakerTransitioned):
        say(
            f"⚡ breaker {event.breaker}: {event.from_state.value} → {event.to_state.value} "
            f"({event.reason.value})"
        )
    elif isinstance(event, CallRejected):
        say(f"⛔ rejected by the open breaker (next probe in {event.retry_after_s or 0:.2f}s)")
    elif isinstance(event, RecoveryFinished):
        say(
            f"✓ recovery finished: {event.outcome.value} after {event.attempts} attempt(s)"
            + (f" [{event.give_up_reason}]" if event.give_up_reason else "")
        )


def main() -> None:
    server = Server()
    url = f"http://127.0.0.1:{server.port}/inventory"
    otel_raptor.get_runtime().bus.subscribe(narrate)

    @resilient(
        service="inventory",
        retry=RetryPolicy(max_retries=3, base_delay=0.05, max_delay=0.5),
        breaker=CircuitBreakerConfig(
            failure_threshold=3, recovery_timeout=1.0, success_threshold=1
        ),
    )
    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read())

    def attempt(label: str) -> None:
        try:
            say(f"→ {label}: {fetch()!r}")
        except CircuitOpenError as exc:
            say(f"→ {label}: failed fast ({exc})")
        except (urllib.error.URLError, OSError) as exc:
            say(f"→ {label}: failed ({type(exc).__name__})")

    print("1. healthy")
    attempt("call 1")

    print("2. two 503s in a row: the retry policy rides them out")
    ScriptedHandler.failures_left = 2
    attempt("call 2")

    print("3. hard outage: the port is closed; the breaker opens after 3 failures")
    port = server.port
    server.stop()
    for i in range(3, 7):
        attempt(f"call {i}")

    print("4. the server is back; after the recovery timeout one probe closes the breaker")
    server = Server(port)
    time.sleep(1.1)
    attempt("call 7")
    attempt("call 8")
    server.stop()
    print(f"\nThe server saw {ScriptedHandler.hits} requests in all.")


if __name__ == "__main__":
    main()
