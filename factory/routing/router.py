"""EnergyAwareRouter: the Ray Serve request router of the engine deployment (`routing.policy: energy`).

HAProxy asks the factory's ingress request router (factory/routing/ingress.py) once per request
which replica takes it; that router runs this one through the engine deployment's handle, which
ranks the replicas. All decisions are factory/policy/routing.py's; this class only gathers their
inputs: the request's model and prompt text, each replica's published routing stats
(factory/routing/stats.py), and the requests this router has sent each replica lately.

Nothing is dispatched through the handle (the request goes out through HAProxy), so Serve never
confirms a pick: the prefix index learns at the pick, and the router's count of a replica's load is
what the replica last reported in flight plus the picks it had not received yet (Picks).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from factory.policy.routing import (
    BLOCK_CHARS,
    MAX_PREFIX_BLOCKS,
    Balance,
    PrefixIndex,
    Picks,
    prefix_hashes,
    rank,
    render_messages,
    render_prompt,
)
from factory.routing.stats import replica_view


# How long a request waits for a replica of its model to appear before any replica answers it (503).
MODEL_WAIT_S = 2.0


class EnergyAwareRouter(RequestRouter):
    """A replica of the request's model; among those, prefix affinity, load and energy (see
    factory/policy/routing.py for the rules). Every ranked group holds one replica, so Serve
    tries them in exactly the policy's order."""

    def initialize_state(
        self,
        block_chars: int = BLOCK_CHARS,
        max_prefix_blocks: int = MAX_PREFIX_BLOCKS,
        blocks_per_replica: int = 16_384,
        prefix_ttl_s: float = 600.0,
        imbalance_min_requests: int = 4,
        imbalance_fraction: float = 0.25,
        models: tuple[str, ...] = (),
        model_wait_s: float = MODEL_WAIT_S,
    ) -> None:
        """Tuning, from `request_router_kwargs` in the deployment's request_router_config;
        `models`: every model the deployment serves (the config's)."""
        self._models = frozenset(models)
        self._model_wait_s = model_wait_s
        self._waiting: dict[str, float] = {}  # request -> when it first found no replica of its model
        self._block_chars = block_chars
        self._max_prefix_blocks = max_prefix_blocks
        self._index = PrefixIndex(blocks_per_replica=blocks_per_replica, ttl_s=prefix_ttl_s)
        self._balance = Balance(min_requests=imbalance_min_requests, fraction=imbalance_fraction)
        self._picks = Picks()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        now_s = time.monotonic()
        body = self._body(pending_request)
        mine = serving(candidate_replicas, getattr(body, "model", None), self._models)
        if pending_request is not None:
            request = pending_request.metadata.internal_request_id
            mine = self._or_any_after_a_wait(mine, candidate_replicas, request, now_s)
        by_id = {r.replica_id.unique_id: r for r in mine}
        views = [
            replica_view(rid, r.routing_stats, self._ongoing(rid, r.routing_stats, now_s)) for rid, r in by_id.items()
        ]
        hashes = self._hashes(body)
        order = rank(views, self._index.matches(hashes, by_id, now_s), self._balance)
        if pending_request is not None:
            if order:
                self._picks.sent(order[0], now_s)
                self._index.record(hashes, order[0], now_s)
            else:
                # Nothing to offer yet: Serve then sleeps with backoff between tries (it retries at
                # once, without yielding to the event loop, unless told to back off).
                pending_request.routing_context.should_backoff = True
        return [[by_id[rid]] for rid in order]

    def _or_any_after_a_wait(
        self, mine: list[RunningReplica], every: list[RunningReplica], request: str, now_s: float
    ) -> list[RunningReplica]:
        """A request whose model has no replica in this router's view waits up to model_wait_s
        (a replica that just started may not have reached it yet), then goes to any replica,
        which answers 503 + Retry-After itself. (A 503 from the router would reach the client
        as HAProxy's 500.)"""
        if mine or not every:
            self._waiting.pop(request, None)
            return mine
        if len(self._waiting) > 10_000:  # requests that gave up waiting (none should)
            self._waiting = {k: t for k, t in self._waiting.items() if now_s - t < 60.0}
        first = self._waiting.setdefault(request, now_s)
        if now_s - first < self._model_wait_s:
            return []
        del self._waiting[request]
        return every

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = [r.unique_id for r in self._replica_id_set]
        self._index.forget(ids)
        self._picks.forget(ids)

    def _ongoing(self, replica_id: str, stats: dict, now_s: float) -> int:
        """The requests on a replica as far as this router knows: what it last reported in flight
        plus what was sent it since (not received when it reported) and is probably still running."""
        unseen = self._picks.unseen(replica_id, stats.get("received"), now_s, stats.get("duration_s"))
        return int(stats.get("in_flight") or 0) + unseen

    @staticmethod
    def _body(pending_request: PendingRequest | None) -> Any:
        """The request's routing fields (factory/routing/ingress.py), or None (no body forwarded)."""
        if pending_request is None or not pending_request.args:
            return None
        return pending_request.args[0]

    def _hashes(self, body: Any) -> list[int]:
        if body is None:
            return []
        messages = getattr(body, "messages", None)
        text = render_messages(messages) if messages is not None else render_prompt(getattr(body, "prompt", None))
        return prefix_hashes(text, block_chars=self._block_chars, max_blocks=self._max_prefix_blocks)


def serving(replicas: list[RunningReplica], model: str | None, models: frozenset[str]) -> list[RunningReplica]:
    """The replicas that serve `model`; while none has said so yet (a replica publishes its model
    once it runs), those that have not said which model they serve; else none (the router waits, then lets
    any replica refuse it: EnergyAwareRouter._or_any_after_a_wait). A request that names no model, or one nobody
    serves, goes to any replica, which answers it or refuses it (404) with a clear error."""
    if model is None or model not in models:
        return replicas
    same = [r for r in replicas if r.routing_stats.get("model") == model]
    return same or [r for r in replicas if not r.routing_stats.get("model")]
