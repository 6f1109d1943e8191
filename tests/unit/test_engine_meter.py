"""The engine meter against a scripted scheduler timeline (modeled power, real ZeroMQ socket):
what each request is charged, that nothing is lost, and what the replica turns it into."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import msgspec
import pytest
import zmq

from factory.config import TelemetryConfig
from factory.engine.meter import XARG_REQUEST, XARG_TENANT, EngineMeter
from factory.engine.replica_meter import ReplicaMeter
from factory.engine.wire import DeviceReading, Final, MeterSettings, Snapshot, decode_meter, encode

IDLE_W, MAX_W = 40.0, 120.0


def _final(request: str, *, energy_j: float, busy_s: float = 0.0, completion_tokens: int = 0, status="completed"):
    return Final(request=request, engine_request=request, tenant="t1", status=status, energy_j=energy_j,
                 busy_s=busy_s, prompt_tokens=5, completion_tokens=completion_tokens, source="modeled")  # fmt: skip


def _request(rid: str, tenant: str, prompt: int):
    params = SimpleNamespace(extra_args={XARG_REQUEST: f"key-{rid}", XARG_TENANT: tenant})
    return SimpleNamespace(
        request_id=rid,
        sampling_params=params,
        num_prompt_tokens=prompt,
        num_computed_tokens=0,
        arrival_time=time.time(),
    )


def _output(rid: str, n_new: int, finished: bool = False):
    return SimpleNamespace(request_id=rid, new_token_ids=[7] * n_new, finish_reason="length" if finished else None)


class _Timeline:
    """Drives an EngineMeter as vLLM's scheduler would, and receives its messages."""

    def __init__(self, tmp_path):
        self.endpoint = f"ipc://{tmp_path}/meter.sock"
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.bind(self.endpoint)
        cfg = MeterSettings(
            endpoint=self.endpoint, source="modeled", interval_s=0.05, idle_w=IDLE_W, max_w=MAX_W, prefill_weight=0.3
        )
        self.meter = EngineMeter(cfg)
        self.requests: dict = {}
        self.step = 0

    def run_step(self, scheduled: dict[str, int], duration_s: float, finished: tuple[str, ...] = ()):
        for rid, n in scheduled.items():
            self.requests[rid].num_computed_tokens += n
        self.step += 1
        self.meter.on_schedule(self.step, scheduled, self.requests)
        time.sleep(duration_s)
        outputs = [
            _output(rid, 1 if self.requests[rid].num_computed_tokens >= self.requests[rid].num_prompt_tokens else 0,
                    rid in finished)
            for rid in scheduled
        ]  # fmt: skip
        self.meter.on_step_done(self.step, [SimpleNamespace(outputs=outputs)])

    def messages(self) -> list:
        """Everything the meter sent, after stopping it (its sampler never stops sending)."""
        self.meter.close()
        out = []
        while self.sock.poll(200):
            out.append(decode_meter(self.sock.recv()))
        return out

    def close(self):
        self.sock.close(linger=0)


@pytest.fixture
def timeline(tmp_path):
    t = _Timeline(tmp_path)
    try:
        yield t
    finally:
        t.meter.close()
        t.close()


def test_requests_are_charged_by_work_and_energy_is_conserved(timeline):
    timeline.requests = {"a": _request("a", "t1", 30), "b": _request("b", "t2", 10)}
    time.sleep(0.2)  # idle before anything runs
    timeline.run_step({"a": 30, "b": 10}, 0.1)  # both prefill
    for _ in range(5):
        timeline.run_step({"a": 1, "b": 1}, 0.05)
    timeline.run_step({"a": 1, "b": 1}, 0.05, finished=("a", "b"))
    time.sleep(0.3)  # idle after
    msgs = timeline.messages()
    finals = {m.request: m for m in msgs if isinstance(m, Final)}
    assert set(finals) == {"key-a", "key-b"}
    a, b = finals["key-a"], finals["key-b"]
    assert (a.prompt_tokens, a.completion_tokens, a.status) == (30, 7, "completed")
    assert (b.tenant, b.source) == ("t2", "modeled")
    # a did 30 prefill tokens vs b's 10 in the first step, equal decode afterwards.
    assert a.energy_j > b.energy_j > 0
    assert a.busy_s > b.busy_s > 0
    # Busy ~0.4 s at 120 W: requests hold ~48 J between them; modeled power is exact.
    assert a.energy_j + b.energy_j == pytest.approx(MAX_W * (a.busy_s + b.busy_s), rel=0.05)
    snap = [m for m in msgs if isinstance(m, Snapshot)][-1]
    attributed = sum(snap.attributed_j.values())
    assert attributed + snap.idle_j == pytest.approx(snap.observed_j, rel=1e-9)
    assert snap.observed_j == pytest.approx(snap.devices[0].energy_j, rel=0.01)
    assert snap.tokens == {"t1": (30, 7), "t2": (10, 7)}
    assert snap.idle_j >= IDLE_W * 0.4  # at least the idle stretches before and after


