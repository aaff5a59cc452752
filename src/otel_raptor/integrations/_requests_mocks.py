"""Whether responses or requests-mock, while active, will pass a ``requests`` call through to
the network rather than answer it themselves (see ``docs/http.md``, "Neither has an answer
made by a mocking library").

A request a mock answers goes through a breaker that is not closed, as without raptor; one it
passes through (responses' ``add_passthru`` prefixes and ``passthrough=True`` responses,
requests-mock's ``real_http=True``, on the mocker or on one matcher) goes to a real
downstream and keeps its guard, as respx's ``pass_through()`` routes do for httpx.

The libraries are read as they will decide, without running anything of theirs that has an
effect (``find`` pops responses from its registry; a matcher records the request): their
registered responses and matchers are matched against the request as requests will prepare
it, with their own pure matching code. Where that cannot be told (a registry or adapter
other than the library's own, a matcher function of the app's own, a body of files or a
stream, headers that an ``auth=`` or cookies would add), the request counts as answered by
the mock, as before: it goes through as without raptor. Asked only off the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from otel_raptor.integrations._http import from_mocking_library

__all__ = ["passes_through"]

# The keyword arguments responses' ``request_kwargs_matcher`` reads, as the adapter gets them.
_SEND_KWARGS: Final = ("stream", "timeout", "verify", "cert", "proxies")
_PLAIN_DATA: Final = (str, bytes, bytearray, dict, list, tuple)


def _owner(function: Any, kind: type) -> Any:
    """The instance of ``kind`` that the closure ``function`` (a library's replacement of
    ``send``) was made for, or ``None``."""
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, kind):
            return value
    return None


def _prepared(session: Any, method: Any, url: Any, kwargs: Mapping[str, Any]) -> Any:
    """The request as ``Session.request`` prepares it, without ``auth=`` (an auth handler may
    have effects) and cookies; ``None`` where preparing it would read the caller's body (a
    file, a stream, ``files=``)."""
    data = kwargs.get("data")
    if kwargs.get("files") is not None or (data is not None and not isinstance(data, _PLAIN_DATA)):
        return None
    from requests import Request  # noqa: PLC0415 - imported by install()
    from requests.sessions import merge_setting  # noqa: PLC0415
    from requests.structures import CaseInsensitiveDict  # noqa: PLC0415

    if isinstance(method, (bytes, bytearray)):
        method = method.decode("utf-8")
    if isinstance(url, (bytes, bytearray)):
        url = url.decode("utf-8")
    return Request(
        method=str(method).upper(),
        url=url,
        headers=merge_setting(  # type: ignore[no-untyped-call]  # untyped in requests' stubs
            kwargs.get("headers"), session.headers, dict_class=CaseInsensitiveDict
        ),
        data=data,
        json=kwargs.get("json"),
        params=merge_setting(kwargs.get("params"), session.params),  # type: ignore[no-untyped-call]
    ).prepare()


def _headers_complete(session: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether the prepared request has every header requests will send (no ``auth=`` nor
    cookies add theirs)."""
    return not (kwargs.get("auth") or session.auth or kwargs.get("cookies") or session.cookies)


def _responses_passes(
    function: Any, session: Any, method: Any, url: Any, kwargs: Mapping[str, Any]
) -> bool | None:
    """responses' ``_on_request``, read: the response ``FirstMatchRegistry.find`` would
    return (without popping it), then its ``passthrough``; or, none matching, the
    passthrough prefixes."""
    import responses  # noqa: PLC0415 - imported by the app: its function is patched in
    from responses import registries  # noqa: PLC0415

    mock = _owner(function, responses.RequestsMock)
    if mock is None:
        return None
    registry = mock.get_registry()
    if type(registry) is not registries.FirstMatchRegistry:
        return None  # OrderedRegistry's order, or a registry of the app's own
    request = _prepared(session, method, url, kwargs)
    if request is None:
        return None
    request.params = mock._parse_request_params(request.path_url)
    request.req_kwargs = {name: kwargs.get(name) for name in _SEND_KWARGS}
    complete = _headers_complete(session, kwargs)
    text = str(request.url)
    found = None
    for response in registry.registered:
        if response.method != request.method or not response._url_matches(response.url, text):
            continue
        for matcher in response.match:
            if getattr(matcher, "__module__", None) != "responses.matchers" or not complete:
                return None  # the app's function, or headers we could not prepare
            if str(getattr(matcher, "__qualname__", "")).startswith("request_kwargs_matcher"):
                return None  # what the adapter gets, after requests' environment merge
        if not response.matches(request)[0]:
            continue
        if found is None:
            found = response
            continue
        if found.call_count > 0:  # find's rule: a later match serves once the first did
            found = response
        break
    if found is not None:
        return bool(found.passthrough)
    return any(
        text.startswith(prefix) if isinstance(prefix, str) else bool(prefix.match(text))
        for prefix in mock.passthru_prefixes
    )


def _requests_mock_passes(
    function: Any, session: Any, method: Any, url: Any, kwargs: Mapping[str, Any]
) -> bool | None:
    """requests-mock's ``_fake_send``, read: the first of its adapter's matchers (newest
    first) that matches decides (``real_http=True`` on it: the network); none matching,
    the mocker's ``real_http``."""
    from requests_mock import adapter as mock_adapter  # noqa: PLC0415 - imported by the app
    from requests_mock import mocker as mock_mocker  # noqa: PLC0415
    from requests_mock import request as mock_request  # noqa: PLC0415

    mocker = _owner(function, mock_mocker.MockerCore)
    if mocker is None:
        return None
    # Typed Any: requests-mock's stubs leave its private parts out (and narrowing to its
    # classes would hide them).
    adapter: Any = mocker._adapter
    adapter_type: Any = mock_adapter.Adapter
    if type(adapter) is not adapter_type:
        return None
    request = _prepared(session, method, url, kwargs)
    if request is None:
        return None
    proxy = mock_request._RequestObjectProxy(request, case_sensitive=adapter._case_sensitive)
    complete = _headers_complete(session, kwargs)
    matcher_type: Any = mock_adapter._Matcher
    for matcher in reversed(adapter._matchers):
        if type(matcher) is not matcher_type:
            return None
        if not (matcher._match_method(proxy) and matcher._match_url(proxy)):
            continue
        if matcher._additional_matcher is not None or (matcher._request_headers and not complete):
            return None  # the app's function, or headers we could not prepare
        if matcher._match_headers(proxy):
            return bool(matcher._real_http)
    if not mocker.real_http:
        return False  # requests-mock raises its NoMockAddress
    last = mocker._last_send  # passed on to the send it replaced: another mocker's?
    return not from_mocking_library(getattr(last, "__func__", last))


def passes_through(
    function: Any, session: Any, method: Any, url: Any, kwargs: Mapping[str, Any]
) -> bool | None:
    """Whether the mocking library whose ``function`` (its replacement of ``Session.send``
    or ``HTTPAdapter.send``) handles ``session.request(method, url, **kwargs)`` will send it
    over the network: ``True``, ``False`` (it answers), ``None`` (cannot be told). Reads
    only; may raise (our code)."""
    library = str(getattr(function, "__module__", "")).partition(".")[0]
    if library == "responses":
        return _responses_passes(function, session, method, url, kwargs)
    if library == "requests_mock":
        return _requests_mock_passes(function, session, method, url, kwargs)
    return None
