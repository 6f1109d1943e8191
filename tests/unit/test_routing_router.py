"""EnergyAwareRouter, the Ray Serve adapter of the routing policy, and the ingress router's reading
of a forwarded body, without a cluster: the router reads the routing fields FactoryRouter hands
it and the stats replicas publish, and counts the requests it has just picked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import json

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from factory.routing.ingress import routing_fields
from factory.routing.router import EnergyAwareRouter
from factory.routing.stats import routing_stats

DEPLOYMENT = DeploymentID(name="FactoryEngine", app_name="factory")
SYSTEM = "You answer questions about the grid. " * 20


def stats(running: int = 0, waiting: int = 0, model: str = "tiny", **control) -> dict:
    control.setdefault("throttle_level", 0)
    return routing_stats(model=model, running=running, waiting=waiting, max_num_seqs=16, control=control)


IDLE = stats()


def router(models: tuple[str, ...] = ("tiny", "small", "big")) -> EnergyAwareRouter:
    r = EnergyAwareRouter(
        deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
    )
    r.initialize_state(models=models)
    return r


def replica(name: str, stats: dict) -> SimpleNamespace:
    """What the router reads of Serve's RunningReplica."""
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), routing_stats=stats)


def pending(body, i: int) -> PendingRequest:
    """Needs a running event loop (it makes its future at once), as in Serve."""
    args = [body] if body is not None else []
    return PendingRequest(
        args=args, kwargs={}, metadata=RequestMetadata(request_id=f"r{i}", internal_request_id=f"i{i}")
    )


def body(**fields):
    """What FactoryRouter hands the router: the routing fields of a forwarded JSON body."""
    return routing_fields(json.dumps(fields).encode(), truncated=False)


def chat(question: str, model: str = "tiny"):
    return body(model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


async def choose(r: EnergyAwareRouter, replicas: list, body, i: int) -> list[str]:
    ranked = await r.choose_replicas(replicas, pending(body, i))
    assert all(len(group) == 1 for group in ranked)
    return [group[0].replica_id.unique_id for group in ranked]


def test_a_burst_routed_before_any_replica_answers_still_spreads():
    """Serve may route a burst in one go, before any request is sent: the router's own count of
    unconfirmed requests is then all that tells the replicas' loads apart."""
    r, replicas = router(), [replica("a", IDLE), replica("b", IDLE)]

    async def burst() -> list[str]:
        prompts = [body(model="tiny", prompt=f"task {i}") for i in range(6)]
        return [(await choose(r, replicas, p, i))[0] for i, p in enumerate(prompts)]

    assert asyncio.run(burst()) == ["a", "b", "a", "b", "a", "b"]


def test_a_routed_chat_prefix_draws_its_followers_within_the_margin():
    """Nothing is dispatched through the handle (HAProxy sends the request), so the pick itself
    teaches the prefix index where the prompt's KV blocks will be."""
    r, a, b = router(), replica("a", IDLE), replica("b", IDLE)
    busy_a = replica("a", stats(running=3, waiting=1))
    busier_a = replica("a", stats(running=5, waiting=1))

    async def scenario() -> None:
        assert await choose(r, [a, b], chat("What is a kilowatt-hour?"), 0) == ["a", "b"]
        assert await choose(r, [busy_a, b], chat("Why do prices peak at six?"), 1) == ["a", "b"]  # 4 ahead: a
        assert await choose(r, [busier_a, b], chat("Why do prices peak at seven?"), 2) == ["b", "a"]  # 6: spill

    asyncio.run(scenario())


def test_a_throttled_replica_is_tried_last():
    capped = stats(throttle_level=1, batch_cap=4)
    busy = stats(running=6)
    ranked = asyncio.run(choose(router(), [replica("a", capped), replica("b", busy)], chat("hello"), 0))
    assert ranked == ["b", "a"]


async def backs_off(r: EnergyAwareRouter, replicas: list, body) -> bool:
    request = pending(body, 99)
    assert await r.choose_replicas(replicas, request) == []
    return request.routing_context.should_backoff


def test_a_request_goes_only_to_replicas_of_its_model():
    """One engine deployment serves every model: the router picks among the request's model's
    replicas, however loaded, and falls back to replicas that have not said yet which model they
    serve (just started) only when none of its own has; with neither it waits for one to appear
    (model_wait_s), and only then lets another model's replica refuse it."""
    x, y_busy, fresh = replica("x", stats(model="small")), replica("y", stats(running=12, model="big")), replica("z", {})
    assert asyncio.run(choose(router(), [x, y_busy, fresh], chat("hi", model="big"), 0)) == ["y"]
    assert asyncio.run(choose(router(), [x, fresh], chat("hi", model="big"), 1)) == ["z"]
    # None of its model in view: it waits (an empty ranking, Serve backs off and asks again) ...
    assert asyncio.run(backs_off(router(), [x], chat("hi", model="big")))
    # ... then any replica takes it, and answers 503 + Retry-After itself.
    impatient = router()
    impatient._model_wait_s = 0.0
    assert asyncio.run(choose(impatient, [x], chat("hi", model="big"), 2)) == ["x"]
    # A model nobody serves goes to any replica, which answers 404.
    assert asyncio.run(choose(router(), [x], chat("hi", model="nope"), 4)) == ["x"]
    # No body (nothing forwarded): load alone decides, over all replicas.
    assert set(asyncio.run(choose(router(), [x, y_busy], None, 3))) == {"x", "y"}


def test_the_router_reads_model_and_prompt_from_a_body_and_the_model_from_a_cut_one():
    whole = json.dumps({"model": "big", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    fields = routing_fields(whole, truncated=False)
    assert fields.model == "big" and fields.messages[0]["content"] == "x" * 5000 and fields.prompt is None
    cut = routing_fields(whole[:1000], truncated=True)
    assert cut.model == "big" and not hasattr(cut, "messages")
    assert routing_fields(b'{"model": "a\\"b", "prompt": "p', truncated=True).model == 'a"b'
    assert routing_fields(b"", truncated=False) is None
    assert routing_fields(b"[1, 2]", truncated=False) is None
    assert routing_fields(b"{not json", truncated=False) is None
