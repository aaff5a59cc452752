"""A scripted HTTP server on 127.0.0.1 for the examples (standard library only).

Each path has a script: a list of status codes served in turn, the last one repeated for ever.
``/ok`` always answers 200, ``/down`` always 503, and ``server.script("/flaky", 503, 503, 200)``
sets any other path. ``server.hits[path]`` counts the requests a path received.

    with LoopbackServer() as server:
        server.script("/flaky", 503, 200)
        url = server.url("/flaky")
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import defaultdict
from types import TracebackType
from typing import Any

__all__ = ["LoopbackServer"]


class LoopbackServer:
    def __init__(self) -> None:
        self._scripts: dict[str, list[int]] = {"/ok": [200], "/down": [503]}
        self._lock = threading.Lock()
        self.hits: defaultdict[str, int] = defaultdict(int)
        self.delay_s: dict[str, float] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                status, delay = server._next(path)
                if delay:
                    time.sleep(delay)
                body = f'{{"path": "{path}", "status": {status}}}'.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the example's output readable

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _next(self, path: str) -> tuple[int, float]:
        with self._lock:
            self.hits[path] += 1
            script = self._scripts.get(path, [404])
            status = script.pop(0) if len(script) > 1 else script[0]
            return status, self.delay_s.get(path, 0.0)

    def script(self, path: str, *statuses: int) -> None:
        """Serve ``statuses`` on ``path`` in turn, then the last one for ever."""
        with self._lock:
            self._scripts[path] = list(statuses) or [200]

    def url(self, path: str = "/") -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:port``: the service name the HTTP integrations give it."""
        return self.url("")

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
