"""The batch policy: the energy curve starts from a profile and learns from steps (plain mean at
first, EWMA after), and `choose_batch` picks the batch with the fewest J/token that fits the TPOT
target, or under a power cap the operating point (batch, duty) that sells the most tokens within
it, never above vLLM's configured maxima.

Expected values are worked out by hand from the published H100 / Llama-3.1-8B profile
(configs/profiles/h100-sxm-llama-3.1-8b.published.json), decode points:

    batch   step_s      power_w   J/token = power x step / batch
      8     0.00747664  486.0     0.45421
     64     0.0124344   610.0     0.11852
    128     0.0181896   668.5     0.09500
    256     0.0284129   691.0     0.07669
    512     0.0522129   688.0     0.07016
"""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.policy.batch import (
    MIN_DUTY,
    MIN_PREFILL_CHUNK,
    P99_MARGIN,
    PRIOR_WEIGHT,
    EnergyCurve,
    Slo,
    choose_batch,
    duty_for_cap,
)
from factory.policy.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "configs" / "profiles" / "h100-sxm-llama-3.1-8b.published.json"
H100_STEP_S = {8: 0.00747664, 64: 0.0124344, 128: 0.0181896, 256: 0.0284129, 512: 0.0522129}
H100_POWER_W = {8: 486.0, 64: 610.0, 128: 668.5, 256: 691.0, 512: 688.0}
IDLE_W = 100.0
MAX_TOKENS = 8192


@pytest.fixture
def h100() -> EnergyCurve:
    return EnergyCurve.from_profile(load_profile(PUBLISHED), max_batch=512, idle_w=IDLE_W, busy_w=700.0)


NO_SLO = Slo()


def choose(curve: EnergyCurve, slo: Slo = NO_SLO, **kw):
    kw.setdefault("max_num_seqs", 512)
    kw.setdefault("max_num_batched_tokens", MAX_TOKENS)
    return choose_batch(curve, slo, **kw)


# -- the curve: seeded from a profile -------------------------------------------------------------


def test_curve_from_the_published_profile_reproduces_its_points(h100):
    assert h100.bucket_sizes() == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    for batch, step_s in H100_STEP_S.items():
        assert h100.step_s(batch) == pytest.approx(step_s, rel=1e-12), batch
        assert h100.power_w(batch) == pytest.approx(H100_POWER_W[batch], rel=1e-12), batch
    # Below the smallest published batch the profile is clamped: buckets 1, 2, 4 read batch 8's figures.
    assert h100.snapshot()[1] == (0.00747664, 486.0)
    # Between buckets the curve interpolates in log2(batch) like the profile: 96 lies 0.585 of
    # the way from 64 to 128 -> 0.0124344 + 0.58496 x 0.0057552 = 0.0158009 s.
    assert h100.step_s(96) == pytest.approx(0.0158009, rel=1e-5)
    # Bucket 16 was seeded with the profile's interpolation a third of the way from 8 to 64.
    assert h100.snapshot()[16][0] == pytest.approx(0.00747664 + (0.0124344 - 0.00747664) / 3, rel=1e-12)
    assert h100.j_per_tok(256) == pytest.approx(691.0 * 0.0284129 / 256, rel=1e-12)  # 0.076693
    assert h100.prefill_s_per_tok is None  # the published profile has no prefill points


def test_curve_without_a_profile_knows_nothing_but_the_busy_power():
    curve = EnergyCurve.from_profile(None, max_batch=24, idle_w=40.0, busy_w=120.0)
    assert curve.bucket_sizes() == [1, 2, 4, 8, 16, 24]  # max_batch itself closes the list
    assert curve.step_s(1) is None and curve.j_per_tok(8) is None
    assert curve.power_w(8) == 120.0


# -- the curve: learning ---------------------------------------------------------------------------


def test_first_observations_are_averaged_then_the_ewma_takes_over():
    curve = EnergyCurve(max_batch=8, idle_w=40.0, busy_w=120.0, alpha=0.1)
    for step_s in (0.010, 0.020, 0.030):
        curve.observe_step(4, step_s)
    assert curve.step_s(4) == pytest.approx(0.020, rel=1e-12)  # the plain mean of the three
    for _ in range(7):
        curve.observe_step(4, 0.020)
    assert curve.step_s(4) == pytest.approx(0.020, rel=1e-12)  # ten seen: mean still 0.020
    # The 11th: weight max(alpha, 1/11) = alpha = 0.1 -> 0.020 + 0.1 x (0.040 - 0.020) = 0.022.
    curve.observe_step(4, 0.040)
    assert curve.step_s(4) == pytest.approx(0.022, rel=1e-12)
    # The 12th: 0.022 + 0.1 x (0.040 - 0.022) = 0.0238.
    curve.observe_step(4, 0.040)
    assert curve.step_s(4) == pytest.approx(0.0238, rel=1e-12)


