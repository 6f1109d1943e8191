"""EnergyAwareRouter, the Ray Serve adapter of the routing policy, without a cluster: it reads
the request objects the ingress sends and the stats replicas publish, and counts the requests
it has just assigned."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from factory.routing.router import EnergyAwareRouter
from factory.routing.stats import routing_stats

DEPLOYMENT = DeploymentID(name="LLMServer:tiny", app_name="factory")
SYSTEM = "You answer questions about the grid. " * 20
IDLE = routing_stats(running=0, waiting=0, max_num_seqs=16, control={"throttle_level": 0})


def router() -> EnergyAwareRouter:
    r = EnergyAwareRouter(
        deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
    )
    r.initialize_state()
    return r


def replica(name: str, stats: dict) -> SimpleNamespace:
    """What the router reads of Serve's RunningReplica."""
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), routing_stats=stats)


def pending(body, i: int) -> PendingRequest:
    """Needs a running event loop (it makes its future at once), as in Serve."""
    return PendingRequest(
        args=[body, None], kwargs={}, metadata=RequestMetadata(request_id=f"r{i}", internal_request_id=f"i{i}")
    )


def chat(question: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="tiny", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    )


async def choose(r: EnergyAwareRouter, replicas: list, body, i: int) -> list[str]:
    ranked = await r.choose_replicas(replicas, pending(body, i))
    assert all(len(group) == 1 for group in ranked)
    return [group[0].replica_id.unique_id for group in ranked]


def test_a_burst_routed_before_any_replica_answers_still_spreads():
    """Serve may route a burst in one go, before any request is sent: the router's own count of
    unconfirmed requests is then all that tells the replicas' loads apart."""
    r, replicas = router(), [replica("a", IDLE), replica("b", IDLE)]

    async def burst() -> list[str]:
        prompts = [CompletionRequest(model="tiny", prompt=f"task {i}") for i in range(6)]
        return [(await choose(r, replicas, p, i))[0] for i, p in enumerate(prompts)]

    assert asyncio.run(burst()) == ["a", "b", "a", "b", "a", "b"]


def test_a_routed_chat_prefix_draws_its_followers_within_the_margin():
    r, a, b = router(), replica("a", IDLE), replica("b", IDLE)
    busy_a = replica("a", routing_stats(running=3, waiting=1, max_num_seqs=16, control={"throttle_level": 0}))
    busier_a = replica("a", routing_stats(running=5, waiting=1, max_num_seqs=16, control={"throttle_level": 0}))

    async def scenario() -> None:
        first = pending(chat("What is a kilowatt-hour?"), 0)
        assert [g[0].replica_id.unique_id for g in await r.choose_replicas([a, b], first)] == ["a", "b"]
        r.on_request_routed(first, a.replica_id, None)  # Serve: replica a accepted it
        r.on_request_completed(a.replica_id, "i0")
        assert await choose(r, [busy_a, b], chat("Why do prices peak at six?"), 1) == ["a", "b"]  # 4 ahead: a
        assert await choose(r, [busier_a, b], chat("Why do prices peak at seven?"), 2) == ["b", "a"]  # 6: spill

    asyncio.run(scenario())


def test_a_throttled_replica_is_tried_last():
    capped = routing_stats(running=0, waiting=0, max_num_seqs=16, control={"throttle_level": 1, "batch_cap": 4})
    busy = routing_stats(running=6, waiting=0, max_num_seqs=16, control={"throttle_level": 0})
    ranked = asyncio.run(choose(router(), [replica("a", capped), replica("b", busy)], chat("hello"), 0))
    assert ranked == ["b", "a"]
