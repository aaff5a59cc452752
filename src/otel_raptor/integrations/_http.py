"""What the requests and httpx integrations share: downstreams, attempts, fallbacks, stale cache.

One *downstream* is one origin, ``scheme://host:port``. The first request to it resolves its
:class:`~otel_raptor.config.DownstreamPolicy` (``RaptorConfig.policy_for``) and builds its
guards: one for requests that may be replayed, one for those that may not, sharing one circuit
breaker through the service name (``scheme://host:port``, or the host alone with
``breaker_key = "host"``; folded to ``other`` past the runtime's service cap). Later requests
find it with one slice of the URL and one dict lookup.

An *attempt* sends the request once. A ``429`` or ``5xx`` response is raised inside it as
:class:`FailingResponse`, so that the guard classifies it (status, ``Retry-After``), counts it
against the breaker and retries it like an exception; before the next attempt the failed
response is closed so its connection goes back to the pool. When the guard gives up, the
integration catches the ``FailingResponse`` and hands the caller the response itself.

*Fallbacks* (failover base URLs, stale-if-error, a fallback function) run through the guard's
``fallback`` argument, so the guard publishes ``RecoveryFinished(strategy=failover,
outcome=fallback)`` for them. The guard's fallback is fixed per guard while what to do
depends on the request: the wrapper puts the request's :class:`FallbackCall` in a context
variable for the guard's fallback to read.

Resends are counted in a context variable while each is in flight (:func:`resend_count`);
:class:`ResendCountSpanProcessor` copies it onto the HTTP client spans that the contrib
instrumentations start inside a resend, as ``http.request.resend_count``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from opentelemetry.context import Context, get_current
from opentelemetry.instrumentation import utils as otel_utils
from opentelemetry.instrumentation.utils import is_http_instrumentation_enabled
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from otel_raptor.config import DownstreamPolicy, RaptorConfig
from otel_raptor.core.replay import IDEMPOTENT_METHODS, http_replay_safe
from otel_raptor.errors import CircuitOpenError
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.runtime.state import Runtime

__all__ = [
    "IDEMPOTENT",
    "MAX_DOWNSTREAMS",
    "RESEND_COUNT_ATTRIBUTE",
    "STALE_BODY_LIMIT",
    "STALE_ENTRIES",
    "STALE_HEADER",
    "AsyncAttempt",
    "Downstream",
    "DownstreamTable",
    "FailingResponse",
    "FallbackCall",
    "ResendCountSpanProcessor",
    "StaleCache",
    "StaleEntry",
    "SyncAttempt",
    "guard_fallback",
    "http_enabled",
    "is_failing_status",
    "enter_fallback",
    "exit_fallback",
    "origin_end",
    "parse_origin",
    "replay_safe",
    "resend_count",
    "stale_headers",
]

#: The semantic-convention attribute for the ordinal of a resent request.
RESEND_COUNT_ATTRIBUTE: Final = "http.request.resend_count"

#: Header added to a response served from the stale cache (value ``"1"``); ``Age`` is set too.
STALE_HEADER: Final = "X-Raptor-Stale"

#: Entries the stale-if-error cache of one integration keeps (least recently used evicted).
STALE_ENTRIES: Final = 256

#: Bodies larger than this (bytes) are not kept for stale-if-error.
STALE_BODY_LIMIT: Final = 1024 * 1024

#: Origins remembered per integration; past it the table starts over (guards are cheap to
#: rebuild and breakers live in the runtime's registry, so nothing is lost but a lookup).
MAX_DOWNSTREAMS: Final = 1024

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

#: The idempotent methods in upper and lower case, so the common case needs no ``upper()``.
IDEMPOTENT: Final = IDEMPOTENT_METHODS | frozenset(m.lower() for m in IDEMPOTENT_METHODS)
_IDEMPOTENT: Final = IDEMPOTENT

_RESEND: ContextVar[int] = ContextVar("otel_raptor_http_resend", default=0)
_FALLBACK_CALL: ContextVar[FallbackCall | None] = ContextVar(
    "otel_raptor_http_fallback", default=None
)


def _enabled_check() -> Callable[[], bool]:
    """``is_http_instrumentation_enabled``, at a third of its cost when we can.

    The public function reads the current context three times (about 400 ns); this reads it
    once and looks the same three keys up in it. The keys are private to
    ``opentelemetry.instrumentation.utils``: when they are not all there (another version),
    the public function is used. A test checks both agree under every suppression.
    """
    names = (
        "_SUPPRESS_INSTRUMENTATION_KEY",
        "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN",
        "_SUPPRESS_HTTP_INSTRUMENTATION_KEY",
    )
    keys = [getattr(otel_utils, name, None) for name in names]
    first, second, third = keys
    if not (isinstance(first, str) and isinstance(second, str) and isinstance(third, str)):
        return is_http_instrumentation_enabled

    def enabled() -> bool:
        context = get_current()
        return not (context.get(first) or context.get(second) or context.get(third))

    return enabled


#: Whether HTTP instrumentation is enabled in the current context: ``False`` inside
#: ``suppress_instrumentation()`` (the OTLP exporter's own requests) or
#: ``suppress_http_instrumentation()``.
http_enabled: Callable[[], bool] = _enabled_check()


def is_failing_status(status: object) -> bool:
    """Whether an HTTP status counts as a failure: ``429`` or ``500``-``599``."""
    return type(status) is int and (500 <= status <= 599 or status == 429)


class FailingResponse(Exception):
    """A ``429``/``5xx`` response, raised inside an attempt so the guard treats it as a failure.

    The classifier reads ``response.status_code`` and ``response.headers`` (``Retry-After``).
    It never reaches the caller: the integration returns ``response`` instead. Its message
    holds the status only (no URL), since telemetry may record it.
    """

    def __init__(self, response: Any) -> None:
        self.response = response
        super().__init__(f"HTTP {getattr(response, 'status_code', '?')} response")


def resend_count() -> int:
    """The ordinal of the resend in flight in this context (1 = first retry), else 0."""
    return _RESEND.get()


class ResendCountSpanProcessor(SpanProcessor):
    """Sets ``http.request.resend_count`` on CLIENT spans started during a resend.

    The contrib requests and httpx instrumentations (0.66b2) do not set the attribute
    themselves, and nothing outside them can reach their span once it is started; a span
    processor's ``on_start`` can. Add it to an SDK ``TracerProvider``
    (``provider.add_span_processor(ResendCountSpanProcessor())``); it costs one context
    variable read per span started.
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        count = _RESEND.get()
        if count and span.kind is SpanKind.CLIENT:
            span.set_attribute(RESEND_COUNT_ATTRIBUTE, count)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


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
    host = host.lower()
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


