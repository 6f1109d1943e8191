"""EnergyAwareScheduler inside vLLM's real V1 scheduler, driven with no model (tests/scheduler_harness.py).

What it must prove: a runtime batch cap holds on every step, caps never rise above the
configured maxima, admission that waits for KV room preempts far less than stock vLLM on the
same over-subscribed load, tenants' priorities order admission, and none of it needs the meter
or the FACTORY_SCHEDULER config.
"""

from __future__ import annotations

import random
import time

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from factory.config import AUTO_PROFILE_CPU as CPU_PROFILE
from factory.engine.wire import METER_ENV, SCHEDULER_ENV, Control, SchedulerSettings, settings_json
from factory.engine.scheduler import AsyncEnergyAwareScheduler, EnergyAwareScheduler
from tests.scheduler_harness import Driver, StepRecord, make_request, make_scheduler

OURS = [EnergyAwareScheduler, AsyncEnergyAwareScheduler]
DEFAULT_STATS = ("batch_cap", "token_budget", "preemptions", "cap_violations", "max_batch_seen", "steps")
OURS_AND_STOCK = [(EnergyAwareScheduler, Scheduler), (AsyncEnergyAwareScheduler, AsyncScheduler)]


def batch_cap(cap: int) -> Control:
    """A governor message that caps the running requests (no power cap)."""
    return Control(version=1, power_cap_w=None, sent_at=0.0, forwarded_at=0.0, batch_cap=cap)


def accelerator_like_forward_s(num_reqs: int, num_tokens: int) -> float:
    """A forward pass whose time is mostly fixed (weights read once per step), so tokens per joule
    rise with the batch, as on a GPU. Tests whose assertions depend on the batch the policy picks
    use it: without it the policy would learn from the scheduler's own Python time, which is
    noise on a shared machine."""
    return 1e-3 + 5e-6 * num_tokens


@pytest.fixture(autouse=True)
def _no_factory_env(monkeypatch):
    """The defaults: no meter socket, no SLO or profile."""
    monkeypatch.delenv(METER_ENV, raising=False)
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)


def _random_load(n: int, *, seed: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int]) -> list:
    """`n` requests, arrived in id order over the last `n` ms (wall clock, as vLLM stamps them)."""
    rng = random.Random(seed)
    start_s = time.time() - n * 1e-3
    return [
        make_request(f"r{i}", rng.randint(*prompt_len), rng.randint(*max_tokens), arrival_s=start_s + i * 1e-3)
        for i in range(n)
    ]


def _poisson_arrivals(requests: list, *, seed: int, per_step: float) -> dict[int, list]:
    """Spread requests over steps with exponential gaps of mean 1 / per_step steps."""
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    t = 0.0
    for request in requests:
        t += rng.expovariate(per_step)
        arrivals.setdefault(int(t), []).append(request)
    return arrivals


@pytest.mark.parametrize("cls", [Scheduler, AsyncScheduler])
def test_harness_chunks_prefill_without_tokens_then_decodes_to_max_tokens(cls):
    """The harness itself, on stock vLLM: a 200-token prompt under a 64-token step budget takes
    four steps and yields nothing until its last chunk; then one token a step up to max_tokens."""
    driver = Driver(make_scheduler(cls, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512))
    driver.add([make_request("only", 200, 5)])
    records = []

    summary = driver.run(100, on_step=lambda step, record: records.append(record))

    assert [r.num_scheduled_tokens for r in records[:4]] == [64, 64, 64, 8]
    assert summary.tokens == 5
    assert summary.finished == 1
    # Sync: the token of the step that completes the prefill comes back in that step. Async: one
    # step later, as step N's output is processed after step N + 1 is scheduled.
    first_token_step = next(i for i, r in enumerate(records) if r.tokens)
    assert first_token_step == (3 if cls is Scheduler else 4)


