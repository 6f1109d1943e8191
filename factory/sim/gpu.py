"""One simulated GPU (one replica) at engine-step granularity, its truth taken from an energy profile.

A decode step with b running requests takes `step_s[b]` and draws `power_w[b]` (the profile's
figures, precomputed per batch); idle draws `idle_w`. A step that admits requests also computes
their prompts: `prefill_s_per_tok` more seconds per prompt token when the profile has prefill
points (published decode figures already include prefill: then it is 0). A newly admitted request
produces its first token at the end of the step that admits it.

Between events the batch is constant, so the GPU advances in *segments* of k identical steps:
one segment ends at the next completion (the running heap is keyed by the step index at which a
request finishes), when the KV cache would overflow, or at the first step boundary after an
arrival it could admit (or a control change). Under a power cap each step is followed by a
pause of step x (1 - duty) / duty at idle power. Hot paths use plain lists and locals.

Scheduler (vLLM-like, FCFS): each boundary admits waiting requests while running < cap and the
step's prompt tokens stay within token_budget - running (at least one); KV counted in tokens: a
running request holds its prompt + generated tokens. Stock admits when the free KV holds the prompt
plus the step's new tokens; the factory (as factory/engine/scheduler.py) also reserves
`horizon_tok` of growth per running request. When the next step would overflow the KV, the newest
running request is preempted (recompute: it goes back to the front of the queue, keeps its
generated tokens and re-prefills prompt + generated).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

INF = math.inf


class Requests:
    """Per-request state shared by every GPU, as plain lists indexed by arrival (fast to index)."""

    __slots__ = ("t_s", "n_in", "n_out", "gen", "ttft_s", "e2e_s", "cls", "prefix")

    def __init__(self, t_s, n_in, n_out, cls, prefix):
        self.t_s: list[float] = list(t_s)
        self.n_in: list[int] = list(n_in)
        self.n_out: list[int] = list(n_out)
        self.cls = cls
        self.prefix = prefix
        n = len(self.t_s)
        self.gen: list[int] = [0] * n  # tokens generated before the present admission (preemption)
        self.ttft_s: list[float] = [-1.0] * n  # -1: not yet; -2: failed
        self.e2e_s: list[float] = [-1.0] * n


class Gpu:
    """One replica. `advance(t)` runs it to time t; `arrive` hands it a request due at its time."""

    __slots__ = tuple(
        "index req step_s power_w idle_w prefill_s_per_tok prefill_w kv_tokens horizon_tok cohort "
        "max_num_seqs cap budget duty kv_cap t0 S k dt pause_s seg_end seg_w b new step_c comp_w running nseq "
        "kv_a order waiting pending budget_blocked busy_j pause_j idle_j busy_s pause_s_total idle_s tokens "
        "steps completed preemptions failed itl log".split()
    )

    def __init__(
        self,
        index: int,
        req: Requests,
        *,
        step_s: list[float],
        power_w: list[float],
        idle_w: float,
        prefill_s_per_tok: float,
        prefill_w: float,
        kv_tokens: int,
        horizon_tok: int | None,
        cohort: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        record_segments: bool = False,
    ):
        self.index, self.req = index, req
        self.step_s, self.power_w, self.idle_w = step_s, power_w, idle_w  # indexed by requests in the step
        self.prefill_s_per_tok, self.prefill_w = prefill_s_per_tok, prefill_w
        self.kv_tokens, self.horizon_tok, self.cohort = kv_tokens, horizon_tok, cohort
        self.max_num_seqs = max_num_seqs
        self.cap, self.budget, self.duty = max_num_seqs, max_num_batched_tokens, 1.0
        # the segment in progress: from t0 (step index S), k steps of dt (compute step + pause)
        self.t0, self.S, self.k, self.dt, self.pause_s = 0.0, 0, 0, INF, 0.0
        self.seg_end, self.seg_w, self.b, self.new = INF, idle_w, 0, 0
        self.step_c, self.comp_w = 0.0, idle_w  # the segment's compute time per step (s) and its power (W)
        self.kv_cap = kv_tokens // cohort  # KV tokens per member of a cohort
        self.running: list[tuple[int, int, int, int]] = []  # heap of (finish step, order, rid, kv term)
        self.nseq = 0  # running arrivals (each = `cohort` requests)
        self.kv_a = 0  # KV tokens of the running set at step S = cohort x (kv_a + nseq x S)
        self.order = 0
        self.waiting: deque[int] = deque()
        self.pending: deque[tuple[float, int]] = deque()  # routed here, not yet arrived: (t_s, rid)
        self.budget_blocked = False
        self.busy_j = self.pause_j = self.idle_j = 0.0
        self.busy_s = self.pause_s_total = self.idle_s = 0.0
        self.tokens = self.steps = self.completed = self.preemptions = self.failed = 0
        self.itl: dict[float, int] = {}  # inter-token gap (s) -> how many gaps (requests)
        self.log: list[tuple] | None = [] if record_segments else None  # (t0, t1, k, batch, energy_j, tokens)

    # -- what the cluster sees ---------------------------------------------------------------------
    def running_req(self) -> int:
        return self.nseq * self.cohort

    def waiting_req(self) -> int:
        return (len(self.waiting) + len(self.pending)) * self.cohort

    def drained(self) -> bool:
        return not (self.nseq or self.waiting or self.pending)

    def energy_j(self, t: float) -> float:
        """Energy counter at t (t0 <= t <= the segment's end), J; linear inside a segment."""
        return self.busy_j + self.pause_j + self.idle_j + (t - self.t0) * self.seg_w

    def tokens_at(self, t: float) -> float:
        return self.tokens + (0.0 if self.b == 0 else (t - self.t0) / self.dt * self.b)

    def oldest_wait_s(self, now: float) -> float:
        if self.waiting:
            return max(0.0, now - self.req.t_s[self.waiting[0]])
        if self.pending and self.pending[0][0] <= now:
            return now - self.pending[0][0]
        return 0.0

    # -- inputs ------------------------------------------------------------------------------------
    def arrive(self, t: float, rid: int) -> None:
        self.pending.append((t, rid))
        if self.nseq == 0:
            if t < self.seg_end:
                self.seg_end = t
        elif not self.waiting and (self.nseq + 1) * self.cohort <= self.cap:
            self._cut(t)

    def set_control(self, now: float, cap: int, budget: int, duty: float) -> None:
        """A new operating point (factory policy): takes effect at the next step boundary."""
        cap = max(self.cohort, min(cap, self.max_num_seqs))
        opens = cap > self.cap and (self.waiting or self.pending)
        changed = duty != self.duty
        self.cap, self.budget, self.duty = cap, budget, duty
        if self.nseq and (opens or changed):
            self._cut(now)

    def _cut(self, t: float) -> None:
        """End the segment at the first step boundary at or after t."""
        k = max(1, math.ceil((t - self.t0) / self.dt))
        if k < self.k:
            self.k = k
            self.seg_end = self.t0 + k * self.dt

    def advance(self, t_end: float) -> None:
        while self.seg_end <= t_end:
            self._end_segment()
            self._boundary()

    def close(self, t_end: float) -> None:
        """Run to t_end and book the idle time up to it (the fleet's last step may end before)."""
        self.advance(t_end)
        if self.nseq == 0 and t_end > self.t0:
            self.idle_s += t_end - self.t0
            self.idle_j += (t_end - self.t0) * self.idle_w
            self.t0 = t_end

    # -- the engine --------------------------------------------------------------------------------
    def _end_segment(self) -> None:
        t0, t1, k, b = self.t0, self.seg_end, self.k, self.b
        if b:
            busy_s = k * self.step_c
            busy_j = busy_s * self.comp_w
            pause_s = k * self.pause_s
            self.busy_s += busy_s
            self.busy_j += busy_j
            self.pause_s_total += pause_s
            self.pause_j += pause_s * self.idle_w
            self.tokens += k * b
            self.steps += k
            gaps = (k * self.nseq - self.new) * self.cohort  # a request's first token is its TTFT, not a gap
            if gaps:
                self.itl[self.dt] = self.itl.get(self.dt, 0) + gaps
            if self.log is not None:
                self.log.append((t0, t1, k, b, busy_j + pause_s * self.idle_w, k * b))
        else:
            self.idle_s += t1 - t0
            self.idle_j += (t1 - t0) * self.idle_w
            if self.log is not None:
                self.log.append((t0, t1, 0, 0, (t1 - t0) * self.idle_w, 0))
        S = self.S + k
        self.t0, self.S = t1, S
        heap = self.running
        if heap and heap[0][0] <= S:
            t_done = t1 - self.pause_s  # the last token comes at the end of the compute, before the pause
            arrivals, e2e = self.req.t_s, self.req.e2e_s
            while heap and heap[0][0] <= S:
                _, _, rid, a = heapq.heappop(heap)
                self.kv_a -= a
                self.nseq -= 1
                self.completed += 1
                e2e[rid] = t_done - arrivals[rid]

    def _boundary(self) -> None:
        t, pend, wait = self.t0, self.pending, self.waiting
        while pend and pend[0][0] <= t:
            wait.append(pend.popleft()[1])
        S, K = self.S, self.cohort
        while self.nseq and self.kv_a + self.nseq * (S + 1) > self.kv_cap:  # the next step would overflow
            self._preempt_newest()
        admitted, prompt_tok = (), 0
        self.budget_blocked = False
        if wait and (self.nseq + 1) * K <= self.cap:
            admitted, prompt_tok = self._admit()
        nseq = self.nseq
        if not nseq:  # idle until the next arrival
            self.b = self.k = self.new = 0
            self.pause_s, self.dt, self.seg_w = 0.0, INF, self.idle_w
            self.seg_end = pend[0][0] if pend else INF
            return
        b = nseq * K
        step, comp_w = self.step_s[b], self.power_w[b]
        k = self.running[0][0] - S  # to the next completion
        if prompt_tok and self.prefill_s_per_tok:  # a step that carries prompts is longer: alone
            extra = prompt_tok * self.prefill_s_per_tok
            comp_w = (step * comp_w + extra * self.prefill_w) / (step + extra)
            step += extra
            k = 1
        duty = self.duty
        pause = step * (1.0 - duty) / duty if duty < 1.0 else 0.0
        dt = step + pause
        room = (self.kv_cap - self.kv_a - nseq * S) // nseq  # steps before the KV is full
        if room < k:
            k = room
        if self.budget_blocked:
            k = 1
        elif pend and not wait and (nseq + 1) * K <= self.cap:
            ka = math.ceil((pend[0][0] - t) / dt)
            if ka < k:
                k = ka if ka > 1 else 1
        new = 0
        if admitted:
            ttft, arrivals = self.req.ttft_s, self.req.t_s
            for rid in admitted:
                if ttft[rid] < 0.0:
                    ttft[rid] = t + step - arrivals[rid]
                    new += 1
        self.b, self.k, self.new, self.step_c, self.comp_w, self.pause_s, self.dt = b, k, new, step, comp_w, pause, dt
        self.seg_end = t + k * dt
        self.seg_w = (step * comp_w + pause * self.idle_w) / dt

    def _admit(self) -> tuple[list[int], int]:
        """Admit from the head of the queue; returns the admitted requests and their prompt tokens."""
        req, wait, heap, K, S = self.req, self.waiting, self.running, self.cohort, self.S
        n_in, n_out, gen = req.n_in, req.n_out, req.gen
        limit = self.cap // K
        budget = self.budget - self.nseq * K  # prompt tokens this step may carry
        # The factory reserves growth for every running request; stock only the step's own new tokens.
        grow = 1 if self.horizon_tok is None else self.horizon_tok
        admitted: list[int] = []
        prompt_tok = 0
        while wait and self.nseq < limit:
            rid = wait[0]
            p = n_in[rid] + gen[rid]
            if admitted and prompt_tok + p * K > budget:
                self.budget_blocked = True
                break
            free = self.kv_cap - self.kv_a - self.nseq * S
            if p + grow * (self.nseq + 1) > free:
                if self.nseq:
                    break  # wait for a completion to free KV
                if n_in[rid] + n_out[rid] > self.kv_cap:  # could never finish on this GPU
                    wait.popleft()
                    req.ttft_s[rid] = -2.0
                    self.failed += 1
                    continue
                # an empty engine always takes one
            wait.popleft()
            a = p - S
            self.order += 1
            heapq.heappush(heap, (S + n_out[rid] - gen[rid], self.order, rid, a))
            self.kv_a += a
            self.nseq += 1
            prompt_tok += p * K
            admitted.append(rid)
        return admitted, prompt_tok

    def _preempt_newest(self) -> None:
        heap, S = self.running, self.S
        i = max(range(len(heap)), key=lambda j: heap[j][1])
        finish, _, rid, a = heap[i]
        heap[i] = heap[-1]
        heap.pop()
        heapq.heapify(heap)
        self.kv_a -= a
        self.nseq -= 1
        self.req.gen[rid] = self.req.n_out[rid] - (finish - S)  # what it had generated: kept, re-prefilled
        self.waiting.appendleft(rid)
        self.preemptions += self.cohort
