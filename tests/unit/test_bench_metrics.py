"""Bench metrics follow METRICS.md exactly: every figure here is computed by hand from a synthetic
timeline (times in s relative to t0; chunk times relative to each request's send)."""

from __future__ import annotations

import pytest

from factory.bench import metrics as m


def rec(t_send_s, chunk_s, n_out, n_in=None, index=0, n_out_expected=None, source="usage"):
    return {
        "index": index,
        "t_send_s": t_send_s,
        "chunk_s": list(chunk_s),
        "n_in": n_in,
        "n_out": n_out,
        "n_out_source": source,
        "n_out_expected": n_out_expected,
    }


def fail(t_send_s, index=99):
    return {"index": index, "t_send_s": t_send_s, "error": "HTTP 500", "status": 500}


def level(records, failures=(), load=None, **extra):
    lv = {
        "load": load or {"mode": "concurrency", "value": 1},
        "requests": list(records),
        "failures": list(failures),
        "energy_samples": [],
        "energy_source": "none",
        "gpus": 1,
    }
    lv.update(extra)
    return lv


# -- per-request latencies --


def test_ttft_e2e_tpot_come_from_content_chunk_times():
    r = rec(1.0, [0.5, 0.7, 1.1], n_out=5)
    assert m.ttft_s(r) == 0.5
    assert m.e2e_s(r) == 1.1
    assert m.tpot_s(r) == pytest.approx((1.1 - 0.5) / 4)


def test_tpot_is_undefined_for_one_token_and_left_out_of_the_distribution():
    one = rec(0.0, [0.3], n_out=1)
    two = rec(0.0, [0.2, 0.6], n_out=2)
    assert m.tpot_s(one) is None
    agg = m.aggregate(level([one, two]), {}, {})
    assert agg["tpot_s"]["n"] == 1
    assert agg["tpot_s"]["p50"] == pytest.approx(0.4)
    assert agg["ttft_s"]["n"] == 2  # the one-token request still has a TTFT


