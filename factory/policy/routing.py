"""Which replica serves a request: prefix affinity, load, and energy.

Pure code (no Ray, no vLLM): the Ray Serve router (factory/routing/router.py) and the cluster
simulator call the same functions. The rules, and why:

- **Prefix affinity.** A replica that recently served a prompt's leading text still holds its KV
  blocks (vLLM's prefix cache), so a request sharing that prefix skips recomputing it there:
  the prefill's compute, time and energy are spent once instead of once per replica.
- **No piling.** Affinity never piles a hot prefix onto one replica while others idle: when
  the holder's load exceeds the least-loaded candidate's by more than a margin, or the holder
  is full while another has room, the request spills to the least loaded; the index then
  learns that replica holds the prefix too, so the prefix spreads over both by load.
- **Fill before spread.** A replica's energy per token falls as its batch grows, up to its
  efficient batch. Work with no cached prefix goes to the busiest replica still below its
  efficient batch, so the others stay idle (at their lowest power) until it is full. Where
  the efficient batch is unknown it goes to the least loaded.
- **Power caps.** A replica the governor throttles (level >= 1) is at its power cap: work sent
  there waits on its duty cycle while a free replica could run it, so throttled replicas rank
  after all free ones, even when they hold the prefix; the least throttled first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BLOCK_CHARS = 128  # ~32 tokens of English: finer than that, a match saves too little to matter
MAX_PREFIX_BLOCKS = 256  # prompts agreeing on their first 32k characters count as one prefix


def render_messages(messages: Iterable[Any]) -> str:
    """A chat as one string whose prefixes follow the chat's: role marker, then text, per message.

    Two chats that share their first messages share a prefix here, as their token sequences do
    after the chat template. Only text parts count (an image part's KV depends on its pixels,
    which the router does not see)."""
    return "".join(f"<|{_field(m, 'role')}|>{_text(_field(m, 'content'))}\n" for m in messages)


def render_prompt(prompt: Any) -> str:
    """A completion prompt as a string: text as is, token ids as digits; of a batch, the first
    (the whole batch goes to one replica)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return ",".join(map(str, prompt)) + ","
        return render_prompt(prompt[0])
    return ""


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(t for t in (_field(part, "text") for part in content) if isinstance(t, str))
    return ""


def prefix_hashes(text: str, *, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_PREFIX_BLOCKS) -> list[int]:
    """Cumulative hashes of the text's whole leading blocks: hash i stands for text[: (i+1) * block_chars].

    Python's string hash is salted per process, so these are valid only in the process that
    made them (the router keeps its index in memory, so that is all it needs)."""
    hashes, h = [], 0
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        h = hash((h, text[start : start + block_chars]))
        hashes.append(h)
    return hashes


class PrefixIndex:
    """Which prompt prefixes each replica received lately: the router's model of vLLM's prefix
    cache, which it cannot see.

    Per replica, an LRU of prefix-block hashes. A block is kept until the replica's share is
    full (`blocks_per_replica`, the cache evicting under pressure) or it has gone unused for
    `ttl_s` (other traffic has likely pushed it out). A prefix is recorded deepest block
    first, so its leading blocks are the last to go, as in vLLM, which frees a finished
    request's blocks tail first."""

    def __init__(self, *, blocks_per_replica: int = 16_384, ttl_s: float = 600.0):
        if blocks_per_replica < 1 or ttl_s <= 0:
            raise ValueError("blocks_per_replica must be >= 1 and ttl_s > 0")
        self.blocks_per_replica = blocks_per_replica
        self.ttl_s = ttl_s
        self._blocks: dict[str, OrderedDict[int, float]] = {}  # replica -> block hash -> last sent (s)

    def record(self, hashes: Sequence[int], replica: str, now_s: float) -> None:
        """`replica` was sent a prompt with these prefix hashes at `now_s` (a monotonic clock)."""
        lru = self._blocks.setdefault(replica, OrderedDict())
        for h in reversed(hashes):
            lru[h] = now_s
            lru.move_to_end(h)
        while len(lru) > self.blocks_per_replica:
            lru.popitem(last=False)

    def matches(self, hashes: Sequence[int], replicas: Iterable[str], now_s: float) -> dict[str, int]:
        """For each replica, how many leading blocks of the prompt it holds (0: none)."""
        depth = {}
        for replica in replicas:
            lru = self._blocks.get(replica)
            n = 0
            if lru:
                self._expire(lru, now_s)
                while n < len(hashes) and hashes[n] in lru:
                    n += 1
            depth[replica] = n
        return depth

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the blocks of replicas not in `keep` (gone from the deployment)."""
        keep = set(keep)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]

    def __len__(self) -> int:
        return sum(len(lru) for lru in self._blocks.values())

    def _expire(self, lru: OrderedDict[int, float], now_s: float) -> None:
        # Oldest first: `record` moves each block it touches to the end.
        while lru and next(iter(lru.values())) < now_s - self.ttl_s:
            lru.popitem(last=False)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows of one replica as it routes a request."""

    id: str
    load: int  # requests on it, running or waiting
    capacity: int | None = None  # most requests it runs at once now (its batch cap if any); None = not reported
    efficient_batch: int | None = None  # batch beyond which its tokens per joule stop improving; None = unknown
    throttle_level: int = 0  # 0 = free; >= 1 = held at its power cap by the governor
    engine_down: bool = False  # its engine died: it answers 503 until Serve replaces it

    def __post_init__(self) -> None:
        if self.load < 0 or (self.capacity is not None and self.capacity < 1) or self.throttle_level < 0:
            raise ValueError(f"invalid replica view {self}")

    @property
    def fill_target(self) -> int | None:
        """The load up to which new work should go here before another replica is woken."""
        if self.efficient_batch is None:
            return None
        return min(self.efficient_batch, self.capacity) if self.capacity is not None else self.efficient_batch


