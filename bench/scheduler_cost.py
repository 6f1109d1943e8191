"""What the energy-aware scheduler costs per engine step: time per `schedule()` call, and per
whole step (`schedule()` + `update_from_output()`), with 256 running decode requests, stock
vLLM's scheduler against the factory's, synchronous (CPU replicas) and async (GPU replicas).

    .venv/bin/python bench/scheduler_cost.py [--running 256] [--steps 500] [--rounds 3] [--json out.json]

Two scenarios, both with every running request decoding one token per step:
- decode: `running` requests, max_num_seqs = running, nothing waiting (admission has no slot).
- decode + queue: as many requests again waiting, max_num_seqs = 2 x running but vLLM's
  max_num_active_seqs = running, so no one is admitted while the factory's admission check
  still runs every step (it walks the running requests and the queue: its worst case).

No model: tests/scheduler_harness.py drives vLLM's real scheduler over a synthetic KV cache, so
what is timed is the scheduler's own Python. Stock, ours and a second stock instance take one step
each in turn, so drift on a shared machine lands on all alike; stock against stock is printed as
the noise floor a difference must clear. That floor is tens to hundreds of µs on a busy machine,
above the issue's goal (the factory's scheduler adds at most 20 µs to a schedule() call), so
the factory's own code is also timed alone: its schedule() on a scheduler in the scenario's state,
with vLLM's Scheduler.schedule swapped for one that returns a recorded output at once.

Runs with FACTORY_METER and FACTORY_SCHEDULER unset (no meter, no SLO, no profile): the policy's
cost, not the meter's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
import vllm  # noqa: E402
from scheduler_vs_stock import cpu_model  # noqa: E402  (sibling script)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

from factory.engine.wire import METER_ENV, SCHEDULER_ENV  # noqa: E402
from factory.engine.scheduler import AsyncEnergyAwareScheduler, EnergyAwareScheduler  # noqa: E402
from tests.scheduler_harness import BLOCK_SIZE, Driver, make_request, make_scheduler  # noqa: E402

PROMPT_TOK = 128
GOAL_ADDED_US = 20.0
# (stock, ours) pairs, compared within a pair only.
PAIRS = [(Scheduler, EnergyAwareScheduler), (AsyncScheduler, AsyncEnergyAwareScheduler)]
SCENARIOS = {"decode": False, "decode + queue": True}  # name -> requests waiting
# Steps allowed for every prompt to be prefilled before timing starts.
MAX_WARMUP_STEPS = 50
QUANTILES = ("median", "p90")
PARTS = ("schedule_us", "step_us")


def warm_driver(cls: type[Scheduler], running: int, steps: int, queue: bool) -> Driver:
    """A driver whose `running` requests all decode, with tokens left for `steps` more steps, and
    (with `queue`) as many more waiting behind vLLM's admission limit."""
    max_tokens = MAX_WARMUP_STEPS + steps + 2
    blocks_per_req = -(-(PROMPT_TOK + max_tokens) // BLOCK_SIZE) + 1
    total = 2 * running if queue else running
    scheduler = make_scheduler(
        cls,
        max_num_seqs=total,
        max_num_active_seqs=running,
        num_gpu_blocks=total * blocks_per_req,
        max_model_len=PROMPT_TOK + max_tokens + 16,
    )
    driver = Driver(scheduler)
    driver.add(make_request(f"{cls.__name__}-{i}", PROMPT_TOK, max_tokens) for i in range(total))
    for _ in range(MAX_WARMUP_STEPS):
        if driver.step().num_scheduled_tokens == running:  # one token each: every request decoding
            return driver
    raise RuntimeError(f"{cls.__name__}: {running} requests never all decoded; is a batch cap below {running}?")


def time_round(classes: list[type[Scheduler]], running: int, steps: int, queue: bool) -> list[tuple[list, list]]:
    """schedule() and whole-step times (µs) per class, one step of each in turn (the first mover
    rotating), so that drift on a shared machine lands on all of them alike."""
    drivers = [warm_driver(cls, running, steps, queue) for cls in classes]
    samples = [([], []) for _ in classes]
    gc.collect()
    for i in range(steps):
        for k in range(len(drivers)):
            j = (i + k) % len(drivers)
            record = drivers[j].step()
            if record.num_scheduled_reqs != running or record.admitted:
                raise RuntimeError(f"{classes[j].__name__} scheduled {record.num_scheduled_reqs}, not {running}")
            samples[j][0].append(record.schedule_s * 1e6)
            samples[j][1].append((record.schedule_s + record.update_s) * 1e6)
    return samples


def own_code_us(cls: type[Scheduler], running: int, queue: bool, calls: int) -> dict[str, float]:
    """The factory's code in one schedule() call, without vLLM's: see the module docstring."""
    scheduler = warm_driver(cls, running, 1, queue).scheduler
    recorded = Scheduler.schedule(scheduler)
    vllm_schedule = Scheduler.schedule
    Scheduler.schedule = lambda self, *args, **kwargs: recorded
    try:
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            scheduler.schedule()
            samples.append((time.perf_counter() - start) * 1e6)
    finally:
        Scheduler.schedule = vllm_schedule
    return quantiles_us(samples)


def quantiles_us(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "p90": statistics.quantiles(samples, n=10)[8]}


def _minus(a: dict, b: dict) -> dict:
    return {part: {q: a[part][q] - b[part][q] for q in QUANTILES} for part in PARTS}


def measure(running: int, steps: int, rounds: int) -> list[dict]:
    """Per scenario and (stock, ours) pair: both, their difference, and the difference between two
    stock instances run the same way (the noise floor a difference must clear to mean anything)."""
    rows = []
    for scenario, queue in SCENARIOS.items():
        for stock, ours in PAIRS:
            merged = [([], []) for _ in range(3)]
            for _ in range(rounds):
                for into, got in zip(merged, time_round([stock, ours, stock], running, steps, queue), strict=True):
                    into[0].extend(got[0])
                    into[1].extend(got[1])
            stock_us, ours_us, again_us = (
                {"schedule_us": quantiles_us(sched), "step_us": quantiles_us(step)} for sched, step in merged
            )
            rows.append(
                {
                    "scenario": scenario,
                    "stock": stock.__name__,
                    "ours": ours.__name__,
                    "stock_us": stock_us,
                    "ours_us": ours_us,
                    "added_us": _minus(ours_us, stock_us),
                    "noise_floor_us": _minus(again_us, stock_us),
                    "own_code_schedule_us": own_code_us(ours, running, queue, steps * rounds),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'scheduler':<28}{'schedule() µs':>22}{'whole step µs':>22}",
        f"{'':<28}{'median':>11}{'p90':>11}{'median':>11}{'p90':>11}",
    ]

    def line(name: str, s: dict, sign: str = "") -> str:
        return f"{name:<28}" + "".join(f"{s[part][q]:>{sign}11.1f}" for part in PARTS for q in QUANTILES)

    scenario = None
    for row in rows:
        if row["scenario"] != scenario:
            scenario = row["scenario"]
            lines.append(f"-- {scenario}")
        lines.append(line(row["stock"], row["stock_us"]))
        lines.append(line(row["ours"], row["ours_us"]))
        lines.append(line("  added", row["added_us"], "+"))
        lines.append(line("  noise (stock vs stock)", row["noise_floor_us"], "+"))
        own = row["own_code_schedule_us"]
        lines.append(f"{'  its own code alone':<28}{own['median']:>+11.1f}{own['p90']:>+11.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, default=256, help="running decode requests")
    ap.add_argument("--steps", type=int, default=500, help="timed steps per class per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each with fresh schedulers")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.pop(METER_ENV, None)
    os.environ.pop(SCHEDULER_ENV, None)

    header = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
        "running": args.running,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
    }
    rows = measure(args.running, args.steps, args.rounds)
    worst_added_us = max(row["own_code_schedule_us"]["median"] for row in rows)
    verdict = "met" if worst_added_us <= GOAL_ADDED_US else "NOT met"
    print(f"scheduler cost: {args.running} running decode requests, {args.rounds} rounds x {args.steps} steps")
    print(f"cpu: {header['cpu']} ({header['cpu_count']} cores seen); python {header['python']}; vllm {header['vllm']}")
    print(f"command: {header['command']}\n")
    print(table(rows))
    print(
        f"\ngoal: the factory's code adds <= {GOAL_ADDED_US:.0f} µs to schedule() (median, timed alone): "
        f"{verdict} (worst {worst_added_us:.1f} µs)"
    )
    if args.json:
        result = {**header, "rows": rows, "goal_added_us": GOAL_ADDED_US, "goal_met": verdict == "met"}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