def replay_safe(
    downstream: Downstream,
    method: str,
    body_replayable: bool,
    headers: Any,
    more_headers: Any = None,
) -> bool:
    """Whether a request may be sent again (RFC 9110 §9.2.2, see
    :func:`otel_raptor.core.replay.http_replay_safe`): a replayable body and an idempotent
    method, a non-empty ``Idempotency-Key`` in ``headers`` or ``more_headers`` (mappings or
    ``None``; the session's headers, say), or the downstream's ``retry_non_idempotent``."""
    if not body_replayable:
        return False
    if method in _IDEMPOTENT or downstream.retry_non_idempotent:
        return True
    for source in (headers, more_headers):
        if source is not None and http_replay_safe(method, source, body_replayable=True):
            return True
    return False


def _service_name(scheme: str, host: str, port: int, breaker_key: str) -> str:
    if breaker_key == "host":
        return host
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


# --- downstreams --------------------------------------------------------------------------------


class Downstream:
    """One origin: its policy, its guards, and what the wrappers need per request.

    ``enabled`` is ``False`` for a downstream to leave alone (``DownstreamPolicy.enabled``
    off); it then has no guards. ``safe`` and ``unsafe`` are the guards without fallbacks
    for requests that may and may not be replayed. ``fixed_fallbacks`` says whether every
    failure can be handed to a fallback (failover URLs or a fallback function);
    stale-if-error alone needs a cached response, which the wrapper checks per request.
    """

    __slots__ = (
        "_fallback",
        "_fallback_guards",
        "_runtime",
        "_timeout_kwarg",
        "breaker_name",
        "enabled",
        "failover_urls",
        "fixed_fallbacks",
        "policy",
        "retry_non_idempotent",
        "safe",
        "service",
        "stale_if_error",
        "stale_max_age",
        "timed",
        "timeout",
        "unsafe",
    )

    def __init__(
        self,
        service: str,
        policy: DownstreamPolicy,
        runtime: Runtime,
        *,
        timeout_kwarg: str | None,
        fallback: Callable[[BaseException], Any],
    ) -> None:
        self.policy = policy
        self.enabled = policy.enabled
        self.timeout = policy.timeout
        self.timed = policy.retry.attempt_timeout is not None or policy.retry.deadline is not None
        self.retry_non_idempotent = policy.retry_non_idempotent
        self.failover_urls = policy.failover_urls
        self.stale_if_error = policy.stale_if_error
        self.stale_max_age = policy.stale_max_age
        self.fixed_fallbacks = bool(policy.failover_urls) or policy.fallback is not None
        self._runtime = runtime
        self._timeout_kwarg = timeout_kwarg
        self._fallback = fallback
        self._fallback_guards: tuple[Guard, Guard] | None = None
        self.service = service
        self.breaker_name = ""
        # A disabled downstream has no guards (reading ``safe`` raises AttributeError).
        self.safe: Guard
        self.unsafe: Guard
        if self.enabled:
            self.safe = self._guard(replay_safe=True, fallback=None)
            self.unsafe = self._guard(replay_safe=False, fallback=None)
            self.service = self.safe.service
            breaker = self.safe.breaker
            self.breaker_name = breaker.name if breaker is not None else ""

    def _guard(
        self, *, replay_safe: bool, fallback: Callable[[BaseException], Any] | None
    ) -> Guard:
        return Guard(
            self.service,
            retry=self.policy.retry,
            breaker=self.policy.breaker,
            fallback=fallback,
            replay_safe=replay_safe,
            timeout_kwarg=self._timeout_kwarg,
            runtime=self._runtime,
        )

    def guard(self, *, replay_safe: bool, with_fallback: bool) -> Guard:
        """The guard for one request (only for an enabled downstream)."""
        if not with_fallback:
            return self.safe if replay_safe else self.unsafe
        guards = self._fallback_guards
        if guards is None:
            # Benign race: two threads may both build them; either pair works.
            guards = (
                self._guard(replay_safe=True, fallback=self._fallback),
                self._guard(replay_safe=False, fallback=self._fallback),
            )
            self._fallback_guards = guards
        return guards[0] if replay_safe else guards[1]


