"""The shared HTTP pieces (origins, suppression check, stale cache, resend marking) and the
wrapping helpers, without a network."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as context_api
from opentelemetry.instrumentation.utils import (
    is_http_instrumentation_enabled,
    suppress_http_instrumentation,
    suppress_instrumentation,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_raptor.config import DownstreamOverride, RaptorConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.integrations import _http, _wrapping
from otel_raptor.integrations._http import (
    RESEND_COUNT_ATTRIBUTE,
    STALE_HEADER,
    AsyncHttpHooks,
    FailingResponse,
    HttpHooks,
    OriginTable,
    ResendCountSpanProcessor,
    StaleCache,
    StaleEntry,
    _failing,
    http_enabled,
    is_failing_status,
    origin_end,
    parse_origin,
    resend_count,
    stale_headers,
    stale_key_headers,
)
from otel_raptor.integrations._kit import MAX_TARGETS
from otel_raptor.runtime.drive import run_sync
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock

# --- origins ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://a.test/x?y#z", "http://a.test"),
        ("https://a.test", "https://a.test"),
        ("http://a.test?q=/x", "http://a.test"),
        ("http://a.test#/frag", "http://a.test"),
        ("http://u:p@a.test:81/", "http://u:p@a.test:81"),
        ("http://[::1]:8080/path", "http://[::1]:8080"),
    ],
)
def test_origin_end_cuts_after_the_authority(url: str, origin: str) -> None:
    assert url[: origin_end(url)] == origin


@pytest.mark.parametrize("url", ["no-scheme/x", "://a.test/", "", "a.test"])
def test_origin_end_refuses_relative_urls(url: str) -> None:
    assert origin_end(url) == -1


@pytest.mark.parametrize(
    ("origin", "parsed"),
    [
        ("http://a.test", ("http", "a.test", 80)),
        ("HTTPS://A.Test", ("https", "a.test", 443)),
        ("http://user:secret@a.test:8080", ("http", "a.test", 8080)),
        ("http://[::1]:8080", ("http", "::1", 8080)),
        ("https://[2001:db8::1]", ("https", "2001:db8::1", 443)),
        ("http://a.test:", ("http", "a.test", 80)),
    ],
)
def test_parse_origin_normalises(origin: str, parsed: tuple[str, str, int]) -> None:
    assert parse_origin(origin) == parsed


@pytest.mark.parametrize(
    "origin",
    [
        "ftp://a.test",
        "http+unix://%2Fsock",
        "http://",
        "http://a.test:99999",
        "http://a.test:0",
        "http://a.test:8o",
        "http://a.test:٣",  # a non-ASCII digit
        "http://[::1",
        "http://[::1]x",
        "a.test",
    ],
)
def test_parse_origin_refuses_what_it_cannot_name(origin: str) -> None:
    assert parse_origin(origin) is None


def table(**config: Any) -> OriginTable:
    return OriginTable(Runtime(), RaptorConfig(**config), HttpHooks("timeout"))


_URL_PARTS = st.sampled_from(
    [
        "http",
        "https",
        "HTTP",
        "ftp",
        "ws",
        "a/b",
        "",
        "://",
        "/",
        "?",
        "#",
        "@",
        ":",
        "//",
        "a.test",
        "B.test",
        "user:pw@",
        "[::1]",
        ":8080",
        ":80",
        "x",
        "/p/q",
        "?q=/a",
        "#f/x",
    ]
)


@settings(max_examples=400, deadline=None)
@given(urls=st.lists(st.lists(_URL_PARTS, max_size=7).map("".join), min_size=1, max_size=12))
def test_for_url_names_the_origin_for_prefix_would_whatever_came_before(urls: list[str]) -> None:
    # for_url answers from the cache by the text up to the first "/" past the scheme: a hit
    # must be the very origin the careful path names, in any order of URLs (cold or warm).
    downstreams = table()
    for url in urls + urls:
        end = origin_end(url)
        expected = downstreams.for_prefix(url[:end]) if end > 0 else None
        assert downstreams.for_url(url) is expected, url


def test_for_url_reads_an_origin_written_with_a_query_or_credentials_carefully() -> None:
    downstreams = table()
    plain = downstreams.for_url("http://a.test/x")
    assert plain is not None
    assert downstreams.for_url("http://a.test") is plain
    assert downstreams.for_url("http://a.test?next=/b") is plain
    assert downstreams.for_url("http://a.test#/b") is plain
    assert downstreams.for_url("http://user:pw@a.test/x") is plain
    assert downstreams.for_url("HTTP://A.TEST:80/y") is plain
    assert downstreams.for_url("http://a.test.evil/x") is not plain
    assert downstreams.for_url("http://a.test:8080/x") is not plain
    assert downstreams.for_url("https://a.test/x") is not plain
    assert downstreams.for_url("ftp://a.test/x") is None
    assert downstreams.for_url("/relative") is None
    assert all("pw" not in str(key) for key in downstreams._by_prefix)


def test_origins_are_named_by_origin_and_share_one_breaker() -> None:
    downstreams = table()
    first = downstreams.for_prefix("http://user:pw@A.test")
    assert first is not None
    assert first.service == "http://a.test:80"
    assert downstreams.for_prefix("http://a.test:80") is first
    assert downstreams.for_parts("http", "a.test", None) is first
    safe = first.plan(replay_safe=True, with_fallback=False)
    unsafe = first.plan(replay_safe=False, with_fallback=False)
    assert safe.route is unsafe.route  # one breaker, one downstream
    assert safe.spec.replay_safe
    assert not unsafe.spec.replay_safe
    assert first.plan(replay_safe=True, with_fallback=False) is safe  # built once
    with_fallback = first.plan(replay_safe=True, with_fallback=True)
    assert with_fallback.spec.has_fallback
    assert with_fallback.route.breaker is safe.route.breaker
    # Credentials in the authority never become a key of the table.
    assert all("pw" not in str(key) for key in downstreams._by_prefix)
    ipv6 = downstreams.for_prefix("https://[::1]:8443")
    assert ipv6 is not None
    assert ipv6.service == "https://[::1]:8443"
    assert downstreams.for_prefix("ftp://a.test") is None
    assert downstreams.for_parts("ftp", "a.test", None) is None


@pytest.mark.parametrize(
    "spellings",
    [
        ("http://bücher.test", "http://xn--bcher-kva.test", "http://BÜCHER.test:80"),
        ("http://[::1]:8080", "http://[0:0::1]:8080", "http://[0000::0001]:8080"),
    ],
)
def test_every_spelling_of_an_origin_names_one_downstream(spellings: tuple[str, ...]) -> None:
    # requests hands on the URL as written, httpx its parse (an IDNA host decoded): one
    # origin written two ways must share one breaker, in either library.
    httpx = pytest.importorskip("httpx")
    downstreams = table()
    origins = {downstreams.for_prefix(spelling) for spelling in spellings}
    for spelling in spellings:
        url = httpx.URL(spelling)
        origins.add(downstreams.for_parts(url.scheme, url.host, url.port))
    assert len(origins) == 1
    assert None not in origins


def test_breaker_key_host_names_downstreams_by_host() -> None:
    downstreams = table(breaker_key="host")
    first = downstreams.for_prefix("http://a.test:81")
    second = downstreams.for_prefix("https://a.test")
    assert first is not None
    assert second is not None
    assert first.service == second.service == "a.test"
    assert first.breaker_name == second.breaker_name == "a.test"


def test_downstream_policies_come_from_the_config() -> None:
    downstreams = table(
        request_timeout=7.0,
        downstreams=(
            DownstreamOverride(pattern="slow.test", timeout=60.0, retry_non_idempotent=True),
            DownstreamOverride(pattern="off.test", enabled=False),
        ),
    )
    slow = downstreams.for_prefix("http://slow.test")
    plain = downstreams.for_prefix("http://other.test")
    off = downstreams.for_prefix("http://off.test")
    assert slow is not None
    assert plain is not None
    assert off is not None
    assert (slow.timeout, slow.retry_non_idempotent) == (60.0, True)
    assert (plain.timeout, plain.retry_non_idempotent) == (7.0, False)
    assert not off.enabled


def test_the_table_stays_bounded() -> None:
    downstreams = table(max_services=4)
    for port in range(1, MAX_TARGETS + 10):
        downstreams.for_prefix(f"http://h.test:{port}")
    assert len(downstreams._by_prefix) <= MAX_TARGETS
    assert len(downstreams._by_origin) <= MAX_TARGETS
    last = downstreams.for_prefix("http://h.test:9999")
    assert last is not None
    assert last.service == "other"  # past the runtime's cap


# --- statuses and attempts ----------------------------------------------------------------------


FAILING = {200: False, 404: False, 429: True, 500: True, 503: True, 599: True, 600: False}


@pytest.mark.parametrize(("code", "failing"), [*FAILING.items(), (None, False), ("503", False)])
def test_failing_statuses(code: object, failing: bool) -> None:
    assert is_failing_status(code) is failing


@pytest.mark.parametrize(
    "code", [*FAILING, None, "503", 503.0, True, 429.0, [503], {"status": 503}]
)
def test_the_success_path_check_agrees_with_is_failing_status(code: object) -> None:
    # ``_failing`` is the set-lookup twin the drivers call on every response.
    response = SimpleNamespace(status_code=code)
    failure = _failing(response)
    assert (failure is not None) is is_failing_status(code)
    if failure is not None:
        assert isinstance(failure, FailingResponse)
        assert failure.response is response
    assert _failing(object()) is None  # no status at all


class FakeResponse:
    def __init__(self, status_code: Any) -> None:
        self.status_code = status_code
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_failing_responses_are_failures_given_back_on_giving_up() -> None:
    hooks = HttpHooks()
    assert hooks.failure_of is not None
    failure = hooks.failure_of(FakeResponse(503))
    assert isinstance(failure, FailingResponse)
    assert str(failure) == "HTTP 503 response"  # never the URL
    assert hooks.give_up(failure) is failure.response
    assert hooks.failure_of(FakeResponse(200)) is None
    assert hooks.failure_of(FakeResponse(None)) is None
    assert hooks.failure_of("not a response") is None
    error = ConnectionError("down")
    with pytest.raises(ConnectionError) as raised:
        hooks.give_up(error)
    assert raised.value is error


def test_a_failing_response_is_closed_before_the_next_attempt() -> None:
    runtime = Runtime(clock=FakeClock())
    table = OriginTable(runtime, RaptorConfig(), HttpHooks())
    origin = table.for_prefix("http://a.test")
    assert origin is not None
    responses = [FakeResponse(503), FakeResponse(429), FakeResponse(200)]
    sent = iter(responses)
    counts: list[int] = []

    def send() -> FakeResponse:
        counts.append(resend_count())
        return next(sent)

    plan = origin.plan(replay_safe=True, with_fallback=False)
    assert run_sync(plan, send, (), {}) is responses[2]
    assert [r.closed for r in responses] == [True, True, False]
    assert counts == [0, 1, 2]
    assert resend_count() == 0


async def test_async_hooks_close_with_aclose() -> None:
    response = FakeResponse(503)
    hooks = AsyncHttpHooks()
    assert hooks.failure_of is not None
    failure = hooks.failure_of(response)
    assert failure is not None
    pending = hooks.discard(failure)
    assert pending is not None
    await pending
    assert response.closed


def test_timeout_hooks_fill_in_the_attempt_timeout() -> None:
    hooks = HttpHooks("timeout")
    assert hooks.applies_timeouts
    assert hooks.attempt_kwargs({}, 2.0, 1) == {"timeout": 2.0}
    assert hooks.attempt_kwargs({"timeout": 5.0}, 2.0, 1) == {"timeout": 5.0}  # the caller's
    assert hooks.attempt_kwargs({"timeout": 5.0}, 3.0, 2) == {"timeout": 3.0}  # a retry's
    assert hooks.attempt_kwargs({}, None, 2) == {}
    assert not HttpHooks().applies_timeouts


# --- the suppression check ----------------------------------------------------------------------


def test_the_fast_enabled_check_agrees_with_opentelemetry() -> None:
    assert http_enabled is not is_http_instrumentation_enabled  # the fast one is in use
    assert http_enabled() is is_http_instrumentation_enabled() is True
    with suppress_instrumentation():
        assert http_enabled() is is_http_instrumentation_enabled() is False
    with suppress_http_instrumentation():
        assert http_enabled() is is_http_instrumentation_enabled() is False
    # A context that holds something else (a span, baggage) suppresses nothing either.
    token = context_api.attach(context_api.set_value("not-a-suppression-key", True))
    try:
        assert http_enabled() is is_http_instrumentation_enabled() is True
        with suppress_instrumentation():
            assert http_enabled() is is_http_instrumentation_enabled() is False
    finally:
        context_api.detach(token)


def test_the_public_check_is_used_when_the_keys_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr("opentelemetry.instrumentation.utils._SUPPRESS_INSTRUMENTATION_KEY_PLAIN")
    assert _http._enabled_check() is is_http_instrumentation_enabled


# --- stale cache --------------------------------------------------------------------------------


def entry(body: bytes = b"x", stored_at: float = 0.0, **extra: Any) -> StaleEntry:
    values: dict[str, Any] = {
        "status": 200,
        "reason": "OK",
        "headers": (("Content-Type", "text/plain"),),
        "body": body,
        "encoding": None,
        "url": "http://a.test/",
        "stored_at": stored_at,
    }
    values.update(extra)
    return StaleEntry(**values)


def test_the_stale_cache_evicts_the_least_recently_used() -> None:
    cache = StaleCache(max_entries=2)
    cache.put("a", entry())
    cache.put("b", entry())
    assert cache.get("a", now=1.0, max_age=10.0) is not None  # a is now the most recent
    cache.put("c", entry())
    assert cache.get("b", now=1.0, max_age=10.0) is None
    assert cache.get("a", now=1.0, max_age=10.0) is not None
    assert len(cache) == 2


def test_the_stale_cache_expires_and_skips_big_bodies() -> None:
    cache = StaleCache(max_body=4)
    cache.put("big", entry(b"12345"))
    assert cache.get("big", now=0.0, max_age=10.0) is None
    cache.put("old", entry(stored_at=0.0))
    assert cache.get("old", now=11.0, max_age=10.0) is None
    assert len(cache) == 0


def test_stale_headers_mark_the_response_and_add_up_its_age() -> None:
    headers = stale_headers(
        entry(headers=(("ETag", '"v"'), ("Age", "10"), (STALE_HEADER, "1")), stored_at=5.0),
        now=12.5,
    )
    assert headers == [("ETag", '"v"'), ("Age", "17"), (STALE_HEADER, "1")]


def test_every_header_but_the_unkeyed_ones_enters_a_stale_key() -> None:
    headers = [
        ("X-Tenant", "a"),
        (b"X-API-Key", "k"),
        ("Host", "vhost.test"),
        ("Baggage", "user.id=7"),
        ("Accept", "text/html"),
        ("accept", "application/json"),
        ("User-Agent", "python-requests"),
        ("traceparent", "00-1-2-01"),
        ("X-Request-ID", "r1"),
        ("Content-Length", "0"),
    ]
    assert stale_key_headers(headers) == (
        ("accept", "text/html"),
        ("accept", "application/json"),
        ("baggage", "user.id=7"),
        ("host", "vhost.test"),
        ("x-api-key", "k"),
        ("x-tenant", "a"),
    )


# --- resend marking -----------------------------------------------------------------------------


def test_the_span_processor_marks_client_spans_during_a_resend() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(ResendCountSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    responses = iter([FakeResponse(503), FakeResponse(200)])

    def send() -> FakeResponse:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
            with tracer.start_as_current_span("internal"):
                pass
            return next(responses)

    origin = OriginTable(Runtime(clock=FakeClock()), RaptorConfig(), HttpHooks()).for_prefix(
        "http://a.test"
    )
    assert origin is not None
    run_sync(origin.plan(replay_safe=True, with_fallback=False), send, (), {})
    with tracer.start_as_current_span("after", kind=SpanKind.CLIENT):
        pass
    marks = [
        (span.name, (span.attributes or {}).get(RESEND_COUNT_ATTRIBUTE))
        for span in exporter.get_finished_spans()
    ]
    assert marks == [
        ("internal", None),
        ("GET", None),
        ("internal", None),  # not a client span
        ("GET", 1),
        ("after", None),
    ]
    assert ResendCountSpanProcessor().force_flush() is True


def test_http_calls_in_a_retried_function_are_not_resends() -> None:
    """A retry of a guarded function is not a resend of the requests it makes: only a retry
    of the request itself (an HTTP integration's plan) marks ``http.request.resend_count``,
    and a request's own retry inside a retried function counts from its own first attempt."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(ResendCountSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    runtime = Runtime(clock=FakeClock())
    origin = OriginTable(runtime, RaptorConfig(), HttpHooks()).for_prefix("http://a.test")
    assert origin is not None
    request_plan = origin.plan(replay_safe=True, with_fallback=False)
    responses = iter([FakeResponse(200), FakeResponse(200), FakeResponse(503), FakeResponse(200)])

    def send() -> FakeResponse:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
            return next(responses)

    calls = iter([ConnectionResetError(104, "reset"), None])

    def job() -> str:
        run_sync(request_plan, send, (), {})
        failure = next(calls)
        if failure is not None:
            raise failure
        return run_sync(request_plan, send, (), {}).status_code  # 503, then 200

    guard = Guard("job", retry=RetryPolicy(max_retries=1, base_delay=0.0), runtime=runtime)
    assert guard.call(job) == 200
    marks = [
        (span.attributes or {}).get(RESEND_COUNT_ATTRIBUTE)
        for span in exporter.get_finished_spans()
    ]
    # The function's first try (one GET), its retry: a GET, then a GET retried once.
    assert marks == [None, None, None, 1]


# --- wrapping -----------------------------------------------------------------------------------


class Target:
    def method(self, value: int) -> int:
        return value


ORIGINAL = Target.method


def doubling(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return 2 * wrapped(*args, **kwargs)


def adding(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return 1 + wrapped(*args, **kwargs)


@pytest.fixture
def clean_target() -> Iterator[None]:
    yield
    Target.method = ORIGINAL  # type: ignore[method-assign]


@pytest.mark.usefixtures("clean_target")
def test_wrap_is_idempotent_and_unwrap_restores_the_same_object() -> None:
    assert _wrapping.wrap(Target, "method", doubling)
    assert not _wrapping.wrap(Target, "method", doubling)
    assert Target().method(3) == 6
    assert _wrapping.is_wrapped(Target, "method", doubling)
    assert _wrapping.unwrap(Target, "method", doubling)
    assert Target.method is ORIGINAL
    assert not _wrapping.unwrap(Target, "method", doubling)
    assert not _wrapping.is_wrapped(Target, "method", doubling)


@pytest.mark.usefixtures("clean_target")
def test_a_layer_under_someone_elses_is_left_in_place() -> None:
    _wrapping.wrap(Target, "method", doubling)
    _wrapping.wrap(Target, "method", adding)
    assert Target().method(3) == 7
    assert not _wrapping.unwrap(Target, "method", doubling)  # would drop `adding` too
    assert not _wrapping.wrap(Target, "method", doubling)  # still there: no second layer
    assert _wrapping.unwrap(Target, "method", adding)
    assert _wrapping.unwrap(Target, "method", doubling)
    assert Target.method is ORIGINAL


def test_wrapping_a_missing_attribute_fails_loudly() -> None:
    with pytest.raises(AttributeError):
        _wrapping.wrap(Target, "missing", doubling)
