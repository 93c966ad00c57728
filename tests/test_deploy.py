"""deploy/: the Grafana dashboard is valid and only queries metrics that ternlm exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ternlm.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "ternlm-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC_NAME = re.compile(r"\bternlm_[a-z0-9_]+")
# The series prometheus_client writes for each metric type, as suffixes of the metric's name.
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def _exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_is_valid(dashboard: dict) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.0+; the file is written for Grafana 10+
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()

    panels = _panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for r in dashboard["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert len(panels) >= 12
    for p in panels:
        assert p["title"] and p["targets"], p
        assert p["datasource"] == DATASOURCE, p["title"]
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, expr


def test_dashboard_queries_only_exported_metrics(dashboard: dict) -> None:
    exported = {f.name: f.type for f in Metrics().registry.collect()}
    series = {name + suffix for name, kind in exported.items() for suffix in SERIES_SUFFIXES[kind]}
    used = {m for expr in _exprs(dashboard) for m in METRIC_NAME.findall(expr)}
    assert used, "the dashboard queries no ternlm metric"
    assert used <= series, f"not exported by ternlm.metrics.Metrics: {sorted(used - series)}"
