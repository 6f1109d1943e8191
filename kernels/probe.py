"""Calibrate one model shape on one GPU: step time, power and energy per token at chosen batch
sizes and context lengths, written as an energy-profile document (schema: factory/policy/profile.py).

    python -m kernels.probe --shape llama-3.1-8b --batches 1,8,32,64,128,256 --contexts 512,2048 \
        [--phases decode,prefill] [--device cuda|cpu] [--out FILE] [--seconds 2] [--repeats 3]

Run from the repository root (it needs `kernels` importable, nothing else of ours). `--device cpu`
is a modeled dry run on the small shapes. Reads the card; never changes its settings.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import sys

import torch

from kernels.measure import SANITY_TOLERANCE, NvmlMeter, measure_point
from kernels.shapes import PHASES, SHAPES, build_model, footprint_bytes, get_shape, step_bytes, step_flops

__all__ = ["SHAPES", "calibrate", "main", "measure_point", "point_order", "step_bytes", "step_flops"]

SCHEMA = "factory.energy-profile/1"
NO_GPU = "no CUDA GPU here: the probe measures a GPU; use --device cpu for a modeled dry run on tiny shapes"


def point_order(shape: str, phases, batches, contexts) -> list[tuple[str, int, int]]:
    """Every (phase, batch, context), in increasing estimated memory (`footprint_bytes`), ties by
    (phase, batch, context): the points that may not fit come last."""
    points = set(itertools.product(phases, batches, contexts))
    return sorted(points, key=lambda p: (footprint_bytes(shape, *p), p))


def _method(device: str, min_window_s: float, repeats: int, cpu_modeled_w: float) -> str:
    if device == "cpu":
        return (
            f"modeled: 3 warm-up steps, perf_counter windows >= {min_window_s:g} s, "
            f"energy = {cpu_modeled_w:g} W x step time, median of {repeats}"
        )
    return (
        f"measured: 3 warm-up steps, CUDA events, NVML energy counter windows >= {min_window_s:g} s "
        f"checked against 50 ms power samples within {SANITY_TOLERANCE:.0%}, median of {repeats}"
    )


def calibrate(
    shape: str,
    batches: list[int],
    contexts: list[int],
    *,
    phases=("decode",),
    device: str = "cuda",
    min_window_s: float = 2.0,
    repeats: int = 3,
    gpu_index: int = 0,
    progress=print,
    cpu_modeled_w: float = 65.0,
) -> dict:
    """Measure every (phase, batch, context) point of `shape` in `point_order`; a point that runs
    out of GPU memory is skipped with its reason (printed and kept in "skipped"). Returns the
    profile document."""
    spec = get_shape(shape)
    if not set(phases) <= set(PHASES) or not phases:
        raise ValueError(f"phases must be among {PHASES}, not {tuple(phases)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, not {device!r}")
    if device == "cpu":  # build_model refuses the large shapes on cpu before allocating
        dev, meter = torch.device("cpu"), None
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(NO_GPU)
        dev = torch.device("cuda", gpu_index)
        torch.cuda.set_device(dev)  # CUDA events record on the current device's stream
        meter = NvmlMeter.open(gpu_index)
    points, skipped = [], []
    try:
        model = build_model(spec, dev)
        for phase, batch, context in point_order(spec.name, phases, batches, contexts):
            reason = None
            try:
                point = measure_point(
                    model,
                    phase,
                    batch,
                    context,
                    meter=meter,
                    min_window_s=min_window_s,
                    repeats=repeats,
                    cpu_modeled_w=cpu_modeled_w,
                )
            except torch.cuda.OutOfMemoryError as e:
                reason = f"out of GPU memory: {str(e).splitlines()[0]}"
            if reason is not None:  # outside the except: its traceback no longer pins the tensors
                gc.collect()
                torch.cuda.empty_cache()
                skipped.append({"phase": phase, "batch": batch, "context": context, "reason": reason})
                progress(f"skip {phase} batch {batch} context {context}: {reason}")
                continue
            points.append(point)
            progress(_row(point))
    finally:
        if meter is not None:
            meter.close()
    return {
        "schema": SCHEMA,
        "card": meter.card if meter else "cpu",
        "driver": meter.driver if meter else None,
        "model": spec.name,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "source": "measured" if meter else "modeled",
        "method": _method(device, min_window_s, repeats, cpu_modeled_w),
        "points": points,
        "skipped": skipped,
    }


HEADER = f"{'phase':<8}{'batch':>6}{'context':>8}{'step ms':>10}{'tok/s':>11}{'W':>8}{'J/tok':>10}  sanity"


def _row(p: dict) -> str:
    sanity = "ok" if p["sanity_ok"] else f"FAIL ({p['energy_vs_power_error']:.1%})"
    return (
        f"{p['phase']:<8}{p['batch']:>6}{p['context']:>8}{p['step_s'] * 1000:>10.2f}{p['tok_s']:>11.1f}"
        f"{p['power_w']:>8.1f}{p['j_per_tok']:>10.4f}  {sanity}"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batches", type=_ints, default=[1, 8, 32, 64, 128, 256], help="comma-separated")
    ap.add_argument("--contexts", type=_ints, default=[512, 2048], help="comma-separated tokens")
    ap.add_argument("--phases", default="decode", help="comma-separated: decode,prefill")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--gpu", type=int, default=0, help="CUDA device index")
    ap.add_argument("--out", help="write the profile JSON here (default: stdout after the table)")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum window length, s")
    ap.add_argument("--repeats", type=int, default=3, help="windows per point (median)")
    ap.add_argument("--cpu-watts", type=float, default=65.0, help="modeled power for --device cpu, W")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    try:
        doc = calibrate(
            args.shape,
            args.batches,
            args.contexts,
            phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
            device=args.device,
            min_window_s=args.seconds,
            repeats=args.repeats,
            gpu_index=args.gpu,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            cpu_modeled_w=args.cpu_watts,
        )
    except ValueError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    print(f"{doc['model']} on {doc['card']} (driver {doc['driver']})\nmethod: {doc['method']}")
    print(HEADER)
    for point in doc["points"]:
        print(_row(point))
    for s in doc["skipped"]:
        print(f"skipped {s['phase']} batch {s['batch']} context {s['context']}: {s['reason']}")
    text = json.dumps(doc, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
