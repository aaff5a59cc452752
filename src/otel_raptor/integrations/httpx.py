"""The httpx integration: breakers, retries and fallbacks per origin, sync and async clients.

What it hooks, and why there: ``httpx.Client.send`` and ``httpx.AsyncClient.send``, on the
classes, with plain functions (``_wrapping.patch``: a wrapt layer's dispatch measured more
than the rest of the hook on a loopback request). ``Client.get``/``post``/``request``/
``stream`` all end in ``send``. The contrib httpx instrumentation wraps the transports'
``handle_request``/``handle_async_request``, below ``send``: retrying above it makes each
attempt its own HTTP client span whichever of the two is installed first. One attempt is one
whole ``send``: the auth flow runs again and redirects are followed again from the first URL.

Timeouts are httpx's own: a client has a 5 s default that ``send`` applies even to a
hand-built request. Only a request that httpx would leave unbounded (a client or request
built with ``timeout=None``) gets the origin's ``request_timeout``, as requests calls
without a timeout do. The policy's ``retry.attempt_timeout``/``deadline`` bound each
``AsyncClient`` attempt with ``asyncio.wait_for``; a sync ``Client`` attempt keeps httpx's
timeouts. A request body is replayable when it is in memory (``content=``, ``data=``,
``json=``: an ``httpx.ByteStream``); generators and files are sent once. ``AsyncClient``
calls outside an asyncio event loop (trio) pass through untouched.

What is specific to httpx (the rest is the integration kit's and :mod:`._http`'s): how a
``send`` call is described, the timeout rule above, the fail-fast error class and the
``Response`` objects raptor builds (stale, or a ``429`` while the origin cools down).

:func:`circuit_open_error_type` (also importable as ``HttpxCircuitOpen`` from this module) is
the class of the fail-fast error: both :class:`~otel_raptor.errors.CircuitOpenError` and
``httpx.ConnectError``. httpx itself is imported only by :meth:`HttpxIntegration.install` and
by that function. See ``docs/http.md``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import timedelta
from types import MethodType
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.errors import CircuitOpenError, RaptorError, ThrottledError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import (
    FAILING_STATUSES,
    IDEMPOTENT,
    PROCEED,
    STALE_DROPPED_HEADERS,
    AsyncHttpHooks,
    FailingResponse,
    FallbackCall,
    HttpHooks,
    HttpInstallation,
    Origin,
    OriginTable,
    StaleEntry,
    from_mocking_library,
    http_enabled,
    raised_by_mock,
    replay_safe,
    stale_headers,
    stale_key_headers,
    suppression_keys,
    throttled_headers,
    virtual_host,
)
from otel_raptor.integrations._kit import (
    HookedIntegration,
    call,
    call_async,
    in_asyncio,
    is_refusal_of,
    library_error,
)
from otel_raptor.integrations._wrapping import HookSet
from otel_raptor.runtime.drive import CALL_PERMIT, CLOSED, NO_RESULT, CallPlan, resume_sync
from otel_raptor.runtime.keys import private_digest
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import httpx as _httpx

    class HttpxCircuitOpen(CircuitOpenError, _httpx.ConnectError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""

    class HttpxAttemptTimeout(_httpx.TimeoutException, TimeoutError):
        """An attempt out of its time; see :func:`attempt_timeout_error_type`."""


__all__ = [
    "HttpxAttemptTimeout",
    "HttpxCircuitOpen",
    "HttpxIntegration",
    "attempt_timeout_error_type",
    "circuit_open_error_type",
]

# ``elapsed`` of the responses raptor builds: httpx sets it only on a response its transport
# streamed, and raises on reading it otherwise; nothing was waited for.
_NO_TIME: Final = timedelta(0)


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when an origin's breaker is open.

    It subclasses both :class:`~otel_raptor.errors.CircuitOpenError` and
    ``httpx.ConnectError`` (so ``except httpx.ConnectError``, ``httpx.TransportError``,
    ``httpx.RequestError`` and ``httpx.HTTPError`` keep catching it), and carries
    ``breaker``, ``retry_after`` and ``request`` (the refused ``httpx.Request``). The same
    class every time; ``from otel_raptor.integrations.httpx import HttpxCircuitOpen`` gives it
    too.
    """
    import httpx  # noqa: PLC0415 - the library is imported only when needed

    return library_error(CircuitOpenError, httpx.ConnectError, "HttpxCircuitOpen", __name__)


_attempt_timeout: type[BaseException] | None = None


