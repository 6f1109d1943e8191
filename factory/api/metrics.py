"""Prometheus exposition of the whole factory from any replica: every replica's `vllm:*` engine
series, its `factory_*` power, energy and HTTP series (each replica sends them to the state hub
once a second), relabelled with the replica they came from; the factory-wide series (readiness,
the ledger's and the governor's) as they are.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Paths whose traffic is counted per endpoint; everything else is one "other" series, so a
# client probing random URLs cannot blow up label cardinality.
_API_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models"}
DURATION_ALPHA = 0.1  # weight of each new request in the typical POST duration


class FactoryMetrics:
    """One replica's HTTP metrics (in a registry of their own, not the process-global one, which
    holds vLLM's) and its view of the factory's readiness."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "factory_http_requests",
            "HTTP requests answered, by the replica that answered.",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "factory_http_request_duration_seconds",
            "Time to the response headers (streams: to the first chunk).",
            ["path"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.in_flight_now = 0
        self.posts_received = 0  # what the router counts its picks against (routing stats)
        self.post_duration_s: float | None = None  # EWMA of how long a POST takes to its last byte
        Gauge(
            "factory_http_requests_in_flight", "Requests admitted and not yet fully answered.", registry=self.registry
        ).set_function(lambda: self.in_flight_now)
        self._readiness_registry = CollectorRegistry(auto_describe=True)
        self.replicas_serving = Gauge(
            "factory_replicas_serving",
            "Replicas that reported in the last few seconds.",
            ["model"],
            registry=self._readiness_registry,
        )
        self.replicas_expected = Gauge(
            "factory_replicas_expected", "Replicas the config asks for.", ["model"], registry=self._readiness_registry
        )

    def observe_post(self, seconds: float) -> None:
        last = self.post_duration_s
        self.post_duration_s = seconds if last is None else last + DURATION_ALPHA * (seconds - last)

    def http_families(self) -> list[Metric]:
        """This replica's HTTP series, for its report to the hub."""
        return list(self.registry.collect())

    def observe_readiness(self, readiness: dict) -> None:
        for model, m in readiness.get("models", {}).items():
            self.replicas_serving.labels(model).set(m["serving"])
            self.replicas_expected.labels(model).set(m["expected"])

    def exposition(
        self, replica_families: Iterable[tuple[str, list[Metric]]], app_families: Iterable[Metric] = ()
    ) -> bytes:
        """Readiness, each replica's series (`replica` label added) and app-wide ones (the ledger's)."""
        return (
            generate_latest(self._readiness_registry)
            + generate_latest(_ReplicaCollector(replica_families))
            + generate_latest(_Families(app_families))
        )


@functools.cache
def factory_metrics() -> FactoryMetrics:
    """This process's FactoryMetrics, made on first use."""
    return FactoryMetrics()


class _ReplicaCollector:
    """Adapts families collected in replica processes, adding a `replica` label to each sample."""

    def __init__(self, per_replica: Iterable[tuple[str, list[Metric]]]):
        self._per_replica = list(per_replica)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for replica, families in self._per_replica:
            for fam in families:
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.samples.append(s._replace(labels={**s.labels, "replica": replica}))
        return merged.values()


class _Families:
    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class RequestMetricsMiddleware:
    """Pure ASGI (no per-chunk overhead): counts each response by path and status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in _API_PATHS else "other"
        started = time.perf_counter()
        metrics = factory_metrics()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.requests.labels(path, str(message["status"])).inc()
                metrics.latency.labels(path).observe(time.perf_counter() - started)
            await send(message)

        if path == "other" and scope.get("path", "").startswith("/dashboard/api/stream"):
            # A dashboard's live stream never ends by itself: not a request a drain waits for.
            await self.app(scope, receive, send_wrapper)
            return
        # In flight until the last byte of a stream is sent: what a drain must wait for.
        metrics.in_flight_now += 1
        post = scope.get("method") == "POST"  # HAProxy asks the router for POSTs only
        if post:
            metrics.posts_received += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight_now -= 1
            if post:
                metrics.observe_post(time.perf_counter() - started)
