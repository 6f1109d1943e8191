"""Prometheus exposition for the ingress: the factory's own `factory_*` metrics plus every
replica's `vllm:*` engine metrics, relabelled with the replica they came from.
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


class FactoryMetrics:
    """The ingress's own metrics, in a registry of their own (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "factory_http_requests",
            "HTTP requests answered by the ingress.",
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
        Gauge(
            "factory_http_requests_in_flight", "Requests admitted and not yet fully answered.", registry=self.registry
        ).set_function(lambda: self.in_flight_now)
        self.replicas_serving = Gauge(
            "factory_replicas_serving",
            "Replicas that reported in the last few seconds.",
            ["model"],
            registry=self.registry,
        )
        self.replicas_expected = Gauge(
            "factory_replicas_expected", "Replicas the config asks for.", ["model"], registry=self.registry
        )

    def observe_readiness(self, readiness: dict) -> None:
        for model, m in readiness.get("models", {}).items():
            self.replicas_serving.labels(model).set(m["serving"])
            self.replicas_expected.labels(model).set(m["expected"])

    def exposition(
        self, replica_families: Iterable[tuple[str, list[Metric]]], app_families: Iterable[Metric] = ()
    ) -> bytes:
        """Our own metrics, each replica's (`replica` label added) and app-wide ones (the ledger's)."""
        return (
            generate_latest(self.registry)
            + generate_latest(_ReplicaCollector(replica_families))
            + generate_latest(_Families(app_families))
        )


@functools.cache
def factory_metrics() -> FactoryMetrics:
    """This process's FactoryMetrics, made on first use (the ingress app is rebuilt per replica)."""
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
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight_now -= 1
