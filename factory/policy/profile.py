"""Energy profiles: a card's step time, power and energy per token by phase, batch and context.

The format `factory.energy-profile/1` is a JSON document (configs/profiles/README.md documents
it field by field). `kernels/probe.py` writes measured ones; published and modeled ones are
written by hand or by the simulator. The scheduler and the simulator read them through
`EnergyProfile`, which interpolates between the batches that were measured.

Pure code: stdlib only. Every quantity carries its unit in its name (`step_s`, `tok_s`, `power_w`,
`j_per_tok`), and unknown top-level keys are errors, so a typo cannot pass as a field.
"""

from __future__ import annotations

import bisect
import datetime
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "factory.energy-profile/1"
SOURCES = ("measured", "published", "modeled")
PHASES = ("decode", "prefill")
TOLERANCE = 0.05  # relative: how far j_per_tok may sit from power_w / tok_s (and tok_s from batch / step_s)

_TOP_REQUIRED = ("schema", "card", "model", "date", "source", "method", "points")
_TOP_OPTIONAL = ("driver", "reference", "skipped")
_POINT_REQUIRED = ("phase", "batch", "context", "step_s", "tok_s", "power_w", "j_per_tok", "source")
_POINT_OPTIONAL = ("card", "driver", "date")  # provenance, when it differs or is worth repeating per point
_QUANTITIES = ("step_s", "tok_s", "power_w", "j_per_tok")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ProfileError(ValueError):
    """A profile that does not validate; `problems` lists every one, each with its JSON path."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One (phase, batch, context) measurement. `context` None: a published workload's own mix."""

    phase: str  # "decode" | "prefill"
    batch: int  # sequences in the step (published figures: the server's max_num_seqs)
    context: int | None  # tokens of context per sequence
    step_s: float  # one engine step, seconds
    tok_s: float  # tokens per second (decode: generated; prefill: prompt tokens computed)
    power_w: float  # mean board power over the measuring window, watts
    j_per_tok: float  # joules per token (power_w / tok_s)
    source: str  # "measured" | "published" | "modeled"
    card: str | None = None
    driver: str | None = None
    date: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)  # other keys, kept as written


