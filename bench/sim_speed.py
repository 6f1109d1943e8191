"""How fast `factory sim` runs: both policies at 8 and 64 GPUs x 1 simulated hour (diurnal trace,
--load 0.5, the published H100 profile, default SLO ttft=2s,tpot=100ms). Target: 64 GPUs in
under 60 s of wall time per policy on the project's 2-core machine.

    .venv/bin/python bench/sim_speed.py [--gpus 8,64] [--duration 1h] [--json out.json]

Wall seconds cover what `factory sim` does for one policy except writing files: the cluster run
and the result's aggregates. Also printed: simulated requests (cohorts counted K times), the
cohort size, requests simulated per wall second, and each run's simulated J/token and SLO
attainment (every figure of the fleet is simulated).
"""

from __future__ import annotations

import argparse
import json
import time

from factory.policy.batch import Slo
from factory.sim import cluster, output, workload
from factory.sim.cli import parse_duration, resolve_profile
from factory.sim.cluster import SimConfig


def one(profile, gpus: int, policy: str, duration_s: float, work: workload.Workload) -> dict:
    slo = {"ttft_s": 2.0, "tpot_s": 0.1}
    t0 = time.perf_counter()
    run = cluster.run(profile, work, SimConfig(gpus=gpus, policy=policy, slo=Slo(2.0, 0.1)))
    run_s = time.perf_counter() - t0
    agg, _ = output.aggregates(run, slo, {})
    wall_s = time.perf_counter() - t0
    return {
        "gpus": gpus,
        "policy": policy,
        "wall_s": wall_s,
        "run_s": run_s,
        "requests": agg["completed"] + agg["failed"],
        "cohort": work.cohort,
        "requests_per_wall_s": (agg["completed"] + agg["failed"]) / wall_s,
        "sim_j_per_tok": agg["energy"]["whole"]["j_per_tok"],
        "sim_slo_attained": agg["slo_attained"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="8,64")
    ap.add_argument("--duration", type=parse_duration, default=3600.0)
    ap.add_argument("--profile", default="h100-sxm-llama-3.1-8b.published")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    profile, _ = resolve_profile(args.profile)
    rows = []
    print(
        f"{'gpus':>5} {'policy':>8} {'wall s':>8} {'requests':>11} {'cohort':>6} {'req/s':>9} "
        f"{'sim J/tok':>10} {'sim SLO':>8}"
    )
    for gpus in (int(g) for g in args.gpus.split(",")):
        rate = 0.5 * gpus * profile.tok_s(256) / 256
        work = workload.synthetic(
            "diurnal", duration_s=args.duration, rate_req_s=rate, input_len=512, output_len=256, seed=0
        )
        for policy in cluster.POLICIES:
            r = one(profile, gpus, policy, args.duration, work)
            rows.append(r)
            print(
                f"{gpus:>5} {policy:>8} {r['wall_s']:>8.1f} {r['requests']:>11,} {r['cohort']:>6} "
                f"{r['requests_per_wall_s']:>9,.0f} {r['sim_j_per_tok']:>10.4f} {r['sim_slo_attained']:>8.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
