"""The monitoring configs (``collector/``, ``grafana/``) against the telemetry contract.

* Every series and label that an alert rule or a dashboard query names is one that some
  instrument of ``INSTRUMENTS`` produces once the OpenTelemetry Collector's ``prometheus``
  exporter has translated it, and every label value compared with an enum is one of its values.
* ``promtool`` accepts the rules and the Prometheus config, and the rules' unit tests
  (``collector/rules/raptor-alerts.test.yml``) pass: the alerts are proven to fire, and their
  near misses proven not to.
* The collector config's pipelines name only components it defines; the Grafana dashboard
  and provisioning files have a sane structure; docs/monitoring.md's name table is right.

The OTel -> Prometheus name translation is written once, here (``collector_series``), after
the OpenTelemetry specification "Prometheus and OpenMetrics Compatibility" (section "OTLP
Metric points to Prometheus") and the collector's translator (``normalizeName`` in
prometheus/otlptranslator, used by the contrib ``prometheus`` exporter). PyYAML is not a
dependency: a small parser for the block-style YAML these files use is here too
(``load_yaml``); tests/e2e/test_prometheus.py checks it against Prometheus' own parser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from otel_raptor.config.monitor import MonitorConfig
from otel_raptor.core.classification import ErrorCategory, Severity
from otel_raptor.core.events import SKIP_REASONS
from otel_raptor.core.insights import InsightKind
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.recovery_stats import ResultKind
from otel_raptor.core.retry import GiveUpReason
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.runtime.monitor import (
    RULE_BREAKER_OPEN,
    RULE_ERROR_FREQUENCY,
    RULE_MEMORY_USAGE,
    RULE_RECOVERY_TIME,
    RULE_SUCCESS_RATE,
)
from otel_raptor.telemetry.instruments import (
    ATTR_ALERT_NAME,
    ATTR_ALERT_SEVERITY,
    ATTR_ALERT_STATE,
    ATTR_BREAKER_FROM_STATE,
    ATTR_BREAKER_STATE,
    ATTR_BREAKER_TO_STATE,
    ATTR_BREAKER_TRANSITION_REASON,
    ATTR_ERROR_CATEGORY,
    ATTR_ERROR_SEVERITY,
    ATTR_INSIGHT_KIND,
    ATTR_MEMORY_CLEANUP_LEVEL,
    ATTR_MEMORY_CLEANUP_TRIGGER,
    ATTR_MEMORY_PRESSURE_LEVEL,
    ATTR_PREDICTION_SEVERITY,
    ATTR_PREVENTION_OUTCOME,
    ATTR_PREVENTION_SKIP_REASON,
    ATTR_RECOVERY_GIVE_UP_REASON,
    ATTR_RECOVERY_OUTCOME,
    ATTR_RECOVERY_RESULT,
    ATTR_RECOVERY_STRATEGY,
    INSTRUMENTS,
    LOG_EVENTS,
    METRIC_BREAKER_HEALTH,
    METRIC_BREAKER_STATE,
    METRIC_ERRORS,
    METRIC_RECOVERIES,
    METRIC_RECOVERY_DURATION,
    METRIC_RETRY_BUDGET_TOKENS,
    InstrumentKind,
    InstrumentSpec,
)
from tests.support.services import services_required

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR_DIR = ROOT / "collector"
RULES = COLLECTOR_DIR / "rules" / "raptor-alerts.yml"
RULES_TEST = COLLECTOR_DIR / "rules" / "raptor-alerts.test.yml"
ANALYTICS_RULES = COLLECTOR_DIR / "rules" / "raptor-analytics.yml"
#: The analytics rules' unit tests: minute by minute, and (the slow burn) over days.
ANALYTICS_RULES_TESTS = (
    COLLECTOR_DIR / "rules" / "raptor-analytics.test.yml",
    COLLECTOR_DIR / "rules" / "raptor-analytics-slo.test.yml",
)
COMPOSE = COLLECTOR_DIR / "docker-compose.yml"
PROMETHEUS_CONFIG = COLLECTOR_DIR / "prometheus.yml"
COLLECTOR_CONFIG = COLLECTOR_DIR / "otel-collector.yaml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "otel-raptor.json"
PROVISIONING = ROOT / "grafana" / "provisioning"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

#: The scrape job of collector/prometheus.yml for applications that expose their metrics
#: with the Python Prometheus exporter (no collector in between).
DIRECT_JOB = "otel-raptor-direct"

# ----------------------------------------------------------------- name translation


#: UCUM unit -> Prometheus unit word (the collector's ``unitMap``, the cases that matter).
_UNIT_WORDS = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "m": "meters",
    "1": "",
    "%": "percent",
}
_PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}


def _unit_word(unit: str, words: dict[str, str]) -> str:
    unit = unit.strip()
    # `{packet}`: a "count of" annotation, unitless in Prometheus; dropped whole.
    if not unit or "{" in unit or "}" in unit:
        return ""
    return re.sub(r"[^a-zA-Z0-9]+", "_", words.get(unit, unit)).strip("_")


def prometheus_metric_name(spec: InstrumentSpec, *, ratio_suffix: bool = True) -> str:
    """The metric family name a Prometheus exporter writes for ``spec``.

    Tokens of ``[a-zA-Z0-9:]`` joined by ``_``; the unit as a word appended unless already a
    token (``s`` -> ``seconds``, ``{error}`` dropped, ``a/b`` -> ``a_per_b``); ``_total``
    last for a counter; ``_ratio`` last for a gauge of unit ``1``. ``ratio_suffix=False`` is
    the Python Prometheus exporter, which maps ``1`` to nothing.
    """
    tokens = [token for token in re.split(r"[^a-zA-Z0-9:]+", spec.name) if token]
    main, _, per = spec.unit.partition("/")
    main_word = _unit_word(main, _UNIT_WORDS)
    per_word = _unit_word(per, _PER_UNIT_WORDS)
    if main_word and main_word not in tokens:
        tokens.append(main_word)
    if per_word and per_word not in tokens:
        tokens += ["per", per_word]
    if spec.kind in (InstrumentKind.COUNTER, InstrumentKind.OBSERVABLE_COUNTER):
        tokens = [token for token in tokens if token != "total"] + ["total"]
    if ratio_suffix and spec.unit == "1" and spec.kind is InstrumentKind.OBSERVABLE_GAUGE:
        tokens = [token for token in tokens if token != "ratio"] + ["ratio"]
    name = "_".join(tokens)
    return "_" + name if name[:1].isdigit() else name


def prometheus_series(spec: InstrumentSpec, *, ratio_suffix: bool = True) -> tuple[str, ...]:
    """Every series name ``spec`` produces: a histogram's ``_bucket``/``_sum``/``_count``."""
    name = prometheus_metric_name(spec, ratio_suffix=ratio_suffix)
    if spec.kind is InstrumentKind.HISTOGRAM:
        return (f"{name}_bucket", f"{name}_sum", f"{name}_count")
    return (name,)