def test_the_profile_counts_as_prior_observations(h100):
    # Seeded with PRIOR_WEIGHT = 5 observations, so the first real one weighs 1/6:
    # 0.0124344 + (0.0184344 - 0.0124344) / 6 = 0.0134344.
    assert PRIOR_WEIGHT == 5.0
    h100.observe_step(64, 0.0184344)
    assert h100.step_s(64) == pytest.approx(0.0134344, rel=1e-9)
    assert h100.step_s(128) == pytest.approx(0.0181896, rel=1e-12)  # other buckets untouched


def test_observe_power_moves_the_buckets_busy_power(h100):
    h100.observe_power(256, 751.0)  # 691 + (751 - 691) / 6 = 701
    assert h100.power_w(256) == pytest.approx(701.0, rel=1e-12)
    h100.observe_power(0.5, 9999.0)  # no requests ran: not a busy-power reading
    assert h100.power_w(1) == pytest.approx(486.0, rel=1e-12)


def test_a_step_at_a_batch_between_buckets_teaches_the_nearest_bucket_scaled_to_it():
    curve = EnergyCurve(max_batch=16, idle_w=40.0, busy_w=120.0)
    curve.observe_step(8, 0.010)
    curve.observe_step(16, 0.020)
    # Batch 12 is nearer 16 than 8 in log2 (0.415 vs 0.585). The curve says a step at 12 takes
    # 0.010 + log2(1.5) x 0.010 = 0.0158496 s; one that took twice that teaches bucket 16 twice
    # *its* figure (0.040, not 0.0317), which with n = 1 weighs 1/2: 0.020 + (0.040 - 0.020) / 2 = 0.030.
    predicted_s = curve.step_s(12)
    assert predicted_s == pytest.approx(0.0158496, rel=1e-5)
    curve.observe_step(12, 2 * predicted_s)
    assert curve.snapshot()[16][0] == pytest.approx(0.030, rel=1e-12)
    assert curve.snapshot()[8][0] == pytest.approx(0.010, rel=1e-12)


def test_a_step_at_a_between_batch_that_matches_the_curve_changes_nothing(h100):
    before = h100.snapshot()
    h100.observe_step(96, h100.step_s(96))  # bucket 128 (log2 distance 0.415 < 0.585 to 64)
    assert h100.snapshot()[128][0] == pytest.approx(before[128][0], rel=1e-12)


def test_prefill_cost_is_learnt_from_steps_that_carry_prompt_tokens(h100):
    decode_s = h100.step_s(64)
    # 256 prompt tokens made the step 0.0128 s longer: 0.0128 / 256 = 5e-5 s per prompt token.
    h100.observe_step(64, decode_s + 0.0128, prefill_tok=256)
    assert h100.prefill_s_per_tok == pytest.approx(5e-5, rel=1e-9)
    assert h100.step_s(64) == decode_s  # a prefill step does not teach the decode curve
    # Then EWMA with alpha 0.1: 1e-4 per token -> 5e-5 + 0.1 x 5e-5 = 5.5e-5.
    h100.observe_step(64, decode_s + 0.0256, prefill_tok=256)
    assert h100.prefill_s_per_tok == pytest.approx(5.5e-5, rel=1e-9)
    # Too few prompt tokens to measure, or a step no longer than decode alone: ignored.
    h100.observe_step(64, decode_s + 0.01, prefill_tok=8)
    h100.observe_step(64, decode_s * 0.9, prefill_tok=512)
    assert h100.prefill_s_per_tok == pytest.approx(5.5e-5, rel=1e-9)


def test_meaningless_steps_are_ignored(h100):
    before = h100.snapshot()
    h100.observe_step(0, 0.01)
    h100.observe_step(8, 0.0)
    h100.observe_step(8, float("nan"))
    assert h100.snapshot() == before


# -- choose_batch without a power cap --------------------------------------------------------------


