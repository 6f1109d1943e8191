"""Stock vLLM and variants of the factory, interleaved, the same loads against each: what auth and
metering cost, and what the process priorities buy.

    .venv/bin/python bench/variants.py --setups stock,factory,auth,flat --rounds 2 \
        --load 32:40s:256:128 --load 1:25s:256:128 --out /tmp/variants

Setups (each started, measured on every load, stopped, before the next; rounds alternate them so
drift on a shared machine spreads over all of them):
- `stock`: vLLM's own OpenAI server with the engine arguments the factory derives (as vs-vllm);
- `factory`: `factory serve` on the config, `auth: disabled` (loopback), metering on;
- `auth`: the same with `auth: required`, a tenant, a key and a package big enough for the run;
  every request carries the key (verified, reserved, settled);
- `flat`: the factory with every process at Ray's worker niceness (FACTORY_PRIORITIES=flat), no
  background processes reniced (factory/priorities.py);
- `stocksched`: the factory with vLLM's own scheduler inside, metered (`scheduler.policy: stock`);
- `unmetered`: the factory without the engine meter (`telemetry.enabled: false`, vLLM's scheduler).
A load is CONCURRENCY:DURATION:INPUT_TOKENS:OUTPUT_TOKENS. Prints one table (median over rounds,
ratio to the first setup) and writes rows.json; each run's result.json stays under OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from factory.bench.schema import cpu_model
from factory.bench.vsvllm import _factory_doc, _stock_cmd, start_server, stop_server, wait_ready

FACTORY = str(Path(sys.executable).with_name("factory"))
PACKAGE_TOKENS = 10**9


def _factory(setup: str, config: str | None, port: int, work: Path) -> tuple[list[str], dict, str | None]:
    """The command, extra environment and API key of a factory setup."""
    work.mkdir(parents=True, exist_ok=True)
    doc = _factory_doc(config, port, work)
    env, key = {}, None
    ledger = str(work / "ledger.db")
    doc["ledger"]["path"] = ledger
    if setup == "auth":
        doc["auth"] = "required"

        def cli(*args: str) -> str:
            done = subprocess.run([FACTORY, *args, "--ledger", ledger], capture_output=True, text=True, check=True)
            return done.stdout.strip().splitlines()[-1]

        cli("tenants", "create", "bench")
        cli("packages", "grant", "--tenant", "bench", "--tokens", str(PACKAGE_TOKENS))
        key = cli("keys", "create", "--tenant", "bench").split()[-1]
    elif setup == "flat":
        env["FACTORY_PRIORITIES"] = "flat"
    elif setup == "stocksched":
        doc.setdefault("scheduler", {})["policy"] = "stock"
    elif setup == "unmetered":
        doc.setdefault("telemetry", {})["enabled"] = False
        doc.setdefault("scheduler", {})["policy"] = "stock"
    elif setup != "factory":
        raise SystemExit(f"unknown setup {setup!r}")
    path = work / "factory.yaml"
    path.write_text(yaml.safe_dump(doc))
    return [FACTORY, "serve", str(path)], env, key


def _aggregates(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())["levels"][0]["aggregates"]


def _pick(m: dict, *keys: str) -> float:
    for k in keys:
        if not isinstance(m, dict) or k not in m:
            return float("nan")
        m = m[k]
    return float(m) if m is not None else float("nan")


FIGURES = {
    "output tok/s": ("output_tok_s",),
    "TTFT p50 ms": ("ttft_s", "p50"),
    "TTFT p99 ms": ("ttft_s", "p99"),
    "TPOT p50 ms": ("tpot_s", "p50"),
    "ITL p99 ms": ("itl_s", "p99"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="stock,factory,auth,flat")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", action="append", default=[], help="CONCURRENCY:DURATION:IN:OUT (repeatable)")
    ap.add_argument("--config", default=None, help="factory YAML (default: the embedded default)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=8392)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    loads = [tuple(spec.split(":")) for spec in (args.load or ["32:40s:256:128", "1:25s:256:128"])]
    setups = args.setups.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}
    rows = []
    for rnd in range(args.rounds):
        for setup in setups:
            work = args.out / f"r{rnd}-{setup}"
            work.mkdir(parents=True, exist_ok=True)
            if setup == "stock":
                cmd, served = _stock_cmd(args.config, args.model, args.port, gpu=False)
                extra, key, ready = {}, None, "/health"
            else:
                cmd, extra, key = _factory(setup, args.config, args.port, work)
                served, ready = args.model, "/ready"
            started = time.monotonic()
            proc = start_server(cmd, work / "server.log", {**env, **extra})
            try:
                wait_ready(base, proc, ready)
                print(f"round {rnd} {setup}: ready in {time.monotonic() - started:.1f} s", flush=True)
                for conc, duration, n_in, n_out in loads:
                    run_dir = work / f"c{conc}-{n_in}x{n_out}"
                    bench = [FACTORY, "bench", "run", "--url", base, "--model", served, "--energy", "none",
                             "--concurrency", conc, "--duration", duration, "--input-len", n_in,
                             "--output-len", n_out, "--quiet", "--label", setup, "--out", str(run_dir)]  # fmt: skip
                    if key:
                        bench += ["--api-key", key]
                    subprocess.run(bench, check=True, capture_output=True)
                    m = _aggregates(run_dir)
                    rows.append(
                        {
                            "round": rnd,
                            "setup": setup,
                            "load": f"c={conc} {n_in}x{n_out}",
                            **{
                                name: _pick(m, *path) * (1 if name == "output tok/s" else 1e3)
                                for name, path in FIGURES.items()
                            },
                            "failed": m.get("failed"),
                        }
                    )
                    print("  " + json.dumps(rows[-1]), flush=True)
            finally:
                stop_server(proc)
    (args.out / "rows.json").write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))
    print(f"\n{cpu_model()}; median of {args.rounds} round(s); ratio = output tok/s / {setups[0]}'s\n")
    print("| load | setup | " + " | ".join(FIGURES) + " | ratio |")
    print("|---|---|" + "---|" * (len(FIGURES) + 1))
    for load in dict.fromkeys(r["load"] for r in rows):
        ref = None
        for setup in setups:
            mine = [r for r in rows if r["load"] == load and r["setup"] == setup]
            if not mine:
                continue
            med = {name: statistics.median(r[name] for r in mine) for name in FIGURES}
            ref = ref or med["output tok/s"]
            cells = " | ".join(f"{med[n]:.1f}" if n == "output tok/s" else f"{med[n]:.0f}" for n in FIGURES)
            print(f"| {load} | {setup} | {cells} | {med['output tok/s'] / ref:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
