"""The dashboard's state document, from what replicas report to the hub once a second.

Pure functions over Prometheus metric families (no Ray): a replica's summary (power, energy,
tokens, batch, KV cache), a 15-minute history per replica, and the site view with its alarms.
The document's fields are the contract with factory/dashboard/static/dashboard.js.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from prometheus_client.metrics_core import Metric

HISTORY_S = 15 * 60
RATE_WINDOW_S = 10.0


def _samples(families: Iterable[Metric], name: str) -> list:
    return [s for f in families if f.name == name for s in f.samples if not s.name.endswith("_created")]


def replica_facts(families: list[Metric]) -> dict[str, Any]:
    """One replica's figures from its families (factory_* from the meter, vllm:* from vLLM)."""
    power = _samples(families, "factory_power_watts")
    limits = {s.labels.get("device"): s.value for s in _samples(families, "factory_power_limit_watts")}
    sources = sorted({s.labels.get("source", "") for s in power})
    tokens = _samples(families, "factory_tokens")
    kv = _samples(families, "vllm:kv_cache_usage_perc")
    return {
        "metered": bool(power),
        "source": sources[0] if len(sources) == 1 else ("mixed" if sources else "none"),
        "power_w": sum(s.value for s in power),
        "devices": [
            {"device": s.labels.get("device"), "power_w": s.value, "power_limit_w": limits.get(s.labels.get("device"))}
            for s in power
        ],
        "energy_j": sum(s.value for s in _samples(families, "factory_energy_joules")),
        "completion_tok": sum(s.value for s in tokens if s.labels.get("kind") == "completion"),
        "running": int(sum(s.value for s in _samples(families, "vllm:num_requests_running"))),
        "waiting": int(sum(s.value for s in _samples(families, "vllm:num_requests_waiting"))),
        "kv_cache_usage": max((s.value for s in kv), default=0.0),
    }


@dataclass
class ReplicaHistory:
    """Samples of one replica, ~1 s apart: (t, power W, energy J, completion tokens)."""

    points: deque = field(default_factory=lambda: deque(maxlen=HISTORY_S + 60))

    def add(self, t_s: float, facts: dict[str, Any]) -> None:
        self.points.append((t_s, facts["power_w"], facts["energy_j"], facts["completion_tok"]))

    def rates(self) -> tuple[float, float]:
        """(generated tokens per second, tokens per joule) over the last ~10 s."""
        if len(self.points) < 2:
            return 0.0, 0.0
        t1, _, e1, n1 = self.points[-1]
        t0, _, e0, n0 = next((p for p in self.points if t1 - p[0] <= RATE_WINDOW_S), self.points[-2])
        dt, de, dn = t1 - t0, e1 - e0, n1 - n0
        return (dn / dt if dt > 0 else 0.0), (dn / de if de > 0 else 0.0)

    def series(self, since_s: float) -> dict[str, list]:
        pts = [p for p in self.points if p[0] >= since_s]
        tok_s = []
        for i, p in enumerate(pts):
            prev = pts[i - 1] if i else p
            dt = p[0] - prev[0]
            tok_s.append((p[3] - prev[3]) / dt if dt > 0 else 0.0)
        return {"t": [p[0] for p in pts], "power_w": [p[1] for p in pts], "tokens_per_s": tok_s}


def merge_power(replicas: list[dict[str, Any]], power: dict[str, Any]) -> None:
    """Put the governor's view on the hub's replica rows: each replica's budget (its own, or the
    per-GPU one times its devices), its cap, throttle level and reason, and power averaged over
    a second (a paced engine's instant power swings between idle and busy)."""
    budgets = power["budgets"]
    by_id = {row["replica"]: row for row in power["replicas"]}
    for r in replicas:
        own = [budgets["replicas"].get(r["id"])]
        if budgets.get("gpu_w") is not None:
            own.append(budgets["gpu_w"] * max(1, len(r["devices"])))
        own = [w for w in own if w is not None]
        r["budget_w"] = min(own) if own else None
        g = by_id.get(r["id"])
        if g is not None and g["live"]:
            r["power_w"] = g["power_w"]
        r["cap_w"] = g["cap_w"] if g else None
        r["throttle"] = {"level": g["level"], "reason": g["reason"]} if g else {"level": 0, "reason": "within budget"}
        r["node"] = g.get("node") if g else None  # the Ray node it runs on, as it told the governor