def prometheus_label(key: str) -> str:
    """An attribute key as a label name: invalid characters -> ``_``, runs of ``_`` -> one."""
    label = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_]", "_", key))
    return "key" + label if label[:1].isdigit() else label


#: Labels that every series carries besides its attributes: `job`/`instance` (from the
#: scrape or from service.name / service.instance.id) and the instrumentation scope.
STANDARD_LABELS = frozenset(
    {"job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}
)


@dataclass(frozen=True)
class KnownSeries:
    spec: InstrumentSpec | None
    labels: frozenset[str]


def known_series() -> dict[str, KnownSeries]:
    """Series name -> the instrument producing it and the labels it may carry."""
    known: dict[str, KnownSeries] = {}
    for spec in INSTRUMENTS:
        attributes = frozenset(prometheus_label(key) for key in spec.attributes)
        for series in prometheus_series(spec):
            extra = {"le"} if series.endswith("_bucket") else set()
            assert series not in known, f"two instruments produce {series}"
            known[series] = KnownSeries(spec, attributes | STANDARD_LABELS | extra)
    # Prometheus' own series of alert states, used by the dashboard.
    known["ALERTS"] = KnownSeries(None, frozenset({"alertname", "alertstate", "severity", "job"}))
    # The recording rules of raptor-analytics.yml: their series keep their grouping labels.
    for rule in load_yaml(ANALYTICS_RULES)["groups"][0]["rules"]:
        if "record" in rule:
            kept = read_promql(rule["expr"]).grouping - {"le"}
            if not kept:  # `1 - other:record`: the labels of the record it is made from
                kept = {"job", "raptor_service"}
            known[rule["record"]] = KnownSeries(None, frozenset(kept))
    return known


#: Label -> the values it can take (the enums behind the attributes).
ENUM_LABELS: dict[str, frozenset[str]] = {
    prometheus_label(ATTR_BREAKER_STATE): frozenset(s.value for s in CircuitState),
    prometheus_label(ATTR_BREAKER_FROM_STATE): frozenset(s.value for s in CircuitState),
    prometheus_label(ATTR_BREAKER_TO_STATE): frozenset(s.value for s in CircuitState),
    prometheus_label(ATTR_BREAKER_TRANSITION_REASON): frozenset(r.value for r in TransitionReason),
    prometheus_label(ATTR_RECOVERY_OUTCOME): frozenset(o.value for o in Outcome),
    prometheus_label(ATTR_RECOVERY_STRATEGY): frozenset(s.value for s in Strategy),
    prometheus_label(ATTR_ERROR_SEVERITY): frozenset(s.value for s in Severity),
    prometheus_label(ATTR_ERROR_CATEGORY): frozenset(c.value for c in ErrorCategory) | {"other"},
    prometheus_label(ATTR_RECOVERY_GIVE_UP_REASON): frozenset(r.value for r in GiveUpReason)
    | {"other"},
    # No enums behind these: the values of the attribute table (docs/telemetry.md).
    prometheus_label(ATTR_PREDICTION_SEVERITY): frozenset({"low", "medium", "high", "critical"}),
    prometheus_label(ATTR_PREVENTION_OUTCOME): frozenset({"ok", "failed", "skipped"}),
    prometheus_label(ATTR_PREVENTION_SKIP_REASON): SKIP_REASONS,
    prometheus_label(ATTR_MEMORY_PRESSURE_LEVEL): frozenset(
        {"normal", "warning", "critical", "emergency", "other"}
    ),
    prometheus_label(ATTR_MEMORY_CLEANUP_LEVEL): frozenset(
        {"standard", "critical", "emergency", "other"}
    ),
    prometheus_label(ATTR_MEMORY_CLEANUP_TRIGGER): frozenset(
        {"manual", "pressure", "prediction", "scheduled", "other"}
    ),
    "alertstate": frozenset({"pending", "firing"}),
    prometheus_label(ATTR_RECOVERY_RESULT): frozenset(kind.value for kind in ResultKind),
    prometheus_label(ATTR_ALERT_NAME): frozenset(
        {
            RULE_RECOVERY_TIME,
            RULE_SUCCESS_RATE,
            RULE_ERROR_FREQUENCY,
            RULE_MEMORY_USAGE,
            RULE_BREAKER_OPEN,
        }
    ),
    prometheus_label(ATTR_ALERT_SEVERITY): frozenset({"warning", "critical"}),
    prometheus_label(ATTR_ALERT_STATE): frozenset({"firing", "resolved"}),
    prometheus_label(ATTR_INSIGHT_KIND): frozenset(kind.value for kind in InsightKind),
}


def test_translation_gives_the_names_the_rules_and_dashboard_use() -> None:
    # Anchors for the function above, straight from the spec's examples and rules.
    assert prometheus_series(METRIC_ERRORS) == ("raptor_errors_total",)
    assert prometheus_series(METRIC_RECOVERIES) == ("raptor_recoveries_total",)
    assert prometheus_series(METRIC_RECOVERY_DURATION) == (
        "raptor_recovery_duration_seconds_bucket",
        "raptor_recovery_duration_seconds_sum",
        "raptor_recovery_duration_seconds_count",
    )
    assert prometheus_series(METRIC_BREAKER_STATE) == ("raptor_circuit_breaker_state_ratio",)
    assert prometheus_series(METRIC_BREAKER_HEALTH) == ("raptor_circuit_breaker_health_percent",)
    assert prometheus_series(METRIC_RETRY_BUDGET_TOKENS) == ("raptor_retry_budget_tokens",)
    assert prometheus_series(METRIC_BREAKER_STATE, ratio_suffix=False) == (
        "raptor_circuit_breaker_state",
    )
    assert prometheus_label("raptor.circuit_breaker.transition.reason") == (
        "raptor_circuit_breaker_transition_reason"
    )
    assert prometheus_label("error.type") == "error_type"
    spec = InstrumentSpec(
        name="http.server.request.duration_seconds",
        kind=InstrumentKind.HISTOGRAM,
        unit="s",
        attributes=(),
        description="",
    )
    assert prometheus_metric_name(spec) == "http_server_request_duration_seconds"
    spec = InstrumentSpec(
        name="net.io", kind=InstrumentKind.COUNTER, unit="By/s", attributes=(), description=""
    )
    assert prometheus_metric_name(spec) == "net_io_bytes_per_second_total"


# ----------------------------------------------------------------- a small YAML reader

_KEY = re.compile(
    r"""^(?:"[^"]*"|'[^']*'|[^\s"'\[{#&*!|>%@`-][^:#]*?|-[^\s:#][^:#]*?)\s*:(?:\s|$)"""
)
_BLOCK_SCALAR = re.compile(r"^[|>][-+]?$")
_INT = re.compile(r"^[-+]?\d+$")
_FLOAT = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$")


def _strip_comment(line: str) -> str:
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index]
    return line


