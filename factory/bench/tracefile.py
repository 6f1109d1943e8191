"""The trace file format shared by `factory bench run --dataset trace:FILE` (replayed against a
server) and `factory sim --trace FILE` (replayed through the simulator).

JSON Lines, one request per line, in arrival order:

    {"t_s": 0.125, "input_tok": 512, "output_tok": 128}
    {"t_s": 0.310, "input_tok": 2048, "output_tok": 64, "prefix": "doc-7", "class": "low"}

- `t_s`: arrival time, seconds from the trace's start (non-decreasing).
- `input_tok`, `output_tok`: prompt and answer lengths in tokens (≥ 1).
- `prefix` (optional): requests with the same value share a long common prompt prefix.
- `class` (optional): the tenant's priority class, "high" | "standard" | "low" (default standard).
Blank lines and lines starting with `#` are skipped; anything else malformed is an error that
names the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CLASSES = ("high", "standard", "low")


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceEntry:
    t_s: float
    input_tok: int
    output_tok: int
    prefix: str | None = None
    cls: str = "standard"


def read_trace(path: str | Path) -> list[TraceEntry]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise TraceError(f"trace {p}: {err.strerror or err}") from err
    return list(parse_trace(text.splitlines(), where=str(p)))


def parse_trace(lines: Iterable[str], where: str = "trace") -> Iterator[TraceEntry]:
    last_t = 0.0
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}:{n}: not JSON ({err.msg})") from err
        if not isinstance(doc, dict):
            raise TraceError(f"{where}:{n}: expected an object with t_s, input_tok, output_tok")
        try:
            entry = TraceEntry(
                t_s=float(doc["t_s"]),
                input_tok=int(doc["input_tok"]),
                output_tok=int(doc["output_tok"]),
                prefix=None if doc.get("prefix") is None else str(doc["prefix"]),
                cls=str(doc.get("class", "standard")),
            )
        except KeyError as err:
            raise TraceError(f"{where}:{n}: missing {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise TraceError(f"{where}:{n}: {err}") from err
        if entry.t_s < last_t or entry.t_s < 0:
            raise TraceError(f"{where}:{n}: t_s {entry.t_s} goes back in time (previous {last_t})")
        if entry.input_tok < 1 or entry.output_tok < 1:
            raise TraceError(f"{where}:{n}: input_tok and output_tok must be >= 1")
        if entry.cls not in CLASSES:
            raise TraceError(f"{where}:{n}: class {entry.cls!r} is not one of {', '.join(CLASSES)}")
        last_t = entry.t_s
        yield entry


def write_trace(path: str | Path, entries: Iterable[TraceEntry]) -> None:
    with open(path, "w") as out:
        for e in entries:
            doc = {"t_s": round(e.t_s, 6), "input_tok": e.input_tok, "output_tok": e.output_tok}
            if e.prefix is not None:
                doc["prefix"] = e.prefix
            if e.cls != "standard":
                doc["class"] = e.cls
            out.write(json.dumps(doc) + "\n")
