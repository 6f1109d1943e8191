"""Budgets held at every level: site, node and GPU budgets of 50, 65, 80 and 95 % of the
unconstrained draw, each set from the unconstrained state under a steady load.

    .venv/bin/python bench/budget_hold.py [--levels 0.5,0.65,0.8,0.95] [--scopes site,node,gpu] \
        [--concurrency 8] [--json out.json]

Starts `factory serve` on the embedded default (auth disabled, energy-aware scheduler, modeled
power on a CPU machine: idle 40 W, busy 120 W), drives a steady closed loop of streamed chats,
measures the unconstrained draw, then per scope and level: sets the budget, reads the engine
meter's energy counter (with the time of each reading, /admin/power) for 3 + 10 s, lifts the
budget and lets the draw come back. Figures (factory/bench/powerhold.py): the 10 s mean from 3 s
after the change against ±5 %, the worst one-second sample against ±10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metering import MODEL, start_factory  # noqa: E402  (sibling script)
from overhead import _stop  # noqa: E402

from factory.bench.powerhold import average_w, hold  # noqa: E402
from factory.bench.schema import cpu_model  # noqa: E402

SCOPE_KEY = {"site": "site_w", "node": "node_w", "gpu": "gpu_w"}


def steady_load(base: str, concurrency: int, max_tokens: int, stop) -> multiprocessing.Process:
    """`concurrency` clients, each sending its next chat as soon as the last one ended, in a process
    of their own: in this one they would hold the GIL against the operator's budget calls and the
    power polls (on the 2-core machine HAProxy's own /-/healthz then took 0.5 s, up to 11 s, to
    come back to a client sharing a process with the load)."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_load_forever, args=(base, concurrency, max_tokens, stop), daemon=True
    )
    proc.start()
    return proc


def _load_forever(base: str, concurrency: int, max_tokens: int, stop) -> None:
    async def client(http: httpx.AsyncClient) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about power grids."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        while not stop.is_set():
            try:
                await http.post(base + "/v1/chat/completions", json=body)
            except httpx.HTTPError:
                await asyncio.sleep(0.5)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 2)) as http:
            await asyncio.gather(*(client(http) for _ in range(concurrency)))

    asyncio.run(run())


def readings(base: str, seconds: float) -> tuple[list[tuple[float, float]], list[tuple[float, dict]]]:
    """(reading time, cumulative J) of the one replica at the engine sampler's pace (each power
    report carries its last few seconds of readings, merged here in time order), and the
    governor's row for it at each poll."""
    seen: dict[float, float] = {}
    rows: list[tuple[float, dict]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        (row,) = httpx.get(base + "/admin/power", timeout=10).json()["replicas"]
        rows.append((time.time(), row))
        seen.update({t: j for t, j in row["readings"]})
        time.sleep(0.25)
    return sorted(seen.items()), rows


def applied_after_s(rows: list[tuple[float, dict]], changed_s: float) -> float | None:
    """Seconds from the budget change to the first poll that saw the engine's acknowledgement of a
    cap (None: never seen)."""
    for t, row in rows:
        if row["cap_w"] is not None and row["applied_version"] == row["control_version"]:
            return t - changed_s
    return None


def sweep(base: str, scopes: list[str], levels: list[float], unconstrained_w: float, lift_s: float) -> list[dict]:
    rows = []
    for scope in scopes:
        for level in levels:
            budget_w = round(level * unconstrained_w, 1)
            changed_s = time.time()
            httpx.put(base + "/admin/power/budget", json={SCOPE_KEY[scope]: budget_w}, timeout=10).raise_for_status()
            put_s = time.time() - changed_s
            series, polls = readings(base, 13.5)
            got = hold(series, budget_w, changed_s)
            (row,) = httpx.get(base + "/admin/power", timeout=10).json()["replicas"]
            httpx.put(base + "/admin/power/budget", json={}, timeout=10).raise_for_status()
            result = {
                "scope": scope,
                "level": level,
                "reason": row["reason"],
                "throttle_level": row["level"],
                "put_s": put_s,
                "cap_seen_s": applied_after_s(polls, changed_s),
                "control_latency_s": row["control_latency_s"],
            }
            result.update(got.to_dict() if got else {"budget_w": budget_w, "held": None})
            rows.append(result)
            if got is None:
                print(
                    f"{scope:>4} {level:>5.0%}  budget {budget_w:6.1f} W  no figure: the readings have gaps", flush=True
                )
            else:
                print(
                    f"{scope:>4} {level:>5.0%}  budget {budget_w:6.1f} W  mean {got.mean_w:6.1f} W "
                    f"({got.mean_error:+6.1%})  worst 1 s {got.worst_sample_w:6.1f} W ({got.worst_sample_error:+6.1%})"
                    f"  level {row['level']}  cap seen +{result['cap_seen_s'] or float('nan'):.1f} s"
                    f"  {'held' if got.held else 'NOT HELD'}",
                    flush=True,
                )
            time.sleep(lift_s)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0.5,0.65,0.8,0.95", help="shares of the unconstrained draw")
    ap.add_argument("--scopes", default="site,node,gpu")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lift-s", type=float, default=6.0, help="unconstrained time between levels")
    ap.add_argument("--port", type=int, default=8312)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    levels = [float(x) for x in args.levels.split(",")]
    scopes = args.scopes.split(",")
    base = f"http://127.0.0.1:{args.port}"
    work = Path(tempfile.mkdtemp(prefix="factory-budget-hold-"))
    proc = start_factory(work, args.port, "hold", {"auth": "disabled"})
    stop = multiprocessing.get_context("spawn").Event()
    try:
        load = steady_load(base, args.concurrency, args.max_tokens, stop)
        time.sleep(6)  # the load reaches its steady state
        before, _ = readings(base, 10)
        unconstrained_w = average_w(before, before[0][0], before[-1][0])
        print(
            f"{cpu_model()}, {MODEL}, concurrency {args.concurrency}: unconstrained {unconstrained_w:.1f} W (MODELED)"
        )
        rows = sweep(base, scopes, levels, unconstrained_w, args.lift_s)
    finally:
        stop.set()
        _stop(proc)
    load.join(timeout=60)
    held = sum(1 for r in rows if r["held"])
    print(f"{held} of {len(rows)} budgets held (mean within ±5 %, every 1 s sample within ±10 %)")
    if args.json:
        doc = {
            "machine": f"{cpu_model()}; energy MODELED (idle 40 W + 80 W x engine busy share)",
            "command": " ".join([sys.executable, *sys.argv]),
            "unconstrained_w": unconstrained_w,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
