"""Measure one (phase, batch, context) point: step time, power and energy per token.

Method: 3 warm-up steps; then `repeats` windows, each of back-to-back steps lasting at least
`min_window_s` (2 s: the NVML energy counter updates about every 100 ms, so a window spans >= 20
updates), timed with CUDA events. Energy is the NVML counter (mJ) read right before and after each
window, after a synchronize; a thread samples power every 50 ms, and a window whose counter energy
and mean sampled power x time disagree by more than 5 % is reported with sanity_ok false (never
dropped). The point takes the median step time and the median energy per token of the windows.
On cpu with no meter the energy is modeled: a constant `cpu_modeled_w` while the steps run.

NVML is read-only here: nothing changes clocks, power limits or persistence.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from kernels.shapes import Model, alloc_kv, check_point, make_input, run_head, run_layers, tokens_per_step

SANITY_TOLERANCE = 0.05  # |counter energy - mean power x time| / counter energy
SAMPLE_PERIOD_S = 0.05
_FIELD_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")  # by valueType


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlMeter:
    """Read-only NVML for one GPU: its name, driver, energy counter (mJ) and power (W)."""

    def __init__(self, nv, handle):
        self.nv, self.handle = nv, handle
        self.card = _text(nv.nvmlDeviceGetName(handle))
        self.driver = _text(nv.nvmlSystemGetDriverVersion())
        try:  # the instant field follows the load; the older reading is a 1 s average on Hopper
            self._instant_w()
            self.power_w, self.power_source = self._instant_w, "NVML_FI_DEV_POWER_INSTANT"
        except Exception:
            self.power_w, self.power_source = self._average_w, "nvmlDeviceGetPowerUsage (1 s average)"

    @classmethod
    def open(cls, gpu_index: int = 0) -> NvmlMeter:
        import pynvml as nv  # lazily: CPU runs and tests need no NVML

        nv.nvmlInit()
        try:  # CUDA and NVML may number devices differently: match by UUID where torch has one
            uuid = torch.cuda.get_device_properties(gpu_index).uuid
            handle = nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:
            handle = nv.nvmlDeviceGetHandleByIndex(gpu_index)
        return cls(nv, handle)

    def close(self) -> None:
        self.nv.nvmlShutdown()

    def energy_mj(self) -> int:
        """Energy since the driver loaded, mJ."""
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def _instant_w(self) -> float:
        v = self.nv.nvmlDeviceGetFieldValues(self.handle, [self.nv.NVML_FI_DEV_POWER_INSTANT])[0]
        if v.nvmlReturn != self.nv.NVML_SUCCESS:
            raise self.nv.NVMLError(v.nvmlReturn)
        return getattr(v.value, _FIELD_MEMBERS[v.valueType]) / 1000  # mW

    def _average_w(self) -> float:
        return self.nv.nvmlDeviceGetPowerUsage(self.handle) / 1000  # mW


class PowerSampler:
    """A thread reading `read_w()` every `period_s`; `mean_w(t0, t1)` over samples taken within
    [t0, t1] on the time.monotonic clock. A read error is kept and raised by mean_w."""

    def __init__(self, read_w, period_s: float = SAMPLE_PERIOD_S):
        self.read_w, self.period_s = read_w, period_s
        self.samples: list[tuple[float, float]] = []  # (monotonic s, W)
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), self.read_w()))
            except Exception as e:  # surfaced by mean_w, not lost in the thread
                self.error = e
                return
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean_w(self, t0: float, t1: float) -> float | None:
        if self.error is not None:
            raise self.error
        inside = [w for t, w in list(self.samples) if t0 <= t <= t1]
        return statistics.fmean(inside) if inside else None


def energy_vs_power_error(energy_j: float, mean_w: float | None, seconds: float) -> float:
    """|energy - mean power x time| / energy; 1.0 when the counter did not advance or no power
    sample fell inside the window (the check cannot pass then)."""
    if energy_j <= 0 or mean_w is None:
        return 1.0
    return abs(energy_j - mean_w * seconds) / energy_j


@dataclass(frozen=True, slots=True)
class Window:
    steps: int
    seconds: float  # device time of the steps (CUDA events; perf_counter on cpu)
    energy_j: float
    error: float  # energy_vs_power_error


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(a, b) -> float:  # after a synchronize
    return a.elapsed_time(b) / 1000 if isinstance(a, torch.cuda.Event) else b - a


def _layer_fraction(model: Model, phase: str, x, kv, steps: int = 2) -> float:
    """Share of a step's time in the layer stack (the rest is the lm_head), timed apart."""
    layers_s = total_s = 0.0
    for _ in range(steps):
        a = _mark(model.device)
        h = run_layers(model, phase, x, kv)
        b = _mark(model.device)
        run_head(model, phase, h)
        c = _mark(model.device)
        _sync(model.device)
        layers_s, total_s = layers_s + _seconds(a, b), total_s + _seconds(a, c)
    return layers_s / total_s


