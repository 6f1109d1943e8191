"""`factory bench run | compare | vs-vllm | report | selfbench`.

Argument mistakes end with one line on stderr and exit code 2; a server that cannot be used
(unreachable, key refused, model not served) with exit code 1; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP_DATASET = (
    "random | shared-prefix | sharegpt:FILE | trace:FILE (JSONL, factory/bench/tracefile.py); "
    "lengths for random and shared-prefix come from --input-len/--output-len"
)
HELP_LEN = "a token count (512), or a distribution: uniform:LO:HI, lognormal:MEAN:SIGMA, normal:MEAN:STD"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The load, dataset, SLO, energy and price options `run` and `vs-vllm` share."""
    p.add_argument("--dataset", default="random", help=HELP_DATASET)
    p.add_argument("--input-len", default="512", help="prompt tokens: " + HELP_LEN)
    p.add_argument(
        "--output-len", default="128", help="answer tokens (exact: the requests set ignore_eos): " + HELP_LEN
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="fixed concurrency, a sweep: 1,8,64 (default 1,8,32)")
    load.add_argument("--rate", help="Poisson arrivals, req/s, a sweep: 2,8,inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=int, help="requests per level (default 100)")
    size.add_argument("--duration", help="time per level, e.g. 60s or 5m (requests in flight at the end finish)")
    p.add_argument("--slo", help="targets for goodput, e.g. ttft=500ms,tpot=50ms,e2e=10s")
    p.add_argument("--gpu-price-hour", type=float, help="price of one GPU hour, for cost per million output tokens")
    p.add_argument("--kwh-price", type=float, help="price of one kWh, for the energy part of the cost")
    p.add_argument("--pue", type=float, default=1.0, help="data-centre PUE applied to the energy cost (default 1.0)")
    p.add_argument(
        "--gpus", type=int, help="GPUs the server uses, for the cost (default: those the energy source sees)"
    )
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests before each level (default 2)")
    p.add_argument(
        "--tokenizer",
        help="model dir or Hugging Face id: counts output tokens when a server sends no usage (else chunks count)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no live progress display")


def add_command(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark an OpenAI endpoint (ours or stock vLLM), compare runs")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    run = bsub.add_parser("run", help="run a load against one server; writes result.json and report.html")
    run.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True, help="the served model name")
    run.add_argument("--api-key", help="bearer key (the factory's; stock vLLM needs none)")
    run.add_argument(
        "--energy",
        choices=["auto", "server", "nvml", "none"],
        default="auto",
        help="server: the factory's /metrics energy counters; nvml: this node's GPUs; auto: the first that works",
    )
    run.add_argument("--label", default="run", help="name of this run in reports and comparisons")
    run.add_argument("--out", required=True, help="directory for result.json and report.html")
    add_run_arguments(run)
    run.set_defaults(func=_run)

    cmp = bsub.add_parser("compare", help="side-by-side table of two results with ratios B/A")
    cmp.add_argument("a", help="result.json or its directory (the baseline)")
    cmp.add_argument("b", help="result.json or its directory")
    cmp.add_argument(
        "--out", help="directory for comparison.json, comparison.md and report.html (of B, with the table)"
    )
    cmp.set_defaults(func=_compare)

    rep = bsub.add_parser("report", help="(re)write report.html from a result.json")
    rep.add_argument("result", help="result.json or its directory")
    rep.add_argument("--out", help="HTML path (default: report.html beside the result)")
    rep.set_defaults(func=_report)

    vs = bsub.add_parser("vs-vllm", help="stock vLLM's OpenAI server, then the factory, same model and load")
    vs.add_argument("--model", default="smollm2-135m", help="an embedded model name (default smollm2-135m)")
    vs.add_argument("--port", type=int, default=8391, help="port both servers use in turn (default 8391)")
    vs.add_argument("--config", help="factory YAML to start from (default: the embedded default)")
    vs.add_argument("--energy", choices=["auto", "nvml", "process", "none"], default="auto",
                    help="the same source for both: nvml on GPU nodes; process (CPU time of the server's "
                         "process tree, modeled) otherwise; auto picks")  # fmt: skip
    vs.add_argument("--out", required=True, help="directory: stock/, factory/, comparison.*")
    add_run_arguments(vs)
    vs.set_defaults(func=_vs_vllm)

    sb = bsub.add_parser("selfbench", help="the harness alone against a trivial streaming server on loopback")
    sb.add_argument("--concurrency", default="1,16,64,256")
    sb.add_argument("--num-requests", type=int, help="per level (default: 400 or 8 x concurrency)")
    sb.add_argument("--tokens", type=int, default=64, help="streamed chunks per answer")
    sb.add_argument("--delay-ms", type=float, default=0.0, help="gap between chunks (0: a request's chunks coalesce)")
    sb.set_defaults(func=_selfbench)


def _fail(message: str, code: int = 2) -> int:
    print(f"factory bench: {message}", file=sys.stderr)
    return code


def _bench_config(args: argparse.Namespace, out_dir: Path, **extra):
    from factory.bench.datasets import DatasetError, parse_dataset
    from factory.bench.load import LoadError, parse_levels
    from factory.bench.runner import BenchConfig
    from factory.bench.units import parse_duration_s, parse_slo

    try:
        levels = parse_levels(
            args.concurrency or (None if args.rate else "1,8,32"), args.rate, burstiness=args.burstiness
        )
        parse_dataset(args.dataset)  # a bad spec or a missing file fails before any server starts
        duration_s = parse_duration_s(args.duration, "--duration") if args.duration else None
        slo = parse_slo(args.slo)
    except (DatasetError, LoadError, ValueError) as err:
        raise _ArgError(str(err)) from err
    if args.num_requests is not None and args.num_requests < 1:
        raise _ArgError("--num-requests must be at least 1")
    if args.burstiness <= 0 or args.pue < 1.0:
        raise _ArgError("--burstiness must be > 0 and --pue >= 1")
    prices = {"gpu_price_hour": args.gpu_price_hour, "kwh_price": args.kwh_price, "pue": args.pue}
    if args.gpus:
        prices["gpus"] = args.gpus
    return BenchConfig(
        dataset=args.dataset,
        levels=levels,
        out_dir=out_dir,
        num_requests=args.num_requests if args.num_requests or duration_s else 100,
        duration_s=duration_s,
        slo=slo,
        prices=prices,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        warmup=args.warmup,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        **extra,
    )


class _ArgError(Exception):
    pass


def _run(args: argparse.Namespace) -> int:
    from factory.bench.energy import EnergyError
    from factory.bench.runner import BenchError, run_bench

    try:
        cfg = _bench_config(
            args, Path(args.out), url=args.url.rstrip("/"), model=args.model, api_key=args.api_key,
            energy=args.energy, label=args.label,
        )  # fmt: skip
    except _ArgError as err:
        return _fail(str(err))
    try:
        result = run_bench(cfg)
    except (BenchError, EnergyError) as err:
        return _fail(str(err), 1)
    print(f"wrote {cfg.out_dir / 'result.json'} and {cfg.out_dir / 'report.html'}")
    failures = [f for level in result["levels"] for f in level["failures"]]
    if failures and not any(level["requests"] for level in result["levels"]):
        return _fail(f"every request failed; the first: {failures[0]['error']}", 1)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from factory.bench.compare import compare, format_table, write_comparison
    from factory.bench.report import write_report
    from factory.bench.schema import ResultError, load

    try:
        a, b = load(args.a), load(args.b)
    except ResultError as err:
        return _fail(str(err))
    table = compare(a, b)
    print(format_table(table))
    if args.out:
        out = Path(args.out)
        write_comparison(table, out)
        write_report(b, out / "report.html", comparison=table)
        print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from factory.bench.report import write_report
    from factory.bench.schema import ResultError, load

    try:
        result = load(args.result)
    except ResultError as err:
        return _fail(str(err))
    src = Path(args.result)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report.html"
    print(write_report(result, out))
    return 0


def _vs_vllm(args: argparse.Namespace) -> int:
    from factory.bench.runner import BenchError
    from factory.bench.vsvllm import VsError, vs_vllm

    try:
        cfg = _bench_config(args, Path(args.out), url="", model="", energy="none", label="")
    except _ArgError as err:
        return _fail(str(err))
    try:
        vs_vllm(cfg, model_name=args.model, port=args.port, config_path=args.config, energy=args.energy)
    except (VsError, BenchError) as err:
        return _fail(str(err), 1)
    return 0


def _selfbench(args: argparse.Namespace) -> int:
    from factory.bench.selfbench import format_rows, selfbench

    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        return _fail(f"--concurrency {args.concurrency!r}: expected integers such as 1,16,64")
    rows = selfbench(levels, num_requests=args.num_requests, tokens=args.tokens, delay_s=args.delay_ms / 1000)
    print(format_rows(rows))
    return 0
