"""The cluster loop: GPUs (factory/sim/gpu.py) driven by the same policy code as the runtime.

Ticks of `tick_s`. At each tick, in order:
1. every `governor_interval_s`, when budgets are given (factory policy): each GPU's power over the
   last second, its unthrottled demand and efficiency -> `ThrottlePolicy.decide` -> per-GPU power
   caps, throttle levels and the admission level (level 3 sheds low-class arrivals);
2. factory policy, every `decision_s` per GPU with work (and at once when its power cap changes):
   `choose_batch` on the GPU's own `EnergyCurve` -> running cap, token budget, duty; the curve is
   fed `observe_step` from the GPU's current segment so its learning code runs too;
   stock: cap = max_num_seqs, budget = max_num_batched_tokens, duty 1;
3. the tick's arrivals are routed: stock round-robin, factory through `FleetRouter` (`rank` on
   `replica_view`s of `routing_stats` published every `stats_period_s`);
4. every GPU runs to the tick's end, taking its arrivals at their exact times.
After the last arrival the loop runs on until every GPU has drained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from factory.bench.tracefile import CLASSES
from factory.config import SchedulerConfig
from factory.policy.batch import BatchDecision, EnergyCurve, Slo, choose_batch
from factory.policy.profile import EnergyProfile
from factory.policy.throttle import Budgets, ReplicaPower, ThrottlePolicy
from factory.routing.stats import ROUTING_STATS_PERIOD_S, routing_stats
from factory.sim.gpu import Gpu, Requests
from factory.sim.route import FleetRouter, replica_ids
from factory.sim.workload import Workload

POLICIES = ("stock", "factory")
# The runtime scheduler's admission horizon, from the one place its default is declared.
HORIZON_TOKENS = SchedulerConfig.model_fields["admission_horizon_tokens"].default
MAX_CACHED_ANSWERS = 4096  # choose_batch answers kept (keyed by their exact inputs)


@dataclass(frozen=True)
class SimConfig:
    gpus: int
    policy: str  # "stock" | "factory"
    slo: Slo = field(default_factory=Slo)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    idle_w: float = 100.0
    kv_tokens: int = 400_000  # KV cache of one GPU, tokens
    gpus_per_node: int = 8
    budgets: Budgets | None = None
    tick_s: float = 0.1
    decision_s: float = 1.0
    governor_interval_s: float = 0.5
    stats_period_s: float = ROUTING_STATS_PERIOD_S
    sample_s: float = 10.0  # energy / power sample spacing in the result
    horizon_tok: int = HORIZON_TOKENS
    record_segments: bool = False  # keep every GPU's segment log (tests, validation)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.gpus < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.kv_tokens < 1:
            raise ValueError("gpus, max_num_seqs, max_num_batched_tokens and kv_tokens must be >= 1")


@dataclass
class SimRun:
    """What a run produced, raw; factory/sim/output.py turns it into result.json."""

    config: SimConfig
    workload: Workload
    req: Requests
    gpus: list[Gpu]
    samples: list[tuple[float, float, float]]  # (t_s, cluster energy counter J, cluster tokens)
    shed: list[int]  # arrivals refused by the governor's admission level
    end_s: float
    decisions: int = 0
    governor_steps: int = 0
    max_level: int = 0
    prefixed: int = 0
    prefix_hits: int = 0


def tables(profile: EnergyProfile, max_num_seqs: int) -> tuple[list[float], list[float], float, float]:
    """step_s[b] and power_w[b] for b = 0..max_num_seqs (the profile's workload mix), and the
    prefill cost: s per prompt token and its power (0, 0 when the profile has no prefill points)."""
    step = [0.0] + [profile.step_s(b) for b in range(1, max_num_seqs + 1)]
    power = [0.0] + [profile.power_w(b) for b in range(1, max_num_seqs + 1)]
    try:
        prefill = profile.curve("prefill")
    except LookupError:
        prefill = []
    if not prefill:
        return step, power, 0.0, 0.0
    top = prefill[-1]  # as EnergyCurve.from_profile: the largest measured prefill
    return step, power, 1.0 / top.tok_s, top.power_w


def run(profile: EnergyProfile, workload: Workload, cfg: SimConfig) -> SimRun:
    n_gpu, K = cfg.gpus, workload.cohort
    if K > cfg.max_num_seqs:
        raise ValueError(f"a cohort of {K} requests does not fit max_num_seqs {cfg.max_num_seqs}")
    step, power, prefill_s, prefill_w = tables(profile, cfg.max_num_seqs)
    req = Requests(
        workload.t_s.tolist(),
        workload.input_tok.tolist(),
        workload.output_tok.tolist(),
        workload.cls.tolist(),
        workload.prefix.tolist(),
    )
    factory = cfg.policy == "factory"
    gpus = [
        Gpu(
            i,
            req,
            step_s=step,
            power_w=power,
            idle_w=cfg.idle_w,
            prefill_s_per_tok=prefill_s,
            prefill_w=prefill_w,
            kv_tokens=cfg.kv_tokens,
            horizon_tok=cfg.horizon_tok if factory else None,
            cohort=K,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            record_segments=cfg.record_segments,
        )
        for i in range(n_gpu)
    ]
    ids = replica_ids(n_gpu)
    out = SimRun(cfg, workload, req, gpus, [], [], 0.0)
    ctl = _Control(profile, cfg, gpus, ids, power, out) if factory else None
    router = FleetRouter(ids, cohort=K, prefix_names=workload.prefix_names) if factory else None

    tick = cfg.tick_s
    gov_every, dec_every, stats_every, sample_every = (
        max(1, round(s / tick)) for s in (cfg.governor_interval_s, cfg.decision_s, cfg.stats_period_s, cfg.sample_s)
    )
    n_arrival_ticks = int(math.ceil(workload.duration_s / tick)) + 1
    edges = np.searchsorted(workload.t_s, np.arange(n_arrival_ticks + 1) * tick, side="left").tolist()
    t_arr, cls, prefix = req.t_s, req.cls, req.prefix
    low = CLASSES.index("low")
    rr = 0
    finished = [0] * n_gpu
    i_tick = 0
    while True:
        t = i_tick * tick
        if i_tick >= n_arrival_ticks and all(g.drained() for g in gpus):
            break
        if i_tick % sample_every == 0:
            out.samples.append((t, sum(g.energy_j(t) for g in gpus), sum(g.tokens_at(t) for g in gpus)))
        if ctl is not None:
            if ctl.throttle is not None and i_tick % gov_every == 0:
                ctl.govern(t)
            if i_tick % dec_every == 0:
                ctl.decide_all(t)
        if router is not None:
            for i, g in enumerate(gpus):  # the router's own count changes by its routing and the completions
                done = g.completed + g.failed
                if done != finished[i]:
                    finished[i] = done
                    router.set_ongoing(i, (router.routed[i] - done) * K)
            if i_tick % stats_every == 0:
                for i, g in enumerate(gpus):
                    router.publish(i, ctl.stats(i, g))
        if i_tick < n_arrival_ticks:
            shedding = ctl is not None and ctl.shed_low
            for a in range(edges[i_tick], edges[i_tick + 1]):
                if shedding and cls[a] == low:
                    out.shed.append(a)
                    req.ttft_s[a] = -2.0
                    continue
                if router is None:
                    dest = rr
                    rr = rr + 1 if rr + 1 < n_gpu else 0
                else:
                    dest = router.route(prefix[a], t_arr[a])
                gpus[dest].arrive(t_arr[a], a)
        t_end = (i_tick + 1) * tick
        for g in gpus:
            g.advance(t_end)
        i_tick += 1
    for g in gpus:
        g.close(t)
    out.end_s = t
    out.samples.append((t, sum(g.energy_j(t) for g in gpus), sum(g.tokens_at(t) for g in gpus)))
    if router is not None:
        out.prefixed, out.prefix_hits = router.prefixed, router.prefix_hits
    return out


class _Control:
    """The factory policy's per-GPU state: energy curves, decisions, power caps, the governor."""

    def __init__(
        self, profile: EnergyProfile, cfg: SimConfig, gpus: list[Gpu], ids: list[str], power: list[float], out: SimRun
    ):
        self.cfg, self.gpus, self.ids, self.power, self.out = cfg, gpus, ids, power, out
        busy_w = profile.power_w(cfg.max_num_seqs)
        self.curves = [
            EnergyCurve.from_profile(profile, max_batch=cfg.max_num_seqs, idle_w=cfg.idle_w, busy_w=busy_w)
            for _ in gpus
        ]
        n = len(gpus)
        self.decisions: list[BatchDecision | None] = [None] * n
        self.caps_w: list[float | None] = [None] * n
        self.levels = [0] * n
        self.shed_low = False
        budgets = cfg.budgets
        self.throttle = ThrottlePolicy() if budgets is not None and budgets.any() else None
        self._answers: dict[tuple, BatchDecision] = {}
        self._history: list[list[tuple[float, float, float]]] = [[] for _ in gpus]  # (t, J, tokens)

    def stats(self, i: int, g: Gpu) -> dict:
        d = self.decisions[i]
        cap = d.batch_cap if d is not None else None
        control = {"batch_cap": cap, "efficient_batch": cap, "throttle_level": self.levels[i]}
        return routing_stats(
            model="sim",
            running=g.running_req(),
            waiting=g.waiting_req(),
            max_num_seqs=self.cfg.max_num_seqs,
            control=control,
        )

    def decide_all(self, now: float) -> None:
        for i, g in enumerate(self.gpus):
            if not g.drained() or self.decisions[i] is None:  # an idle engine is not scheduling
                self.decide(i, now)

    def decide(self, i: int, now: float) -> None:
        g, cfg, curve = self.gpus[i], self.cfg, self.curves[i]
        if g.b and g.step_c == g.step_s[g.b]:  # the GPU's present decode step: the learning code runs as in the engine
            curve.observe_step(g.b, g.step_c)
        wait_s = g.oldest_wait_s(now)
        # choose_batch is pure: its answer is reused for exactly the same inputs, the curve's contents included.
        key = (*curve.snapshot().values(), curve.prefill_s_per_tok, curve.idle_w, curve.busy_w, self.caps_w[i], wait_s)
        d = self._answers.get(key)
        if d is None:
            d = choose_batch(
                curve,
                cfg.slo,
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                power_cap_w=self.caps_w[i],
                oldest_wait_s=wait_s,
            )
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers.clear()
            self._answers[key] = d
        self.decisions[i] = d
        self.out.decisions += 1
        g.set_control(now, d.batch_cap, d.token_budget, d.duty)

    def govern(self, now: float) -> None:
        cfg, replicas = self.cfg, []
        for i, g in enumerate(self.gpus):
            e_j, tok = g.energy_j(now), g.tokens_at(now)
            hist = self._history[i]
            hist.append((now, e_j, tok))
            while len(hist) > 1 and hist[1][0] <= now - 1.0:  # keep one reading at least 1 s back
                hist.pop(0)
            t0, e0, tok0 = hist[0]
            span = now - t0
            power_w = (e_j - e0) / span if span > 0 else g.seg_w
            load = min(g.running_req() + g.waiting_req(), cfg.max_num_seqs)
            demand_w = self.power[load] if load else cfg.idle_w
            tpj = (tok - tok0) / (e_j - e0) if span > 0 and tok > tok0 and e_j > e0 else None
            node = f"node-{i // cfg.gpus_per_node}"
            replicas.append(ReplicaPower(self.ids[i], node, power_w, max(demand_w, cfg.idle_w), cfg.idle_w, tpj))
        decision = self.throttle.decide(replicas, cfg.budgets, now)
        self.out.governor_steps += 1
        self.out.max_level = max(self.out.max_level, decision.admission.level)
        self.shed_low = "low" in decision.admission.shed
        for i, rid in enumerate(self.ids):
            control = decision.controls[rid]
            self.levels[i] = control.level
            if control.power_cap_w != self.caps_w[i]:
                self.caps_w[i] = control.power_cap_w
                self.decide(i, now)  # as the engine's apply_control: a new cap decides at once
