"""The Grafana dashboards against a running factory: every metric a panel queries is one /metrics
exports, so no panel of configs/grafana/*.json is silently empty."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from factory.dashboard.promql import exported_names, metric_names, panel_exprs
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.stack

DASHBOARDS = sorted((Path(__file__).parents[2] / "configs" / "grafana").glob("*.json"))


def test_every_metric_a_dashboard_queries_is_exported(client, base_url):
    assert DASHBOARDS
    user = [{"role": "user", "content": "Tell me about power."}]
    # Both a plain and a streamed request, so vLLM's latency histograms and the ingress's
    # per-path series have samples.
    client.chat.completions.create(model=TINY_MODEL, messages=user, max_tokens=8)
    stream = client.chat.completions.create(model=TINY_MODEL, messages=user, max_tokens=8, stream=True)
    assert [chunk for chunk in stream if chunk.choices]  # read to the end: an abandoned stream aborts
    time.sleep(2.5)  # a replica report reaches the hub
    response = httpx.get(base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    exported = exported_names(response.text)

    missing: list[str] = []
    for path in DASHBOARDS:
        for title, expr in panel_exprs(json.loads(path.read_text())):
            absent = sorted(metric_names(expr) - exported)
            if absent:
                missing.append(f"{path.name} / {title}: {', '.join(absent)}")
    assert not missing, "queried but not exported:\n" + "\n".join(missing)
