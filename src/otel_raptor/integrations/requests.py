"""The requests integration: breakers, retries, a default timeout and fallbacks per origin.

What it hooks, and why there: ``requests.Session.request``, on the class, which every
``requests.get``/``post``/… and every session method goes through. The contrib requests
instrumentation wraps ``Session.send``, one level below: retrying *above* it makes each
attempt its own HTTP client span whichever of the two is installed first. One attempt is one
whole ``Session.request``: the request is prepared again (so an auth handshake is redone
rather than replayed with a stale nonce) and redirects are followed again from the first
URL. Code that calls ``Session.send`` with a prepared request directly is not guarded.

Per request, on the success path: one context read (is instrumentation suppressed?), three
``str.find`` and a dict lookup to find the origin's downstream, a few ``dict.get`` to judge
replay safety and the timeout, and the guard's closed-breaker fast path. See
``docs/http.md`` for what is retried, the timeout rule, fallbacks and the fail-fast error.

:func:`circuit_open_error_type` (also importable as ``RequestsCircuitOpen`` from this module)
is the class of the fail-fast error: both :class:`~otel_raptor.errors.CircuitOpenError` and
``requests.exceptions.ConnectionError``. requests itself is imported only by
:meth:`RequestsIntegration.install` and by that function.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import (
    IDEMPOTENT,
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
    origin_end,
    replay_safe,
    stale_headers,
)
from otel_raptor.integrations._wrapping import unwrap, wrap
from otel_raptor.runtime.guard import Guard
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
_CREDENTIAL_HEADERS: Final = ("authorization", "proxy-authorization", "cookie")
_REPLAYABLE_DATA: Final = (str, bytes, bytearray, dict)

_error_type: type[CircuitOpenError] | None = None

# downstream, guard, method, url, keyword arguments, fallbacks (or None), stale key (or None)
_Plan: TypeAlias = tuple[
    Downstream, Guard, Any, Any, dict[str, Any], "_Fallback | None", Hashable | None
]


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a downstream's breaker is open.

    It subclasses both :class:`~otel_raptor.errors.CircuitOpenError` and
    ``requests.exceptions.ConnectionError`` (so ``except requests.ConnectionError`` and
    ``except requests.RequestException`` keep catching it), and carries ``breaker``,
    ``retry_after`` and ``request`` (a ``PreparedRequest`` of the method and URL, or
    ``None``). Built on first use, since requests is imported only then; the same class
    every time. ``from otel_raptor.integrations.requests import RequestsCircuitOpen`` gives
    it too.
    """
    global _error_type  # noqa: PLW0603 - built once, lazily, because it imports requests
    if _error_type is None:
        import requests  # noqa: PLC0415 - the library is imported only when needed

        class RequestsCircuitOpen(CircuitOpenError, requests.exceptions.ConnectionError):
            """A refusal by an open breaker: a ``CircuitOpenError`` and a requests
            ``ConnectionError``."""

        RequestsCircuitOpen.__module__ = __name__
        RequestsCircuitOpen.__qualname__ = "RequestsCircuitOpen"
        _error_type = RequestsCircuitOpen
    return _error_type


def __getattr__(name: str) -> Any:
    if name == "RequestsCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refusal(error: CircuitOpenError, method: Any, url: Any, params: Any) -> BaseException:
    import requests  # noqa: PLC0415 - already imported by install()

    request = None
    with contextlib.suppress(Exception):  # an unpreparable URL: the error goes without it
        request = requests.Request(method=method, url=url, params=params).prepare()
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


def _header(headers: Any, lowered: str) -> str | None:
    if headers is None:
        return None
    for name, value in headers.items():
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        if isinstance(key, str) and key.lower() == lowered:
            return str(value)
    return None


