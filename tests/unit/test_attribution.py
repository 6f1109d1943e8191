"""Energy attribution: every interval's measured energy is booked to idle or to requests by their
step time and weighted token work, and nothing is lost or made up (attributed + idle == measured)."""

from __future__ import annotations

import random

import pytest

from factory.policy.attribution import EnergyAttributor, StepWork

DECODE1 = StepWork(prefill_tok=0, decode_tok=1)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_idle_only_interval_with_known_idle_power_is_all_idle():
    att = EnergyAttributor(idle_power_w=50.0)
    first = att.observe(0.0, 1000.0)
    assert (first.idle_j, first.by_request_j, first.interval_s) == (0.0, {}, 0.0)
    split = att.observe(1.0, 1050.0)
    assert split.idle_j == 50.0 and split.by_request_j == {} and split.busy_s == 0.0 and split.interval_s == 1.0
    assert att.totals.idle_j == 50.0 and att.totals.observed_j == 50.0 and att.totals.attributed_j == 0.0


def test_step_energy_is_split_by_weighted_token_work():
    # a: one decode token (work 1); b: ten prefill tokens at weight 0.3 (work 3).
    att = EnergyAttributor(prefill_weight=0.3, decode_weight=1.0, idle_power_w=50.0)
    att.observe(1.0, 0.0)
    att.begin_step(1.0, {"a": DECODE1, "b": StepWork(prefill_tok=10, decode_tok=0)})
    att.end_step(1.5)
    split = att.observe(2.0, 125.0)  # 0.5 s idle at 50 W = 25 J; the step gets the other 100 J
    assert split.idle_j == approx(25.0)
    assert split.by_request_j == {"a": approx(25.0), "b": approx(75.0)}
    assert split.busy_s == approx(0.5)
    assert att.request_busy_s("a") == approx(0.125) and att.request_busy_s("b") == approx(0.375)


def test_steps_straddling_readings_are_paid_in_each_interval_by_overlap():
    att = EnergyAttributor()  # idle power unknown: idle and steps share by time
    att.observe(0.0, 0.0)
    att.begin_step(0.2, {"a": DECODE1})
    att.end_step(0.6)
    att.begin_step(0.6, {"b": DECODE1})
    att.end_step(1.2)  # ends after the next reading: its last 0.2 s belong to the interval after
    split = att.observe(1.0, 100.0)
    assert split.idle_j == approx(20.0) and split.by_request_j == {"a": approx(40.0), "b": approx(40.0)}
    split = att.observe(1.5, 130.0)  # 0.2 s of b, 0.3 s idle
    assert split.idle_j == approx(18.0) and split.by_request_j == {"b": approx(12.0)}
    assert att.request_energy_j("a") == approx(40.0) and att.request_energy_j("b") == approx(52.0)
    assert att.request_busy_s("b") == approx(0.6)


def test_open_step_is_paid_up_to_the_reading_and_keeps_the_rest():
    att = EnergyAttributor(idle_power_w=20.0)
    att.observe(0.0, 0.0)
    att.begin_step(0.5, {"a": DECODE1})
    split = att.observe(1.0, 100.0)
    assert split.busy_s == approx(0.5) and split.idle_j == approx(10.0) and split.by_request_j == {"a": approx(90.0)}
    att.end_step(1.25)
    split = att.observe(2.0, 200.0)
    assert split.busy_s == approx(0.25) and split.idle_j == approx(15.0) and split.by_request_j == {"a": approx(85.0)}
    assert att.request_energy_j("a") == approx(175.0) and att.request_busy_s("a") == approx(0.75)


