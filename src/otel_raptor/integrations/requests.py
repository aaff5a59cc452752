"""The requests integration: breakers, retries, a default timeout and fallbacks per origin.

What it hooks, and why there: ``requests.Session.request``, on the class (with a plain
function, ``_wrapping.patch``, cheaper than a wrapt layer), which every
``requests.get``/``post``/… and every session method goes through. The contrib requests
instrumentation wraps ``Session.send``, one level below: retrying *above* it makes each
attempt its own HTTP client span whichever of the two is installed first. One attempt is one
whole ``Session.request``: the request is prepared again (so an auth handshake is redone
rather than replayed with a stale nonce) and redirects are followed again from the first
URL. Code that calls ``Session.send`` with a prepared request directly is not guarded.

What is specific to requests (the rest is the integration kit's and :mod:`._http`'s): how a
``Session.request`` call is described (its origin, whether its body can be sent again, its
``Idempotency-Key`` and the session's headers, the stale-cache key), the ``timeout`` keyword
(raptor's request timeout when the caller gave none; the attempt timeout when the policy has
one), the
fail-fast error class and the ``Response`` objects raptor builds (stale, or a ``429`` while the
origin cools down). See ``docs/http.md``.

:func:`circuit_open_error_type` (also importable as ``RequestsCircuitOpen`` from this module)
is the class of the fail-fast error: both :class:`~otel_raptor.errors.CircuitOpenError` and
``requests.exceptions.ConnectionError``. requests itself is imported only by
:meth:`RequestsIntegration.install` and by that function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from types import MethodType
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.errors import CircuitOpenError, RaptorError, ThrottledError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import (
    FAILING_STATUSES,
    IDEMPOTENT,
    PROCEED,
    STALE_DROPPED_HEADERS,
    FailingResponse,
    FallbackCall,
    HttpHooks,
    HttpInstallation,
    Origin,
    OriginTable,
    StaleEntry,
    downstream_of,
    from_mocking_library,
    http_enabled,
    origin_end,
    raised_by_mock,
    replay_safe,
    stale_headers,
    stale_key_headers,
    suppression_keys,
    throttled_headers,
)
from otel_raptor.integrations._kit import HookedIntegration, call, is_refusal_of, library_error
from otel_raptor.integrations._requests_mocks import passes_through
from otel_raptor.integrations._wrapping import HookSet
from otel_raptor.runtime.drive import CALL_PERMIT, CLOSED, NO_RESULT, CallPlan, resume_sync
from otel_raptor.runtime.keys import private_digest
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import requests as _requests

    class RequestsCircuitOpen(CircuitOpenError, _requests.exceptions.ConnectionError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["RequestsCircuitOpen", "RequestsIntegration", "circuit_open_error_type"]

# ``Session.request``'s parameters after ``self``, in order: positional arguments past
# ``method`` and ``url`` are moved into keyword arguments under these names.
_PARAMETERS: Final = (
    "method",
    "url",
    "params",
    "data",
    "headers",
    "cookies",
    "files",
    "auth",
    "timeout",
    "allow_redirects",
    "proxies",
    "hooks",
    "stream",
    "verify",
    "cert",
    "json",
)
_REPLAYABLE_DATA: Final = (str, bytes, bytearray, dict)


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when an origin's breaker is open.

    It subclasses both :class:`~otel_raptor.errors.CircuitOpenError` and
    ``requests.exceptions.ConnectionError`` (so ``except requests.ConnectionError`` and
    ``except requests.RequestException`` keep catching it), and carries ``breaker``,
    ``retry_after`` and ``request`` (a ``PreparedRequest`` of the method and URL, or
    ``None``). The same class every time; ``from otel_raptor.integrations.requests import
    RequestsCircuitOpen`` gives it too.
    """
    import requests  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, requests.exceptions.ConnectionError, "RequestsCircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "RequestsCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _prepared(method: Any, url: Any, params: Any) -> Any:
    import requests  # noqa: PLC0415 - already imported by install()

    with contextlib.suppress(Exception):  # an unpreparable URL: the answer goes without it
        return requests.Request(method=method, url=url, params=params).prepare()
    return None