def _split_flow(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)  # the escapes these files use are JSON's
    if text.startswith("'"):
        assert text.endswith("'"), text
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        assert text.endswith("]"), text
        return [_scalar(part) for part in _split_flow(text[1:-1])]
    if text.startswith("{"):
        assert text.endswith("}"), text
        pairs = (part.split(":", 1) for part in _split_flow(text[1:-1]))
        return {_scalar(key): _scalar(value) for key, value in pairs}
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


class _YamlReader:
    """Block mappings and sequences, plain/quoted/flow scalars, ``|`` and ``>`` blocks."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()
        self._pos = 0

    def _peek(self) -> tuple[int, str] | None:
        while self._pos < len(self._lines):
            content = _strip_comment(self._lines[self._pos]).rstrip()
            if content.strip() in ("", "---"):
                self._pos += 1
                continue
            assert "\t" not in content[: len(content) - len(content.lstrip())], "tab indent"
            return len(content) - len(content.lstrip(" ")), content.strip()
        return None

    @staticmethod
    def _is_item(text: str) -> bool:
        return text == "-" or text.startswith("- ")

    def document(self) -> Any:
        first = self._peek()
        if first is None:
            return None
        value = self._block(first[0])
        rest = self._peek()
        assert rest is None, f"unparsed YAML from line {self._pos + 1}: {rest}"
        return value

    def _block(self, indent: int) -> Any:
        line = self._peek()
        assert line is not None
        return self._sequence(indent) if self._is_item(line[1]) else self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (line := self._peek()) is not None and line[0] == indent and self._is_item(line[1]):
            rest = line[1][1:].strip()
            if not rest:
                self._pos += 1
                nested = self._peek()
                items.append(self._block(nested[0]) if nested and nested[0] > indent else None)
            elif _KEY.match(rest):
                # `- key: value` opens a mapping indented like `key`: read it as such.
                raw = self._lines[self._pos]
                dash = raw.index("-")
                self._lines[self._pos] = raw[:dash] + " " + raw[dash + 1 :]
                items.append(self._mapping(indent + 1 + (len(line[1]) - 1 - len(rest))))
            else:
                self._pos += 1
                items.append(self._value(rest, indent))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while (line := self._peek()) is not None and line[0] == indent:
            if self._is_item(line[1]):
                break
            match = _KEY.match(line[1])
            assert match, f"not a mapping key at line {self._pos + 1}: {line[1]!r}"
            key = _scalar(match.group(0).rstrip()[:-1])
            assert key not in mapping, f"duplicate key {key!r} at line {self._pos + 1}"
            self._pos += 1
            mapping[str(key)] = self._value(line[1][match.end() :].strip(), indent)
        line = self._peek()
        assert line is None or line[0] < indent or (line[0] == indent and self._is_item(line[1])), (
            f"bad indentation at line {self._pos + 1}: {line}"
        )
        return mapping

    def _value(self, rest: str, indent: int) -> Any:
        if _BLOCK_SCALAR.match(rest):
            return self._block_scalar(rest, indent)
        if rest:
            return _scalar(rest)
        nested = self._peek()
        if nested is None:
            return None
        if nested[0] > indent:
            return self._block(nested[0])
        if nested[0] == indent and self._is_item(nested[1]):
            return self._sequence(indent)
        return None

    def _block_scalar(self, style: str, indent: int) -> str:
        lines: list[str] = []
        block_indent: int | None = None
        while self._pos < len(self._lines):
            raw = self._lines[self._pos]
            if not raw.strip():
                lines.append("")
                self._pos += 1
                continue
            own = len(raw) - len(raw.lstrip(" "))
            if own <= indent or (block_indent is not None and own < block_indent):
                break
            block_indent = own if block_indent is None else block_indent
            lines.append(raw[block_indent:])
            self._pos += 1
        while lines and not lines[-1]:
            lines.pop()
        text = "\n".join(lines) if style[0] == "|" else _fold(lines)
        return text if style.endswith("-") else text + "\n"


def _fold(lines: list[str]) -> str:
    """``>`` folding: lines joined by spaces, an empty line kept as a line break."""
    text = ""
    for line in lines:
        if not line:
            text += "\n"
        elif text and not text.endswith("\n"):
            text += " " + line
        else:
            text += line
    return text


def load_yaml(path: Path) -> Any:
    """The document in ``path``, for the block-style YAML subset these configs use."""
    return _YamlReader(path.read_text(encoding="utf-8")).document()


def test_the_yaml_reader_reads_what_the_configs_use(tmp_path: Path) -> None:
    source = tmp_path / "sample.yml"
    source.write_text(
        "# comment\n"
        "a: 1\n"
        "b: 'it''s' # trailing comment\n"
        'c: "x: y # not a comment"\n'
        "d:\n"
        "  - plain\n"
        "  - key: v\n"
        "    other: [x, 'y', 2]\n"
        "  -\n"
        "    nested: true\n"
        "e: |\n"
        "  line one\n"
        "    indented\n"
        "f: >-\n"
        "  folded\n"
        "  text\n"
        "g:\n"
        "- same-indent item\n"
        "h: {}\n"
        "i: null\n"
        "j: 0.5\n",
        encoding="utf-8",
    )
    assert load_yaml(source) == {
        "a": 1,
        "b": "it's",
        "c": "x: y # not a comment",
        "d": ["plain", {"key": "v", "other": ["x", "y", 2]}, {"nested": True}],
        "e": "line one\n  indented\n",
        "f": "folded text",
        "g": ["same-indent item"],
        "h": {},
        "i": None,
        "j": 0.5,
    }


# ----------------------------------------------------------------- a small PromQL reader

_PROMQL_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<variable>\$\{?\w+\}?)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>@])
    """,
    re.VERBOSE,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | {"offset", "bool", "and", "or", "unless", "atan2", "Inf", "NaN"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    name: str | None
    matchers: tuple[Matcher, ...]


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)


