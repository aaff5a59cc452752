"""docs/telemetry.md is the contract: its tables must equal the registry in instruments.py."""

from __future__ import annotations

import pathlib
import re

import pytest

from otel_raptor.telemetry.instruments import (
    ATTRIBUTES,
    INSTRUMENTS,
    LOG_EVENTS,
    RECOVERY_DURATION_BUCKETS,
    SCHEMA_URL,
    SPAN_EVENTS,
    SPANS,
)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"no '## {heading}' section in {DOC.name}"
    return match.group(1)


def table(heading: str) -> list[list[str]]:
    """The first markdown table under ``## heading``: rows of stripped cells, no header."""
    lines = [
        line.strip() for line in _section(DOC.read_text(encoding="utf-8"), heading).splitlines()
    ]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert len(rows) >= 2, heading
    assert set("".join(rows[1])) <= set("-: "), f"{heading}: second row must be the rule"
    return rows[2:]


def code(cell: str) -> str:
    """``cell`` without its backticks; it must be exactly one code span."""
    assert re.fullmatch(r"`[^`]+`", cell), cell
    return cell[1:-1]


def codes(cell: str) -> tuple[str, ...]:
    """A comma-separated list of code spans."""
    if cell in ("", "—", "-"):
        return ()
    return tuple(code(part.strip()) for part in cell.split(","))


def test_metrics_table_equals_the_instruments() -> None:
    documented = [
        (code(name), kind, code(unit), codes(attributes), description)
        for name, kind, unit, attributes, description in table("Metrics")
    ]
    defined = [
        (spec.name, spec.kind.value, spec.unit, spec.attributes, spec.description)
        for spec in INSTRUMENTS
    ]
    assert documented == defined


def test_attributes_table_equals_the_attribute_registry() -> None:
    documented = [
        (code(key), type_, values, bound) for key, type_, values, bound in table("Attributes")
    ]
    defined = [(a.key, a.type.value, a.values, a.bound) for a in ATTRIBUTES]
    assert documented == defined


def test_spans_table_equals_the_span_registry() -> None:
    documented = [
        (code(name), kind, codes(attributes), description)
        for name, kind, attributes, description in table("Spans")
    ]
    assert documented == [(s.name, s.kind, s.attributes, s.description) for s in SPANS]


def test_span_events_table_equals_the_event_registry() -> None:
    documented = [
        (code(name), codes(attributes), description)
        for name, attributes, description in table("Span events")
    ]
    assert documented == [(e.name, e.attributes, e.description) for e in SPAN_EVENTS]


def test_log_events_table_equals_the_log_event_registry() -> None:
    documented = [
        (code(name), severity, codes(attributes), body, description)
        for name, severity, attributes, body, description in table("Log events")
    ]
    assert documented == [
        (e.name, e.severity, e.attributes, e.body, e.description) for e in LOG_EVENTS
    ]


def test_histogram_buckets_and_schema_url_are_documented() -> None:
    text = " ".join(DOC.read_text(encoding="utf-8").split())  # unwrap lines
    assert ", ".join(str(b) for b in RECOVERY_DURATION_BUCKETS) in text
    assert SCHEMA_URL in text


@pytest.mark.parametrize("heading", ["Metrics", "Attributes", "Spans", "Span events", "Log events"])
def test_the_parser_would_catch_a_difference(heading: str) -> None:
    # Guard against a parser that silently reads nothing.
    assert len(table(heading)) >= 1
