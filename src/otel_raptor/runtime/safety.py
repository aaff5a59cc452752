"""The safety net: our own bugs are logged, once and rate-limited, never raised into the app."""

from __future__ import annotations

import logging
import time

from otel_raptor.runtime.forksafe import LockBox

__all__ = ["report_internal_error"]

_logger = logging.getLogger("otel_raptor")

_REPEAT_AFTER_S = 300.0
_MAX_KEYS = 256  # bounded: the keys are call-site names, but never trust that

_box = LockBox()
_last_reported: dict[str, float] = {}


def report_internal_error(where: str, exc: BaseException | None = None) -> None:
    """Log that otel_raptor failed at ``where``; the caller then carries on without us.

    Each ``where`` is logged at most once every five minutes, with the traceback the first
    time. This function itself never raises.
    """
    try:
        now = time.monotonic()
        with _box.lock:
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


def _reset_for_tests() -> None:
    with _box.lock:
        _last_reported.clear()