def _refusal(error: RaptorError, method: Any, url: Any, params: Any) -> Any:
    """requests' answer to a plain refusal: a ``RequestsCircuitOpen`` to raise for a breaker,
    a ``429`` response for a cooldown."""
    request = _prepared(method, url, params)
    if isinstance(error, ThrottledError):
        from requests.models import Response  # noqa: PLC0415 - imported by install()
        from requests.structures import CaseInsensitiveDict  # noqa: PLC0415

        response = Response()
        response.status_code = 429
        response.reason = "Too Many Requests"
        response.headers = CaseInsensitiveDict(throttled_headers(error.retry_after))
        response._content = b""
        response._content_consumed = True  # type: ignore[attr-defined]  # untyped in the stubs
        response.url = request.url if request is not None else str(url)
        response.request = request
        return response
    assert isinstance(error, CircuitOpenError)
    return circuit_open_error_type()(error.breaker, error.retry_after, request=request)


def _body_replayable(kwargs: Mapping[str, Any]) -> bool:
    """Whether ``Session.request`` can encode the same body again (``json`` always can)."""
    data = kwargs.get("data")
    files = kwargs.get("files")
    if files is not None:
        try:
            items = files.items() if isinstance(files, Mapping) else files
            for _, value in items:
                content = value[1] if isinstance(value, tuple) else value
                if not isinstance(content, (str, bytes, bytearray)):
                    return False
        except (TypeError, ValueError):
            return False
    if data is None or isinstance(data, _REPLAYABLE_DATA):
        return True
    if isinstance(data, (list, tuple)):
        return all(isinstance(pair, tuple) and len(pair) == 2 for pair in data)
    return False  # a file, a generator, an iterator: read once


def _stale_key(session: Any, url: str, kwargs: Mapping[str, Any]) -> Hashable | None:
    """The stale-cache key of a GET: a private digest (see :mod:`otel_raptor.runtime.keys`)
    of the request as ``Session.request`` will send it: its URL with the session's params
    merged in, its body, its headers merged with the session's (all but
    :data:`~otel_raptor.integrations._http.STALE_UNKEYED_HEADERS`), every credential we
    can see (auth, cookies, the client certificate), and whether it follows redirects.

    ``None`` (never served stale) when it carries something we cannot fold into a key: an
    auth object other than a ``(user, password)`` tuple, cookies not given as a dict of
    strings, a body that can be read only once, or a URL requests cannot prepare.
    """
    from requests.models import PreparedRequest  # noqa: PLC0415 - imported by install()
    from requests.sessions import merge_setting  # noqa: PLC0415
    from requests.structures import CaseInsensitiveDict  # noqa: PLC0415

    merge: Callable[..., Any] = merge_setting  # untyped in the stubs

    auth = kwargs.get("auth")
    if auth is None:
        auth = getattr(session, "auth", None)
    if auth is not None and not (
        isinstance(auth, tuple) and all(isinstance(part, (str, bytes)) for part in auth)
    ):
        return None
    cookies = kwargs.get("cookies")
    if cookies is not None:
        if not isinstance(cookies, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in cookies.items()
        ):
            return None
        cookies = tuple(sorted(cookies.items()))
    jar = getattr(session, "cookies", None)
    jar_items = tuple(sorted((c.domain, c.path, c.name, c.value or "") for c in jar)) if jar else ()
    if kwargs.get("files") or not _body_replayable(kwargs):
        return None
    # Merged as Session.request merges them: a request's own value wins, a None drops the
    # session's, and params that are not a mapping replace the session's.
    params = merge(kwargs.get("params") or {}, getattr(session, "params", None))
    if params:
        try:
            prepared = PreparedRequest()
            prepared.prepare_url(url, params)
        except Exception:  # noqa: BLE001 - a bad URL: requests reports it itself
            return None
        url = prepared.url or url
    headers = merge(
        kwargs.get("headers"),
        getattr(session, "headers", None),
        dict_class=CaseInsensitiveDict,
    )
    if headers is not None and not isinstance(headers, Mapping):
        return None
    cert = merge(kwargs.get("cert"), getattr(session, "cert", None))
    return private_digest(
        url,
        kwargs.get("data") or None,
        kwargs.get("json"),
        auth,
        cookies,
        jar_items,
        stale_key_headers(headers.items()) if headers else (),
        cert,
        # Without redirects the answer is the redirect itself, not the page it leads to.
        bool(kwargs.get("allow_redirects", True)),
    )


