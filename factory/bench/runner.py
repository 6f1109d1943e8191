"""`factory bench run`: one dataset, one or more load levels, against one OpenAI endpoint.

Per level: warm-up requests (not recorded), then the level's load; the energy meter samples
through the whole benchmark and each level keeps the samples of its own window. The result is
result.json (factory/bench/schema.py) and report.html (factory/bench/report.py) in `out_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from factory.bench import metrics, schema
from factory.bench.client import error_message
from factory.bench.datasets import build_requests, parse_dataset
from factory.bench.energy import make_meter
from factory.bench.load import LoadSpec, run_level
from factory.bench.progress import LiveProgress
from factory.bench.report import write_report
from factory.bench.retokenise import TokenizerError, load_tokenizer, retokenise
from factory.bench.schema import level_label

try:  # uvloop's event loop costs the client less CPU per streamed chunk than asyncio's
    from uvloop import run as _arun
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]; asyncio works too
    _arun = asyncio.run


class BenchError(Exception):
    """A benchmark that cannot run (server unreachable, model unknown, key refused): one clear line."""


@dataclass
class BenchConfig:
    url: str
    model: str
    dataset: str
    levels: list[LoadSpec]
    out_dir: Path
    api_key: str | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    slo: dict[str, float | None] = field(default_factory=lambda: {"ttft_s": None, "tpot_s": None, "e2e_s": None})
    energy: str = "auto"
    prices: dict[str, Any] = field(default_factory=dict)
    input_len: str = "512"
    output_len: str = "128"
    seed: int = 0
    warmup: int = 2
    label: str = "run"
    progress: bool = True
    meter: Any = None  # an energy meter built by the caller (vs-vllm's process model); None = make_meter(energy)
    tokenizer: str | None = None  # counts N_out when a server sends no usage (factory/bench/retokenise.py)


def _requests_for(cfg: BenchConfig, spec: LoadSpec) -> int | None:
    """How many requests a level needs: --num-requests, or enough to keep the load up for --duration."""
    if cfg.num_requests is not None or cfg.dataset.startswith("trace:"):
        return cfg.num_requests
    duration = cfg.duration_s or 60.0
    if spec.mode == "rate" and not math.isinf(spec.value):
        return int(spec.value * duration * 1.5) + 16
    # Concurrency (or rate inf): distinct prompts for ~20 requests per worker-second (more than
    # any server here sustains); with a duration the load repeats the list if a server is faster.
    return min(20_000, int((spec.value if spec.mode == "concurrency" else 64) * duration * 20))


async def check_server(url: str, model: str, api_key: str | None) -> None:
    """Fail before any load with one clear line: unreachable, model not served, or key refused.
    The key is proven by one real one-token request: /v1/models answers without a key."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    probe = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=headers) as session:
            async with session.get(url + "/v1/models") as r:
                if r.status in (401, 403):
                    raise BenchError(f"{url} refused the API key (HTTP {r.status}): pass a valid one with --api-key")
                if r.status != 200:
                    raise BenchError(f"{url}/v1/models answered HTTP {r.status}")
                served = [m.get("id") for m in (await r.json()).get("data", [])]
            if model not in served:
                listed = ", ".join(map(str, served)) or "nothing"
                raise BenchError(f"model {model!r} is not served at {url}; it serves: {listed}")
            async with session.post(url + "/v1/chat/completions", json=probe) as r:
                if r.status in (401, 403):
                    raise BenchError(f"{url} refused the API key (HTTP {r.status}): pass a valid one with --api-key")
                if r.status != 200:
                    why = error_message(await r.text())
                    raise BenchError(f"a one-token probe request failed: HTTP {r.status}: {why}")
    except aiohttp.ClientError as err:
        raise BenchError(f"cannot reach {url}: {err}") from err
    except asyncio.TimeoutError as err:
        raise BenchError(f"{url} did not answer within 120 s") from err


def run_bench(cfg: BenchConfig) -> dict:
    """Runs every level and writes result.json and report.html; returns the result."""
    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    except TokenizerError as err:
        raise BenchError(str(err)) from err
    asyncio.run(check_server(cfg.url, cfg.model, cfg.api_key))
    meter = cfg.meter or make_meter(cfg.energy, cfg.url, cfg.api_key)
    prices = {"pue": 1.0, **cfg.prices}
    prices.setdefault("gpus", max(1, meter.gpus))
    config = {
        "url": cfg.url,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "num_requests": cfg.num_requests,
        "duration_s": cfg.duration_s,
        "load": {
            "mode": cfg.levels[0].mode,
            "levels": [s.to_dict()["value"] for s in cfg.levels],
            "burstiness": cfg.levels[0].burstiness,
        },
        "slo": cfg.slo,
        "energy": cfg.energy,
        "prices": prices,
        "seed": cfg.seed,
        "warmup": cfg.warmup,
        "tokenizer": cfg.tokenizer,
    }
    result = schema.new_result("run", cfg.label, config, schema.environment())
    result["definitions"] = metrics.DEFINITIONS
    meter.start(time.perf_counter())
    try:
        with LiveProgress(enabled=cfg.progress and sys.stderr.isatty()) as progress:
            for index, spec in enumerate(cfg.levels):
                result["levels"].append(_run_one(cfg, spec, index, meter, prices, progress, tokenizer))
    finally:
        meter.stop()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    schema.save(result, cfg.out_dir)
    write_report(result, cfg.out_dir / "report.html")
    return result


