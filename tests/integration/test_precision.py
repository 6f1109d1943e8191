"""The CPU precision check on the real stack: a replica whose 16-bit answers are not float32's
restarts its engine in float32 before it serves, says so in one log line, and the next start goes
straight to float32 from the kept verdict.

The mismatch is made certain on every CPU by scoring against another checkpoint (the model field
`precision_reference`, meant for float32 master weights): the served tiny model and a tiny model
with other random weights cannot agree. The match outcome on the embedded model is exercised by
test_serve_lifecycle.py (which answer it gets depends on the CPU; "Paris" must hold on both)."""

from __future__ import annotations

import json
import re

import pytest
from openai import OpenAI

from factory.models import build_tiny_model
from tests.support import FactoryProcess, free_port, serving, write_config

pytestmark = pytest.mark.stack
MODEL = "tiny-precision"


def _engine_dtypes(log: str) -> list[str]:
    """The dtype of every vLLM engine the log saw start, in order."""
    return re.findall(r"dtype=torch\.(\w+)", log)


def test_a_replica_whose_16_bit_answers_differ_serves_float32_and_remembers(tiny_model_dir, tmp_path, monkeypatch):
    other = build_tiny_model(tmp_path / "other-weights", seed=1)
    home = tmp_path / "home"
    monkeypatch.setenv("FACTORY_HOME", str(home))  # reaches the replicas: Ray's workers inherit it
    port = free_port()
    model = {"name": MODEL, "source": str(tiny_model_dir), "max_model_len": 512, "max_num_seqs": 4,
             "cpu_kv_cache_gib": 0.1, "precision_reference": str(other)}  # fmt: skip
    config = write_config(tmp_path / "factory.yaml", port=port, models=[model], ledger={"path": str(tmp_path / "l.db")})

    for run, how in enumerate(("checked now", "kept from an earlier check")):
        log_path = tmp_path / f"serve-{run}.log"
        with serving(FactoryProcess(config, log_path, port)) as factory:
            client = OpenAI(base_url=factory.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
            assert r.usage.completion_tokens == 4
        log = log_path.read_text(errors="replace")
        lines = [line for line in log.splitlines() if f"precision: {MODEL} serves" in line]
        assert len(lines) == 1, lines
        assert "serves float32" in lines[0] and how in lines[0] and "nats" in lines[0]
        # First run: the bf16 engine that was checked, then the float32 one; later runs: float32 only.
        assert _engine_dtypes(log) == (["bfloat16", "float32"] if run == 0 else ["float32"])

    (kept,) = (home / "precision").glob("*.json")
    verdict = json.loads(kept.read_text())
    assert verdict["dtype"] == "float32" and verdict["candidate"] == "bfloat16"
    assert verdict["worst_regret"] > 0.05
