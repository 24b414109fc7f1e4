"""deploy/'s Grafana dashboard and Prometheus alert rules: every PromQL
expression parses (a real PromQL parser, promql-parser), and names only
metrics the brain exports, as docs/operations.md lists them (the list
tests/test_metrics.py checks against a running brain's /metrics, both ways).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from test_metrics import documented_metrics

DEPLOY = Path(__file__).parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "z4j.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Grafana's interval variables stand for a duration; any will do for a parse.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b")
# What Prometheus records for every target itself, not the brain.
PROMETHEUS_OWN = {"up"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported_series() -> set[str]:
    """Series names a PromQL expression may select: each documented family's
    own (counters with ``_total``), and a histogram's bucket, sum and count."""
    names: set[str] = set()
    for name, documented in documented_metrics().items():
        if documented.type == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SERIES)
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (it must parse)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), None
            )
            assert name, f"a selector without a metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr)), visit)
    return names


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<selector>, <label>)
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match[1])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_parser_refuses_what_is_not_promql() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("rate(z4j_drain_records_total[5m]")
    assert metric_names("sum(rate(a_total[$__rate_interval])) / b") == {"a_total", "b"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_parses_and_names_only_exported_metrics(source: str) -> None:
    exprs = (
        dashboard_expressions()
        if source == "dashboard"
        else [rule["expr"] for rule in alert_rules()]
    )
    assert len(exprs) >= 15
    known = exported_series() | PROMETHEUS_OWN
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"not exported: {names - known} in {expr!r}"
        used |= names
    # What the brief asks the two to cover, each named at least once.
    for family in (
        "z4j_ingest_records_total",
        "z4j_buffer_utilisation_ratio",
        "z4j_buffer_depth_rows",
        "z4j_buffer_completed_rows_total",
        "z4j_drain_failures_total",
        "z4j_agent_sessions",
        "z4j_commands_finished_total",
        "z4j_command_duration_seconds_bucket",
        "z4j_registry_lease_acquisitions_total",
        "z4j_ready" if source == "alerts" else "z4j_ready_check",
    ):
        assert family in used, family
    if source == "dashboard":
        assert "z4j_command_dispatch_total" in used


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    all_panels = list(panels(dashboard["panels"]))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in all_panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
