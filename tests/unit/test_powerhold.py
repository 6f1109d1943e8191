"""The budget-hold measure: exact averages from an energy counter read at uneven times, the 10 s mean
against ±5 % and every one-second sample against ±10 %."""

from __future__ import annotations

import pytest

from factory.bench.powerhold import average_w, energy_at, hold


def _counter(power_at, t0: float, t1: float, dt: float = 0.13) -> list[tuple[float, float]]:
    """Readings of a counter integrating power_at(t) (piecewise constant per 0.01 s), every dt."""
    out, joules, t = [(t0, 0.0)], 0.0, t0
    next_read = t0 + dt
    while t < t1:
        joules += power_at(t) * 0.01
        t = round(t + 0.01, 6)
        if t >= next_read:
            out.append((t, joules))
            next_read += dt
    return out


def test_average_power_is_exact_between_uneven_readings():
    readings = _counter(lambda t: 50.0, 0.0, 20.0)
    assert average_w(readings, 3.05, 13.05) == pytest.approx(50.0)
    assert energy_at(readings, -1.0) is None and energy_at(readings, 99.0) is None


def test_a_budget_held_on_average_and_in_every_second():
    readings = _counter(lambda t: 100.0 if t < 1.0 else 60.0 + (1.5 if int(t) % 2 else -1.5), 0.0, 15.0)
    got = hold(readings, 60.0, changed_s=0.0)
    assert got is not None and got.held
    assert abs(got.mean_error) < 0.01 and len(got.samples_w) == 10


def test_an_undershoot_of_more_than_5_percent_is_not_held():
    readings = _counter(lambda t: 86.8, 0.0, 15.0)  # the Xeon's 80 % budget: 95.1 W asked, 86.8 W drawn
    got = hold(readings, 95.1, changed_s=0.0)
    assert got is not None and not got.held
    assert got.mean_error == pytest.approx(-0.0873, abs=1e-3)


def test_one_second_off_by_more_than_10_percent_fails_a_good_mean():
    readings = _counter(lambda t: 80.0 if 7.0 <= t < 8.0 else 60.0, 0.0, 15.0)
    got = hold(readings, 62.0, changed_s=0.0)
    assert got is not None and abs(got.mean_error) <= 0.05
    assert got.worst_sample_w == pytest.approx(80.0, abs=2.0) and not got.held  # readings straddle its edges


def test_readings_that_stop_short_of_the_window_give_no_figure():
    assert hold(_counter(lambda t: 60.0, 0.0, 9.0), 60.0, changed_s=0.0) is None
