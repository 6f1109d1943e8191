"""Throttle policy: power budgets + readings -> what each replica may draw, and who is admitted.

Two loops, both pure code here:

- `ThrottlePolicy` (the governor's outer loop, ~0.5 s): splits the site, node and per-GPU budgets
  into per-replica power caps, cutting the least efficient replicas (fewest tokens per joule)
  first, and sets the admission level of the lowest priority class: 0 normal, 1 capped (batch
  caps lowered, nothing refused), 2 slowed, 3 shed with 503 + Retry-After. Levels rise at once
  and fall only after the budget has cleared the threshold by a hysteresis band for a hold
  time, so a budget near a threshold cannot make admission flap.
- `DutyController` (inside each engine, every ~100 ms): holds the engine's measured average power
  at its cap by pausing between steps; a feed-forward duty from the energy curve plus an integral
  correction on the measured error, so a wrong curve still converges and a right one needs no
  correction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from factory.policy.batch import MIN_DUTY

PRIORITY_ORDER = ("low", "standard", "high")  # lowest first: throttled first
LEVEL_NAMES = {0: "normal", 1: "capped", 2: "slowed", 3: "shed"}
# A replica's cap never goes below idle power plus this share of its dynamic range: the engine
# must keep stepping (high-priority requests still run), and idle power cannot be capped away.
FLOOR_DYNAMIC_SHARE = 0.05
# Budget / demand ratios are reported up to this (a budget far above demand is "plenty", not infinity).
MAX_RATIO = 10.0


@dataclass(frozen=True, slots=True)
class Budgets:
    """Power budgets in W; None = no budget at that scope."""

    site_w: float | None = None
    node_w: float | None = None  # each node
    gpu_w: float | None = None  # each GPU (a replica's is gpu_w x its devices)
    nodes: Mapping[str, float] = field(default_factory=dict)  # one node's own budget
    replicas: Mapping[str, float] = field(default_factory=dict)  # one replica's own budget

    def to_dict(self) -> dict:
        return {"site_w": self.site_w, "node_w": self.node_w, "gpu_w": self.gpu_w,
                "nodes": dict(self.nodes), "replicas": dict(self.replicas)}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: Mapping) -> Budgets:
        return cls(doc.get("site_w"), doc.get("node_w"), doc.get("gpu_w"),
                   dict(doc.get("nodes") or {}), dict(doc.get("replicas") or {}))  # fmt: skip

    def any(self) -> bool:
        return any(v is not None for v in (self.site_w, self.node_w, self.gpu_w)) or bool(self.nodes or self.replicas)


@dataclass(frozen=True, slots=True)
class ReplicaPower:
    """What the governor knows of one replica (from its last report)."""

    replica: str
    node: str
    power_w: float  # measured average over the last ~1 s
    demand_w: float  # what it would draw unthrottled with its present load (the engine's estimate)
    idle_w: float  # what it draws computing nothing
    tokens_per_joule: float | None = None  # recent efficiency; None = not known yet
    devices: int = 1


@dataclass(frozen=True, slots=True)
class ReplicaControl:
    replica: str
    power_cap_w: float | None  # None = uncapped
    level: int
    reason: str


@dataclass(frozen=True, slots=True)
class Admission:
    """Who the replicas admit. `slowed` classes get limited concurrency, `shed` ones a 503."""

    level: int = 0
    slowed: tuple[str, ...] = ()
    shed: tuple[str, ...] = ()
    retry_after_s: int = 5
    reason: str = "no budget binds"

    def to_dict(self) -> dict:
        return {"level": self.level, "name": LEVEL_NAMES[self.level], "slowed": list(self.slowed),
                "shed": list(self.shed), "retry_after_s": self.retry_after_s, "reason": self.reason}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ScopeState:
    scope: str  # "site", "node:<id>", "replica:<id>"
    budget_w: float
    demand_w: float
    floor_w: float
    ratio: float  # the budget's share of the dynamic power (above floors); >= 1: not binding


@dataclass(frozen=True, slots=True)
class Decision:
    controls: dict[str, ReplicaControl]
    admission: Admission
    scopes: list[ScopeState]
    ratio: float  # the tightest scope's ratio (MAX_RATIO when there is no budget)


def floor_w(r: ReplicaPower) -> float:
    return r.idle_w + FLOOR_DYNAMIC_SHARE * max(0.0, r.demand_w - r.idle_w)


def allocate(
    replicas: Sequence[ReplicaPower], limits: Mapping[str, float], budget_w: float
) -> tuple[dict[str, float], ScopeState | None]:
    """Split `budget_w` among `replicas`, each wanting min(demand, its limit so far).

    When the wants exceed the budget, the excess is cut from the least efficient replica first
    (fewest tokens per joule; unknown efficiency counts as least), each down to its floor, then
    from the next. Returns the new limits and the scope's state."""
    want = {r.replica: min(r.demand_w, limits.get(r.replica, r.demand_w)) for r in replicas}
    floors = {r.replica: min(floor_w(r), want[r.replica]) for r in replicas}
    total, floor_total = sum(want.values()), sum(floors.values())
    dynamic = total - floor_total
    if dynamic > 0:  # > 1: headroom (a level falls only once the budget clears it by the band)
        ratio = min(MAX_RATIO, max(0.0, budget_w - floor_total) / dynamic)
    else:
        ratio = MAX_RATIO if budget_w >= total else 0.0
    out = dict(limits)
    out.update(want)
    excess = total - budget_w
    for r in sorted(replicas, key=lambda r: (r.tokens_per_joule or 0.0, r.replica)):
        if excess <= 0:
            break
        cut = min(excess, want[r.replica] - floors[r.replica])
        out[r.replica] = want[r.replica] - cut
        excess -= cut
    return out, ScopeState("", budget_w, total, floor_total, ratio)


