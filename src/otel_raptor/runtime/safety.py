"""The safety net: our own bugs are logged, once and rate-limited, never raised into the app."""

from __future__ import annotations

import logging
import time

from otel_raptor.runtime.forksafe import LockBox

__all__ = ["OTHER_SITE", "internal_error_counts", "report_internal_error"]

_logger = logging.getLogger("otel_raptor")

_REPEAT_AFTER_S = 300.0
_MAX_KEYS = 256  # bounded: the keys are call-site names, but never trust that
#: Where the errors of sites past ``_MAX_KEYS`` distinct ones are counted.
OTHER_SITE = "other"

_box = LockBox()
_last_reported: dict[str, float] = {}
# Every error, not only the logged ones, for the ``raptor.internal.errors`` counter. Never
# cleared (a cumulative counter must not go back): a site past the bound counts as ``other``.
_counts: dict[str, int] = {}


def report_internal_error(where: str, exc: BaseException | None = None) -> None:
    """Log that otel_raptor failed at ``where``; the caller then carries on without us.

    Each ``where`` is logged at most once every five minutes, with the traceback the first
    time, and every call is counted (``internal_error_counts``). This function itself never
    raises.
    """
    try:
        now = time.monotonic()
        with _box.lock:
            site = where if where in _counts or len(_counts) < _MAX_KEYS else OTHER_SITE
            _counts[site] = _counts.get(site, 0) + 1
            last = _last_reported.get(where)
            if last is not None and now - last < _REPEAT_AFTER_S:
                return
            if len(_last_reported) >= _MAX_KEYS and where not in _last_reported:
                _last_reported.clear()
            _last_reported[where] = now
        _logger.warning(
            "otel_raptor internal error in %s; the call proceeds without it",
            where,
            exc_info=exc if exc is not None and last is None else None,
        )
    except Exception:  # noqa: BLE001 - the net under the net must not raise either
        pass


def internal_error_counts() -> dict[str, int]:
    """How many internal errors each site reported since the process started (a copy; at most
    256 sites, and ``OTHER_SITE`` for the rest). Read at collection time by the telemetry."""
    with _box.lock:
        return dict(_counts)


def _reset_for_tests() -> None:
    with _box.lock:
        _last_reported.clear()
        _counts.clear()
