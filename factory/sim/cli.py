"""`factory sim`: simulate a fleet of GPUs serving a trace, stock vLLM's policy against the factory's.

    factory sim --profile h100-sxm-llama-3.1-8b.published --trace diurnal --gpus 64 \\
        --policy stock,factory --slo ttft=2s,tpot=100ms --duration 1h --load 0.5 --out results/sim

Writes DIR/result.json (two policies: DIR/stock/ and DIR/factory/, plus DIR/comparison.*) and a
report.html beside each result; prints a one-screen summary. Every figure is simulated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from factory.bench import schema
from factory.bench.compare import compare, write_comparison
from factory.bench.report import write_report
from factory.bench.tracefile import TraceError
from factory.bench.units import parse_duration_s
from factory.bench.units import parse_slo as parse_slo_s
from factory.config import PROFILES_DIR
from factory.policy.batch import Slo
from factory.policy.profile import EnergyProfile, ProfileError, load_profile
from factory.policy.throttle import Budgets
from factory.power.units import parse_watts
from factory.sim import cluster, output, workload
from factory.sim.cluster import SimConfig

DEFAULT_PROFILE = "h100-sxm-llama-3.1-8b.published"
DEFAULT_DURATION_S = 3600.0


class SimArgError(ValueError):
    """A bad argument found after parsing (unknown profile, unreadable trace)."""


def parse_duration(text: str) -> float:
    """'1h', '30m', '90s', '100ms' or a number of seconds -> seconds (> 0)."""
    try:
        return parse_duration_s(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_slo(text: str) -> dict:
    """'ttft=2s,tpot=100ms[,e2e=30s]' -> {"ttft_s", "tpot_s", "e2e_s"} (None where not given)."""
    try:
        return parse_slo_s(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_budget(text: str) -> dict:
    """'site=30kW', 'node=5kW', 'gpu=500W' (comma-separated for several) -> {"site_w", ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        scope, _, value = part.partition("=")
        if scope.strip() not in ("site", "node", "gpu") or not value:
            raise argparse.ArgumentTypeError(f"bad budget {part!r}: use site=30kW, node=5kW or gpu=500W")
        try:
            out[f"{scope.strip()}_w"] = parse_watts(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad budget {part!r}: {err}") from err
    return out


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(n not in cluster.POLICIES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"bad policy {text!r}: stock, factory or stock,factory")
    return sorted(names, key=cluster.POLICIES.index)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
        return value

    return parse


def _cohort(text: str) -> int | None:
    if text == "auto":
        return None
    return _positive(int)(text)


def resolve_profile(name: str) -> tuple[EnergyProfile, Path]:
    path = Path(name)
    if not path.is_file():
        path = PROFILES_DIR / f"{name.removesuffix('.json')}.json"
    if not path.is_file():
        stems = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
        raise SimArgError(f"unknown profile {name!r}: not a file and not a stem in {PROFILES_DIR} (available: {stems})")
    try:
        return load_profile(path), path
    except ProfileError as err:
        raise SimArgError(str(err).replace("\n", " ")) from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a(
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"energy profile: a path or a stem in configs/profiles (default {DEFAULT_PROFILE})",
    )
    a("--trace", default="diurnal", help="poisson, diurnal or a trace FILE (JSONL, factory/bench/tracefile.py)")
    a("--gpus", type=_positive(int), default=8, help="GPUs (one replica each)")
    a("--policy", type=_policies, default=["stock", "factory"], help="stock, factory or stock,factory (default both)")
    a("--slo", type=parse_slo, default=parse_slo("ttft=2s,tpot=100ms"), help="p99 targets, e.g. ttft=2s,tpot=100ms")
    a("--duration", type=parse_duration, default=None, help="arrival span, e.g. 1h, 30m, 90s (default 1h; a FILE: all)")
    a("--load", type=_positive(float), default=0.5, help="mean arrival rate as a share of the fleet's capacity")
    a("--rate", type=_positive(float), default=None, help="mean arrival rate, req/s (overrides --load)")
    a("--input-len", type=_positive(int), default=512, help="mean prompt length, tokens (lognormal)")
    a("--output-len", type=_positive(int), default=256, help="mean answer length, tokens (lognormal)")
    a("--max-num-seqs", type=_positive(int), default=256, help="the engine's max_num_seqs")
    a("--max-num-batched-tokens", type=_positive(int), default=8192, help="the engine's tokens per step")
    a("--idle-w", type=_positive(float), default=100.0, help="a GPU's idle power, W")
    a("--kv-tokens", type=_positive(int), default=400_000, help="one GPU's KV cache, tokens")
    a("--gpus-per-node", type=_positive(int), default=8, help="GPUs per node (node budgets)")
    a("--budget", type=parse_budget, action="append", default=[], help="power budget: site=30kW, node=5kW, gpu=500W")
    a("--gpu-price-hour", type=_positive(float), default=None, help="GPU price per hour (cost)")
    a("--kwh-price", type=_positive(float), default=None, help="energy price per kWh (cost)")
    a("--pue", type=_positive(float), default=1.0, help="power usage effectiveness (cost)")
    a("--seed", type=int, default=0, help="random seed of the synthetic traces")
    a("--cohort", type=_cohort, default=None, help="requests per simulated arrival: auto or K")
    a("--tick", type=parse_duration, default=0.1, help="cluster tick (routing, control), default 100ms")
    a("--decision-interval", type=parse_duration, default=1.0, help="factory batch decision interval, default 1s")
    a("--out", required=True, help="output directory")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim",
        help="simulate a GPU fleet from an energy profile (stock vs factory)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run_args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="factory sim", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    try:
        profile, path = resolve_profile(args.profile)
        work = _workload(args, profile)
        if work.cohort > args.max_num_seqs:
            raise SimArgError(f"--cohort {work.cohort} is above --max-num-seqs {args.max_num_seqs}")
    except (SimArgError, TraceError, workload.WorkloadError) as err:
        print(f"factory sim: {err}", file=sys.stderr)
        return 2
    budgets = {}
    for b in args.budget:
        budgets.update(b)
    prices = {"gpu_price_hour": args.gpu_price_hour, "kwh_price": args.kwh_price, "pue": args.pue, "gpus": args.gpus}
    config = _config(args, profile, path, work, budgets, prices)
    meta = {
        "stem": path.stem,
        "path": str(path),
        "source": profile.source,
        "card": profile.card,
        "model": profile.model,
    }
    results = {}
    for policy in args.policy:
        cfg = SimConfig(
            gpus=args.gpus,
            policy=policy,
            slo=Slo(args.slo["ttft_s"], args.slo["tpot_s"]),
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            idle_w=args.idle_w,
            kv_tokens=args.kv_tokens,
            gpus_per_node=args.gpus_per_node,
            budgets=Budgets(**budgets) if budgets else None,
            tick_s=args.tick,
            decision_s=args.decision_interval,
        )
        t0 = time.perf_counter()
        run = cluster.run(profile, work, cfg)
        wall_s = time.perf_counter() - t0
        result = output.build_result(
            run,
            config=dict(config, policy=policy),
            slo=args.slo,
            prices=prices,
            profile_meta=meta,
            wall_s=wall_s,
            notes=notes(cfg, profile, work),
        )
        results[policy] = result
        print(output.summary(result))
    out = Path(args.out)
    if len(results) == 1:
        (result,) = results.values()
        schema.save(result, out)
        write_report(result, out / "report.html")
    else:
        cmp = compare(results["stock"], results["factory"])
        for policy, result in results.items():
            schema.save(result, out / policy)
            write_report(result, out / policy / "report.html", comparison=cmp if policy == "factory" else None)
        write_comparison(cmp, out)
        print(output.side_by_side(results["stock"], results["factory"]))
    print(f"simulated results written to {out}")
    return 0


def _workload(args: argparse.Namespace, profile: EnergyProfile) -> workload.Workload:
    if args.trace in workload.SYNTHETIC:
        # Capacity: every GPU at max_num_seqs, answers of the mean length.
        rate = args.rate or args.load * args.gpus * profile.tok_s(args.max_num_seqs) / args.output_len
        return workload.synthetic(
            args.trace,
            duration_s=args.duration or DEFAULT_DURATION_S,
            rate_req_s=rate,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            cohort=args.cohort,
        )
    if not Path(args.trace).is_file():
        raise SimArgError(f"trace {args.trace!r} is not poisson, diurnal or a file")
    return workload.from_file(args.trace, duration_s=args.duration, cohort=args.cohort)


def _config(args, profile, path, work, budgets, prices) -> dict:
    return {
        "url": None,
        "model": profile.model,
        "dataset": args.trace,
        "num_requests": len(work) * work.cohort,
        "duration_s": work.duration_s,
        "load": {
            "mode": "trace",
            "levels": [None],
            "fraction": None if args.rate else args.load,
            "rate_req_s": work.rate_req_s,
        },
        "slo": args.slo,
        "energy": "sim",
        "prices": prices,
        "profile": str(path),
        "gpus": args.gpus,
        "policies": args.policy,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "idle_w": args.idle_w,
        "kv_tokens": args.kv_tokens,
        "gpus_per_node": args.gpus_per_node,
        "budgets": budgets or None,
        "seed": args.seed,
        "cohort": work.cohort,
        "tick_s": args.tick,
        "decision_s": args.decision_interval,
    }


def notes(cfg: SimConfig, profile: EnergyProfile, work: workload.Workload) -> list[str]:
    """Every modelling simplification, stated in the result."""
    prefill = cluster.tables(profile, 1)[2]
    out = [
        f"every figure is simulated from the {profile.source} energy profile of {profile.card} / {profile.model}; "
        "nothing was measured",
        "a step's time and power depend only on its batch size (the profile's workload mix), not on each "
        "request's context; steps run back to back (no host overhead between them)",
        "prefill costs no extra time: the profile has no prefill points and its decode figures are whole-server "
        "figures with prefill folded in"
        if not prefill
        else "a step that admits prompts takes prompt tokens / the profile's largest prefill tok/s longer",
        "a prompt is prefilled whole in the step that admits it (no chunked prefill); the token budget bounds "
        "the prompts one step takes (at least one)",
        "KV counted in tokens, not blocks; stock admits when the prompt plus the step's new tokens fit; the "
        f"factory reserves {cfg.horizon_tok} tokens of growth per running request; overflow preempts the "
        "newest request (recompute)",
        f"idle and paused GPUs draw {cfg.idle_w:g} W; ITL = the interval between steps (compute + pause)",
        f"the cluster ticks every {cfg.tick_s:g} s: arrivals of a tick are routed at its start with the "
        "completions known then; routing stats are published every "
        f"{cfg.stats_period_s:g} s as in the runtime",
    ]
    if cfg.policy == "factory":
        out += [
            f"choose_batch runs every {cfg.decision_s:g} s per GPU with work (the engine decides every 100 ms; "
            "an idle engine does not schedule) and at once on a new power cap",
            "the energy curve gets one observe_step per decision (the GPU's present step), not one per step; "
            "the simulated truth is the profile the curve starts from, so learning leaves it in place",
            "under a power cap each step is followed by a pause at choose_batch's duty (feed-forward; the "
            "runtime adds an integral correction on measured power, which the model makes unnecessary)",
            "a lowered batch cap stops admissions; requests already running finish",
            "factory routing ranks one view per class of equal replica views (exact for the first choice)",
            "choose_batch is pure: its answer is reused for exactly the same inputs (curve contents included)",
        ]
        if cfg.budgets is not None:
            out.append("governor level 2 (low-priority classes slowed) is not modelled; level 3 sheds them")
    elif cfg.budgets is not None:
        out.append("stock has no governor (vLLM has none): power budgets apply to the factory policy only")
    if work.cohort > 1:
        out.append(
            f"each simulated arrival stands for {work.cohort} identical requests (same time, lengths and "
            "GPU); counts, tokens and latency percentiles weight each by that"
        )
    if (work.prefix >= 0).any():
        out.append("prefix-cache hits are counted (prefix_hit_rate) but do not shorten prefill")
    return out
