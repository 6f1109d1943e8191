"""The dashboard's state document from replica metric families: figures, rates, alarms."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from factory.dashboard.state import ReplicaHistory, alarms, merge_power, node_rows, replica_facts, site_state
from factory.hub import StateHub


def _families(power_w: float, energy_j: float, completion: int, source: str = "modeled", running: int = 3):
    power = GaugeMetricFamily("factory_power_watts", "", labels=["device", "source"])
    power.add_metric(["cpu0", source], power_w)
    energy = CounterMetricFamily("factory_energy_joules", "", labels=["device", "source"])
    energy.add_metric(["cpu0", source], energy_j)
    tokens = CounterMetricFamily("factory_tokens", "", labels=["tenant", "kind"])
    tokens.add_metric(["acme", "prompt"], 999)
    tokens.add_metric(["acme", "completion"], completion)
    run = GaugeMetricFamily("vllm:num_requests_running", "", labels=["engine"])
    run.add_metric(["0"], running)
    kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "", labels=["engine"])
    kv.add_metric(["0"], 0.25)
    return [power, energy, tokens, run, kv]


def test_replica_facts_read_power_energy_tokens_batch_and_kv():
    f = replica_facts(_families(80.0, 1000.0, 500))
    assert (f["source"], f["power_w"], f["energy_j"], f["completion_tok"]) == ("modeled", 80.0, 1000.0, 500)
    assert (f["running"], f["waiting"], f["kv_cache_usage"]) == (3, 0, 0.25)
    assert replica_facts([])["source"] == "none"


def test_history_rates_over_the_last_ten_seconds():
    h = ReplicaHistory()
    for i in range(20):  # 50 tokens/s, 100 W: 0.5 tokens per joule
        h.add(1000.0 + i, {"power_w": 100.0, "energy_j": 100.0 * i, "completion_tok": 50 * i})
    tok_s, tok_j = h.rates()
    assert tok_s == 50.0 and tok_j == 0.5
    series = h.series(since_s=1015.0)
    assert series["t"] == [1015.0, 1016.0, 1017.0, 1018.0, 1019.0]
    assert series["tokens_per_s"][1:] == [50.0] * 4


def _row(rid, model="m", up=True, power=100.0, budget=None, source="nvml", tok_s=50.0, tok_j=0.5):
    return {"id": rid, "model": model, "up": up, "power_w": power, "budget_w": budget, "source": source,
            "energy_j": 10.0, "tokens_per_s": tok_s, "tokens_per_joule": tok_j}  # fmt: skip


def test_site_sums_replicas_and_prices_a_million_tokens():
    tenants = [
        {"tenant": "a", "completion_tokens": 2_000_000, "cost": "3.000000000000"},
        {"tenant": "b", "completion_tokens": 1_000_000, "cost": "1.5"},
    ]
    doc = site_state(
        1.0, [_row("r1"), _row("r2", power=300.0, tok_j=0.25)], budgets={"site_w": 500.0},
        expected={"m": 2}, tenants=tenants, currency="CNY",
    )  # fmt: skip
    site = doc["site"]
    assert site["power_w"] == 400.0 and site["budget_w"] == 500.0 and site["source"] == "nvml"
    assert site["tokens_per_s"] == 100.0
    assert site["tokens_per_joule"] == 100.0 / (100.0 + 200.0)  # tokens over the energy they took
    assert site["cost_per_mtok"] == "1.500000"
    assert doc["alarms"] == []


def test_alarms_over_budget_modeled_missing_and_down():
    site = {"power_w": 600.0, "budget_w": 500.0}
    rows = [
        _row("hot", power=200.0, budget=150.0),
        _row("est", source="modeled"),
        _row("off", source="none"),
        _row("gone", up=False),
    ]
    kinds = [(a["severity"], a["kind"]) for a in alarms(site, rows, {"m": 4})]
    assert kinds == [
        ("critical", "over_budget"),
        ("critical", "over_budget"),
        ("warning", "telemetry_modeled"),
        ("warning", "telemetry_missing"),
        ("critical", "replica_down"),
    ]


def test_hub_keeps_history_for_the_dashboard():
    hub = StateHub({"m": 1})
    hub.report("r1", "m", _families(90.0, 10.0, 5))
    hub.report("r1", "m", _families(95.0, 20.0, 25))
    doc = hub.dashboard(with_history=True)
    (row,) = doc["replicas"]
    assert (row["id"], row["up"], row["power_w"]) == ("r1", True, 95.0)
    assert doc["history"]["replicas"]["r1"]["power_w"] == [90.0, 95.0]
    assert len(doc["history"]["site_power_w"]) == 2


def _governor_state(budgets: dict, rows: list[dict]) -> dict:
    return {"budgets": {"site_w": None, "node_w": None, "gpu_w": None, "nodes": {}, "replicas": {}, **budgets},
            "replicas": rows, "admission": {}, "scopes": []}  # fmt: skip


def test_merge_power_puts_budgets_caps_levels_and_averaged_power_on_rows():
    rows = [
        {"id": "r1", "power_w": 120.0, "devices": ["gpu0", "gpu1"]},  # instant power, mid-step
        {"id": "r2", "power_w": 50.0, "devices": ["gpu2"]},
        {"id": "r3", "power_w": 40.0, "devices": ["gpu3"]},  # the governor has not heard of it yet
    ]
    why = "site budget 130 W below demand"
    governed = [
        {"replica": "r1", "live": True, "power_w": 80.0, "cap_w": 80.0, "level": 1, "reason": why},
        {"replica": "r2", "live": False, "power_w": 45.0, "cap_w": None, "level": 0, "reason": "within budget"},
    ]
    merge_power(rows, _governor_state({"gpu_w": 70.0, "replicas": {"r2": 60.0}}, governed))
    r1, r2, r3 = rows
    # r1: 2 GPUs x 70 W; the governor's 1 s average replaces the instant reading.
    assert (r1["budget_w"], r1["power_w"], r1["cap_w"]) == (140.0, 80.0, 80.0)
    assert r1["throttle"] == {"level": 1, "reason": why}
    # r2: its own 60 W is tighter than 70 W; a stale governor row does not overwrite power.
    assert (r2["budget_w"], r2["power_w"], r2["cap_w"]) == (60.0, 50.0, None)
    assert (r3["budget_w"], r3["cap_w"], r3["throttle"]["level"]) == (70.0, None, 0)


def test_nodes_sum_their_serving_replicas_against_the_tighter_node_budget():
    rows = [
        {"id": "a1", "up": True, "power_w": 100.0, "tokens_per_s": 40.0, "node": "head"},
        {"id": "a2", "up": False, "power_w": 90.0, "tokens_per_s": 30.0, "node": "head"},  # down: not drawing
        {"id": "b1", "up": True, "power_w": 70.0, "tokens_per_s": 25.0, "node": "worker"},
        {
            "id": "c1",
            "up": True,
            "power_w": 10.0,
            "tokens_per_s": 1.0,
            "node": None,
        },  # the governor has not heard of it
    ]
    nodes = node_rows(rows, {"node_w": 150.0, "nodes": {"worker": 60.0, "gone": 10.0}})
    assert nodes == [
        {"node": "head", "replicas": ["a1", "a2"], "up": 1, "power_w": 100.0, "tokens_per_s": 40.0, "budget_w": 150.0},
        {"node": "worker", "replicas": ["b1"], "up": 1, "power_w": 70.0, "tokens_per_s": 25.0, "budget_w": 60.0},
    ]
    assert node_rows(rows, {"node_w": None, "nodes": {}})[0]["budget_w"] is None
