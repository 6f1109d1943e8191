"""A minimal streamed load (one fixed prompt, ignore_eos) and server start/stop, shared by the
older bench scripts (metering.py, governor.py, scheduler_vs_stock.py).

Its own side-by-side run against stock vLLM is now `factory bench vs-vllm` (factory/bench/),
which adds datasets, sweeps, energy, reports and comparisons; the figures in the README come
from there.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from factory.bench.vsvllm import stop_server as _stop  # noqa: F401  (used by the sibling scripts)
from factory.bench.vsvllm import wait_ready as _wait_ready  # noqa: F401

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
