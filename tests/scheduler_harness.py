"""Drive vLLM's real V1 scheduler with no model, the way vLLM's own scheduler tests do.

A scheduler is built from a real `VllmConfig` (the tiny checkpoint from `factory.models`, so no
network) and a synthetic KV-cache config: one full-attention group of `num_gpu_blocks` blocks.
`Driver` then plays the engine core: it calls `schedule()`, answers with a `ModelRunnerOutput`
that gives one token to every scheduled request whose prefill is complete (a request in the
middle of a chunked prefill gets none, as from the real model runner), and feeds it back through
`update_from_output()`. An async scheduler is driven as `EngineCore.step_with_batch_queue` drives
it on a GPU: step N+1 is scheduled before step N's output comes back.

Everything the scheduler decides (admission, chunking, KV allocation, preemption) is vLLM's or
the subclass's own; only the forward pass is missing, so thousands of steps run per second.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# A scheduler needs the checkpoint's config only; nothing may reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from factory.models import build_tiny_model  # noqa: E402

BLOCK_SIZE = 16
# Every sampled token is this id; requests ignore EOS, so only max_tokens ends them.
SAMPLED_TOKEN_ID = 7
# EngineCore's batch queue depth under async scheduling (one step executing, one being scheduled).
ASYNC_BATCH_QUEUE_SIZE = 2


@functools.cache
def _tiny_model_dir() -> Path:
    """One tiny checkpoint per process: ModelConfig reads its config.json, no weights are loaded."""
    root = Path(tempfile.mkdtemp(prefix="sched-harness-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_model(root / "tiny-llama")


@functools.cache
def _block_hasher(block_size: int) -> Callable:
    """The hasher EngineCore gives every request when prefix caching is on (sha256, vLLM's default)."""
    hash_fn = get_hash_fn_by_name(CacheConfig.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(block_size, hash_fn)


def make_scheduler(
    cls: type[Scheduler] = Scheduler,
    *,
    max_num_seqs: int = 256,
    max_num_active_seqs: int | None = None,
    max_num_batched_tokens: int = 8192,
    num_gpu_blocks: int = 10_000,
    block_size: int = BLOCK_SIZE,
    max_model_len: int = 2048,
    policy: str = "fcfs",
    enable_prefix_caching: bool = True,
) -> Scheduler:
    """Build `cls` as vLLM's engine core would, over a synthetic cache of `num_gpu_blocks` blocks.

    `max_num_active_seqs` is vLLM's admission limit below `max_num_seqs` (None: the same).
    Async scheduling follows the class: vLLM's CPU platform switches it off in VllmConfig, so it
    is switched back on afterwards for an AsyncScheduler, as a GPU replica would have it.
    """
    is_async = issubclass(cls, AsyncScheduler)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_active_seqs=max_num_active_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
        policy=policy,
        async_scheduling=is_async,
    )
    model_config = ModelConfig(
        model=str(_tiny_model_dir()), max_model_len=max_model_len, dtype="float32", seed=0, skip_tokenizer_init=True
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config)
    vllm_config.scheduler_config.async_scheduling = is_async
    vllm_config.cache_config.num_gpu_blocks = num_gpu_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=num_gpu_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"], FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
            )
        ],
    )
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=True,
    )


