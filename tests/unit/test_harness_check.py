"""bench/harness_check.py's pure parts: our aggregates under vLLM's result keys and units, the
rounds' alternation, and the table's means, ratios, spreads and 2 % verdicts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from factory.bench import metrics

_PATH = Path(__file__).resolve().parents[2] / "bench" / "harness_check.py"
_SPEC = importlib.util.spec_from_file_location("harness_check", _PATH)
hc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hc)


def _record(t_send_s: float, chunk_s: list[float]) -> dict:
    return {"t_send_s": t_send_s, "chunk_s": chunk_s, "n_out": len(chunk_s), "n_in": 10}


def test_ours_figures_are_vllms_keys_in_milliseconds():
    # Two requests: first chunk at 0.1 s / 0.3 s, then a chunk every 0.02 s / 0.04 s (3 tokens each).
    level = {"load": {"mode": "concurrency", "value": 1},
             "requests": [_record(0.0, [0.1, 0.12, 0.14]), _record(1.0, [0.3, 0.34, 0.38])]}  # fmt: skip
    level["aggregates"] = metrics.aggregate(level, None, None)
    figures = hc.ours_figures(level)
    assert figures["total_output_tokens"] == 6
    assert figures["output_throughput"] == pytest.approx(6 / 1.38)
    assert figures["mean_ttft_ms"] == pytest.approx(200.0)
    assert figures["median_ttft_ms"] == pytest.approx(200.0)
    assert figures["p99_ttft_ms"] == pytest.approx(100 + 200 * 0.99)
    assert figures["mean_tpot_ms"] == pytest.approx(30.0)  # (20 + 40) / 2: (E2E - TTFT) / (N_out - 1)
    assert figures["mean_itl_ms"] == pytest.approx(30.0)
    assert figures["median_itl_ms"] == pytest.approx(30.0)
    assert figures["mean_itl_per_tok_ms"] == pytest.approx(120 / 6)  # the gaps' 0.12 s over N_out = 6, as vLLM counts
    assert {k for _, k in hc.ROWS} <= figures.keys()


def test_itl_on_vllms_count_takes_empty_chunks_as_tokens():
    # 4 tokens, the third an empty-content chunk ours does not time: 2 gaps of ours, 4 of vLLM's.
    level = {"load": {"mode": "concurrency", "value": 1}, "requests": [dict(_record(0.0, [0.1, 0.2, 0.4]), n_out=4)]}
    level["aggregates"] = metrics.aggregate(level, None, None)
    figures = hc.ours_figures(level)
    assert figures["mean_itl_ms"] == pytest.approx(150.0)
    assert figures["mean_itl_per_tok_ms"] == pytest.approx(75.0)
    assert hc.vllm_figures({"mean_itl_ms": 75.0})["mean_itl_per_tok_ms"] == 75.0


def test_rounds_alternate_which_harness_goes_first():
    assert [hc.order(i)[0] for i in range(4)] == ["vllm", "ours", "vllm", "ours"]
    assert all(sorted(hc.order(i)) == sorted(hc.HARNESSES) for i in range(2))


def _run(harness: str, value: float) -> dict:
    return {"harness": harness, "figures": {k: value for _, k in hc.ROWS}}


def test_compare_rows_means_over_rounds_ratio_and_spread():
    rows = hc.compare_rows([_run("vllm", 100.0), _run("vllm", 110.0), _run("ours", 101.0), _run("ours", 103.0)])
    row = rows[0]
    assert row["vllm"] == pytest.approx(105.0) and row["ours"] == pytest.approx(102.0)
    assert row["ratio"] == pytest.approx(102 / 105)
    assert row["diff_pct"] == pytest.approx((102 / 105 - 1) * 100)  # -2.86 %
    assert row["spread_pct"] == pytest.approx(10 / 105 * 100)  # vLLM's spread is the larger one
    assert row["within"] is False
    assert "| NO |" in hc.format_table(rows)


def test_compare_rows_one_round_has_no_spread_and_two_percent_passes():
    rows = hc.compare_rows([_run("vllm", 100.0), _run("ours", 101.9)])
    assert all(r["spread_pct"] is None and r["within"] for r in rows)
    assert "| - % | yes |" in hc.format_table(rows)
