from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor.core.retry_after import (
    MAX_RETRY_AFTER_S,
    parse_reset_seconds,
    parse_retry_after,
    retry_after_from_headers,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, tz=UTC), usegmt=True)


class TestParseRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("0", 0.0),
            ("120", 120.0),
            ("  7 ", 7.0),
            ("1.5", 1.5),  # not RFC, but sent in the wild
            ("-3", 0.0),
            ("-0.5", 0.0),
            ("86400", 86_400.0),
            ("86401", MAX_RETRY_AFTER_S),
            ("99999999999999999999999", MAX_RETRY_AFTER_S),
        ],
    )
    def test_delay_seconds(self, value: str, expected: float) -> None:
        assert parse_retry_after(value, now_wall=NOW) == expected

    def test_http_date_in_the_future(self) -> None:
        assert parse_retry_after(http_date(NOW + 30), now_wall=NOW) == 30.0

    def test_http_date_fixed_text(self) -> None:
        # 2023-11-14T22:14:00Z is 40 s after NOW.
        assert parse_retry_after("Tue, 14 Nov 2023 22:14:00 GMT", now_wall=NOW) == 40.0

    def test_http_date_in_the_past_is_now(self) -> None:
        assert parse_retry_after(http_date(NOW - 3600), now_wall=NOW) == 0.0

    def test_http_date_without_zone_is_utc(self) -> None:
        assert parse_retry_after("Tue, 14 Nov 2023 22:14:00 -0000", now_wall=NOW) == 40.0

    def test_http_date_far_away_is_capped(self) -> None:
        assert parse_retry_after(http_date(NOW + 10 * 86_400), now_wall=NOW) == MAX_RETRY_AFTER_S

    @pytest.mark.parametrize(
        "value",
        [None, "", "   ", "soon", "1e3", "12abc", "inf", "nan", "²", "Tue, 99 Nov 2023", "--1"],
    )
    def test_garbage_is_none(self, value: str | None) -> None:
        assert parse_retry_after(value, now_wall=NOW) is None

    @given(st.integers(min_value=0, max_value=10**30))
    def test_any_non_negative_integer_round_trips(self, seconds: int) -> None:
        assert parse_retry_after(str(seconds), now_wall=NOW) == min(
            float(seconds), MAX_RETRY_AFTER_S
        )

    @given(st.integers(min_value=0, max_value=86_400))
    def test_small_integers_are_exact(self, seconds: int) -> None:
        assert parse_retry_after(str(seconds), now_wall=NOW) == float(seconds)

    @given(st.text(max_size=40))
    def test_never_raises_and_stays_in_range(self, text: str) -> None:
        result = parse_retry_after(text, now_wall=NOW)
        assert result is None or 0.0 <= result <= MAX_RETRY_AFTER_S


class TestParseResetSeconds:
    def test_delta(self) -> None:
        assert parse_reset_seconds("12", now_wall=NOW, epoch_allowed=False) == 12.0

    def test_large_value_is_a_delta_when_epochs_are_not_allowed(self) -> None:
        assert parse_reset_seconds(str(int(NOW)), now_wall=NOW, epoch_allowed=False) == (
            MAX_RETRY_AFTER_S
        )

    def test_epoch_seconds(self) -> None:
        assert parse_reset_seconds(str(int(NOW) + 60), now_wall=NOW, epoch_allowed=True) == 60.0

    def test_epoch_milliseconds(self) -> None:
        value = str(int(NOW * 1000) + 2500)
        assert parse_reset_seconds(value, now_wall=NOW, epoch_allowed=True) == 2.5

    def test_epoch_in_the_past_is_now(self) -> None:
        assert parse_reset_seconds(str(int(NOW) - 5), now_wall=NOW, epoch_allowed=True) == 0.0

    @pytest.mark.parametrize("value", [None, "", "x", "1e9"])
    def test_garbage(self, value: str | None) -> None:
        assert parse_reset_seconds(value, now_wall=NOW, epoch_allowed=True) is None


