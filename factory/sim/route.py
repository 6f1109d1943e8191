"""The factory's router in the simulator: factory/policy/routing.py's `rank` over the views the
runtime builds (factory/routing/stats.py: `routing_stats` published by each replica,
`replica_view` from those stats and the router's own count of requests on the replica).

Ranking 64 views per request costs ~40 µs, too much for millions of arrivals, so each call gets
one view per *class* of replicas whose views are equal except for their id (same load,
capacity, efficient batch and throttle level), the class's lowest id standing for it, plus every
replica holding the request's prefix. That is exact for the first choice, the only one used:
every rule in `rank` compares those fields and breaks ties by the lower id (load, then id), so
the first choice among all views is the lowest id of its class. A test checks the two agree.
"""

from __future__ import annotations

from factory.policy.routing import Balance, PrefixIndex, prefix_hashes, rank
from factory.routing.stats import replica_view

PREFIX_TEXT_CHARS = 4096  # a shared prefix of ~1k tokens: 32 hash blocks


def replica_ids(n: int) -> list[str]:
    """Zero-padded so that string order (rank's tie-break) is index order."""
    width = len(str(max(n - 1, 0)))
    return [f"gpu-{i:0{width}d}" for i in range(n)]


def _key(v) -> tuple:
    return (v.load, v.capacity, v.efficient_batch, v.throttle_level)


class FleetRouter:
    """Routes arrivals one at a time; the views are kept incrementally (one changes per arrival)."""

    def __init__(
        self,
        ids: list[str],
        *,
        cohort: int = 1,
        balance: Balance | None = None,
        index: PrefixIndex | None = None,
        prefix_names: list[str] | None = None,
    ):
        self.ids = ids
        self._pos = {rid: i for i, rid in enumerate(ids)}
        self.cohort = cohort
        self.balance = balance or Balance()
        self.index = index or PrefixIndex()
        self.prefix_names = prefix_names or []
        self._hashes: dict[int, list[int]] = {}
        n = len(ids)
        self.stats: list[dict] = [{} for _ in range(n)]  # the replicas' last published routing stats
        self.ongoing = [0] * n  # requests this router has on each replica
        self.routed = [0] * n  # arrivals routed to each replica
        self.views = [replica_view(ids[i], {}, 0) for i in range(n)]
        self._keys = [_key(v) for v in self.views]
        self._members: dict[tuple, set[int]] = {}
        self._rep: dict[tuple, int] = {}
        for i, k in enumerate(self._keys):
            self._join(i, k)
        self.prefixed = self.prefix_hits = 0

    # -- state from the replicas -------------------------------------------------------------------
    def publish(self, i: int, stats: dict) -> None:
        if stats != self.stats[i]:  # Serve rebroadcasts a replica's stats only when they changed
            self.stats[i] = stats
            self._refresh(i)

    def set_ongoing(self, i: int, requests: int) -> None:
        if requests != self.ongoing[i]:
            self.ongoing[i] = requests
            self._refresh(i)

    # -- routing -----------------------------------------------------------------------------------
    def route(self, prefix: int, now_s: float) -> int:
        """The replica (index) for one arrival; `prefix` is its prefix group, -1 for none."""
        views = self.views
        candidates = [views[i] for i in self._rep.values()]
        depth: dict[str, int] = {}
        hashes = None
        if prefix >= 0:
            hashes = self._prefix_hashes(prefix)
            depth = self.index.matches(hashes, self.ids, now_s)
            have = {v.id for v in candidates}
            candidates += [views[i] for i, rid in enumerate(self.ids) if depth[rid] > 0 and rid not in have]
        choice = rank(candidates, depth, self.balance)[0]
        i = self._pos[choice]
        if hashes is not None:
            self.prefixed += 1
            self.prefix_hits += depth[choice] > 0
            self.index.record(hashes, choice, now_s)
        self.routed[i] += 1
        self.ongoing[i] += self.cohort
        self._refresh(i)
        return i

    def _prefix_hashes(self, group: int) -> list[int]:
        hashes = self._hashes.get(group)
        if hashes is None:
            name = self.prefix_names[group] if group < len(self.prefix_names) else str(group)
            unit = f"[shared prefix {name}] "
            text = (unit * (PREFIX_TEXT_CHARS // len(unit) + 1))[:PREFIX_TEXT_CHARS]
            hashes = self._hashes[group] = prefix_hashes(text)
        return hashes

    # -- classes of equal views --------------------------------------------------------------------
    def _refresh(self, i: int) -> None:
        v = replica_view(self.ids[i], self.stats[i], self.ongoing[i])
        self.views[i] = v
        k = _key(v)
        old = self._keys[i]
        if k != old:
            self._leave(i, old)
            self._join(i, k)
            self._keys[i] = k

    def _join(self, i: int, k: tuple) -> None:
        members = self._members.get(k)
        if members is None:
            self._members[k] = {i}
            self._rep[k] = i
        else:
            members.add(i)
            if i < self._rep[k]:
                self._rep[k] = i

    def _leave(self, i: int, k: tuple) -> None:
        members = self._members[k]
        members.discard(i)
        if not members:
            del self._members[k], self._rep[k]
        elif self._rep[k] == i:
            self._rep[k] = min(members)
