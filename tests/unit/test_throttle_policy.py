"""The throttle policy: budgets are split by cutting the least efficient replica first, each down
to its floor; admission levels rise at once and fall only after a hold clear of a hysteresis band,
so a ratio hovering at a threshold cannot flap; the duty controller holds a simulated engine's
power at its cap even when the energy curve is wrong, without winding up while the cap is loose.

Replicas here draw idle 100 W and demand 300 W unless a test says otherwise, so each one's floor is
idle + 5 % of the dynamic range = 100 + 0.05 x 200 = 110 W.
"""

from __future__ import annotations

import pytest

from factory.policy.batch import duty_for_cap
from factory.policy.throttle import (
    FLOOR_DYNAMIC_SHARE,
    MAX_RATIO,
    Admission,
    Budgets,
    DutyController,
    ReplicaPower,
    ThrottlePolicy,
    allocate,
    floor_w,
)


def rep(name: str, tpj: float | None, *, node: str = "n1", demand_w: float = 300.0, idle_w: float = 100.0,
        devices: int = 1) -> ReplicaPower:  # fmt: skip
    return ReplicaPower(name, node, power_w=demand_w, demand_w=demand_w, idle_w=idle_w, tokens_per_joule=tpj,
                        devices=devices)  # fmt: skip


# One replica idle 100 W, demand 1100 W: floor 150 W, dynamic range above it 950 W, so a site budget
# of 150 + 950 x r gives the ratio r.
BIG = rep("big", 1.0, demand_w=1100.0)


def site_for(ratio: float) -> Budgets:
    return Budgets(site_w=150.0 + 950.0 * ratio)


# -- allocate ------------------------------------------------------------------------------------------


def test_the_floor_is_idle_plus_a_share_of_the_dynamic_range():
    assert FLOOR_DYNAMIC_SHARE == 0.05
    assert floor_w(rep("a", 1.0)) == pytest.approx(110.0)
    assert floor_w(rep("a", 1.0, demand_w=50.0)) == 100.0  # demand below idle: idle


def test_no_cut_when_demand_fits_the_budget():
    limits, state = allocate([rep("a", 2.0), rep("b", 1.0)], {}, 700.0)
    assert limits == {"a": 300.0, "b": 300.0}
    # (700 - 220) / (600 - 220): above 1, the budget's headroom
    assert state.ratio == pytest.approx(480 / 380) and state.demand_w == 600.0 and state.floor_w == pytest.approx(220.0)


def test_the_least_efficient_replica_is_cut_first():
    # Demand 600 W, budget 500 W: the 100 W excess comes off b (1 token/J) alone.
    limits, state = allocate([rep("a", 2.0), rep("b", 1.0)], {}, 500.0)
    assert limits == pytest.approx({"a": 300.0, "b": 200.0})
    assert state.ratio == pytest.approx((500.0 - 220.0) / 380.0)  # 0.7368


def test_the_cut_goes_to_the_floor_then_to_the_next_replica():
    # Budget 300 W: excess 300 W; b gives 190 W (300 -> its floor 110), a the other 110 W (300 -> 190).
    limits, state = allocate([rep("a", 2.0), rep("b", 1.0)], {}, 300.0)
    assert limits == pytest.approx({"a": 190.0, "b": 110.0})
    assert state.ratio == pytest.approx(80.0 / 380.0)  # 0.2105
    # A budget below the floors leaves every replica at its floor (they must keep stepping): ratio 0.
    limits, state = allocate([rep("a", 2.0), rep("b", 1.0)], {}, 100.0)
    assert limits == pytest.approx({"a": 110.0, "b": 110.0})
    assert state.ratio == 0.0


def test_unknown_efficiency_counts_as_the_least():
    limits, _ = allocate([rep("a", 2.0), rep("b", 1.0), rep("c", None)], {}, 800.0)
    assert limits == pytest.approx({"a": 300.0, "b": 300.0, "c": 200.0})


def test_earlier_limits_lower_what_a_replica_wants():
    # a was already limited to 200 W by a tighter scope: it wants 200, the total is 500 -> no cut.
    limits, state = allocate([rep("a", 2.0), rep("b", 1.0)], {"a": 200.0, "x": 42.0}, 500.0)
    assert limits == {"a": 200.0, "b": 300.0, "x": 42.0}  # replicas outside the scope keep theirs
    assert state.ratio == 1.0 and state.demand_w == 500.0


# -- budgets at each scope ---------------------------------------------------------------------------


