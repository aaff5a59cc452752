"""Low-cardinality metric attributes, built once and reused.

Recording a data point costs the SDK a lookup keyed by the attribute set; building a fresh
``dict`` for every record would add an allocation on top. ``AttributeCache`` hands back the same
(never mutated) mapping for the same values, and ``BoundedValues`` caps the distinct values of a
key whose values come from the outside (service and breaker names, ``error.type``), folding the
excess into one overflow value so that a misbehaving caller cannot create unbounded series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Final

from otel_raptor.errors import ConfigError
from otel_raptor.runtime.forksafe import register_lock
from otel_raptor.telemetry.instruments import (
    ATTR_BREAKER_FROM_STATE,
    ATTR_BREAKER_NAME,
    ATTR_BREAKER_STATE,
    ATTR_BREAKER_TO_STATE,
    ATTR_BREAKER_TRANSITION_REASON,
    ATTR_DB_RESPONSE_STATUS_CODE,
    ATTR_ERROR_CATEGORY,
    ATTR_ERROR_SEVERITY,
    ATTR_ERROR_TYPE,
    ATTR_RECOVERY_GIVE_UP_REASON,
    ATTR_RECOVERY_OUTCOME,
    ATTR_RECOVERY_STRATEGY,
    ATTR_SERVICE,
)

__all__ = [
    "AttributeCache",
    "BoundedValues",
    "DEFAULT_MAX_BREAKERS",
    "DEFAULT_MAX_CACHED_SETS",
    "DEFAULT_MAX_SERVICES",
    "MAX_DB_STATUS_CODES",
    "Description",
    "MAX_CATEGORIES",
    "MAX_ERROR_TYPES",
    "MAX_GIVE_UP_REASONS",
    "MetricAttributes",
    "OTHER",
    "OTHER_ERROR_TYPE",
]

#: The overflow value of service and breaker names, categories and give-up reasons; the same
#: name the runtime folds services into.
OTHER: Final = "other"
#: The overflow value of ``error.type``, as the semantic conventions define it.
OTHER_ERROR_TYPE: Final = "_OTHER"

DEFAULT_MAX_SERVICES: Final = 256
DEFAULT_MAX_BREAKERS: Final = 256
MAX_ERROR_TYPES: Final = 128
MAX_CATEGORIES: Final = 32
MAX_GIVE_UP_REASONS: Final = 32
MAX_DB_STATUS_CODES: Final = 64
#: Per instrument. Past it, attribute sets are still correct, only built on each record.
DEFAULT_MAX_CACHED_SETS: Final = 4096


def _check_limit(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, value, "an integer >= 1")
    return value


class BoundedValues:
    """Lets the first ``limit`` distinct values through unchanged; any later new value becomes
    ``overflow``. A value seen before keeps passing (one set lookup, no lock). ``overflow``
    itself passes too and takes none of the ``limit`` slots.

    ``limit`` is an integer >= 1; ``key`` names the setting in a ``ConfigError``.
    """

    __slots__ = ("__weakref__", "_limit", "_lock", "_overflow", "_seen")

    def __init__(self, limit: int, overflow: str, *, key: str = "telemetry.limit") -> None:
        self._limit = _check_limit(key, limit)
        self._overflow = overflow
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        register_lock(self, "_lock")

    @property
    def limit(self) -> int:
        return self._limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if value == self._overflow:
            # The runtime folds into the same name (its shared ``other`` breaker and service)
            # and keeps ``limit`` names of its own besides: were ``other`` to take a slot, the
            # last of those names would fold into it here, and its points would collide with
            # the real ``other``'s.
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return self._overflow
            self._seen.add(value)
            return value

    def __len__(self) -> int:
        return len(self._seen)


#: The semantic-convention attributes of a service (``Runtime.description``).
Description = Callable[[str], Mapping[str, str | int]]


class AttributeCache:
    """Attribute mappings by value tuple, for one fixed tuple of ``keys``.

    With ``describe``, the first value is a service name and the service's description
    (``server.address``, ``db.system.name``, ...) is added to its mappings.

    ``get(values)`` returns ``{keys[i]: values[i]}``, the same object for equal ``values``.
    The mappings are shared: treat them as read-only. At most ``max_entries`` (integer >= 1,
    default 4096) are kept; past that, ``get`` builds a new mapping each time. Unsynchronised
    on purpose: two threads missing at once build two equal mappings, and one is kept.
    """

    __slots__ = ("_cache", "_describe", "_keys", "_max")

    def __init__(
        self,
        keys: tuple[str, ...],
        *,
        max_entries: int = DEFAULT_MAX_CACHED_SETS,
        describe: Description | None = None,
    ) -> None:
        self._keys = keys
        self._max = _check_limit("telemetry.max_cached_attribute_sets", max_entries)
        self._describe = describe
        self._cache: dict[tuple[str, ...], Mapping[str, str | int]] = {}

    @property
    def keys(self) -> tuple[str, ...]:
        return self._keys

    def get(self, values: tuple[str, ...]) -> Mapping[str, str | int]:
        attributes = self._cache.get(values)
        if attributes is None:
            described = self._describe
            attributes = dict(zip(self._keys, values, strict=True))
            if described is not None:
                attributes = {**described(values[0]), **attributes}
            if len(self._cache) < self._max:
                self._cache[values] = attributes
        return attributes

    def __len__(self) -> int:
        return len(self._cache)


class MetricAttributes:
    """The attribute sets of every synchronous and observable instrument.

    Each method folds the outside-supplied values (service and breaker names at most
    ``max_services``/``max_breakers``, integers >= 1; ``error.type`` at most 128; categories
    and give-up reasons at most 32) and returns a cached mapping.
    """

    __slots__ = (
        "_breakers",
        "_budget_tokens",
        "_categories",
        "_db_status_codes",
        "_error_types",
        "_errors",
        "_errors_db",
        "_health",
        "_reasons",
        "_recoveries",
        "_recoveries_given_up",
        "_recovery_duration",
        "_rejections",
        "_retries",
        "_retry_budget_exhausted",
        "_services",
        "_state",
        "_transitions",
    )

    def __init__(
        self,
        *,
        max_services: int = DEFAULT_MAX_SERVICES,
        max_breakers: int = DEFAULT_MAX_BREAKERS,
        describe: Description | None = None,
    ) -> None:
        self._services = BoundedValues(max_services, OTHER, key="telemetry.max_services")
        self._breakers = BoundedValues(max_breakers, OTHER, key="telemetry.max_breakers")
        self._error_types = BoundedValues(MAX_ERROR_TYPES, OTHER_ERROR_TYPE)
        self._categories = BoundedValues(MAX_CATEGORIES, OTHER)
        self._reasons = BoundedValues(MAX_GIVE_UP_REASONS, OTHER)
        self._db_status_codes = BoundedValues(MAX_DB_STATUS_CODES, OTHER_ERROR_TYPE)
        self._errors = AttributeCache(
            (ATTR_SERVICE, ATTR_ERROR_CATEGORY, ATTR_ERROR_SEVERITY, ATTR_ERROR_TYPE),
            describe=describe,
        )
        self._errors_db = AttributeCache(
            (
                ATTR_SERVICE,
                ATTR_ERROR_CATEGORY,
                ATTR_ERROR_SEVERITY,
                ATTR_ERROR_TYPE,
                ATTR_DB_RESPONSE_STATUS_CODE,
            ),
            describe=describe,
        )
        self._retries = AttributeCache(
            (ATTR_SERVICE, ATTR_ERROR_CATEGORY, ATTR_RECOVERY_STRATEGY), describe=describe
        )
        self._recoveries = AttributeCache(
            (ATTR_SERVICE, ATTR_ERROR_CATEGORY, ATTR_RECOVERY_STRATEGY, ATTR_RECOVERY_OUTCOME),
            describe=describe,
        )
        self._recoveries_given_up = AttributeCache(
            (
                ATTR_SERVICE,
                ATTR_ERROR_CATEGORY,
                ATTR_RECOVERY_STRATEGY,
                ATTR_RECOVERY_OUTCOME,
                ATTR_RECOVERY_GIVE_UP_REASON,
            ),
            describe=describe,
        )
        self._recovery_duration = AttributeCache(
            (ATTR_SERVICE, ATTR_RECOVERY_STRATEGY, ATTR_RECOVERY_OUTCOME), describe=describe
        )
        self._retry_budget_exhausted = AttributeCache(
            (ATTR_SERVICE, ATTR_ERROR_CATEGORY), describe=describe
        )
        self._transitions = AttributeCache(
            (
                ATTR_BREAKER_NAME,
                ATTR_BREAKER_FROM_STATE,
                ATTR_BREAKER_TO_STATE,
                ATTR_BREAKER_TRANSITION_REASON,
            )
        )
        self._rejections = AttributeCache((ATTR_BREAKER_NAME, ATTR_BREAKER_STATE))
        self._state = AttributeCache((ATTR_BREAKER_NAME, ATTR_BREAKER_STATE))
        self._health = AttributeCache((ATTR_BREAKER_NAME,))
        self._budget_tokens = AttributeCache((ATTR_SERVICE,), describe=describe)

    # --- folding ------------------------------------------------------------------------

    def service(self, name: str) -> str:
        """``name``, or ``other`` once ``max_services`` distinct names have been seen."""
        return self._services(name)

    def breaker(self, name: str) -> str:
        """``name``, or ``other`` once ``max_breakers`` distinct names have been seen."""
        return self._breakers(name)

    def error_type(self, value: str) -> str:
        """``value``, or ``_OTHER`` once 128 distinct values have been seen."""
        return self._error_types(value)

    def category(self, value: str) -> str:
        """``value``, or ``other`` once 32 distinct values have been seen."""
        return self._categories(value)

    def give_up_reason(self, value: str) -> str:
        """``value``, or ``other`` once 32 distinct values have been seen."""
        return self._reasons(value)

    def db_status_code(self, value: str) -> str:
        """``value``, or ``_OTHER`` once 64 distinct values have been seen."""
        return self._db_status_codes(value)

    # --- attribute sets (arguments already folded where they come from outside) ----------

    def errors(
        self,
        service: str,
        category: str,
        severity: str,
        error_type: str,
        db_status_code: str | None = None,
    ) -> Mapping[str, str | int]:
        """``db_status_code`` (already folded) ``None`` leaves the key out."""
        if db_status_code is not None:
            return self._errors_db.get((service, category, severity, error_type, db_status_code))
        return self._errors.get((service, category, severity, error_type))

    def retries(self, service: str, category: str, strategy: str) -> Mapping[str, str | int]:
        return self._retries.get((service, category, strategy))

    def recoveries(
        self, service: str, category: str, strategy: str, outcome: str, give_up_reason: str
    ) -> Mapping[str, str | int]:
        """``give_up_reason`` ``""`` leaves the key out (a recovered call gave nothing up)."""
        if give_up_reason:
            return self._recoveries_given_up.get(
                (service, category, strategy, outcome, give_up_reason)
            )
        return self._recoveries.get((service, category, strategy, outcome))

    def recovery_duration(
        self, service: str, strategy: str, outcome: str
    ) -> Mapping[str, str | int]:
        return self._recovery_duration.get((service, strategy, outcome))

    def retry_budget_exhausted(self, service: str, category: str) -> Mapping[str, str | int]:
        return self._retry_budget_exhausted.get((service, category))

    def transitions(
        self, breaker: str, from_state: str, to_state: str, reason: str
    ) -> Mapping[str, str | int]:
        return self._transitions.get((breaker, from_state, to_state, reason))

    def rejections(self, breaker: str, state: str) -> Mapping[str, str | int]:
        return self._rejections.get((breaker, state))

    def breaker_state(self, breaker: str, state: str) -> Mapping[str, str | int]:
        return self._state.get((breaker, state))

    def breaker_only(self, breaker: str) -> Mapping[str, str | int]:
        """The health and failure-rate-threshold gauges' set."""
        return self._health.get((breaker,))

    def service_only(self, service: str) -> Mapping[str, str | int]:
        """The retry-budget-tokens gauge's set."""
        return self._budget_tokens.get((service,))
