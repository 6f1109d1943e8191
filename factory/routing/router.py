"""EnergyAwareRouter: the Ray Serve request router of a model whose config says `router: energy`.

It runs inside every holder of the model's deployment handle (the ingress) and ranks the
replicas for each request. All decisions are factory/policy/routing.py's; this class only
gathers their inputs: the request's prompt text, each replica's published routing stats
(factory/routing/stats.py), and the requests this router has on each replica.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from factory.policy.routing import (
    BLOCK_CHARS,
    MAX_PREFIX_BLOCKS,
    Balance,
    PrefixIndex,
    Unconfirmed,
    prefix_hashes,
    rank,
    render_messages,
    render_prompt,
)
from factory.routing.stats import replica_view

if TYPE_CHECKING:
    from ray.serve._private.replica_result import ReplicaResult


class EnergyAwareRouter(RequestRouter):
    """Prefix affinity, load and energy (see factory/policy/routing.py for the rules).

    Every ranked group holds one replica, so Serve tries them in exactly the policy's order.
    The prefix index learns from `on_request_routed`, which Serve calls once a replica has
    accepted the request."""

    def initialize_state(
        self,
        block_chars: int = BLOCK_CHARS,
        max_prefix_blocks: int = MAX_PREFIX_BLOCKS,
        blocks_per_replica: int = 16_384,
        prefix_ttl_s: float = 600.0,
        imbalance_min_requests: int = 4,
        imbalance_fraction: float = 0.25,
    ) -> None:
        """Tuning, from `request_router_kwargs` in the deployment's request_router_config."""
        self._block_chars = block_chars
        self._max_prefix_blocks = max_prefix_blocks
        self._index = PrefixIndex(blocks_per_replica=blocks_per_replica, ttl_s=prefix_ttl_s)
        self._balance = Balance(min_requests=imbalance_min_requests, fraction=imbalance_fraction)
        self._unconfirmed = Unconfirmed()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        now_s = time.monotonic()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        unconfirmed = self._unconfirmed.counts(now_s)
        views = [
            replica_view(rid, r.routing_stats, self._ongoing(r.replica_id) + unconfirmed.get(rid, 0))
            for rid, r in by_id.items()
        ]
        hashes = self._hashes(pending_request)
        order = rank(views, self._index.matches(hashes, by_id, now_s), self._balance)
        if order and pending_request is not None:
            self._unconfirmed.assign(pending_request.metadata.internal_request_id, order[0], now_s)
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        # From here on Serve's queue-length cache counts the request on its replica.
        self._unconfirmed.settle(pending_request.metadata.internal_request_id)
        self._index.record(self._hashes(pending_request), replica_id.unique_id, time.monotonic())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._unconfirmed.settle(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._index.forget(r.unique_id for r in self._replica_id_set)

    def _ongoing(self, replica_id: ReplicaID) -> int:
        """Requests on the replica as Serve's queue-length cache has it: incremented on send,
        decremented on completion, reset to the replica's own count on each answer."""
        return self.replica_queue_len_cache.get(replica_id) or 0

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None or not pending_request.args:
            return []
        body = pending_request.args[0]  # a ChatCompletionRequest or CompletionRequest from the ingress
        messages = getattr(body, "messages", None)
        text = render_messages(messages) if messages is not None else render_prompt(getattr(body, "prompt", None))
        return prefix_hashes(text, block_chars=self._block_chars, max_blocks=self._max_prefix_blocks)