def test_zero_delta_readings_then_a_jump_conserve_energy():
    # NVML's counter moves about every 100 ms: two flat readings, then the whole delta at once.
    att = EnergyAttributor(idle_power_w=0.0)
    att.observe(0.0, 5.0)
    for i, (rid, energy_j) in enumerate([("a", 5.0), ("b", 5.0), ("c", 35.0)]):
        att.begin_step(0.125 * i, {rid: DECODE1})
        att.end_step(0.125 * (i + 1))
        split = att.observe(0.125 * (i + 1), energy_j)
        assert split.idle_j + sum(split.by_request_j.values()) == approx(split.energy_j)
    assert att.request_energy_j("a") == 0.0 and att.request_energy_j("b") == 0.0
    assert att.request_energy_j("c") == approx(30.0)
    # A reading at the same instant has no time to split by: its delta is idle.
    split = att.observe(0.375, 36.0)
    assert (split.idle_j, split.by_request_j, split.interval_s, split.energy_j) == (1.0, {}, 0.0, 1.0)
    totals = att.totals
    assert totals.observed_j == 31.0 and totals.idle_j == 1.0 and totals.attributed_j == approx(30.0)


def test_idle_power_is_split_by_time_until_learnt_then_learnt_from_idle_only_intervals():
    att = EnergyAttributor(idle_ewma_alpha=0.2)
    att.observe(0.0, 0.0)
    att.begin_step(0.5, {"a": DECODE1})
    att.end_step(1.0)
    split = att.observe(1.0, 100.0)  # not learnt: half the time idle, half the energy idle
    assert att.idle_power_w is None
    assert split.idle_j == approx(50.0) and split.by_request_j == {"a": approx(50.0)}
    split = att.observe(2.0, 140.0)  # no step at all: 40 W is idle power
    assert split.idle_j == 40.0 and att.idle_power_w == approx(40.0)
    att.begin_step(2.0, {"a": DECODE1})
    att.end_step(2.5)
    split = att.observe(3.0, 220.0)  # 0.5 s idle at the learnt 40 W = 20 J; the step gets 60 J
    assert split.idle_j == approx(20.0) and split.by_request_j == {"a": approx(60.0)}
    att.observe(4.0, 280.0)  # 60 W idle-only: EWMA 40 + 0.2 * (60 - 40)
    assert att.idle_power_w == approx(44.0)


def test_known_idle_power_is_not_relearnt_and_caps_at_the_delta():
    att = EnergyAttributor(idle_power_w=100.0)
    att.observe(0.0, 0.0)
    att.observe(1.0, 30.0)
    assert att.idle_power_w == 100.0
    att.begin_step(1.0, {"a": DECODE1})
    att.end_step(1.5)
    split = att.observe(2.0, 60.0)  # 0.5 s at 100 W would be 50 J > 30 J measured: all idle
    assert split.idle_j == 30.0 and split.by_request_j == {"a": 0.0}


def test_zero_work_step_splits_evenly_and_requestless_step_is_idle():
    att = EnergyAttributor(prefill_weight=0.0, decode_weight=0.0, idle_power_w=0.0)
    att.observe(0.0, 0.0)
    att.begin_step(0.0, {"a": DECODE1, "b": DECODE1})
    att.end_step(0.5)
    att.begin_step(0.5, {})
    att.end_step(1.0)
    split = att.observe(1.0, 80.0)  # idle power 0 W: all 80 J to the step with requests
    assert split.busy_s == 0.5
    assert split.by_request_j == {"a": approx(40.0), "b": approx(40.0)}
    # A requestless step is idle time, but not idle power: the learner must not use it.
    learner = EnergyAttributor()
    learner.observe(0.0, 0.0)
    learner.begin_step(0.0, {})
    learner.end_step(1.0)
    split = learner.observe(1.0, 300.0)
    assert split.idle_j == 300.0 and split.busy_s == 0.0 and learner.idle_power_w is None


