"""compare(): B/A ratios per matched level, a split-half spread that tells real differences from
noise, unmatched levels reported, and the table/markdown/JSON outputs."""

from __future__ import annotations

import json

import pytest

from factory.bench import metrics, schema
from factory.bench.compare import LEGEND, compare, format_table, write_comparison


def sequential_level(durations_s, n_out=4, power_w=100.0, value=1, with_aggregates=True, energy=True):
    """Concurrency-1 timeline: each request is sent when the previous one ends, its n_out tokens
    arrive as n_out evenly spaced chunks; the GPU draws power_w throughout."""
    records, t = [], 0.0
    for i, d in enumerate(durations_s):
        records.append(
            {
                "index": i,
                "t_send_s": t,
                "chunk_s": [d * (k + 1) / n_out for k in range(n_out)],
                "n_in": 10,
                "n_out": n_out,
                "n_out_source": "usage",
                "n_out_expected": n_out,
            }
        )
        t += d
    lv = {
        "load": {"mode": "concurrency", "value": value},
        "t0_unix": 0.0,
        "requests": records,
        "failures": [],
        "energy_samples": [[0.0, 0.0], [t, power_w * t]] if energy else [],
        "power_samples": [],
        "energy_source": "nvml:measured" if energy else "none",
        "gpus": 1,
    }
    if with_aggregates:
        lv["aggregates"] = metrics.aggregate(lv, {}, PRICES)
    return lv


PRICES = {"gpu_price_hour": 2.0, "kwh_price": 0.1, "pue": 1.0, "gpus": 1}


def result(label, *levels, kind="run", simulated=False):
    r = schema.new_result(kind, label, {"slo": {}, "prices": PRICES}, {}, simulated=simulated)
    r["levels"] = list(levels)
    return r


def row(cmp, metric, level="c=1"):
    (found,) = [r for r in cmp["rows"] if r["metric"] == metric and r["level"] == level]
    return found


def test_exactly_double_throughput_is_ratio_2_and_outside_a_zero_spread():
    a = result("stock", sequential_level([1.0] * 8))
    b = result("factory", sequential_level([0.5] * 8))
    cmp = compare(a, b)
    out = row(cmp, "output_tok_s")
    assert (out["a"], out["b"], out["ratio"]) == (4.0, 8.0, 2.0)
    assert out["spread"] == 0.0  # identical requests: both halves agree exactly
    assert out["within_spread"] is False
    assert out["better"] == "higher" and out["unit"] == "tok/s"
    e2e = row(cmp, "e2e_s p50")
    assert e2e["ratio"] == 0.5 and e2e["better"] == "lower"
    j = row(cmp, "j_per_tok (whole)")  # same power for half the time: half the joules per token
    assert (j["a"], j["b"], j["ratio"]) == (25.0, 12.5, 0.5)
    assert j["source"] == {"a": "nvml:measured", "b": "nvml:measured"}
    assert row(cmp, "cost per_million_output_tok")["ratio"] == pytest.approx(0.5)


def test_a_small_difference_inside_a_noisy_runs_split_half_spread_is_marked_within():
    # A: first half 1 s per request, second half 2 s: halves give 4 and 2 tok/s, spread 2/3.
    a = result("a", sequential_level([1.0] * 4 + [2.0] * 4))
    # B: uniform (spread 0) and 1% faster on average than A: the row takes the larger spread, A's.
    b = result("b", sequential_level([1.5 * 0.99] * 8))
    out = row(compare(a, b), "output_tok_s")
    assert out["ratio"] == pytest.approx(1 / 0.99)
    assert out["spread"] == pytest.approx(2 / 3)
    assert out["within_spread"] is True
    assert "~" in format_table(compare(a, b)).split("output_tok_s")[1].splitlines()[0]


def test_energy_spread_uses_each_halfs_run_window():
    # Power doubles in the second half: J/tok per half is 25 and 50, spread = 25 / 37.5.
    lv = sequential_level([1.0] * 8)
    lv["energy_samples"] = [[0.0, 0.0], [4.0, 400.0], [8.0, 1200.0]]
    lv["aggregates"] = metrics.aggregate(lv, {}, PRICES)
    cmp = compare(result("a", lv), result("b", sequential_level([1.0] * 8)))
    assert row(cmp, "j_per_tok (whole)")["spread"] == pytest.approx(25 / 37.5)
    assert row(cmp, "output_tok_s")["spread"] == 0.0