def attempt_timeout_error_type() -> type[BaseException]:
    """The class of the error an ``AsyncClient`` call raises when an attempt ran out of the
    policy's ``retry.attempt_timeout``/``deadline`` (raptor bounds it with
    ``asyncio.wait_for``): both ``httpx.TimeoutException`` (so ``except httpx.HTTPError``
    and ``httpx.TimeoutException`` keep catching it, as they catch httpx's own timeouts) and
    the built-in ``TimeoutError``. The same class every time; ``HttpxAttemptTimeout`` from
    this module gives it too."""
    global _attempt_timeout  # noqa: PLW0603 - a cache of one class
    if _attempt_timeout is None:
        import httpx  # noqa: PLC0415 - the library is imported only when needed

        # The built-in TimeoutError, and asyncio's, which wait_for raises: one class since
        # Python 3.11, two before.
        timeouts: tuple[type[BaseException], ...] = (
            (TimeoutError,) if sys.version_info >= (3, 11) else (asyncio.TimeoutError, TimeoutError)
        )
        _attempt_timeout = type(
            "HttpxAttemptTimeout",
            (httpx.TimeoutException, *timeouts),
            {
                "__module__": __name__,
                "__doc__": "An attempt that ran out of raptor's attempt timeout or deadline.",
            },
        )
    return _attempt_timeout


def _timed_out(error: BaseException, args: tuple[Any, ...]) -> BaseException:
    """An ``AsyncClient`` attempt cut off at raptor's attempt timeout (``args`` end with the
    request: ``(client, request)`` or ``(request,)``), as httpx shows a timeout."""
    timed_out: BaseException = attempt_timeout_error_type()(
        "the attempt timed out",
        request=args[-1],  # type: ignore[call-arg]  # httpx's __init__
    )
    return timed_out


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _downstream(request: Any, by_host: bool) -> Hashable:
    """What names the breaker of an httpx request: its URL's, with the host its ``Host``
    header names, if another (httpx resets it at a redirect to another origin)."""
    url = request.url
    host = virtual_host(request.headers.get("host")) or str(url.host).lower().strip("[]")
    if by_host:
        return host
    scheme = str(url.scheme).lower()
    return scheme, host, url.port or _DEFAULT_PORTS.get(scheme)


_PROXY_POOLS: Final = frozenset({"HTTPProxy", "AsyncHTTPProxy", "SOCKSProxy", "AsyncSOCKSProxy"})


def _proxied(client: Any, request: Any) -> bool:
    """Whether ``client`` sends ``request`` through a proxy (an httpx transport whose
    httpcore pool is a proxy's): httpx then connects to the proxy, not to the origin, so a
    ``ConnectError`` is the proxy's (a tunnel the proxy refused is a ``ProxyError``)."""
    transport = client._transport_for_url(request.url)
    return type(getattr(transport, "_pool", None)).__name__ in _PROXY_POOLS


def _failed_request(failure: BaseException) -> Any:
    """The request a failed attempt ended in: its failing response's (after any redirects),
    or an httpx error's. Raises ``AttributeError`` or (httpx) ``RuntimeError`` when there is
    none."""
    if isinstance(failure, FailingResponse):
        return failure.response.request
    return failure.request  # type: ignore[attr-defined]  # httpx.RequestError


def _elsewhere(by_host: bool) -> Callable[[BaseException, tuple[Any, ...]], bool]:
    """Whether a failed attempt (made with positional arguments ``(client, request)`` or
    ending in the request) failed somewhere else than at its origin: connecting to the proxy
    the client sends it through, or at a redirect hop to another downstream (its failing
    response, or its error, is of a request to another origin). The failure must not count
    against the origin's breaker: it would refuse the origin's every call, those that reach
    it directly or answer with the redirect too. A proxy that refuses our credentials (a
    ``407`` to ``CONNECT``) failed the call, not the origin, too."""
    import httpx  # noqa: PLC0415 - imported by install() already

    unreachable = (httpx.ConnectError, httpx.ConnectTimeout)

    def elsewhere(failure: BaseException, args: tuple[Any, ...]) -> bool:
        try:
            if isinstance(failure, unreachable) and len(args) == 2 and _proxied(*args):
                return True
            if isinstance(failure, httpx.ProxyError) and str(failure).startswith("407"):
                return True  # the proxy refused our credentials to open the tunnel
            hop = _failed_request(failure)
            first = args[-1]
            if hop is first:
                return False
            return _downstream(hop, by_host) != _downstream(first, by_host)
        except (AttributeError, RuntimeError):  # no request on it (httpx raises RuntimeError)
            return False
        except Exception as bug:  # noqa: BLE001 - counted, as without this judgement
            report_internal_error("httpx.elsewhere", bug)
            return False

    return elsewhere


#: The top-level module of the one mocking library for httpx that raptor recognises.
_RESPX: Final = "respx"

#: Where httpx does its real network I/O (module-name prefixes): an error raised there came
#: from the network, even under a mocking library that passed the request through.
_REAL_IO: Final = ("httpx._transports.default", "httpcore")

#: Transports of test clients that serve an app in the process (Starlette's and FastAPI's
#: ``TestClient``, Litestar's), by the end of their class name: they are not httpx's.
_TEST_CLIENT_TRANSPORT: Final = "TestClientTransport"