def node_rows(replicas: list[dict[str, Any]], budgets: dict[str, Any]) -> list[dict[str, Any]]:
    """Per Ray node: its replicas, how many serve, the power and tokens/s of those, and the
    budget the governor holds the node to (its own, or the per-node one, the tighter)."""
    nodes: dict[str, dict[str, Any]] = {}
    for r in replicas:
        if r.get("node") is None:
            continue  # not yet heard of by the governor
        n = nodes.setdefault(
            r["node"], {"node": r["node"], "replicas": [], "up": 0, "power_w": 0.0, "tokens_per_s": 0.0}
        )
        n["replicas"].append(r["id"])
        if r["up"]:
            n["up"] += 1
            n["power_w"] += r["power_w"]
            n["tokens_per_s"] += r["tokens_per_s"]
    for n in nodes.values():
        own = [w for w in ((budgets.get("nodes") or {}).get(n["node"]), budgets.get("node_w")) if w is not None]
        n["budget_w"] = min(own) if own else None
    return [nodes[k] for k in sorted(nodes)]


def site_state(
    now_s: float,
    replicas: list[dict[str, Any]],
    *,
    budgets: dict[str, Any],
    expected: dict[str, int],
    tenants: list[dict[str, Any]],
    currency: str,
    admission: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The state document (without history) from replica rows (with `merge_power` applied),
    ledger totals and the governor's admission rules."""
    site_power = sum(r["power_w"] for r in replicas if r["up"])
    tok_s = sum(r["tokens_per_s"] for r in replicas if r["up"])
    energy_rate = sum(r["tokens_per_s"] / r["tokens_per_joule"] for r in replicas if r["up"] and r["tokens_per_joule"])
    sources = {r["source"] for r in replicas if r["up"]}
    cost = sum((Decimal(t["cost"]) for t in tenants), Decimal(0))
    generated = sum(t["completion_tokens"] for t in tenants)
    site = {
        "power_w": site_power,
        "budget_w": budgets.get("site_w"),
        "source": sources.pop() if len(sources) == 1 else ("mixed" if sources else "none"),
        "tokens_per_s": tok_s,
        "tokens_per_joule": tok_s / energy_rate if energy_rate else 0.0,
        "cost_per_mtok": format(cost * 1_000_000 / generated, ".6f") if generated else None,
        "energy_j": sum(r["energy_j"] for r in replicas),
    }
    return {
        "time": now_s,
        "currency": currency,
        "site": site,
        "replicas": replicas,
        "nodes": node_rows(replicas, budgets),
        "tenants": tenants,
        "admission": admission or {"level": 0, "name": "normal", "slowed": [], "shed": [], "reason": "no budget binds"},
        "alarms": alarms(site, replicas, expected),
    }


def alarms(site: dict[str, Any], replicas: list[dict[str, Any]], expected: dict[str, int]) -> list[dict[str, str]]:
    out = []
    if site["budget_w"] is not None and site["power_w"] > site["budget_w"]:
        out.append(
            _alarm("critical", "over_budget", f"Site draws {site['power_w']:.0f} W, budget {site['budget_w']:.0f} W.")
        )
    for r in replicas:
        if not r["up"]:
            continue
        if r["budget_w"] is not None and r["power_w"] > r["budget_w"]:
            msg = f"Replica {r['id']} draws {r['power_w']:.0f} W, budget {r['budget_w']:.0f} W."
            out.append(_alarm("critical", "over_budget", msg))
        if r["source"] == "modeled":
            msg = f"Replica {r['id']}: no power sensor; power is modeled from engine busy time, not measured."
            out.append(_alarm("warning", "telemetry_modeled", msg))
        elif r["source"] == "none":
            out.append(_alarm("warning", "telemetry_missing", f"Replica {r['id']} reports no power (metering off)."))
    for model, want in expected.items():
        serving = sum(1 for r in replicas if r["up"] and r["model"] == model)
        if serving < want:
            out.append(_alarm("critical", "replica_down", f"Model {model}: {serving} of {want} replicas serving."))
    return out


def _alarm(severity: str, kind: str, message: str) -> dict[str, str]:
    return {"severity": severity, "kind": kind, "message": message}