class DownstreamTable:
    """Downstreams by origin for one installed integration (bounded, thread-safe enough).

    Lookups are lock-free dict reads. Two threads meeting a new origin at once may both
    build it; the guards of both share the breaker (by service name), so either is fine.
    """

    __slots__ = ("_by_origin", "_by_prefix", "_config", "_fallback", "_runtime", "_timeout_kwarg")

    def __init__(
        self,
        runtime: Runtime,
        config: RaptorConfig,
        *,
        timeout_kwarg: str | None = None,
        fallback: Callable[[BaseException], Any],
    ) -> None:
        self._runtime = runtime
        self._config = config
        self._timeout_kwarg = timeout_kwarg
        self._fallback = fallback
        self._by_prefix: dict[Hashable, Downstream | None] = {}
        self._by_origin: dict[tuple[str, str, int], Downstream] = {}

    def for_prefix(self, prefix: str) -> Downstream | None:
        """The downstream of a URL prefix ``scheme://authority`` (as written by the caller),
        or ``None`` when it is not an HTTP(S) origin we handle."""
        try:
            return self._by_prefix[prefix]
        except KeyError:
            pass
        origin = parse_origin(prefix)
        downstream = None if origin is None else self.for_origin(*origin)
        if len(self._by_prefix) >= MAX_DOWNSTREAMS:
            self._by_prefix.clear()
        self._by_prefix[prefix] = downstream
        return downstream

    def for_parts(self, scheme: str, host: str, port: int | None) -> Downstream | None:
        """The downstream of an already split URL (httpx's ``URL.scheme``, ``.host``,
        ``.port``; ``port`` ``None`` for the scheme's default), or ``None`` when it is not
        an HTTP(S) origin."""
        key = (scheme, host, port)
        try:
            return self._by_prefix[key]
        except KeyError:
            pass
        lowered = scheme.lower()
        default = _DEFAULT_PORTS.get(lowered)
        downstream = None
        if default is not None and host:
            host = host.lower()
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            downstream = self.for_origin(lowered, host, default if port is None else port)
        if len(self._by_prefix) >= MAX_DOWNSTREAMS:
            self._by_prefix.clear()
        self._by_prefix[key] = downstream
        return downstream

    def for_origin(self, scheme: str, host: str, port: int) -> Downstream:
        """The downstream of a normalised origin (see :func:`parse_origin`)."""
        key = (scheme, host, port)
        downstream = self._by_origin.get(key)
        if downstream is None:
            config = self._config
            explicit = None if _DEFAULT_PORTS.get(scheme) == port else port
            policy = config.policy_for(host, explicit, scheme)
            downstream = Downstream(
                _service_name(scheme, host, port, config.breaker_key),
                policy,
                self._runtime,
                timeout_kwarg=self._timeout_kwarg,
                fallback=self._fallback,
            )
            if len(self._by_origin) >= MAX_DOWNSTREAMS:
                self._by_origin.clear()
            self._by_origin[key] = downstream
        return downstream