def _elsewhere(by_host: bool) -> Callable[[BaseException, tuple[Any, ...]], bool]:
    """Whether a failed attempt (made with positional arguments ending in the URL) failed
    somewhere else than at its origin: at the proxy it goes through (which could not be
    reached), or at a redirect hop to another downstream (a failing response whose first hop
    was elsewhere, or an error of a request requests sent elsewhere). The failure must not
    count against the origin's breaker: it would refuse the origin's every call, those that
    reach it directly or answer with the redirect too."""

    def elsewhere(failure: BaseException, args: tuple[Any, ...]) -> bool:
        try:
            from requests.exceptions import ProxyError  # noqa: PLC0415 - imported by install()
            from requests.models import PreparedRequest  # noqa: PLC0415

            if isinstance(failure, ProxyError) and _proxy_unreachable(failure):
                return True
            # A Host of the caller's names the downstream (docs/http.md, "Virtual hosts");
            # requests sends it again at every hop.
            if isinstance(failure, FailingResponse):
                response = failure.response
                history = getattr(response, "history", None)
                if not history:
                    return False
                first, hop = history[0].url, response.url
                first_host = _sent_host(history[0].request)
                hop_host = _sent_host(response.request)
            else:
                request = getattr(failure, "request", None)
                hop = getattr(request, "url", None)
                if not isinstance(hop, str):
                    return False
                prepared = PreparedRequest()
                prepared.prepare_url(_text(args[-1]), None)  # as requests sent it first
                first = prepared.url
                first_host = hop_host = _sent_host(request)
            if not (isinstance(first, str) and isinstance(hop, str)):
                return False
            return downstream_of(hop, by_host=by_host, host_header=hop_host) != downstream_of(
                first, by_host=by_host, host_header=first_host
            )
        except Exception as bug:  # noqa: BLE001 - counted, as without this judgement
            report_internal_error("requests.elsewhere", bug)
            return False

    return elsewhere


def _sent_host(request: Any) -> object:
    """The ``Host`` header of a ``PreparedRequest`` (``None`` when it has none, or is none)."""
    headers = getattr(request, "headers", None)
    return None if headers is None else headers.get("Host")


def _proxy_unreachable(failure: BaseException) -> bool:
    """Whether requests' ``ProxyError`` says the proxy itself failed: it could not be reached
    (refused, timed out, not resolved) or refused our credentials (a ``407`` to ``CONNECT``),
    rather than that it could not open a tunnel to the origin (a ``502`` to ``CONNECT``: the
    origin's failure)."""
    from urllib3.exceptions import (  # noqa: PLC0415 - requests' own dependency
        ConnectTimeoutError,
        MaxRetryError,
    )
    from urllib3.exceptions import ProxyError as Urllib3ProxyError  # noqa: PLC0415

    inner = failure.args[0] if failure.args else None
    if isinstance(inner, MaxRetryError):
        inner = inner.reason
    if isinstance(inner, Urllib3ProxyError):
        inner = inner.original_error
    if isinstance(inner, ConnectTimeoutError):  # NewConnectionError, NameResolutionError too
        return True
    # http.client's words for a tunnel the proxy refused, with the proxy's status.
    return type(inner) is OSError and str(inner).startswith("Tunnel connection failed: 407")


#: Where requests does its real network I/O (module-name prefixes): an error raised there
#: came from the network, even under a mocking library that passed the request through.
_REAL_IO: Final = ("requests.adapters", "urllib3")