@dataclass(frozen=True, slots=True)
class EnergyProfile:
    card: str  # as NVML names it, e.g. "NVIDIA H100 80GB HBM3"
    driver: str | None  # NVIDIA driver version; None when unknown (published figures)
    model: str  # model shape, e.g. "llama-3.1-8b"
    date: str  # ISO YYYY-MM-DD: when it was measured (or transcribed)
    source: str  # "measured" | "published" | "modeled"
    method: str  # one line on how it was made
    points: tuple[ProfilePoint, ...]
    reference: str | None = None  # where published figures come from
    skipped: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)  # {phase, batch, context, reason}

    def curve(self, phase: str = "decode", context: int | None = None) -> list[ProfilePoint]:
        """The points of one phase at one context, sorted by batch.

        A context that was not measured falls back to the nearest one in log2 (the probe sweeps
        contexts by doubling), ties to the longer context (the dearer, so estimates err high).
        None asks for the workload's mix: the context-free (published) curve when there is one,
        else the shortest measured context. A number asked of a profile that has only the
        context-free curve gets that curve."""
        if context is not None and context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        pts = [p for p in self.points if p.phase == phase]
        if not pts:
            raise LookupError(f"profile {self.card} / {self.model} has no {phase} points")
        contexts = {p.context for p in pts}
        numbered = sorted(c for c in contexts if c is not None)
        if context in contexts:
            chosen = context
        elif context is None or not numbered:
            chosen = None if None in contexts else numbered[0]
        else:
            chosen = min(numbered, key=lambda c: (abs(math.log2(c / context)), -c))
        return sorted((p for p in pts if p.context == chosen), key=lambda p: p.batch)

    def decode_curve(self, context: int | None = None) -> list[ProfilePoint]:
        return self.curve("decode", context)

    def j_per_tok(self, batch: float, context: int | None = None, phase: str = "decode") -> float:
        """Joules per token at this batch, interpolated (see `_interpolate`)."""
        return _interpolate(self.curve(phase, context), batch, "j_per_tok")

    def step_s(self, batch: float, context: int | None = None, phase: str = "decode") -> float:
        return _interpolate(self.curve(phase, context), batch, "step_s")

    def power_w(self, batch: float, context: int | None = None, phase: str = "decode") -> float:
        return _interpolate(self.curve(phase, context), batch, "power_w")

    def tok_s(self, batch: float, context: int | None = None, phase: str = "decode") -> float:
        return _interpolate(self.curve(phase, context), batch, "tok_s")

    def to_dict(self) -> dict[str, Any]:
        """The document, in canonical order: top-level keys as in the schema, points sorted by
        (phase, context, batch) with their fields first and extra keys after, alphabetically."""
        doc: dict[str, Any] = {"schema": SCHEMA, "card": self.card, "driver": self.driver, "model": self.model,
                               "date": self.date, "source": self.source, "method": self.method}  # fmt: skip
        if self.reference is not None:
            doc["reference"] = self.reference
        doc["points"] = [_point_dict(p) for p in sorted(self.points, key=_point_order)]
        if self.skipped:
            doc["skipped"] = [dict(s) for s in self.skipped]
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Validate, then write (canonical order, indent 2). Raises ProfileError, writing nothing."""
        problems = validate(self.to_dict())
        if problems:
            raise ProfileError(str(path), problems)
        Path(path).write_text(self.to_json())


def _interpolate(curve: list[ProfilePoint], batch: float, name: str) -> float:
    """Piecewise-linear in log2(batch) between measured batches, clamped at both ends.

    Why log batch: probes sample batches on a doubling grid and the curves are roughly linear in
    log2(batch), far more than in batch. While decode is memory-bound a step takes about as long
    at batch 16 as at 8, so J/token falls close to 1/batch; linear in batch would put nearly all
    of a wide interval's fall (8 -> 64) at its top end and overstate J/token inside it. Clamped:
    a curve says nothing beyond the batches it measured, and extrapolating a falling J/token
    reaches zero."""
    if not batch > 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    batches = [p.batch for p in curve]
    if batch <= batches[0]:
        return getattr(curve[0], name)
    if batch >= batches[-1]:
        return getattr(curve[-1], name)
    i = bisect.bisect_right(batches, batch)  # batches[i-1] <= batch < batches[i]
    lo, hi = curve[i - 1], curve[i]
    t = math.log2(batch / lo.batch) / math.log2(hi.batch / lo.batch)
    return getattr(lo, name) + t * (getattr(hi, name) - getattr(lo, name))


def _point_order(p: ProfilePoint) -> tuple[str, int, int]:
    return (p.phase, -1 if p.context is None else p.context, p.batch)


def _point_dict(p: ProfilePoint) -> dict[str, Any]:
    d: dict[str, Any] = {k: getattr(p, k) for k in _POINT_REQUIRED}
    d.update({k: getattr(p, k) for k in _POINT_OPTIONAL if getattr(p, k) is not None})
    d.update(sorted(p.extra.items()))
    return d


# -- validation -----------------------------------------------------------------------------


def validate(doc: Any) -> list[str]:
    """Every problem with the document, each as "<json path>: <what is wrong>"; [] when valid."""
    if not isinstance(doc, dict):
        return ["document: must be a JSON object"]
    problems: list[str] = []
    for key in sorted(set(doc) - set(_TOP_REQUIRED) - set(_TOP_OPTIONAL)):
        problems.append(f"{key}: unknown key (allowed: {', '.join(_TOP_REQUIRED + _TOP_OPTIONAL)})")
    for key in _TOP_REQUIRED:
        if key not in doc:
            problems.append(f"{key}: missing")
    if "schema" in doc and doc["schema"] != SCHEMA:
        problems.append(f"schema: must be {SCHEMA!r}, got {doc['schema']!r}")
    for key in ("card", "model", "method"):
        if key in doc:
            _check_text(doc[key], key, problems)
    for key in ("driver", "reference"):
        if doc.get(key) is not None:
            _check_text(doc[key], key, problems)
    if "date" in doc:
        _check_date(doc["date"], "date", problems)
    if "source" in doc:
        _check_choice(doc["source"], SOURCES, "source", problems)

    points = doc.get("points")
    if "points" in doc and (not isinstance(points, list) or not points):
        problems.append("points: must be a non-empty list")
    elif isinstance(points, list):
        seen: dict[tuple[Any, Any, Any], int] = {}
        for i, point in enumerate(points):
            key = _check_point(point, f"points[{i}]", problems)
            if key is None:
                continue
            if key in seen:
                problems.append(f"points[{i}]: duplicates points[{seen[key]}] (phase, batch, context) = {key}")
            else:
                seen[key] = i

    skipped = doc.get("skipped", [])
    if not isinstance(skipped, list):
        problems.append("skipped: must be a list")
    else:
        for i, s in enumerate(skipped):
            _check_skipped(s, f"skipped[{i}]", problems)
    return problems


def _check_point(point: Any, path: str, problems: list[str]) -> tuple[Any, Any, Any] | None:
    """Check one point; return its (phase, batch, context) key when those three are valid."""
    if not isinstance(point, dict):
        problems.append(f"{path}: must be an object")
        return None
    for key in _POINT_REQUIRED:
        if key not in point:
            problems.append(f"{path}.{key}: missing")
    source = point.get("source")
    if "source" in point and not _check_choice(source, SOURCES, f"{path}.source", problems):
        source = None
    phase_ok = "phase" in point and _check_choice(point["phase"], PHASES, f"{path}.phase", problems)
    batch_ok = "batch" in point and _check_count(point["batch"], f"{path}.batch", problems)
    context_ok = "context" in point
    if context_ok and point["context"] is None:
        if source is not None and source != "published":
            problems.append(f"{path}.context: null is allowed only for source 'published' (got {source!r})")
            context_ok = False
    elif context_ok:
        context_ok = _check_count(point["context"], f"{path}.context", problems)
    values = {}
    for key in _QUANTITIES:
        if key in point and _check_positive(point[key], f"{path}.{key}", problems):
            values[key] = float(point[key])
    if "card" in point:
        _check_text(point["card"], f"{path}.card", problems)
    if point.get("driver") is not None:
        _check_text(point["driver"], f"{path}.driver", problems)
    if "date" in point:
        _check_date(point["date"], f"{path}.date", problems)

    expected = {}  # field -> (formula, value it should have)
    if {"power_w", "tok_s"} <= values.keys():
        expected["j_per_tok"] = ("power_w / tok_s", values["power_w"] / values["tok_s"])
    # Published decode figures may break this one: a server does not always run full batches.
    if phase_ok and point["phase"] == "decode" and source in ("measured", "modeled") and batch_ok:
        if "step_s" in values:
            expected["tok_s"] = ("batch / step_s", point["batch"] / values["step_s"])
    for key, (formula, expect) in expected.items():
        if key in values and abs(values[key] - expect) > TOLERANCE * expect:
            problems.append(f"{path}.{key}: {values[key]:g} is not {formula} = {expect:g} (within {TOLERANCE:.0%})")
    if phase_ok and batch_ok and context_ok:
        return (point["phase"], point["batch"], point["context"])
    return None


def _check_skipped(s: Any, path: str, problems: list[str]) -> None:
    if not isinstance(s, dict):
        problems.append(f"{path}: must be an object")
        return
    for key in ("phase", "batch", "context", "reason"):
        if key not in s:
            problems.append(f"{path}.{key}: missing")
    if "phase" in s:
        _check_choice(s["phase"], PHASES, f"{path}.phase", problems)
    if "batch" in s:
        _check_count(s["batch"], f"{path}.batch", problems)
    if s.get("context") is not None:
        _check_count(s["context"], f"{path}.context", problems)
    if "reason" in s:
        _check_text(s["reason"], f"{path}.reason", problems)


def _check_text(value: Any, path: str, problems: list[str]) -> bool:
    if isinstance(value, str) and value.strip():
        return True
    problems.append(f"{path}: must be a non-empty string, got {value!r}")
    return False


def _check_choice(value: Any, choices: tuple[str, ...], path: str, problems: list[str]) -> bool:
    if value in choices and isinstance(value, str):
        return True
    problems.append(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
    return False


def _check_count(value: Any, path: str, problems: list[str]) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return True
    problems.append(f"{path}: must be an integer >= 1, got {value!r}")
    return False


def _check_positive(value: Any, path: str, problems: list[str]) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return True
    problems.append(f"{path}: must be > 0 (a finite number), got {value!r}")
    return False


def _check_date(value: Any, path: str, problems: list[str]) -> bool:
    if isinstance(value, str) and _DATE.fullmatch(value):
        try:
            datetime.date.fromisoformat(value)
            return True
        except ValueError:
            pass
    problems.append(f"{path}: must be an ISO date YYYY-MM-DD, got {value!r}")
    return False


# -- reading --------------------------------------------------------------------------------


def parse_profile(doc: Any, where: str = "profile") -> EnergyProfile:
    """Validate a document and build the profile (points in canonical order, as `save` writes them);
    raises ProfileError listing every problem."""
    problems = validate(doc)
    if problems:
        raise ProfileError(where, problems)
    known = _POINT_REQUIRED + _POINT_OPTIONAL
    points = (
        ProfilePoint(
            **({k: p.get(k) for k in known} | {k: float(p[k]) for k in _QUANTITIES}),
            extra={k: v for k, v in p.items() if k not in known},
        )
        for p in doc["points"]
    )
    top = ("card", "driver", "model", "date", "source", "method", "reference")
    return EnergyProfile(
        **{k: doc.get(k) for k in top},
        points=tuple(sorted(points, key=_point_order)),
        skipped=tuple(dict(s) for s in doc.get("skipped", [])),
    )


def load_profile(path: str | Path) -> EnergyProfile:
    """Read and validate a profile file; raises ProfileError (unreadable JSON included)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ProfileError(str(path), [f"document: cannot read JSON: {err}"]) from err
    return parse_profile(doc, str(path))
