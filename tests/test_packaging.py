from __future__ import annotations

import importlib.metadata
import importlib.resources
import re

import otel_raptor

REQUIRED = {
    "classify",
    "ErrorCategory",
    "Severity",
    "Classification",
    "register_rule",
    "RetryPolicy",
    "RetryBudget",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitState",
    "CircuitOpenError",
    "resilient",
    "Guard",
    "get_production_error_recovery",
    "RecoveryResult",
    "get_resilient_client",
}


def test_version_matches_the_installed_distribution() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", otel_raptor.__version__)
    assert importlib.metadata.version("otel-raptor") == otel_raptor.__version__


def test_public_names_are_exported_sorted_and_complete() -> None:
    exported = otel_raptor.__all__
    assert list(exported) == sorted(exported)
    assert set(exported) >= REQUIRED
    for name in exported:
        assert hasattr(otel_raptor, name), name


def test_package_is_typed() -> None:
    assert importlib.resources.files("otel_raptor").joinpath("py.typed").is_file()


def test_every_module_declares_all() -> None:
    import pkgutil

    for info in pkgutil.walk_packages(otel_raptor.__path__, "otel_raptor."):
        if info.ispkg or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), list), info.name
