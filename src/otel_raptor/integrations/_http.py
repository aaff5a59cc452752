"""What the requests and httpx integrations share: origins, outcomes, fallbacks, stale cache.

One *origin* is ``scheme://host:port``. The first request to it resolves its
:class:`~otel_raptor.config.DownstreamPolicy` (``RaptorConfig.policy_for``) and builds its
kit :class:`~otel_raptor.integrations._kit.Target`: one breaker per service name
(``scheme://host:port``, or the host alone with ``breaker_key = "host"``; folded to ``other``
past the runtime's service cap) and the call plans. Later requests find it with one slice of
the URL and one dict lookup. A URL's ``user:pass@`` never reaches a table key or a name.

*Outcomes* (:class:`HttpHooks`): a ``429`` or ``5xx`` response is a failed attempt, so the
loop classifies it (status, ``Retry-After``), counts it against the breaker and retries it
like an exception; before the next attempt the failed response is closed so its connection
goes back to the pool. When the loop gives up, the caller gets that last response itself.

*Refusals*: a breaker refusal becomes the library's fail-fast error (both
:class:`~otel_raptor.errors.CircuitOpenError` and the library's connection error); a
downstream still cooling down after a ``429`` with a ``Retry-After`` longer than the request
may wait answers a ``429`` response of our own (``X-Raptor-Throttled: 1``), as the server would.

*Fallbacks* (failover base URLs, stale-if-error, a fallback function) run as the loop's
fallback, so ``RecoveryFinished(strategy=failover, outcome=fallback)`` is published for them.

*Resends*: :class:`ResendCountSpanProcessor` sets ``http.request.resend_count`` on the HTTP
client spans that the contrib instrumentations start during a retry.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import math
import re
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from opentelemetry import context as otel_context
from opentelemetry.context import Context, get_current
from opentelemetry.instrumentation import utils as otel_utils
from opentelemetry.instrumentation.utils import is_http_instrumentation_enabled
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from otel_raptor.config import DownstreamPolicy, RaptorConfig
from otel_raptor.core.replay import IDEMPOTENT_METHODS, http_replay_safe, names_idempotency_key
from otel_raptor.errors import CircuitOpenError, RaptorError, ThrottledError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import MAX_TARGETS, Target, manage_cache
from otel_raptor.runtime.drive import (
    CallHooks,
    CallPlan,
    FallbackDeclined,
    current_resend,
    is_async_callable,
    warn_async_fallback,
)
from otel_raptor.runtime.forksafe import after_fork_in_child, register_lock
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import Runtime
from otel_raptor.telemetry.instruments import ATTR_HTTP_REQUEST_RESEND_COUNT

__all__ = [
    "IDEMPOTENT",
    "RESEND_COUNT_ATTRIBUTE",
    "STALE_BODY_LIMIT",
    "STALE_DROPPED_HEADERS",
    "STALE_ENTRIES",
    "STALE_HEADER",
    "STALE_TOTAL_BYTES",
    "STALE_UNKEYED_HEADERS",
    "THROTTLED_HEADER",
    "AsyncHttpHooks",
    "INTEGRATION_CHECK",
    "MOCKING_LIBRARIES",
    "PROCEED",
    "FailingResponse",
    "FallbackCall",
    "HttpHooks",
    "HttpInstallation",
    "Origin",
    "OriginTable",
    "ResendCountSpanProcessor",
    "StaleCache",
    "StaleEntry",
    "http_enabled",
    "http_health_check",
    "from_mocking_library",
    "is_failing_status",
    "canonical_host",
    "downstream_of",
    "origin_end",
    "parse_origin",
    "raised_by_mock",
    "replay_safe",
    "resend_count",
    "stale_headers",
    "stale_key_headers",
    "throttled_headers",
    "virtual_host",
]

#: What an integration's ``refused`` hands back when the library's answer to a refusal could
#: not be built (our bug, reported): the request is then sent as it would be without raptor.
PROCEED: Final = object()

#: The semantic-convention attribute for the ordinal of a resent request.
RESEND_COUNT_ATTRIBUTE: Final = ATTR_HTTP_REQUEST_RESEND_COUNT
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_SERVER_PORT: Final = "server.port"

#: Set on every health check an HTTP integration registers (``uninstrument()`` removes those,
#: and only those: an app's own guard may have a check under the same name).
INTEGRATION_CHECK: Final = "_otel_raptor_integration_check"

#: Header added to a response served from the stale cache (value ``"1"``); ``Age`` is set too.
STALE_HEADER: Final = "X-Raptor-Stale"

#: Header of the ``429`` response raptor answers for a downstream still cooling down.
THROTTLED_HEADER: Final = "X-Raptor-Throttled"

#: Entries the stale-if-error cache of one integration keeps (least recently used evicted).
STALE_ENTRIES: Final = 256

#: Bodies larger than this (bytes) are not kept for stale-if-error.
STALE_BODY_LIMIT: Final = 1024 * 1024

#: Bytes (bodies and headers) the stale-if-error cache of one integration keeps at most.
STALE_TOTAL_BYTES: Final = 32 * 1024 * 1024

#: Response headers a stale copy does not keep (lower case): they describe the body as it
#: came over the wire, and the copy kept is the decoded body (a stale copy gets a fresh
#: ``Content-Length`` and no ``Content-Encoding``).
STALE_DROPPED_HEADERS: Final = frozenset(
    {"content-encoding", "content-length", "transfer-encoding"}
)

#: Request headers left out of a stale-if-error key (lower case); every other header enters
#: it. A header belongs here only when it can select neither what the server answers nor who
#: it answers for, since a header wrongly left out serves one caller's response to another,
#: while one wrongly kept in only costs a stale copy that is never found. So:
#:
#: - the connection and the message framing: ``connection``, ``keep-alive``, ``te``;
#:   ``content-length`` (the body itself enters the key);
#: - ``accept-encoding``: the copy kept is the decoded body, the same whatever coding the
#:   transfer used;
#: - ``user-agent``: it names the client software, the same for every caller of a process;
#: - ids drawn afresh for every request, which would make every key new: trace context
#:   (W3C, B3, Jaeger, OpenTracing, X-Ray, Google Cloud, Datadog's ids, Sentry) and request
#:   or correlation ids. A tracing header that may carry application data stays keyed:
#:   ``baggage`` (often a user or tenant id, which a server may act on) and Datadog's
#:   ``x-datadog-tags``.
#:
#: ``host`` stays keyed: unless the caller sets it, it follows from the URL (so it costs
#: nothing), and when the caller does set it, it picks the virtual host that answers.
STALE_UNKEYED_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "content-length",
        "accept-encoding",
        "user-agent",
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "uber-trace-id",
        "ot-tracer-traceid",
        "ot-tracer-spanid",
        "ot-tracer-sampled",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
        "x-datadog-trace-id",
        "x-datadog-parent-id",
        "x-datadog-sampling-priority",
        "x-datadog-origin",
        "sentry-trace",
        "x-request-id",
        "request-id",
        "x-correlation-id",
    }
)

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

#: The idempotent methods in upper and lower case, so the common case needs no ``upper()``.
IDEMPOTENT: Final = IDEMPOTENT_METHODS | frozenset(m.lower() for m in IDEMPOTENT_METHODS)


def suppression_keys() -> tuple[Callable[[], Context], str, str, str] | None:
    """How to tell, with one context read, that HTTP instrumentation is suppressed: a reader
    of the current context and the three keys ``is_http_instrumentation_enabled`` looks up in
    it (suppressed when any is set). The keys are private to
    ``opentelemetry.instrumentation.utils``: ``None`` when they are not all there (another
    version), and the public function must be used."""
    names = (
        "_SUPPRESS_INSTRUMENTATION_KEY",
        "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN",
        "_SUPPRESS_HTTP_INSTRUMENTATION_KEY",
    )
    first, second, third = (getattr(otel_utils, name, None) for name in names)
    if not (isinstance(first, str) and isinstance(second, str) and isinstance(third, str)):
        return None
    return _current_context_reader(), first, second, third


def _enabled_check() -> Callable[[], bool]:
    """``is_http_instrumentation_enabled``, at a third of its cost when we can.

    The public function reads the current context three times (about 400 ns); this reads it
    once and looks the same three keys up in it (:func:`suppression_keys`). A test checks
    both agree under every suppression.
    """
    found = suppression_keys()
    if found is None:
        return is_http_instrumentation_enabled
    current, first, second, third = found

    def enabled() -> bool:
        context = current()
        # An empty context (no span, no key set) suppresses nothing: one test.
        return not (context and (context.get(first) or context.get(second) or context.get(third)))

    return enabled


def _current_context_reader() -> Callable[[], Context]:
    """``opentelemetry.context.get_current``, or the context variable it reads when the
    default runtime context is in use (one C call instead of two Python frames)."""
    runtime_context = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime_context, "_current_context", None)
    get = getattr(variable, "get", None)
    if type(runtime_context).__name__ == "ContextVarsRuntimeContext" and callable(get):
        return get  # type: ignore[no-any-return]  # ContextVar[Context].get
    return get_current


#: Whether HTTP instrumentation is enabled in the current context: ``False`` inside
#: ``suppress_instrumentation()`` (the OTLP exporter's own requests) or
#: ``suppress_http_instrumentation()``.
http_enabled: Callable[[], bool] = _enabled_check()


def is_failing_status(status: object) -> bool:
    """Whether an HTTP status counts as a failure: ``429`` or ``500``-``599``."""
    return type(status) is int and (500 <= status <= 599 or status == 429)


#: The top-level modules of the HTTP mocking libraries whose answers never leave the process:
#: responses and requests-mock (requests), respx (httpx). Not pytest-httpx: its releases pin
#: httpx 0.28, so the test suite (on the newest httpx) could not prove it.
MOCKING_LIBRARIES: Final = frozenset({"responses", "requests_mock", "respx"})


def from_mocking_library(thing: object) -> bool:
    """Whether ``thing`` (a function, a class) is defined by one of
    :data:`MOCKING_LIBRARIES`: a library's replacement of the method that does the network
    I/O, or its own adapter. Anything else (an app's subclass that overrides the method, a
    caching transport) is not, whatever it calls."""
    module = getattr(thing, "__module__", None)
    return type(module) is str and module.partition(".")[0] in MOCKING_LIBRARIES


def raised_by_mock(failure: BaseException, real_io: tuple[str, ...]) -> bool:
    """Whether ``failure`` was raised inside a mocking library's replacement of the network
    I/O (its answer to an unregistered URL, an error registered as the answer) rather than by
    the real I/O it passes some requests through to: of the frames between the caller and the
    ``raise``, the innermost that belongs either to a mocking library or to a module of
    ``real_io`` (module-name prefixes: the library's real transport) is a mocking library's."""
    mocked = False
    frames = failure.__traceback__
    while frames is not None:
        name = frames.tb_frame.f_globals.get("__name__")
        if type(name) is str:
            if name.partition(".")[0] in MOCKING_LIBRARIES:
                mocked = True
            elif name.startswith(real_io):
                mocked = False
        frames = frames.tb_next
    return mocked


class FailingResponse(Exception):
    """A ``429``/``5xx`` response as a failed attempt, for the loop to classify and retry.

    The classifier reads ``response.status_code`` and ``response.headers`` (``Retry-After``).
    It never reaches the caller: giving up hands back ``response`` itself. Its message holds
    the status only (no URL), since telemetry may record it.
    """

    def __init__(self, response: Any) -> None:
        self.response = response
        super().__init__(f"HTTP {getattr(response, 'status_code', '?')} response")


#: ``is_failing_status`` as one set lookup, for the success path (with ``type(status) is
#: int`` after it: ``True == 1`` and ``503.0 == 503`` would match the set).
FAILING_STATUSES: Final = frozenset((429, *range(500, 600)))


def _failing(response: Any) -> FailingResponse | None:
    try:
        status = response.status_code
        # ``type`` last: ``True == 1`` and ``503.0 == 503`` would match the set.
        if status not in FAILING_STATUSES or type(status) is not int:
            return None
    except (AttributeError, TypeError):  # no status, or an unhashable one (a test double)
        return None
    return FailingResponse(response)


def resend_count() -> int:
    """The ordinal of the resend in flight in this context (1 = first retry), else 0."""
    return current_resend()


class ResendCountSpanProcessor(SpanProcessor):
    """Sets ``http.request.resend_count`` on CLIENT spans started during a resend.

    The contrib requests and httpx instrumentations (0.66b2) do not set the attribute
    themselves, and nothing outside them can reach their span once it is started; a span
    processor's ``on_start`` can. Add it to an SDK ``TracerProvider``
    (``provider.add_span_processor(ResendCountSpanProcessor())``); it costs one context
    variable read per span started.
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        # Runs inside every span start on the app's provider (the app's own spans too): the
        # SDK does not catch a processor's error, so ours would reach whoever started it.
        try:
            count = current_resend()
            if count and span.kind is SpanKind.CLIENT:
                span.set_attribute(RESEND_COUNT_ATTRIBUTE, count)
        except Exception as bug:  # noqa: BLE001 - a span attribute is not worth the call
            report_internal_error("http.resend_count", bug)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- outcomes -----------------------------------------------------------------------------------


def _close_quietly(response: Any) -> None:
    # A failed response we are discarding anyway: its close may fail with the connection.
    with contextlib.suppress(Exception):
        response.close()


async def _aclose_quietly(response: Any) -> None:
    with contextlib.suppress(Exception):
        await response.aclose()


class HttpHooks(CallHooks):
    """The outcome of an HTTP attempt: ``429``/``5xx`` responses are failures, giving up on one
    hands the response back, and it is closed before the next attempt. ``timeout_kwarg``
    names the keyword that takes an attempt's timeout (requests: ``timeout``), if any."""

    __slots__ = ("elsewhere", "timeout_kwarg", "unguarded", "unjudged")

    failure_of = staticmethod(_failing)
    resends_requests = True
    sleeps_on_event_loop = False

    def __init__(
        self,
        timeout_kwarg: str | None = None,
        elsewhere: Callable[[BaseException, tuple[Any, ...]], bool] | None = None,
        in_process: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None,
        failed_in_process: Callable[[Exception, tuple[Any, ...]], bool] | None = None,
    ) -> None:
        self.timeout_kwarg = timeout_kwarg
        #: Whether a failure came from a redirect hop to another downstream (see CallHooks).
        self.elsewhere = elsewhere
        #: ``in_process(args, kwargs)``: whether the call never leaves the process (an app
        #: served in-process by a test client's transport, a mocking library's answer).
        #: Such a call has no downstream to judge: its failure ends it at once, unretried
        #: and uncounted, and a breaker that is not closed lets it through (see CallHooks
        #: ``unjudged`` and ``unguarded``).
        #: ``failed_in_process(failure, args)`` says the same of one failure (also one at a
        #: redirect hop to an app served in the process, which a replay would run again).
        self.unguarded = in_process
        self.unjudged = failed_in_process

    @property
    def applies_timeouts(self) -> bool:  # type: ignore[override]  # per instance
        return self.timeout_kwarg is not None

    def give_up(self, failure: BaseException) -> Any:
        if isinstance(failure, FailingResponse):
            return failure.response
        raise failure

    def attempt_kwargs(
        self, kwargs: dict[str, Any], timeout: float | None, attempt: int
    ) -> dict[str, Any]:
        key = self.timeout_kwarg
        if key is None or timeout is None or (attempt == 1 and kwargs.get(key) is not None):
            return kwargs
        return {**kwargs, key: timeout}

    def discard(self, failure: BaseException) -> Awaitable[None] | None:
        if isinstance(failure, FailingResponse):
            _close_quietly(failure.response)
        return None


class AsyncHttpHooks(HttpHooks):
    """:class:`HttpHooks` for async clients: a failed response is closed with ``aclose()``."""

    __slots__ = ()

    def discard(self, failure: BaseException) -> Awaitable[None] | None:
        if isinstance(failure, FailingResponse):
            return _aclose_quietly(failure.response)
        return None


def throttled_headers(retry_after: float | None) -> list[tuple[str, str]]:
    """The headers of raptor's own ``429``: ``Retry-After`` (whole seconds, rounded up) and
    ``X-Raptor-Throttled: 1``."""
    seconds = 1 if retry_after is None or not math.isfinite(retry_after) else retry_after
    return [("Retry-After", str(max(0, math.ceil(seconds)))), (THROTTLED_HEADER, "1")]


# --- URLs ---------------------------------------------------------------------------------------


def origin_end(url: str) -> int:
    """The index just past the authority of an absolute URL (``scheme://authority``), or -1.

    Four ``str.find`` calls, no regex: it runs on every request.
    """
    start = url.find("://")
    if start <= 0:
        return -1
    start += 3
    end = url.find("/", start)
    if end < 0:
        end = len(url)
    found = url.find("?", start, end)
    if found >= 0:
        end = found
    found = url.find("#", start, end)
    return end if found < 0 else found


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of ``scheme://[userinfo@]host[:port]``, normalised.

    Scheme and host are lower-cased, an IPv6 host loses its brackets, a missing port becomes
    the scheme's default. ``None`` for anything but ``http``/``https`` or a malformed
    authority (the library then reports the problem itself, untouched by us).
    """
    scheme, separator, authority = origin.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _DEFAULT_PORTS:
        return None
    authority = authority.rpartition("@")[2]  # credentials never reach a name
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return None
        host, rest = authority[1:close], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
    host = canonical_host(host)
    if not host:
        return None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()):
            return None
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    else:
        port = _DEFAULT_PORTS[scheme]
    return scheme, host, port


def downstream_of(url: str, *, by_host: bool, host_header: object = None) -> Hashable | None:
    """What names the breaker of a request to an absolute URL: ``(scheme, host, port)``, or
    the host alone with ``breaker_key = "host"``; ``None`` when it is not an HTTP(S) URL.
    A ``host_header`` (the request's ``Host`` value, if it has one) that names a host
    (:func:`virtual_host`) puts that host in the URL's."""
    end = origin_end(url)
    parsed = parse_origin(url[:end]) if end > 0 else None
    if parsed is None:
        return None
    scheme, host, port = parsed
    if host_header is not None:
        host = virtual_host(host_header) or host
    return host if by_host else (scheme, host, port)


#: The longest ``Host`` value that may name a virtual host: a DNS name (253) and a port.
MAX_HOST_HEADER: Final = 253 + 6

_HOST_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
_HOST_IPV6: Final = re.compile(r"[0-9A-Fa-f:.]+")


def virtual_host(value: object) -> str | None:
    """The host a ``Host`` header's value names (its port left out), spelled as
    :func:`canonical_host` spells it; ``None`` when it names none: not text, empty, longer
    than :data:`MAX_HOST_HEADER`, or not a DNS name or bracketed IP address (such a value
    never becomes a service name: the request is judged on its URL)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    elif not isinstance(value, str):
        return None
    if len(value) > MAX_HOST_HEADER:  # before strip(): a value kept as a key stays short
        return None
    value = value.strip()
    if value.startswith("["):
        host, close, rest = value[1:].partition("]")
        if not close or (rest and not rest.startswith(":")) or not _HOST_IPV6.fullmatch(host):
            return None
    else:
        host = value.partition(":")[0]
        if not _HOST_NAME.fullmatch(host):
            return None
    return canonical_host(host)


def canonical_host(host: str) -> str:
    """One spelling per host, so that every way to write it names one downstream: lower
    case, an internationalised name in Unicode (httpx's ``URL.host``; requests hands on the
    ``xn--`` form a caller wrote), an IPv6 address compressed (``0:0::1`` is ``::1``).
    A host that does not decode stays as written (lower-cased)."""
    host = host.lower()
    if "xn--" in host:
        with contextlib.suppress(UnicodeError):
            host = host.encode("ascii").decode("idna").lower()
    elif ":" in host:
        with contextlib.suppress(ValueError):
            host = ipaddress.IPv6Address(host).compressed
    return host


def replay_safe(
    origin: Origin,
    method: str,
    body_replayable: bool,
    headers: Any,
    more_headers: Any = None,
) -> bool:
    """Whether a request may be sent again (RFC 9110 §9.2.2, see
    :func:`otel_raptor.core.replay.http_replay_safe`): a replayable body and an idempotent
    method, a non-empty ``Idempotency-Key`` in ``headers`` or else ``more_headers`` (mappings
    or ``None``; the session's headers, say), or the origin's ``retry_non_idempotent``. An
    entry in ``headers`` decides even when it is ``None`` or empty: requests then sends the
    request without the session's key."""
    if not body_replayable:
        return False
    if method in IDEMPOTENT or origin.retry_non_idempotent:
        return True
    for source in (headers, more_headers):
        if source is not None and names_idempotency_key(source):
            return http_replay_safe(method, source, body_replayable=True)
    return False


def _origin_url(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def http_health_check(url: str, *, timeout: float, host: str | None = None) -> Callable[[], bool]:
    """An active health check that GETs ``url`` (with ``urllib``, which raptor does not
    guard, so the check never meets the open breaker it is checking), with ``Host: host``
    when given (a virtual host at ``url``'s address): healthy when the answer comes within
    ``timeout`` seconds with a status below 400."""
    headers = {"User-Agent": "otel-raptor-health-check"}
    if host is not None:
        headers["Host"] = host

    def check() -> bool:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status) < 400
        except urllib.error.HTTPError as error:
            error.close()  # it holds the answer's socket: closed now, not when collected
            return error.code < 400
        except (OSError, ValueError):
            return False

    setattr(check, INTEGRATION_CHECK, True)  # uninstrument() removes what integrations made
    return check


def _server(host: str, port: int) -> dict[str, str | int]:
    return {ATTR_SERVER_ADDRESS: host, ATTR_SERVER_PORT: port}


def _service_name(scheme: str, host: str, port: int, breaker_key: str) -> str:
    if breaker_key == "host":
        return host
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


# --- origins ------------------------------------------------------------------------------------


class Origin:
    """One origin: its policy and its kit target (``None`` for an origin left alone).

    ``fixed_fallbacks`` says whether every failure can be handed to a fallback (failover URLs
    or a fallback function); stale-if-error alone needs a cached response, which the wrapper
    checks per request.
    """

    __slots__ = (
        "address",
        "breaker_name",
        "enabled",
        "failover_urls",
        "fast",
        "fixed_fallbacks",
        "plain",
        "policy",
        "retry_non_idempotent",
        "safe",
        "service",
        "stale_if_error",
        "stale_max_age",
        "target",
        "timed",
        "timeout",
        "unsafe",
    )

    def __init__(
        self,
        name: str,
        policy: DownstreamPolicy,
        runtime: Runtime,
        hooks: CallHooks,
        attributes: Mapping[str, str | int] | None = None,
        url: str | None = None,
        address: tuple[str, str, int] | None = None,
        host_header: str | None = None,
    ) -> None:
        #: ``(scheme, host, port)`` (normalised) of the URLs that reach it; the host is the
        #: virtual host's for an origin that a ``Host`` header named (see OriginTable).
        self.address = address
        self.policy = policy
        self.enabled = policy.enabled
        self.timeout = policy.timeout
        self.timed = policy.retry.attempt_timeout is not None or policy.retry.deadline is not None
        self.retry_non_idempotent = policy.retry_non_idempotent
        self.failover_urls = policy.failover_urls
        self.stale_if_error = policy.stale_if_error
        self.stale_max_age = policy.stale_max_age
        self.fixed_fallbacks = bool(policy.failover_urls) or policy.fallback is not None
        #: No fallback of any kind: a request needs nothing but its plan.
        self.plain = not (self.fixed_fallbacks or self.stale_if_error)
        self.target = Target(name, policy, runtime, hooks, attributes) if self.enabled else None
        self.service = self.target.service if self.target is not None else name
        self.breaker_name = self.target.breaker_name if self.target is not None else ""
        # The two plans of requests without fallbacks, read on every request (an enabled
        # origin only; reading them on a disabled one raises AttributeError).
        self.safe: CallPlan
        self.unsafe: CallPlan
        if self.target is not None:
            self.safe = self.target.plan(replay_safe=True)
            self.unsafe = self.target.plan(replay_safe=False)
        #: The plan of a replay-safe request that an integration's copy of the loop's fast
        #: path may run (httpx's ``Client.send``): an enabled origin without fallbacks, whose
        #: first attempt needs no keyword of ours and whose results fail by their status
        #: alone (:data:`FAILING_STATUSES`). ``None``: every request takes the loop's entry.
        self.fast: CallPlan | None = None
        if (
            self.target is not None
            and self.plain
            and not self.safe.first_kwargs
            and self.safe.failure_of is _failing
        ):
            self.fast = self.safe
        if self.target is not None and policy.health_check_path and url is not None:
            breaker = self.target.route.breaker
            if breaker is not None:
                runtime.health.register(
                    breaker,
                    http_health_check(
                        url + policy.health_check_path,
                        timeout=min(5.0, policy.breaker.health_check_interval),
                        host=host_header,
                    ),
                )

    def plan(self, *, replay_safe: bool, with_fallback: bool) -> CallPlan:
        """The plan for one request (only for an enabled origin)."""
        assert self.target is not None
        return self.target.plan(replay_safe=replay_safe, with_fallback=with_fallback)


#: :attr:`OriginTable.recent` before any hit: it matches no URL (no prefix is ``None``).
NO_RECENT: Final[tuple[Any, ...]] = (None, None, None)


class OriginTable:
    """Origins by URL prefix or URL parts, for one installed integration (bounded by
    :data:`~otel_raptor.integrations._kit.MAX_TARGETS` each; lock-free reads). Two threads
    meeting a new origin at once may both build it; both share the breaker and the
    downstream (by service name), so either is fine.

    ``recent`` is requests' fast lane's own: its last hit in ``_by_prefix``, with the key
    it was found by and the ``/`` that ends it in a URL with a path, as one tuple
    ``(prefix + "/", len(prefix) + 1, origin)`` (written and read whole, so threads never
    see a key with another key's origin); :data:`NO_RECENT` until then. Comparing the next
    URL's start with it costs less than finding the prefix's end (``str.find``) and hashing
    the new prefix string to look it up; a miss (a URL that ends after its authority, too)
    looks it up as before. One entry: bounded.

    *Virtual hosts*: a request whose ``Host`` header names another host than its URL's
    (:meth:`for_host`) is that host's: the origin ``(scheme, virtual host, URL's port)``,
    as if its URL named the virtual host (DNS pointing at the address it was sent to).
    Those are found by ``(URL's origin, Host value)`` in a table of their own (bounded
    like the others), so that a flood of ``Host`` values never evicts the URL prefixes.
    """

    __slots__ = (
        "_by_host",
        "_by_origin",
        "_by_prefix",
        "_config",
        "_hooks",
        "_runtime",
        "recent",
    )

    def __init__(self, runtime: Runtime, config: RaptorConfig, hooks: CallHooks) -> None:
        self._runtime = runtime
        self._config = config
        self._hooks = hooks
        self._by_prefix: dict[Hashable, Origin | None] = {}
        self._by_origin: dict[tuple[str, str, int], Origin] = {}
        self._by_host: dict[tuple[tuple[str, str, int] | None, object], Origin] = {}
        self.recent: tuple[Any, ...] = NO_RECENT

    def for_prefix(self, prefix: str) -> Origin | None:
        """The origin of a URL prefix ``scheme://authority`` (as written by the caller), or
        ``None`` when it is not an HTTP(S) origin we handle."""
        if "@" in prefix:  # never keep a user:pass@ as a key
            scheme, _, authority = prefix.partition("://")
            prefix = f"{scheme}://{authority.rpartition('@')[2]}"
        try:
            return self._by_prefix[prefix]
        except KeyError:
            pass
        parsed = parse_origin(prefix)
        origin = None if parsed is None else self.for_origin(*parsed)
        self._remember(prefix, origin)
        return origin

    def for_url(self, url: str) -> Origin | None:
        """The origin of an absolute URL, as :meth:`for_prefix` of its ``scheme://authority``.

        The common case costs one ``str.find`` and one dictionary lookup instead of
        :func:`origin_end`'s four finds: the text before the first ``/`` past the scheme's
        ``//`` is looked up as written. A hit is exact: every string key is a prefix that
        :meth:`for_prefix` remembered (``scheme://authority``, with no ``/``, ``?``, ``#``
        nor userinfo in the authority), and a URL that starts with one and goes on with
        ``/`` or ends has that very prefix. Anything else (a query or fragment right after
        the authority, userinfo, an origin not seen yet) takes the careful path.
        """
        end = url.find("/", 8)  # past "https://": the scheme's own slashes come before
        try:
            return self._by_prefix[url if end < 0 else url[:end]]
        except KeyError:
            pass
        end = origin_end(url)
        return self.for_prefix(url[:end]) if end > 0 else None

    def for_parts(self, scheme: str, host: str, port: int | None) -> Origin | None:
        """The origin of an already split URL (httpx's ``URL.scheme``, ``.host``, ``.port``;
        ``port`` ``None`` for the scheme's default), or ``None`` when it is not HTTP(S)."""
        key = (scheme, host, port)
        try:
            return self._by_prefix[key]
        except KeyError:
            pass
        lowered = scheme.lower()
        default = _DEFAULT_PORTS.get(lowered)
        origin = None
        if default is not None and host:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            host = canonical_host(host)
            origin = self.for_origin(lowered, host, default if port is None else port)
        self._remember(key, origin)
        return origin

    def for_host(self, origin: Origin, host_header: object) -> Origin:
        """The origin of a request to ``origin``'s URL whose ``Host`` header is
        ``host_header`` (``str`` or ``bytes``, as the library holds it): ``origin`` itself
        when the header names its host (whatever port it names) or names no host
        (:func:`virtual_host`), else the virtual host's. Its policy is the virtual host's
        (``policy_for`` with its name and the URL's port), its active health check goes to
        ``origin``'s address with that ``Host``."""
        address = origin.address
        key = (address, host_header)
        try:
            return self._by_host[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value, looked at below
            pass
        host = virtual_host(host_header)
        found = origin
        if host is not None and address is not None and host != address[1]:
            scheme, connected, port = address
            found = self.for_origin(
                scheme, host, port, via=_origin_url(scheme, connected, port), host_header=host
            )
        if host is not None:  # only a bounded value is kept (MAX_HOST_HEADER)
            if len(self._by_host) >= MAX_TARGETS:
                self._by_host.clear()
            self._by_host[key] = found
        return found

    def for_origin(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        via: str | None = None,
        host_header: str | None = None,
    ) -> Origin:
        """The origin of a normalised ``(scheme, host, port)`` (see :func:`parse_origin`);
        ``via`` and ``host_header`` are where its health check goes when it is a virtual host
        first met at another address (see :meth:`for_host`)."""
        key = (scheme, host, port)
        origin = self._by_origin.get(key)
        if origin is None:
            config = self._config
            explicit = None if _DEFAULT_PORTS.get(scheme) == port else port
            by_host = config.breaker_key == "host"
            origin = Origin(
                _service_name(scheme, host, port, config.breaker_key),
                config.policy_for(host, explicit, scheme),
                self._runtime,
                self._hooks,
                {ATTR_SERVER_ADDRESS: host} if by_host else _server(host, port),
                via or _origin_url(scheme, host, port),
                key,
                host_header,
            )
            if len(self._by_origin) >= MAX_TARGETS:
                self._by_origin.clear()
            self._by_origin[key] = origin
        return origin

    def _remember(self, key: Hashable, origin: Origin | None) -> None:
        if len(self._by_prefix) >= MAX_TARGETS:
            self._by_prefix.clear()
        self._by_prefix[key] = origin


# --- stale-if-error -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaleEntry:
    """A good response kept for stale-if-error. ``stored_at`` is the runtime's monotonic
    clock (seconds); ``headers`` are the response's, in order."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    encoding: str | None
    url: str
    stored_at: float

    @property
    def size(self) -> int:
        """Bytes it holds, roughly (body, headers and URL)."""
        return (
            len(self.body)
            + sum(len(name) + len(value) for name, value in self.headers)
            + len(self.url)
        )


class StaleCache:
    """The last good response per request key, least recently used evicted.

    Bounded by count (``max_entries``, default :data:`STALE_ENTRIES`) and by bytes
    (``max_bytes``, default :data:`STALE_TOTAL_BYTES`); bodies over ``max_body`` bytes
    (default :data:`STALE_BODY_LIMIT`) are not kept. Keys are private digests of the request
    as sent (its URL, body, headers but :data:`STALE_UNKEYED_HEADERS`, and credentials; see
    :mod:`otel_raptor.runtime.keys`), so one user's response is never served to another and
    no credential is kept raw. The memory controller
    can evict it (:meth:`evict`, registered by the integrations). Thread-safe and fork-safe
    (a forked child starts empty: its key secret is new).
    """

    __slots__ = (
        "__weakref__",
        "_bytes",
        "_entries",
        "_lock",
        "max_body",
        "max_bytes",
        "max_entries",
    )

    def __init__(
        self,
        max_entries: int = STALE_ENTRIES,
        max_body: int = STALE_BODY_LIMIT,
        max_bytes: int = STALE_TOTAL_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_body = max_body
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, StaleEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        after_fork_in_child(self, StaleCache._forget)

    def put(self, key: Hashable, entry: StaleEntry) -> None:
        if len(entry.body) > self.max_body:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = entry
            self._bytes += entry.size
            while self._entries and (
                len(self._entries) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size

    def get(self, key: Hashable, *, now: float, max_age: float) -> StaleEntry | None:
        """The entry for ``key`` if it is at most ``max_age`` seconds old at ``now``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now - entry.stored_at > max_age:
                del self._entries[key]
                self._bytes -= entry.size
                return None
            self._entries.move_to_end(key)
            return entry

    def evict(self, now: float, max_age: float) -> int:
        """Drop entries older than ``max_age`` seconds at ``now``; how many were dropped."""
        with self._lock:
            stale = [k for k, e in self._entries.items() if now - e.stored_at > max_age]
            for key in stale:
                self._bytes -= self._entries.pop(key).size
            return len(stale)

    def clear(self) -> int:
        """Drop everything; how many entries there were."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            self._bytes = 0
            return count

    @property
    def bytes(self) -> int:
        """Bytes held (see :attr:`StaleEntry.size`)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self) -> None:
        self._entries = OrderedDict()
        self._bytes = 0


class HttpInstallation:
    """What every HTTP integration's installation holds besides its origins: the stale-if-error
    cache (managed by the memory controller) and the runtime's clock. Subclasses say how a
    library's response becomes a :class:`StaleEntry` (:meth:`stale_entry`)."""

    __slots__ = ("monotonic", "stale", "unmanage")

    #: The ``report_internal_error`` key of a failed stale store.
    name: ClassVar[str] = "http"

    def __init__(self, settings: IntegrationSettings) -> None:
        self.stale = StaleCache()
        self.monotonic = settings.runtime.clock.monotonic
        self.unmanage = manage_cache(settings, f"otel_raptor.{self.name}.stale", self.stale)

    def stale_entry(self, response: Any, status: int, now: float) -> StaleEntry:
        raise NotImplementedError

    def has_stale_copy(self, key: Hashable | None, max_age: float) -> bool:
        """Whether a stale copy is kept under ``key``. Our code: never raises. A bug here
        only costs the call its stale fallback; raising would leave the whole call
        unguarded, its successes uncounted while other calls' failures still count."""
        if key is None:
            return False
        try:
            return self.stale.get(key, now=self.monotonic(), max_age=max_age) is not None
        except Exception as bug:  # noqa: BLE001 - the call goes on without a stale copy
            report_internal_error(f"{self.name}.stale_lookup", bug)
            return False

    def kept(self, key: Hashable | None, response: Any, fallback: FallbackCall | None) -> Any:
        """``response``, after keeping it under ``key`` when it may be served stale. Nothing
        a fallback answered is kept: a stale copy kept again would start its age afresh (an
        outage with steady traffic would serve it for ever), and a failover's or a fallback
        function's answer is not the origin's."""
        if key is not None and (fallback is None or not fallback.answered):
            self.remember(key, response)
        return response

    def remember(self, key: Hashable, response: Any) -> None:
        """Keep a good (2xx) response for stale-if-error. Our code: never raises."""
        try:
            status = response.status_code
            if type(status) is int and 200 <= status < 300:
                self.stale.put(key, self.stale_entry(response, status, self.monotonic()))
        except Exception as bug:  # noqa: BLE001 - the response is the caller's either way
            report_internal_error(f"{self.name}.stale_store", bug)


def stale_key_headers(headers: Iterable[tuple[Any, Any]]) -> tuple[tuple[str, Any], ...]:
    """The part of a request's ``(name, value)`` headers that enters its stale-if-error key:
    all but :data:`STALE_UNKEYED_HEADERS`, names in lower case, in name order (the values of
    a repeated header keep theirs)."""
    kept = []
    for name, value in headers:
        lowered = (name.decode("latin-1") if isinstance(name, bytes) else str(name)).lower()
        if lowered not in STALE_UNKEYED_HEADERS:
            kept.append((lowered, value))
    kept.sort(key=_first)
    return tuple(kept)


def _first(pair: tuple[str, Any]) -> str:
    return pair[0]


def stale_headers(entry: StaleEntry, now: float) -> list[tuple[str, str]]:
    """The entry's headers marked stale: ``X-Raptor-Stale: 1`` and ``Age`` (RFC 9111 §5.1,
    whole seconds, added to any ``Age`` the response already had)."""
    age = max(0, int(now - entry.stored_at))
    headers: list[tuple[str, str]] = []
    for name, value in entry.headers:
        lowered = name.lower()
        if lowered == "age":
            if value.strip().isdigit():
                age += int(value.strip())
            continue
        if lowered == STALE_HEADER.lower():
            continue
        headers.append((name, value))
    headers.append(("Age", str(age)))
    headers.append((STALE_HEADER, "1"))
    return headers


# --- fallbacks ----------------------------------------------------------------------------------

_NOTHING: Final = object()

#: The exact types of raptor's plain refusals: a failover request that raised one was refused
#: by its origin's own breaker or cooldown, so that origin never saw it.
_REFUSALS: Final = (CircuitOpenError, ThrottledError)

_logger = logging.getLogger("otel_raptor")


class FallbackCall:
    """One request's fallbacks, in order: failover base URLs, the stale response, the
    origin's fallback function. Subclassed per library (the ``failover``, ``stale_response``
    and ``refusal`` hooks); the loop calls :meth:`__call__` with the last error
    (or the plain refusal) when it gives up or is refused.

    ``call`` is the integration's description of the request (it has ``origin`` and
    ``stale_key``; ``None`` when the request may not be served stale), ``wrapped`` the
    library's own send, ``installation`` the integration's state. ``replay_safe`` says whether
    the primary request may be sent again: failover after the primary gave up needs it;
    after a refusal the primary was never sent, so failover is allowed. A request that is not
    replay safe then goes on to the next failover URL only when the previous one refused it
    unsent (its own breaker or cooldown): one that may have reached a failover origin is never
    sent anywhere else.
    """

    __slots__ = (
        "answered",
        "cache",
        "call",
        "installed",
        "now",
        "origin",
        "replay_safe",
        "stale_key",
        "wrapped",
    )

    #: Async subclasses set it: :meth:`__call__` then returns a coroutine.
    is_async: ClassVar[bool] = False

    def __init__(
        self,
        installation: Any,
        call: Any,
        wrapped: Callable[..., Any],
        *,
        safe: bool,
    ) -> None:
        self.installed = installation
        self.call = call
        self.wrapped = wrapped
        self.origin: Origin = call.origin
        self.replay_safe = safe
        self.stale_key: Hashable | None = call.stale_key
        self.cache: StaleCache = installation.stale
        self.now: Callable[[], float] = installation.monotonic
        #: Whether the chain gave the caller an answer of its own (see HttpInstallation.kept).
        self.answered = False

    # -- library hooks ------------------------------------------------------------------------

    def failover(self, base_url: str) -> Any:
        """Send the request again with its origin replaced by ``base_url``, under that origin's
        own plan (without its fallbacks); the response, or raises. A refusal by that origin's
        breaker or cooldown must be raised as raptor's plain
        :class:`~otel_raptor.errors.CircuitOpenError` or
        :class:`~otel_raptor.errors.ThrottledError` (not the library's answer to it): it is
        how the chain knows the request was not sent."""
        raise NotImplementedError

    async def failover_async(self, base_url: str) -> Any:
        raise NotImplementedError

    def stale_response(self, entry: StaleEntry) -> Any:
        """A response object of the library rebuilt from ``entry``, marked stale."""
        raise NotImplementedError

    def refusal(self, error: RaptorError) -> Any:
        """The library's answer to a plain refusal: its fail-fast error to raise (a breaker),
        or a ``429`` response (a cooldown)."""
        raise NotImplementedError

    # -- the chain -------------------------------------------------------------------------------

    def __call__(self, error: BaseException) -> Any:
        return self.run_async(error) if self.is_async else self.run(error)

    def run(self, error: BaseException) -> Any:
        error, primary, rejected = self._start(error)
        result: Any = _NOTHING
        reached: Any = _NOTHING
        try:
            if self._may_fail_over(rejected):
                for base_url in self.origin.failover_urls:
                    try:
                        response = self.failover(base_url)
                    except Exception as failure:  # noqa: BLE001 - the next fallback's turn
                        if self._goes_on(failure):
                            continue
                        reached = failure
                        break
                    if not is_failing_status(getattr(response, "status_code", None)):
                        result = response
                        break
                    if not self._goes_on(None):
                        reached = response
                        break
                    _close_quietly(response)
        except BaseException:
            # Interrupted mid-failover: nobody else will release the primary's connection.
            if primary is not _NOTHING:
                _close_quietly(primary)
            raise
        answer: Exception | None = None
        if reached is not _NOTHING:
            answer, primary = self._reached(reached)
            error = answer
        try:
            result = self._choose(error, primary, result)
        except FallbackDeclined:
            if answer is not None:
                # Nothing after the failover had an answer: that URL's is the caller's.
                raise FallbackDeclined(answer) from None
            raise  # the caller gets the primary outcome, the primary response open
        except BaseException:
            # The fallback function failed: its error is the caller's, and nobody else will
            # release the primary response's connection.
            if primary is not _NOTHING:
                _close_quietly(primary)
            raise
        if primary is not _NOTHING and result is not primary:
            _close_quietly(primary)
        self.answered = True
        return result

    async def run_async(self, error: BaseException) -> Any:
        """:meth:`run` for async clients; an awaitable from the fallback function is
        awaited."""
        error, primary, rejected = self._start(error)
        result: Any = _NOTHING
        reached: Any = _NOTHING
        try:
            if self._may_fail_over(rejected):
                for base_url in self.origin.failover_urls:
                    try:
                        response = await self.failover_async(base_url)
                    except Exception as failure:  # noqa: BLE001 - the next fallback's turn
                        if self._goes_on(failure):
                            continue
                        reached = failure
                        break
                    if not is_failing_status(getattr(response, "status_code", None)):
                        result = response
                        break
                    if not self._goes_on(None):
                        reached = response
                        break
                    await _aclose_quietly(response)
        except BaseException:
            # Cancelled mid-failover: nobody else will release the primary's connection.
            if primary is not _NOTHING:
                await _aclose_quietly(primary)
            raise
        answer: Exception | None = None
        if reached is not _NOTHING:
            answer, primary = self._reached(reached)
            error = answer
        try:
            result = self._choose(error, primary, result)
            if hasattr(result, "__await__"):
                result = await result
        except FallbackDeclined:
            if answer is not None:
                # Nothing after the failover had an answer: that URL's is the caller's.
                raise FallbackDeclined(answer) from None
            raise
        except BaseException:
            if primary is not _NOTHING:
                await _aclose_quietly(primary)
            raise
        if primary is not _NOTHING and result is not primary:
            await _aclose_quietly(primary)
        self.answered = True
        return result

    def _may_fail_over(self, rejected: bool) -> bool:
        return bool(self.origin.failover_urls) and (self.replay_safe or rejected)

    @staticmethod
    def _reached(outcome: Any) -> tuple[Exception, Any]:
        """A request that is not replay safe stopped at a failover URL that may have received
        it (``outcome``: its error, or its failing response): from then on that URL's answer
        is the one the chain hands on, as its error and its primary response, since the
        primary's refusal ("never sent") would no longer be true."""
        if isinstance(outcome, Exception):
            return outcome, _NOTHING
        return FailingResponse(outcome), outcome

    def _goes_on(self, failure: BaseException | None) -> bool:
        """Whether the next failover URL may be tried after one that failed with ``failure``
        (``None``: it answered with a failing response). A request that is not replay safe
        may have been received by that one, so it goes nowhere else unless that origin
        refused it without sending it."""
        return self.replay_safe or type(failure) in _REFUSALS

    def _start(self, error: BaseException) -> tuple[BaseException, Any, bool]:
        """The error as the library shows it, the primary response (or nothing), and
        whether the primary was refused without being sent."""
        rejected = type(error) in _REFUSALS
        if rejected:
            try:
                answer = self.refusal(error)  # type: ignore[arg-type]  # checked above
            except Exception as bug:  # noqa: BLE001 - keep the plain refusal
                report_internal_error("http.refusal", bug)
            else:
                error = answer if isinstance(answer, BaseException) else FailingResponse(answer)
        primary = error.response if isinstance(error, FailingResponse) else _NOTHING
        return error, primary, rejected

    def _stale(self) -> Any:
        key = self.stale_key
        if key is None or not self.origin.stale_if_error:
            return _NOTHING
        try:
            entry = self.cache.get(key, now=self.now(), max_age=self.origin.stale_max_age)
            return _NOTHING if entry is None else self.stale_response(entry)
        except Exception as bug:  # noqa: BLE001 - our bug: skip this fallback
            report_internal_error("http.stale_response", bug)
            return _NOTHING

    def _choose(self, error: BaseException, primary: Any, result: Any) -> Any:
        if result is _NOTHING:
            result = self._stale()
        if result is not _NOTHING:
            return result
        function = self.origin.policy.fallback
        if function is None:
            # Nothing to offer: the caller gets what it would have got without fallbacks, and
            # the call is reported as it ended (not as a fallback).
            raise FallbackDeclined
        if self.is_async:
            return function(error if primary is _NOTHING else primary)
        # One downstream's fallback serves sync and async clients alike, so an async one is
        # no mistake in the configuration; a sync call just cannot await it, and ends as it
        # would without it.
        if is_async_callable(function):
            warn_async_fallback(function, self.origin.service)
            raise FallbackDeclined
        value = function(error if primary is _NOTHING else primary)
        if inspect.iscoroutine(value):  # async, though it did not look it (a wrapper)
            value.close()
            warn_async_fallback(function, self.origin.service)
            raise FallbackDeclined
        return value