@contextlib.contextmanager
def client_first() -> Iterator[str]:
    """Run the load generator's event loop ahead of every server process while a level runs; yields
    how it ran ("fifo", or "normal: why not").

    A client sharing the server's cores is a guest the kernel may keep waiting: on the 2-core
    machine, with the factory's engine busy on both cores and Ray's threads waking around it, the
    client's own process sat runnable for 0.4-3.4 s at a time (perf sched: woken, not run) while
    the server had written every chunk on time, and read as a stalled stream. Stock vLLM's fewer
    processes kept it under 10 ms. A client on another machine, as in production, sees none of
    that, so the client takes a real-time slot (SCHED_FIFO, the lowest priority), for stock and
    factory alike; it uses ~20 us of CPU per chunk, and the kernel's real-time throttle keeps 5 %
    of every second for everyone else. SCHED_RESET_ON_FORK: threads and servers it starts get the
    normal policy. Without the right to (CAP_SYS_NICE), the level runs at normal priority and the
    result says so."""
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except (AttributeError, OSError) as err:  # not Linux, or not permitted
        yield f"normal: {err.strerror if isinstance(err, OSError) else 'no SCHED_FIFO here'}"
        return
    try:
        yield "fifo"
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def level_seed(seed: int, index: int) -> int:
    """Each level of a sweep gets prompts of its own: the previous level's prompts again would find
    their KV blocks in a server's prefix cache and read a TTFT no new client would see."""
    return seed + 1009 * index


def _run_one(cfg: BenchConfig, spec: LoadSpec, index: int, meter, prices: dict, progress, tokenizer) -> dict:
    load = spec.to_dict()
    requests = build_requests(
        parse_dataset(cfg.dataset),
        _requests_for(cfg, spec),
        level_seed(cfg.seed, index),
        input_len=cfg.input_len,
        output_len=cfg.output_len,
    )
    if cfg.warmup:  # compiles, caches and connections, before anything is measured
        warm = build_requests(parse_dataset("random"), cfg.warmup, cfg.seed + 1, input_len="32", output_len="8")
        _arun(_level(cfg, warm, LoadSpec("concurrency", float(min(cfg.warmup, 4)))))
    progress.start_level(level_label(load), len(requests), meter.source)

    def on_result(record, failure) -> None:
        progress.on_result(record, failure)
        progress.set_power(meter.latest_power_w())  # the display shows the meter's latest reading

    with client_first() as scheduling:
        run = _arun(_level(cfg, requests, spec, on_result, progress.on_send))
    progress.end_level()
    meter.settle()
    retokenise(run.records, tokenizer)
    level: dict[str, Any] = {
        "load": load,
        "t0_unix": run.t0_unix,
        "requests": run.records,
        "failures": run.failures,
        "energy_source": meter.source,
        "gpus": prices["gpus"],
        "client_scheduling": scheduling,
    }
    window = metrics.run_window(run.records, run.failures)
    steady = metrics.steady_window(run.records, run.failures, load)
    level["steady"] = {"start_s": steady[0], "end_s": steady[1]} if steady else None
    if window is not None and meter.source != "none":
        level["energy_samples"], level["power_samples"] = meter.window(*window, t0=run.t0)
    else:
        level["energy_samples"], level["power_samples"] = [], []
    level["aggregates"] = metrics.aggregate(level, cfg.slo, prices)
    print(summary_line(level), file=sys.stderr, flush=True)
    return level


async def _level(cfg: BenchConfig, requests, spec: LoadSpec, on_result=None, on_send=None):
    return await run_level(
        requests,
        url=cfg.url,
        model=cfg.model,
        api_key=cfg.api_key,
        load=spec,
        seed=cfg.seed,
        duration_s=cfg.duration_s,
        on_result=on_result,
        on_send=on_send,
    )


def _ms(dist: dict, key: str) -> str:
    return f"{dist[key] * 1000:.0f}" if dist.get("n") else "-"


def summary_line(level: dict) -> str:
    agg = level["aggregates"]
    energy = agg["energy"]["whole"]
    j = f"{energy['j_per_tok']:.4g} J/tok ({agg['energy']['source']})" if energy else "energy: none"
    return (
        f"{level_label(level['load']):>10}  {agg['completed']} ok {agg['failed']} failed  "
        f"{agg['output_tok_s']:.1f} out tok/s  "
        f"TTFT p50/p99 {_ms(agg['ttft_s'], 'p50')}/{_ms(agg['ttft_s'], 'p99')} ms  "
        f"TPOT p50/p99 {_ms(agg['tpot_s'], 'p50')}/{_ms(agg['tpot_s'], 'p99')} ms  {j}"
    )
