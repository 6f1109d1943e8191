"""The routing stats a replica publishes through Ray Serve (`record_routing_stats`), and the
router's view of a replica built from them. One module owns both ends of that dict.

Serve's controller polls each replica every `request_routing_stats_period_s` and rebroadcasts
to the routers only when a replica's dict changed, so the dict holds no timestamps: an idle
replica costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric

from factory.policy.routing import ReplicaView

QUEUE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# How often Serve polls each replica for these stats (request_routing_stats_period_s).
ROUTING_STATS_PERIOD_S = 0.5


def queue_lengths(families: Iterable[Metric]) -> tuple[int, int]:
    """(running, waiting) requests from vLLM's gauges in a replica's registry, summed over its
    engines. Restrict the registry to QUEUE_GAUGES first: collecting all of vLLM's histograms
    twice a second would cost the replica far more than these two numbers."""
    counts = dict.fromkeys(QUEUE_GAUGES, 0.0)
    for family in families:
        for sample in family.samples:
            if sample.name in counts:
                counts[sample.name] += sample.value
    return int(counts[QUEUE_GAUGES[0]]), int(counts[QUEUE_GAUGES[1]])


def routing_stats(
    *,
    model: str,
    running: int,
    waiting: int,
    max_num_seqs: int,
    control: Mapping[str, Any],
    received: int = 0,
    in_flight: int = 0,
    duration_s: float | None = None,
    engine_down: bool = False,
) -> dict[str, Any]:
    """What a replica tells the routers: the model it serves, its queue (vLLM's running and waiting
    requests), the requests its HTTP server has received in all and has in flight now and how long
    they typically take, its size, what the power control set (throttle level, batch cap,
    efficient batch), and whether its engine died. The duration is rounded, so the dict changes
    (and is rebroadcast) seldom."""
    return {
        "model": model,
        "received": int(received),
        "in_flight": int(in_flight),
        "duration_s": round(duration_s, 2) if duration_s is not None else None,
        "running": int(running),
        "waiting": int(waiting),
        "max_num_seqs": int(max_num_seqs),
        "batch_cap": control.get("batch_cap"),
        "efficient_batch": control.get("efficient_batch"),
        "throttle_level": int(control.get("throttle_level") or 0),
        "engine_down": bool(engine_down),
    }


def replica_view(replica_id: str, stats: Mapping[str, Any], ongoing: int | None) -> ReplicaView:
    """The router's view of a replica from its last published stats and the router's own count
    of requests it has on that replica (`ongoing`, None when unknown).

    The stats lag by up to a polling period, the router's count misses other routers' requests:
    the load is the larger of the two. A replica that has not published yet ({}) shows only
    the router's count."""
    published = int(stats.get("running") or 0) + int(stats.get("waiting") or 0)
    limits = [int(c) for c in (stats.get("max_num_seqs"), stats.get("batch_cap")) if c]
    return ReplicaView(
        id=replica_id,
        load=max(published, ongoing or 0),
        capacity=min(limits) if limits else None,
        efficient_batch=stats.get("efficient_batch"),
        throttle_level=int(stats.get("throttle_level") or 0),
        engine_down=bool(stats.get("engine_down")),
    )
