"""The batch policy: how many requests a replica runs at once and how many tokens a step carries.

Decode energy per token falls several-fold as the batch grows (one H100, Llama-3.1-8B: 0.455
J/token at batch 8, 0.077 at 256) while each step takes longer, so every token's latency grows.
The policy picks, from the replica's energy curve, the batch that sells the most tokens per joule
while a step still fits the time-per-output-token SLO, and, under a power cap, the operating point
(batch, duty cycle) that sells the most tokens within the cap.

Pure code: the scheduler inside vLLM's engine, the GPU governor check and the simulator all call
these functions; nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from factory.policy.profile import EnergyProfile

# p99 step time over mean step time: steps that carry a prefill chunk or run while the host is
# busy take longer than the curve's mean, so the mean must stay this far under the TPOT target.
P99_MARGIN = 1.25
# A step always carries at least this many prompt tokens when requests wait (progress for TTFT).
MIN_PREFILL_CHUNK = 32
# Weight of the profile's figure when the curve starts, in observations: a few real steps move it.
PRIOR_WEIGHT = 5.0
# J/token figures closer than this share count as equal (measurement noise), and the larger batch wins.
J_PER_TOK_TIE = 0.05
# A step observed slower than this multiple of the curve counts as this multiple (an outlier).
OUTLIER_FACTOR = 3.0
# The lowest duty cycle a power cap may impose: below it the replica is as good as off, and the
# governor sheds load instead.
MIN_DUTY = 0.05


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets, p99, in seconds; None = no target."""

    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True, slots=True)
class BatchDecision:
    batch_cap: int  # most requests in one step (and running at once)
    token_budget: int  # most tokens one step carries (decode + prefill chunk)
    duty: float  # fraction of wall time the engine may compute; < 1 under a power cap
    predicted_power_w: float | None  # average power at this operating point (None: curve unknown)
    predicted_j_per_tok: float | None
    reason: str


@dataclass(slots=True)
class _Bucket:
    step_s: float | None = None
    power_w: float | None = None
    n_step: float = 0.0
    n_power: float = 0.0