def test_finish_returns_cumulative_and_forgets():
    att = EnergyAttributor(idle_power_w=0.0)
    att.observe(0.0, 0.0)
    att.begin_step(0.0, {"a": DECODE1, "b": StepWork(0, 3)})
    att.end_step(1.0)
    att.observe(1.0, 40.0)
    att.begin_step(1.0, {"a": DECODE1})
    att.end_step(2.0)
    att.observe(2.0, 60.0)
    assert att.finish("a") == (approx(30.0), approx(1.25))
    assert att.finish("a") == (0.0, 0.0)
    assert att.request_energy_j("a") == 0.0 and att.request_busy_s("a") == 0.0
    assert att.finish("never-seen") == (0.0, 0.0)
    # Energy of a step that is still open when its request is finished stays in the split (and the
    # totals) but does not bring the forgotten request back.
    att.begin_step(2.0, {"b": DECODE1})
    att.finish("b")
    split = att.observe(3.0, 70.0)
    assert split.by_request_j == {"b": approx(10.0)} and att.request_energy_j("b") == 0.0
    assert att.totals.attributed_j == approx(70.0)


def test_contract_violations_are_rejected():
    att = EnergyAttributor()
    att.observe(1.0, 10.0)
    with pytest.raises(ValueError, match="backwards"):
        att.observe(2.0, 9.0)
    with pytest.raises(ValueError, match="before the previous"):
        att.observe(0.5, 10.0)
    att.begin_step(1.0, {"a": DECODE1})
    with pytest.raises(AssertionError):
        att.begin_step(1.1, {"b": DECODE1})
    att.end_step(1.2)
    with pytest.raises(AssertionError):
        att.end_step(1.3)
    with pytest.raises(ValueError):
        StepWork(-1, 0)


@pytest.mark.parametrize("idle_power_w", [None, 35.0])
def test_conservation_on_a_random_timeline(idle_power_w):
    rng = random.Random(20261126)
    events: list[tuple[float, int, object]] = []  # (time, order at equal time, payload)
    t = 0.0
    for _ in range(10_000):
        if rng.random() < 0.3:
            t += rng.expovariate(1 / 0.05)  # idle gap
        n_req = rng.choice([0, 1, 1, 2, 4, 8])
        work = {
            f"r{rng.randrange(200)}": StepWork(rng.choice([0, 0, 16, 512]), rng.choice([0, 1])) for _ in range(n_req)
        }
        dur = rng.uniform(0.001, 0.08)
        events.append((t, 1, ("begin", work)))
        events.append((t + dur, 0, ("end", None)))
        t += dur
    reading_t, energy = 0.0, 0.0
    while reading_t < t + 0.2:
        energy += rng.choice([0.0, 0.0, rng.uniform(0, 60)])  # stale counter, then jumps
        events.append((reading_t, 2, ("observe", energy)))
        reading_t += rng.choice([0.0, rng.uniform(0.0, 0.15)])
    events.sort(key=lambda e: (e[0], e[1]))

    att = EnergyAttributor(idle_power_w=idle_power_w)
    e_prev = None
    n_observed = 0
    for ts, _, (kind, payload) in events:
        if kind == "begin":
            att.begin_step(ts, payload)
        elif kind == "end":
            att.end_step(ts)
        else:
            split = att.observe(ts, payload)
            if e_prev is not None:
                delta = payload - e_prev
                assert split.energy_j == delta
                booked = split.idle_j + sum(split.by_request_j.values())
                assert booked == pytest.approx(delta, rel=1e-9, abs=1e-9)
                assert min(split.by_request_j.values(), default=0.0) >= 0.0 and split.idle_j >= 0.0
                assert split.busy_s <= split.interval_s + 1e-12
                n_observed += 1
            e_prev = payload
    assert n_observed > 1000
    totals = att.totals
    first_energy = next(e[2][1] for e in events if e[2][0] == "observe")
    assert totals.observed_j == pytest.approx(e_prev - first_energy, rel=1e-12)
    assert totals.idle_j + totals.attributed_j == pytest.approx(totals.observed_j, rel=1e-9)
    assert totals.attributed_j > 0 and totals.idle_j > 0
    per_request = sum(att.finish(f"r{i}")[0] for i in range(200))
    assert per_request == pytest.approx(totals.attributed_j, rel=1e-9)
