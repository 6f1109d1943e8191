"""The optional NVML actuators, against a fake pynvml only (never a real card): consent, the
per-board share of a cap within the board's constraints, clock locking, restore, and what
happens without permission."""

from __future__ import annotations

import pytest

from factory.power.actuators import NvmlActuator
from factory.telemetry.nvml import NvmlPowerSource
from tests.unit.fake_pynvml import FakeGpu, FakePynvml


def _boards(nv: FakePynvml):
    source = NvmlPowerSource(nvml=nv)
    return source.nvml, source.boards()


def test_no_consent_no_actuator():
    nv = FakePynvml(1)
    with pytest.raises(ValueError, match="consent"):
        NvmlActuator(*_boards(nv), power_limit=False, locked_clocks=False)


def test_power_limit_takes_each_boards_share_within_its_constraints_and_is_restored():
    nv = FakePynvml(2)
    act = NvmlActuator(*_boards(nv), power_limit=True, locked_clocks=False)
    act.apply(900.0)  # two boards: 450 W each
    assert [g.power_limit_mw for g in nv.gpus] == [450_000, 450_000]
    act.apply(200.0)  # 100 W each is below the 200 W floor of the board: clamped to it
    assert [g.power_limit_mw for g in nv.gpus] == [200_000, 200_000]
    act.apply(5000.0)  # never above the board's default
    assert [g.power_limit_mw for g in nv.gpus] == [700_000, 700_000]
    act.apply(600.0)
    act.apply(None)  # the cap lifted: defaults back
    assert [g.power_limit_mw for g in nv.gpus] == [700_000, 700_000] and act.applied_w is None


def test_locked_clocks_scale_with_the_cap_and_reset():
    nv = FakePynvml([FakeGpu(0)])
    act = NvmlActuator(*_boards(nv), power_limit=False, locked_clocks=True)
    act.apply(450.0)  # (450 - 200) / (700 - 200) = 0.5 of the way from 345 to 1980 MHz
    assert nv.gpus[0].locked_clocks_mhz == (345, 345 + (1980 - 345) // 2)
    assert nv.gpus[0].power_limit_mw == 700_000  # no consent for the limit: untouched
    act.restore()
    assert nv.gpus[0].locked_clocks_mhz is None


def test_without_permission_the_actuator_turns_itself_off():
    nv = FakePynvml([FakeGpu(0, settable=False)])
    act = NvmlActuator(*_boards(nv), power_limit=True, locked_clocks=False)
    act.apply(400.0)
    assert not act.enabled and nv.gpus[0].power_limit_mw == 700_000
    act.apply(300.0)  # stays off: no retry storm against the driver
    assert nv.gpus[0].power_limit_mw == 700_000