def test_an_aborted_request_carries_what_it_used(timeline):
    timeline.requests = {"c": _request("c", "t1", 5)}
    timeline.run_step({"c": 5}, 0.05)
    timeline.run_step({"c": 1}, 0.05)
    timeline.meter.on_finished_outside(["c"], "aborted")
    final = next(m for m in timeline.messages() if isinstance(m, Final))
    assert final.status == "aborted"
    assert final.completion_tokens == 2
    assert final.energy_j == pytest.approx(MAX_W * 0.1, rel=0.3)


def test_replica_meter_waits_for_finals_and_exports_families():
    async def scenario():
        meter = ReplicaMeter(TelemetryConfig(source="modeled"))
        meter.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(meter.endpoint)
        try:
            waiter = asyncio.create_task(meter.final("k1", timeout_s=5))
            await asyncio.sleep(0.05)
            push.send(encode(_final("k1", energy_j=1.5)))
            assert (await waiter).energy_j == 1.5
            assert await meter.final("never", timeout_s=0.1) is None
            # n=2: two engine requests under one key, summed; the early one waits for its twin.
            push.send(encode(_final("k2", energy_j=1.0, busy_s=0.1, completion_tokens=3)))
            await asyncio.sleep(0.05)
            waiter = asyncio.create_task(meter.final("k2", timeout_s=5, parts=2))
            push.send(encode(_final("k2", energy_j=2.0, busy_s=0.2, completion_tokens=4, status="aborted")))
            both = await waiter
            assert (both.energy_j, both.completion_tokens, both.status) == (3.0, 7, "aborted")
            snap = Snapshot(
                source="modeled",
                devices=(DeviceReading(device="cpu0", energy_j=10.0, power_w=80.0),),
                observed_j=10.0,
                idle_j=4.0,
                attributed_j={"t1": 6.0},
                tokens={"t1": (12, 30)},
                busy_s=0.5,
                running=0,
                time_s=time.time(),
            )
            push.send(encode(snap))
            await asyncio.sleep(0.1)
            push.send(encode(msgspec.structs.replace(snap, observed_j=20.0, tokens={"t1": (12, 80)})))
            await asyncio.sleep(0.1)
            fams = {f.name: f for f in meter.families()}
            assert meter.tokens_per_joule() == pytest.approx(50 / 10)
            power = fams["factory_power_watts"].samples[0]
            assert power.labels == {"device": "cpu0", "source": "modeled"} and power.value == 80.0
            tokens = {s.labels["kind"]: s.value for s in fams["factory_tokens"].samples}
            assert tokens == {"prompt": 12, "completion": 80}
            assert fams["factory_idle_energy_joules"].samples[0].value == 4.0
        finally:
            push.close(linger=0)
            meter.close()

    asyncio.run(scenario())


def test_demand_under_a_pausing_cap_is_the_last_unpaused_demand_unless_lower():
    """Scaling a paused engine's power by its pauses overstates demand (it races through the queue
    that built up): a 60 % duty drawing 80 W would read 40 + 40 / 0.4 = 140 W against the 90 W the
    load drew unpaused. The governor's level rests on this figure, so it must hold steady."""
    meter = ReplicaMeter(TelemetryConfig(source="modeled"))
    try:
        assert meter._demand(80.0, 0.6, IDLE_W) == pytest.approx(140.0)  # nothing unpaused seen yet
        assert meter._demand(90.0, 0.0, IDLE_W) == 90.0
        assert meter._demand(80.0, 0.6, IDLE_W) == 90.0  # the upper bound is above what was seen
        assert meter._demand(50.0, 0.5, IDLE_W) == pytest.approx(60.0)  # the load fell under the cap
        assert meter._demand(70.0, 0.0, IDLE_W) == 70.0  # unpaused again: measured afresh
        assert meter._demand(69.0, 0.3, IDLE_W) == 70.0
    finally:
        meter.close()