def test_budgets_round_trip_through_dicts():
    doc = {"site_w": 30000.0, "node_w": None, "gpu_w": 500.0, "nodes": {"n1": 4000.0}, "replicas": {"r1": 450.0}}
    assert Budgets.from_dict(doc).to_dict() == doc
    assert Budgets.from_dict({}) == Budgets() and not Budgets().any()
    assert Budgets(nodes={"n1": 1.0}).any() and Budgets(gpu_w=1.0).any()


def test_a_per_gpu_budget_scales_with_the_replicas_devices():
    policy = ThrottlePolicy()
    two = rep("two", 1.0, demand_w=500.0, devices=2)  # floor 100 + 0.05 x 400 = 120 W
    one = rep("one", 1.0, demand_w=150.0)
    d = policy.decide([two, one], Budgets(gpu_w=200.0), now_s=0.0)
    assert d.controls["two"].power_cap_w == pytest.approx(400.0)  # 200 W x 2 GPUs
    assert d.controls["one"].power_cap_w is None  # 150 W fits its 200 W
    assert [s.scope for s in d.scopes] == ["replica:two", "replica:one"]
    assert d.ratio == pytest.approx((400.0 - 120.0) / 380.0)  # 0.7368: below slow_below
    assert d.controls["two"].level == 2 and d.controls["two"].reason == "replica:two budget 400 W below demand"
    # A replica's own budget applies when it is tighter than its GPUs'.
    d = ThrottlePolicy().decide([two], Budgets(gpu_w=200.0, replicas={"two": 350.0}), now_s=0.0)
    assert d.controls["two"].power_cap_w == pytest.approx(350.0)


def test_node_budgets_split_each_nodes_replicas():
    a, b, c = rep("a", 2.0), rep("b", 1.0), rep("c", 1.0, node="n2")
    d = ThrottlePolicy().decide([a, b, c], Budgets(node_w=500.0), now_s=0.0)
    assert d.controls["a"].power_cap_w is None
    assert d.controls["b"].power_cap_w == pytest.approx(200.0)
    assert d.controls["c"].power_cap_w is None  # n2 demands 300 W of its 500
    assert [s.scope for s in d.scopes] == ["node:n1", "node:n2"]
    # A node's own budget replaces node_w for that node.
    d = ThrottlePolicy().decide([a, b, c], Budgets(node_w=500.0, nodes={"n2": 200.0}), now_s=0.0)
    assert d.controls["c"].power_cap_w == pytest.approx(200.0)
    assert d.controls["c"].reason == "node:n2 budget 200 W below demand"


def test_the_site_budget_splits_across_nodes():
    a, b, c = rep("a", 3.0), rep("b", 1.0), rep("c", 2.0, node="n2")
    d = ThrottlePolicy().decide([a, b, c], Budgets(site_w=600.0), now_s=0.0)
    # Excess 300 W: b (1 tok/J) gives 190 W, then c (2 tok/J) 110 W; a (3 tok/J) is not touched.
    caps = {name: c.power_cap_w for name, c in d.controls.items()}
    assert caps == pytest.approx({"a": None, "b": 110.0, "c": 190.0})
    assert [s.scope for s in d.scopes] == ["site"]


def test_no_budget_no_caps_level_zero():
    d = ThrottlePolicy().decide([rep("a", 1.0)], Budgets(), now_s=0.0)
    assert d.ratio == MAX_RATIO and d.scopes == []
    assert d.controls["a"].power_cap_w is None and d.controls["a"].level == 0
    assert d.admission == Admission(0)


# -- levels and hysteresis -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "level"),
    [(1.0, 0), (0.99, 1), (0.76, 1), (0.74, 2), (0.51, 2), (0.49, 3), (0.0, 3)],
)
def test_levels_by_ratio(ratio, level):
    d = ThrottlePolicy().decide([BIG], site_for(ratio), now_s=0.0)
    assert d.ratio == pytest.approx(ratio)
    assert d.admission.level == level
    assert d.controls["big"].level == level


def test_admission_classes_low_slowed_at_two_and_shed_at_three():
    slowed = ThrottlePolicy(retry_after_s=7).decide([BIG], site_for(0.6), now_s=0.0).admission
    assert (slowed.level, slowed.slowed, slowed.shed) == (2, ("low",), ())
    assert slowed.reason == "site budget 720 W below demand: low priority slowed"
    shed = ThrottlePolicy(retry_after_s=7).decide([BIG], site_for(0.3), now_s=0.0).admission
    assert (shed.level, shed.slowed, shed.shed) == (3, (), ("low",))
    assert shed.to_dict() == {"level": 3, "name": "shed", "slowed": [], "shed": ["low"], "retry_after_s": 7,
                              "reason": "site budget 435 W below demand: low priority shed"}  # fmt: skip
    capped = ThrottlePolicy().decide([BIG], site_for(0.9), now_s=0.0).admission
    assert (capped.level, capped.slowed, capped.shed) == (1, (), ())


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        ThrottlePolicy(slow_below=0.5, shed_below=0.75)