@dataclass(frozen=True, slots=True)
class Balance:
    """How much load imbalance prefix affinity may cause: the holder of a prefix keeps getting
    it while its load exceeds the least-loaded replica's by at most max(min_requests,
    fraction x its capacity)."""

    min_requests: int = 4
    fraction: float = 0.25

    def margin(self, view: ReplicaView) -> int:
        return max(self.min_requests, int(self.fraction * (view.capacity or 0)))


def rank(views: Sequence[ReplicaView], depth: Mapping[str, int], balance: Balance = Balance()) -> list[str]:
    """Replica ids, best first, for one request; `depth` is each replica's cached-prefix match
    in blocks (PrefixIndex.matches). Ties break by load, then id, so a ranking is reproducible. A
    replica whose engine died comes last: while Serve replaces it, its requests go to live ones."""
    down = sorted(v.id for v in views if v.engine_down)
    views = [v for v in views if not v.engine_down]
    if not views:
        return down  # it answers 503 + Retry-After
    coolest = min(v.throttle_level for v in views)
    free = sorted((v for v in views if v.throttle_level == coolest), key=lambda v: (v.load, v.id))
    throttled = sorted(
        (v for v in views if v.throttle_level != coolest), key=lambda v: (v.throttle_level, v.load, v.id)
    )
    first = _first_choice(free, depth, balance)
    return [first.id] + [v.id for v in free if v is not first] + [v.id for v in throttled] + down


def _first_choice(by_load: list[ReplicaView], depth: Mapping[str, int], balance: Balance) -> ReplicaView:
    least = by_load[0]
    holders = [v for v in by_load if depth.get(v.id, 0) > 0]
    if holders:
        best = max(holders, key=lambda v: depth[v.id])  # the first deepest: the least loaded of those
        return least if _would_pile(best, least, balance) else best
    fillable = [v for v in by_load if v.fill_target is not None and v.load < v.fill_target]
    if fillable:
        return max(fillable, key=lambda v: v.load)
    return least


def _would_pile(holder: ReplicaView, least: ReplicaView, balance: Balance) -> bool:
    """Whether sending one more request to `holder` rather than to `least` piles work up."""
    if holder.load - least.load > balance.margin(holder):
        return True
    full = holder.capacity is not None and holder.load >= holder.capacity
    return full and (least.capacity is None or least.load < least.capacity)


class Picks:
    """The requests the router sent each replica that the replica has not reported yet.

    The router picks a replica and HAProxy sends the request; the replica reports, every
    publication of its routing stats, how many requests it has received in all, how many it has in
    flight, and how long its requests take. Between two publications a burst routed in one go shows
    in neither: without this count it would all go to the same replica. A pick the replica has not
    reported counts as load until it has probably finished (the replica's typical request time
    after it was sent), so a stream of short requests sent one after the other does not look like a
    pile. Exact counts with one router (the factory runs one); a replica gone is forgotten."""

    def __init__(self, keep: int = 4096) -> None:
        self._sent: dict[str, deque[float]] = {}  # replica -> when its latest picks were sent
        self._count: dict[str, int] = {}  # replica -> picks sent there since the router started
        self._keep = keep

    def sent(self, replica: str, now_s: float) -> None:
        times = self._sent.setdefault(replica, deque(maxlen=self._keep))
        times.append(now_s)
        self._count[replica] = self._count.get(replica, 0) + 1

    def unseen(self, replica: str, received: int | None, now_s: float, duration_s: float | None = None) -> int:
        """Picks of `replica` beyond the `received` it last reported (None: never reported) that were
        sent within its typical request time `duration_s` (None: not known, all of them count)."""
        missing = max(0, self._count.get(replica, 0) - (received or 0))
        times = self._sent.get(replica, ())
        recent = list(times)[-missing:] if missing else []
        if duration_s is None:
            return len(recent)
        return sum(1 for t in recent if now_s - t <= duration_s)

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for replica in [r for r in self._sent if r not in keep]:
            del self._sent[replica]
            del self._count[replica]