class ThrottlePolicy:
    """Budgets + replica readings -> per-replica caps and the admission level, with hysteresis."""

    def __init__(
        self,
        *,
        slow_below: float = 0.75,
        shed_below: float = 0.5,
        hysteresis: float = 0.05,
        hold_s: float = 5.0,
        retry_after_s: int = 5,
    ):
        if not 0 < shed_below < slow_below <= 1:
            raise ValueError("need 0 < shed_below < slow_below <= 1")
        self.thresholds = {1: 1.0, 2: slow_below, 3: shed_below}  # level L while ratio < thresholds[L]
        self.hysteresis = hysteresis
        self.hold_s = hold_s
        self.retry_after_s = retry_after_s
        self._level = 0
        self._clear_since: float | None = None  # when the ratio last cleared the band below us

    def decide(self, replicas: Sequence[ReplicaPower], budgets: Budgets, now_s: float) -> Decision:
        limits: dict[str, float] = {}
        scopes: list[ScopeState] = []
        for r in replicas:  # per-GPU and per-replica budgets
            own = [b for b in (budgets.replicas.get(r.replica),
                               budgets.gpu_w * r.devices if budgets.gpu_w else None) if b is not None]  # fmt: skip
            if own:
                limits, state = allocate([r], limits, min(own))
                scopes.append(_named(state, f"replica:{r.replica}"))
        for node in sorted({r.node for r in replicas}):
            budget = budgets.nodes.get(node, budgets.node_w)
            if budget is not None:
                limits, state = allocate([r for r in replicas if r.node == node], limits, budget)
                scopes.append(_named(state, f"node:{node}"))
        if budgets.site_w is not None and replicas:
            limits, state = allocate(replicas, limits, budgets.site_w)
            scopes.append(_named(state, "site"))
        ratio = min((s.ratio for s in scopes), default=MAX_RATIO)
        level = self._level_for(ratio, now_s)
        binding = min(scopes, key=lambda s: s.ratio) if scopes else None
        controls = {}
        for r in replicas:
            cap = limits.get(r.replica)
            capped = cap is not None and cap < r.demand_w - 1e-9
            why = binding_reason(binding) if capped and binding else "within budget"
            controls[r.replica] = ReplicaControl(
                r.replica, cap if capped else None, max(1, level) if capped else (level if level >= 2 else 0), why
            )
        return Decision(controls, self._admission(level, binding), scopes, ratio)

    def _level_for(self, ratio: float, now_s: float) -> int:
        wanted = max((lvl for lvl, t in self.thresholds.items() if ratio < t), default=0)
        if wanted >= self._level:
            self._level, self._clear_since = wanted, None
            return wanted
        # Lower only when the ratio has cleared the current level's threshold by the band, for hold_s.
        if ratio >= self.thresholds[self._level] + self.hysteresis:
            if self._clear_since is None:
                self._clear_since = now_s
            if now_s - self._clear_since >= self.hold_s:
                # Step down to the level the ratio calls for, band included.
                self._level = max((lvl for lvl, t in self.thresholds.items() if ratio < t + self.hysteresis), default=0)
                self._clear_since = None
        else:
            self._clear_since = None
        return self._level

    def _admission(self, level: int, binding: ScopeState | None) -> Admission:
        lowest = PRIORITY_ORDER[:1]
        if level == 0 or binding is None:
            return Admission(0, retry_after_s=self.retry_after_s)
        why = binding_reason(binding)
        if level == 1:
            return Admission(1, retry_after_s=self.retry_after_s, reason=why + ": batch caps lowered")
        if level == 2:
            return Admission(2, slowed=lowest, retry_after_s=self.retry_after_s, reason=why + ": low priority slowed")
        return Admission(3, shed=lowest, retry_after_s=self.retry_after_s, reason=why + ": low priority shed")


def _named(state: ScopeState | None, scope: str) -> ScopeState:
    assert state is not None
    return ScopeState(scope, state.budget_w, state.demand_w, state.floor_w, state.ratio)


def binding_reason(s: ScopeState) -> str:
    """Stable while the budget stands (the demand's figure would change it every reading)."""
    return f"{s.scope} budget {s.budget_w:.0f} W below demand"


class DutyController:
    """Holds an engine's measured average power at a cap by pausing between its steps.

    duty = feed-forward (from the curve: the duty at which idle + (busy - idle) x duty = cap)
    + an integral of the measured error, in units of the dynamic range. `pause_s(step_s)` is
    the pause after a step of that length that makes computing time / wall time = duty."""

    def __init__(self, gain: float = 0.3, max_correction: float = 0.5):
        self.gain = gain
        self.max_correction = max_correction
        self.correction = 0.0
        self.duty = 1.0

    def reset(self) -> None:
        self.correction, self.duty = 0.0, 1.0

    def update(self, cap_w: float, measured_w: float, feed_forward_duty: float, busy_w: float, idle_w: float) -> float:
        """One control period: `measured_w` is the average power over the last window."""
        span = max(busy_w - idle_w, 1e-6)
        error = (cap_w - measured_w) / span
        self.correction = max(-self.max_correction, min(self.max_correction, self.correction + self.gain * error))
        self.duty = max(MIN_DUTY, min(1.0, feed_forward_duty + self.correction))
        if self.duty >= 1.0 and error > 0:  # not binding: do not wind up
            self.correction = min(self.correction, 1.0 - feed_forward_duty)
        return self.duty

    def pause_s(self, step_s: float) -> float:
        return 0.0 if self.duty >= 1.0 else step_s * (1.0 - self.duty) / self.duty
