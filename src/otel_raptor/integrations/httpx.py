"""The httpx integration: breakers, retries and fallbacks per origin, sync and async clients.

What it hooks, and why there: ``httpx.Client.send`` and ``httpx.AsyncClient.send``, on the
classes. ``Client.get``/``post``/``request``/``stream`` all end in ``send``. The contrib
httpx instrumentation wraps the transports' ``handle_request``/``handle_async_request``,
below ``send``: retrying above it makes each attempt its own HTTP client span whichever of the
two is installed first. One attempt is one whole ``send``: the auth flow runs again and
redirects are followed again from the first URL.

Timeouts are httpx's own: a client has a 5 s default that ``send`` applies even to a
hand-built request, and ``timeout=None`` there is the caller's explicit choice, so the
downstream's ``timeout`` is not applied (``retry.attempt_timeout``/``deadline`` are, for
``AsyncClient``, through the guard). A request body is replayable when it is in memory
(``content=``, ``data=``, ``json=``: an ``httpx.ByteStream``); generators and files are sent
once. ``AsyncClient`` calls outside an asyncio event loop (trio) pass through untouched.

:func:`circuit_open_error_type` (also importable as ``HttpxCircuitOpen`` from this module) is
the class of the fail-fast error: both :class:`~otel_raptor.errors.CircuitOpenError` and
``httpx.ConnectError``. httpx itself is imported only by :meth:`HttpxIntegration.install` and
by that function. See ``docs/http.md``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import (
    IDEMPOTENT,
    AsyncAttempt,
    Downstream,
    DownstreamTable,
    FailingResponse,
    FallbackCall,
    StaleCache,
    StaleEntry,
    SyncAttempt,
    enter_fallback,
    exit_fallback,
    guard_fallback,
    http_enabled,
    replay_safe,
    stale_headers,
)
from otel_raptor.integrations._wrapping import unwrap, wrap
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import httpx as _httpx

    class HttpxCircuitOpen(CircuitOpenError, _httpx.ConnectError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["HttpxCircuitOpen", "HttpxIntegration", "circuit_open_error_type"]

_CREDENTIAL_HEADERS: Final = ("authorization", "proxy-authorization", "cookie")
# Describe the body as httpx encoded it; a stale copy gets a fresh Content-Length and no
# Content-Encoding, since the body kept is the decoded one.
_NOT_REPLAYED_HEADERS: Final = frozenset(
    {"content-encoding", "content-length", "transfer-encoding"}
)

_error_type: type[CircuitOpenError] | None = None

# downstream, guard, request, keyword arguments, fallbacks (or None), stale key (or None)
_Plan: TypeAlias = tuple[
    Downstream, Guard, Any, dict[str, Any], "_Fallback | None", Hashable | None
]


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a downstream's breaker is open.

    It subclasses both :class:`~otel_raptor.errors.CircuitOpenError` and
    ``httpx.ConnectError`` (so ``except httpx.ConnectError``, ``httpx.TransportError``,
    ``httpx.RequestError`` and ``httpx.HTTPError`` keep catching it), and carries
    ``breaker``, ``retry_after`` and ``request`` (the refused ``httpx.Request``). Built on
    first use, since httpx is imported only then; the same class every time.
    ``from otel_raptor.integrations.httpx import HttpxCircuitOpen`` gives it too.
    """
    global _error_type  # noqa: PLW0603 - built once, lazily, because it imports httpx
    if _error_type is None:
        import httpx  # noqa: PLC0415 - the library is imported only when needed

        class HttpxCircuitOpen(CircuitOpenError, httpx.ConnectError):
            """A refusal by an open breaker: a ``CircuitOpenError`` and an
            ``httpx.ConnectError``."""

        HttpxCircuitOpen.__module__ = __name__
        HttpxCircuitOpen.__qualname__ = "HttpxCircuitOpen"
        _error_type = HttpxCircuitOpen
    return _error_type


def __getattr__(name: str) -> Any:
    if name == "HttpxCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refusal(error: CircuitOpenError, request: Any) -> BaseException:
    return circuit_open_error_type()(error.breaker, error.retry_after, request=request)