# --- attempts -----------------------------------------------------------------------------------


def _close_quietly(response: Any) -> None:
    # A failed response we are discarding anyway: its close may fail with the connection.
    with contextlib.suppress(Exception):
        response.close()


async def _aclose_quietly(response: Any) -> None:
    with contextlib.suppress(Exception):
        await response.aclose()


class SyncAttempt:
    """Sends one request per call; raises :class:`FailingResponse` for ``429``/``5xx``.

    One per logical call (the guard calls it once per attempt). Before a resend it closes the
    previous failing response, so its connection returns to the pool, and marks the resend in
    the context (:func:`resend_count`) while it is in flight. The last failing response is
    left open: the caller gets it.
    """

    __slots__ = ("_send", "failed", "sent")

    def __init__(self, send: Callable[..., Any]) -> None:
        self._send = send
        self.sent = 0
        self.failed: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sent = self.sent
        self.sent = sent + 1
        if sent:
            failed = self.failed
            if failed is not None:
                self.failed = None
                _close_quietly(failed)
            token = _RESEND.set(sent)
            try:
                response = self._send(*args, **kwargs)
            finally:
                _RESEND.reset(token)
        else:
            response = self._send(*args, **kwargs)
        status = getattr(response, "status_code", None)
        if type(status) is int and (status >= 500 or status == 429) and status <= 599:
            self.failed = response
            raise FailingResponse(response)
        return response


class AsyncAttempt:
    """:class:`SyncAttempt` for coroutine functions (``AsyncClient.send``); closes with
    ``aclose()``."""

    __slots__ = ("_send", "failed", "sent")

    def __init__(self, send: Callable[..., Awaitable[Any]]) -> None:
        self._send = send
        self.sent = 0
        self.failed: Any = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sent = self.sent
        self.sent = sent + 1
        if sent:
            failed = self.failed
            if failed is not None:
                self.failed = None
                await _aclose_quietly(failed)
            token = _RESEND.set(sent)
            try:
                response = await self._send(*args, **kwargs)
            finally:
                _RESEND.reset(token)
        else:
            response = await self._send(*args, **kwargs)
        status = getattr(response, "status_code", None)
        if type(status) is int and (status >= 500 or status == 429) and status <= 599:
            self.failed = response
            raise FailingResponse(response)
        return response


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