def test_no_slo_picks_the_fewest_joules_per_token_the_largest_batch(h100):
    d = choose(h100)
    assert d.batch_cap == 512  # 0.07016 J/token, the lowest on the curve
    assert d.duty == 1.0 and d.token_budget == MAX_TOKENS
    assert d.predicted_power_w == pytest.approx(688.0, rel=1e-12)
    assert d.predicted_j_per_tok == pytest.approx(688.0 * 0.0522129 / 512, rel=1e-12)  # 0.070161
    assert d.reason == "fewest J/token (no TPOT target)"


def test_a_tpot_target_picks_the_largest_batch_whose_step_fits_with_the_p99_margin(h100):
    assert P99_MARGIN == 1.25
    # 50 ms: mean step must be <= 40 ms. 256 (28.4 ms) fits, 512 (52.2 ms) does not.
    d = choose(h100, Slo(tpot_s=0.050))
    assert d.batch_cap == 256 and d.reason == "fewest J/token meeting TPOT 50 ms"
    # 18.2 ms: batch 128's mean step (18.19 ms) is under it, but not with the margin
    # (18.19 x 1.25 = 22.7 ms), so 64 (12.4 x 1.25 = 15.5 ms).
    assert choose(h100, Slo(tpot_s=0.0182)).batch_cap == 64
    # 22.8 ms clears 128's 22.74 ms.
    assert choose(h100, Slo(tpot_s=0.0228)).batch_cap == 128


def test_when_no_batch_fits_the_tpot_target_the_smallest_runs_and_the_reason_says_so(h100):
    d = choose(h100, Slo(tpot_s=0.005))  # batch 1: 7.48 ms x 1.25 = 9.3 ms > 5 ms
    assert d.batch_cap == 1
    assert d.reason == "no batch meets TPOT: smallest"


def test_the_batch_cap_never_exceeds_max_num_seqs(h100):
    # 48 is not a bucket: it becomes a candidate and, with the lowest J/token below it, wins.
    assert choose(h100, max_num_seqs=48).batch_cap == 48
    for max_num_seqs in (1, 3, 5, 48, 100, 256, 300, 512):
        for cap_w in (None, 150.0, 400.0, 600.0):
            d = choose(h100, max_num_seqs=max_num_seqs, power_cap_w=cap_w)
            assert 1 <= d.batch_cap <= max_num_seqs, (max_num_seqs, cap_w, d)


def test_an_empty_curve_gives_the_configured_maxima():
    curve = EnergyCurve.from_profile(None, max_batch=64, idle_w=40.0, busy_w=120.0)
    d = choose(curve, Slo(ttft_s=2.0, tpot_s=0.25), max_num_seqs=64, max_num_batched_tokens=2048)
    assert (d.batch_cap, d.token_budget, d.duty) == (64, 2048, 1.0)
    assert d.predicted_power_w is None and d.predicted_j_per_tok is None
    assert "no curve yet" in d.reason
    # Under a cap it already knows the duty from the configured powers: (80 - 40) / (120 - 40).
    assert choose(curve, power_cap_w=80.0, max_num_seqs=64).duty == 0.5


# -- choose_batch under a power cap -----------------------------------------------------------------


def test_duty_for_cap():
    assert duty_for_cap(80.0, busy_w=120.0, idle_w=40.0) == 0.5  # 40 + 80 x 0.5 = 80
    assert duty_for_cap(200.0, busy_w=120.0, idle_w=40.0) == 1.0  # not binding
    assert duty_for_cap(30.0, busy_w=120.0, idle_w=40.0) == MIN_DUTY  # below idle: the floor, not < 0
    assert duty_for_cap(80.0, busy_w=40.0, idle_w=40.0) == 1.0  # no dynamic range to cut


def test_a_power_cap_picks_the_most_tokens_per_second_within_it(h100):
    # Cap 600 W, idle 100 W: batch b runs at duty (600 - 100) / (P(b) - 100), rate = duty x b / step(b):
    #   128: 0.8795 x 7037 = 6189 tok/s   256: 0.8460 x 9010 = 7623   512: 0.8503 x 9806 = 8339.
    d = choose(h100, power_cap_w=600.0)
    assert d.batch_cap == 512
    assert d.duty == pytest.approx(500.0 / 588.0, rel=1e-12)  # 0.85034
    assert d.predicted_power_w == pytest.approx(600.0, rel=1e-12)  # exactly the cap
    assert d.reason == "power cap 600 W: most tokens/s within it"
    # With TPOT 50 ms too: 512 at duty 0.85 spaces tokens 52.2 x 1.25 / 0.85 = 76.8 ms apart; 256
    # at duty 500 / 591 = 0.846 spaces them 28.4 x 1.25 / 0.846 = 42.0 ms: it wins.
    d = choose(h100, Slo(tpot_s=0.050), power_cap_w=600.0)
    assert d.batch_cap == 256 and d.duty == pytest.approx(500.0 / 591.0, rel=1e-12)
    assert d.predicted_power_w == pytest.approx(600.0, rel=1e-12)


