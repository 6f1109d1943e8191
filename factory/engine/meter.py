"""The engine-side meter: runs inside vLLM's EngineCore process, beside the scheduler.

Only there are engine steps visible (which requests ran, with how many prefill and decode
tokens, from when to when), so only there can a step's energy be split among its requests. The
meter owns the replica's power source and its ~100 ms sampler, feeds readings and step
boundaries to the attribution policy, and pushes two kinds of message to the replica process
over a ZeroMQ socket:

- `Final`: one per request when it finishes or is aborted: energy, busy time, tokens, status;
- `Snapshot`: every sample: cumulative energy per device, idle and per-tenant attributed energy,
  per-tenant tokens, power facts. The replica turns these into Prometheus metrics.

Both are typed structs of factory/engine/wire.py. Configured by the replica through the
`FACTORY_METER` environment variable (wire.MeterSettings), which the EngineCore process inherits
when vLLM starts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from factory.engine.wire import (
    METER_ENV,
    ControlApplied,
    DeviceReading,
    Final,
    MeterSettings,
    SchedulerStats,
    Snapshot,
    encode,
    meter_settings,
)
from factory.policy.attribution import EnergyAttributor, StepWork
from factory.telemetry.sampler import PowerSampler
from factory.telemetry.sources import PowerReading, select_power_source

log = logging.getLogger("factory.meter")

# Keys of the stamps the replica puts on every engine request (they reach the engine as extra_args).
XARG_REQUEST = "factory_request"
XARG_TENANT = "factory_tenant"
XARG_PRIORITY = "factory_priority"
# Finished requests remembered after their final message, so energy of a step still open when
# they were aborted is still booked to their tenant.
_RECENT_FINISHED = 4096


def _log_through_vllm() -> None:
    """In the EngineCore process only vLLM's loggers have handlers: let ours use them, so the
    power-source choice shows in the replica's log."""
    ours, vllm_logger = logging.getLogger("factory"), logging.getLogger("vllm")
    if not ours.handlers and vllm_logger.handlers:
        for h in vllm_logger.handlers:
            ours.addHandler(h)
        ours.setLevel(logging.INFO)
        ours.propagate = False


# Finished requests the SLO attainment is computed over.
_SLO_WINDOW = 512
# Readings kept for power windows (at 100 ms: 5 s).
_WINDOW_READINGS = 50


@dataclass(slots=True)
class _Tracked:
    key: str  # the factory's request id (vllm_xargs), or the engine's when absent
    tenant: str
    prompt_tok: int
    arrival_s: float  # wall clock, as the front end stamped the request
    output_tok: int = 0
    first_token_s: float | None = None  # wall clock
    cached_tok: int = 0  # prompt tokens the prefix cache held when it was first scheduled


@dataclass(frozen=True, slots=True)
class PowerWindow:
    power_w: float  # average over the window
    busy_fraction: float  # share of it the engine spent in steps
    seconds: float


