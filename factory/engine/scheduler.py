"""vLLM scheduler classes for the factory's replicas (passed to vLLM as `scheduler_cls`).

- `MeteringScheduler` / `AsyncMeteringScheduler`: vLLM's own scheduling, with the engine meter
  (factory/engine/meter.py) told what each step carried and when it ran, and which requests ended.
- `EnergyAwareScheduler` / `AsyncEnergyAwareScheduler`: the same, plus the batch policy
  (factory/policy/batch.py) applied every step: a running-request cap and a step token budget
  that sell the most tokens per joule within the SLO and the replica's power cap; pauses between
  steps that hold measured power at the cap (factory/policy/throttle.py: DutyController);
  admission of a waiting request only when its KV blocks will fit, so preemption (which
  recomputes, burning the energy twice) stays rare; the governor's caps arriving over a ZeroMQ
  control socket.

Two classes each because vLLM picks its async scheduler on GPUs and the plain one on CPUs, and a
custom class must subclass the matching one. Caps only ever go below the configured
`max_num_seqs` / `max_num_batched_tokens`: vLLM sized its buffers from those.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import deque
from typing import Any

import zmq
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from factory.engine.meter import EngineMeter
from factory.engine.wire import SCHEDULER_ENV, Control, SchedulerSettings, SchedulerStats, decode_control, scheduler_settings
from factory.policy.batch import BatchDecision, EnergyCurve, Slo, choose_batch
from factory.policy.profile import load_profile
from factory.policy.throttle import DutyController

log = logging.getLogger("factory.scheduler")

# How often the operating point is recomputed and the duty controller updated (the sampler's pace).
DECIDE_INTERVAL_S = 0.1
# The power window the duty controller regulates over: at least this, about ten steps, at most the max.
POWER_WINDOW_S = 0.5
MAX_POWER_WINDOW_S = 2.0
# Pauses are slept in slices this long, so a new cap (or lifted one) lands mid-pause.
PAUSE_SLICE_S = 0.02
# The most pause owed at once, s.
MAX_PAUSE_S = 1.0
# Step energy histogram buckets, J (a CPU step of the embedded model is ~10 J, an H100 step 5-15 J).
STEP_ENERGY_BUCKETS_J = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
# Completion lengths of finished requests, averaged, predict how far running requests will grow.
OUTPUT_LEN_ALPHA = 0.05
# What the average is before any request finished (chat answers are mostly shorter).
OUTPUT_LEN_PRIOR = 256.0
# How fast a measured board's idle power is learnt, per idle window.
IDLE_ALPHA = 0.1
# Running requests are assumed to grow to this multiple of the average completion (bounded by max_tokens).
OUTPUT_LEN_HEADROOM = 1.5


class _Metered:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._meter = EngineMeter.from_env()

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        if self._meter is not None:
            self._meter.on_schedule(id(out), out.num_scheduled_tokens, self.requests)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._meter is not None:
            self._meter.on_step_done(id(scheduler_output), outputs.values())
        return outputs

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        if self._meter is not None and finished:
            # The front end also finishes requests that hit a stop string: those completed.
            status = "aborted" if finished_status == RequestStatus.FINISHED_ABORTED else "completed"
            self._meter.on_finished_outside([r.request_id for r in finished], status)
        return finished

    def shutdown(self) -> None:
        super().shutdown()
        if self._meter is not None:
            self._meter.close()


class MeteringScheduler(_Metered, Scheduler):
    """vLLM's synchronous scheduler, metered (CPU replicas)."""


class AsyncMeteringScheduler(_Metered, AsyncScheduler):
    """vLLM's async scheduler, metered (GPU replicas, where vLLM schedules step N+1 while N runs)."""


