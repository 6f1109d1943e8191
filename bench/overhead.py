"""The serving stack's overhead: the same model and engine settings behind stock vLLM's OpenAI
server and behind the factory, the same streamed load against each, one after the other.

    .venv/bin/python bench/overhead.py [--concurrency 1,32] [--requests 64] [--max-tokens 64]

A stop-gap until `factory bench vs-vllm` (the benchmark issue): no datasets, no energy, one
fixed prompt. Metrics follow shared/reference/METRICS.md: TTFT = first non-empty content chunk,
output tokens from the server's `usage` (stream_options.include_usage), throughput = Σ tokens /
(last response − first send). Prints a table; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from factory.app import llm_config_for
from factory.config import FactoryConfig
from factory.models import resolve

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


async def _one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t_send = time.perf_counter()
    ttft, last, n_out = None, None, None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                ttft = ttft if ttft is not None else now - t_send
                last = now
            if chunk.get("usage"):
                n_out = chunk["usage"]["completion_tokens"]
    return {"t_send": t_send, "ttft_s": ttft, "t_last": last, "n_out": n_out}


async def _load(base: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    url = base + "/v1/chat/completions"
    queue = list(range(n))
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while queue:
                queue.pop()
                records.append(await _one(client, url, model, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = max(r["t_last"] for r in records) - min(r["t_send"] for r in records)
    ttfts = sorted(r["ttft_s"] for r in records)
    return {
        "concurrency": concurrency,
        "requests": n,
        "output_tok_s": sum(r["n_out"] for r in records) / duration,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000,
    }


def _wait_ready(base: str, proc: subprocess.Popen, path: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(base)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _run(name: str, cmd: list[str], env: dict, base: str, ready: str, args, model: str, log: Path) -> list[dict]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(base, proc, ready)
        asyncio.run(_load(base, model, 2, 4, args.max_tokens))  # warm-up, not measured
        rows = []
        for c in args.concurrency:
            row = asyncio.run(_load(base, model, c, max(args.requests, c), args.max_tokens))
            tok_s, ttft_ms = row["output_tok_s"], row["ttft_p50_ms"]
            print(f"{name:8s} c={c:<3d} {tok_s:7.1f} tok/s  TTFT p50 {ttft_ms:7.1f} ms", flush=True)
            rows.append({"server": name, **row})
        return rows
    finally:
        _stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    cfg = FactoryConfig()  # the embedded default, both servers get the same engine settings
    model = cfg.models[0]
    resolved = resolve(model.source)
    engine = llm_config_for(model, resolved, gpu=False, drain_timeout_s=0, metered=False).engine_kwargs
    base = f"http://127.0.0.1:{args.port}"
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}

    stock_cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolved.path_or_id,
        "--served-model-name",
        model.served_name,
        "--port",
        str(args.port),
        "--disable-uvicorn-access-log",
    ]
    for k, v in engine.items():
        stock_cmd += [f"--{k.replace('_', '-')}", str(v)]
    rows = _run("stock", stock_cmd, env, base, "/health", args, model.served_name, work / "stock.log")

    factory_cfg = work / "factory.yaml"
    factory_cfg.write_text(yaml.safe_dump({"server": {"port": args.port}}))
    factory_cmd = [str(Path(sys.executable).with_name("factory")), "serve", str(factory_cfg)]
    rows += _run("factory", factory_cmd, env, base, "/ready", args, model.served_name, work / "factory.log")

    by = {(r["server"], r["concurrency"]): r for r in rows}
    print("\nfactory / stock (same engine settings, CPU, this machine):")
    for c in args.concurrency:
        s, f = by[("stock", c)], by[("factory", c)]
        print(
            f"  c={c:<3d} output tok/s {f['output_tok_s'] / s['output_tok_s']:.2f}x   "
            f"TTFT p50 {s['ttft_p50_ms']:.0f} -> {f['ttft_p50_ms']:.0f} ms"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"engine": engine, "rows": rows, "logs": str(work)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
