"""The GPU probe (kernels/) on the CPU: FLOP and byte counts by hand, the decode and prefill steps,
the point and document it produces (modeled energy), the CLI's refusals, and the NVML reading and
sanity check against a fake pynvml standing in for the absent GPU. kernels/gpu_check.sh proves
the real NVML path on a GPU."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the probe's caller puts the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from kernels import measure  # noqa: E402
from kernels.measure import NvmlMeter, PowerSampler, Window, energy_vs_power_error, measure_point  # noqa: E402
from kernels.probe import NO_GPU, SCHEMA, calibrate, point_order  # noqa: E402
from kernels.shapes import (  # noqa: E402
    SHAPES,
    Shape,
    alloc_kv,
    build_model,
    decode_step,
    footprint_bytes,
    prefill_step,
    step_bytes,
    step_flops,
)

# tiny: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, ffn 128, vocab 512.
QKV = 64 * (4 + 2 * 2) * 16  # 8192
O_PROJ = 4 * 16 * 64  # 4096
MLP = 3 * 64 * 128  # gate, up, down: 24576
LAYER = QKV + O_PROJ + MLP  # 36864 weights a token multiplies through per layer
LM_HEAD = 64 * 512


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", "cpu")


def test_step_flops_are_matmuls_attention_and_head_counted_by_hand():
    # decode, batch 2, context 8: 2 tokens through 2 layers; each token's 4 heads see 8 keys.
    decode = 2 * 2 * LAYER * 2 + 4 * (2 * 8) * 4 * 16 * 2 + 2 * 2 * LM_HEAD
    assert step_flops("tiny", "decode", 2, 8) == decode == 434_176
    # prefill, batch 2, context 8: 16 tokens; causal pairs per sequence 8 * 9 / 2 = 36; head on 2 tokens.
    prefill = 2 * 16 * LAYER * 2 + 4 * (2 * 36) * 4 * 16 * 2 + 2 * 2 * LM_HEAD
    assert step_flops("tiny", "prefill", 2, 8) == prefill == 2_527_232
    # The published anchor: ~16 GFLOP per token for the 8B; the 70B slice counts all 80 layers.
    assert 15e9 < step_flops("llama-3.1-8b", "decode", 1, 1) < 17e9
    assert 135e9 < step_flops("llama-3.1-70b-tp1-slice", "decode", 1, 1) < 145e9


def test_step_bytes_are_weights_once_plus_kv_cache_by_hand():
    weights = 2 * (LAYER + 2 * 64) + 64 + LM_HEAD  # per-layer norms, final norm, lm_head
    kv_per_token = 2 * 2 * 16  # K and V, 2 kv heads of 16
    decode_kv = 2 * 2 * (8 + 1) * kv_per_token  # 2 layers x 2 sequences x (read 8 + write 1)
    assert step_bytes("tiny", "decode", 2, 8, 2) == (weights + decode_kv) * 2 == 218_240
    prefill_kv = 2 * 2 * 8 * kv_per_token  # written once
    assert step_bytes("tiny", "prefill", 2, 8, 4) == (weights + prefill_kv) * 4


def test_shapes_as_specified():
    s = SHAPES["llama-3.1-70b-tp1-slice"]
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn, s.probe_layers) == (8192, 80, 64, 8, 28672, 8)
    assert s.layer_scale == 10
    assert all(SHAPES[n].layer_scale == 1 for n in ("llama-3.1-8b", "smollm2-135m", "tiny"))


def test_decode_and_prefill_steps_give_finite_logits_on_fresh_inputs(tiny):
    kv = alloc_kv(tiny, 3, 8)
    a, b = decode_step(tiny, kv), decode_step(tiny, kv)
    assert a.shape == b.shape == (3, 512)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.equal(a, b)  # fresh random hidden states per call
    k_before = kv[0].clone()
    p, q = prefill_step(tiny, kv), prefill_step(tiny, kv)
    assert p.shape == (3, 512) and torch.isfinite(p).all() and not torch.equal(p, q)
    assert not torch.equal(kv[0], k_before)  # prefill writes its K into the cache


def test_large_shapes_are_refused_on_cpu():
    with pytest.raises(ValueError, match="too large for a CPU dry run"):
        build_model("llama-3.1-8b", "cpu")


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_modeled_point_is_consistent(tiny, phase):
    p = measure_point(tiny, phase, 4, 16, min_window_s=0.05, repeats=2, cpu_modeled_w=65.0)
    tokens = 4 if phase == "decode" else 4 * 16
    assert p["source"] == "modeled" and p["card"] == "cpu" and p["driver"] is None
    assert p["tok_s"] == pytest.approx(tokens / p["step_s"], rel=1e-9)
    assert p["j_per_tok"] == pytest.approx(p["power_w"] / p["tok_s"], rel=1e-6)
    assert p["power_w"] == pytest.approx(65.0, rel=1e-6)
    assert p["repeats"] == 2 and p["window_s"] >= 0.05
    assert p["sanity_ok"] is True and p["energy_vs_power_error"] == 0.0
    assert set(p) == {
        "phase", "batch", "context", "step_s", "tok_s", "power_w", "j_per_tok", "source", "card",
        "driver", "date", "repeats", "window_s", "sanity_ok", "energy_vs_power_error",
    }  # fmt: skip


def test_slice_scales_the_layer_stack_not_the_head(tiny, monkeypatch):
    # 2 of 20 layers probed; the layers take 80 % of a probed step: the model's step is
    # 0.8 x 10 + 0.2 = 8.2 probed steps, in time and in energy; power is unchanged.
    sliced = dataclasses.replace(tiny, shape=Shape("tiny", 64, 20, 4, 2, 16, 128, 512, probe_layers=2))
    monkeypatch.setattr(measure, "_layer_fraction", lambda *a: 0.8)
    monkeypatch.setattr(measure, "_window", lambda *a: Window(steps=10, seconds=3.0, energy_j=600.0, error=0.0))
    p = measure_point(sliced, "decode", 4, 8, min_window_s=2.0, repeats=3)
    assert p["step_s"] == pytest.approx(0.3 * 8.2)
    assert p["j_per_tok"] == pytest.approx(600.0 * 8.2 / (10 * 4))
    assert p["power_w"] == pytest.approx(200.0) and p["window_s"] == 3.0
    assert measure.stack_scale(0.5, 1.0) == 1.0


def test_calibrate_cpu_document_has_every_point_in_memory_order():
    lines = []
    doc = calibrate(
        "tiny", [2, 1], [16, 4], phases=("prefill", "decode"), device="cpu",
        min_window_s=0.02, repeats=1, progress=lines.append,
    )  # fmt: skip
    assert doc["schema"] == SCHEMA == "factory.energy-profile/1"
    assert (doc["model"], doc["source"], doc["card"], doc["skipped"]) == ("tiny", "modeled", "cpu", [])
    got = [(p["phase"], p["batch"], p["context"]) for p in doc["points"]]
    assert sorted(got) == sorted((ph, b, c) for ph in ("decode", "prefill") for b in (1, 2) for c in (4, 16))
    assert got == point_order("tiny", ("prefill", "decode"), [2, 1], [16, 4])
    sizes = [footprint_bytes("tiny", *k) for k in got]
    assert sizes == sorted(sizes) and got[0] == ("decode", 1, 4) and got[-1] == ("prefill", 2, 16)
    assert len(lines) == 8


def _probe(*args):
    return subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "kernels.probe", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_without_gpu_exits_2_with_the_reason():
    r = _probe()
    assert r.returncode == 2
    assert NO_GPU in r.stderr
    assert NO_GPU.startswith("no CUDA GPU here: the probe measures a GPU; use --device cpu")


def test_cli_refuses_large_shape_on_cpu():
    r = _probe("--device", "cpu", "--shape", "llama-3.1-8b")
    assert r.returncode == 2
    assert "'llama-3.1-8b' is too large for a CPU dry run" in r.stderr


class FakeNvml:
    """pynvml with an energy counter (mJ) advancing at `power_w` in real time and a power
    reading of `reported_w` (a lying sensor when they differ)."""

    NVML_SUCCESS = 0
    NVML_FI_DEV_POWER_INSTANT = 186

    class NVMLError(Exception):
        pass

    def __init__(self, power_w=300.0, reported_w=None, instant_field=True):
        self.power_w, self.reported_w = power_w, power_w if reported_w is None else reported_w
        self.instant_field, self.t0, self.shut = instant_field, time.monotonic(), False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise self.NVMLError("no such UUID")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(self.power_w * (time.monotonic() - self.t0) * 1000)

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        assert field_ids == [self.NVML_FI_DEV_POWER_INSTANT]
        value = SimpleNamespace(uiVal=int(self.reported_w * 1000))  # mW, valueType 1 = unsigned int
        return [SimpleNamespace(nvmlReturn=0 if self.instant_field else 3, valueType=1, value=value)]

    def nvmlDeviceGetPowerUsage(self, handle):
        return int(self.reported_w * 1000) + 1000  # the 1 s average, told apart by +1 W


def test_nvml_meter_reads_counter_and_instant_power(monkeypatch):
    nv = FakeNvml(power_w=300.0)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    meter = NvmlMeter.open(0)  # lazily imports pynvml; no CUDA UUID here, so by index
    assert (meter.handle, meter.card, meter.driver) == (("gpu", 0), "Fake H100", "580.159.04")
    assert meter.power_source == "NVML_FI_DEV_POWER_INSTANT" and meter.power_w() == 300.0
    e0 = meter.energy_mj()
    time.sleep(0.05)
    assert meter.energy_mj() - e0 >= 300 * 0.05 * 1000 - 1
    meter.close()
    assert nv.shut


def test_nvml_meter_falls_back_to_power_usage_without_the_instant_field():
    meter = NvmlMeter(FakeNvml(reported_w=250.0, instant_field=False), ("gpu", 0))
    assert meter.power_source.startswith("nvmlDeviceGetPowerUsage") and meter.power_w() == 251.0


def test_power_sampler_means_only_samples_inside_the_window():
    with PowerSampler(lambda: 100.0, period_s=0.01) as s:
        time.sleep(0.05)
    s.samples += [(1e9, 900.0)]
    assert s.mean_w(0, time.monotonic()) == 100.0 and s.mean_w(2e9, 3e9) is None
    assert energy_vs_power_error(100.0, 96.0, 1.0) == pytest.approx(0.04)
    assert energy_vs_power_error(0.0, 96.0, 1.0) == 1.0  # counter did not advance: cannot pass


@pytest.mark.parametrize(("reported_w", "sane"), [(300.0, True), (450.0, False)])
def test_measured_point_checks_counter_against_sampled_power(tiny, reported_w, sane):
    meter = NvmlMeter(FakeNvml(power_w=300.0, reported_w=reported_w), ("gpu", 0))
    p = measure_point(tiny, "decode", 2, 8, meter=meter, min_window_s=0.15, repeats=2)
    assert (p["source"], p["card"], p["driver"]) == ("measured", "Fake H100", "580.159.04")
    assert p["sanity_ok"] is sane  # a failed check is reported, not dropped
    assert p["energy_vs_power_error"] == pytest.approx(0.0 if sane else 0.5, abs=0.03)
    assert p["power_w"] == pytest.approx(300.0, rel=0.1)  # counter energy over the event-timed window
    assert p["j_per_tok"] == pytest.approx(p["power_w"] / p["tok_s"], rel=1e-6)
