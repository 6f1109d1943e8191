"""kernels/governor_check.py on the CPU: the dry run drives the same policy code (EnergyCurve,
choose_batch, DutyController) against the modeled power source and must hold the budget, in a
clean interpreter in which every package the GPU image lacks fails to import. On a lent GPU,
kernels/gpu_check.sh runs the same loop against the card's NVML energy counter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The project's dependencies that the GPU image (torch, triton, nvidia-ml-py) does not have, and
# pynvml itself: the CPU dry run must not need it.
ABSENT_ON_GPU_IMAGE = (
    "ray", "vllm", "fastapi", "starlette", "uvicorn", "pydantic", "yaml", "httpx", "prometheus_client",
    "psutil", "zmq", "transformers", "gguf", "accelerate", "pyarrow", "pynvml",
)  # fmt: skip
ALLOWED_OURS = {
    "factory", "factory.policy", "factory.policy.batch", "factory.policy.profile", "factory.policy.throttle",
    "factory.telemetry", "factory.telemetry.nvml", "factory.telemetry.sampler", "factory.telemetry.sources",
    "kernels", "kernels.shapes", "kernels.governor_check",
}  # fmt: skip
# Runs the script with a meta-path finder that refuses the absent packages, then prints which of
# our modules were loaded.
RUNNER = """
import importlib.abc, json, runpy, sys
blocked = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not on the GPU image", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    ours = sorted(m for m in sys.modules if m.partition(".")[0] in ("factory", "kernels"))
    print("OURS " + json.dumps(ours), file=sys.stderr)
"""


# A host so loaded that the 20 ms power sampler went this long without running (other jobs on a
# small CI machine) stalls the loop and its measurement alike: the +-5 % verdict is not attainable
# there, so only the control action is asserted, in a wider band.
STARVED_POLL_GAP_S = 0.1
STARVED_BAND = 0.15  # the unthrottled workload sits ~+37 % over the budget: still far outside


def test_dry_run_holds_the_budget_with_only_the_gpu_images_packages(tmp_path):
    out = tmp_path / "governor.json"
    args = ["--device", "cpu", "--seconds", "6", "--idle-seconds", "0.5", "--unthrottled-seconds", "1.5",
            "--settle-seconds", "1", "--window-seconds", "4", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(ABSENT_ON_GPU_IMAGE), str(ROOT / "kernels/governor_check.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "OUT"},  # $OUT would get a copy of the JSON
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 0 pass, 1 a window left the band
    ours = json.loads(proc.stderr.rpartition("OURS ")[2])
    assert set(ours) <= ALLOWED_OURS, set(ours) - ALLOWED_OURS

    doc = json.loads(out.read_text())
    assert doc["source"] == "modeled" and doc["windows"] >= 5  # 4 s windows sliding by 0.1 s
    if doc["longest_poll_gap_s"] <= STARVED_POLL_GAP_S:
        assert proc.returncode == 0 and doc["passed"] and "PASS:" in proc.stdout, proc.stdout
        assert -0.05 <= doc["worst_low"] <= doc["worst_high"] <= 0.05
    else:
        assert -STARVED_BAND <= doc["worst_low"] <= doc["worst_high"] <= STARVED_BAND, proc.stdout
    unthrottled, governed = doc["unthrottled"], doc["governed"]
    assert doc["idle_w"] < doc["budget_w"] < unthrottled["power_w"]
    # Held by pausing the workload: it computed a fraction of the time, and sold fewer tokens.
    assert governed["busy_fraction"] < 0.8 * unthrottled["busy_fraction"]  # ~0.6 x at fraction 0.6
    assert governed["tok_s"] < unthrottled["tok_s"]
    assert [r["t_s"] for r in doc["per_second"]] == list(range(1, len(doc["per_second"]) + 1))
