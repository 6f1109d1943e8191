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

REPORT_INTERVAL_S = 1.0
# A replica that has not reported for this long is treated as gone (3 missed reports).
STALE_AFTER_S = 3.5


@dataclass
class ReplicaReport:
    replica_id: str
    model: str
    families: list[Metric] = field(default_factory=list)
    reported_at_s: float = 0.0


class StateHub:
    """Replica liveness and engine metrics, keyed by replica id."""

    def __init__(self, expected_replicas: dict[str, int]):
        self._expected = dict(expected_replicas)
        self._reports: dict[str, ReplicaReport] = {}
        self._draining_since_s: float | None = None
        # ingress replica id -> (requests in flight, when it said so)
        self._ingress: dict[str, tuple[int, float]] = {}

    def report(self, replica_id: str, model: str, families: list[Metric]) -> None:
        self._reports[replica_id] = ReplicaReport(replica_id, model, families, time.monotonic())

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