def _stale_key(session: Any, url: str, kwargs: Mapping[str, Any]) -> Hashable | None:
    """The stale-cache key of a GET: its URL and params, and every credential we can see.

    ``None`` (never served stale) when it carries credentials we cannot fold into a key:
    an auth object other than a ``(user, password)`` tuple, or cookies not given as a
    dict of strings.
    """
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
    credentials = tuple(
        _header(source, name)
        for source in (getattr(session, "headers", None), kwargs.get("headers"))
        for name in _CREDENTIAL_HEADERS
    )
    params = kwargs.get("params")
    return (url, None if params is None else repr(params), auth, cookies, jar_items, credentials)


class _Installed:
    """The state of one installation; the module-level wrapper reads it on every call."""

    __slots__ = ("monotonic", "stale", "table")

    def __init__(self, settings: IntegrationSettings) -> None:
        self.table = DownstreamTable(
            settings.runtime, settings.config, timeout_kwarg="timeout", fallback=guard_fallback
        )
        self.stale = StaleCache()
        self.monotonic = settings.runtime.clock.monotonic

    def handle(
        self,
        wrapped: Callable[..., Any],
        session: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            plan = self._describe(wrapped, session, args, kwargs)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("requests.describe", bug)
            return wrapped(*args, **kwargs)
        if plan is None:
            return wrapped(*args, **kwargs)
        # The call: library exceptions pass through unchanged.
        downstream, guard, method, url, call_kwargs, fallback, stale_key = plan
        token = None if fallback is None else enter_fallback(fallback)
        try:
            response = guard.call(SyncAttempt(wrapped), method, url, **call_kwargs)
        except FailingResponse as failure:
            return failure.response
        except CircuitOpenError as error:
            if type(error) is CircuitOpenError and error.breaker == downstream.breaker_name:
                raise _refusal(error, method, url, call_kwargs.get("params")) from None
            raise
        finally:
            if token is not None:
                exit_fallback(token)
        if stale_key is not None:
            self.remember(stale_key, response)
        return response

    def _describe(
        self,
        wrapped: Callable[..., Any],
        session: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Plan | None:
        """How to guard this call, or ``None`` to leave it alone. Our code: may fail."""
        count = len(args)
        if count == 2:
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
        end = origin_end(text)
        downstream = self.table.for_prefix(text[:end]) if end > 0 else None
        if downstream is None or not downstream.enabled:
            return None
        name = method if type(method) is str else _text(method)
        if call_kwargs.get("data") is None and call_kwargs.get("files") is None:
            body_replayable = True
            safe = name in IDEMPOTENT or replay_safe(
                downstream, name, True, call_kwargs.get("headers"), _session_headers(session)
            )
        else:
            body_replayable = _body_replayable(call_kwargs)
            safe = replay_safe(
                downstream,
                name,
                body_replayable,
                call_kwargs.get("headers"),
                _session_headers(session),
            )
        stale_key = None
        fallbacks = downstream.fixed_fallbacks
        if downstream.stale_if_error and name.upper() == "GET":
            stream = call_kwargs.get("stream")
            if not (stream if stream is not None else getattr(session, "stream", False)):
                stale_key = _stale_key(session, text, call_kwargs)
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
            fallback = _Fallback(
                self,
                downstream,
                wrapped,
                method,
                url,
                call_kwargs,
                safe=safe,
                stale_key=stale_key,
                end=end,
            )
        if call_kwargs.get("timeout") is None:
            # requests waits forever without a timeout. ``None`` is its default, so an
            # explicit ``timeout=None`` reads as "none given" too. Last: nothing after this
            # may fail, since a failure calls the original with these very kwargs.
            if downstream.timed:
                call_kwargs.pop("timeout", None)  # the guard fills in the attempt timeout
            elif downstream.timeout is not None:
                call_kwargs["timeout"] = downstream.timeout
        return downstream, guard, method, url, call_kwargs, fallback, stale_key

    def send_plain(
        self,
        wrapped: Callable[..., Any],
        method: Any,
        url: str,
        kwargs: dict[str, Any],
        safe: bool,
    ) -> Any:
        """Send to ``url`` under its own downstream's guard, without fallbacks (failover)."""
        end = origin_end(url)
        downstream = self.table.for_prefix(url[:end]) if end > 0 else None
        if downstream is None or not downstream.enabled:
            return wrapped(method, url, **kwargs)
        guard = downstream.guard(replay_safe=safe, with_fallback=False)
        try:
            return guard.call(SyncAttempt(wrapped), method, url, **kwargs)
        except FailingResponse as failure:
            return failure.response
        except CircuitOpenError as error:
            if type(error) is CircuitOpenError and error.breaker == downstream.breaker_name:
                raise _refusal(error, method, url, kwargs.get("params")) from None
            raise

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
                    reason=response.reason or "",
                    headers=tuple(response.headers.items()),
                    body=response.content,
                    encoding=response.encoding,
                    url=response.url,
                    stored_at=self.monotonic(),
                ),
            )
        except Exception as bug:  # noqa: BLE001 - the response is the caller's either way
            report_internal_error("requests.stale_store", bug)


