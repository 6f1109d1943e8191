"""GPU check of the governor's inner loop: the engine's own policy code holds a real card's NVML
power at a budget set below what a decode workload draws, by pausing the workload between steps.

    python kernels/governor_check.py [--seconds 20] [--budget-fraction 0.6] [--json OUT] [--device cuda|cpu]

The workload is the probe's decode step (kernels.shapes: llama-3.1-8b, context 1024, one layer's
KV cache shared by all layers) at batches 8..256. Phases, all on one timeline:

1. idle: nothing runs for `--idle-seconds` (3); its counter power is the curve's idle_w.
2. sweep: a few steps at every batch 8..256; the curve (`EnergyCurve`) learns their step times.
3. unthrottled: the loop below with no cap for `--unthrottled-seconds` (8): the policy runs the
   largest batch flat out and the curve learns its busy power; its mean power is the workload's draw.
4. governed: budget = idle + fraction x (unthrottled - idle), the loop for `--seconds` (20).

The loop is what the engine does every step: `choose_batch(curve, Slo(), ..., power_cap_w=budget)`
gives the batch and the feed-forward duty; every 100 ms a `DutyController` is fed the energy
counter's power over the last 0.5 s (since the cap applied, at most); after each step
(synchronised) the loop sleeps `controller.pause_s(step_s)`, less up to 50 ms the last pause
overslept. The curve learns step times from every step and busy power from 0.5 s windows in
which the engine computed >= 95 % of the time.

Power is the NVML total-energy counter (factory.telemetry.nvml.NvmlPowerSource), polled every
20 ms by factory.telemetry.sampler.PowerSampler; the counter moves about every 100 ms, so the
first time each new value is seen marks it and energy in between is interpolated.

Pass: after `--settle-seconds` (3) every `--window-seconds` (5) window of the governed loop
(sliding by 0.1 s) averages within +-5 % of the budget. Tokens/s and J/token are reported for
the unthrottled and the governed phase.

Read-only: NVML is only read (energy counter, instant power, limits for the record). Nothing here
changes clocks, power limits, persistence, MIG or any other card setting; the budget is held by
throttling the workload, which is what is checked. The enforced power limit is read before and
after and both are reported.

`--device cpu` is a dry run of the same loop on the tiny shape with modeled power
(factory.telemetry.sources.ModeledPowerSource fed by the loop's busy time).

Exit 0: pass; 1: a window left the band; 2: no GPU or no NVML here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from bisect import bisect_left
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.policy.batch import EnergyCurve, Slo, choose_batch  # noqa: E402
from factory.policy.throttle import DutyController  # noqa: E402
from factory.telemetry.nvml import NvmlPowerSource  # noqa: E402  (pynvml is imported only when opened)
from factory.telemetry.sampler import PowerSampler  # noqa: E402
from factory.telemetry.sources import ModeledPowerSource, PowerSource, TelemetryError  # noqa: E402
from kernels.shapes import alloc_kv, build_model, make_input, run_head, run_layers  # noqa: E402

SWEEP_BATCHES = (8, 16, 32, 64, 128, 256)
MAX_NUM_SEQS = SWEEP_BATCHES[-1]
MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's usual limit; decode steps carry one token per request, far below it
SAMPLE_S = 0.02  # counter polling period: several polls per ~100 ms counter update
CONTROL_PERIOD_S = 0.1  # DutyController update period, as in the engine
CONTROL_WINDOW_S = 0.5  # measured power fed to it: the counter's mean over this window
LEARN_BUSY_FRACTION = 0.95  # a window counts as computing all the time (observe_power) above this
MAX_CREDIT_S = 0.05  # most oversleep credited against the next pause
SLIDE_S = 0.1  # step between the checked windows
MODELED_IDLE_W, MODELED_BUSY_W = 20.0, 65.0  # cpu dry run: the probe's 65 W while computing
NO_GPU_EXIT = 2


class Workload:
    """Decode steps at any batch up to the largest: one KV cache and one input at the largest
    batch, sliced (views, no copies) for smaller ones. Logs every step as (start_s, end_s, batch)
    and keeps the busy time a modeled power source integrates."""

    def __init__(self, shape: str, device: torch.device, context: int):
        self.model = build_model(shape, device)
        self.kv = alloc_kv(self.model, MAX_NUM_SEQS, context)
        self.x = make_input(self.model, "decode", self.kv)
        if device.type == "cuda":  # the random weights are written before idle power is measured
            torch.cuda.synchronize(device)
        self.log: list[tuple[float, float, int]] = []
        self._busy = (0.0, None)  # (finished steps' seconds, start of the step running): swapped whole

    def busy_s(self) -> float:
        """Seconds spent computing so far, the running step included (read from the sampler thread)."""
        done_s, start_s = self._busy
        return done_s + (time.monotonic() - start_s if start_s is not None else 0.0)

    def step(self, batch: int) -> float:
        """One decode step at `batch`, synchronised; returns its wall time."""
        start_s = time.monotonic()
        self._busy = (self._busy[0], start_s)
        kv = (self.kv[0][:batch], self.kv[1][:batch])
        run_head(self.model, "decode", run_layers(self.model, "decode", self.x[:batch], kv))
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        end_s = time.monotonic()
        self._busy = (self._busy[0] + end_s - start_s, None)
        self.log.append((start_s, end_s, batch))
        return end_s - start_s

    def window(self, t0_s: float, t1_s: float) -> tuple[float, float, int]:
        """(busy fraction, mean batch of the steps, tokens) within [t0_s, t1_s]; a step counts
        for the share of it inside."""
        busy_s = tokens = weighted = 0.0
        for start_s, end_s, batch in reversed(self.log):
            if end_s <= t0_s:
                break
            inside_s = min(end_s, t1_s) - max(start_s, t0_s)
            if inside_s > 0:
                share = inside_s / (end_s - start_s)
                busy_s, tokens, weighted = busy_s + inside_s, tokens + batch * share, weighted + batch * inside_s
        return busy_s / (t1_s - t0_s), weighted / busy_s if busy_s else 0.0, round(tokens)


class EnergyTrack:
    """A source's cumulative energy as (time_s, energy_mj) points, one per counter change (the
    first poll that sees a new value), plus every instant-power sample. Energy between points is
    interpolated, so a window's power is right to a poll period, not to a counter period."""

    def __init__(self):
        self._lock = threading.Lock()
        self.points: list[tuple[float, float]] = []
        self.instant: list[tuple[float, float]] = []

    def add(self, readings) -> None:  # PowerSampler's callback, on its thread
        time_s, energy_mj = max(r.time_s for r in readings), sum(r.energy_mj for r in readings)
        with self._lock:
            self.instant.append((time_s, sum(r.power_w for r in readings)))
            if not self.points or energy_mj != self.points[-1][1]:
                self.points.append((time_s, energy_mj))

    def last_s(self) -> float:
        with self._lock:
            return self.points[-1][0]

    def energy_mj(self, t_s: float) -> float:
        with self._lock:
            points = list(self.points)
        i = bisect_left(points, (t_s, float("-inf")))
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (ta, ea), (tb, eb) = points[i - 1], points[i]
        return ea + (eb - ea) * (t_s - ta) / (tb - ta)

    def power_w(self, t0_s: float, t1_s: float) -> float:
        return (self.energy_mj(t1_s) - self.energy_mj(t0_s)) / 1000 / (t1_s - t0_s)

    def counter_period_s(self) -> float | None:
        """Median time between counter changes (NVML: its update period, to a poll)."""
        with self._lock:
            times = [t for t, _ in self.points]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return statistics.median(gaps) if gaps else None

    def longest_gap_s(self, t0_s: float, t1_s: float) -> float:
        """Longest time between two polls in [t0_s, t1_s]: a starved sampler (a busy host) lags."""
        with self._lock:
            times = [t for t, _ in self.instant if t0_s <= t <= t1_s]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=t1_s - t0_s)

    def instant_w(self, t0_s: float, t1_s: float) -> float | None:
        with self._lock:
            inside = [w for t, w in self.instant if t0_s <= t <= t1_s]
        return statistics.fmean(inside) if inside else None


