"""otel_raptor: OpenTelemetry-native resilience for Python.

Classify every failure, retry what is safe to retry, break circuits to sick downstreams, and
publish every decision as an event that the telemetry layer turns into spans and metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otel_raptor._version import __version__
from otel_raptor.config.monitor import MonitorConfig
from otel_raptor.core.alerts import Alert
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.classify import ClassifyContext, Rule
from otel_raptor.core.events import (
    BreakerTransitioned,
    CallRejected,
    ErrorClassified,
    Event,
    FailurePredicted,
    MemoryCleanupFinished,
    MemoryPressureChanged,
    PreventionActionRun,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.insights import Insight, InsightKind
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.reports import MonitorReport
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import CircuitOpenError, ConfigError, RaptorError, ThrottledError
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.classifying import classify, register_rule
from otel_raptor.runtime.decorator import resilient
from otel_raptor.runtime.drive import FallbackDeclined
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.memory import SimpleMemoryController, get_memory_controller
from otel_raptor.runtime.monitor import (
    ErrorAnalytics,
    ErrorRecoveryMonitor,
    get_error_analytics,
    get_error_recovery_monitor,
)
from otel_raptor.runtime.predictor import PredictiveFailure, get_predictive_failure
from otel_raptor.runtime.recovery import (
    ErrorRecoveryEngine,
    RecoveryResult,
    ResilientClient,
    get_production_error_recovery,
    get_resilient_client,
)
from otel_raptor.runtime.state import Runtime, get_runtime

if TYPE_CHECKING:
    from otel_raptor.instrumentor import RaptorInstrumentor

__all__ = [
    "Alert",
    "BreakerTransitioned",
    "CallRejected",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "CircuitState",
    "Classification",
    "ClassifyContext",
    "ConfigError",
    "ErrorAnalytics",
    "ErrorCategory",
    "ErrorClassified",
    "ErrorRecoveryEngine",
    "ErrorRecoveryMonitor",
    "Event",
    "FailurePredicted",
    "FallbackDeclined",
    "Guard",
    "Insight",
    "InsightKind",
    "MemoryCleanupFinished",
    "MemoryPressureChanged",
    "MonitorConfig",
    "MonitorReport",
    "Outcome",
    "PredictiveFailure",
    "PreventionActionRun",
    "RaptorError",
    "RaptorInstrumentor",
    "RecoveryFinished",
    "RecoveryResult",
    "ResilientClient",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "RetryScheduled",
    "Rule",
    "Runtime",
    "Severity",
    "SimpleMemoryController",
    "Strategy",
    "ThrottledError",
    "__version__",
    "classify",
    "get_error_analytics",
    "get_error_recovery_monitor",
    "get_memory_controller",
    "get_predictive_failure",
    "get_production_error_recovery",
    "get_resilient_client",
    "get_runtime",
    "register_rule",
    "resilient",
]


def __getattr__(name: str) -> Any:
    # RaptorInstrumentor is imported on first use, so that `import otel_raptor` (for
    # @resilient, say) does not import opentelemetry-instrumentation and the telemetry layer.
    if name == "RaptorInstrumentor":
        from otel_raptor.instrumentor import RaptorInstrumentor  # noqa: PLC0415

        return RaptorInstrumentor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