@pytest.mark.parametrize("cls", OURS)
def test_batch_cap_holds_on_every_step_while_caps_change_at_run_time(cls):
    caps_by_step = {0: 64, 120: 8, 240: 3, 360: 32}
    scheduler = make_scheduler(cls, max_num_seqs=256, max_num_batched_tokens=512, num_gpu_blocks=20_000)
    requests = _random_load(400, seed=1, prompt_len=(16, 300), max_tokens=(8, 120))
    cap = caps_by_step[0]
    scheduler.apply_control(batch_cap(cap))
    most_scheduled_by_cap: dict[int, int] = {}

    def check(step: int, record: StepRecord) -> None:
        nonlocal cap
        assert record.num_scheduled_reqs <= cap, f"step {step}: {record.num_scheduled_reqs} scheduled under cap {cap}"
        if record.admitted:
            assert record.num_running <= cap, (
                f"step {step}: admitted {record.admitted} with {record.num_running} running"
            )
        most_scheduled_by_cap[cap] = max(most_scheduled_by_cap.get(cap, 0), record.num_scheduled_reqs)
        if step + 1 in caps_by_step:
            cap = caps_by_step[step + 1]
            scheduler.apply_control(batch_cap(cap))

    driver = Driver(scheduler, forward_s=accelerator_like_forward_s)
    summary = driver.run(20_000, arrivals=_poisson_arrivals(requests, seed=2, per_step=2.0), on_step=check)

    assert summary.finished == len(requests)
    # The load filled every cap, so each bound above was tested, not idle.
    assert most_scheduled_by_cap == {64: 64, 8: 8, 3: 3, 32: 32}
    stats = scheduler.stats()
    assert stats.cap_violations == 0
    assert stats.batch_cap <= 32
    assert stats.max_batch_seen == 64


@pytest.mark.parametrize("cls", OURS)
def test_batch_cap_never_rises_above_the_configured_maxima(cls):
    scheduler = make_scheduler(cls, max_num_seqs=16, max_num_batched_tokens=1024, num_gpu_blocks=20_000)
    driver = Driver(scheduler, forward_s=accelerator_like_forward_s)
    driver.add(_random_load(60, seed=3, prompt_len=(16, 64), max_tokens=(16, 32)))
    asked = 4
    scheduler.apply_control(batch_cap(asked))
    most_scheduled: dict[int, int] = {}

    def track(step: int, record: StepRecord) -> None:
        nonlocal asked
        most_scheduled[asked] = max(most_scheduled.get(asked, 0), record.num_scheduled_reqs)
        assert record.num_scheduled_tokens <= 1024
        if step == 9:
            asked = 10_000
            scheduler.apply_control(batch_cap(asked))

    summary = driver.run(5_000, on_step=track)

    assert summary.finished == 60
    assert most_scheduled == {4: 4, 10_000: 16}
    stats = scheduler.stats()
    assert stats.batch_cap == 16
    assert stats.token_budget <= 1024
    # vLLM sized the model runner's buffers from max_num_seqs; no limit may move above it.
    assert scheduler.max_num_running_reqs == 16
    assert scheduler.max_num_active_reqs <= 16


@pytest.mark.parametrize(("ours", "stock"), OURS_AND_STOCK)
def test_fewer_preemptions_than_stock_vllm_on_an_oversubscribed_load(ours, stock):
    # Every prompt fits the cache at admission (96 x <=192 tokens < 900 blocks x 16), but the
    # outputs do not (the whole load needs ~2,800 blocks): stock vLLM admits all and preempts
    # when decodes run out of blocks.
    def run(cls):
        scheduler = make_scheduler(cls, max_num_seqs=256, max_num_batched_tokens=2048, num_gpu_blocks=900)
        driver = Driver(scheduler)
        requests = _random_load(96, seed=4, prompt_len=(64, 192), max_tokens=(256, 512))
        driver.add(requests)
        return driver.run(50_000), sum(r.max_tokens for r in requests), scheduler

    stock_summary, expected_tokens, _ = run(stock)
    our_summary, _, scheduler = run(ours)

    assert stock_summary.finished == our_summary.finished == 96
    assert stock_summary.tokens == our_summary.tokens == expected_tokens
    assert stock_summary.preemptions >= 20, "the load must really over-subscribe the cache"
    # Admission keeps 128 tokens of growth per running request free (the default horizon): a
    # fraction of stock's preemptions, without shrinking batches so far that steps multiply.
    assert our_summary.preemptions <= stock_summary.preemptions // 4
    assert our_summary.steps <= stock_summary.steps * 1.25
    assert scheduler.stats().preemptions == our_summary.preemptions