def govern(workload: Workload, curve: EnergyCurve, track: EnergyTrack, seconds: float, cap_w: float | None) -> dict:
    """The engine's loop for `seconds`: each step the batch policy decides, the duty controller
    paces. Returns the phase's span and the controller's duty after each step."""
    controller, no_slo = DutyController(), Slo()
    start_s = now_s = time.monotonic()
    next_control_s, next_learn_s, duties = start_s + CONTROL_PERIOD_S, start_s + CONTROL_WINDOW_S, []
    owed_s = 0.0  # pause still owed (negative: overslept)
    while now_s < start_s + seconds:
        decision = choose_batch(
            curve, no_slo, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, power_cap_w=cap_w
        )
        if cap_w is not None and now_s >= next_control_s:
            end_s = track.last_s()
            begin_s = max(start_s, end_s - CONTROL_WINDOW_S)  # measured since the cap applied
            if end_s - begin_s >= CONTROL_PERIOD_S:
                busy_w = curve.power_w(decision.batch_cap)
                controller.update(cap_w, track.power_w(begin_s, end_s), decision.duty, busy_w, curve.idle_w)
            next_control_s = max(next_control_s + CONTROL_PERIOD_S, now_s)
        if now_s >= next_learn_s:
            end_s = track.last_s()
            busy, batch, _ = workload.window(end_s - CONTROL_WINDOW_S, end_s)
            if end_s - CONTROL_WINDOW_S >= start_s and busy >= LEARN_BUSY_FRACTION:
                curve.observe_power(batch, track.power_w(end_s - CONTROL_WINDOW_S, end_s))
            next_learn_s = max(next_learn_s + CONTROL_WINDOW_S, now_s)
        step_s = workload.step(decision.batch_cap)
        curve.observe_step(decision.batch_cap, step_s)
        duties.append((time.monotonic(), controller.duty))
        owed_s += controller.pause_s(step_s)
        if owed_s > 0:
            slept_from_s = time.monotonic()
            time.sleep(owed_s)
            # A late wake-up's extra sleep is taken off the next pause, so the duty holds; a stall
            # longer than MAX_CREDIT_S is left to the controller rather than repaid in a burst.
            owed_s = max(-MAX_CREDIT_S, owed_s - (time.monotonic() - slept_from_s))
        now_s = time.monotonic()
    return {"start_s": start_s, "end_s": now_s, "duties": duties, "correction": controller.correction}