def test_a_cap_below_every_batchs_busy_power_gives_a_duty_below_one(h100):
    d = choose(h100, power_cap_w=300.0)  # even batch 1 draws 486 W busy
    assert d.duty < 1.0
    assert d.batch_cap == 512 and d.duty == pytest.approx(200.0 / 588.0, rel=1e-12)
    assert d.predicted_power_w == pytest.approx(300.0, rel=1e-12)


def test_the_modeled_cpu_cap_halves_the_duty_exactly():
    # Modeled CPU: busy 120 W, idle 40 W, cap 80 W -> duty (80 - 40) / (120 - 40) = 0.5 at every batch.
    curve = EnergyCurve(max_batch=4, idle_w=40.0, busy_w=120.0)
    for batch, step_s in ((1, 0.10), (2, 0.12), (4, 0.16)):
        curve.observe_step(batch, step_s)
    d = choose(curve, power_cap_w=80.0, max_num_seqs=4, max_num_batched_tokens=512)
    assert d.duty == 0.5
    assert d.predicted_power_w == 80.0
    assert d.batch_cap == 4  # 0.5 x 4 / 0.16 = 12.5 tok/s beats 0.5 x 2 / 0.12 = 8.3
    assert d.predicted_j_per_tok == pytest.approx(80.0 / 12.5, rel=1e-12)  # 6.4 J/token


def test_under_a_cap_tpot_yields_when_no_option_meets_it(h100):
    d = choose(h100, Slo(tpot_s=0.005), power_cap_w=600.0)
    assert d.batch_cap == 512 and d.predicted_power_w == pytest.approx(600.0, rel=1e-12)
    assert d.reason.endswith("(TPOT yields to the cap)")


# -- the token budget --------------------------------------------------------------------------------


def test_the_token_budget_leaves_a_prefill_chunk_that_fits_the_tpot_target(h100):
    h100.prefill_s_per_tok = 5e-5
    slo = Slo(ttft_s=2.0, tpot_s=0.050)
    d = choose(h100, slo)
    # Batch 256 (28.41 ms); spare = 50 / 1.25 - 28.41 = 11.587 ms -> int(11.587 / 0.05) = 231 prompt
    # tokens -> 256 + 231 = 487.
    assert d.batch_cap == 256 and d.token_budget == 487
    chunk = d.token_budget - d.batch_cap
    assert (h100.step_s(256) + chunk * 5e-5) * P99_MARGIN <= 0.050
    # A request that has waited more than half its TTFT target gets the configured maximum.
    assert choose(h100, slo, oldest_wait_s=0.9).token_budget == 487
    assert choose(h100, slo, oldest_wait_s=1.01).token_budget == MAX_TOKENS


def test_the_token_budget_always_carries_the_minimum_prefill_chunk(h100):
    h100.prefill_s_per_tok = 5e-5
    # Batch 256 with TPOT 36 ms: spare 28.8 - 28.41 = 0.39 ms -> 7 tokens, below the 32 minimum.
    d = choose(h100, Slo(tpot_s=0.036))
    assert d.batch_cap == 256 and d.token_budget == 256 + MIN_PREFILL_CHUNK


def test_the_token_budget_never_exceeds_max_num_batched_tokens(h100):
    h100.prefill_s_per_tok = 5e-5
    # vLLM allows max_num_batched_tokens == max_num_seqs; the minimum prefill chunk must not push the
    # budget past the configured maximum (runtime caps only ever go below it, DESIGN.md §2).
    d = choose(h100, Slo(tpot_s=0.036), max_num_seqs=256, max_num_batched_tokens=256)
    assert d.batch_cap == 256
    assert d.token_budget <= 256, (
        f"BUG factory/policy/batch.py _token_budget: token_budget {d.token_budget} > max_num_batched_tokens 256 "
        "(max(batch + MIN_PREFILL_CHUNK, ...) is not clamped to the maximum)"
    )