@pytest.mark.parametrize("cls", OURS)
def test_higher_priority_waiting_requests_are_admitted_first(cls):
    scheduler = make_scheduler(cls, max_num_seqs=256, num_gpu_blocks=20_000, policy="priority")
    scheduler.apply_control(batch_cap(2))
    priorities = [5, 3, 7, 1, 6, 0, 4, 2]  # lower number = more urgent, as in vLLM
    start_s = time.time() - 1.0
    early = [make_request(f"p{p}", 32, 4, priority=p, arrival_s=start_s + i * 1e-3) for i, p in enumerate(priorities)]
    urgent = make_request("urgent", 32, 4, priority=-1)  # arrives now, after all of them
    admitted: list[str] = []
    driver = Driver(scheduler)

    summary = driver.run(
        1_000, arrivals={0: early, 1: [urgent]}, on_step=lambda step, record: admitted.extend(record.admitted)
    )

    assert summary.finished == 9
    assert summary.preemptions == 0
    # p0 and p1 take the two slots at once; the late urgent request goes ahead of all that wait.
    assert admitted == ["p0", "p1", "urgent", "p2", "p3", "p4", "p5", "p6", "p7"]


@pytest.mark.parametrize("cls", OURS)
def test_runs_with_defaults_when_no_meter_or_scheduler_config_is_set(cls):
    scheduler = make_scheduler(cls, max_num_seqs=32, max_num_batched_tokens=1024, num_gpu_blocks=20_000)

    stats = scheduler.stats()
    assert {key: getattr(stats, key) for key in DEFAULT_STATS} == {
        "batch_cap": 32,
        "token_budget": 1024,
        "preemptions": 0,
        "cap_violations": 0,
        "max_batch_seen": 0,
        "steps": 0,
    }
    driver = Driver(scheduler, forward_s=accelerator_like_forward_s)
    driver.add(_random_load(50, seed=5, prompt_len=(16, 200), max_tokens=(8, 64)))
    most_scheduled = 0

    def track(step: int, record: StepRecord) -> None:
        nonlocal most_scheduled
        most_scheduled = max(most_scheduled, record.num_scheduled_reqs)

    summary = driver.run(5_000, on_step=track)

    assert summary.finished == 50
    stats = scheduler.stats()
    assert stats.batch_cap == 32
    assert stats.max_batch_seen == most_scheduled == 32
    assert stats.steps > 0
    assert stats.cap_violations == 0


@pytest.mark.parametrize("cls", OURS)
def test_prefill_chunks_are_limited_only_while_some_request_decodes(cls, monkeypatch):
    """The token budget keeps a decode step within the TPOT target. With nothing decoding it
    protects nobody, so a lone prompt is computed in one step (its TTFT is not stretched); once a
    request decodes, a second long prompt is chunked to the budget."""
    monkeypatch.setenv(SCHEDULER_ENV, settings_json(SchedulerSettings(slo_tpot_s=0.05, profile=str(CPU_PROFILE))))
    scheduler = make_scheduler(cls, max_num_seqs=8, max_num_batched_tokens=2048, num_gpu_blocks=20_000)
    budget = scheduler._decision.token_budget  # the policy's budget (stats show the one in force)
    assert budget < 600, "the SLO and profile must make the budget bind for this test to mean anything"
    driver = Driver(scheduler)
    driver.add([make_request("first", 1200, 40)])
    records = []
    driver.run(3, on_step=lambda step, record: records.append(record))
    assert records[0].num_scheduled_tokens == 1200  # the whole prompt at once: nothing decodes yet
    driver.add([make_request("second", 1200, 5)])
    driver.run(3, on_step=lambda step, record: records.append(record))
    assert max(r.num_scheduled_tokens for r in records[3:]) <= max(budget, 8)