class _Installed:
    """The state of one installation; the module-level wrappers read it on every call."""

    __slots__ = ("byte_stream", "monotonic", "stale", "table", "use_client_default")

    def __init__(self, settings: IntegrationSettings) -> None:
        import httpx  # noqa: PLC0415 - imported by install() already

        self.table = DownstreamTable(settings.runtime, settings.config, fallback=guard_fallback)
        self.stale = StaleCache()
        self.monotonic = settings.runtime.clock.monotonic
        self.byte_stream = httpx.ByteStream
        self.use_client_default = httpx.USE_CLIENT_DEFAULT

    # -- describing a request: our code, allowed to fail ------------------------------------

    def describe(
        self,
        wrapped: Callable[..., Any],
        client: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
    ) -> _Plan | None:
        """How to guard this ``send``, or ``None`` to leave it alone."""
        if len(args) == 1:
            request = args[0]
            call_kwargs = kwargs
        elif not args and "request" in kwargs:
            call_kwargs = dict(kwargs)
            request = call_kwargs.pop("request")
        else:
            return None  # not a shape ``send`` accepts: httpx raises its own TypeError
        url = request.url
        downstream = self.table.for_parts(url.scheme, url.host, url.port)
        if downstream is None or not downstream.enabled:
            return None
        method = request.method
        body_replayable = isinstance(request.stream, self.byte_stream)
        if body_replayable and method in IDEMPOTENT:
            safe = True
        else:
            safe = replay_safe(downstream, method, body_replayable, request.headers)
        stale_key = None
        fallbacks = downstream.fixed_fallbacks
        if downstream.stale_if_error and method == "GET" and not call_kwargs.get("stream"):
            stale_key = self._stale_key(client, request, call_kwargs)
            fallbacks = fallbacks or (
                stale_key is not None
                and self.stale.get(
                    stale_key, now=self.monotonic(), max_age=downstream.stale_max_age
                )
                is not None
            )
        fallback = None
        if not fallbacks:
            guard = downstream.safe if safe else downstream.unsafe
        else:
            guard = downstream.guard(replay_safe=safe, with_fallback=True)
            fallback_class = _AsyncFallback if is_async else _Fallback
            fallback = fallback_class(
                self, downstream, wrapped, request, call_kwargs, safe=safe, stale_key=stale_key
            )
        return downstream, guard, request, call_kwargs, fallback, stale_key

    def _stale_key(self, client: Any, request: Any, kwargs: dict[str, Any]) -> Hashable | None:
        """The stale-cache key of a GET: its URL and every credential we can see; ``None``
        (never served stale) with an auth flow other than basic auth."""
        import httpx  # noqa: PLC0415 - imported by install() already

        auth = kwargs.get("auth", self.use_client_default)
        if auth is self.use_client_default:
            auth = getattr(client, "auth", None)
        token: Hashable = None
        if isinstance(auth, tuple):
            token = auth
        elif isinstance(auth, httpx.BasicAuth):
            token = getattr(auth, "_auth_header", None)
            if token is None:
                return None
        elif auth is not None:
            return None
        headers = request.headers
        credentials = tuple(headers.get(name) for name in _CREDENTIAL_HEADERS)
        return (str(request.url), token, credentials)

    def remember(self, key: Hashable, response: Any) -> None:
        """Keep a good response for stale-if-error (our code: never raises)."""
        try:
            status = response.status_code
            if type(status) is not int or not 200 <= status < 300:
                return
            self.stale.put(
                key,
                StaleEntry(
                    status=status,
                    reason=response.reason_phrase,
                    headers=tuple(
                        (name, value)
                        for name, value in response.headers.multi_items()
                        if name.lower() not in _NOT_REPLAYED_HEADERS
                    ),
                    body=response.content,
                    encoding=None,
                    url=str(response.url),
                    stored_at=self.monotonic(),
                ),
            )
        except Exception as bug:  # noqa: BLE001 - the response is the caller's either way
            report_internal_error("httpx.stale_store", bug)

    # -- sending ------------------------------------------------------------------------------

    def send(
        self,
        wrapped: Callable[..., Any],
        client: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            plan = self.describe(wrapped, client, args, kwargs, is_async=False)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("httpx.describe", bug)
            return wrapped(*args, **kwargs)
        if plan is None:
            return wrapped(*args, **kwargs)
        downstream, guard, request, call_kwargs, fallback, stale_key = plan
        token = None if fallback is None else enter_fallback(fallback)
        try:
            response = guard.call(SyncAttempt(wrapped), request, **call_kwargs)
        except FailingResponse as failure:
            return failure.response
        except CircuitOpenError as error:
            if type(error) is CircuitOpenError and error.breaker == downstream.breaker_name:
                raise _refusal(error, request) from None
            raise
        finally:
            if token is not None:
                exit_fallback(token)
        if stale_key is not None:
            self.remember(stale_key, response)
        return response

    async def send_async(
        self,
        wrapped: Callable[..., Awaitable[Any]],
        client: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            plan = self.describe(wrapped, client, args, kwargs, is_async=True)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("httpx.describe", bug)
            return await wrapped(*args, **kwargs)
        if plan is None:
            return await wrapped(*args, **kwargs)
        downstream, guard, request, call_kwargs, fallback, stale_key = plan
        token = None if fallback is None else enter_fallback(fallback)
        try:
            response = await guard.call_async(AsyncAttempt(wrapped), request, **call_kwargs)
        except FailingResponse as failure:
            return failure.response
        except CircuitOpenError as error:
            if type(error) is CircuitOpenError and error.breaker == downstream.breaker_name:
                raise _refusal(error, request) from None
            raise
        finally:
            if token is not None:
                exit_fallback(token)
        if stale_key is not None:
            self.remember(stale_key, response)
        return response

    # -- failover -----------------------------------------------------------------------------

    def failover_request(self, request: Any, base_url: str) -> Any:
        """``request`` with its origin replaced by ``base_url`` (path and query kept)."""
        import httpx  # noqa: PLC0415 - imported by install() already

        target = httpx.URL(base_url.rstrip("/") + request.url.raw_path.decode("ascii"))
        headers = [
            (name, value) for name, value in request.headers.multi_items() if name.lower() != "host"
        ]
        # ``stream=`` keeps the body as it is (and adds no header), so Host is set here.
        headers.insert(0, ("Host", target.netloc.decode("ascii")))
        return httpx.Request(
            request.method,
            target,
            headers=headers,
            stream=request.stream,
            extensions=dict(request.extensions),
        )


class _Fallback(FallbackCall):
    """The fallbacks of one ``Client.send`` call."""

    __slots__ = ("installed", "kwargs", "request", "wrapped")

    def __init__(
        self,
        installed: _Installed,
        downstream: Downstream,
        wrapped: Callable[..., Any],
        request: Any,
        kwargs: dict[str, Any],
        *,
        safe: bool,
        stale_key: Hashable | None,
    ) -> None:
        super().__init__(
            downstream,
            replay_safe=safe,
            stale_key=stale_key,
            cache=installed.stale,
            now=installed.monotonic,
        )
        self.installed = installed
        self.wrapped = wrapped
        self.request = request
        self.kwargs = kwargs

    def _target(self, base_url: str) -> tuple[Any, Guard | None]:
        """The failover request, and its downstream's guard (without fallbacks), if any."""
        request = self.installed.failover_request(self.request, base_url)
        url = request.url
        downstream = self.installed.table.for_parts(url.scheme, url.host, url.port)
        if downstream is None or not downstream.enabled:
            return request, None
        return request, downstream.guard(replay_safe=self.replay_safe, with_fallback=False)

    def failover(self, base_url: str) -> Any:
        request, guard = self._target(base_url)
        if guard is None:
            return self.wrapped(request, **self.kwargs)
        try:
            return guard.call(SyncAttempt(self.wrapped), request, **self.kwargs)
        except FailingResponse as failure:
            return failure.response

    async def failover_async(self, base_url: str) -> Any:
        request, guard = self._target(base_url)
        if guard is None:
            return await self.wrapped(request, **self.kwargs)
        try:
            return await guard.call_async(AsyncAttempt(self.wrapped), request, **self.kwargs)
        except FailingResponse as failure:
            return failure.response

    def stale_response(self, entry: StaleEntry) -> Any:
        import httpx  # noqa: PLC0415 - imported by install() already

        return httpx.Response(
            entry.status,
            headers=stale_headers(entry, self.now()),
            content=entry.body,
            request=self.request,
        )

    def circuit_open(self, error: CircuitOpenError) -> BaseException:
        return _refusal(error, self.request)


class _AsyncFallback(_Fallback):
    """The fallbacks of one ``AsyncClient.send`` call."""

    __slots__ = ()
    is_async = True


_installed: _Installed | None = None


def _send_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``Client.send`` (module level: its identity marks the hook as ours)."""
    installed = _installed
    if installed is None or not http_enabled():
        return wrapped(*args, **kwargs)
    return installed.send(wrapped, instance, args, kwargs)


def _async_send_wrapper(
    wrapped: Callable[..., Awaitable[Any]],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Awaitable[Any]:
    """The hook on ``AsyncClient.send``: returns the awaitable the caller awaits."""
    installed = _installed
    if installed is None or not http_enabled():
        return wrapped(*args, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return wrapped(*args, **kwargs)  # trio, or no loop: our guard sleeps with asyncio
    return installed.send_async(wrapped, instance, args, kwargs)


class HttpxIntegration:
    """Guards every ``httpx`` client call (see the module docstring and ``docs/http.md``)."""

    name = "httpx"
    library = "httpx"

    def __init__(self) -> None:
        self._state: _Installed | None = None

    @property
    def installed(self) -> bool:
        return self._state is not None and self._state is _installed

    def install(self, settings: IntegrationSettings) -> None:
        """Hook ``httpx.Client.send`` and ``httpx.AsyncClient.send``; installing again
        replaces the settings and never wraps twice."""
        global _installed  # noqa: PLW0603 - the wrappers read the installation from here
        import httpx  # noqa: PLC0415 - the library is imported only when it is hooked

        circuit_open_error_type()
        state = _Installed(settings)
        _installed = state
        self._state = state
        try:
            wrap(httpx.Client, "send", _send_wrapper)
            wrap(httpx.AsyncClient, "send", _async_send_wrapper)
        except Exception:
            _installed = self._state = None
            unwrap(httpx.Client, "send", _send_wrapper)
            raise

    def uninstall(self) -> None:
        """Put both ``send`` methods back exactly; a no-op when this instance did not
        install."""
        global _installed  # noqa: PLW0603
        state, self._state = self._state, None
        if state is None or _installed is not state:
            return  # not installed, or another instance installed since: the hooks are theirs
        _installed = None
        httpx = sys.modules.get("httpx")
        if httpx is not None:
            unwrap(httpx.Client, "send", _send_wrapper)
            unwrap(httpx.AsyncClient, "send", _async_send_wrapper)
