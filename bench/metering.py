"""What metering costs and how exact it is, on the embedded model.

    .venv/bin/python bench/metering.py [--concurrency 16] [--requests 96] [--rounds 2] [--conservation-s 60]

1. Throughput with metering on (telemetry.enabled: true: the engine meter in vLLM's scheduler,
   the 100 ms sampler, attribution, energy in every usage) vs off (vLLM's own scheduler, no
   energy), same streamed load at fixed concurrency, rounds alternating off/on to spread drift.
   Settlement in the ledger happens in both, so the ratio isolates sampling and attribution.
2. The engine meter's own cost per engine step (16 requests in the batch, modeled source),
   measured in-process: what metering adds to each step, the figure that stays meaningful when
   end-to-end throughput varies by more than it from run to run on a small machine.
3. Conservation over a long run: under load, /metrics is scraped every second; for every window
   of >= 5 s, |(attributed + idle) - measured| / measured; the worst and the whole-run figure.
Energy here is MODELED (no power sensor on a CPU machine); on a GPU it is NVML's counter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import _load, _stop, _wait_ready  # noqa: E402  (sibling script)

FACTORY = str(Path(sys.executable).with_name("factory"))
MODEL = "smollm2-135m"


def _start(work: Path, port: int, metered: bool, tag: str, scheduler: str = "stock") -> subprocess.Popen:
    # vLLM's own scheduling by default, so the on/off ratio is metering's cost alone (and
    # telemetry.enabled: false does not allow the energy scheduler).
    return start_factory(work, port, tag, {"telemetry": {"enabled": metered}, "scheduler": {"policy": scheduler}})


def start_factory(work: Path, port: int, tag: str, config: dict) -> subprocess.Popen:
    """`factory serve` on the embedded default plus `config`, with a ledger of its own; returns when ready."""
    cfg = work / f"{tag}.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": port}, "ledger": {"path": str(work / "ledger.db")}, **config}))
    with open(work / f"{tag}.log", "wb") as out:
        proc = subprocess.Popen(
            [FACTORY, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_ready(f"http://127.0.0.1:{port}", proc, "/ready")
    return proc


def _scrape(base: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(factory_(?:energy|attributed_energy|idle_energy)_joules_total)\{[^}]*\} ([0-9.eE+-]+)$", line)
        if m:
            sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(2))
    return sums


def _conservation(base: str, seconds: float, concurrency: int, max_tokens: int) -> dict:
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            asyncio.run(_load(base, MODEL, concurrency, concurrency, max_tokens))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    scrapes = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = _scrape(base)
        booked = s.get("factory_attributed_energy_joules_total", 0.0) + s.get("factory_idle_energy_joules_total", 0.0)
        scrapes.append((time.monotonic(), s.get("factory_energy_joules_total", 0.0), booked))
        time.sleep(1.0)
    stop.set()
    t.join()
    worst, windows = 0.0, 0
    for i, (t0, m0, b0) in enumerate(scrapes):
        for t1, m1, b1 in scrapes[i + 1 :]:
            if t1 - t0 >= 5 and m1 > m0:
                worst = max(worst, abs((b1 - b0) - (m1 - m0)) / (m1 - m0))
                windows += 1
    (_, m0, b0), (_, m1, b1) = scrapes[0], scrapes[-1]
    return {
        "seconds": scrapes[-1][0] - scrapes[0][0],
        "windows_ge_5s": windows,
        "worst_window_rel_error": worst,
        "whole_run_rel_error": abs((b1 - b0) - (m1 - m0)) / (m1 - m0),
        "measured_j": m1 - m0,
    }


def _engine_meter_step_us(batch: int = 16, steps: int = 3000) -> float:
    """Microseconds the engine meter adds to one engine step (schedule + step done)."""
    from types import SimpleNamespace

    import zmq

    from factory.engine.meter import XARG_REQUEST, XARG_TENANT, EngineMeter
    from factory.engine.wire import MeterSettings

    endpoint = f"ipc://{tempfile.gettempdir()}/factory-bench-meter-{os.getpid()}"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(endpoint)
    meter = EngineMeter(
        MeterSettings(endpoint=endpoint, source="modeled", interval_s=0.1, idle_w=40, max_w=120, prefill_weight=0.3)
    )
    reqs = {
        f"r{i}": SimpleNamespace(
            request_id=f"r{i}",
            sampling_params=SimpleNamespace(extra_args={XARG_REQUEST: f"k{i}", XARG_TENANT: "t"}),
            num_prompt_tokens=30,
            num_computed_tokens=0,
        )
        for i in range(batch)
    }
    t0 = time.perf_counter()
    for step in range(steps):
        scheduled = {rid: (30 if r.num_computed_tokens == 0 else 1) for rid, r in reqs.items()}
        for rid, n in scheduled.items():
            reqs[rid].num_computed_tokens += n
        meter.on_schedule(step, scheduled, reqs)
        outputs = [SimpleNamespace(request_id=rid, new_token_ids=[1], finish_reason=None) for rid in scheduled]
        meter.on_step_done(step, [SimpleNamespace(outputs=outputs)])
    per_step_us = (time.perf_counter() - t0) / steps * 1e6
    meter.close()
    pull.close(linger=0)
    return per_step_us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conservation-s", type=float, default=60)
    ap.add_argument("--port", type=int, default=8392)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="metering-"))
    base = f"http://127.0.0.1:{args.port}"
    step_us = _engine_meter_step_us(args.concurrency)
    print(f"engine meter: {step_us:.0f} us per engine step with {args.concurrency} requests (in-process)", flush=True)
    rows, conservation = [], None
    for rnd in range(args.rounds):
        for metered in (False, True):
            tag = f"{'on' if metered else 'off'}-{rnd}"
            proc = _start(work, args.port, metered, tag)
            try:
                asyncio.run(_load(base, MODEL, args.concurrency, args.concurrency, args.max_tokens))  # warm-up
                row = asyncio.run(_load(base, MODEL, args.concurrency, args.requests, args.max_tokens))
                rows.append({"metered": metered, "round": rnd, **row})
                print(f"{tag:6s} c={args.concurrency} {row['output_tok_s']:7.1f} tok/s", flush=True)
                if metered and conservation is None and args.conservation_s > 0:
                    conservation = _conservation(base, args.conservation_s, args.concurrency, args.max_tokens)
                    print("conservation:", json.dumps(conservation), flush=True)
            finally:
                _stop(proc)
    on_runs = [r["output_tok_s"] for r in rows if r["metered"]]
    off_runs = [r["output_tok_s"] for r in rows if not r["metered"]]
    on, off = sum(on_runs) / len(on_runs), sum(off_runs) / len(off_runs)
    print(f"runs on: {', '.join(f'{x:.1f}' for x in on_runs)}; off: {', '.join(f'{x:.1f}' for x in off_runs)} tok/s")
    print(
        f"\nmetering on / off at c={args.concurrency}: {on:.1f} / {off:.1f} tok/s = {on / off:.3f}x"
        " (CPU, modeled energy)"
    )
    if args.out:
        result = {"rows": rows, "ratio": on / off, "engine_meter_step_us": step_us, "conservation": conservation}
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    sys.exit(main())
