"""What counts as a number, and as a duration, in raptor's settings.

One definition for every setting: ``True`` is a bug, not ``1``; an int too large for a float
(``10**400``) is as invalid as ``inf``, not an ``OverflowError``; and a duration must be one
that the clocks, sleeps and socket timeouts it ends up in can represent.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = [
    "MAX_SECONDS",
    "MAX_SECONDS_TEXT",
    "MAX_SERVICES",
    "SERVICE_CAP_TEXT",
    "as_finite",
    "as_seconds",
    "is_service_cap",
]

#: The longest duration any setting accepts: 10 million seconds (about 116 days). Far above any
#: sensible timeout, delay or age, and far below what a sleep, a lock wait or a socket timeout
#: overflows on (CPython's 64-bit nanosecond clock: about 9.2e9 s; ``1e10`` as a request
#: timeout made every call raise ``OverflowError``).
MAX_SECONDS: Final = 10_000_000.0
MAX_SECONDS_TEXT: Final = f"{MAX_SECONDS:.0f}"  # for error messages

#: The largest ``max_services`` accepted. The cap bounds memory and metric cardinality
#: (a breaker, a budget and their series per service); ``1e20`` would bound nothing.
MAX_SERVICES: Final = 100_000
SERVICE_CAP_TEXT: Final = f"an integer in [1, {MAX_SERVICES}]"


def is_service_cap(value: object) -> bool:
    """Whether ``value`` is an acceptable ``max_services``."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SERVICES


def as_finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (an ``int`` or a ``float``, not a
    ``bool``), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return number if math.isfinite(number) else None


def as_seconds(value: object, *, zero_ok: bool) -> float | None:
    """``value`` as a duration in seconds: finite, at most :data:`MAX_SECONDS`, and above 0
    (or at least 0 with ``zero_ok``); else ``None``."""
    seconds = as_finite(value)
    if seconds is None or seconds > MAX_SECONDS or seconds < 0.0:
        return None
    if seconds == 0.0 and not zero_ok:
        return None
    return seconds