def test_missing_or_zero_values_give_no_ratio_instead_of_failing():
    a = result("a", sequential_level([1.0] * 4, energy=False))
    b = result("b", sequential_level([1.0] * 4))
    cmp = compare(a, b)
    j = row(cmp, "j_per_tok (whole)")
    assert j["a"] is None and j["ratio"] is None and j["within_spread"] is None
    assert j["source"] == {"a": "none", "b": "nvml:measured"}
    assert row(cmp, "goodput_req_s")["ratio"] is None  # no SLO given: no goodput on either side
    assert cmp["energy_sources"] == {"a": "none", "b": "nvml:measured"}


def test_levels_without_stored_aggregates_are_computed_the_same_way():
    stored = compare(result("a", sequential_level([1.0] * 6)), result("b", sequential_level([0.5] * 6)))
    fresh = compare(
        result("a", sequential_level([1.0] * 6, with_aggregates=False)),
        result("b", sequential_level([0.5] * 6, with_aggregates=False)),
    )
    assert fresh["rows"] == stored["rows"]


def test_levels_match_by_mode_and_value_and_unmatched_ones_are_listed():
    a = result("a", sequential_level([1.0] * 4, value=1), sequential_level([1.0] * 4, value=4))
    b = result("b", sequential_level([1.0] * 4, value=1.0), sequential_level([1.0] * 4, value=8))
    cmp = compare(a, b)
    assert cmp["levels"] == ["c=1"]
    assert {r["level"] for r in cmp["rows"]} == {"c=1"}
    assert cmp["unmatched"] == [{"level": "c=4", "only_in": "a"}, {"level": "c=8", "only_in": "b"}]
    text = format_table(cmp)
    assert "unmatched level c=4: only in A" in text and "unmatched level c=8: only in B" in text


def test_rate_levels_are_labelled_with_the_shared_spelling():
    def rate(lv, value):
        lv["load"] = {"mode": "rate", "value": value, "burstiness": 1.0}
        return lv

    a = result("a", rate(sequential_level([1.0] * 4), 2.0), rate(sequential_level([1.0] * 4), "inf"))
    b = result("b", rate(sequential_level([1.0] * 4), 2), rate(sequential_level([1.0] * 4), 0.5))
    cmp = compare(a, b)
    assert cmp["levels"] == ["rate=2/s"]
    assert {r["level"] for r in cmp["rows"]} == {"rate=2/s"}
    assert cmp["unmatched"] == [{"level": "rate=inf", "only_in": "a"}, {"level": "rate=0.5/s", "only_in": "b"}]


def test_table_says_simulated_names_energy_sources_and_explains_the_marker():
    a = result("stock", sequential_level([1.0] * 4))
    b = result("sim factory", sequential_level([0.5] * 4), kind="sim", simulated=True)
    cmp = compare(a, b)
    assert cmp["simulated"] is True and cmp["kinds"] == {"a": "run", "b": "sim"}
    text = format_table(cmp)
    assert text.startswith("SIMULATED: B figures are modeled")
    assert "A = stock (run), B = sim factory (sim)" in text
    assert "A nvml:measured / B nvml:measured" in text.split("j_per_tok (whole)")[1].splitlines()[0]
    assert text.rstrip().endswith(LEGEND)
    assert "SIMULATED" not in format_table(compare(a, a))


def test_table_columns_are_aligned():
    text = format_table(compare(result("a", sequential_level([1.0] * 4)), result("b", sequential_level([0.5] * 4))))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("level"))
    table = lines[header : header + 2 + 16]
    col = lines[header].index("metric")
    assert all(line[col - 2 : col] == "  " for line in table)
    assert lines[header + 1].startswith("-----")


def test_write_comparison_writes_json_and_markdown(tmp_path):
    cmp = compare(result("a", sequential_level([1.0] * 4)), result("b", sequential_level([0.5] * 4)))
    json_path, md_path = write_comparison(cmp, tmp_path / "new" / "dir")
    assert json_path == tmp_path / "new" / "dir" / "comparison.json"
    assert json.loads(json_path.read_text()) == cmp
    md = md_path.read_text()
    assert "| level | metric | unit | A | B | B/A | spread | ~ | energy source |" in md
    assert "| c=1 | output_tok_s | tok/s | 4 | 8 | 2.000 | 0.0% |  |  |" in md
    assert LEGEND in md
