"""The factory's energy-aware scheduler against vLLM's own, on this CPU with the embedded model:
the same closed-loop load under the same p99 TPOT SLO, output tokens/s and tokens per joule.

    .venv/bin/python bench/scheduler_vs_stock.py [--rounds 3] [--duration 120] [--concurrency 32]
        [--max-tokens 128] [--tpot-ms 250] [--profile auto] [--json OUT]

The factory starts once per run with `scheduler.policy: stock` (vLLM's scheduler, metered) or
`energy` (the factory's), telemetry on and modeled, auth disabled, everything else the embedded
default; runs alternate stock, energy, stock, energy, ... so drift on a shared machine lands on
both, and the spread between rounds shows what a difference must clear. Each run: a warm-up of
one request per client, then `concurrency` clients stream chat completions back to back
(overhead.py's request: one fixed prompt, ignore_eos, max_tokens) for `duration` seconds; requests
in flight at the end finish and count.

Per request, client side: TTFT = first content chunk; TPOT = (last chunk - first chunk) /
(output tokens - 1). Throughput = output tokens / (last response - first send). Energy = the
delta of factory_energy_joules_total over the run (/metrics before and after), so tokens per
joule includes the idle power between steps. Energy is MODELED on a CPU (busy 120 W, idle 40 W:
telemetry.modeled_*_watts), so tokens per joule follows from how busy the engine was per token.
SLO attainment = share of requests whose own TPOT (TTFT) meets scheduler.slo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metering import MODEL, _scrape, start_factory  # noqa: E402  (sibling scripts)
from overhead import _load, _one, _stop  # noqa: E402

from factory.bench.schema import cpu_model  # noqa: E402
from factory.config import FactoryConfig  # noqa: E402

POLICIES = ("stock", "energy")
ENERGY = "factory_energy_joules_total"


def _start(work: Path, port: int, policy: str, args: argparse.Namespace, tag: str) -> subprocess.Popen:
    scheduler = {"policy": policy, "slo": {"tpot_ms": args.tpot_ms, "ttft_ms": args.ttft_ms}}
    if policy == "energy":
        scheduler["profile"] = None if args.profile == "null" else args.profile
    config = {"auth": "disabled", "telemetry": {"enabled": True, "source": "modeled"}, "scheduler": scheduler}
    return start_factory(work, port, tag, config)


async def _drive(base: str, concurrency: int, duration_s: float, max_tokens: int) -> list[dict]:
    """`concurrency` clients, each sending its next request when the last one ends, until the deadline."""
    url = base + "/v1/chat/completions"
    deadline = time.perf_counter() + duration_s
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                records.append(await _one(client, url, MODEL, max_tokens))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return records


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def summarize(records: list[dict], energy_j: float, slo_tpot_s: float, slo_ttft_s: float) -> dict:
    """One run's figures from its requests (overhead._one's records) and its energy."""
    out_tok = sum(r["n_out"] for r in records)
    duration_s = max(r["t_last"] for r in records) - min(r["t_send"] for r in records)
    ttfts = [r["ttft_s"] for r in records]
    tpots = [(r["t_last"] - r["t_send"] - r["ttft_s"]) / (r["n_out"] - 1) for r in records if r["n_out"] > 1]
    return {
        "requests": len(records),
        "output_tokens": out_tok,
        "duration_s": duration_s,
        "output_tok_s": out_tok / duration_s,
        "energy_j": energy_j,
        "tok_per_j": out_tok / energy_j,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": _p99(ttfts) * 1000,
        "tpot_p50_ms": statistics.median(tpots) * 1000,
        "tpot_p99_ms": _p99(tpots) * 1000,
        "tpot_slo_attainment": sum(t <= slo_tpot_s for t in tpots) / len(tpots),
        "ttft_slo_attainment": sum(t <= slo_ttft_s for t in ttfts) / len(ttfts),
    }


def _batch_cap(base: str) -> float | None:
    """The energy scheduler's running cap now (factory_batch_cap; absent under the stock policy)."""
    m = re.search(r"^factory_batch_cap(?:\{[^}]*\})? ([0-9.eE+-]+)$", httpx.get(base + "/metrics").text, re.M)
    return float(m.group(1)) if m else None