def test_levels_rise_at_once_and_fall_only_after_the_hold_clear_of_the_band():
    policy = ThrottlePolicy(hold_s=5.0, hysteresis=0.05)
    assert policy.decide([BIG], site_for(0.4), now_s=0.0).admission.level == 3  # at once
    # 0.6 clears the shed threshold 0.5 by more than the 0.05 band; the hold starts at t = 1.
    assert policy.decide([BIG], site_for(0.6), now_s=1.0).admission.level == 3
    assert policy.decide([BIG], site_for(0.6), now_s=5.9).admission.level == 3
    # Held 5 s: down to what 0.6 calls for with the band (0.6 < 0.75 + 0.05): slowed.
    assert policy.decide([BIG], site_for(0.6), now_s=6.0).admission.level == 2
    # Back at 0.3: up at once.
    assert policy.decide([BIG], site_for(0.3), now_s=6.5).admission.level == 3


def test_a_ratio_inside_the_band_restarts_the_hold():
    policy = ThrottlePolicy(hold_s=5.0, hysteresis=0.05)
    policy.decide([BIG], site_for(0.4), now_s=0.0)
    policy.decide([BIG], site_for(0.6), now_s=1.0)  # hold starts
    policy.decide([BIG], site_for(0.52), now_s=4.0)  # inside the band: restart
    assert policy.decide([BIG], site_for(0.6), now_s=6.5).admission.level == 3  # 2.5 s into a new hold
    assert policy.decide([BIG], site_for(0.6), now_s=11.4).admission.level == 3
    assert policy.decide([BIG], site_for(0.6), now_s=11.5).admission.level == 2


@pytest.mark.parametrize(("low", "high", "level"), [(0.74, 0.76, 2), (0.49, 0.51, 3), (0.99, 0.999, 1)])
def test_a_ratio_hovering_at_a_threshold_does_not_flap(low, high, level):
    policy = ThrottlePolicy(hold_s=5.0, hysteresis=0.05)
    levels = [policy.decide([BIG], site_for(low if i % 2 == 0 else high), now_s=0.5 * i).admission.level
              for i in range(60)]  # fmt: skip
    assert set(levels) == {level}, levels


def test_level_one_falls_to_normal_once_the_budget_covers_demand():
    # Capped (level 1) by a tight budget, then the operator lifts the budget above the demand: the
    # budget no longer binds (ratio 1.0) and after hold_s the level must return to 0.
    policy = ThrottlePolicy(hold_s=5.0, hysteresis=0.05)
    assert policy.decide([BIG], site_for(0.9), now_s=0.0).admission.level == 1
    levels = [policy.decide([BIG], Budgets(site_w=2000.0), now_s=t).admission.level for t in range(1, 20)]
    assert levels[-1] == 0, (
        "BUG factory/policy/throttle.py ThrottlePolicy._level_for: level 1 never falls; its threshold 1.0 + "
        f"hysteresis 0.05 = 1.05 cannot be cleared since allocate() caps the ratio at 1.0 (levels {levels})"
    )


def test_level_two_falls_to_normal_once_the_budget_covers_demand():
    policy = ThrottlePolicy(hold_s=5.0, hysteresis=0.05)
    policy.decide([BIG], site_for(0.6), now_s=0.0)
    d = None
    for t in range(1, 20):
        d = policy.decide([BIG], Budgets(site_w=2000.0), now_s=float(t))
    assert d.controls["big"].power_cap_w is None and d.controls["big"].level == 0
    assert d.admission.level == 0, (
        "BUG factory/policy/throttle.py ThrottlePolicy._level_for: from slowed the level steps down to 1 and "
        f"sticks there (ratio 1.0 never clears 1.0 + hysteresis): admission {d.admission}"
    )


# -- the duty controller -------------------------------------------------------------------------------