@dataclass
class EnergyCurve:
    """Step time and busy power by batch size, learnt online: an EWMA per log2 batch bucket,
    starting from a profile's figures (or nothing, then from the first observations).

    Between buckets values are interpolated in log2(batch), beyond the learnt ones clamped, the
    same way profiles are read (factory/policy/profile.py says why)."""

    max_batch: int
    idle_w: float
    busy_w: float  # power while computing when nothing better is known (profile or observation)
    alpha: float = 0.1
    prefill_s_per_tok: float | None = None  # extra step time per prompt token in a step
    _buckets: dict[int, _Bucket] = field(default_factory=dict)

    @classmethod
    def from_profile(
        cls,
        profile: EnergyProfile | None,
        *,
        max_batch: int,
        idle_w: float,
        busy_w: float,
        context: int | None = None,
        alpha: float = 0.1,
    ) -> EnergyCurve:
        curve = cls(max_batch=max_batch, idle_w=idle_w, busy_w=busy_w, alpha=alpha)
        if profile is None:
            return curve
        for b in curve.bucket_sizes():
            bucket = curve._buckets.setdefault(b, _Bucket())
            bucket.step_s = profile.step_s(b, context)
            bucket.power_w = profile.power_w(b, context)
            bucket.n_step = bucket.n_power = PRIOR_WEIGHT
        try:
            prefill = profile.curve("prefill", context)
        except LookupError:
            prefill = []
        if prefill:  # seconds per prompt token at the largest measured prefill
            p = prefill[-1]
            curve.prefill_s_per_tok = 1.0 / p.tok_s
        return curve

    def bucket_sizes(self) -> list[int]:
        """1, 2, 4, ... up to the largest power of two <= max_batch, then max_batch itself."""
        sizes = [1 << k for k in range(int(math.log2(self.max_batch)) + 1)]
        if sizes[-1] != self.max_batch:
            sizes.append(self.max_batch)
        return sizes

    def _bucket_of(self, batch: float) -> int:
        sizes = self.bucket_sizes()
        return min(sizes, key=lambda s: (abs(math.log2(s / batch)), s))

    # -- learning ----------------------------------------------------------------------------------
    def observe_step(self, batch: int, step_s: float, prefill_tok: int = 0) -> None:
        """One finished engine step: `batch` requests, `prefill_tok` of its tokens were prompt."""
        if batch < 1 or not step_s > 0:
            return
        if prefill_tok == 0:
            b = self._bucket_of(batch)
            known, at_bucket = self.step_s(batch), self.step_s(b)
            if known:  # one stalled step (host busy, a GC pause) must not make a batch look slow for good
                step_s = min(step_s, OUTLIER_FACTOR * known)
            # Scale to the bucket's own batch through the current curve, so a step at batch 12
            # teaches bucket 16 what a step at 16 would take, not what one at 12 took.
            value = step_s * at_bucket / known if known and at_bucket else step_s
            self._learn(b, "step_s", "n_step", value)
        elif prefill_tok >= 16 and self.step_s(batch):
            extra_s = step_s - self.step_s(batch)
            if extra_s > 0:
                per_tok = extra_s / prefill_tok
                prior = self.prefill_s_per_tok
                self.prefill_s_per_tok = per_tok if prior is None else prior + self.alpha * (per_tok - prior)

    def observe_power(self, batch: float, power_w: float) -> None:
        """Average power over a window in which the engine computed all the time at ~`batch`."""
        if batch >= 1 and power_w > 0:
            self._learn(self._bucket_of(batch), "power_w", "n_power", power_w)

    def _learn(self, size: int, name: str, count: str, value: float) -> None:
        bucket = self._buckets.setdefault(size, _Bucket())
        old, n = getattr(bucket, name), getattr(bucket, count)
        # Plain mean for the first observations (a fresh curve learns fast), EWMA after.
        weight = max(self.alpha, 1.0 / (n + 1))
        setattr(bucket, name, value if old is None else old + weight * (value - old))
        setattr(bucket, count, n + 1)

    # -- reading -----------------------------------------------------------------------------------
    def step_s(self, batch: float) -> float | None:
        """Seconds per decode step at this batch; None until anything is known."""
        return self._read(batch, "step_s")

    def power_w(self, batch: float) -> float:
        """Busy power at this batch, W."""
        return self._read(batch, "power_w") or self.busy_w

    def j_per_tok(self, batch: float) -> float | None:
        step = self.step_s(batch)
        return None if step is None else self.power_w(batch) * step / batch

    def _read(self, batch: float, name: str) -> float | None:
        known = sorted((s, getattr(b, name)) for s, b in self._buckets.items() if getattr(b, name) is not None)
        if not known:
            return None
        if batch <= known[0][0]:
            return known[0][1]
        if batch >= known[-1][0]:
            return known[-1][1]
        for (lo_b, lo_v), (hi_b, hi_v) in zip(known, known[1:], strict=False):
            if lo_b <= batch <= hi_b:
                t = math.log2(batch / lo_b) / math.log2(hi_b / lo_b)
                return lo_v + t * (hi_v - lo_v)
        raise AssertionError("unreachable: batch lies between the first and last bucket")

    def snapshot(self) -> dict[int, tuple[float | None, float | None]]:
        """{bucket: (step_s, power_w)}, for metrics and tests."""
        return {s: (b.step_s, b.power_w) for s, b in sorted(self._buckets.items())}


def duty_for_cap(power_cap_w: float, busy_w: float, idle_w: float) -> float:
    """Fraction of time the engine may compute so that idle + (busy - idle) x duty = the cap."""
    if busy_w <= power_cap_w:
        return 1.0
    if busy_w <= idle_w:
        return 1.0
    return max(MIN_DUTY, min(1.0, (power_cap_w - idle_w) / (busy_w - idle_w)))