def run_once(work: Path, policy: str, rnd: int, args: argparse.Namespace) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    proc = _start(work, args.port, policy, args, f"{policy}-{rnd}")
    try:
        asyncio.run(_load(base, MODEL, args.concurrency, args.concurrency, args.max_tokens))  # warm-up, one each
        before = _scrape(base)[ENERGY]
        records = asyncio.run(_drive(base, args.concurrency, args.duration, args.max_tokens))
        energy_j = _scrape(base)[ENERGY] - before
        row = summarize(records, energy_j, args.tpot_ms / 1000, args.ttft_ms / 1000)
        return {"policy": policy, "round": rnd, **row, "batch_cap_at_end": _batch_cap(base)}
    finally:
        _stop(proc)


def _row(r: dict) -> str:
    cap = "" if r["batch_cap_at_end"] is None else f"{r['batch_cap_at_end']:.0f}"
    return (
        f"{r['policy']:<7}{r['round']:>3}{r['requests']:>6}{r['output_tok_s']:>9.1f}{r['tok_per_j']:>8.3f}"
        f"{r['ttft_p50_ms']:>9.0f}{r['ttft_p99_ms']:>9.0f}{r['tpot_p50_ms']:>8.0f}{r['tpot_p99_ms']:>8.0f}"
        f"{r['tpot_slo_attainment']:>8.1%}{r['ttft_slo_attainment']:>8.1%}{cap:>5}"
    )


HEADER = (
    f"{'policy':<7}{'rnd':>3}{'reqs':>6}{'tok/s':>9}{'tok/J':>8}{'TTFT50':>9}{'TTFT99':>9}{'TPOT50':>8}"
    f"{'TPOT99':>8}{'TPOT ok':>8}{'TTFT ok':>8}{'cap':>5}"
)


def ratios(rows: list[dict]) -> dict:
    """energy / stock for tokens/s and tokens per joule: of the means, and per round (the spread)."""

    def mean(policy: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["policy"] == policy)

    by_round: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["policy"]] = r
    out = {}
    for key in ("output_tok_s", "tok_per_j"):
        out[key] = {
            "mean_ratio": mean("energy", key) / mean("stock", key),
            "per_round": [p["energy"][key] / p["stock"][key] for _, p in sorted(by_round.items())],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    slo = FactoryConfig().scheduler.slo
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=120, help="seconds of load per run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tpot-ms", type=float, default=slo.tpot_ms, help="p99 TPOT SLO, both runs")
    ap.add_argument("--ttft-ms", type=float, default=slo.ttft_ms, help="p99 TTFT SLO, both runs")
    ap.add_argument("--profile", default="auto", help="the energy scheduler's scheduler.profile: auto, a path, null")
    ap.add_argument("--port", type=int, default=8393)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="sched-vs-stock-"))
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; model {MODEL}; energy MODELED")
    print(f"command: {command}")
    print(
        f"load: c={args.concurrency}, {args.duration:g} s per run, max_tokens {args.max_tokens} (ignore_eos); "
        f"SLO p99 TPOT {args.tpot_ms:g} ms, TTFT {args.ttft_ms:g} ms; logs {work}\n"
    )
    print(HEADER, flush=True)
    rows = []
    for rnd in range(args.rounds):
        for policy in POLICIES:
            rows.append(run_once(work, policy, rnd, args))
            print(_row(rows[-1]), flush=True)
    result = ratios(rows)
    print("\nenergy / stock (same load, same SLO; energy MODELED):")
    for key, label in (("output_tok_s", "tokens/s"), ("tok_per_j", "tokens/J")):
        spread = ", ".join(f"{x:.3f}" for x in result[key]["per_round"])
        print(f"  {label:<9} {result[key]['mean_ratio']:.3f}x  (per round: {spread})")
    for policy in POLICIES:
        p99 = max(r["tpot_p99_ms"] for r in rows if r["policy"] == policy)
        verdict = "meets" if p99 <= args.tpot_ms else "misses"
        print(f"  {policy:<7} worst p99 TPOT {p99:.0f} ms: {verdict} the {args.tpot_ms:g} ms SLO")
    if args.json:
        doc = {
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
            "command": command,
            "energy_source": "modeled",
            "load": {"concurrency": args.concurrency, "duration_s": args.duration, "max_tokens": args.max_tokens},
            "slo": {"tpot_ms": args.tpot_ms, "ttft_ms": args.ttft_ms},
            "rows": rows,
            "ratios": result,
            "logs": str(work),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    sys.exit(main())
