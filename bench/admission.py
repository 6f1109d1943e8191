"""KV-aware admission against stock vLLM on an over-subscribed load: preemptions, engine steps,
and the energy the steps would take on a measured GPU curve (MODELED from the curve, not metered).

    .venv/bin/python bench/admission.py [--profile configs/profiles/h100-sxm-llama-3.1-8b.measured.json]

96 requests (prompts 64-192 tokens, 256-512 output tokens each, ignore_eos) against a KV cache of
900 blocks of 16 tokens: every prompt fits at admission, the outputs do not. Stock vLLM admits
whatever fits now and preempts (recomputes) when decodes run out of blocks; the factory admits a
request only when the cache also holds `admission_horizon_tokens` more of every running request.
tests/scheduler_harness.py drives vLLM's real schedulers (no model). Energy per step =
power(batch) x (decode step time(batch) + prompt tokens in the step x PREFILL_S), from the
profile's decode curve at context 1024; recomputed tokens count as prompt tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

from factory.engine.wire import METER_ENV, SCHEDULER_ENV  # noqa: E402
from factory.engine.scheduler import EnergyAwareScheduler  # noqa: E402
from factory.policy.profile import load_profile  # noqa: E402
from tests.scheduler_harness import Driver, make_request, make_scheduler  # noqa: E402

PREFILL_S = 1 / 20_000  # seconds per prompt token in a step (an 8B model's prefill on one H100, order of)
CONTEXT = 1024
HORIZONS = (None, 256, 128, 64)  # None: reserve every running request's whole expected output


def load(n: int = 96, seed: int = 4):
    import random

    rng = random.Random(seed)
    return [make_request(f"r{i}", rng.randint(64, 192), rng.randint(256, 512)) for i in range(n)]


def run(cls: type[Scheduler], horizon: int | None, profile) -> dict:
    os.environ[SCHEDULER_ENV] = f'{{"admission_horizon_tokens": {horizon or 10**9}}}'
    scheduler = make_scheduler(cls, max_num_seqs=256, max_num_batched_tokens=2048, num_gpu_blocks=900)
    driver = Driver(scheduler)
    driver.add(load())
    records = []
    summary = driver.run(50_000, on_step=lambda _, r: records.append(r))
    energy_j = 0.0
    for r in records:
        if r.num_scheduled_reqs:
            b = r.num_scheduled_reqs
            energy_j += profile.power_w(b, CONTEXT) * (
                profile.step_s(b, CONTEXT) + (r.num_scheduled_tokens - b) * PREFILL_S
            )
    return {"steps": summary.steps, "preemptions": summary.preemptions, "max_running": summary.max_running,
            "tokens": summary.tokens, "energy_j": energy_j}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="configs/profiles/h100-sxm-llama-3.1-8b.measured.json")
    args = ap.parse_args()
    os.environ.pop(METER_ENV, None)
    profile = load_profile(args.profile)
    print(f"profile: {profile.card} / {profile.model} ({profile.source}); energy MODELED from its decode curve")
    print(f"{'scheduler':<28} {'steps':>6} {'preempt':>8} {'max run':>8} {'J':>8} {'J vs stock':>10}")
    stock = run(Scheduler, None, profile)
    rows = [("stock vLLM", stock)] + [
        (f"factory, horizon {h or 'whole output'}", run(EnergyAwareScheduler, h, profile)) for h in HORIZONS
    ]
    for name, r in rows:
        print(f"{name:<28} {r['steps']:>6} {r['preemptions']:>8} {r['max_running']:>8} {r['energy_j']:>8.0f} "
              f"{r['energy_j'] / stock['energy_j']:>10.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