def simulate(ctrl: DutyController, *, cap_w: float, true_busy_w: float, curve_busy_w: float, idle_w: float,
             updates: int, start_duty: float = 1.0) -> list[float]:  # fmt: skip
    """A modeled engine: power = idle + (true busy - idle) x the duty it ran at over the last window.
    The controller is told the curve's busy power, which may be wrong. Returns the measured powers.
    `start_duty`: what the engine ran at before the first update (1.0: unthrottled when the cap arrives)."""
    feed_forward = duty_for_cap(cap_w, curve_busy_w, idle_w)
    measured = []
    duty = start_duty
    for _ in range(updates):
        power_w = idle_w + (true_busy_w - idle_w) * duty
        measured.append(power_w)
        duty = ctrl.update(cap_w, power_w, feed_forward, curve_busy_w, idle_w)
    return measured


def test_the_duty_controller_converges_on_a_wrong_curve():
    # The curve says 100 W busy, the engine draws 120 W: feed-forward (80 - 40) / 60 = 0.667 would
    # give 93.3 W; the integral must bring it to duty 0.5. Error shrinks x (1 - 0.3 x 80 / 60) = 0.6
    # per update: 120, 77.33, 78.4, 79.04, 79.42, ...
    ctrl = DutyController()
    measured = simulate(ctrl, cap_w=80.0, true_busy_w=120.0, curve_busy_w=100.0, idle_w=40.0, updates=15)
    assert measured[:3] == pytest.approx([120.0, 77.3333, 78.4], rel=1e-4)
    errors = [abs(m - 80.0) for m in measured[1:]]
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[4] < 0.8  # within 1 % of the cap after 6 updates
    assert errors[-1] < 0.01
    assert ctrl.duty == pytest.approx(0.5, abs=1e-3)


def test_the_duty_controller_damps_an_overshoot():
    # The curve underestimates the dynamic range almost 4x (busy 100 W, really 270 W): each update
    # overcorrects (factor 1 - 0.3 x 230 / 60 = -0.15), so the error alternates in sign, but it shrinks.
    ctrl = DutyController()
    measured = simulate(ctrl, cap_w=80.0, true_busy_w=270.0, curve_busy_w=100.0, idle_w=40.0, updates=12)
    errors = [m - 80.0 for m in measured[1:]]
    assert any(a < 0 < b or b < 0 < a for a, b in zip(errors, errors[1:], strict=False)), errors  # it overshoots
    amplitudes = [abs(e) for e in errors]
    assert all(b < a for a, b in zip(amplitudes, amplitudes[1:], strict=False) if a > 1e-9), amplitudes
    assert amplitudes[5] < 0.01
    assert ctrl.duty == pytest.approx(40.0 / 230.0, rel=1e-3)


def test_a_right_curve_needs_no_correction():
    # Feed-forward (80 - 40) / (120 - 40) = 0.5 is right: running at it, the integral stays at 0.
    ctrl = DutyController()
    measured = simulate(ctrl, cap_w=80.0, true_busy_w=120.0, curve_busy_w=120.0, idle_w=40.0, updates=10,
                        start_duty=0.5)  # fmt: skip
    assert set(measured) == {80.0}
    assert (ctrl.correction, ctrl.duty) == (0.0, 0.5)


def test_the_duty_controller_does_not_wind_up_while_the_cap_is_loose():
    ctrl = DutyController()
    # Cap 200 W over an engine drawing 120 W, for a long time: duty 1, no integral stored.
    measured = simulate(ctrl, cap_w=200.0, true_busy_w=120.0, curve_busy_w=100.0, idle_w=40.0, updates=200)
    assert set(measured) == {120.0} and ctrl.duty == 1.0
    assert ctrl.correction == 0.0
    # Then the cap drops to 80 W: the first update acts like a fresh controller's would:
    # 0.667 + 0.3 x (80 - 120) / 60 = 0.4667.
    fresh = DutyController()
    ff = duty_for_cap(80.0, 100.0, 40.0)
    assert ctrl.update(80.0, 120.0, ff, 100.0, 40.0) == pytest.approx(fresh.update(80.0, 120.0, ff, 100.0, 40.0))
    assert ctrl.duty == pytest.approx(0.46667, rel=1e-4)


def test_pause_makes_computing_time_over_wall_time_the_duty():
    ctrl = DutyController()
    assert ctrl.pause_s(0.1) == 0.0  # duty 1
    ctrl.update(80.0, 80.0, 0.25, 200.0, 40.0)  # no error: duty = feed-forward 0.25
    assert ctrl.duty == 0.25
    assert ctrl.pause_s(0.1) == pytest.approx(0.3)  # 0.1 / (0.1 + 0.3) = 0.25
    ctrl.reset()
    assert (ctrl.duty, ctrl.correction, ctrl.pause_s(0.1)) == (1.0, 0.0, 0.0)