def phase_figures(workload: Workload, track: EnergyTrack, t0_s: float, t1_s: float) -> dict:
    busy, batch, tokens = workload.window(t0_s, t1_s)
    power_w = track.power_w(t0_s, t1_s)
    tok_s = tokens / (t1_s - t0_s)
    return {"seconds": t1_s - t0_s, "power_w": power_w, "busy_fraction": busy, "mean_batch": batch,
            "tok_s": tok_s, "j_per_tok": power_w / tok_s if tok_s else None}  # fmt: skip


def judge(track: EnergyTrack, loop: dict, budget_w: float, settle_s: float, window_s: float, tol: float) -> dict:
    """Every window_s window after settle_s, sliding by SLIDE_S: its mean power against the budget."""
    t_s, last_s, errors = loop["start_s"] + settle_s, min(loop["end_s"], track.last_s()), []
    while t_s + window_s <= last_s + 1e-9:
        errors.append(track.power_w(t_s, t_s + window_s) / budget_w - 1)
        t_s += SLIDE_S
    return {"windows": len(errors), "worst_low": min(errors, default=None), "worst_high": max(errors, default=None),
            "passed": bool(errors) and all(abs(e) <= tol for e in errors)}  # fmt: skip


def per_second(workload: Workload, track: EnergyTrack, loop: dict, window_s: float) -> list[dict]:
    rows, t0 = [], loop["start_s"]
    for k in range(int(min(loop["end_s"], track.last_s()) - t0)):
        a, b = t0 + k, t0 + k + 1
        busy, batch, _ = workload.window(a, b)
        duty = [d for t, d in loop["duties"] if a <= t < b]
        rows.append({"t_s": k + 1, "power_w": track.power_w(a, b), "instant_w": track.instant_w(a, b),
                     "batch": batch, "duty_set": statistics.fmean(duty) if duty else None, "busy": busy,
                     "rolling_w": track.power_w(b - window_s, b) if k + 1 >= window_s else None})  # fmt: skip
    return rows