def test_itl_is_pooled_over_requests_and_never_includes_ttft():
    a = rec(0.0, [0.5, 0.6, 0.8], n_out=3)
    b = rec(0.0, [2.0], n_out=1)  # one chunk: no gap at all
    c = rec(1.0, [0.3, 0.7], n_out=2)
    assert m.itls_s(a) == pytest.approx([0.1, 0.2])
    assert m.itls_s(b) == []
    itl = m.aggregate(level([a, b, c]), {}, {})["itl_s"]
    assert itl["n"] == 3
    assert itl["mean"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert itl["p50"] == pytest.approx(0.2)
    assert itl["p99"] == pytest.approx(0.2 + 0.98 * 0.2)  # below every TTFT (0.3, 0.5, 2.0)


# -- percentiles and DIST --


def test_percentile_interpolates_linearly_between_closest_ranks():
    v = [1.0, 2.0, 3.0, 4.0]
    assert m.percentile(v, 50) == pytest.approx(2.5)
    assert m.percentile(v, 90) == pytest.approx(3.7)
    assert m.percentile(v, 25) == pytest.approx(1.75)
    assert m.percentile(v, 0) == 1.0
    assert m.percentile(v, 100) == 4.0
    assert m.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        m.percentile([], 50)


def test_dist_sorts_a_copy_and_reports_mean_and_percentiles():
    values = [4.0, 1.0, 3.0, 2.0]
    d = m.dist(values)
    assert values == [4.0, 1.0, 3.0, 2.0]
    assert d == pytest.approx({"n": 4, "mean": 2.5, "p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97})
    assert m.dist([]) == {"n": 0}


def test_p99_9_appears_only_from_1000_values():
    assert "p99.9" not in m.dist(float(i) for i in range(999))
    d = m.dist(float(i) for i in range(1000))
    assert d["p99.9"] == pytest.approx(999 * 0.999)
    assert d["mean"] == pytest.approx(499.5)


# -- duration, throughput, failures --


def test_duration_runs_from_the_first_send_even_a_failed_one_to_the_last_response():
    records = [rec(1.0, [0.5, 2.0], n_out=4, n_in=10), rec(1.5, [0.2, 1.0], n_out=2, n_in=6)]
    failures = [fail(0.5)]
    assert m.run_window(records, failures) == (0.5, 3.0)
    agg = m.aggregate(level(records, failures), {}, {})
    assert agg["duration_s"] == pytest.approx(2.5)
    assert agg["output_tok"] == 6 and agg["input_tok"] == 16
    assert agg["output_tok_s"] == pytest.approx(6 / 2.5)
    assert agg["total_tok_s"] == pytest.approx(22 / 2.5)
    assert agg["request_s"] == pytest.approx(2 / 2.5)


def test_failures_are_counted_but_never_enter_latencies():
    agg = m.aggregate(level([rec(0.0, [0.1, 0.2], n_out=2)], [fail(0.0, 1), fail(5.0, 2)]), {}, {})
    assert (agg["completed"], agg["failed"]) == (1, 2)
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert agg[name]["n"] == 1
    assert agg["e2e_s"]["p99"] == pytest.approx(0.2)


def test_empty_level_has_zero_throughput_empty_distributions_and_no_cost():
    agg = m.aggregate(level([], [fail(0.0)]), {"ttft_s": 1.0}, {"kwh_price": 0.1})
    assert agg["completed"] == 0 and agg["failed"] == 1
    assert agg["duration_s"] == 0.0 and agg["output_tok_s"] == 0.0
    assert agg["ttft_s"] == {"n": 0}
    assert agg["goodput_req_s"] == 0.0 and agg["slo_attained"] is None
    assert agg["cost"] is None


def test_n_out_is_never_max_tokens_and_mismatches_are_counted():
    records = [
        rec(0.0, [0.1], 5, n_out_expected=5),
        rec(0.0, [0.1, 0.2], 3, n_out_expected=5, source="retokenised"),
        rec(0.0, [0.3], 2),
    ]
    agg = m.aggregate(level(records), {}, {})
    assert agg["output_tok"] == 10
    assert agg["n_out_mismatches"] == 1


# -- goodput --

GOODPUT_RECORDS = [
    rec(0.0, [0.1, 0.2, 0.3], n_out=3),  # TTFT .1  TPOT .1  E2E .3
    rec(0.0, [0.5, 0.6, 1.5], n_out=3),  # TTFT .5  TPOT .5  E2E 1.5
    rec(0.0, [0.2], n_out=1),  # TTFT .2  TPOT n/a  E2E .2
]


@pytest.mark.parametrize(
    "slo, good",
    [
        ({"ttft_s": 0.3}, 2),
        ({"tpot_s": 0.05}, 1),  # only the one-token request: N_out < 2 passes TPOT
        ({"tpot_s": 0.2}, 2),
        ({"e2e_s": 0.25}, 1),
        ({"ttft_s": 0.3, "e2e_s": 0.25}, 1),  # every SLO given must hold
        ({"ttft_s": 0.5, "tpot_s": 0.5, "e2e_s": 1.5}, 3),  # limits are inclusive
    ],
)
def test_goodput_counts_requests_meeting_every_slo_given(slo, good):
    agg = m.aggregate(level(GOODPUT_RECORDS), slo, {})
    assert agg["goodput_req_s"] == pytest.approx(good / 1.5)
    assert agg["slo_attained"] == pytest.approx(good / 3)


def test_goodput_is_null_without_any_slo():
    agg = m.aggregate(level(GOODPUT_RECORDS), {"ttft_s": None, "tpot_s": None, "e2e_s": None}, {})
    assert agg["goodput_req_s"] is None and agg["slo_attained"] is None


# -- windows --


def test_concurrency_steady_window_runs_from_the_cth_send_to_the_last_send():
    records = [rec(t, [0.5], 1) for t in (0.0, 0.1, 1.0, 2.0)]
    load = {"mode": "concurrency", "value": 2}
    assert m.steady_window(records, [], load) == (0.1, 2.0)
    assert m.steady_window(records, [fail(2.5)], load) == (0.1, 2.5)  # a failed send is a send
    assert m.steady_window(records, [], {"mode": "concurrency", "value": 4}) is None  # c-th send is the last
    assert m.steady_window(records, [], {"mode": "concurrency", "value": 8}) is None  # never all busy


def test_rate_steady_window_runs_from_the_first_completion_to_the_last_send():
    records = [rec(0.0, [0.4, 0.9], 2), rec(0.5, [0.1, 0.2], 2), rec(2.0, [0.3], 1)]
    assert m.steady_window(records, [], {"mode": "rate", "value": 2.0, "burstiness": 1.0}) == (0.7, 2.0)
    assert m.steady_window(records, [], {"mode": "trace", "value": None}) == (0.7, 2.0)
    late = [rec(0.0, [3.0], 1), rec(1.0, [0.5], 1)]
    assert m.steady_window(late, [], {"mode": "rate", "value": "inf"}) is None  # first completion after last send


def test_counter_is_interpolated_between_samples_and_unknown_outside():
    samples = [[0.0, 100.0], [2.0, 300.0], [4.0, 400.0]]
    assert m.counter_at(samples, 1.0) == pytest.approx(200.0)
    assert m.counter_at(samples, 3.0) == pytest.approx(350.0)
    assert m.counter_at(samples, 2.0) == 300.0
    assert m.counter_at(samples, 0.0) == 100.0
    assert m.counter_at(samples, -0.1) is None
    assert m.counter_at(samples, 4.1) is None
    assert m.counter_at([], 1.0) is None
    assert m.energy_between(samples, 1.0, 3.0) == pytest.approx(150.0)
    assert m.energy_between(samples, -1.0, 3.0) is None


def test_tokens_in_a_window_spread_n_out_evenly_over_chunks():
    r1 = rec(1.0, [0.5, 1.0, 2.0], n_out=6)  # 2 tokens at 1.5, 2.0, 3.0
    r2 = rec(2.0, [0.2], n_out=4)  # 4 tokens at 2.2
    assert m.tokens_between([r1], 1.8, 2.5) == pytest.approx(2.0)
    assert m.tokens_between([r1], 2.0, 3.0) == pytest.approx(4.0)  # both ends inclusive
    assert m.tokens_between([r1, r2], 1.8, 2.5) == pytest.approx(6.0)
    assert m.tokens_between([r1, r2], 0.0, 10.0) == pytest.approx(10.0)
    assert m.tokens_between([r1, r2], 5.0, 6.0) == 0.0


# -- energy and cost --


def energy_level(**extra):
    # Concurrency 1: sends at 0, 1, 2; each request has 2 chunks of 2 tokens, at +0.5 and +1.0.
    records = [rec(t, [0.5, 1.0], n_out=4, index=i) for i, t in enumerate((0.0, 1.0, 2.0))]
    lv = level(records, energy_samples=[[0.0, 0.0], [1.0, 50.0], [3.0, 350.0]], energy_source="nvml:measured", gpus=2)
    lv.update(extra)
    return lv


def test_energy_whole_run_and_steady_state_per_token():
    e = m.aggregate(energy_level(), {}, {})["energy"]
    assert e["source"] == "nvml:measured"
    assert e["whole"] == pytest.approx(
        {
            "energy_j": 350.0,
            "duration_s": 3.0,
            "j_per_tok": 350 / 12,
            "tok_per_j": 12 / 350,
            "mean_power_w": 350 / 3,
            "output_tok": 12,
        }
    )
    # steady [c-th send 0, last send 2]: counter(2) = 200 J; chunks at .5, 1, 1.5, 2 carry 8 tokens
    assert e["steady"] == pytest.approx(
        {
            "energy_j": 200.0,
            "duration_s": 2.0,
            "j_per_tok": 25.0,
            "tok_per_j": 0.04,
            "mean_power_w": 100.0,
            "output_tok": 8.0,
        }
    )


def test_energy_uses_the_levels_own_steady_window_when_given():
    e = m.aggregate(energy_level(steady={"start_s": 1.0, "end_s": 2.0}), {}, {})["energy"]
    assert e["steady"]["energy_j"] == pytest.approx(150.0)
    assert e["steady"]["output_tok"] == pytest.approx(6.0)  # chunks at 1.0, 1.5 and 2.0, both ends inclusive
    assert m.aggregate(energy_level(steady=None), {}, {})["energy"]["steady"] is None


def test_energy_is_null_without_a_source_or_outside_the_samples():
    none = m.aggregate(energy_level(energy_source="none"), {}, {})["energy"]
    assert none == {"source": "none", "whole": None, "steady": None}
    assert m.aggregate(energy_level(energy_samples=[]), {}, {})["energy"]["source"] == "none"
    late = m.aggregate(energy_level(energy_samples=[[0.5, 0.0], [3.0, 250.0]]), {}, {})["energy"]
    assert late["whole"] is None  # the first send (0) is before the first sample
    assert late["steady"] is None


def test_cost_per_million_tokens_matches_a_hand_computed_example():
    # $2/h x 1 GPU at 1000 tok/s: 2 / 3.6e6 $/tok = $0.5556 per Mtok; 0.5 J/tok: 0.5e6 J = 0.1389 kWh
    # per Mtok, x $0.10 x PUE 1.2 = $0.01667
    c = m.cost(1000.0, 0.5, {"gpu_price_hour": 2.0, "gpus": 1, "kwh_price": 0.10, "pue": 1.2})
    assert c["gpu_part"] == pytest.approx(0.555556, rel=1e-5)
    assert c["energy_part"] == pytest.approx(0.0166667, rel=1e-5)
    assert c["per_million_output_tok"] == pytest.approx(0.572222, rel=1e-5)


def test_cost_parts_are_zero_when_inputs_are_missing_and_null_when_both_are():
    assert m.cost(1000.0, None, {"gpu_price_hour": 2.0, "gpus": 2}) == pytest.approx(
        {"per_million_output_tok": 1.111111, "gpu_part": 1.111111, "energy_part": 0.0}, rel=1e-5
    )
    only_energy = m.cost(1000.0, 0.5, {"kwh_price": 0.10})  # PUE defaults to 1.0
    assert only_energy["gpu_part"] == 0.0
    assert only_energy["energy_part"] == pytest.approx(0.5 / 3.6 * 0.10)
    assert m.cost(1000.0, None, {"kwh_price": 0.10}) is None
    assert m.cost(1000.0, 0.5, {}) is None


def test_aggregate_cost_uses_whole_run_throughput_energy_and_the_levels_gpus():
    agg = m.aggregate(energy_level(), {}, {"gpu_price_hour": 3.6, "kwh_price": 0.36})
    # 12 tok / 3 s = 4 tok/s; 2 GPUs from the level: 3.6 x 2 / (3600 x 4) x 1e6 = 500
    assert agg["cost"]["gpu_part"] == pytest.approx(500.0)
    assert agg["cost"]["energy_part"] == pytest.approx(350 / 12 / 3.6 * 0.36)
    assert m.aggregate(energy_level(), {}, {"gpu_price_hour": 3.6, "gpus": 1})["cost"]["gpu_part"] == (
        pytest.approx(250.0)
    )


def test_definitions_state_the_traps_avoided():
    text = "\n".join(m.DEFINITIONS)
    for phrase in (
        "never max_tokens",
        "never includes TTFT",
        "N_out >= 2",
        "p99.9 when n >= 1000",
        "failed requests included",
        "source",
        "PUE",
    ):
        assert phrase in text
