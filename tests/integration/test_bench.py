"""`factory bench` against the real factory (tiny model, Ray Serve, vLLM CPU, HTTP): a short
concurrency sweep, its result.json and report.html, a comparison, and the clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, tiny_model
from tests.support import free_port, write_config

pytestmark = pytest.mark.stack

FACTORY = str(Path(sys.executable).with_name("factory"))
OUTPUT_TOK = 12
# The factory publishes its energy counters once a second, so an energy window must be many
# seconds long to be read to a few per cent (a 1 s level could read anything from 0 to 2x).
LEVEL_S = 8


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FACTORY, "bench", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_run(base_url, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    done = _bench(
        "run", "--url", base_url, "--model", TINY_MODEL, "--api-key", keys.tenant,
        "--dataset", "random", "--input-len", "uniform:16:48", "--output-len", str(OUTPUT_TOK),
        "--concurrency", "1,4", "--duration", f"{LEVEL_S}s", "--slo", "ttft=10s,tpot=2s",
        "--energy", "server", "--gpu-price-hour", "2.0", "--kwh-price", "0.1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, json.loads((out / "result.json").read_text())


def test_a_sweep_records_every_request_with_the_servers_token_counts(bench_run):
    _, result = bench_run
    assert result["schema"] == "factory.bench-result/1" and result["simulated"] is False
    assert [lvl["load"] for lvl in result["levels"]] == [
        {"mode": "concurrency", "value": 1},
        {"mode": "concurrency", "value": 4},
    ]
    for level in result["levels"]:
        agg = level["aggregates"]
        assert agg["completed"] >= 8 and agg["failed"] == 0 and level["failures"] == []
        # The measured window runs from the first send to the last content chunk: the level lasts
        # LEVEL_S, its window a few ms less when the last answer's usage and [DONE] close it.
        assert agg["duration_s"] >= LEVEL_S - 0.5
        for rec in level["requests"]:
            # ignore_eos makes the answer exactly max_tokens long, and the count is the server's usage
            assert rec["n_out_source"] == "usage" and rec["n_out"] == OUTPUT_TOK
            assert rec["n_in"] and 0 < rec["chunk_s"][0] <= rec["chunk_s"][-1]
        assert agg["output_tok"] == agg["completed"] * OUTPUT_TOK
        assert agg["ttft_s"]["n"] == agg["completed"] and agg["ttft_s"]["p50"] > 0
        assert agg["goodput_req_s"] is not None and agg["slo_attained"] == 1.0


def test_energy_comes_from_the_factorys_counters_and_says_so(bench_run):
    _, result = bench_run
    for level in result["levels"]:
        agg = level["aggregates"]
        assert level["energy_source"] == "server:modeled"
        whole = agg["energy"]["whole"]
        assert whole["energy_j"] > 0 and whole["j_per_tok"] == pytest.approx(whole["energy_j"] / agg["output_tok"])
        # modeled CPU power lies between the idle and busy figures of the default telemetry
        assert 30 <= whole["mean_power_w"] <= 130
        assert agg["cost"]["per_million_output_tok"] > agg["cost"]["energy_part"] > 0


def test_the_report_is_one_self_contained_file(bench_run):
    out, _ = bench_run
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4 and "server:modeled" in html
    assert 'src="http' not in html and 'href="http' not in html and "<link" not in html


def test_compare_of_a_run_with_itself_is_all_ratio_one(bench_run, tmp_path):
    out, _ = bench_run
    done = _bench("compare", str(out), str(out / "result.json"), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "comparison.json").read_text())
    ratios = [row["ratio"] for row in table["rows"] if row["ratio"] is not None]
    assert ratios and all(r == pytest.approx(1.0) for r in ratios)
    assert "output_tok_s" in done.stdout


def test_a_refused_key_an_unknown_model_and_bad_arguments_get_one_clear_line(base_url, keys, tmp_path):
    common = ["--num-requests", "1", "--quiet", "--out", str(tmp_path)]
    bad_key = _bench("run", "--url", base_url, "--model", TINY_MODEL, "--api-key", "sk-wrong", *common)
    assert bad_key.returncode == 1 and "refused the API key" in bad_key.stderr
    assert "sk-wrong" not in bad_key.stderr + bad_key.stdout  # secrets never printed
    unknown = _bench("run", "--url", base_url, "--model", "nope", "--api-key", keys.tenant, *common)
    assert unknown.returncode == 1 and "'nope' is not served" in unknown.stderr and TINY_MODEL in unknown.stderr
    bad_slo = _bench("run", "--url", base_url, "--model", TINY_MODEL, "--slo", "ttft=fast", *common)
    assert bad_slo.returncode == 2 and "--slo" in bad_slo.stderr
    bad_rate = _bench("run", "--url", base_url, "--model", TINY_MODEL, "--rate", "two", *common)
    assert bad_rate.returncode == 2 and "Traceback" not in bad_rate.stderr
    missing = _bench(
        "run", "--url", base_url, "--model", TINY_MODEL, "--dataset", "sharegpt:/nonexistent.json", *common
    )
    assert missing.returncode == 2 and "/nonexistent.json" in missing.stderr
    unreachable = _bench("run", "--url", "http://127.0.0.1:9", "--model", TINY_MODEL, *common)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    assert not (tmp_path / "result.json").exists()


def test_vs_vllm_runs_stock_vllm_then_the_factory_and_writes_one_comparison(tiny_model_dir, tmp_path):
    """The whole side-by-side on the tiny model: stock vLLM's OpenAI server from this install, then
    `factory serve`, the same load, energy from the same (process-tree) model, ratios factory/stock."""
    config = write_config(
        tmp_path / "tiny.yaml",
        port=free_port(),
        models=[tiny_model(tiny_model_dir, max_model_len=512, max_num_seqs=8)],
    )
    out = tmp_path / "vs"
    done = _bench(
        "vs-vllm", "--config", str(config), "--model", TINY_MODEL, "--port", str(free_port()),
        "--concurrency", "2", "--num-requests", "6", "--input-len", "16", "--output-len", "8",
        "--energy", "process", "--quiet", "--out", str(out),
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((out / "comparison.json").read_text())
    assert table["labels"] == {"a": "stock", "b": "factory"}
    rows = {row["metric"]: row for row in table["rows"]}
    for metric in ("output_tok_s", "j_per_tok (whole)"):
        assert rows[metric]["a"] > 0 and rows[metric]["b"] > 0
        assert rows[metric]["ratio"] == pytest.approx(rows[metric]["b"] / rows[metric]["a"])
    for side in ("stock", "factory"):
        result = json.loads((out / side / "result.json").read_text())
        level = result["levels"][0]
        assert level["energy_source"] == "process:modeled" and level["aggregates"]["completed"] == 6
        assert all(rec["n_out"] == 8 for rec in level["requests"])
    assert (out / "report.html").exists() and "stock" in done.stdout
