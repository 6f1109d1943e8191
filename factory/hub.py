"""The state hub: where engine replicas report once a second and learn the factory's state.

A one-replica Ray Serve deployment (no CPU reserved) in the same application as the engines, so
`serve run`, multi-node clusters and restarts need nothing outside the app. Each replica
- asks, once at start, which model it should serve (`assign`): every replica of the one engine
  deployment can serve any configured model, and the hub hands out the model furthest below
  its configured replica count, so a replacement takes over the model of the replica it replaces;
- polls twice a second (`replica_poll`): it says how many requests it has in flight (the drain
  waits on that) and learns readiness and whether the factory is draining, off the request path;
- reports once a second (`report`): liveness and its metric families, read once per `/metrics`
  scrape and by the dashboard.
Nothing here is called once per request, let alone once per token.
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
    """Replica liveness, model assignment and engine metrics, keyed by replica id."""

    def __init__(self, expected_replicas: dict[str, int], max_num_seqs: dict[str, int] | None = None):
        self._expected = dict(expected_replicas)
        self._max_num_seqs = dict(max_num_seqs or {})
        self._reports: dict[str, ReplicaReport] = {}
        self._draining_since_s: float | None = None
        # replica id -> (requests in flight, when it said so)
        self._polls: dict[str, tuple[int, float]] = {}
        self._assigned: dict[str, str] = {}  # replica id -> model
        self._history: dict[str, ReplicaHistory] = {}
        # The replicas the proxy routes to, as the launcher last read them; None = not known.
        self._routable: frozenset[str] | None = None

    def assign(self, replica_id: str) -> str:
        """The model a starting replica serves: the one missing the largest share of its replicas
        (live or starting ones count), so every model gets its first replica before any gets a
        second; ties go by the config's order. Asking again gives the same answer."""
        if replica_id in self._assigned:
            return self._assigned[replica_id]
        self._polls[replica_id] = (0, time.monotonic())
        present = {m: 0 for m in self._expected}
        for rid, model in self._assigned.items():
            if self._alive(rid) and model in present:
                present[model] += 1
        model = max(self._expected, key=lambda m: (self._expected[m] - present[m]) / self._expected[m])
        self._assigned[replica_id] = model
        return model

    def _alive(self, replica_id: str) -> bool:
        """Polled or reported lately (a starting replica polls before its engine is up)."""
        now = time.monotonic()
        polled = self._polls.get(replica_id)
        report = self._reports.get(replica_id)
        return (polled is not None and now - polled[1] < STALE_AFTER_S) or (
            report is not None and now - report.reported_at_s < STALE_AFTER_S
        )

    def report(self, replica_id: str, model: str, families: list[Metric]) -> None:
        facts = replica_facts(families)
        self._reports[replica_id] = ReplicaReport(replica_id, model, families, time.monotonic(), facts)
        self._history.setdefault(replica_id, ReplicaHistory()).add(time.time(), facts)

    def _live(self) -> list[ReplicaReport]:
        now = time.monotonic()
        return [r for r in self._reports.values() if now - r.reported_at_s < STALE_AFTER_S]

    def set_routable(self, replica_ids: list[str] | None) -> None:
        """The replicas the proxy routes to (the launcher reads HAProxy's stats); None: unknown."""
        self._routable = None if replica_ids is None else frozenset(replica_ids)

    def readiness(self) -> dict[str, Any]:
        """Per model: replicas expected and serving (live, and routed to by the proxy once the
        launcher has said which are); ready when every model has them all and the factory is not
        draining."""
        live = [r for r in self._live() if self._routable is None or r.replica_id in self._routable]
        models = {}
        for model, expected in self._expected.items():
            serving = sum(1 for r in live if r.model == model)
            models[model] = {"expected": expected, "serving": serving}
        draining = self._draining_since_s is not None
        ready = not draining and all(m["serving"] >= m["expected"] for m in models.values())
        return {"ready": ready, "draining": draining, "models": models}

    def replica_poll(self, replica_id: str, in_flight: int) -> dict[str, Any]:
        """A replica's periodic call: it says its load, it learns readiness."""
        self._polls[replica_id] = (in_flight, time.monotonic())
        return self.readiness()

    def start_draining(self) -> None:
        """From now on replicas refuse new requests (503); in-flight ones run to the end."""
        if self._draining_since_s is None:
            self._draining_since_s = time.monotonic()

    def in_flight(self) -> int | None:
        """Requests still running across live replicas, counted only from polls made after
        draining began (earlier counts could miss requests admitted just before); None until then."""
        since = self._draining_since_s
        now = time.monotonic()
        fresh = [(n, t) for n, t in self._polls.values() if now - t < STALE_AFTER_S]
        if since is None or not fresh or any(t <= since for _, t in fresh):
            return None
        return sum(n for n, _ in fresh)

    def engine_metrics(self) -> list[tuple[str, list[Metric]]]:
        """(replica id, vLLM metric families) for every live replica."""
        return [(r.replica_id, r.families) for r in self._live()]

    # -- the dashboard ---------------------------------------------------------------------------------

    def dashboard(self, with_history: bool) -> dict[str, Any]:
        """Per-replica rows (live or gone) and, on request, their last 15 minutes. Budgets and
        throttle state come from the governor (the replica answering merges them in)."""
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