def choose_batch(
    curve: EnergyCurve,
    slo: Slo,
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    power_cap_w: float | None = None,
    oldest_wait_s: float = 0.0,
) -> BatchDecision:
    """The operating point for the next steps.

    Without a power cap: the batch with the fewest joules per token among those whose step fits
    the TPOT target (mean step x P99_MARGIN <= tpot); J/token falls with batch, so in practice the
    largest such batch. Under a cap: each candidate batch runs at the duty cycle that holds the
    cap, and the one that sells the most tokens per second (= per joule, since power is the cap)
    wins, among those meeting TPOT at that duty if any do; the cap is never traded for latency.

    The token budget leaves room in each step for a prefill chunk as long as the step still
    fits the TPOT target; when a waiting request has used half its TTFT target, prefill gets the
    configured maximum so it is not starved.
    """
    sizes = [b for b in curve.bucket_sizes() if b <= max_num_seqs]
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    if curve.step_s(1) is None:  # nothing known yet: vLLM's own limits until steps are seen
        duty = duty_for_cap(power_cap_w, curve.busy_w, curve.idle_w) if power_cap_w else 1.0
        return BatchDecision(max_num_seqs, max_num_batched_tokens, duty, None, None, "no curve yet: configured maxima")

    def rate(b: int, duty: float) -> float:  # tokens per second at this operating point
        return duty * b / curve.step_s(b)

    def tpot_ok(b: int, duty: float) -> bool:
        return slo.tpot_s is None or curve.step_s(b) * P99_MARGIN / duty <= slo.tpot_s

    if power_cap_w is None:
        ok = [b for b in sizes if tpot_ok(b, 1.0)]
        pool = ok or [sizes[0]]
        # The largest batch within J_PER_TOK_TIE of the fewest J/token: on a flat curve (CPU steps
        # grow ~linearly with batch) measurement noise must not pull the cap down for nothing.
        fewest = min(curve.j_per_tok(b) for b in pool)
        best = max(b for b in pool if curve.j_per_tok(b) <= fewest * (1 + J_PER_TOK_TIE))
        duty = 1.0
        reason = (
            f"fewest J/token meeting TPOT {slo.tpot_s * 1000:.0f} ms" if slo.tpot_s and ok
            else "no batch meets TPOT: smallest" if slo.tpot_s
            else "fewest J/token (no TPOT target)"
        )  # fmt: skip
    else:
        options = [(b, duty_for_cap(power_cap_w, curve.power_w(b), curve.idle_w)) for b in sizes]
        ok = [(b, d) for b, d in options if tpot_ok(b, d)]
        pool = ok or options
        best, duty = max(pool, key=lambda o: (rate(*o), o[0]))
        reason = f"power cap {power_cap_w:.0f} W: most tokens/s within it" + ("" if ok else " (TPOT yields to the cap)")
    step = curve.step_s(best)
    power = curve.idle_w + (curve.power_w(best) - curve.idle_w) * duty
    j_per_tok = power / rate(best, duty)
    return BatchDecision(
        batch_cap=best,
        token_budget=_token_budget(curve, slo, best, step, duty, max_num_batched_tokens, oldest_wait_s),
        duty=duty,
        predicted_power_w=power,
        predicted_j_per_tok=j_per_tok,
        reason=reason,
    )


def _token_budget(
    curve: EnergyCurve,
    slo: Slo,
    batch: int,
    step_s: float,
    duty: float,
    max_num_batched_tokens: int,
    oldest_wait_s: float,
) -> int:
    starving = slo.ttft_s is not None and oldest_wait_s > slo.ttft_s / 2
    if slo.tpot_s is None or curve.prefill_s_per_tok is None or starving:
        return max_num_batched_tokens
    spare_s = slo.tpot_s * duty / P99_MARGIN - step_s
    chunk = int(spare_s / curve.prefill_s_per_tok) if spare_s > 0 else 0
    return min(max_num_batched_tokens, batch + max(MIN_PREFILL_CHUNK, chunk))