def _in_process(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``Session.request`` call (positional arguments ``(session, method, url)``,
    keyword arguments ``kwargs``) is answered in the process by a mocking library rather
    than sent over the network: the session's ``send`` is requests-mock's, or the ``send``
    of the adapter mounted for its URL is responses', and the library will not pass it
    through (:func:`~otel_raptor.integrations._requests_mocks.passes_through`; where that
    cannot be told, it is taken as answered). A test suite's mocked ``503`` is the code
    under test, not a downstream: retrying it changes what the test sees (call counts,
    one-shot mocks), and counting it opens a breaker that refuses every later test's
    requests to that origin. A request passed through goes to a real downstream and keeps
    its guard. Asked only off the fast path (a breaker that is not closed, a cooldown)."""
    if len(args) != 3:
        return False
    session, method, url = args
    send = session.send
    function = getattr(send, "__func__", send)
    if not from_mocking_library(function):
        from requests.exceptions import InvalidSchema  # noqa: PLC0415 - imported by install()

        try:
            adapter = session.get_adapter(_text(url))
        except InvalidSchema:  # requests raises it itself when sending
            return False
        function = getattr(type(adapter), "send", None)
        if not from_mocking_library(function):
            return False
    try:
        return passes_through(function, session, method, url, kwargs) is not True
    except Exception as bug:  # noqa: BLE001 - answered by the mock, as before
        report_internal_error("requests.mock_passes_through", bug)
        return True


def _failed_in_process(failure: Exception, args: tuple[Any, ...]) -> bool:
    """Whether a failed attempt's failure is a mocking library's answer (see
    :func:`_in_process`): a failing response that requests-mock made (its adapter, or its
    stand-in for one, is the response's ``connection``) or that responses made (the
    adapter's ``send`` is responses', and no urllib3 pool read it: one that responses passed
    through did come from the network), or an error raised inside either library."""
    if not isinstance(failure, FailingResponse):
        return raised_by_mock(failure, _REAL_IO)
    response = failure.response
    adapter = type(getattr(response, "connection", None))
    if from_mocking_library(adapter):
        return True
    return (
        from_mocking_library(getattr(adapter, "send", None))
        and getattr(getattr(response, "raw", None), "_pool", None) is None
    )


def _session_headers(session: Any) -> Any:
    return getattr(session, "headers", None)


#: ``host`` in every mix of cases, as text and as bytes: whether a mapping of headers names
#: a ``Host`` is then one pass over its names in C (``frozenset.isdisjoint``).
_HOST_SPELLINGS: Final = frozenset(
    spelling
    for mask in range(16)
    for text in ["".join(c.upper() if mask >> i & 1 else c for i, c in enumerate("host"))]
    for spelling in (text, text.encode("ascii"))
)


def _host_header(headers: Any, session_headers: Any) -> object:
    """The ``Host`` value requests will send for a call with ``headers=`` ``headers`` on a
    session with ``session_headers`` (merged as ``Session.request`` merges them: the call's
    entry, however spelled, wins, and one set to ``None`` drops the session's), or ``None``:
    no ``Host`` of the caller's, the one the URL gives."""
    if headers is not None and not _HOST_SPELLINGS.isdisjoint(headers):
        return _host_entry(headers)
    store = getattr(session_headers, "_store", None)
    if isinstance(store, dict):  # requests' CaseInsensitiveDict: (name, value) by lower case
        entry = store.get("host") or store.get(b"host")
        return None if entry is None else entry[1]
    if session_headers is not None and not _HOST_SPELLINGS.isdisjoint(session_headers):
        return _host_entry(session_headers)
    return None


def _host_entry(headers: Any) -> object:
    """The value of the last ``Host`` entry of a headers mapping that has one, however it
    is spelled (as requests merges them)."""
    found = None
    for name, value in headers.items():
        if name in _HOST_SPELLINGS:
            found = value
    return found


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class _Call:
    """One described ``Session.request`` call."""

    __slots__ = (
        "defaulted",
        "end",
        "fallback",
        "kwargs",
        "method",
        "origin",
        "plan",
        "stale_key",
        "url",
    )

    def __init__(
        self,
        origin: Origin,
        plan: CallPlan,
        method: Any,
        url: Any,
        kwargs: dict[str, Any],
        end: int,
        stale_key: Hashable | None,
    ) -> None:
        self.origin = origin
        self.plan = plan
        self.method = method
        self.url = url
        self.kwargs = kwargs
        self.end = end
        self.stale_key = stale_key
        self.fallback: _Fallback | None = None
        #: Whether the timeout in ``kwargs`` is the origin's rule (the caller gave none).
        self.defaulted = False


class _Installed(HttpInstallation):
    """The state of one installation; the module-level wrapper reads it on every call."""

    __slots__ = ("table",)

    name = "requests"

    def __init__(self, settings: IntegrationSettings) -> None:
        super().__init__(settings)
        by_host = settings.config.breaker_key == "host"
        self.table = OriginTable(
            settings.runtime,
            settings.config,
            HttpHooks(
                "timeout",
                _elsewhere(by_host),
                in_process=_in_process,
                failed_in_process=_failed_in_process,
            ),
        )

    def send(self, request: Callable[..., Any], session: Any, described: _Call) -> Any:
        """Run one described call (``request`` is the original method, unbound); library
        errors pass through unchanged."""
        try:
            response = call(
                described.plan,
                request,
                # The session first, as on the fast path: the in-process check reads it.
                (session, described.method, described.url),
                described.kwargs,
                described.fallback,
            )
        except (CircuitOpenError, ThrottledError) as error:
            answer = refused(
                error, described.plan, described.method, described.url, described.kwargs
            )
            if answer is not PROCEED:
                return answer
        else:
            return self.kept(described.stale_key, response, described.fallback)
        # as without us
        return request(session, described.method, described.url, **described.kwargs)

    def describe(
        self,
        request: Callable[..., Any],
        session: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Call | CallPlan | None:
        """How to guard this call: ``None`` to leave it alone, the plan alone for a call
        given as ``(method, url, **kwargs)`` with no fallback and no stale copy to keep (the
        common case: nothing is allocated), else a :class:`_Call`. ``request`` is the
        original method, unbound (the session first). Our code: may fail."""
        if len(args) == 2:
            method, url = args
            call_kwargs = kwargs
        else:
            call_kwargs = dict(kwargs)
            for name, value in zip(_PARAMETERS, args, strict=False):
                if name in call_kwargs:
                    return None  # requests raises its own TypeError
                call_kwargs[name] = value
            method = call_kwargs.pop("method", None)
            url = call_kwargs.pop("url", None)
            if method is None or url is None:
                return None
        text = url if type(url) is str else _text(url)
        origin = self.table.for_url(text)
        if origin is None:
            return None
        host = _host_header(call_kwargs.get("headers"), _session_headers(session))
        if host is not None:
            origin = self.table.for_host(origin, host)  # a virtual host: its own downstream
        if not origin.enabled:
            return None
        name = method if type(method) is str else _text(method)
        if call_kwargs.get("data") is None and call_kwargs.get("files") is None:
            safe = name in IDEMPOTENT or replay_safe(
                origin, name, True, call_kwargs.get("headers"), _session_headers(session)
            )
        else:
            safe = replay_safe(
                origin,
                name,
                _body_replayable(call_kwargs),
                call_kwargs.get("headers"),
                _session_headers(session),
            )
        stale_key = None
        fallbacks = origin.fixed_fallbacks
        if origin.stale_if_error and name.upper() == "GET":
            stream = call_kwargs.get("stream")
            if not (stream if stream is not None else getattr(session, "stream", False)):
                stale_key = _stale_key(session, text, call_kwargs)
                fallbacks = fallbacks or self.has_stale_copy(stale_key, origin.stale_max_age)
        defaulted = call_kwargs.get("timeout") is None
        if defaulted:
            # Inlined _default_timeout (every call without a timeout runs it).
            if origin.timed:
                call_kwargs.pop("timeout", None)
            elif origin.timeout is not None:
                call_kwargs["timeout"] = origin.timeout
        if not fallbacks and stale_key is None and call_kwargs is kwargs:
            return origin.safe if safe else origin.unsafe
        described = _Call(
            origin,
            origin.plan(replay_safe=safe, with_fallback=fallbacks),
            method,
            url,
            call_kwargs,
            origin_end(text),
            stale_key,
        )
        described.defaulted = defaulted
        if fallbacks:
            described.fallback = _Fallback(self, described, MethodType(request, session), safe=safe)
        return described

    def failover(self, wrapped: Callable[..., Any], failed: _Call, base_url: str) -> Any:
        """Send ``failed`` to ``base_url`` under that origin's plan, without fallbacks. A
        refusal by that origin is raised as raptor's plain one (see
        :meth:`FallbackCall.failover`)."""
        text = failed.url if type(failed.url) is str else _text(failed.url)
        target = base_url.rstrip("/") + text[failed.end :]
        try:
            plan, kwargs = self._failover_plan(failed, target)
        except Exception as bug:  # noqa: BLE001 - sent as to an origin we leave alone
            report_internal_error("requests.failover", bug)
            plan, kwargs = None, failed.kwargs
        if plan is None:
            return wrapped(failed.method, target, **kwargs)
        return call(plan, wrapped, (failed.method, target), kwargs)

    def _failover_plan(self, failed: _Call, target: str) -> tuple[CallPlan | None, dict[str, Any]]:
        """The plan (``None``: an origin left alone) and keyword arguments of ``failed`` sent
        to ``target``. Our code: may fail."""
        origin = self.table.for_url(target)
        if origin is None or not origin.enabled:
            return None, failed.kwargs
        kwargs = failed.kwargs
        if failed.defaulted:
            # The timeout in ``kwargs`` is the primary origin's rule, not the caller's: this
            # origin's own applies (without it, a primary with an attempt timeout would send
            # this request with none, to wait for ever on a hung backup).
            kwargs = {**kwargs}
            kwargs.pop("timeout", None)
            _default_timeout(kwargs, origin)
        return origin.plan(replay_safe=failed.plan.spec.replay_safe, with_fallback=False), kwargs

    def stale_entry(self, response: Any, status: int, now: float) -> StaleEntry:
        return StaleEntry(
            status=status,
            reason=response.reason or "",
            headers=tuple(
                (name, value)
                for name, value in response.headers.items()
                if name.lower() not in STALE_DROPPED_HEADERS
            ),
            body=response.content,
            encoding=response.encoding,
            url=response.url,
            stored_at=now,
        )


def _default_timeout(kwargs: dict[str, Any], origin: Origin) -> None:
    """Give a call whose caller gave no timeout the origin's. requests waits forever without
    a timeout, and ``None`` is its default, so an explicit ``timeout=None`` reads as "none
    given" too; a policy with an attempt timeout applies that one instead (through the
    plan's hooks)."""
    if origin.timed:
        kwargs.pop("timeout", None)
    elif origin.timeout is not None:
        kwargs["timeout"] = origin.timeout


def refused(
    error: RaptorError, plan: CallPlan, method: Any, url: Any, kwargs: Mapping[str, Any]
) -> Any:
    """requests' answer to ``error`` when it is this plan's plain refusal (not one raised by
    a fallback function, which passes through): raise ``RequestsCircuitOpen``, or hand back a
    ``429``; :data:`~otel_raptor.integrations._http.PROCEED` when building it failed (our
    bug, reported): the caller then sends the request as without raptor."""
    if not is_refusal_of(error, plan):
        raise error
    try:
        answer = _refusal(error, method, url, kwargs.get("params"))
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("requests.refusal", bug)
        return PROCEED
    if isinstance(answer, BaseException):
        raise answer from None
    return answer


class _Fallback(FallbackCall):
    """The fallbacks of one ``Session.request`` call."""

    __slots__ = ()

    def failover(self, base_url: str) -> Any:
        return self.installed.failover(self.wrapped, self.call, base_url)

    def stale_response(self, entry: StaleEntry) -> Any:
        from requests.models import Response  # noqa: PLC0415 - imported by install()
        from requests.structures import CaseInsensitiveDict  # noqa: PLC0415

        response = Response()
        response.status_code = entry.status
        response.reason = entry.reason
        headers = CaseInsensitiveDict(stale_headers(entry, self.now()))
        headers["Content-Length"] = str(len(entry.body))  # of the decoded body it holds
        response.headers = headers
        response._content = entry.body  # what requests sets once it has read a body
        # Read already: close() must not reach for the (absent) raw stream.
        response._content_consumed = True  # type: ignore[attr-defined]  # untyped in the stubs
        response.encoding = entry.encoding
        response.url = entry.url
        # As on a response requests received: the request (the final one, so its URL is the
        # response's) and ``elapsed`` (Response() sets it to 0: nothing was waited for).
        response.request = _prepared(self.call.method, entry.url, None)
        return response

    def refusal(self, error: RaptorError) -> Any:
        described = self.call
        return _refusal(error, described.method, described.url, described.kwargs.get("params"))


_installed: _Installed | None = None


def _request_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Session.request``: a plain function (module-level factory: its identity
    marks the layer as ours), since wrapt's dispatch would cost more than the rest of it.
    With the context's suppression keys known (``_http.suppression_keys``), the hook has a
    fast lane for the common call (see :func:`_fast_request_hook`); else the general hook."""
    lane = suppression_keys()
    if lane is None:
        return _general_request_hook(original)
    return _fast_request_hook(original, lane)


def _fast_request_hook(
    original: Callable[..., Any], lane: tuple[Callable[[], Any], str, str, str]
) -> Callable[..., Any]:
    """The hook with a fast lane: a call made as ``(method, url, **kwargs)`` with a ``str``
    URL whose origin is known (its prefix in the table) and has a fast plan
    (:attr:`Origin.fast`: enabled, no fallbacks, no keyword of ours on the first attempt), a
    method in :data:`IDEMPOTENT` and no body, through a closed breaker and no cooldown, runs
    in this frame: ``describe``'s common case and ``run_sync``'s fast path copied inline
    (anything but a success goes on in the loop through ``drive.resume_sync``). It costs about
    half the instructions of ``describe`` + ``for_url`` + ``run_sync`` + ``_failing`` in their
    own frames. Every other call takes the general hook, as before."""
    current_context, first, second, third = lane
    general = _general_request_hook(original)
    # Whether a call's ``headers=`` name no ``Host``, however spelled: one call, in C.
    names_no_host = _HOST_SPELLINGS.isdisjoint

    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        installed = _installed
        if installed is None:
            return original(self, *args, **kwargs)
        plan = None
        try:
            context = current_context()
            # An empty context (no span, no key set) suppresses nothing: one test.
            if context and (context.get(first) or context.get(second) or context.get(third)):
                installed = None  # suppressed: sent as without us, below
            elif len(args) == 2 and type(url := args[1]) is str:
                # OriginTable.for_url's common case: its prefix looked up as written, or
                # compared with the last one found (``recent``: prefix, length, origin). A
                # URL that starts with that prefix and goes on with ``/`` (or ends) has it
                # for its own: the prefix holds no ``/`` past the scheme's.
                table = installed.table
                recent = table.recent
                origin: Origin | None  # (an annotation alone: no code)
                if url[: recent[1]] == recent[0]:  # the prefix and its "/"
                    origin = recent[2]
                else:
                    end = url.find("/", 8)  # past "https://": the scheme's own come before
                    if end < 0:
                        origin = table._by_prefix.get(url)
                    else:
                        origin = table._by_prefix.get(url[:end])
                        if origin is not None:
                            end += 1
                            table.recent = (url[:end], end, origin)
                if (
                    origin is not None
                    and (fast := origin.fast) is not None
                    and ((method := args[0]) == "GET" or method in IDEMPOTENT)
                    and kwargs.get("data") is None
                    and kwargs.get("files") is None
                    # No timeout given and a policy with an attempt timeout: describe's.
                    and ((timeout := kwargs.get("timeout")) is not None or not origin.timed)
                    # A Host of the caller's, the call's or the session's (requests' own
                    # CaseInsensitiveDict, keyed in lower case, as text or as bytes: requests
                    # sends either as "Host"; any other mapping raises AttributeError):
                    # describe's, which finds the virtual host.
                    and ((headers := kwargs.get("headers")) is None or names_no_host(headers))
                    and "host" not in (store := self.headers._store)
                    and b"host" not in store
                ):
                    core = fast.core
                    start = fast.monotonic()
                    if (core is None or core._state is CLOSED) and (
                        start >= fast.downstream.cooldown_until
                    ):
                        if timeout is None and origin.timeout is not None:
                            kwargs["timeout"] = origin.timeout  # _default_timeout's
                        plan = fast  # else the loop's entry refuses, probes or waits
        except (AttributeError, TypeError):  # headers not requests' own: describe's
            plan = None
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("requests.fast_lane", bug)
            plan = None
        if plan is None:
            if installed is None:
                return original(self, *args, **kwargs)
            return general(self, *args, **kwargs)
        try:
            response = original(self, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure: BaseException = exc
            response = NO_RESULT
        else:
            try:
                status = response.status_code
                # ``type`` last: ``True == 1`` and ``503.0 == 503`` would match the set.
                failing = status in FAILING_STATUSES and type(status) is int
            except (AttributeError, TypeError):  # no status, or an unhashable one: _failing's
                failing = False
            except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                report_internal_error("requests.fast_lane_status", bug)
                failing = False
            if not failing:
                try:
                    plan.budget._calls += 1  # RetryBudget.record_call, inlined
                    if core is not None and not (core.quiet and start < core._next_check):
                        plan.breaker.record_success_since(CALL_PERMIT, start)  # type: ignore[union-attr]
                except Exception as bug:  # noqa: BLE001 - never lose the caller's result
                    report_internal_error("requests.fast_lane_success", bug)
                    if core is not None:  # it would count failures only: see stop_judging
                        plan.breaker.stop_judging()  # type: ignore[union-attr]
                return response
            failure = FailingResponse(response)
        # Outside the ``except`` block, so that re-raising a later attempt's error does not
        # chain this one onto it as its ``__context__``.
        try:
            return resume_sync(plan, original, (self, *args), kwargs, start, failure, response)
        except (CircuitOpenError, ThrottledError) as error:
            answer = refused(error, plan, args[0], args[1], kwargs)
        if answer is not PROCEED:
            return answer
        return original(self, *args, **kwargs)  # as without us

    return request


def _general_request_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook for any call (see :func:`_request_hook`)."""

    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        installed = _installed
        if installed is None or not http_enabled():
            return original(self, *args, **kwargs)
        try:
            described = installed.describe(original, self, args, kwargs)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("requests.describe", bug)
            return original(self, *args, **kwargs)
        if type(described) is CallPlan:
            try:
                return call(described, original, (self, *args), kwargs)
            except (CircuitOpenError, ThrottledError) as error:
                answer = refused(error, described, args[0], args[1], kwargs)
            if answer is not PROCEED:
                return answer
            return original(self, *args, **kwargs)  # as without us
        if described is None:
            return original(self, *args, **kwargs)
        return installed.send(original, self, described)  # type: ignore[arg-type]

    return request


class RequestsIntegration(HookedIntegration[_Installed]):
    """Guards every ``requests`` call (see the module docstring and ``docs/http.md``): hooks
    ``requests.Session.request``."""

    name = "requests"
    library = "requests"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _Installed:
        circuit_open_error_type()  # made once, before any call needs it
        return _Installed(settings)

    def hooks(self, library: Any) -> HookSet:
        return (), [(library.Session, "request", _request_hook)]

    def release(self, state: _Installed) -> None:
        state.unmanage()
