"""vLLM scheduler classes with the factory's meter attached (`scheduler_cls`).

They change no scheduling decision: they tell the engine meter (factory/engine/meter.py) what
each step carried and when it ran, and which requests ended. The energy-aware batch policy will
hook in here too. Two classes because vLLM picks its async scheduler on GPUs and the plain one
on CPUs, and a custom class must subclass the matching one.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from factory.engine.meter import EngineMeter


class _Metered:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._meter = EngineMeter.from_env()

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        if self._meter is not None:
            self._meter.on_schedule(id(out), out.num_scheduled_tokens, self.requests)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._meter is not None:
            self._meter.on_step_done(id(scheduler_output), outputs.values())
        return outputs

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        if self._meter is not None and finished:
            # The front end also finishes requests that hit a stop string: those completed.
            status = "aborted" if finished_status == RequestStatus.FINISHED_ABORTED else "completed"
            self._meter.on_finished_outside([r.request_id for r in finished], status)
        return finished

    def shutdown(self) -> None:
        super().shutdown()
        if self._meter is not None:
            self._meter.close()


class MeteringScheduler(_Metered, Scheduler):
    """vLLM's synchronous scheduler, metered (CPU replicas)."""


class AsyncMeteringScheduler(_Metered, AsyncScheduler):
    """vLLM's async scheduler, metered (GPU replicas, where vLLM schedules step N+1 while N runs)."""