class _EnergyAware(_Metered):
    """The batch policy, the power cap and KV-aware admission on top of the metered scheduler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raw = os.environ.get(SCHEDULER_ENV)
        cfg = scheduler_settings(raw) if raw else SchedulerSettings()
        self._max_seqs = self.max_num_running_reqs
        self._max_active = self.max_num_active_reqs
        self._max_tokens = self.max_num_scheduled_tokens
        self._chunked = bool(self.scheduler_config.enable_chunked_prefill)
        self._slo = Slo(cfg.slo_ttft_s, cfg.slo_tpot_s)
        profile = load_profile(cfg.profile) if cfg.profile else None
        idle_w, busy_w = self._power_range(profile)
        self._curve = EnergyCurve.from_profile(profile, max_batch=self._max_seqs, idle_w=idle_w, busy_w=busy_w)
        self._duty = DutyController()
        self._duty_at = 0.0
        self._cap_set_at = 0.0  # when the power cap last changed
        self._control: dict[str, Any] = {"version": 0, "batch_cap": None, "power_cap_w": None}
        self._decision = self._decide(time.monotonic())
        self._decided_at = 0.0
        self._cap = self._max_seqs  # the running cap in force this step
        self._pause_owed_s = 0.0
        self._paused_s = 0.0  # cumulative time slept to hold the power cap
        self._steps: deque[tuple[int, float, int, int]] = deque()  # (key, scheduled at, batch, prefill tokens)
        self._last_step_end = 0.0
        self._output_len = OUTPUT_LEN_PRIOR  # average completion length, tokens (learnt)
        self._preemptions = 0
        self._cap_violations = 0
        self._max_batch_seen = 0
        self._nsteps = 0
        self._reserve, self._reserve_key, self._reserve_step = 0, None, 0
        self._step_energy_counts = [0] * (len(STEP_ENERGY_BUCKETS_J) + 1)
        self._step_energy_sum_j = 0.0
        self._ctrl = None
        if cfg.control_endpoint:
            self._ctrl = zmq.Context.instance().socket(zmq.PULL)
            self._ctrl.setsockopt(zmq.LINGER, 0)
            self._ctrl.connect(cfg.control_endpoint)
        if self._meter is not None:
            self._meter.scheduler_stats = self.stats
        self._actuator = self._make_actuator(cfg)
        self.horizon_tokens = cfg.admission_horizon_tokens
        log.info(
            "energy-aware scheduler: max_num_seqs %d, max tokens/step %d, SLO ttft %s s tpot %s s, profile %s",
            self._max_seqs, self._max_tokens, self._slo.ttft_s, self._slo.tpot_s, cfg.profile,
        )  # fmt: skip

    def _make_actuator(self, cfg: SchedulerSettings):
        """The NVML actuator, only with the operator's consent and on a board NVML reads."""
        consent = {"nvml_power_limit": cfg.nvml_power_limit, "nvml_locked_clocks": cfg.nvml_locked_clocks}
        if not any(consent.values()) or self._meter is None or self._meter.source.source != "nvml":
            return None
        from factory.power.actuators import NvmlActuator

        source = self._meter.source
        log.warning("NVML actuators enabled by config: %s", ", ".join(k for k, v in consent.items() if v))
        return NvmlActuator(
            source.nvml,
            source.boards(),
            power_limit=cfg.nvml_power_limit,
            locked_clocks=cfg.nvml_locked_clocks,
        )

    def _power_range(self, profile) -> tuple[float, float]:
        """Idle and busy power, W: the meter's modeled figures, else the profile's, else the board limit."""
        if self._meter is not None:
            idle_w, busy_w = self._meter.power_range_w()
            if busy_w is not None:
                return idle_w, busy_w
        if profile is not None:
            top = profile.decode_curve()[-1]
            return (idle_w if self._meter is not None else 0.0), top.power_w
        return 0.0, 1.0

    # -- the public surface -------------------------------------------------------------------------
    def apply_control(self, msg: Control) -> None:
        """A governor decision; takes effect at the next step (or mid-pause)."""
        if msg.power_cap_w != self._control["power_cap_w"]:
            self._cap_set_at = time.monotonic()
        self._control.update(batch_cap=msg.batch_cap, power_cap_w=msg.power_cap_w, version=msg.version)
        if self._control["power_cap_w"] is None:
            self._duty.reset()
            self._pause_owed_s = 0.0
        if self._actuator is not None and self._actuator.applied_w != self._control["power_cap_w"]:
            self._actuator.apply(self._control["power_cap_w"])
        self._decision = self._decide(time.monotonic())
        if self._meter is not None:
            self._meter.send_control_ack(msg.version, msg.sent_at, msg.forwarded_at, time.time())

    def stats(self) -> SchedulerStats:
        d = self._decision
        return SchedulerStats(
            batch_cap=self._cap,
            token_budget=self.max_num_scheduled_tokens,
            duty=self._duty.duty if self._control["power_cap_w"] is not None else 1.0,
            power_cap_w=self._control["power_cap_w"],
            control_version=self._control["version"],
            efficient_batch=d.batch_cap,
            reason=d.reason,
            preemptions=self._preemptions,
            cap_violations=self._cap_violations,
            max_batch_seen=self._max_batch_seen,
            steps=self._nsteps,
            step_energy_buckets_j=STEP_ENERGY_BUCKETS_J,
            step_energy_counts=tuple(self._step_energy_counts),
            step_energy_sum_j=self._step_energy_sum_j,
            paused_s=self._paused_s,
            idle_w=self._curve.idle_w,
        )

    # -- vLLM hooks -------------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._poll_control()
        self._pace()
        now = time.monotonic()
        if now - self._decided_at >= DECIDE_INTERVAL_S:
            self._decision = self._decide(now)
        cap = self._apply_limits()
        running_before = len(self.running)
        out = super().schedule(*args, **kwargs)
        batch = len(out.num_scheduled_tokens)
        admitted = len(out.scheduled_new_reqs) + len(out.scheduled_cached_reqs.resumed_req_ids)
        if batch > cap or (admitted and running_before >= cap):
            self._cap_violations += 1
            log.error("cap %d exceeded: %d scheduled, %d admitted at %d running", cap, batch, admitted, running_before)
        self._max_batch_seen = max(self._max_batch_seen, batch)
        self._nsteps += 1
        if batch:
            prefill_tok = out.total_num_scheduled_tokens - batch  # decode requests carry one token each
            self._steps.append((id(out), time.monotonic(), batch, prefill_tok))
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        key, now = id(scheduler_output), time.monotonic()
        # Steps finish in the order they were scheduled (async scheduling keeps one in flight).
        while self._steps and self._steps[0][0] != key and any(k == key for k, *_ in self._steps):
            self._steps.popleft()
        if self._steps and self._steps[0][0] == key:
            _, scheduled_at, batch, prefill_tok = self._steps.popleft()
            step_s = now - max(scheduled_at, self._last_step_end)
            self._last_step_end = now
            self._on_step(batch, prefill_tok, step_s)
        return outputs

    def _free_request(self, request, *args, **kwargs):
        n = request.num_output_tokens
        if n and request.status != RequestStatus.FINISHED_ABORTED:  # a client gone early says nothing of lengths
            self._output_len += OUTPUT_LEN_ALPHA * (n - self._output_len)
        return super()._free_request(request, *args, **kwargs)

    def _preempt_request(self, request, *args, **kwargs):
        self._preemptions += 1
        return super()._preempt_request(request, *args, **kwargs)

    # -- internals --------------------------------------------------------------------------------------
    def _decide(self, now: float) -> BatchDecision:
        self._decided_at = now
        oldest_wait_s = 0.0
        if self.waiting:
            oldest_wait_s = max(0.0, time.time() - self.waiting.peek_request().arrival_time)
        decision = choose_batch(
            self._curve,
            self._slo,
            max_num_seqs=self._max_seqs,
            max_num_batched_tokens=self._max_tokens,
            power_cap_w=self._control["power_cap_w"],
            oldest_wait_s=oldest_wait_s,
        )
        cap_w = self._control["power_cap_w"]
        # The window holds about ten steps, so that one step more or less in it (a long CPU step is
        # 100 ms) is not read as a power error; updated twice per window: more often would count
        # one error several times over.
        step_s = self._curve.step_s(decision.batch_cap) or 0.0
        window_s = min(MAX_POWER_WINDOW_S, max(POWER_WINDOW_S, 10 * step_s))
        # Only windows that lie wholly under the present cap: one reaching back before it would read
        # the old power as an error and wind the correction up.
        settled = now - self._cap_set_at >= window_s
        if cap_w is not None and self._meter is not None and settled and now - self._duty_at >= window_s / 2:
            self._duty_at = now
            window = self._meter.recent_power(window_s)
            if window is not None:
                busy_w = self._curve.power_w(decision.batch_cap)
                self._duty.update(cap_w, window.power_w, decision.duty, busy_w, self._curve.idle_w)
        if self._meter is not None:
            self._learn_power(self._meter.recent_power(POWER_WINDOW_S))
        return decision

    def _learn_power(self, window) -> None:
        """Idle power of a measured board from windows with nothing to do; busy power from windows
        mostly spent computing: the power above idle scaled up to computing all the time (pauses
        and gaps between steps draw about idle power)."""
        if window is None:
            return
        if not self.running:
            if not self.waiting and self._meter.measured and window.busy_fraction == 0.0:
                self._curve.idle_w += IDLE_ALPHA * (window.power_w - self._curve.idle_w)
        elif window.busy_fraction > 0.3:
            idle_w = self._curve.idle_w
            busy_w = idle_w + max(0.0, window.power_w - idle_w) / window.busy_fraction
            self._curve.observe_power(len(self.running), busy_w)

    def _apply_limits(self) -> int:
        """Set vLLM's admission and token limits for this step; returns the running cap."""
        cap = min(self._decision.batch_cap, self._control["batch_cap"] or self._max_seqs, self._max_seqs)
        cap = max(1, cap)
        self._cap = cap
        running = len(self.running)
        admit_to = min(cap, self._max_active, running + self._admissible(min(cap, self._max_active) - running))
        self.max_num_active_reqs = max(admit_to, 0)
        if running > cap:
            # Over the cap after it was lowered: no admissions, and a step of `cap` tokens carries
            # at most `cap` requests; the rest wait for the running ones to finish.
            self.max_num_scheduled_tokens = cap
        elif self._chunked and self._decoding():
            self.max_num_scheduled_tokens = min(self._max_tokens, max(self._decision.token_budget, cap))
        else:  # no prefill limit: nothing decodes whose TPOT it would protect, or no chunked prefill
            self.max_num_scheduled_tokens = self._max_tokens
        return cap

    def _decoding(self) -> bool:
        """Whether a running request is past its prompt: the token budget keeps a step within TPOT
        for those; with none (an idle engine taking a prompt) a smaller chunk only delays the
        first token. Stops at the first decoding request, almost always the first one."""
        return any(r.num_computed_tokens >= r.num_prompt_tokens for r in self.running)

    def _admissible(self, slots: int) -> int:
        """How many waiting requests, in queue order, fit the KV cache with room to grow."""
        if slots <= 0 or not self.waiting:
            return 0
        bs = self.block_size
        free = self.kv_cache_manager.block_pool.get_num_free_blocks() - self._running_reserve(bs)
        n = 0
        for r in itertools.islice(self.waiting, slots):
            need = self._blocks(r, bs) - math.ceil(r.num_computed_tokens / bs)
            if need > free and n + len(self.running) > 0:  # an empty engine always takes one
                break
            free -= need
            n += 1
        return n

    def _running_reserve(self, bs: int) -> int:
        """Blocks the running requests will still take. Recounted when the running set changes
        or every block's worth of steps: in between it only overstates (what they took since came
        out of the free count too), so admission stays on the safe side."""
        key = (len(self.running), self.running[0].request_id if self.running else None)
        if key != self._reserve_key or self._nsteps - self._reserve_step >= bs:
            self._reserve = sum(
                max(0, self._blocks(r, bs) - math.ceil(r.num_computed_tokens / bs)) for r in self.running
            )
            self._reserve_key, self._reserve_step = key, self._nsteps
        return self._reserve

    def _blocks(self, r, bs: int) -> int:
        """KV blocks a request is expected to hold HORIZON_TOKENS from now (or at its end)."""
        out = min(r.max_tokens, OUTPUT_LEN_HEADROOM * self._output_len)
        out = max(min(out, r.num_output_tokens + self.horizon_tokens), r.num_output_tokens + 1)
        return math.ceil(min(r.num_prompt_tokens + out, self.max_model_len) / bs)

    def _on_step(self, batch: int, prefill_tok: int, step_s: float) -> None:
        self._curve.observe_step(batch, step_s, prefill_tok)
        energy_j = step_s * self._curve.power_w(batch)
        self._step_energy_sum_j += energy_j
        i = next((i for i, edge in enumerate(STEP_ENERGY_BUCKETS_J) if energy_j <= edge), len(STEP_ENERGY_BUCKETS_J))
        self._step_energy_counts[i] += 1
        if self._control["power_cap_w"] is not None:
            # Bounded: after a stalled step the integral, not one huge pause, takes up the slack.
            self._pause_owed_s = min(self._pause_owed_s + self._duty.pause_s(step_s), MAX_PAUSE_S)

    def _pace(self) -> None:
        """Sleep what the duty cycle owes, in slices, watching for a new cap. What is slept, not
        what was asked, is paid off (a late wake-up would otherwise lower the duty)."""
        while self._pause_owed_s > 0 and self._control["power_cap_w"] is not None:
            t0 = time.monotonic()
            time.sleep(min(PAUSE_SLICE_S, self._pause_owed_s))
            slept = time.monotonic() - t0
            self._pause_owed_s -= slept
            self._paused_s += slept
            self._poll_control()

    def _poll_control(self) -> None:
        if self._ctrl is None:
            return
        while self._ctrl.poll(0):
            self.apply_control(decode_control(self._ctrl.recv()))

    def shutdown(self) -> None:
        if self._actuator is not None:  # the card's own settings back before anything else goes
            self._actuator.restore()
        super().shutdown()
        if self._ctrl is not None:
            self._ctrl.close()


class EnergyAwareScheduler(_EnergyAware, Scheduler):
    """vLLM's synchronous scheduler with the factory's batch policy (CPU replicas)."""


class AsyncEnergyAwareScheduler(_EnergyAware, AsyncScheduler):
    """vLLM's async scheduler with the factory's batch policy (GPU replicas)."""