def _unquote(token: str) -> str:
    if token.startswith('"'):
        return str(json.loads(token))
    return token[1:-1]


def read_promql(expr: str) -> Query:
    """The series selectors, grouping labels and ``$variables`` of a PromQL expression (or of a
    Grafana ``label_values(selector, label)`` variable query)."""
    query = Query()
    template = _LABEL_VALUES.match(expr)
    if template:
        query.grouping.add(template.group("label"))
        expr = template.group("selector") or ""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _PROMQL_TOKEN.match(expr, pos)
        assert match, f"cannot read PromQL at {expr[pos:]!r}"
        pos = match.end()
        kind = match.lastgroup or ""
        if kind == "space":
            continue
        if kind in ("range", "string"):
            query.variables.update(re.findall(r"\$\{?(\w+)\}?", match.group()))
        if kind == "variable":
            query.variables.add(match.group().strip("${}"))
        tokens.append((kind, match.group()))

    def text(index: int) -> str:
        return tokens[index][1] if index < len(tokens) else ""

    index = 0
    while index < len(tokens):
        kind, token = tokens[index]
        if kind == "ident" and token in _GROUPING:
            index += 1
            if text(index) == "(":
                index += 1
                while text(index) != ")":
                    if tokens[index][0] == "ident":
                        query.grouping.add(tokens[index][1])
                    index += 1
            continue
        if kind == "ident" and token not in _KEYWORDS and text(index + 1) != "(":
            if text(index + 1) in ("by", "without"):  # `sum by (...) (...)`
                index += 1
                continue
            name: str | None = token
            index += 1
        elif token == "{":
            name = None
        else:
            index += 1
            continue
        matchers: list[Matcher] = []
        if text(index) == "{":
            index += 1
            while text(index) != "}":
                if text(index) == ",":
                    index += 1
                    continue
                label, op, value = text(index), text(index + 1), text(index + 2)
                assert tokens[index + 2][0] == "string", f"bad matcher in {expr!r}"
                matchers.append(Matcher(label, op, _unquote(value)))
                index += 3
            index += 1
        query.selectors.append(Selector(name, tuple(matchers)))
    return query


def test_the_promql_reader_finds_selectors_labels_and_variables() -> None:
    query = read_promql(
        'sum by (job, a_b) (rate(x_total{a_b=~"p|q", c!="", job=~"$job"}[$__rate_interval]))'
        " / on (job) group_left max(y_ratio offset 5m) > 0.05 and z == bool 1"
    )
    matchers = (Matcher("a_b", "=~", "p|q"), Matcher("c", "!=", ""), Matcher("job", "=~", "$job"))
    assert query.selectors == [
        Selector("x_total", matchers),
        Selector("y_ratio", ()),
        Selector("z", ()),
    ]
    assert query.grouping == {"job", "a_b"}
    assert query.variables == {"job", "__rate_interval"}
    template = read_promql('label_values(m{job=~"$job"}, some_label)')
    assert template.selectors == [Selector("m", (Matcher("job", "=~", "$job"),))]
    assert template.grouping == {"some_label"}


# ----------------------------------------------------------------- the files

ALERT_SEVERITIES = frozenset({"critical", "warning", "info"})


