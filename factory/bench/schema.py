"""result.json: the schema id, a new empty result, the environment it ran in, save, load, validate.

A result is a plain JSON-friendly dict (docs/result-schema.md documents it field by field) so that report,
compare and sim read it without importing the code that wrote it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from pathlib import Path

from factory.bench import metrics

SCHEMA = "factory.bench-result/1"
KINDS = ("run", "sim")
LOAD_MODES = ("concurrency", "rate", "trace")
RESULT_FILE = "result.json"


class ResultError(ValueError):
    """A result.json that cannot be used; the message names the file and what is wrong."""


def level_label(load: dict | None) -> str:
    """A LEVEL's load as one short name: "c=8", "rate=2/s", "rate=inf", "trace".

    The one spelling used by the runner's progress, report and compare, so a level reads the same
    everywhere. A rate of inf may be stored as "inf" (JSON has no inf) or as float inf."""
    load = load or {}
    mode, value = load.get("mode"), load.get("value")
    try:
        num = float(value)
    except (TypeError, ValueError):
        num = None
    if mode == "concurrency" and num is not None:
        return f"c={num:g}"
    if mode == "rate" and num is not None:
        return "rate=inf" if math.isinf(num) else f"rate={num:g}/s"
    # trace, or a malformed load: the mode alone says as much as can be said.
    return str(mode or "level")


def new_result(kind: str, label: str, config: dict, environment: dict, simulated: bool = False) -> dict:
    """An empty result (no levels yet) stamped with the schema, the time (unix s) and the definitions."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return {
        "schema": SCHEMA,
        "kind": kind,
        "simulated": simulated,
        "label": label,
        "created_unix": time.time(),
        "config": config,
        "environment": environment,
        "definitions": list(metrics.DEFINITIONS),
        "levels": [],
    }


def _factory_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("token-factory")
    except PackageNotFoundError:
        return "unknown"


def _gpu_names() -> list[str]:
    # The environment only describes the machine: a missing or broken NVML must not stop a bench,
    # so every pynvml failure (no module, no driver, a lost GPU) reads as "no GPUs seen".
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def environment() -> dict:
    """Where the bench ran: host, CPU model and count, Python, platform, factory version, GPU names."""
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "factory_version": _factory_version(),
        "gpus": _gpu_names(),
    }


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (numerics and speed differ between CPU families)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save(result: dict, dir: str | Path) -> Path:
    """Write dir/result.json (creating dir); written to a temporary file first so a crash never
    leaves half a result behind. Returns the file's path."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return path


def validate(result: object, where: str = "result") -> dict:
    """Check the shape compare and report rely on; raises ResultError listing every problem."""
    if not isinstance(result, dict):
        raise ResultError(f"{where}: expected a JSON object, got {type(result).__name__}")
    if result.get("schema") != SCHEMA:
        raise ResultError(f"{where}: schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    problems = []
    if result.get("kind") not in KINDS:
        problems.append(f"kind {result.get('kind')!r} is not one of {', '.join(KINDS)}")
    levels = result.get("levels")
    if not isinstance(levels, list):
        problems.append("levels: expected a list")
        levels = []
    for i, level in enumerate(levels):
        if not isinstance(level, dict):
            problems.append(f"levels[{i}]: expected an object")
            continue
        load = level.get("load")
        if not isinstance(load, dict) or load.get("mode") not in LOAD_MODES:
            problems.append(f"levels[{i}].load: expected {{'mode': {' | '.join(LOAD_MODES)}, 'value': ...}}")
        for key in ("requests", "failures"):
            if not isinstance(level.get(key, []), list):
                problems.append(f"levels[{i}].{key}: expected a list")
    if problems:
        raise ResultError(f"{where}: " + "; ".join(problems))
    return result


def load(path_or_dir: str | Path) -> dict:
    """Read a result from a result.json or a directory holding one; raises ResultError when the
    file is missing, is not JSON, has another schema or the wrong shape."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / RESULT_FILE
        if not p.is_file():
            raise ResultError(f"{RESULT_FILE} not found in {p.parent}")
    try:
        text = p.read_text()
    except FileNotFoundError as err:
        raise ResultError(f"{p}: not found") from err
    except OSError as err:
        raise ResultError(f"{p}: {err.strerror or err}") from err
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultError(f"{p}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    return validate(doc, where=str(p))
