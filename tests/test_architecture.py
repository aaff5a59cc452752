"""The layers point down, and the core stays pure (also enforced by import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "otel_raptor"
LAYERS = ["core", "runtime", "telemetry", "integrations"]
CORE_FORBIDDEN = {"opentelemetry", "wrapt", "psutil", "threading", "asyncio", "time"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((SRC / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_the_standard_library_and_itself(path: Path) -> None:
    for name in imports(path):
        top = name.split(".")[0]
        assert top not in CORE_FORBIDDEN, f"{path.name} imports {name}"
        if top == "otel_raptor":
            assert name.startswith(("otel_raptor.core", "otel_raptor.errors")), name


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    above = [*LAYERS[LAYERS.index(layer) + 1 :], "instrumentor"]
    for path in (SRC / layer).glob("*.py"):
        for name in imports(path):
            for upper in above:
                assert not name.startswith(f"otel_raptor.{upper}"), f"{path} imports {name}"


def test_only_telemetry_and_above_talk_to_opentelemetry() -> None:
    for layer in ("core", "runtime"):
        for path in (SRC / layer).glob("*.py"):
            assert not any(n.startswith("opentelemetry") for n in imports(path)), path