def alert_rules() -> list[dict[str, Any]]:
    document = load_yaml(RULES)
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    # The reader must not have skipped any: count the `- alert:` lines independently.
    text = RULES.read_text(encoding="utf-8")
    assert len(rules) == len(re.findall(r"^\s*- alert:", text, re.MULTILINE))
    return rules


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every PromQL target and every query variable (the logs panels'
    LogQL is checked by ``test_logs_panels_read_the_monitor_log_events``)."""
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels(board)
        for target in panel.get("targets", [])
        if target["datasource"]["type"] == "prometheus"
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable ${variable['name']}", query["query"]))
    return queries


def check_query(where: str, expr: str) -> set[InstrumentSpec]:
    """Assert ``expr`` names only series and labels of ``INSTRUMENTS``; return the instruments
    it reads."""
    known = known_series()
    query = read_promql(expr)
    assert query.selectors, f"{where}: no series in {expr!r}"
    used: set[InstrumentSpec] = set()
    allowed: set[str] = set()
    for selector in query.selectors:
        assert selector.name is not None, f"{where}: a selector without a metric name"
        series = known.get(selector.name)
        assert series is not None, (
            f"{where}: {selector.name} is not produced by any instrument of INSTRUMENTS"
            f" (known: {sorted(known)})"
        )
        if series.spec is not None:
            used.add(series.spec)
        allowed |= series.labels
        for matcher in selector.matchers:
            assert matcher.label in series.labels, (
                f"{where}: {selector.name} has no label {matcher.label}"
                f" (it has {sorted(series.labels)})"
            )
            values = ENUM_LABELS.get(matcher.label)
            if values is None or "$" in matcher.value:
                continue
            if matcher.op in ("=", "!="):
                wanted = {matcher.value} - ({""} if matcher.op == "!=" else set())
            else:
                assert re.fullmatch(r"[a-z_|]+", matcher.value), (
                    f"{where}: write {matcher.label}=~{matcher.value!r} as a list of values"
                )
                wanted = set(matcher.value.split("|"))
            assert wanted <= values, (
                f"{where}: {matcher.label} never takes {sorted(wanted - values)}"
                f" (values: {sorted(values)})"
            )
    assert query.grouping <= allowed, (
        f"{where}: grouping by {sorted(query.grouping - allowed)}, which no series here has"
    )
    return used


def test_alert_rules_name_only_series_and_labels_the_instruments_produce() -> None:
    used: set[InstrumentSpec] = set()
    for rule in alert_rules():
        used |= check_query(f"alert {rule['alert']}", rule["expr"])
    names = {spec.name for spec in used}
    assert {
        "raptor.errors",
        "raptor.recoveries",
        "raptor.retry_budget.exhausted",
        "raptor.circuit_breaker.transitions",
        "raptor.circuit_breaker.state",
        "raptor.circuit_breaker.health",
        "raptor.prediction.probability",
        "raptor.memory.pressure.level",
    } <= names


def test_alert_rules_are_complete_and_their_templates_use_labels_they_keep() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) == {
        "RaptorCircuitBreakerOpen",
        "RaptorCircuitBreakerFlapping",
        "RaptorRecoveryFailureRatioHigh",
        "RaptorRetryBudgetExhausted",
        "RaptorErrorRateSpike",
        "RaptorCircuitBreakerHealthLow",
        "RaptorFailurePredicted",
        "RaptorMemoryPressureCritical",
        "RaptorInternalError",
    }
    for rule in rules:
        where = f"alert {rule['alert']}"
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, where
        assert rule["labels"]["severity"] in ALERT_SEVERITIES, where
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, where
        assert all(isinstance(v, str) and len(v) > 20 for v in annotations.values()), where
        assert re.fullmatch(r"(\d+[smh])+", str(rule.get("for", "0s"))), where
        # An aggregation keeps only its `by` labels: a template naming another one would
        # render empty.
        kept = read_promql(rule["expr"]).grouping
        for text in annotations.values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{where}: annotation uses {label}, not kept by the expr"
    for_of = {rule["alert"]: rule.get("for") for rule in rules}
    assert for_of["RaptorCircuitBreakerOpen"] == "1m"


def test_dashboard_queries_name_only_series_and_labels_the_instruments_produce() -> None:
    used: set[InstrumentSpec] = set()
    for where, expr in dashboard_queries(dashboard()):
        used |= check_query(where, expr)
    missing = {spec.name for spec in INSTRUMENTS} - {spec.name for spec in used}
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "otel-raptor"
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["loki"]["type"] == "datasource"
    assert variables["loki"]["query"] == "loki"
    builtins = {"__rate_interval", "__range", "__interval"}
    ids = []
    occupied: set[tuple[int, int]] = set()
    titles = set()
    for panel in dashboard_panels(board):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["w"] >= 1, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        if panel["type"] == "logs":  # the monitor's OTLP log events, in Loki
            assert panel["datasource"] == {"type": "loki", "uid": "${loki}"}, panel["title"]
            assert all(t["datasource"] == panel["datasource"] for t in targets), panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            unknown = read_promql(target["expr"]).variables - set(variables) - builtins
            assert not unknown, f"{panel['title']}: undefined variables {unknown}"
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # What the dashboard is for: each of these has a panel.
    assert {
        "Breaker state",
        "Health score",
        "Errors by category",
        "Errors by severity",
        "Retries by category",
        "Recoveries by outcome",
        "Recovery duration",
        "Retry budget tokens",
        "Rejections",
        "Recovery success vs SLO",
        "Error-budget burn rate",
        "Effectiveness by strategy",
        "Active alerts",
        "Insights",
        "Reports (top error patterns)",
    } <= titles
    timeline = next(p for p in dashboard_panels(board) if p["title"] == "Breaker state")
    assert timeline["type"] == "state-timeline"
    durations = next(p for p in dashboard_panels(board) if p["title"] == "Recovery duration")
    exprs = " ".join(target["expr"] for target in durations["targets"])
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs


def test_grafana_provisioning() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].endswith(":9090")
    providers = load_yaml(PROVISIONING / "dashboards" / "otel-raptor.yml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_prometheus_config_scrapes_the_collector_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), rule_file
    assert "rules/raptor-alerts.yml" in config["rule_files"]
    assert "rules/raptor-analytics.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    collector = jobs["otel-collector"]
    assert collector["honor_labels"] is True  # keep the job/instance the collector sets
    exporter_endpoint = load_yaml(COLLECTOR_CONFIG)["exporters"]["prometheus"]["endpoint"]
    port = exporter_endpoint.rsplit(":", 1)[1]
    targets = [t for group in collector["static_configs"] for t in group["targets"]]
    assert targets == [f"localhost:{port}"]


def direct_relabel_configs() -> list[dict[str, Any]]:
    """The metric_relabel_configs of the direct-scrape job of collector/prometheus.yml."""
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    configs: list[dict[str, Any]] = jobs[DIRECT_JOB]["metric_relabel_configs"]
    return configs


def relabel(name: str, configs: list[dict[str, Any]]) -> str:
    """``name`` after ``replace`` relabelling of ``__name__`` (Prometheus' default action)."""
    for config in configs:
        assert config.get("action", "replace") == "replace"
        assert config["source_labels"] == ["__name__"]
        assert config["target_label"] == "__name__"
        match = re.fullmatch(config["regex"], name)  # Prometheus anchors the regex too
        if match:
            name = _expand(config["replacement"], match)
    return name


def _expand(replacement: str, match: re.Match[str]) -> str:
    """``$1`` / ``${1}`` in a relabel replacement, as Prometheus expands them."""
    groups = (match.group(0), *match.groups(default=""))
    return re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda ref: groups[int(ref[1] or ref[2])], replacement)


def test_direct_scrape_relabelling_gives_the_collector_names() -> None:
    # The Python Prometheus exporter writes gauges of unit "1" without `_ratio`; the direct
    # job's relabelling must turn every one of its names into the collector's, and no other.
    configs = direct_relabel_configs()
    for spec in INSTRUMENTS:
        python_names = prometheus_series(spec, ratio_suffix=False)
        assert tuple(relabel(name, configs) for name in python_names) == prometheus_series(spec)


def test_monitoring_doc_lists_every_instrument_with_its_prometheus_names_and_labels() -> None:
    rows = {}
    for line in MONITORING_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].startswith("`raptor."):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {spec.name for spec in INSTRUMENTS}
    for spec in INSTRUMENTS:
        cells = rows[spec.name]
        assert tuple(re.findall(r"`([a-z_]+)`", cells[3])) == prometheus_series(spec), spec.name
        # Every label the series carry (the dashboards' database panels group by server_address
        # and db_system_name), in the order the instrument declares them.
        labels = re.findall(r"`([a-z_]+)`", cells[5].split("(+")[0])
        assert labels == [prometheus_label(key) for key in spec.attributes], spec.name


def test_monitoring_doc_lists_every_alert_rule_with_its_severities() -> None:
    # docs/monitoring.md's alert tables are what an on-call reader looks a page up in: every
    # alert of both rule files, with the severities its rules carry, and no alert that
    # neither file has. A cell reads `warning`, `critical (page)` or `warning / critical`.
    documented: dict[str, set[str]] = {}
    text = MONITORING_DOC.read_text(encoding="utf-8")
    for line in _section_of(text, "## Alerts").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`Raptor\w+`", cells[0]):
            name = cells[0].strip("`")
            assert name not in documented, f"{name} has two rows in {MONITORING_DOC.name}"
            documented[name] = {part.split()[0] for part in cells[1].split("/")}
    defined: dict[str, set[str]] = {}
    for rule in alert_rules() + [rule for rule in analytics_rules() if "alert" in rule]:
        defined.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    assert documented == defined


