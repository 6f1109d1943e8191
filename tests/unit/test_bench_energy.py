"""Energy sources for `factory bench`: the server's /metrics (real HTTP, aiohttp on loopback) summed
over series with its source label kept, NVML through the fake module, auto's fallbacks, counter
restarts that do not become negative energy, and the window handed to a level."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
from aiohttp import web

from factory.bench.energy import EnergyError, EnergyMeter, _is_local, make_meter, parse_metrics
from tests.unit.fake_pynvml import FakeGpu, FakePynvml, NVMLError_DriverNotLoaded

METRICS = """# HELP factory_energy_joules_total Device energy since the replica started.
# TYPE factory_energy_joules_total counter
factory_energy_joules_total{{device="gpu0",replica="a",source="{src0}"}} {e0}
factory_energy_joules_total{{device="gpu1",replica="b",source="{src1}"}} {e1}
factory_energy_joules_created{{device="gpu0",replica="a",source="measured"}} 1.7e9
# TYPE factory_power_watts gauge
factory_power_watts{{device="gpu0",replica="a",source="{src0}"}} 150.5
factory_power_watts{{device="gpu1",replica="b",source="{src1}"}} 200
factory_power_limit_watts{{device="gpu0"}} 700
vllm:num_requests_running{{model_name="m"}} 3
"""


class MetricsServer:
    """/metrics on loopback in its own thread; `text` can change while a meter samples it."""

    def __init__(self, text: str, status: int = 200):
        self.text, self.status, self.auth = text, status, []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self):
        async def metrics(request):
            self.auth.append(request.headers.get("Authorization"))
            return web.Response(text=self.text, status=self.status)

        async def start():
            app = web.Application()
            app.router.add_get("/metrics", metrics)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
            self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def close(self):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def server():
    s = MetricsServer(METRICS.format(src0="measured", src1="measured", e0=1000.0, e1=500.0))
    yield s
    s.close()


def test_parse_metrics_sums_series_reads_power_and_keeps_source():
    energy, power_w, sources = parse_metrics(METRICS.format(src0="modeled", src1="measured", e0=10, e1=2.5))
    assert energy == {"device=gpu0,replica=a": 10.0, "device=gpu1,replica=b": 2.5}
    assert power_w == 350.5 and sources == {"modeled", "measured"}
    assert parse_metrics("vllm:x 1\n") == ({}, None, set())


def test_server_meter_samples_the_summed_counter_with_the_key(server):
    meter = make_meter("server", server.url, "sk-test", interval_s=0.02)
    assert (meter.source, meter.gpus) == ("server:measured", 2)
    t0 = time.perf_counter()
    meter.start(t0)
    time.sleep(0.1)
    server.text = METRICS.format(src0="measured", src1="measured", e0=1100.0, e1=550.0)
    time.sleep(0.1)
    meter.stop()
    energy, power = meter.window(0.0, time.perf_counter() - t0)
    assert len(energy) >= 5 and all(a[0] < b[0] for a, b in zip(energy, energy[1:], strict=False))
    assert energy[-1][1] - energy[0][1] == pytest.approx(150.0)
    assert all(p[1] == 350.5 for p in power) and len(power) == len(energy)
    assert set(server.auth) == {"Bearer sk-test"}
    assert meter.latest_power_w() == 350.5


@pytest.mark.parametrize(
    ("src0", "src1", "source"), [("modeled", "modeled", "server:modeled"), ("measured", "modeled", "server:mixed")]
)
def test_server_source_label_is_carried(server, src0, src1, source):
    server.text = METRICS.format(src0=src0, src1=src1, e0=1, e1=1)
    assert make_meter("auto", server.url, None).source == source


def test_a_counter_that_restarts_is_not_negative_energy(server):
    meter = make_meter("server", server.url, None, interval_s=60)
    meter.start(time.perf_counter())  # one sample now; the next ones by hand
    server.text = METRICS.format(src0="measured", src1="measured", e0=1030.0, e1=20.0)  # replica b restarted
    meter._sample()
    server.text = METRICS.format(src0="measured", src1="measured", e0=1040.0, e1=25.0)
    meter.stop()
    energy, _ = meter.window(-1, 1e9)
    assert [j for _, j in energy] == [0.0, 50.0, 65.0]  # +30 +20 (from zero), then +10 +5


def test_server_errors_are_clear(server):
    server.text = "vllm:num_requests_running 1\n"
    with pytest.raises(EnergyError, match="has no factory_energy_joules_total"):
        make_meter("server", server.url, None)
    server.status = 401
    with pytest.raises(EnergyError, match="HTTP 401"):
        make_meter("server", server.url, None)
    with pytest.raises(EnergyError, match="server energy"):
        make_meter("server", "http://127.0.0.1:9", None)


def test_a_failed_read_mid_run_loses_a_sample_and_is_reported(server):
    meter = make_meter("server", server.url, None, interval_s=60)
    meter.start(time.perf_counter())
    server.status = 503
    meter.stop()
    assert meter.read_errors == 1 and "HTTP 503" in meter.error
    assert len(meter.window(-1, 1e9)[0]) == 1


def test_nvml_meter_sums_boards_in_joules_and_watts(monkeypatch):
    fake = FakePynvml([FakeGpu(0, power_w=100.0), FakeGpu(1, power_w=250.0)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = make_meter("nvml", "http://10.0.0.1:8000", None, interval_s=60)
    assert (meter.source, meter.gpus) == ("nvml:measured", 2)
    t0 = time.perf_counter()
    meter.start(t0)
    fake.advance(2.0)
    meter.stop()
    energy, power = meter.window(0, time.perf_counter() - t0)
    assert energy[-1][1] - energy[0][1] == pytest.approx(700.0)  # 2 s x (100 + 250) W
    assert [w for _, w in power] == [350.0, 350.0]
    assert fake.init_count == 0  # shut down on stop


@pytest.mark.parametrize(
    ("fake", "match"),
    [
        (FakePynvml(1, init_error=NVMLError_DriverNotLoaded), "does not start .*Driver Not Loaded"),
        (FakePynvml(0), "no GPU"),
        (FakePynvml([FakeGpu(0, energy_mj=None)]), "Not Supported"),
        (None, "not installed"),
    ],
)
def test_nvml_errors_are_clear(monkeypatch, fake, match):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(EnergyError, match=match):
        make_meter("nvml", "http://127.0.0.1:1", None)
    if fake is not None:
        assert fake.init_count == 0


def test_auto_falls_back_to_nvml_then_none(monkeypatch, server):
    server.text = "vllm:num_requests_running 1\n"  # a stock server: no energy counter
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(1))
    assert make_meter("auto", server.url, None).source == "nvml:measured"
    # The server is not this machine: this machine's GPUs would measure the wrong thing.
    monkeypatch.setattr("factory.bench.energy._is_local", lambda url: False)
    assert make_meter("auto", server.url, None).source == "none"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(1, init_error=NVMLError_DriverNotLoaded))
    none = make_meter("auto", server.url, None)
    assert (none.source, none.gpus) == ("none", 0)
    none.start(time.perf_counter())
    none.stop()
    assert none.window(0, 10) == ([], [])


def test_is_local():
    assert _is_local("http://127.0.0.1:8000") and _is_local("http://localhost:1") and _is_local("http://[::1]:80")
    assert not _is_local("http://203.0.113.7:8000")


def test_window_keeps_samples_near_it_and_a_neighbour_each_side_relative_to_any_t0():
    meter = EnergyMeter("x", 1, interval_s=1.0)
    meter._energy = [(100.0 + t, 10.0 * t) for t in range(20)]
    meter._power = [(100.0 + t, 10.0) for t in range(20)]
    meter.t0 = 100.0
    energy, power = meter.window(5.5, 8.2)
    assert [t for t, _ in energy] == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert [t for t, _ in power] == [5.0, 6.0, 7.0, 8.0, 9.0]
    energy, _ = meter.window(0.0, 1.0, t0=110.0)  # a later level's t0
    assert energy[0] == [-2.0, 80.0] and energy[-1] == [3.0, 130.0]
    meter._power = []
    _, derived = meter.window(5.5, 8.2)
    assert derived[0] == [4.5, 10.0]
