"""Power telemetry without a GPU: NVML through a fake pynvml, the modeled source's exact
integral, source selection and its log line, the sampler's schedule, and the GPU check
script's answer on a machine that has no GPU."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from factory.telemetry.nvml import POWER_COUNTER, POWER_FIELD, POWER_USAGE, NvmlPowerSource
from factory.telemetry.sampler import PowerSampler
from factory.telemetry.sources import ModeledPowerSource, PowerSource, TelemetryError, select_power_source
from tests.unit.fake_pynvml import FakeGpu, FakePynvml, NVMLError_DriverNotLoaded, NVMLError_LibraryNotFound

REPO = Path(__file__).resolve().parents[2]


def gpus(n: int, **kw) -> list[FakeGpu]:
    return [FakeGpu(i, **kw) for i in range(n)]


# -- NVML source --


def test_energy_counts_from_open_and_stays_monotonic_across_a_counter_reset(caplog):
    nvml = FakePynvml(1)
    src = NvmlPowerSource(nvml=nvml)
    assert src.energy_mj() == 0  # since open, not since driver load
    nvml.gpus[0].power_w = 300
    nvml.advance(2.0)
    assert src.read()[0].energy_mj == 600_000
    nvml.reset_counter(0, to_mj=1_000)  # driver reload: the counter restarts near zero
    with caplog.at_level(logging.WARNING, logger="factory.telemetry"):
        after_reset = src.energy_mj()
        nvml.advance(1.0)
        later = src.read()[0].energy_mj
    assert after_reset == 601_000
    assert later == 901_000
    assert sum("went back" in r.message for r in caplog.records) == 1


def test_instant_power_field_is_used_when_available():
    nvml = FakePynvml(gpus(1, power_w=420.0, power_usage_w=250.0))
    src = NvmlPowerSource(nvml=nvml)
    assert src.facts()[0]["power_method"] == POWER_FIELD
    assert src.read()[0].power_w == 420.0  # the instant value, not the 1-s average
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 0


@pytest.mark.parametrize("field", ["raise", "bad_return", "missing_constant"])
def test_power_usage_is_the_fallback_when_the_instant_field_fails(field):
    nvml = FakePynvml(gpus(1, power_w=420.0, power_usage_w=250.0))
    if field == "missing_constant":
        nvml.remove_field_api()
    else:
        nvml.gpus[0].instant_field = field
    src = NvmlPowerSource(nvml=nvml)
    assert src.facts()[0]["power_method"] == POWER_USAGE
    assert src.read()[0].power_w == 250.0


def test_field_failing_after_open_switches_to_power_usage_and_warns_once(caplog):
    nvml = FakePynvml(gpus(1, power_w=420.0, power_usage_w=250.0))
    src = NvmlPowerSource(nvml=nvml)
    nvml.gpus[0].instant_field = "raise"
    with caplog.at_level(logging.WARNING, logger="factory.telemetry"):
        powers = [src.read()[0].power_w for _ in range(3)]
    assert powers == [250.0] * 3
    assert src.facts()[0]["power_method"] == POWER_USAGE
    assert sum("instant power field failed" in r.message for r in caplog.records) == 1


def test_energy_counter_delta_gives_power_when_no_power_reading_exists(monkeypatch):
    nvml = FakePynvml(gpus(1, power_w=200.0, instant_field="raise"))
    monkeypatch.setattr(nvml, "nvmlDeviceGetPowerUsage", _raise(nvml.NVMLError_NotSupported))
    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr("factory.telemetry.nvml.time.monotonic", lambda: next(clock))
    src = NvmlPowerSource(nvml=nvml)  # opened at t=100
    assert src.facts()[0]["power_method"] == POWER_COUNTER
    nvml.advance(1.0)
    assert src.read()[0].power_w == pytest.approx(200.0)  # t=101
    nvml.gpus[0].power_w = 500.0
    nvml.advance(1.0)
    assert src.read()[0].power_w == pytest.approx(500.0)  # t=102


def _raise(error):
    def fn(*args):
        raise error()

    return fn


def test_unsupported_optional_facts_are_none_and_not_asked_for_again():
    nvml = FakePynvml(
        gpus(
            1,
            power_limit_mw=None,
            constraints_mw=None,
            sm_clock_mhz=None,
            temperature_c=None,
            utilization_pct=None,
            mig_mode=None,
        )
    )
    src = NvmlPowerSource(nvml=nvml)
    for _ in range(3):
        r = src.read()[0]
    assert (r.power_limit_w, r.power_limit_min_w, r.power_limit_max_w) == (None, None, None)
    assert (r.sm_clock_mhz, r.temperature_c, r.utilization_pct, r.mig) == (None, None, None, False)
    assert r.energy_mj == 0 and r.power_w == 100.0  # what is supported still reads
    assert nvml.calls["nvmlDeviceGetClockInfo"] == 1
    assert nvml.calls["nvmlDeviceGetTemperature"] == 1


def test_readings_carry_facts_in_watts_and_the_per_read_path_stays_cheap():
    nvml = FakePynvml(2)
    src = NvmlPowerSource(nvml=nvml)
    static_fns = ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetMigMode", "nvmlDeviceGetName")
    static = {k: nvml.calls[k] for k in static_fns}
    readings = [src.read() for _ in range(5)][-1]
    r = readings[0]
    assert (r.source, r.device, r.power_limit_w, r.power_limit_min_w, r.power_limit_max_w) == (
        "nvml",
        "gpu0",
        700.0,
        200.0,
        700.0,
    )
    assert (r.sm_clock_mhz, r.temperature_c, r.utilization_pct) == (1980, 45.0, 50.0)
    assert {k: nvml.calls[k] for k in static} == static  # limits, MIG, names: read at open only
    before = nvml.calls.copy()
    src.energy_mj()
    assert nvml.calls - before == {"nvmlDeviceGetTotalEnergyConsumption": 2}  # the fast path reads only counters
    nvml.gpus[1].power_limit_mw = 400_000
    src.refresh_facts()
    assert src.read()[1].power_limit_w == 400.0


def test_facts_describe_each_device():
    nvml = FakePynvml(gpus(1, name="NVIDIA H100 80GB HBM3"), driver="550.54.15")
    (facts,) = NvmlPowerSource(nvml=nvml).facts()
    assert facts["name"] == "NVIDIA H100 80GB HBM3"
    assert facts["uuid"] == nvml.gpus[0].uuid
    assert facts["driver_version"] == "550.54.15"
    assert (facts["power_limit_w"], facts["power_limit_min_w"], facts["power_limit_max_w"]) == (700.0, 200.0, 700.0)
    assert facts["mig"] is False


def test_cuda_visible_devices_by_index_selects_those_boards_in_that_order():
    nvml = FakePynvml(4)
    for gpu in nvml.gpus:
        gpu.power_w = 100 * (gpu.index + 1)
    src = NvmlPowerSource("3,1", nvml=nvml)
    assert src.devices == ["gpu3", "gpu1"]
    assert [r.power_w for r in src.read()] == [400.0, 200.0]


def test_cuda_visible_devices_by_uuid_and_uuid_prefix():
    nvml = FakePynvml(gpus(3))
    nvml.gpus[2].uuid = "GPU-abcdef01-2345-6789-abcd-ef0123456789"
    assert NvmlPowerSource(nvml.gpus[1].uuid, nvml=nvml).devices == ["gpu1"]
    assert NvmlPowerSource(" GPU-abcdef01 , 0", nvml=nvml).devices == ["gpu2", "gpu0"]


def test_all_devices_when_cuda_visible_devices_is_unset_or_empty():
    nvml = FakePynvml(3)
    assert NvmlPowerSource(None, nvml=nvml).devices == ["gpu0", "gpu1", "gpu2"]
    assert NvmlPowerSource("", nvml=nvml).devices == ["gpu0", "gpu1", "gpu2"]


@pytest.mark.parametrize("cvd", ["7", "GPU-does-not-exist", "nonsense"])
def test_cuda_visible_devices_naming_a_missing_device_is_an_error(cvd):
    nvml = FakePynvml(2)
    with pytest.raises(TelemetryError, match="CUDA_VISIBLE_DEVICES"):
        NvmlPowerSource(cvd, nvml=nvml)
    assert nvml.init_count == 0  # shut down again on the way out


def test_mig_slices_are_flagged_and_read_through_their_board():
    board = FakeGpu(1, mig_mode=(1, 1), mig_slices=["MIG-aaaa", "MIG-bbbb"], power_w=250.0)
    nvml = FakePynvml([FakeGpu(0), board])
    src = NvmlPowerSource("MIG-aaaa,MIG-bbbb", nvml=nvml)
    assert src.devices == ["gpu1"]  # two slices of one board: its energy once
    nvml.advance(1.0)
    (r,) = src.read()
    assert r.mig is True and r.energy_mj == 250_000 and r.power_w == 250.0
    # The whole board named by index while MIG is on is flagged too; a plain board is not.
    assert [r.mig for r in NvmlPowerSource(nvml=nvml).read()] == [False, True]


@pytest.mark.parametrize("error", [NVMLError_DriverNotLoaded, NVMLError_LibraryNotFound])
def test_init_failure_is_a_telemetry_error(error):
    with pytest.raises(TelemetryError, match="NVML unavailable"):
        NvmlPowerSource(nvml=FakePynvml(1, init_error=error))


def test_no_device_or_no_energy_counter_is_a_telemetry_error():
    nvml = FakePynvml(0)
    with pytest.raises(TelemetryError, match="no GPU"):
        NvmlPowerSource(nvml=nvml)
    assert nvml.init_count == 0
    nvml = FakePynvml(gpus(1, energy_mj=None))
    with pytest.raises(TelemetryError, match="energy counter not supported"):
        NvmlPowerSource(nvml=nvml)
    assert nvml.init_count == 0


def test_close_shuts_nvml_down_once_and_reads_after_close_fail():
    nvml = FakePynvml(1)
    src = NvmlPowerSource(nvml=nvml)
    assert nvml.init_count == 1
    src.close()
    src.close()
    assert nvml.init_count == 0 and nvml.calls["nvmlShutdown"] == 1
    with pytest.raises(TelemetryError, match="closed"):
        src.read()


def test_default_import_is_lazy_and_uses_the_pynvml_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    code = (
        "import factory.telemetry.sources, factory.telemetry.nvml, factory.telemetry.sampler, sys; "
        "print('pynvml' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
    fake = FakePynvml(2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert NvmlPowerSource().devices == ["gpu0", "gpu1"] and fake.init_count == 1


# -- modeled source --


class FakeEngine:
    """A clock and a busy counter that tests move by hand."""

    def __init__(self):
        self.now_s = 1000.0
        self.busy_total_s = 50.0

    def run(self, seconds: float, busy_frac: float) -> None:
        self.now_s += seconds
        self.busy_total_s += seconds * busy_frac


def modeled(engine: FakeEngine, idle_w=40.0, max_w=120.0) -> ModeledPowerSource:
    return ModeledPowerSource(idle_w, max_w, lambda: engine.busy_total_s, clock=lambda: engine.now_s)


def test_modeled_energy_is_the_exact_integral():
    engine = FakeEngine()
    src = modeled(engine)
    engine.run(10.0, 0.4)
    assert src.energy_mj() == pytest.approx(1000 * (40 * 10 + 80 * 4))  # 720 J
    engine.run(5.0, 1.0)
    engine.run(5.0, 0.0)
    (r,) = src.read()
    assert r.energy_mj == pytest.approx(1000 * (40 * 20 + 80 * 9))
    assert (r.source, r.device) == ("modeled", "cpu0")


def test_modeled_power_follows_the_busy_fraction_within_idle_and_max():
    engine = FakeEngine()
    src = modeled(engine)
    powers = []
    for frac in (0.0, 0.25, 1.0, 0.5):
        engine.run(2.0, frac)
        powers.append(src.read()[0].power_w)
    assert powers == pytest.approx([40.0, 60.0, 120.0, 80.0])
    engine.busy_total_s += 0.1  # busy with no wall time passing (a step just ran): max power
    assert src.read()[0].power_w == 120.0
    engine.busy_total_s += 20.0  # busy running ahead of the wall clock cannot exceed max
    engine.run(1.0, 0.0)
    (r,) = src.read()
    assert 40.0 <= r.power_w <= 120.0
    assert r.energy_mj <= 1000 * 120 * (engine.now_s - 1000.0) + 1e-6


def test_modeled_energy_never_decreases():
    engine = FakeEngine()
    src = modeled(engine)
    engine.run(1.0, 1.0)
    first = src.energy_mj()
    engine.busy_total_s -= 0.5  # a buggy busy counter going back must not unspend joules
    assert src.energy_mj() >= first


def test_modeled_rejects_idle_above_max():
    with pytest.raises(ValueError, match="idle_w <= max_w"):
        ModeledPowerSource(200, 100, lambda: 0.0)


# -- selection --


def test_auto_falls_back_to_modeled_with_one_log_line_when_nvml_fails(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(1, init_error=NVMLError_DriverNotLoaded))
    with caplog.at_level(logging.INFO, logger="factory.telemetry"):
        src = select_power_source("auto", idle_w=40, max_w=120, busy_s=lambda: 0.0)
    assert isinstance(src, ModeledPowerSource) and src.source == "modeled"
    (record,) = [r for r in caplog.records if r.name == "factory.telemetry"]
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("power source: modeled (idle 40 W, max 120 W): NVML unavailable")
    assert "Driver Not Loaded" in record.getMessage()


def test_auto_falls_back_when_pynvml_is_not_installed(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.INFO, logger="factory.telemetry"):
        src = select_power_source("auto", idle_w=40, max_w=120, busy_s=lambda: 0.0)
    assert isinstance(src, ModeledPowerSource)
    assert "cannot import pynvml" in caplog.text


def test_auto_picks_nvml_when_it_works(monkeypatch, caplog):
    fake = FakePynvml(gpus(2, name="NVIDIA H100 80GB HBM3"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.INFO, logger="factory.telemetry"):
        src = select_power_source("auto", idle_w=40, max_w=120, busy_s=lambda: 0.0, cuda_visible_devices="1")
    assert isinstance(src, NvmlPowerSource) and src.devices == ["gpu1"]
    (record,) = [r for r in caplog.records if r.name == "factory.telemetry"]
    assert record.getMessage().startswith("power source: nvml (1 device: gpu1 NVIDIA H100 80GB HBM3")


def test_kind_nvml_raises_when_nvml_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(1, init_error=NVMLError_LibraryNotFound))
    with pytest.raises(TelemetryError, match="NVML unavailable.*Library Not Found"):
        select_power_source("nvml", idle_w=40, max_w=120, busy_s=lambda: 0.0)


def test_kind_modeled_never_touches_nvml(monkeypatch, caplog):
    fake = FakePynvml(1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.INFO, logger="factory.telemetry"):
        src = select_power_source("modeled", idle_w=40, max_w=120, busy_s=lambda: 0.0)
    assert isinstance(src, ModeledPowerSource) and not fake.calls
    assert "power source: modeled (idle 40 W, max 120 W): configured" in caplog.text
    with pytest.raises(ValueError, match="auto, nvml, modeled"):
        select_power_source("rapl", idle_w=40, max_w=120, busy_s=lambda: 0.0)


# -- sampler --


class CountingSource(PowerSource):
    source = "modeled"

    def __init__(self, read_s: float = 0.0):
        self.read_s = read_s  # how long a read takes
        self.reads = 0

    @property
    def devices(self):
        return ["cpu0"]

    def read(self):
        self.reads += 1
        time.sleep(self.read_s)
        return [self.reads]


def test_sampler_keeps_a_fixed_rate_when_reads_take_time():
    # A read taking half the interval would give ~6-7 reads/s with sleep-after-work; fixed rate gives 10.
    source, times = CountingSource(read_s=0.05), []
    sampler = PowerSampler(source, lambda readings: times.append(time.monotonic()), interval_s=0.1)
    sampler.start()
    time.sleep(1.0)
    sampler.stop()
    assert 9 <= len(times) <= 13
    gaps = [b - a for a, b in zip(times[:-2], times[1:-1], strict=True)]  # the last one is the stop's extra reading
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.015)


def test_sampler_survives_a_raising_callback_and_logs_each_error_once(caplog):
    source, calls = CountingSource(), []

    def on_readings(readings):
        calls.append(readings)
        raise RuntimeError("dashboard gone")

    sampler = PowerSampler(source, on_readings, interval_s=0.02)
    with caplog.at_level(logging.ERROR, logger="factory.telemetry"):
        sampler.start()
        time.sleep(0.3)
        sampler.stop()
    assert len(calls) >= 8  # kept sampling after the first failure
    assert sum("dashboard gone" in r.getMessage() for r in caplog.records) == 1


def test_sampler_stop_takes_a_final_reading_and_joins():
    source, got = CountingSource(), []
    sampler = PowerSampler(source, got.append, interval_s=10.0)  # only the first tick would come by itself
    sampler.start()
    time.sleep(0.1)
    assert got == [[1]]
    sampler.stop()
    assert got == [[1], [2]]
    assert not any(t.name == "factory-power-sampler" for t in threading.enumerate())


# -- the GPU check script --


def test_nvml_check_exits_2_without_a_gpu():
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any failure means no GPU here, which is what this test needs
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML: run kernels/nvml_check.py itself")
    out = subprocess.run(
        [sys.executable, str(REPO / "kernels" / "nvml_check.py"), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no GPU to check" in out.stdout