class EngineMeter:
    """Power source + sampler + attribution + the channel to the replica, for one engine."""

    def __init__(self, cfg: MeterSettings):
        self._lock = threading.Lock()
        self._busy_done_s = 0.0
        self._step_open_at: float | None = None
        kind = cfg.source
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible == "" and kind == "auto":  # no GPU was given to this replica: no board is ours to read
            kind = "modeled"
        self.source = select_power_source(
            kind,
            idle_w=cfg.idle_w,
            max_w=cfg.max_w,
            busy_s=self.busy_s,
            cuda_visible_devices=visible,
        )
        # The modeled source's idle power is exact; a measured one's is learnt while idle.
        idle_w = cfg.idle_w if self.source.source == "modeled" else None
        self._attr = EnergyAttributor(prefill_weight=cfg.prefill_weight, idle_power_w=idle_w)
        self._pending: deque[tuple[int, dict[str, StepWork]]] = deque()  # (step key, work)
        self._tracked: dict[str, _Tracked] = {}
        self._finished: dict[str, str] = {}  # engine id -> tenant, bounded
        self._zombies: set[str] = set()
        self._last_observe_s = 0.0
        self._attributed_j: dict[str, float] = {}
        self._tokens: dict[str, list[int]] = {}  # tenant -> [prompt, completion]
        self._sock_lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.connect(cfg.endpoint)
        self._idle_w, self._max_w = cfg.idle_w, cfg.max_w
        self._slo_ttft_s, self._slo_tpot_s = cfg.slo_ttft_s, cfg.slo_tpot_s
        self._slo_met: deque[tuple[bool, bool]] = deque(maxlen=_SLO_WINDOW)  # (ttft met, tpot met)
        self._window: deque[tuple[float, float, float]] = deque(maxlen=_WINDOW_READINGS)  # (t, J, busy s)
        # The scheduler's own stats ride on each snapshot (set by the energy-aware scheduler).
        self.scheduler_stats: Callable[[], SchedulerStats] | None = None
        self._observe_locked(time.monotonic(), self.source.energy_mj())
        self._sampler = PowerSampler(self.source, self._on_readings, interval_s=cfg.interval_s)
        self._sampler.start()
        log.info("engine meter on: source %s, devices %s", self.source.source, ", ".join(self.source.devices))

    @classmethod
    def from_env(cls) -> EngineMeter | None:
        raw = os.environ.get(METER_ENV)
        if not raw:
            return None
        _log_through_vllm()
        return cls(meter_settings(raw))

    # -- the engine's busy clock (the modeled source's input) -------------------------------
    def busy_s(self) -> float:
        """Cumulative seconds the engine spent in steps, including one in progress."""
        open_at = self._step_open_at
        done = self._busy_done_s
        return done + (time.monotonic() - open_at if open_at is not None else 0.0)

    def power_range_w(self) -> tuple[float, float | None]:
        """(idle W, busy W) as far as the source knows them: exact for the modeled source; for a
        measured one the configured idle figure and no busy figure (the scheduler's curve learns it)."""
        return (self._idle_w, self._max_w) if self.source.source == "modeled" else (self._idle_w, None)

    @property
    def measured(self) -> bool:
        """True when power comes from a sensor (its idle figure is then learnt, not configured)."""
        return self.source.source != "modeled"

    def recent_power(self, window_s: float) -> PowerWindow | None:
        """Average power and busy fraction over about the last `window_s`, from the sampler's
        energy-counter readings; None until two readings span part of it."""
        readings = list(self._window)
        if len(readings) < 2:
            return None
        t1, e1, b1 = readings[-1]
        t0, e0, b0 = next(((t, e, b) for t, e, b in readings if t >= t1 - window_s), readings[-2])
        if t0 >= t1:
            t0, e0, b0 = readings[-2]
        dt = t1 - t0
        return PowerWindow((e1 - e0) / dt, min(1.0, max(0.0, (b1 - b0) / dt)), dt)

    def send_control_ack(self, version: int, sent_at: float, forwarded_at: float | None, applied_at: float) -> None:
        """Tell the replica (and through it the governor) when a control message took effect:
        decided by the governor at `sent_at`, passed on by the replica at `forwarded_at`."""
        self._send(ControlApplied(version, sent_at, forwarded_at, applied_at))

    # -- called by the scheduler (engine thread) ---------------------------------------------
    def on_schedule(self, step_key: int, num_scheduled_tokens: Mapping[str, int], requests: Mapping[str, Any]) -> None:
        """A step was scheduled: record each request's prefill/decode tokens in it."""
        now = time.monotonic()
        with self._lock:
            work: dict[str, StepWork] = {}
            for rid, n in num_scheduled_tokens.items():
                req = requests[rid]
                before = req.num_computed_tokens - n  # the scheduler has already advanced it
                if rid not in self._tracked:
                    self._track(rid, req)
                    # Computed before its first step: a prefix cache hit (billed at the cached rate).
                    self._tracked[rid].cached_tok = min(max(0, before), req.num_prompt_tokens)
                prefill = min(n, max(0, req.num_prompt_tokens - before))
                work[rid] = StepWork(prefill_tok=prefill, decode_tok=n - prefill)
            self._pending.append((step_key, work))
            if len(self._pending) == 1:
                self._begin_locked(now, work)

    def on_step_done(self, step_key: int, outputs: Iterable[Any]) -> None:
        """A scheduled step has finished; `outputs` are its EngineCoreOutputs.

        Steps finish in the order they were scheduled; with async scheduling the next one is
        already queued and starts executing the moment this one ends."""
        now = time.monotonic()
        finished: list[tuple[str, str]] = []
        with self._lock:
            for eco in outputs:
                for o in eco.outputs:
                    t = self._tracked.get(o.request_id)
                    if t is None:
                        continue
                    if t.first_token_s is None and o.new_token_ids:
                        t.first_token_s = time.time()
                    t.output_tok += len(o.new_token_ids)
                    self._tokens[t.tenant][1] += len(o.new_token_ids)
                    if o.finish_reason is not None:
                        finished.append((o.request_id, "completed"))
            if any(key == step_key for key, _ in self._pending):
                while self._pending and self._pending.popleft()[0] != step_key:
                    pass
                self._end_locked(now)
                if self._pending:
                    self._begin_locked(now, self._pending[0][1])
            if finished:
                self._finalize_locked(finished)

    def on_finished_outside(self, request_ids: Iterable[str], status: str) -> None:
        """Requests finished by the front end (client gone, timeout, stop): they carry what
        they used up to now."""
        ids = [(rid, status) for rid in request_ids if rid in self._tracked]
        if ids:
            with self._lock:
                self._finalize_locked(ids)

    def close(self) -> None:
        self._sampler.stop()
        self.source.close()
        with self._sock_lock:
            self._sock.close()

    # -- internals ------------------------------------------------------------------------------
    def _track(self, rid: str, req: Any) -> None:
        xargs = (req.sampling_params.extra_args if req.sampling_params is not None else None) or {}
        tenant = str(xargs.get(XARG_TENANT, "anonymous"))
        t = self._tracked[rid] = _Tracked(
            str(xargs.get(XARG_REQUEST, rid)), tenant, req.num_prompt_tokens, float(req.arrival_time)
        )
        counts = self._tokens.setdefault(tenant, [0, 0])
        counts[0] += t.prompt_tok

    def _begin_locked(self, t_s: float, work: dict[str, StepWork]) -> None:
        self._attr.begin_step(t_s, work)
        self._step_open_at = t_s

    def _end_locked(self, t_s: float) -> None:
        self._attr.end_step(t_s)
        if self._step_open_at is not None:
            self._busy_done_s += t_s - self._step_open_at
        self._step_open_at = None

    def _observe_locked(self, t_s: float, energy_mj: float) -> None:
        split = self._attr.observe(t_s, energy_mj / 1000.0)
        self._last_observe_s = t_s
        for rid, joules in split.by_request_j.items():
            t = self._tracked.get(rid)
            tenant = t.tenant if t is not None else self._finished.get(rid, "unknown")
            self._attributed_j[tenant] = self._attributed_j.get(tenant, 0.0) + joules
        for rid in self._zombies:
            self._attr.finish(rid)
        self._zombies.clear()

    def _finalize_locked(self, finished: list[tuple[str, str]]) -> None:
        # One fresh reading closes the energy of every request ending now.
        t_s = time.monotonic()
        self._observe_locked(t_s, self.source.energy_mj())
        open_rids = self._attr_open_rids()
        for rid, status in finished:
            t = self._tracked.pop(rid, None)
            if t is None:
                continue
            energy_j, busy_s = self._attr.finish(rid)
            ttft_s, tpot_s = self._latency(t, time.time()) if status == "completed" else (None, None)
            if rid in open_rids:  # aborted inside a step still running: book its tail later
                self._zombies.add(rid)
            self._finished[rid] = t.tenant
            if len(self._finished) > _RECENT_FINISHED:
                self._finished.pop(next(iter(self._finished)))
            self._send(
                Final(
                    request=t.key,
                    engine_request=rid,
                    tenant=t.tenant,
                    status=status,
                    energy_j=energy_j,
                    busy_s=busy_s,
                    prompt_tokens=t.prompt_tok,
                    completion_tokens=t.output_tok,
                    cached_tokens=t.cached_tok,
                    source=self.source.source,
                    ttft_s=ttft_s,
                    tpot_s=tpot_s,
                )
            )

    def _latency(self, t: _Tracked, now_s: float) -> tuple[float | None, float | None]:
        """A completed request's TTFT and mean TPOT, s; recorded against the SLO."""
        if t.first_token_s is None:
            return None, None
        ttft_s = t.first_token_s - t.arrival_s
        tpot_s = (now_s - t.first_token_s) / (t.output_tok - 1) if t.output_tok > 1 else None
        self._slo_met.append(
            (
                self._slo_ttft_s is None or ttft_s <= self._slo_ttft_s,
                self._slo_tpot_s is None or tpot_s is None or tpot_s <= self._slo_tpot_s,
            )
        )
        return ttft_s, tpot_s

    def slo_attainment(self) -> dict[str, float] | None:
        """Share of the last completed requests that met each target; None before any completed."""
        met = list(self._slo_met)
        if not met:
            return None
        return {"ttft": sum(a for a, _ in met) / len(met), "tpot": sum(b for _, b in met) / len(met)}

    def _attr_open_rids(self) -> set[str]:
        return set().union(*(w.keys() for _, w in self._pending)) if self._pending else set()

    def _on_readings(self, readings: list[PowerReading]) -> None:
        """Sampler thread: attribute up to this reading, then publish a snapshot."""
        with self._lock:
            t_s = max(r.time_s for r in readings)
            # A step-end reading may have been taken after this one: energy is cumulative, so
            # skipping this one loses nothing (the next reading covers it).
            energy_mj = sum(r.energy_mj for r in readings)
            if t_s > self._last_observe_s:
                self._observe_locked(t_s, energy_mj)
            self._window.append((t_s, energy_mj / 1000.0, self.busy_s()))
            totals = self._attr.totals
            devices = tuple(
                DeviceReading(
                    device=r.device,
                    energy_j=r.energy_mj / 1000.0,
                    power_w=r.power_w,
                    power_limit_w=r.power_limit_w,
                    sm_clock_mhz=r.sm_clock_mhz,
                    temperature_c=r.temperature_c,
                    utilization_pct=r.utilization_pct,
                    mig=bool(r.mig),
                )
                for r in readings
            )
            observed_j, idle_j = totals.observed_j, totals.idle_j
            attributed = dict(self._attributed_j)
            tokens = {k: (v[0], v[1]) for k, v in self._tokens.items()}
            running = len(self._tracked)
        stats = self.scheduler_stats
        snapshot = Snapshot(
            source=self.source.source,
            devices=devices,
            observed_j=observed_j,
            idle_j=idle_j,
            attributed_j=attributed,
            tokens=tokens,
            busy_s=self.busy_s(),
            running=running,
            time_s=time.time(),
            slo_attainment=self.slo_attainment(),
            scheduler=stats() if stats is not None else None,
        )
        self._send(snapshot)

    def _send(self, msg: Final | Snapshot | ControlApplied) -> None:
        try:
            with self._sock_lock:
                self._sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as err:  # replica gone or not keeping up: metering must not stop the engine
            log.warning("meter message dropped: %s", err)