def make_request(
    request_id: str,
    prompt_len: int,
    max_tokens: int,
    *,
    priority: int = 0,
    arrival_s: float | None = None,
    extra_args: dict | None = None,
    block_size: int = BLOCK_SIZE,
) -> Request:
    """A request as EngineCore would build it: EOS ignored, so it runs to exactly `max_tokens`.

    The first prompt token is derived from the id, so no two requests share a cached prefix.
    `extra_args` is SamplingParams.extra_args, where vLLM puts an API request's `vllm_xargs`.
    """
    prompt = [zlib.crc32(request_id.encode())] + list(range(1, prompt_len))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_s,
        priority=priority,
        block_hasher=_block_hasher(block_size),
    )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one engine step did. Under async scheduling the output fields belong to an earlier
    schedule than the scheduling fields: the step whose output came back during this one."""

    num_scheduled_reqs: int  # requests given tokens by this step's schedule()
    num_scheduled_tokens: int
    num_running: int  # len(scheduler.running) right after schedule()
    admitted: tuple[str, ...]  # new and resumed requests moved into RUNNING by this schedule(), in order
    preempted: frozenset[str]  # preempted by this schedule()
    tokens: int  # output tokens delivered by the update_from_output() of this step
    finished: frozenset[str]  # requests that update finished
    schedule_s: float  # wall time of schedule()
    update_s: float  # wall time of update_from_output(), 0 when none ran


@dataclass(frozen=True, slots=True)
class Summary:
    steps: int
    finished: int
    preemptions: int  # sum of Request.num_preemptions over every request the driver added
    max_running: int
    tokens: int


class Driver:
    """Plays the engine core around a scheduler (see the module docstring).

    `forward_s(num_reqs, num_tokens)`, if given, is how long the missing forward pass of a step
    takes: the driver waits that long (one step at a time on the device, overlapping the next
    schedule() under async scheduling) before handing the step's output back. A scheduler that
    learns step times from the wall clock then sees a model's curve, not its own Python's.
    """

    def __init__(self, scheduler: Scheduler, *, forward_s: Callable[[int, int], float] | None = None):
        self.scheduler = scheduler
        self.requests: dict[str, Request] = {}
        self._forward_s = forward_s
        self._device_free_at_s = 0.0  # time.monotonic() at which the emulated device goes idle
        self._queue_size = ASYNC_BATCH_QUEUE_SIZE if isinstance(scheduler, AsyncScheduler) else 1
        # (scheduled step, its model output, monotonic time its forward pass ends)
        self._in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput, float]] = deque()

    def add(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.requests[request.request_id] = request
            self.scheduler.add_request(request)

    def busy(self) -> bool:
        return self.scheduler.has_requests() or bool(self._in_flight)

    def step(self) -> StepRecord:
        """One turn of EngineCore.step (sync) or step_with_batch_queue (async)."""
        scheduler = self.scheduler
        out = None
        schedule_s = 0.0
        if scheduler.has_requests():
            start = time.perf_counter()
            out = scheduler.schedule()
            schedule_s = time.perf_counter() - start
            self._in_flight.append((out, self._model_output(out), self._forward_done_at(out)))
        executed = out is not None and out.total_num_scheduled_tokens > 0
        tokens, finished, update_s = 0, frozenset(), 0.0
        queue_full = len(self._in_flight) >= self._queue_size
        if self._in_flight and (queue_full or not (executed or scheduler.has_requests())):
            tokens, finished, update_s = self._update(*self._in_flight.popleft())
        if out is None:
            return StepRecord(0, 0, len(scheduler.running), (), frozenset(), tokens, finished, 0.0, update_s)
        admitted = tuple(r.req_id for r in out.scheduled_new_reqs) + tuple(
            r for r in out.scheduled_cached_reqs.req_ids if r in out.scheduled_cached_reqs.resumed_req_ids
        )
        return StepRecord(
            num_scheduled_reqs=len(out.num_scheduled_tokens),
            num_scheduled_tokens=out.total_num_scheduled_tokens,
            num_running=len(scheduler.running),
            admitted=admitted,
            preempted=frozenset(out.preempted_req_ids),
            tokens=tokens,
            finished=finished,
            schedule_s=schedule_s,
            update_s=update_s,
        )

    def run(
        self,
        max_steps: int,
        *,
        arrivals: Mapping[int, Iterable[Request]] | None = None,
        on_step: Callable[[int, StepRecord], None] | None = None,
    ) -> Summary:
        """Step until every request has finished (and no arrival is pending) or `max_steps` ran.

        `arrivals[i]` is added just before step i; `on_step(i, record)` runs after step i, and may
        change the scheduler (apply a cap) before step i + 1.
        """
        pending = dict(arrivals or {})
        steps = finished = tokens = max_running = 0
        while steps < max_steps and (self.busy() or pending):
            if steps in pending:
                self.add(pending.pop(steps))
            record = self.step()
            finished += len(record.finished)
            tokens += record.tokens
            max_running = max(max_running, record.num_running)
            if on_step is not None:
                on_step(steps, record)
            steps += 1
        preemptions = sum(r.num_preemptions for r in self.requests.values())
        return Summary(steps, finished, preemptions, max_running, tokens)

    def _model_output(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """The model runner's answer: a token for each request whose prefill this step completes or
        that is decoding; none for a chunk in the middle of a prefill (vLLM discards that sample)."""
        requests = self.scheduler.requests
        req_ids = list(out.num_scheduled_tokens)
        sampled = [[] if requests[r].is_prefill_chunk else [SAMPLED_TOKEN_ID] for r in req_ids]
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
        )

    def _forward_done_at(self, out: SchedulerOutput) -> float:
        if self._forward_s is None or not out.total_num_scheduled_tokens:
            return 0.0
        start_s = max(time.monotonic(), self._device_free_at_s)
        self._device_free_at_s = start_s + self._forward_s(
            len(out.num_scheduled_tokens), out.total_num_scheduled_tokens
        )
        return self._device_free_at_s

    def _update(
        self, out: SchedulerOutput, model_output: ModelRunnerOutput, done_at_s: float
    ) -> tuple[int, frozenset[str], float]:
        wait_s = done_at_s - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        start = time.perf_counter()
        engine_outputs = self.scheduler.update_from_output(out, model_output)
        update_s = time.perf_counter() - start
        tokens, finished = 0, set()
        for outputs in engine_outputs.values():
            for output in outputs.outputs:
                tokens += len(output.new_token_ids)
                if output.finish_reason is not None:
                    finished.add(output.request_id)
        return tokens, frozenset(finished), update_s