def _session_headers(session: Any) -> Any:
    return getattr(session, "headers", None)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class _Fallback(FallbackCall):
    """The fallbacks of one ``Session.request`` call."""

    __slots__ = ("end", "installed", "kwargs", "method", "url", "wrapped")

    def __init__(
        self,
        installed: _Installed,
        downstream: Downstream,
        wrapped: Callable[..., Any],
        method: Any,
        url: Any,
        kwargs: dict[str, Any],
        *,
        safe: bool,
        stale_key: Hashable | None,
        end: int,
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
        self.method = method
        self.url = url
        self.kwargs = kwargs
        self.end = end

    def failover(self, base_url: str) -> Any:
        text = self.url if type(self.url) is str else _text(self.url)
        target = base_url.rstrip("/") + text[self.end :]
        return self.installed.send_plain(
            self.wrapped, self.method, target, self.kwargs, self.replay_safe
        )

    def stale_response(self, entry: StaleEntry) -> Any:
        from requests.models import Response  # noqa: PLC0415 - imported by install()
        from requests.structures import CaseInsensitiveDict  # noqa: PLC0415

        response = Response()
        response.status_code = entry.status
        response.reason = entry.reason
        response.headers = CaseInsensitiveDict(stale_headers(entry, self.now()))
        response._content = entry.body  # what requests sets once it has read a body
        # Read already: close() must not reach for the (absent) raw stream.
        response._content_consumed = True  # type: ignore[attr-defined]  # untyped in the stubs
        response.encoding = entry.encoding
        response.url = entry.url
        return response

    def circuit_open(self, error: CircuitOpenError) -> BaseException:
        return _refusal(error, self.method, self.url, self.kwargs.get("params"))


_installed: _Installed | None = None


def _request_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``Session.request`` (module level: its identity marks the hook as ours)."""
    installed = _installed
    if installed is None or not http_enabled():
        return wrapped(*args, **kwargs)
    return installed.handle(wrapped, instance, args, kwargs)


class RequestsIntegration:
    """Guards every ``requests`` call (see the module docstring and ``docs/http.md``)."""

    name = "requests"
    library = "requests"

    def __init__(self) -> None:
        self._state: _Installed | None = None

    @property
    def installed(self) -> bool:
        return self._state is not None and self._state is _installed

    def install(self, settings: IntegrationSettings) -> None:
        """Hook ``requests.Session.request``; installing again replaces the settings and
        never wraps twice."""
        global _installed  # noqa: PLW0603 - the wrapper reads the installation from here
        import requests  # noqa: PLC0415 - the library is imported only when it is hooked

        circuit_open_error_type()
        state = _Installed(settings)
        _installed = state
        self._state = state
        try:
            wrap(requests.Session, "request", _request_wrapper)
        except Exception:
            _installed = self._state = None
            raise

    def uninstall(self) -> None:
        """Put ``Session.request`` back exactly; a no-op when this instance did not install."""
        global _installed  # noqa: PLW0603
        state, self._state = self._state, None
        if state is None or _installed is not state:
            return  # not installed, or another instance installed since: the hook is theirs
        _installed = None
        requests = sys.modules.get("requests")
        if requests is not None:
            unwrap(requests.Session, "request", _request_wrapper)