class CaseInsensitiveHeaders(Mapping[str, str]):
    """Stands in for requests' CaseInsensitiveDict and httpx.Headers."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = {k.lower(): v for k, v in items.items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class TestRetryAfterFromHeaders:
    def test_none_and_empty(self) -> None:
        assert retry_after_from_headers(None, now_wall=NOW) is None
        assert retry_after_from_headers({}, now_wall=NOW) is None

    @pytest.mark.parametrize("name", ["Retry-After", "retry-after", "RETRY-AFTER", "rEtRy-AfTeR"])
    def test_plain_dict_any_case(self, name: str) -> None:
        assert retry_after_from_headers({name: "4"}, now_wall=NOW) == 4.0

    def test_case_insensitive_object(self) -> None:
        headers = CaseInsensitiveHeaders({"RETRY-after": "9"})
        assert retry_after_from_headers(headers, now_wall=NOW) == 9.0

    def test_real_header_objects(self) -> None:
        import httpx
        import requests.structures

        assert retry_after_from_headers(httpx.Headers({"retry-AFTER": "3"}), now_wall=NOW) == 3.0
        cid = requests.structures.CaseInsensitiveDict({"Retry-After": "5"})
        assert retry_after_from_headers(cid, now_wall=NOW) == 5.0

    def test_bytes_values(self) -> None:
        assert retry_after_from_headers({b"retry-after": b"6"}, now_wall=NOW) == 6.0  # type: ignore[dict-item]

    def test_retry_after_wins_over_reset_headers(self) -> None:
        headers = {"Retry-After": "2", "RateLimit-Reset": "30", "X-RateLimit-Reset": "40"}
        assert retry_after_from_headers(headers, now_wall=NOW) == 2.0

    def test_ratelimit_reset_is_a_delta(self) -> None:
        assert retry_after_from_headers({"ratelimit-reset": "30"}, now_wall=NOW) == 30.0

    def test_x_ratelimit_reset_epoch(self) -> None:
        headers = {"X-RateLimit-Reset": str(int(NOW) + 45)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 45.0

    def test_x_ratelimit_reset_delta(self) -> None:
        assert retry_after_from_headers({"x-ratelimit-reset": "15"}, now_wall=NOW) == 15.0

    def test_garbage_retry_after_falls_through_to_reset(self) -> None:
        headers = {"Retry-After": "later", "RateLimit-Reset": "8"}
        assert retry_after_from_headers(headers, now_wall=NOW) == 8.0

    def test_reset_headers_ignored_when_not_rate_limited(self) -> None:
        # GitHub sends X-RateLimit-Reset on every response; a 500 is no reason to wait for it.
        headers = {"X-RateLimit-Reset": str(int(NOW) + 3000), "X-RateLimit-Remaining": "17"}
        assert retry_after_from_headers(headers, now_wall=NOW, rate_limited=False) is None

    def test_reset_headers_used_when_quota_is_spent(self) -> None:
        headers = {"X-RateLimit-Reset": str(int(NOW) + 30), "X-RateLimit-Remaining": "0"}
        assert retry_after_from_headers(headers, now_wall=NOW, rate_limited=False) == 30.0
        draft = {"RateLimit-Reset": "12", "RateLimit-Remaining": "0"}
        assert retry_after_from_headers(draft, now_wall=NOW, rate_limited=False) == 12.0

    def test_retry_after_applies_even_when_not_rate_limited(self) -> None:
        assert retry_after_from_headers({"Retry-After": "5"}, now_wall=NOW, rate_limited=False) == 5

    def test_broken_header_object_is_none(self) -> None:
        class Broken:
            def get(self, key: str) -> str:
                raise RuntimeError("boom")

        assert retry_after_from_headers(Broken(), now_wall=NOW) is None


class TestServerClock:
    """Absolute times in a response are on the server's clock: read them against its ``Date``
    header, not against ours, which may be minutes off (containers, VMs)."""

    @pytest.mark.parametrize("skew", [-600, 600])
    def test_http_date_is_read_against_the_response_date(self, skew: int) -> None:
        server_now = NOW + skew
        headers = {"Retry-After": http_date(server_now + 30), "Date": http_date(server_now)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 30.0

    @pytest.mark.parametrize("skew", [-600, 600])
    def test_x_ratelimit_reset_epoch_is_read_against_the_response_date(self, skew: int) -> None:
        server_now = int(NOW) + skew
        headers = {"X-RateLimit-Reset": str(server_now + 45), "Date": http_date(server_now)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 45.0
        in_ms = {"X-RateLimit-Reset": str((server_now + 2) * 1000 + 500), "Date": headers["Date"]}
        assert retry_after_from_headers(in_ms, now_wall=NOW) == 2.5

    def test_a_date_before_the_response_date_is_now(self) -> None:
        headers = {"Retry-After": http_date(NOW + 100), "Date": http_date(NOW + 700)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 0.0

    def test_the_cap_still_applies(self) -> None:
        headers = {"Retry-After": http_date(NOW - 600 + 2 * 86_400), "Date": http_date(NOW - 600)}
        assert retry_after_from_headers(headers, now_wall=NOW) == MAX_RETRY_AFTER_S

    @pytest.mark.parametrize("date", ["", "yesterday", "Tue, 99 Nov 2023", "12", "1700000000"])
    def test_without_a_usable_date_our_clock_is_used(self, date: str) -> None:
        headers = {"Retry-After": http_date(NOW + 30), "Date": date}
        assert retry_after_from_headers(headers, now_wall=NOW) == 30.0
        assert retry_after_from_headers({"Retry-After": http_date(NOW + 30)}, now_wall=NOW) == 30

    def test_delay_seconds_ignore_the_date(self) -> None:
        headers = {"Retry-After": "7", "Date": http_date(NOW + 600)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 7.0
        headers = {"RateLimit-Reset": "12", "Date": http_date(NOW - 600)}
        assert retry_after_from_headers(headers, now_wall=NOW) == 12.0

    def test_any_header_spelling_and_type(self) -> None:
        import httpx

        date, later = http_date(NOW - 600), http_date(NOW - 570)
        assert retry_after_from_headers({"DATE": date, "retry-after": later}, now_wall=NOW) == 30
        headers = httpx.Headers({"date": date, "Retry-After": later})
        assert retry_after_from_headers(headers, now_wall=NOW) == 30.0
        raw = {b"Date": date.encode(), b"Retry-After": later.encode()}
        assert retry_after_from_headers(raw, now_wall=NOW) == 30.0  # type: ignore[arg-type]

    @given(
        skew=st.integers(min_value=-10 * 86_400, max_value=10 * 86_400),
        wait=st.integers(min_value=-3_600, max_value=2 * 86_400),
        local=st.floats(min_value=1e9, max_value=4e9),
    )
    def test_the_wait_does_not_depend_on_our_clock(
        self, skew: int, wait: int, local: float
    ) -> None:
        server_now = int(local) + skew
        headers = {"Date": http_date(server_now), "Retry-After": http_date(server_now + wait)}
        expected = min(max(float(wait), 0.0), MAX_RETRY_AFTER_S)
        assert retry_after_from_headers(headers, now_wall=local) == expected
