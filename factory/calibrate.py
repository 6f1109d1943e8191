"""`factory calibrate`: measure a card's energy profile with the repository's GPU probe.

The probe (`kernels/probe.py`) lives beside `factory/` in a source checkout and is not installed:
the lent GPU machines run it with torch and pynvml alone. This module checks the arguments and
the GPU before importing it, then validates and writes what it returns.

Exit codes: 0 written; 2 the request cannot run here (arguments, no GPU, no probe); 1 the probe
returned a document that does not validate (kept beside the output as `*.invalid.json`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import factory
from factory.policy.profile import PHASES, EnergyProfile, ProfileError, parse_profile, validate

REPO_ROOT = Path(factory.__file__).resolve().parent.parent
NO_GPU = (
    "no CUDA GPU here: calibrate measures a GPU's energy. "
    "Use --device cpu for a modeled dry run on tiny shapes (tiny, smollm2-135m)."
)


class CalibrateError(Exception):
    """Something the user can fix; printed as `factory: <message>`, exit 2."""


def add_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "calibrate",
        help="measure a GPU's step time, power and J/token by batch and context; write an energy profile",
        description="Run kernels/probe.py on this machine's GPU and write a validated energy profile "
        "(configs/profiles/README.md). Run from a source checkout.",
    )
    c.add_argument("--shape", required=True, help="model shape to probe, e.g. llama-3.1-8b (kernels.probe.SHAPES)")
    c.add_argument("--batches", default="1,8,32,64,128,256", help="comma-separated batch sizes")
    c.add_argument("--contexts", default="512,2048", help="comma-separated context lengths, tokens")
    c.add_argument("--phases", default="decode,prefill", help="comma-separated: decode, prefill")
    c.add_argument("--device", default="cuda", help="cuda (measured) or cpu (modeled dry run, tiny shapes)")
    c.add_argument("--seconds", default="2", help="minimum measuring window per point, seconds")
    c.add_argument("--repeats", default="3", help="windows per point")
    c.add_argument("--out", required=True, help="profile file to write (JSON)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        doc, out = _measure(args)
    except CalibrateError as err:
        print(f"factory: {err}", file=sys.stderr)
        return 2
    problems = validate(doc)
    if problems:
        kept = out.with_name(out.stem + ".invalid.json")
        kept.write_text(json.dumps(doc, indent=2, default=repr) + "\n")
        print(ProfileError("the probe's profile", problems), file=sys.stderr)
        print(f"factory: nothing written to {out}; the probe's document is kept in {kept}", file=sys.stderr)
        return 1
    profile = parse_profile(doc)
    try:
        profile.save(out)
    except OSError as err:
        print(f"factory: cannot write {out}: {err}", file=sys.stderr)
        return 1
    print(table(profile))
    print(f"wrote {out}")
    return 0


def _measure(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    batches = _counts(args.batches, "--batches")
    contexts = _counts(args.contexts, "--contexts")
    phases = _phases(args.phases)
    seconds = _number(args.seconds, "--seconds", float)
    repeats = _number(args.repeats, "--repeats", int)
    if args.device not in ("cuda", "cpu"):
        raise CalibrateError(f"--device must be cuda or cpu, got {args.device!r}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CalibrateError(f"--out: directory {out.parent} does not exist")
    if args.device == "cuda" and not cuda_available():
        raise CalibrateError(NO_GPU)
    probe = load_probe()
    if args.shape not in probe.SHAPES:
        raise CalibrateError(f"unknown shape {args.shape!r}; known shapes: {', '.join(sorted(probe.SHAPES))}")
    try:
        doc = probe.calibrate(args.shape, batches, contexts, phases=phases, device=args.device,
                              min_window_s=seconds, repeats=repeats, progress=_progress)  # fmt: skip
    except ValueError as err:  # the probe refusing its arguments (e.g. a shape too big for --device cpu)
        raise CalibrateError(str(err)) from err
    return doc, out


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU. Imports torch only, not the probe."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def load_probe(root: Path = REPO_ROOT) -> Any:
    """Import `kernels.probe` from the source checkout at `root`."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("kernels.probe")
    except ModuleNotFoundError as err:
        if err.name in ("kernels", "kernels.probe"):
            raise CalibrateError(
                f"cannot import kernels.probe from {root}: the probe lives in the repository's kernels/ directory; "
                "run from a source checkout"
            ) from err
        raise CalibrateError(f"the probe needs {err.name}, which is not installed here") from err


def table(profile: EnergyProfile) -> str:
    head = f"{'phase':<8} {'batch':>6} {'context':>8} {'step ms':>10} {'tok/s':>11} {'W':>7} {'J/tok':>9}  source"
    lines = [head]
    for p in sorted(profile.points, key=lambda p: (p.phase, p.context or 0, p.batch)):
        context = "mix" if p.context is None else str(p.context)
        lines.append(f"{p.phase:<8} {p.batch:>6} {context:>8} {p.step_s * 1e3:>10.3f} {p.tok_s:>11.1f} "
                     f"{p.power_w:>7.1f} {p.j_per_tok:>9.4g}  {p.source}")  # fmt: skip
    for s in profile.skipped:
        lines.append(f"skipped: {s.get('phase')} batch {s.get('batch')} context {s.get('context')}: {s.get('reason')}")
    return "\n".join(lines)


def _progress(*parts: Any, **fields: Any) -> None:
    """Whatever the probe reports, one line on stderr (stdout is the table)."""
    words = [str(p) for p in parts] + [f"{k}={v}" for k, v in fields.items()]
    print(" ".join(words), file=sys.stderr, flush=True)


def _counts(text: str, flag: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise CalibrateError(f"{flag}: give at least one value, e.g. {flag} 1,8,64")
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise CalibrateError(f"{flag}: {item!r} is not an integer (comma-separated integers >= 1)") from None
        if value < 1:
            raise CalibrateError(f"{flag}: {value} must be >= 1")
        values.append(value)
    return sorted(set(values))


def _phases(text: str) -> list[str]:
    phases = [item.strip() for item in text.split(",") if item.strip()]
    if not phases:
        raise CalibrateError(f"--phases: give at least one of {', '.join(PHASES)}")
    for phase in phases:
        if phase not in PHASES:
            raise CalibrateError(f"--phases: unknown phase {phase!r}; known: {', '.join(PHASES)}")
    return [p for p in PHASES if p in phases]


def _number(text: str, flag: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise CalibrateError(f"{flag}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not (math.isfinite(value) and value > 0):
        raise CalibrateError(f"{flag}: must be > 0, got {text}")
    return value