def test_monitoring_doc_describes_every_row_of_the_dashboard() -> None:
    # The doc's "Dashboard" section has one bullet per row, led by the row's title in bold.
    section = _section_of(MONITORING_DOC.read_text(encoding="utf-8"), "## Dashboard")
    described = re.findall(r"^\* \*\*(.+?)\*\*", section, re.MULTILINE)
    rows = [panel["title"] for panel in dashboard_panels(dashboard()) if panel["type"] == "row"]
    assert described == rows


def _section_of(text: str, heading: str) -> str:
    """``text`` from the line ``heading`` to the next heading of the same level."""
    level = heading.split(maxsplit=1)[0]
    match = re.search(
        rf"^{re.escape(heading)}\n(.*?)(?=^{re.escape(level)} |\Z)", text, re.MULTILINE | re.S
    )
    assert match is not None, heading
    return match.group(1)


#: The prose a user reads for series names: the docs, the READMEs, and the alert rules (whose
#: annotations name the series to look at next).
PROSE = (
    ROOT / "README.md",
    COLLECTOR_DIR / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    RULES,
    ANALYTICS_RULES,
)


def test_promql_in_the_docs_names_only_series_and_labels_the_instruments_produce() -> None:
    blocks = [
        (path, block)
        for path in PROSE
        if path.suffix == ".md"
        for block in re.findall(r"```promql\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    ]
    assert blocks, "docs/telemetry.md has example alert rules"
    for path, block in blocks:
        # One expression per statement; comments and line breaks inside one are allowed.
        text = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
        for expr in re.split(r"\n(?=\S)", text.strip()):
            check_query(f"{path.relative_to(ROOT)}", expr)


def test_series_named_in_the_docs_and_annotations_exist() -> None:
    # A series named in prose (`raptor_memory_freed_bytes_total`, "look at
    # raptor_resource_utilization_ratio") must be one a query could select, under the exact
    # exported name: check_query only sees the expressions.
    known = known_series()
    python_names = {
        name for spec in INSTRUMENTS for name in prometheus_series(spec, ratio_suffix=False)
    }
    families = {prometheus_metric_name(spec) for spec in INSTRUMENTS}  # a histogram's too
    labels = {prometheus_label(key) for spec in INSTRUMENTS for key in spec.attributes}
    labels |= {loki_name(key) for spec in LOG_EVENTS for key in spec.attributes}  # Loki's
    # Recording rules are named `level:metric:operations`; a name's parts are not series.
    token = re.compile(r"(?<![\w:.])raptor_[a-z0-9_]+(?![\w:])")
    for path in PROSE:
        text = path.read_text(encoding="utf-8")
        for match in token.finditer(text):
            name = match.group()
            line = text.count("\n", 0, match.start()) + 1
            assert name in {*known, *python_names, *families, *labels}, (
                f"{path.relative_to(ROOT)}:{line}: {name} is neither a series nor a label"
            )


def test_dashboard_legends_use_labels_their_query_keeps() -> None:
    # `{{label}}` in a legend renders empty when the aggregation dropped that label.
    known = known_series()
    for panel in dashboard_panels(dashboard()):
        for target in panel.get("targets", []):
            if target["datasource"]["type"] != "prometheus":
                continue
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            query = read_promql(target["expr"])
            if re.search(r"\b(?:sum|max|min|avg|count|topk|bottomk)\b", target["expr"]):
                kept = query.grouping
            else:  # a plain selector (of a recording rule) keeps its series' labels
                kept = set().union(*(known[s.name].labels for s in query.selectors if s.name))
            assert used <= kept, (
                f"panel {panel['title']!r} {target['refId']}: legend uses {sorted(used - kept)},"
                f" which {target['expr']!r} does not keep"
            )


def test_dashboard_gauges_of_one_process_are_not_summed_and_durations_skip_refusals() -> None:
    # Every process has its own retry budget: a sum of tokens across instances hid the one
    # that ran dry. A call the open breaker refused at once takes no time: its zero duration
    # pulled the recovery-duration quantiles and mean towards zero during an outage.
    for panel in dashboard_panels(dashboard()):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if "raptor_retry_budget_tokens" in expr:
                assert not re.search(r"\bsum\b", expr), (panel["title"], expr)
                assert "job" in read_promql(expr).grouping, (panel["title"], expr)
            if "raptor_recovery_duration_seconds" in expr:
                for selector in re.findall(r"raptor_recovery_duration_seconds_\w+\{[^}]*\}", expr):
                    assert 'raptor_recovery_outcome!="rejected"' in selector, (panel["title"], expr)


# ----------------------------------------------------------------- promtool


def require_tool(name: str) -> str:
    """The path of ``name``; skip without it (fail under RAPTOR_REQUIRE_SERVICES=1)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if services_required():
            pytest.fail(f"{message} and RAPTOR_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(message)
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_accepts_the_prometheus_config() -> None:
    result = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_prove_the_alerts_fire() -> None:
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert is exercised by the unit tests, firing at least once.
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text(encoding="utf-8")))
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_promtool_unit_tests_fail_when_a_rule_is_broken(tmp_path: Path) -> None:
    # The unit tests can fail: with the breaker-open alert firing at once, they must.
    broken = RULES.read_text(encoding="utf-8").replace("for: 1m", "for: 0s", 1)
    assert broken != RULES.read_text(encoding="utf-8")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / RULES.name).write_text(broken, encoding="utf-8")
    (rules_dir / RULES_TEST.name).write_text(RULES_TEST.read_text(encoding="utf-8"))
    result = _promtool("test", "rules", str(rules_dir / RULES_TEST.name))
    assert result.returncode != 0
    assert "RaptorCircuitBreakerOpen" in result.stdout + result.stderr


# ----------------------------------------------------------------- the collector


def test_collector_config_wires_otlp_to_prometheus_and_debug() -> None:
    config = load_yaml(COLLECTOR_CONFIG)
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "localhost:4317"
    assert protocols["http"]["endpoint"] == "localhost:4318"
    assert {"memory_limiter", "batch"} <= set(config["processors"])
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["endpoint"].endswith(":8889")
    # The names in the rules rely on the default translation.
    assert "namespace" not in prometheus
    assert prometheus.get("add_metric_suffixes", True) is True
    assert "translation_strategy" not in prometheus
    assert "resource_to_telemetry_conversion" in prometheus
    assert "debug" in config["exporters"]
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], extension
    pipelines = service["pipelines"]
    assert set(pipelines) == {"metrics", "traces", "logs"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in config[kind], f"{name} pipeline: {component} undefined"
        # The limiter first, so that it refuses data before anything else buffers it.
        assert pipeline["processors"][0] == "memory_limiter", name
        assert pipeline["receivers"] == ["otlp"], name
    assert set(pipelines["metrics"]["exporters"]) == {"prometheus", "debug"}
    assert pipelines["traces"]["exporters"] == ["debug"]
    # The monitor's log events have a pipeline of their own.
    assert pipelines["logs"]["exporters"] == ["debug"]
    # The tracing and logs backends are offered, commented out.
    text = COLLECTOR_CONFIG.read_text()
    assert re.search(r"^\s*#\s*otlp/\w+:", text, re.MULTILINE)
    assert re.search(r"^\s*#\s*otlphttp/logs:", text, re.MULTILINE)


# ----------------------------------------------------------------- the analytics rules


def analytics_rules() -> list[dict[str, Any]]:
    document = load_yaml(ANALYTICS_RULES)
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    text = ANALYTICS_RULES.read_text(encoding="utf-8")
    assert len(rules) == len(re.findall(r"^\s*- (?:alert|record):", text, re.MULTILINE))
    return rules


def test_analytics_rules_name_only_series_and_labels_the_instruments_produce() -> None:
    used: set[InstrumentSpec] = set()
    for rule in analytics_rules():
        used |= check_query(f"rule {rule.get('alert') or rule['record']}", rule["expr"])
    assert {spec.name for spec in used} >= {
        "raptor.recoveries",
        "raptor.recovery.duration",
        "raptor.errors",
        "raptor.memory.pressure",
    }


def test_analytics_alerts_are_complete_and_their_templates_use_labels_they_keep() -> None:
    alerts = [rule for rule in analytics_rules() if "alert" in rule]
    identities = [(rule["alert"], rule["labels"]["severity"]) for rule in alerts]
    assert len(identities) == len(set(identities))
    assert set(identities) == {
        ("RaptorRecoveryBudgetBurnFast", "critical"),
        ("RaptorRecoveryBudgetBurnSlow", "warning"),
        (RULE_RECOVERY_TIME, "warning"),
        (RULE_RECOVERY_TIME, "critical"),
        (RULE_SUCCESS_RATE, "warning"),
        (RULE_SUCCESS_RATE, "critical"),
        (RULE_ERROR_FREQUENCY, "warning"),
        (RULE_MEMORY_USAGE, "warning"),
    }
    records = [rule["record"] for rule in analytics_rules() if "record" in rule]
    for record in records:
        assert re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", record), record  # level:metric:ops
    for rule in alerts:
        where = f"alert {rule['alert']} ({rule['labels']['severity']})"
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, where
        assert set(rule["annotations"]) == {"summary", "description"}, where
        kept = read_promql(rule["expr"]).grouping | {"job", "raptor_service"}
        if rule["alert"] == RULE_MEMORY_USAGE:
            kept = read_promql(rule["expr"]).grouping
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{where}: annotation uses {label}, not kept by the expr"


def _threshold(expr: str, series: str) -> float:
    match = re.search(rf"{re.escape(series)}\s*[<>]\s*([0-9.]+)", expr)
    assert match, (series, expr)
    return float(match.group(1))


def test_the_server_side_thresholds_are_the_in_process_ones() -> None:
    # Same numbers, same windows, same minimum volume, same `for` as MonitorConfig's defaults.
    config = MonitorConfig()
    by_identity = {
        (rule["alert"], rule["labels"]["severity"]): rule
        for rule in analytics_rules()
        if "alert" in rule
    }
    p95 = "job_raptor_service:raptor_recovery_duration_seconds:p95_5m"
    success = "job_raptor_service:raptor_recovery_success:ratio_rate5m"
    per_minute = "job_raptor_service:raptor_errors_per_minute:rate5m"
    expected = {
        (RULE_RECOVERY_TIME, "warning"): (p95, config.recovery_time_warning),
        (RULE_RECOVERY_TIME, "critical"): (p95, config.recovery_time_critical),
        (RULE_SUCCESS_RATE, "warning"): (success, config.success_rate_warning / 100),
        (RULE_SUCCESS_RATE, "critical"): (success, config.success_rate_critical / 100),
        (RULE_ERROR_FREQUENCY, "warning"): (per_minute, config.error_frequency),
        (RULE_MEMORY_USAGE, "warning"): (
            "raptor_memory_pressure_ratio)",
            config.memory_usage / 100,
        ),
    }
    window = f"[{config.evaluation_window / 60:g}m]"
    recorded = {rule["record"]: rule["expr"] for rule in analytics_rules() if "record" in rule}
    for identity, (series, number) in expected.items():
        rule = by_identity[identity]
        assert _threshold(rule["expr"], series) == pytest.approx(number), identity
        assert rule["for"] == f"{config.alert_for / 60:g}m", identity
        source = recorded.get(series, "")
        while source and "[" not in source:  # a record made from another record
            source = recorded[next(name for name in recorded if name in source)]
        if series in recorded:
            assert window in source, (series, window)
        if identity[0] in (RULE_RECOVERY_TIME, RULE_SUCCESS_RATE):
            assert f">= {config.min_recoveries}" in rule["expr"], identity


def test_the_burn_rate_alerts_are_the_sre_workbooks() -> None:
    by_name = {rule["alert"]: rule for rule in analytics_rules() if "alert" in rule}
    fast = " ".join(by_name["RaptorRecoveryBudgetBurnFast"]["expr"].split())
    slow = " ".join(by_name["RaptorRecoveryBudgetBurnSlow"]["expr"].split())
    ratio = "job_raptor_service:raptor_recovery_failures:ratio_rate"
    for window, factor, expr in (
        ("1h", "14.4", fast),
        ("5m", "14.4", fast),
        ("6h", "6", fast),
        ("30m", "6", fast),
        ("1d", "3", slow),
        ("2h", "3", slow),
        ("3d", "1", slow),
        ("6h", "1", slow),
    ):
        assert f"{ratio}{window} > ({factor} * 0.05)" in expr, (window, factor)
    assert by_name["RaptorRecoveryBudgetBurnFast"]["labels"]["severity"] == "critical"
    assert by_name["RaptorRecoveryBudgetBurnSlow"]["labels"]["severity"] == "warning"


def test_promtool_accepts_the_analytics_rules() -> None:
    result = _promtool("check", "rules", str(ANALYTICS_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(analytics_rules())} rules found" in result.stdout


def test_promtool_unit_tests_prove_the_analytics_alerts_fire() -> None:
    result = _promtool("test", "rules", *map(str, ANALYTICS_RULES_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(ANALYTICS_RULES_TESTS)
    text = "".join(path.read_text(encoding="utf-8") for path in ANALYTICS_RULES_TESTS)
    tested = set(re.findall(r"alertname: (\w+)", text))
    assert tested == {rule["alert"] for rule in analytics_rules() if "alert" in rule}


_FAILURES = "job_raptor_service:raptor_recovery_failures:ratio_rate"


@pytest.mark.parametrize(
    ("original", "broken", "alert"),
    [
        ("p95_5m > 5\n", "p95_5m > 50\n", RULE_RECOVERY_TIME),
        ("increase5m >= 20", "increase5m >= 0", RULE_RECOVERY_TIME),
        ("ratio_rate5m < 0.6\n", "ratio_rate5m < 0.4\n", RULE_SUCCESS_RATE),
        ("rate5m > 10\n", "rate5m > 1\n", RULE_ERROR_FREQUENCY),
        ("> 0.75\n", "> 0.65\n", RULE_MEMORY_USAGE),
        # Without its short window a burn-rate alert would keep paging after the incident.
        (f"              and {_FAILURES}5m > (14.4 * 0.05)\n", "", "RaptorRecoveryBudgetBurnFast"),
        (f"              and {_FAILURES}6h > (1 * 0.05)\n", "", "RaptorRecoveryBudgetBurnSlow"),
        ("(14.4 * 0.05)\n", "(1.4 * 0.05)\n", "RaptorRecoveryBudgetBurnFast"),
    ],
)
def test_the_analytics_unit_tests_fail_when_a_rule_is_broken(
    tmp_path: Path, original: str, broken: str, alert: str
) -> None:
    text = ANALYTICS_RULES.read_text(encoding="utf-8")
    assert original in text
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / ANALYTICS_RULES.name).write_text(text.replace(original, broken, 1))
    # Only the test groups that check `alert` (an alert rule's expression is seen by no other
    # group): the suite fails if they do, and the 6 h burn-rate groups, which take most of
    # promtool's seconds, run only for the mutations of a burn-rate alert.
    copies = []
    for path in ANALYTICS_RULES_TESTS:
        groups = _test_groups_of(path, alert)
        if groups is not None:
            (rules_dir / path.name).write_text(groups)
            copies.append(str(rules_dir / path.name))
    assert copies, f"no unit test checks {alert}"
    result = _promtool("test", "rules", *copies)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def _test_groups_of(path: Path, alert: str) -> str | None:
    """``path`` (a rules unit-test file) with only its test groups that check ``alert``
    (``alertname: alert``), or None if none does."""
    head, tests, body = path.read_text(encoding="utf-8").partition("\ntests:\n")
    assert tests, f"{path.name}: no top-level tests:"
    groups = re.split(r"(?m)^(?=  - name:)", body)
    # Every group starts with `  - name:` (the split is exact), as the parser reads it.
    assert len(groups) - 1 == len(load_yaml(path)["tests"]), path.name
    kept = [group for group in groups[1:] if re.search(rf"alertname: {alert}\b", group)]
    return head + tests + "".join(kept) if kept else None


# ----------------------------------------------------------------- logs panels, compose


#: How Loki's OTLP ingestion names a log attribute in structured metadata.
def loki_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_logs_panels_read_the_monitor_log_events() -> None:
    attributes = {loki_name(key) for spec in LOG_EVENTS for key in spec.attributes}
    panels = [p for p in dashboard_panels(dashboard()) if p["type"] == "logs"]
    assert {p["title"] for p in panels} == {
        "Insights",
        "Alert notifications",
        "Reports (top error patterns)",
    }
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            match = re.fullmatch(r'\{service_name=~"\$job"\} \| (\w+) != ""', expr)
            assert match, (panel["title"], expr)
            assert match.group(1) in attributes, (panel["title"], match.group(1))


def test_grafana_provisions_the_logs_data_source() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "loki.yml")
    (source,) = datasources["datasources"]
    assert (source["type"], source["uid"]) == ("loki", "loki")
    assert source["url"].endswith(":3100")


_PINNED = re.compile(r"^[a-z0-9./-]+:v?\d+(?:\.\d+){1,2}$")


def test_the_compose_file_is_complete_pinned_and_consistent() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"otel-collector", "prometheus", "grafana", "tempo", "loki"}
    for name, service in services.items():
        image = service["image"]
        assert _PINNED.match(image), f"{name}: {image} is not pinned to a version"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COLLECTOR_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    ports = {port.split(":")[0] for s in services.values() for port in s.get("ports", [])}
    assert {"4317", "4318", "9090", "3000", "3100", "3200"} <= ports
    # The collector merges the local config with the container overrides.
    collector = services["otel-collector"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in collector["volumes"])
    configs = [arg.removeprefix("--config=") for arg in collector["command"]]
    files = {target: COLLECTOR_DIR / source for source, target in mounts.items()}
    assert [files[target].name for target in configs] == [
        "otel-collector.yaml",
        "otel-collector.compose.yaml",
    ]
    merged = _merge(load_yaml(files[configs[0]]), load_yaml(files[configs[1]]))
    for pipeline in merged["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in merged[kind], f"{component} undefined after the merge"
    assert merged["service"]["pipelines"]["logs"]["exporters"] == ["otlphttp/logs", "debug"]
    assert merged["service"]["pipelines"]["traces"]["exporters"] == ["otlp/tracing", "debug"]
    assert merged["exporters"]["otlphttp/logs"]["endpoint"] == "http://loki:3100/otlp"
    assert merged["exporters"]["otlp/tracing"]["endpoint"] == "tempo:4317"
    assert merged["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    # Prometheus in compose scrapes the collector by name and loads both rule files.
    prometheus = load_yaml(COLLECTOR_DIR / "prometheus.compose.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["static_configs"][0]["targets"] == ["otel-collector:8889"]
    assert prometheus["rule_files"] == ["rules/raptor-alerts.yml", "rules/raptor-analytics.yml"]
    # Grafana finds every backend by name, with the uids the dashboard's variables default to.
    sources = load_yaml(COLLECTOR_DIR / "compose" / "grafana-datasources.yml")["datasources"]
    assert {(s["type"], s["url"]) for s in sources} == {
        ("prometheus", "http://prometheus:9090"),
        ("loki", "http://loki:3100"),
        ("tempo", "http://tempo:3200"),
    }
    tempo = load_yaml(COLLECTOR_DIR / "compose" / "tempo.yaml")
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(
        ":4317"
    )


def _merge(base: Any, overlay: Any) -> Any:
    """The collector's merge of two configs: maps merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return overlay


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    result = _promtool("check", "config", str(COLLECTOR_DIR / "prometheus.compose.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