class StaleCache:
    """The last good response per request key, least recently used evicted.

    ``max_entries`` (default :data:`STALE_ENTRIES`, >= 1) bounds the entries; bodies over
    ``max_body`` bytes (default :data:`STALE_BODY_LIMIT`) are not kept. Keys are built by
    the integrations from the URL and the request's credentials, so one user's response is
    never served to another. Thread-safe (one lock around the dictionary operations).
    """

    __slots__ = ("_entries", "_lock", "max_body", "max_entries")

    def __init__(self, max_entries: int = STALE_ENTRIES, max_body: int = STALE_BODY_LIMIT) -> None:
        self.max_entries = max_entries
        self.max_body = max_body
        self._entries: OrderedDict[Hashable, StaleEntry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Hashable, entry: StaleEntry) -> None:
        if len(entry.body) > self.max_body:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, key: Hashable, *, now: float, max_age: float) -> StaleEntry | None:
        """The entry for ``key`` if it is at most ``max_age`` seconds old at ``now``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now - entry.stored_at > max_age:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    def __len__(self) -> int:
        return len(self._entries)


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


class FallbackCall:
    """One request's fallbacks, in order: failover base URLs, the stale response, the
    downstream's fallback function. Subclassed per library (the ``failover``,
    ``stale_response``, ``circuit_open`` and ``close`` hooks).

    ``replay_safe`` says whether the primary request may be sent again: failover after the
    primary gave up needs it; after a breaker refusal the primary was never sent, so failover
    is always allowed. ``stale_key`` is ``None`` when the request may not be served stale.
    """

    __slots__ = ("cache", "downstream", "now", "replay_safe", "stale_key")

    #: Async subclasses set it: the guard's fallback then returns :meth:`run_async`.
    is_async: ClassVar[bool] = False

    def __init__(
        self,
        downstream: Downstream,
        *,
        replay_safe: bool,
        stale_key: Hashable | None,
        cache: StaleCache,
        now: Callable[[], float],
    ) -> None:
        self.downstream = downstream
        self.replay_safe = replay_safe
        self.stale_key = stale_key
        self.cache = cache
        self.now = now

    # -- library hooks ------------------------------------------------------------------------

    def failover(self, base_url: str) -> Any:
        """Send the request again with its origin replaced by ``base_url``, guarded by that
        downstream's own policy (without its fallbacks); the response, or raises."""
        raise NotImplementedError

    async def failover_async(self, base_url: str) -> Any:
        raise NotImplementedError

    def stale_response(self, entry: StaleEntry) -> Any:
        """A response object of the library rebuilt from ``entry``, marked stale."""
        raise NotImplementedError

    def circuit_open(self, error: CircuitOpenError) -> BaseException:
        """The library-flavoured refusal for the guard's plain ``error``."""
        raise NotImplementedError

    # -- the chain -------------------------------------------------------------------------------

    def _stale(self) -> Any:
        key = self.stale_key
        if key is None or not self.downstream.stale_if_error:
            return _NOTHING
        try:
            entry = self.cache.get(key, now=self.now(), max_age=self.downstream.stale_max_age)
            return _NOTHING if entry is None else self.stale_response(entry)
        except Exception as bug:  # noqa: BLE001 - our bug: skip this fallback
            report_internal_error("http.stale_response", bug)
            return _NOTHING

    def _start(self, error: BaseException) -> tuple[BaseException, Any, bool]:
        rejected = type(error) is CircuitOpenError
        if rejected:
            try:
                error = self.circuit_open(error)  # type: ignore[arg-type]  # checked above
            except Exception as bug:  # noqa: BLE001 - keep the plain refusal
                report_internal_error("http.circuit_open", bug)
        primary = error.response if isinstance(error, FailingResponse) else _NOTHING
        return error, primary, rejected

    def _choose(self, error: BaseException, primary: Any, result: Any) -> Any:
        if result is not _NOTHING:
            return result
        function = self.downstream.policy.fallback
        if function is None:
            # Every fallback declined: the caller gets what it would have got without them
            # (the wrapper turns a FailingResponse back into its response).
            raise error
        return function(error if primary is _NOTHING else primary)

    def run(self, error: BaseException) -> Any:
        """The guard's fallback for a sync call (see the class docstring)."""
        error, primary, rejected = self._start(error)
        result: Any = _NOTHING
        if self.downstream.failover_urls and (self.replay_safe or rejected):
            for base_url in self.downstream.failover_urls:
                try:
                    response = self.failover(base_url)
                except Exception:  # noqa: BLE001 - the next fallback's turn
                    continue
                if is_failing_status(getattr(response, "status_code", None)):
                    _close_quietly(response)
                    continue
                result = response
                break
        if result is _NOTHING:
            result = self._stale()
        result = self._choose(error, primary, result)
        if primary is not _NOTHING and result is not primary:
            _close_quietly(primary)
        return result

    async def run_async(self, error: BaseException) -> Any:
        """The guard's fallback for an async call; an awaitable from the fallback function
        is awaited."""
        error, primary, rejected = self._start(error)
        result: Any = _NOTHING
        if self.downstream.failover_urls and (self.replay_safe or rejected):
            for base_url in self.downstream.failover_urls:
                try:
                    response = await self.failover_async(base_url)
                except Exception:  # noqa: BLE001 - the next fallback's turn
                    continue
                if is_failing_status(getattr(response, "status_code", None)):
                    await _aclose_quietly(response)
                    continue
                result = response
                break
        if result is _NOTHING:
            result = self._stale()
        result = self._choose(error, primary, result)
        if inspect.isawaitable(result):
            result = await result
        if primary is not _NOTHING and result is not primary:
            await _aclose_quietly(primary)
        return result


def guard_fallback(error: BaseException) -> Any:
    """The ``fallback`` of every fallback guard: runs the current request's
    :class:`FallbackCall` (a coroutine for async calls, which the guard awaits)."""
    call = _FALLBACK_CALL.get()
    if call is None:  # only reachable if a fallback guard is used outside a wrapper
        raise error
    if call.is_async:
        return call.run_async(error)
    return call.run(error)


def enter_fallback(call: FallbackCall) -> object:
    """Make ``call`` the current request's fallbacks; returns the token for
    :func:`exit_fallback`."""
    return _FALLBACK_CALL.set(call)


def exit_fallback(token: object) -> None:
    _FALLBACK_CALL.reset(token)  # type: ignore[arg-type]  # a token from enter_fallback