#: The attributes, looked up in this order, by which a transport of the app's own that
#: delegates every request to another (a retrying or logging wrapper) names that one: the
#: convention the in-process check follows (``docs/http.md``, "Wrapped transports").
_WRAPPED_TRANSPORT_ATTRIBUTES: Final = ("_transport", "transport")

#: How many such wrappers, one inside the other, the in-process check follows at most.
_MAX_WRAPPED_TRANSPORTS: Final = 4


def _respx_answers(request: Any, mocker: str, in_memory: type) -> bool:
    """Whether respx's mocker named ``mocker`` (``"httpcore"``: its replacement of httpcore's
    pool methods; ``"httpx"``: of ``Client._transport_for_url``) answers ``request`` itself
    rather than passing it through to the network. As respx does, each active router in turn
    looks for the first of its routes whose pattern matches: that route decides (a
    ``pass_through()`` route passes it through, any other answers). A router with no match
    answers ``200`` itself when it does not assert that everything is mocked, else the next
    one looks; when none answers, respx raises its own error, in the process too.

    Also ``True`` when that cannot be told: a body that is not ``in_memory`` (an
    ``httpx.ByteStream``; a content pattern would read it, which respx does only once it has
    chosen to answer), a respx without these attributes, and a route whose side effect is a
    function (it may pass the request through by returning it): the request then goes as it
    would without raptor. Reads respx's routes without running them (no call is recorded, no
    side effect consumed). Failure path only."""
    mocks = sys.modules.get("respx.mocks")
    registry = getattr(getattr(mocks, "Mocker", None), "registry", None)
    found = registry.get(mocker) if isinstance(registry, Mapping) else None
    routers = getattr(found, "routers", None)
    if not isinstance(routers, list) or not isinstance(request.stream, in_memory):
        return True
    for router in list(routers):  # a copy: a test on another thread may start or stop one
        for route in router.routes:
            if route.pattern.match(request):
                return not route.is_pass_through
        if not getattr(router, "_assert_all_mocked", True):
            return True
    return True


