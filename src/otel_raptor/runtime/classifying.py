"""The public classification functions: the core classifier, the system clock, a safety net.

``classify(exc)`` is :meth:`otel_raptor.core.classify.Classifier.classify` on
:data:`~otel_raptor.core.classify.DEFAULT_CLASSIFIER` with ``time.time()`` as the wall clock
(for HTTP-date ``Retry-After`` values). If the classifier itself fails (a bug of ours, or an
exception object hostile enough to break it), the failure is reported once through
:func:`~otel_raptor.runtime.safety.report_internal_error` and the verdict is ``unknown``: the
caller's own error handling always carries on. A bad ``context`` still raises ``ConfigError``,
because that is the caller's mistake and should be seen.

``register_rule`` serialises registrations behind a lock (classifying needs none).
"""

from __future__ import annotations

import time

from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.classify import (
    BASE_SEVERITY,
    DEFAULT_CLASSIFIER,
    ClassifyContext,
    ContextLike,
    Rule,
)
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.safety import report_internal_error

__all__ = ["classify", "register_rule"]

_register_box = LockBox()


def classify(exc: BaseException, *, context: ContextLike = None) -> Classification:
    """Classify ``exc`` (any ``BaseException``, cancellation included).

    ``context`` is a :class:`~otel_raptor.core.classify.ClassifyContext` or a mapping with its
    field names (``service``, ``critical``, ``breaker_open``, ``recent_occurrences``); it only
    raises the severity. See ``docs/classification.md`` for the categories and rules.
    """
    # A bad context is the caller's mistake: let its ConfigError through.
    ctx = None if context is None else ClassifyContext.coerce(context)
    try:
        return DEFAULT_CLASSIFIER.classify(exc, now_wall=time.time(), context=ctx)
    except Exception as error:  # noqa: BLE001 - classification must never break error handling
        report_internal_error("classify", error)
        return Classification(
            category=ErrorCategory.UNKNOWN,
            severity=BASE_SEVERITY[ErrorCategory.UNKNOWN].raised(
                ctx.severity_steps if ctx is not None else 0
            ),
            retryable=False,
            error_type=_error_type(exc),
            rule="",
        )


def register_rule(rule: Rule, *, first: bool = True) -> None:
    """Add a user rule to the default classifier (and empty its caches).

    ``first=True`` (default): it beats every built-in rule and earlier user rules.
    ``first=False``: it competes like a built-in of its specificity and loses ties to them.
    """
    with _register_box.lock:
        DEFAULT_CLASSIFIER.register_rule(rule, first=first)


def _error_type(exc: BaseException) -> str:
    try:
        cls = type(exc)
        if cls.__module__ == "builtins":
            return cls.__qualname__
        return f"{cls.__module__}.{cls.__qualname__}"
    except Exception:  # noqa: BLE001 - the fallback of the fallback
        return "unknown"
