"""The state hub's readiness rule and the relabelling of replica engine metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

import factory.hub as hub_mod
from factory.api.metrics import FactoryMetrics
from factory.hub import StateHub


def _families(value: float):
    reg = CollectorRegistry()
    Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg).labels("m").set(value)
    Counter("vllm:prompt_tokens", "prompt", ["model_name"], registry=reg).labels("m").inc(value)
    return list(reg.collect())


def test_ready_only_when_every_expected_replica_reports(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(hub_mod.time, "monotonic", lambda: now[0])
    hub = StateHub({"a": 2, "b": 1})
    assert hub.readiness() == {
        "ready": False,
        "draining": False,
        "models": {"a": {"expected": 2, "serving": 0}, "b": {"expected": 1, "serving": 0}},
    }
    hub.report("r1", "a", [])
    hub.report("r2", "a", [])
    assert not hub.readiness()["ready"]
    hub.report("r3", "b", [])
    assert hub.readiness()["ready"]
    # A replica that stops reporting ages out: readiness drops without anyone telling the hub.
    now[0] += hub_mod.STALE_AFTER_S + 0.1
    hub.report("r1", "a", [])
    hub.report("r3", "b", [])
    assert hub.readiness()["models"]["a"]["serving"] == 1
    assert not hub.readiness()["ready"]


def test_a_replica_counts_only_once_the_proxy_routes_to_it():
    hub = StateHub({"a": 1, "b": 1})
    hub.report("r1", "a", [])
    hub.report("r2", "b", [])
    assert hub.readiness()["ready"]  # nobody has said what the proxy routes to: not gated
    hub.set_routable(["r1"])  # HAProxy's reloaded config does not have r2 yet
    assert hub.readiness()["models"]["b"]["serving"] == 0
    assert not hub.readiness()["ready"]
    hub.set_routable(["r1", "r2"])
    assert hub.readiness()["ready"]
    hub.set_routable(None)
    assert hub.readiness()["ready"]


def test_engine_metrics_are_merged_with_a_replica_label():
    hub = StateHub({"m": 2})
    hub.report("rA", "m", _families(3))
    hub.report("rB", "m", _families(5))
    metrics = FactoryMetrics()
    metrics.observe_readiness(hub.readiness())
    text = metrics.exposition(hub.engine_metrics()).decode()
    assert 'vllm:num_requests_running{model_name="m",replica="rA"} 3.0' in text
    assert 'vllm:num_requests_running{model_name="m",replica="rB"} 5.0' in text
    assert 'vllm:prompt_tokens_total{model_name="m",replica="rB"} 5.0' in text
    # One HELP/TYPE per family even with several replicas.
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'factory_replicas_serving{model="m"} 2.0' in text
    assert 'factory_replicas_expected{model="m"} 2.0' in text


def test_drain_counts_only_reports_made_after_it_began(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(hub_mod.time, "monotonic", lambda: now[0])
    hub = StateHub({"m": 1})
    hub.report("r", "m", [])
    assert hub.replica_poll("r", 0)["ready"]
    assert hub.in_flight() is None  # not draining
    now[0] += 0.1
    hub.start_draining()
    # The replica said 0 before the drain began: a request may have been admitted since.
    assert hub.in_flight() is None
    now[0] += 0.1
    state = hub.replica_poll("r", 2)
    assert state["draining"] and not state["ready"]
    assert hub.in_flight() == 2
    now[0] += 0.5
    hub.replica_poll("r", 0)
    assert hub.in_flight() == 0


def test_each_starting_replica_takes_the_model_furthest_below_its_count(monkeypatch):
    """One engine deployment serves every model: the hub says which model a replica serves, and a
    replacement takes over the model of the replica it replaces."""
    now = [0.0]
    monkeypatch.setattr(hub_mod.time, "monotonic", lambda: now[0])
    hub = StateHub({"big": 2, "small": 1})
    assert [hub.assign(r) for r in ("r1", "r2", "r3")] == ["big", "small", "big"]
    assert hub.assign("r2") == "small"  # asking again gives the same answer
    now[0] += 1.0
    for rid in ("r1", "r3"):  # r2 (small) dies while starting: it stops polling
        hub.replica_poll(rid, 0)
    now[0] += hub_mod.STALE_AFTER_S
    hub.report("r1", "big", [])
    hub.report("r3", "big", [])
    assert hub.assign("r4") == "small"
    # Starting replicas count while they poll, before their engines report.
    assert hub.assign("r5") == "big"  # every model has its replicas: the first model takes the spare