def stack_scale(layer_fraction: float, layer_scale: float) -> float:
    """Factor from a probed step's time (and energy) to the whole model's: the layer stack, a
    `layer_fraction` of the time, stands for layer_scale times as many layers; the lm_head runs
    once either way. Energy scales like time: the card is taken to draw the same power in both."""
    return layer_fraction * layer_scale + (1 - layer_fraction)


def _window(model: Model, phase: str, x, kv, steps: int, meter, sampler, modeled_w: float) -> Window:
    device = model.device
    _sync(device)
    host0, e0_mj = time.monotonic(), meter.energy_mj() if meter else 0
    a = _mark(device)
    for _ in range(steps):
        run_head(model, phase, run_layers(model, phase, x, kv))
    b = _mark(device)
    _sync(device)
    e1_mj, host1 = meter.energy_mj() if meter else 0, time.monotonic()
    seconds = _seconds(a, b)
    if meter is None:
        return Window(steps, seconds, modeled_w * seconds, 0.0)
    energy_j = (e1_mj - e0_mj) / 1000
    # The counter spans the host interval around the window, so compare it with that interval.
    return Window(
        steps, seconds, energy_j, energy_vs_power_error(energy_j, sampler.mean_w(host0, host1), host1 - host0)
    )


def measure_point(
    model: Model,
    phase: str,
    batch: int,
    context: int,
    *,
    meter: NvmlMeter | None = None,
    min_window_s: float = 2.0,
    repeats: int = 3,
    warmup: int = 3,
    cpu_modeled_w: float = 65.0,
) -> dict:
    """Measure one point (see the module docstring); `meter` None means modeled energy (cpu only).
    Raises torch.cuda.OutOfMemoryError when the point's cache or activations do not fit."""
    if meter is None and model.device.type != "cpu":
        raise ValueError("a GPU point needs an NVML meter: modeled energy is for cpu dry runs only")
    check_point(phase, batch, context)
    if repeats < 1 or min_window_s <= 0:
        raise ValueError("repeats must be >= 1 and min_window_s > 0")
    kv = alloc_kv(model, batch, context)
    x = make_input(model, phase, kv)
    for _ in range(warmup):
        run_head(model, phase, run_layers(model, phase, x, kv))
    _sync(model.device)
    a = _mark(model.device)
    for _ in range(2):
        run_head(model, phase, run_layers(model, phase, x, kv))
    b = _mark(model.device)
    _sync(model.device)
    steps = max(1, math.ceil(1.1 * min_window_s / max(_seconds(a, b) / 2, 1e-9)))
    scale = 1.0
    if model.shape.layer_scale != 1:
        scale = stack_scale(_layer_fraction(model, phase, x, kv), model.shape.layer_scale)

    windows: list[Window] = []
    # A window shorter than min_window_s (the step time was overestimated, e.g. the warm-up steps
    # met a busy machine) is redone with more steps, never kept: each retry scales the steps by the
    # shortfall, so few are needed; a machine that still cannot fill one is an error.
    retries = 10 * repeats
    with PowerSampler(meter.power_w) if meter else contextlib.nullcontext() as sampler:
        while len(windows) < repeats:
            x = make_input(model, phase, kv)  # fresh random inputs for every window
            w = _window(model, phase, x, kv, steps, meter, sampler, cpu_modeled_w)
            if w.seconds < min_window_s:
                if retries == 0:
                    raise RuntimeError(
                        f"{phase} windows stay shorter than {min_window_s} s: the step time keeps changing"
                    )
                retries -= 1
                steps = math.ceil(steps * 1.1 * min_window_s / max(w.seconds, 1e-9))
                continue
            windows.append(w)

    tokens = tokens_per_step(phase, batch, context)
    step_s = statistics.median(w.seconds / w.steps * scale for w in windows)
    j_per_tok = statistics.median(w.energy_j * scale / (w.steps * tokens) for w in windows)
    tok_s = tokens / step_s
    return {
        "phase": phase,
        "batch": batch,
        "context": context,
        "step_s": step_s,
        "tok_s": tok_s,
        "power_w": j_per_tok * tok_s,  # median energy per token over median time per token
        "j_per_tok": j_per_tok,
        "source": "measured" if meter else "modeled",
        "card": meter.card if meter else "cpu",
        "driver": meter.driver if meter else None,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "repeats": len(windows),
        "window_s": statistics.median(w.seconds for w in windows),
        "sanity_ok": all(w.error <= SANITY_TOLERANCE for w in windows),
        "energy_vs_power_error": max(w.error for w in windows),
    }