def _in_process_check() -> tuple[
    Callable[[tuple[Any, ...], dict[str, Any]], bool],
    Callable[[Exception, tuple[Any, ...]], bool],
]:
    """Whether a ``send`` call (positional arguments ``(client, request)``) goes to an app in
    the process rather than over the network: its transport is httpx's ``ASGITransport``,
    ``WSGITransport`` or ``MockTransport``, or a test client's, or one respx answers for in
    place of the network (:func:`_respx_answers`: not what it passes through), or a wrapper
    of the app's own that names one of those as the transport it delegates to
    (:data:`_WRAPPED_TRANSPORT_ATTRIBUTES`). Judging a failure, also a mocking library's
    answer: respx's, or an error raised inside it, but never what it passed through to the
    network. A test suite's app answering ``500`` is the code under test, not a downstream:
    retrying it would run the handler again and change what the test sees, and counting it
    would open a breaker that refuses every later test's requests. Asked on the failure path
    only (a failed attempt, a breaker that is not closed, a cooldown), and before the first
    attempt of an ``AsyncClient`` request whose plan bounds attempts (``drive._first_attempt``).

    The second function judges one failure (``CallHooks.unjudged``): also a failure at a
    redirect hop the client sends to such an app (a ``mounts=`` entry), or after one: a replay
    would run that app's handler again."""
    import httpx  # noqa: PLC0415 - imported by install() already

    names = ("ASGITransport", "WSGITransport", "MockTransport")
    kinds = tuple(k for k in (getattr(httpx, n, None) for n in names) if isinstance(k, type))
    # httpx's own network transports, and the method of each one's httpcore pool that does
    # the network I/O (respx replaces it).
    io_method = {
        httpx.HTTPTransport: "handle_request",
        httpx.AsyncHTTPTransport: "handle_async_request",
    }
    network = tuple(io_method)
    transports = (httpx.BaseTransport, httpx.AsyncBaseTransport)
    in_memory = httpx.ByteStream

    def serving(transport: Any) -> Any:
        """The transport that answers for ``transport``: itself, or, for a wrapper of the
        app's own that names the transport it delegates to, that one (followed at most
        :data:`_MAX_WRAPPED_TRANSPORTS` times)."""
        for _ in range(_MAX_WRAPPED_TRANSPORTS):
            kind = type(transport)
            if (
                kind in network
                or isinstance(transport, kinds)
                or kind.__name__.endswith(_TEST_CLIENT_TRANSPORT)
            ):
                return transport
            for name in _WRAPPED_TRANSPORT_ATTRIBUTES:
                inner = getattr(transport, name, None)
                if isinstance(inner, transports) and inner is not transport:
                    transport = inner
                    break
            else:
                return transport
        return transport

    def app_transport(transport: Any) -> bool:
        return isinstance(transport, kinds) or type(transport).__name__.endswith(
            _TEST_CLIENT_TRANSPORT
        )

    def served_in_process(client: Any, request: Any) -> bool:
        return app_transport(serving(client._transport_for_url(request.url)))

    def respx_pool(transport: Any) -> bool:
        """Whether ``transport`` is httpx's own network transport whose httpcore pool's I/O
        respx replaced (its ``"httpcore"`` mocker, the default)."""
        name = io_method.get(type(transport))
        if name is None:
            return False  # the app's own transport, whatever it calls
        return from_mocking_library(getattr(type(getattr(transport, "_pool", None)), name, None))

    def mocked(client: Any, failure: Exception) -> bool:
        if not isinstance(failure, FailingResponse):
            return raised_by_mock(failure, _REAL_IO)
        response = failure.response
        if "network_stream" in response.extensions:
            return False  # read from a connection: a mock passed the request through
        if from_mocking_library(getattr(type(client), "_transport_for_url", None)):
            return True  # respx's "httpx" mocker: its transport for every URL
        return respx_pool(serving(client._transport_for_url(response.request.url)))

    def in_process(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if len(args) != 2:
            return False
        client, request = args
        transport = client._transport_for_url(request.url)
        if type(transport) not in network:  # (httpx's own, the common case, is no wrapper)
            transport = serving(transport)
            if app_transport(transport):
                return True
        if _RESPX not in sys.modules:
            return False  # nothing of respx's can answer it
        if respx_pool(transport):
            return _respx_answers(request, "httpcore", in_memory)
        if from_mocking_library(type(transport)):
            # respx's "httpx" mocker: a transport that tries its router, then passes the
            # request on to the transport the client would have used (the last one).
            if _respx_answers(request, "httpx", in_memory):
                return True
            passed = getattr(transport, "transports", None)
            return isinstance(passed, list) and bool(passed) and app_transport(serving(passed[-1]))
        return False

    def failed_in_process(failure: Exception, args: tuple[Any, ...]) -> bool:
        if len(args) != 2:
            return False
        client, request = args
        if served_in_process(client, request) or mocked(client, failure):
            return True
        try:
            earlier = failure.response.history if isinstance(failure, FailingResponse) else ()
            hops = [*(response.request for response in earlier), _failed_request(failure)]
        except (AttributeError, RuntimeError):  # no request on it (httpx raises RuntimeError)
            return False
        return any(hop is not request and served_in_process(client, hop) for hop in hops)

    return in_process, failed_in_process


class _AsyncHooks(AsyncHttpHooks):
    """``AsyncClient`` attempts: raptor's attempt timeout is an ``HttpxAttemptTimeout``."""

    __slots__ = ()

    timed_out = staticmethod(_timed_out)


def __getattr__(name: str) -> Any:
    if name == "HttpxCircuitOpen":
        return circuit_open_error_type()
    if name == "HttpxAttemptTimeout":
        return attempt_timeout_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refusal(error: RaptorError, request: Any) -> Any:
    """httpx's answer to a plain refusal: an ``HttpxCircuitOpen`` to raise for a breaker, a
    ``429`` response for a cooldown."""
    if isinstance(error, ThrottledError):
        import httpx  # noqa: PLC0415 - imported by install() already

        response = httpx.Response(
            429, headers=throttled_headers(error.retry_after), request=request
        )
        response.elapsed = _NO_TIME
        return response
    assert isinstance(error, CircuitOpenError)
    return circuit_open_error_type()(error.breaker, error.retry_after, request=request)


def refused(error: RaptorError, plan: CallPlan, request: Any) -> Any:
    """httpx's answer to ``error`` when it is this plan's plain refusal (not one raised by a
    fallback function, which passes through): raise ``HttpxCircuitOpen``, or hand back a
    ``429``; :data:`~otel_raptor.integrations._http.PROCEED` when building it failed (our bug,
    reported): the caller then sends the request as without raptor."""
    if not is_refusal_of(error, plan):
        raise error
    try:
        answer = _refusal(error, request)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("httpx.refusal", bug)
        return PROCEED
    if isinstance(answer, BaseException):
        raise answer from None
    return answer


class _Call:
    """One described ``send`` call."""

    __slots__ = ("fallback", "kwargs", "origin", "plan", "request", "stale_key")

    def __init__(
        self,
        origin: Origin,
        plan: CallPlan,
        request: Any,
        kwargs: dict[str, Any],
        stale_key: Hashable | None,
    ) -> None:
        self.origin = origin
        self.plan = plan
        self.request = request
        self.kwargs = kwargs
        self.stale_key = stale_key
        self.fallback: _Fallback | None = None


class _Installed(HttpInstallation):
    """The state of one installation; the module-level wrappers read it on every call."""

    __slots__ = (
        "async_table",
        "byte_stream",
        "sync_table",
        "timeout_type",
        "use_client_default",
    )

    name = "httpx"

    def __init__(self, settings: IntegrationSettings) -> None:
        import httpx  # noqa: PLC0415 - imported by install() already

        super().__init__(settings)
        # Sync and async clients differ in how a failed response is closed, so their plans
        # have their own hooks; both share each origin's breaker and downstream.
        elsewhere = _elsewhere(settings.config.breaker_key == "host")
        in_process, failed_in_process = _in_process_check()
        self.sync_table = OriginTable(
            settings.runtime,
            settings.config,
            HttpHooks(
                elsewhere=elsewhere, in_process=in_process, failed_in_process=failed_in_process
            ),
        )
        self.async_table = OriginTable(
            settings.runtime,
            settings.config,
            _AsyncHooks(
                elsewhere=elsewhere, in_process=in_process, failed_in_process=failed_in_process
            ),
        )
        self.byte_stream = httpx.ByteStream
        self.use_client_default = httpx.USE_CLIENT_DEFAULT
        self.timeout_type = httpx.Timeout

    # -- describing a request: our code, allowed to fail ------------------------------------

    def describe(
        self,
        table: OriginTable,
        send: Callable[..., Any],
        client: Any,
        request: Any,
        kwargs: dict[str, Any],
    ) -> _Call | CallPlan | None:
        """How to guard this ``send`` (``table`` says whether the client is sync or async):
        ``None`` to leave it alone, the plan alone for a request with no fallback and no
        stale copy to keep (the common case: nothing is allocated), else a :class:`_Call`.
        ``send`` is the original method, unbound (the client first)."""
        url = request.url
        # The fast lane's key (see _fast_key): the URL's scheme and the request's first
        # header, which is the Host header httpx made from the URL unless the caller set one.
        try:
            key: Hashable = _fast_key(request)
        except (AttributeError, IndexError):  # another httpx, no headers: looked up below
            key = None
        origin = table._by_prefix.get(key)
        if origin is None:
            origin = table.for_parts(url.scheme, url.host, url.port)
            if origin is None:
                return None
            host = request.headers.get("host")
            if host is not None and host.encode("ascii", "replace") != url.netloc:
                origin = table.for_host(origin, host)  # a virtual host: its own downstream
            elif key is not None and key[1][1] == b"host":  # type: ignore[index]
                table._remember(key, origin)  # Host is the URL's authority: the URL's origin
        if not origin.enabled:
            return None
        method = request.method
        if method in IDEMPOTENT and isinstance(request.stream, self.byte_stream):
            safe = True
        else:
            safe = replay_safe(
                origin, method, isinstance(request.stream, self.byte_stream), request.headers
            )
        if origin.timeout is not None:
            timeout = request.extensions.get("timeout")
            if timeout is None or timeout.get("read", 0) is None:
                self._bound_timeout(client, request, origin.timeout)
        if origin.plain:
            return origin.safe if safe else origin.unsafe
        stale_key = None
        fallbacks = origin.fixed_fallbacks
        if origin.stale_if_error and method == "GET" and not kwargs.get("stream"):
            stale_key = self._stale_key(client, request, kwargs)
            fallbacks = fallbacks or self.has_stale_copy(stale_key, origin.stale_max_age)
        described = _Call(
            origin,
            origin.plan(replay_safe=safe, with_fallback=fallbacks),
            request,
            kwargs,
            stale_key,
        )
        if fallbacks:
            is_async = table is self.async_table
            described.fallback = (_AsyncFallback if is_async else _Fallback)(
                self, described, MethodType(send, client), safe=safe
            )
        return described

    def _bound_timeout(self, client: Any, request: Any, seconds: float) -> None:
        """Give a request httpx would leave unbounded (every timeout ``None``) ``seconds``."""
        timeout = request.extensions.get("timeout")
        if timeout is None:
            configured = getattr(client, "timeout", None)
            if configured is None or not hasattr(configured, "as_dict"):
                return
            timeout = configured.as_dict()
        if timeout.get("read", 0) is None and all(v is None for v in timeout.values()):
            request.extensions = {
                **request.extensions,
                "timeout": self.timeout_type(seconds).as_dict(),
            }

    def _stale_key(self, client: Any, request: Any, kwargs: dict[str, Any]) -> Hashable | None:
        """The stale-cache key of a GET: a private digest of the request as it will be sent
        (its URL, with the client's params, its body, and its headers, with the client's and
        the cookies, all but :data:`~otel_raptor.integrations._http.STALE_UNKEYED_HEADERS`),
        of its auth and of whether it follows redirects; ``None`` (never served stale) with
        an auth flow other than basic auth, a client with request event hooks, or a body that
        can be read only once."""
        import httpx  # noqa: PLC0415 - imported by install() already

        # A request event hook runs inside send, after this key is made, and may set what
        # the key must hold (the current user's Authorization header, say): a key without
        # it would serve one user's answer to another.
        event_hooks = getattr(client, "event_hooks", None)
        if not isinstance(event_hooks, dict) or event_hooks.get("request"):
            return None

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
        stream = request.stream
        if not isinstance(stream, self.byte_stream):
            return None
        follow = kwargs.get("follow_redirects", self.use_client_default)
        if follow is self.use_client_default:
            follow = getattr(client, "follow_redirects", None)
        return private_digest(
            str(request.url),
            b"".join(stream),  # a ByteStream is the body in memory, iterated afresh each time
            token,
            stale_key_headers(request.headers.multi_items()),
            # Without redirects the answer is the redirect itself, not the page it leads to.
            bool(follow),
        )

    def stale_entry(self, response: Any, status: int, now: float) -> StaleEntry:
        return StaleEntry(
            status=status,
            reason=response.reason_phrase,
            headers=tuple(
                (name, value)
                for name, value in response.headers.multi_items()
                if name.lower() not in STALE_DROPPED_HEADERS
            ),
            body=response.content,
            encoding=None,
            url=str(response.url),
            stored_at=now,
        )

    # -- sending ------------------------------------------------------------------------------

    def send(self, wrapped: Callable[..., Any], described: _Call) -> Any:
        try:
            # (client, request): the client tells whether the request went through a proxy.
            response = call(
                described.plan,
                wrapped.__func__,  # type: ignore[attr-defined]  # a MethodType
                (wrapped.__self__, described.request),  # type: ignore[attr-defined]
                described.kwargs,
                described.fallback,
            )
        except (CircuitOpenError, ThrottledError) as error:
            answer = refused(error, described.plan, described.request)
            if answer is not PROCEED:
                return answer
        else:
            return self.kept(described.stale_key, response, described.fallback)
        return wrapped(described.request, **described.kwargs)  # as without us

    async def send_async(self, wrapped: Callable[..., Awaitable[Any]], described: _Call) -> Any:
        try:
            response = await call_async(
                described.plan,
                wrapped.__func__,  # type: ignore[attr-defined]  # a MethodType
                (wrapped.__self__, described.request),  # type: ignore[attr-defined]
                described.kwargs,
                described.fallback,
            )
        except (CircuitOpenError, ThrottledError) as error:
            answer = refused(error, described.plan, described.request)
            if answer is not PROCEED:
                return answer
        else:
            return self.kept(described.stale_key, response, described.fallback)
        return await wrapped(described.request, **described.kwargs)  # as without us

    # -- failover -----------------------------------------------------------------------------

    def failover_call(
        self, failed: _Call, base_url: str, *, is_async: bool
    ) -> tuple[Any, _Call | None]:
        """``failed``'s request moved to ``base_url`` (path and query kept), and how to send
        it: under that origin's plan without fallbacks, or (``None``) as it is when that
        origin is left alone."""
        import httpx  # noqa: PLC0415 - imported by install() already

        request = failed.request
        target = httpx.URL(base_url.rstrip("/") + request.url.raw_path.decode("ascii"))
        headers = [
            (name, value) for name, value in request.headers.multi_items() if name.lower() != "host"
        ]
        # ``stream=`` keeps the body as it is (and adds no header), so Host is set here.
        headers.insert(0, ("Host", target.netloc.decode("ascii")))
        moved = httpx.Request(
            request.method,
            target,
            headers=headers,
            stream=request.stream,
            extensions=dict(request.extensions),
        )
        table = self.async_table if is_async else self.sync_table
        try:
            origin = table.for_parts(target.scheme, target.host, target.port)
            if origin is None or not origin.enabled:
                return moved, None
            plan = origin.plan(replay_safe=failed.plan.spec.replay_safe, with_fallback=False)
            return moved, _Call(origin, plan, moved, failed.kwargs, None)
        except Exception as bug:  # noqa: BLE001 - sent as to an origin we leave alone
            report_internal_error("httpx.failover", bug)
            return moved, None


class _Fallback(FallbackCall):
    """The fallbacks of one ``Client.send`` call."""

    __slots__ = ()

    # A refusal by the failover origin is raised as raptor's plain one (not turned into
    # httpx's answer, as ``send`` would): see FallbackCall.failover.

    def failover(self, base_url: str) -> Any:
        request, moved = self.installed.failover_call(self.call, base_url, is_async=False)
        if moved is None:
            return self.wrapped(request, **self.call.kwargs)
        return call(moved.plan, self.wrapped, (request,), moved.kwargs)

    async def failover_async(self, base_url: str) -> Any:
        request, moved = self.installed.failover_call(self.call, base_url, is_async=True)
        if moved is None:
            return await self.wrapped(request, **self.call.kwargs)
        return await call_async(moved.plan, self.wrapped, (request,), moved.kwargs)

    def stale_response(self, entry: StaleEntry) -> Any:
        import httpx  # noqa: PLC0415 - imported by install() already

        response = httpx.Response(
            entry.status,
            headers=stale_headers(entry, self.now()),
            content=entry.body,
            request=self.call.request,
        )
        response.elapsed = _NO_TIME
        return response

    def refusal(self, error: RaptorError) -> Any:
        return _refusal(error, self.call.request)


class _AsyncFallback(_Fallback):
    """The fallbacks of one ``AsyncClient.send`` call."""

    __slots__ = ()
    is_async = True


_installed: _Installed | None = None


def _send_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Client.send``: a plain function (module-level factory: its identity
    marks the layer as ours), since wrapt's dispatch would cost more than the rest of it.

    When ``send`` has the signature of every httpx since 0.24 (``request``, then the
    keywords ``stream``, ``auth`` and ``follow_redirects``), the hook has it too, with the
    same defaults, and a replay-safe request to an origin without fallbacks takes its fast
    lane: the loop's fast path (``drive.run_sync``) copied inline, which hands anything but
    a success to the loop through ``resume_sync``. On a loopback request raptor then adds
    about 40 % fewer instructions than through the general hook, which packs the keywords
    into a dict for the loop to unpack and runs four more frames (``docs/http.md``, "Cost").
    Otherwise (another signature, another layer's ``send`` below ours) every call takes the
    general hook."""
    keywords = _send_keywords(original)
    lane = _fast_lane_parts()
    if keywords is None or lane is None:
        return _general_send_hook(original)
    return _fast_send_hook(original, keywords, lane)


def _send_keywords(original: Callable[..., Any]) -> tuple[Any, Any, Any] | None:
    """The defaults of ``stream``, ``auth`` and ``follow_redirects`` when ``original`` has the
    signature ``(self, request, *, stream, auth, follow_redirects)``; ``None`` otherwise.

    ``original``'s own signature, not the one ``__wrapped__`` shows: another library's layer
    made with ``functools.wraps`` (sentry-sdk's) shows httpx's, but takes what its own takes
    (a keyword of its own, its own defaults), and a hook with httpx's would refuse or
    override them."""
    import inspect  # noqa: PLC0415 - install time only

    try:
        parameters = list(inspect.signature(original, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return None
    shape = [(p.name, p.kind) for p in parameters]
    if shape != [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("request", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("stream", inspect.Parameter.KEYWORD_ONLY),
        ("auth", inspect.Parameter.KEYWORD_ONLY),
        ("follow_redirects", inspect.Parameter.KEYWORD_ONLY),
    ] or any(p.default is inspect.Parameter.empty for p in parameters[2:]):
        return None
    return parameters[2].default, parameters[3].default, parameters[4].default


def _fast_lane_parts() -> tuple[Callable[[], Any], str, str, str] | None:
    """The suppression check of the fast lane (see ``_http.suppression_keys``), when this
    httpx's URL keeps its parsed parts where ``describe`` reads them; else ``None``."""
    import httpx  # noqa: PLC0415 - imported by install() already

    try:
        reference = httpx.URL("http://localhost/")._uri_reference
        (reference.scheme, reference.host, reference.port)  # noqa: B018 - a probe
    except Exception:  # noqa: BLE001 - another httpx: the general hook will do
        return None
    return suppression_keys()


def _fast_key(request: Any) -> tuple[str, tuple[bytes, bytes, bytes]]:
    """The key of a request in its table's ``_by_prefix`` when its origin is known: its
    URL's scheme and its first header, ``(b"Host", b"host", netloc)`` when httpx made the
    Host header from the URL (``Request._prepare`` puts it first): scheme and netloc say
    the scheme, host and port. A request whose first header is another (the caller's Host
    is put after the client's headers) or a Host naming another authority misses, and
    ``describe`` judges it; only a key whose Host is the URL's own is ever remembered.
    Raises ``AttributeError`` or ``IndexError`` when it has none (another httpx, no
    headers)."""
    return (request.url._uri_reference.scheme, request.headers._list[0])


def _answered(response: Any) -> bool:
    """Whether the fast lane took ``response`` for a success (one its breaker should have
    recorded), as it does; ``False`` when that cannot be told. Never raises."""
    try:
        status = response.status_code
        return status not in FAILING_STATUSES or type(status) is not int
    except Exception:  # noqa: BLE001 - an exception path's question
        return False


def _fast_send_hook(
    original: Callable[..., Any],
    keywords: tuple[Any, Any, Any],
    lane: tuple[Callable[[], Any], str, str, str],
) -> Callable[..., Any]:
    stream_default, auth_default, follow_default = keywords
    current_context, first, second, third = lane
    general = _general_send_hook(original)

    def send(
        self: Any,
        request: Any,
        *,
        stream: Any = stream_default,
        auth: Any = auth_default,
        follow_redirects: Any = follow_default,
    ) -> Any:
        installed = _installed
        if installed is None:
            return original(
                self, request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        plan = None
        try:
            context = current_context()
            # An empty context (no span, no key set) suppresses nothing: one test.
            if context and (context.get(first) or context.get(second) or context.get(third)):
                installed = None  # suppressed: sent as without us, below
            else:
                # ``describe``'s common case, and ``run_sync``'s fast path's admission:
                # ``_fast_key`` inlined (a Host of the caller's misses: describe's).
                origin = installed.sync_table._by_prefix.get(
                    (request.url._uri_reference.scheme, request.headers._list[0])
                )
                if (
                    origin is not None
                    and (fast := origin.fast) is not None
                    and ((method := request.method) == "GET" or method in IDEMPOTENT)
                    and isinstance(request.stream, installed.byte_stream)
                    # A request httpx may leave unbounded goes to ``describe``, which bounds it.
                    and (
                        origin.timeout is None
                        or (
                            (timeout := request.extensions.get("timeout")) is not None
                            and timeout.get("read", 0) is not None
                        )
                    )
                ):
                    core = fast.core
                    start = fast.monotonic()
                    if (core is None or core._state is CLOSED) and (
                        start >= fast.downstream.cooldown_until
                    ):
                        plan = fast  # else the loop's entry refuses, probes or waits
        except (AttributeError, IndexError):  # not httpx's own request, URL or headers
            plan = None  # ``describe`` knows more
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("httpx.fast_lane", bug)
            plan = None
        if plan is None:
            if installed is None:
                return original(
                    self, request, stream=stream, auth=auth, follow_redirects=follow_redirects
                )
            return general(
                self, request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        try:
            response = original(
                self, request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure: BaseException = exc
            response = NO_RESULT
        else:
            try:
                status = response.status_code
                if status not in FAILING_STATUSES or type(status) is not int:
                    plan.budget._calls += 1  # RetryBudget.record_call, inlined
                    if core is not None and not (core.quiet and start < core._next_check):
                        plan.breaker.record_success_since(CALL_PERMIT, start)  # type: ignore[union-attr]
                    return response
                failure = FailingResponse(response)
            except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                report_internal_error("httpx.fast_lane_success", bug)
                if core is not None and _answered(response):
                    # A success the breaker may have missed: see CircuitBreaker.stop_judging.
                    plan.breaker.stop_judging()  # type: ignore[union-attr]
                return response
        kwargs = {"stream": stream, "auth": auth, "follow_redirects": follow_redirects}
        try:
            return resume_sync(plan, original, (self, request), kwargs, start, failure, response)
        except (CircuitOpenError, ThrottledError) as error:
            answer = refused(error, plan, request)
        if answer is not PROCEED:
            return answer
        return original(self, request, **kwargs)  # as without us

    return send


def _general_send_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Client.send`` for any signature and any request (see
    :func:`_send_hook`). ``request`` is named as in httpx, so that it arrives the same way
    whether the caller passed it by position or by keyword."""

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        installed = _installed
        if installed is None or args or not http_enabled():
            return original(self, request, *args, **kwargs)
        try:
            described = installed.describe(installed.sync_table, original, self, request, kwargs)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("httpx.describe", bug)
            return original(self, request, **kwargs)
        if type(described) is CallPlan:
            try:
                return call(described, original, (self, request), kwargs)
            except (CircuitOpenError, ThrottledError) as error:
                answer = refused(error, described, request)
            if answer is not PROCEED:
                return answer
            return original(self, request, **kwargs)  # as without us
        if described is None:
            return original(self, request, **kwargs)
        return installed.send(MethodType(original, self), described)  # type: ignore[arg-type]

    return send


def _async_send_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncClient.send``: ``async def`` like the original, so that
    ``inspect.iscoroutinefunction(AsyncClient.send)`` still holds."""

    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        installed = _installed
        if installed is None or args or not http_enabled() or not in_asyncio():
            # (not in_asyncio: trio, or no loop; our loop sleeps with asyncio)
            return await original(self, request, *args, **kwargs)
        try:
            described = installed.describe(installed.async_table, original, self, request, kwargs)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("httpx.describe", bug)
            return await original(self, request, **kwargs)
        if type(described) is CallPlan:
            try:
                return await call_async(described, original, (self, request), kwargs)
            except (CircuitOpenError, ThrottledError) as error:
                answer = refused(error, described, request)
            if answer is not PROCEED:
                return answer
            return await original(self, request, **kwargs)  # as without us
        if described is None:
            return await original(self, request, **kwargs)
        return await installed.send_async(MethodType(original, self), described)  # type: ignore[arg-type]

    return send


class HttpxIntegration(HookedIntegration[_Installed]):
    """Guards every ``httpx`` client call (see the module docstring and ``docs/http.md``):
    hooks ``httpx.Client.send`` and ``httpx.AsyncClient.send``."""

    name = "httpx"
    library = "httpx"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _Installed:
        circuit_open_error_type()  # made once, before any call needs it
        attempt_timeout_error_type()
        return _Installed(settings)

    def hooks(self, library: Any) -> HookSet:
        return (), [
            (library.Client, "send", _send_hook),
            (library.AsyncClient, "send", _async_send_hook),
        ]

    def release(self, state: _Installed) -> None:
        state.unmanage()
