"""Exceptions raised by otel_raptor.

The tree::

    Exception
    ├── ValueError
    │   └── ConfigError              invalid configuration (key, value, allowed)
    └── RaptorError
        ├── CircuitOpenError          a breaker refused the call (fail fast)
        │   ├── RequestsCircuitOpen   also requests.exceptions.ConnectionError  (integrations)
        │   ├── HttpxCircuitOpen      also httpx.ConnectError                   (integrations)
        │   └── ...CircuitOpen        also the DB driver's OperationalError     (integrations)
        └── ThrottledError            the downstream's Retry-After cooldown is longer than
                                      the call may wait (HTTP integrations answer a 429)

Library-flavoured subclasses live next to their integration, so that existing ``except``
clauses written for the wrapped library keep catching a fail-fast refusal.

This module is a leaf: standard library only, importable from every layer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CircuitOpenError", "ConfigError", "RaptorError", "ThrottledError"]


class ConfigError(ValueError):
    """An invalid configuration value.

    ``key`` is the dotted option name (``breaker.failure_threshold``), ``value`` what was given
    and ``allowed`` a human description of the accepted range.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {key}={value!r}: expected {allowed}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.value, self.allowed))


class RaptorError(Exception):
    """Base class of the errors otel_raptor itself raises into a call path."""


class CircuitOpenError(RaptorError):
    """A circuit breaker refused the call without running it.

    ``breaker`` is the breaker's name and ``retry_after`` the seconds until it lets a probe
    through (``None`` when it was opened by hand and stays open until closed).

    The ``__init__`` is cooperative: integration subclasses also inherit from the wrapped
    library's exception and pass its own arguments (``request=...``) through ``**kwargs``.
    """

    def __init__(
        self,
        breaker: str = "",
        retry_after: float | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        message = f"circuit breaker {breaker!r} is open"
        if retry_after is not None:
            message += f"; next probe in {retry_after:.3g}s"
        super().__init__(message, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its own arguments (its ``args`` hold the message, which ``__init__``
        # would take for the breaker's name); the rest, a library's ``request`` or ``args``
        # included, comes back as state.
        return (type(self), (self.breaker, self.retry_after), _state(self))


class ThrottledError(RaptorError):
    """The downstream is cooling down (pervasive rate limiting: a ``Retry-After`` that became
    a pause for every call, see ``RetryPolicy.cooldown_share``), and the rest of the pause
    does not fit the call's ``max_retry_after`` (the larger of ``max_delay`` and 5 s when
    unset) or its deadline, so the call was refused without an attempt.

    ``service`` names the downstream and ``retry_after`` the seconds left of its pause. The
    HTTP integrations never raise it: they hand the caller a ``429`` response instead, as the
    server itself would have answered. ``__init__`` is cooperative, as ``CircuitOpenError``'s.
    """

    def __init__(
        self,
        service: str = "",
        retry_after: float | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.service = service
        self.retry_after = retry_after
        message = f"{service!r} asked for a pause"
        if retry_after is not None:
            message += f" of {retry_after:.3g}s more"
        super().__init__(message, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.retry_after), _state(self))


def _state(error: BaseException) -> dict[str, Any]:
    return {**vars(error), "args": error.args}