def open_source(device: torch.device, workload: Workload) -> PowerSource:
    if device.type == "cpu":
        return ModeledPowerSource(MODELED_IDLE_W, MODELED_BUSY_W, workload.busy_s)
    try:  # CUDA and NVML may number devices differently: name the board by its UUID
        board = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    except Exception:  # noqa: BLE001 - an older torch has no uuid: fall back on CUDA_VISIBLE_DEVICES
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        board = visible.split(",")[device.index] if visible else str(device.index)
    return NvmlPowerSource(board)


def limit_w(source: PowerSource) -> float | None:
    if not isinstance(source, NvmlPowerSource):
        return None
    source.refresh_facts()  # a read: NVML's enforced limit as the card has it now
    return source.facts()[0]["power_limit_w"]


def run(args, device: torch.device) -> dict:
    shape = args.shape or ("tiny" if device.type == "cpu" else "llama-3.1-8b")
    workload = Workload(shape, device, args.context)
    source, track = open_source(device, workload), EnergyTrack()
    sampler = PowerSampler(source, track.add, interval_s=SAMPLE_S, name="governor-check-sampler")
    limit_before_w = limit_w(source)
    sampler.start()
    try:
        print(f"workload : {shape} decode, context {args.context}, batches {SWEEP_BATCHES[0]}..{MAX_NUM_SEQS}")
        print(f"power    : {source.describe() if isinstance(source, NvmlPowerSource) else 'modeled (cpu dry run)'}")
        t0_s = time.monotonic()
        time.sleep(args.idle_seconds)
        idle_w = track.power_w(t0_s, track.last_s())
        t0_s = time.monotonic()
        for batch in SWEEP_BATCHES:  # 2 warm-up steps per shape, then 5 the curve learns from
            for _ in range(7):
                workload.step(batch)
        sweep_w = track.power_w(t0_s, track.last_s())
        curve = EnergyCurve(max_batch=MAX_NUM_SEQS, idle_w=idle_w, busy_w=sweep_w)
        for batch in SWEEP_BATCHES:  # the sweep's steps past each batch's first two
            for start_s, end_s, _ in [s for s in workload.log if s[2] == batch][2:]:
                curve.observe_step(batch, end_s - start_s)
        print(f"idle     : {idle_w:.1f} W ({args.idle_seconds:g} s)")
        steps_ms = ", ".join(f"{b}: {curve.step_s(b) * 1000:.1f}" for b in SWEEP_BATCHES)
        print(f"sweep    : step ms by batch {steps_ms}; {sweep_w:.1f} W")
        free = govern(workload, curve, track, args.unthrottled_seconds, None)
        # Up to the last reading: one that had not come in yet must not count as no energy.
        unthrottled = phase_figures(workload, track, free["start_s"], min(free["end_s"], track.last_s()))
        budget_w = idle_w + args.budget_fraction * (unthrottled["power_w"] - idle_w)
        print(f"unthrottled: {unthrottled['power_w']:.1f} W at batch {unthrottled['mean_batch']:.0f} "
              f"({args.unthrottled_seconds:g} s, {unthrottled['tok_s']:.0f} tok/s)")  # fmt: skip
        print(f"budget   : {budget_w:.1f} W = idle + {args.budget_fraction:g} x (unthrottled - idle)")
        loop = govern(workload, curve, track, args.seconds, budget_w)
        time.sleep(3 * SAMPLE_S + 0.15)  # let the counter report the loop's last joules
    finally:
        sampler.stop()
        limit_after_w = limit_w(source)
        source.close()
    governed = phase_figures(workload, track, loop["start_s"] + args.settle_seconds, loop["end_s"])
    verdict = judge(track, loop, budget_w, args.settle_seconds, args.window_seconds, args.tolerance)
    return {
        "device": str(device), "shape": shape, "context": args.context, "source": source.source,
        "power_limit_w": {"before": limit_before_w, "after": limit_after_w},
        "counter_period_s": track.counter_period_s(),
        "longest_poll_gap_s": track.longest_gap_s(loop["start_s"], loop["end_s"]),
        "idle_w": idle_w, "unthrottled": unthrottled, "budget_w": budget_w, "budget_fraction": args.budget_fraction,
        "governed": governed,
        "curve": {b: {"step_s": s, "power_w": p} for b, (s, p) in curve.snapshot().items()},
        "final_correction": loop["correction"], "settle_s": args.settle_seconds, "window_s": args.window_seconds,
        "tolerance": args.tolerance, "per_second": per_second(workload, track, loop, args.window_seconds),
        **verdict,
    }  # fmt: skip


