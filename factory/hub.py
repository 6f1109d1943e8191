"""The state hub: where replicas report once a second and the ingress reads.

A one-replica Ray Serve deployment (no CPU reserved) in the same application as the ingress and
the engines, so `serve run`, multi-node clusters and restarts need nothing outside the app.
Replicas push their engine metrics and liveness here; the ingress asks for readiness (cached, off
the request path) and for metrics once per scrape. Nothing here is called once per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from factory.dashboard.state import HISTORY_S, ReplicaHistory, replica_facts

REPORT_INTERVAL_S = 1.0
# A replica that has not reported for this long is treated as gone (3 missed reports).
STALE_AFTER_S = 3.5


@dataclass
class ReplicaReport:
    replica_id: str
    model: str
    families: list[Metric] = field(default_factory=list)
    reported_at_s: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)


class StateHub:
    """Replica liveness and engine metrics, keyed by replica id."""

    def __init__(self, expected_replicas: dict[str, int], max_num_seqs: dict[str, int] | None = None):
        self._expected = dict(expected_replicas)
        self._max_num_seqs = dict(max_num_seqs or {})
        self._reports: dict[str, ReplicaReport] = {}
        self._draining_since_s: float | None = None
        # ingress replica id -> (requests in flight, when it said so)
        self._ingress: dict[str, tuple[int, float]] = {}
        self._history: dict[str, ReplicaHistory] = {}

    def report(self, replica_id: str, model: str, families: list[Metric]) -> None:
        facts = replica_facts(families)
        self._reports[replica_id] = ReplicaReport(replica_id, model, families, time.monotonic(), facts)
        self._history.setdefault(replica_id, ReplicaHistory()).add(time.time(), facts)

    def _live(self) -> list[ReplicaReport]:
        now = time.monotonic()
        return [r for r in self._reports.values() if now - r.reported_at_s < STALE_AFTER_S]

    def readiness(self) -> dict[str, Any]:
        """Per model: replicas expected and serving; ready when every model has them all and
        the factory is not draining."""
        live = self._live()
        models = {}
        for model, expected in self._expected.items():
            serving = sum(1 for r in live if r.model == model)
            models[model] = {"expected": expected, "serving": serving}
        draining = self._draining_since_s is not None
        ready = not draining and all(m["serving"] >= m["expected"] for m in models.values())
        return {"ready": ready, "draining": draining, "models": models}

    def ingress_poll(self, ingress_id: str, in_flight: int) -> dict[str, Any]:
        """An ingress replica's periodic call: it says its load, it learns readiness."""
        self._ingress[ingress_id] = (in_flight, time.monotonic())
        return self.readiness()

    def start_draining(self) -> None:
        """From now on ingresses refuse new requests (503); in-flight ones run to the end."""
        if self._draining_since_s is None:
            self._draining_since_s = time.monotonic()

    def in_flight(self) -> int | None:
        """Requests still running across live ingresses, counted only from reports made after
        draining began (earlier counts could miss requests admitted just before); None until then."""
        since = self._draining_since_s
        now = time.monotonic()
        fresh = [(n, t) for n, t in self._ingress.values() if now - t < STALE_AFTER_S]
        if since is None or not fresh or any(t <= since for _, t in fresh):
            return None
        return sum(n for n, _ in fresh)

    def engine_metrics(self) -> list[tuple[str, list[Metric]]]:
        """(replica id, vLLM metric families) for every live replica."""
        return [(r.replica_id, r.families) for r in self._live()]

    # -- the dashboard ---------------------------------------------------------------------------------

    def dashboard(self, with_history: bool) -> dict[str, Any]:
        """Per-replica rows (live or gone) and, on request, their last 15 minutes. Budgets and
        throttle state come from the governor (the ingress merges them in)."""
        live = {r.replica_id for r in self._live()}
        rows = []
        for r in self._reports.values():
            tok_s, tok_j = self._history[r.replica_id].rates()
            f = r.facts
            rows.append(
                {
                    "id": r.replica_id,
                    "model": r.model,
                    "up": r.replica_id in live,
                    "source": f["source"],
                    "power_w": f["power_w"],
                    "devices": f["devices"],
                    "energy_j": f["energy_j"],
                    "tokens_per_s": tok_s,
                    "tokens_per_joule": tok_j,
                    "running": f["running"],
                    "max_num_seqs": self._max_num_seqs.get(r.model),
                    "waiting": f["waiting"],
                    "kv_cache_usage": f["kv_cache_usage"],
                }
            )
        out: dict[str, Any] = {"replicas": rows, "expected": dict(self._expected)}
        if with_history:
            out["history"] = self._history_doc()
        return out

    def _history_doc(self) -> dict[str, Any]:
        since = time.time() - HISTORY_S
        per = {rid: h.series(since) for rid, h in self._history.items()}
        # The site line follows the replica with the longest history; replicas report about once
        # a second, so their points are matched by the whole second they fall in.
        base = max(per.values(), key=lambda s: len(s["t"]), default={"t": []})
        by_second = [
            {round(t): (p, tok) for t, p, tok in zip(s["t"], s["power_w"], s["tokens_per_s"], strict=True)}
            for s in per.values()
        ]
        site_power, site_tok = [], []
        for t in base["t"]:
            points = [m[round(t)] for m in by_second if round(t) in m]
            site_power.append(sum(p for p, _ in points))
            site_tok.append(sum(tok for _, tok in points))
        return {
            "t": base["t"],
            "site_power_w": site_power,
            "site_tokens_per_s": site_tok,
            "site_tokens_per_joule": [tok / p if p else 0.0 for tok, p in zip(site_tok, site_power, strict=True)],
            "replicas": per,
        }
