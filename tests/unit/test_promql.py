"""Reading metric names out of PromQL and expositions, and the shape of the Grafana dashboards
(that every metric they query is exported is tests/integration/test_grafana.py's job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from factory.dashboard.promql import exported_names, metric_names, panel_exprs

DASHBOARDS = sorted((Path(__file__).parents[2] / "configs" / "grafana").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (tenant) (rate(factory_cost_total{currency="CNY"}[5m])) / ignoring(x) '
            "rate(factory_tokens_total[5m]) * 1e6",
            {"factory_cost_total", "factory_tokens_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))",
            {"vllm:time_to_first_token_seconds_bucket"},
        ),
        # Label names in groupings and matchers, Grafana variables, durations, offsets, keywords.
        (
            'sum without (device) (rate(a{replica=~"$replica", path="/v1/x"}[$__rate_interval] offset 5m))'
            " > bool 0 and on (replica) group_left (model) b",
            {"a", "b"},
        ),
        # Strings may hold anything, a `}` or a word; numbers in every form; a comment.
        (
            'label_replace(c{status=~"5..}"}, "dst", "$1 dst", "src", "(.*)") + 0x1F + .5 + Inf  # d',
            {"c"},
        ),
        # An aggregation whose grouping comes after it, a function with a space before "(".
        ("sum(rate (e[1m])) by (le) or topk(5, f) or vector(1) or time()", {"e", "f"}),
        ('{__name__="up", job="token-factory"}', {"up"}),
    ],
)
def test_metric_names_are_the_series_a_query_selects(expr, names):
    assert metric_names(expr) == names


def test_exported_names_are_what_prometheus_stores_from_a_scrape():
    reg = CollectorRegistry()
    Counter("vllm:num_preemptions", "preempted", ["engine"], registry=reg).labels("0").inc()
    Histogram("vllm:time_to_first_token_seconds", "ttft", registry=reg).observe(0.1)
    Gauge("factory_power_limit_watts", "declared, no sample", ["device"], registry=reg)
    names = exported_names(generate_latest(reg).decode())
    assert {
        "vllm:num_preemptions_total",
        "vllm:num_preemptions_created",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
        "factory_power_limit_watts",
    } <= names
    # No series is stored under a histogram's family name, so a panel querying it would be empty.
    assert "vllm:time_to_first_token_seconds" not in names
    assert "vllm:num_preemptions" not in names


def test_exported_names_reads_samples_without_type_lines():
    text = 'factory_tokens_total{kind="completion",replica="r1"} 5.0\nfactory_tokens_per_joule 0.5\n'
    assert exported_names(text) == {"factory_tokens_total", "factory_tokens_per_joule"}


def test_panel_exprs_walks_rows_and_label_values_variables():
    dashboard = {
        "panels": [
            {"type": "timeseries", "title": "top", "targets": [{"expr": "a", "refId": "A"}, {"refId": "B"}]},
            {
                "type": "row",
                "title": "collapsed",
                "panels": [{"type": "stat", "title": "inner", "targets": [{"expr": "rate(b[1m])"}]}],
            },
        ],
        "templating": {
            "list": [
                {"type": "datasource", "name": "datasource", "query": "prometheus"},
                {"type": "query", "name": "replica", "query": "label_values(factory_power_watts, replica)"},
                {"type": "query", "name": "model", "query": {"query": 'label_values(c{x="y"}, model)'}},
                {"type": "custom", "name": "n", "query": "1,2"},
            ]
        },
    }
    assert panel_exprs(dashboard) == [
        ("top", "a"),
        ("inner", "rate(b[1m])"),
        ("$replica", "factory_power_watts"),
        ("$model", 'c{x="y"}'),
    ]


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_importable_and_every_panel_says_what_it_shows(path):
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem
    assert board["title"].startswith("Token Factory — ")
    assert board["schemaVersion"] >= 39
    assert (board["refresh"], board["time"]) == ("5s", {"from": "now-1h", "to": "now"})
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    replica = variables["replica"]
    assert replica["query"] == "label_values(factory_power_watts, replica)"
    assert replica["multi"] and replica["includeAll"] and replica["datasource"] == DATASOURCE
    panels = [p for p in _panels(board["panels"]) if p["type"] != "row"]
    assert panels
    for panel in panels:
        title = panel["title"]
        assert panel["description"].strip(), title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["expr"] and "legendFormat" in target, title
            assert target["datasource"] == DATASOURCE, title
            assert metric_names(target["expr"]), (title, target["expr"])
    ids = [p["id"] for p in _panels(board["panels"])]
    assert len(ids) == len(set(ids))


def test_both_dashboards_are_there():
    assert [p.name for p in DASHBOARDS] == ["factory-power.json", "factory-serving.json"]