def report(doc: dict) -> None:
    rolling = f"{doc['window_s']:g} s avg W"
    print(f"{'t s':>4} {'W':>8} {'inst W':>8} {'batch':>6} {'duty':>6} {'busy':>6} {rolling:>10}")
    for r in doc["per_second"]:
        cells = [f"{r['t_s']:>4}", f"{r['power_w']:8.1f}", _opt(r["instant_w"], 8, 1), f"{r['batch']:6.0f}",
                 _opt(r["duty_set"], 6, 2), f"{r['busy']:6.2f}", _opt(r["rolling_w"], 10, 1)]  # fmt: skip
        print(" ".join(cells))
    u, g = doc["unthrottled"], doc["governed"]
    for name, p in (("unthrottled", u), ("governed", g)):
        print(f"{name:<11}: {p['power_w']:7.1f} W, {p['tok_s']:9.1f} tok/s, {p['j_per_tok']:.4f} J/tok, "
              f"busy {p['busy_fraction']:.2f}, batch {p['mean_batch']:.0f}")  # fmt: skip
    print(f"governed / unthrottled: power {g['power_w'] / u['power_w']:.2f}, tok/s {g['tok_s'] / u['tok_s']:.2f}, "
          f"J/tok {g['j_per_tok'] / u['j_per_tok']:.2f}")  # fmt: skip
    limits = doc["power_limit_w"]
    if doc["source"] == "nvml":
        print(f"power limit (read only): {limits['before']} W before, {limits['after']} W after; "
              f"energy counter moved every {doc['counter_period_s'] * 1000:.0f} ms (median)")  # fmt: skip
    gap_ms = doc["longest_poll_gap_s"] * 1000
    print(f"longest gap between {SAMPLE_S * 1000:.0f} ms power polls while governed: {gap_ms:.0f} ms")
    band = f"{doc['budget_w']:.1f} W +-{doc['tolerance']:.0%}"
    if doc["windows"]:
        spread = f"worst {doc['worst_low']:+.1%} / {doc['worst_high']:+.1%}"
        print(f"{'PASS' if doc['passed'] else 'FAIL'}: {doc['windows']} windows of {doc['window_s']:g} s after "
              f"{doc['settle_s']:g} s settling vs budget {band}: {spread}")  # fmt: skip
    else:
        print(f"FAIL: no {doc['window_s']:g} s window fits after {doc['settle_s']:g} s settling: run longer")


def _opt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="governed loop length")
    ap.add_argument("--budget-fraction", type=float, default=0.6, help="budget = idle + f x (unthrottled - idle)")
    ap.add_argument("--json", help="also write the result here ($OUT/governor_check.json when $OUT is set)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--gpu", type=int, default=0, help="CUDA device index")
    ap.add_argument("--shape", help="kernels.shapes name (default llama-3.1-8b; tiny on cpu)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument("--unthrottled-seconds", type=float, default=8.0)
    ap.add_argument("--settle-seconds", type=float, default=3.0)
    ap.add_argument("--window-seconds", type=float, default=5.0)
    ap.add_argument("--tolerance", type=float, default=0.05, help="relative band around the budget")
    args = ap.parse_args(argv)
    if not 0 < args.budget_fraction < 1:
        ap.error("--budget-fraction must lie in (0, 1): the budget is set below the workload's draw")
    if args.device == "cpu":
        torch.set_num_threads(1)  # a dry run needs the loop, not speed
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("governor_check: no CUDA GPU here (use --device cpu for a modeled dry run)")
        return NO_GPU_EXIT
    else:
        device = torch.device("cuda", args.gpu)
        torch.cuda.set_device(device)
    try:
        doc = run(args, device)
    except TelemetryError as e:
        print(f"governor_check: no NVML power here: {e}")
        return NO_GPU_EXIT
    report(doc)
    text = json.dumps(doc, indent=2)
    out_dir = os.environ.get("OUT")  # the device tool's folder of files that come back
    for path in filter(None, (args.json, out_dir and os.path.join(out_dir, "governor_check.json"))):
        Path(path).write_text(text + "\n")
        print(f"wrote {path}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
