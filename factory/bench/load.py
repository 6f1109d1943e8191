"""How `factory bench` offers load: closed-loop concurrency, open-loop rate, or trace replay.

- concurrency N: N workers, each sends its next request when its previous one finishes.
- rate R: open loop; gaps between arrivals are gamma-distributed with shape = burstiness and
  mean 1/R (burstiness 1 = Poisson; < 1 burstier; > 1 smoother); R = inf sends all at t0.
- trace: each request at t0 + its arrival_s.
Sending stops when the requests run out or `duration_s` has passed since t0; requests already
in flight finish and count. One event loop, one connection pool, no per-request work beyond
client.send, so the client is not the bottleneck (`factory bench selfbench` measures it).
Installing uvloop is the caller's business.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from factory.bench.client import POOL_TRACE, send
from factory.bench.datasets import BenchRequest

MODES = ("concurrency", "rate", "trace")


class LoadError(ValueError):
    """A load spec that cannot be run; the message says why."""


@dataclass
class LoadSpec:
    mode: str  # "concurrency" | "rate" | "trace"
    value: float | None  # concurrency: workers (int); rate: requests/s or math.inf; trace: None
    burstiness: float = 1.0  # rate only: gamma shape of the inter-arrival gaps

    def __post_init__(self):
        if self.mode not in MODES:
            raise LoadError(f"load mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "concurrency" and not (
            self.value is not None and math.isfinite(self.value) and self.value >= 1 and self.value == int(self.value)
        ):
            raise LoadError(f"concurrency must be a whole number >= 1 (got {self.value})")
        if self.mode == "rate" and (self.value is None or not self.value > 0):
            raise LoadError(f"rate must be > 0 requests/s or inf (got {self.value})")
        if not self.burstiness > 0 or math.isinf(self.burstiness):
            raise LoadError(f"burstiness must be a finite number > 0 (got {self.burstiness})")

    def to_dict(self) -> dict:
        """The LEVEL's `load` field (result.json)."""
        if self.mode == "concurrency":
            return {"mode": "concurrency", "value": int(self.value)}
        if self.mode == "rate":
            return {
                "mode": "rate",
                "value": "inf" if math.isinf(self.value) else self.value,
                "burstiness": self.burstiness,
            }
        return {"mode": "trace", "value": None}

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency {int(self.value)}"
        return f"rate {self.value:g}/s" if self.mode == "rate" else "trace"


@dataclass
class LevelRun:
    load: LoadSpec
    t0: float  # perf_counter before the first send; every t_send_s is relative to it
    t0_unix: float  # wall clock at t0
    records: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    sent: int = 0


def parse_levels(concurrency: str | None, rate: str | None, *, burstiness: float = 1.0) -> list[LoadSpec]:
    """Levels from "1,8,64" (concurrency) or "2,8,inf" (rate): exactly one of them."""
    if (concurrency is None) == (rate is None):
        raise LoadError("give exactly one of --concurrency (e.g. 1,8,64) and --rate (e.g. 2,8,inf)")
    mode, text = ("concurrency", concurrency) if concurrency is not None else ("rate", rate)
    levels = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = math.inf if mode == "rate" and part.lower() == "inf" else float(part)
        except ValueError:
            raise LoadError(f"--{mode} {text!r}: {part!r} is not a number") from None
        whole = mode == "concurrency" and math.isfinite(value) and value == int(value)
        levels.append(LoadSpec(mode, int(value) if whole else value, burstiness))
    return levels


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """n send times (s from t0), first at 0; gamma gaps with mean 1/rate. rate inf -> all at 0."""
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


async def run_level(
    requests: list[BenchRequest],
    *,
    url: str,
    model: str,
    api_key: str | None,
    load: LoadSpec,
    seed: int,
    duration_s: float | None,
    on_result: Callable[[dict | None, dict | None], None] | None,
    on_send: Callable[[], None] | None = None,
    extra_body: dict | None = None,
    max_connections: int = 1024,
    timeout_s: float = 600,
) -> LevelRun:
    if load.mode == "trace" and any(r.arrival_s is None for r in requests):
        raise LoadError("trace load needs every request's arrival_s (use --dataset trace:FILE)")
    limit = max(max_connections, int(load.value)) if load.mode == "concurrency" else max_connections
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trace_configs=[POOL_TRACE]
        ) as session,
        # Retries of requests whose pooled connection the server had closed (factory/bench/client.py).
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, ttl_dns_cache=None), timeout=timeout, auto_decompress=False
        ) as fresh,
    ):
        t0, t0_unix = time.perf_counter(), time.time()
        run = LevelRun(load, t0, t0_unix)
        stop_at = math.inf if duration_s is None else t0 + duration_s

        async def one(req: BenchRequest) -> None:
            run.sent += 1
            if on_send is not None:
                on_send()
            record, failure = await send(
                session, url, model, req, api_key=api_key, t0=t0, extra_body=extra_body, fresh=fresh
            )
            if record is not None:
                run.records.append(record)
            else:
                run.failures.append(failure)
            if on_result is not None:
                on_result(record, failure)

        if load.mode == "concurrency":
            # With a duration the dataset repeats if it runs out first (a fast server, a small file).
            queue = iter(requests) if duration_s is None else itertools.cycle(requests)

            async def worker() -> None:
                for req in queue:  # shared iterator: each request goes to exactly one worker
                    if time.perf_counter() >= stop_at:
                        return
                    await one(req)

            await asyncio.gather(*(worker() for _ in range(int(load.value))))
        else:
            if load.mode == "rate":
                times = arrival_times(len(requests), load.value, load.burstiness, seed)
            else:
                times = [r.arrival_s for r in requests]
            await _open_loop(requests, times, t0, stop_at, one)
    return run


async def _open_loop(requests, times: list[float], t0: float, stop_at: float, one) -> None:
    """Start each request at t0 + its time, whatever is in flight; then wait for all of them."""
    tasks = set()
    for req, at_s in zip(requests, times, strict=True):
        when = t0 + at_s
        if when >= stop_at:
            break
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
