"""The engine replica: Ray Serve LLM's `LLMServer` (vLLM `AsyncLLM` + vLLM's OpenAI serving
classes), plus a once-a-second report to the state hub (liveness and `vllm:*` metrics).

vLLM's PrometheusStatLogger records into this process's default registry; the report carries
those families, so the ingress can expose every replica's engine metrics on one `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import REGISTRY
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer

from factory.hub import REPORT_INTERVAL_S

log = logging.getLogger("factory.engine")


class FactoryLLMServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, *, hub: DeploymentHandle, **kwargs):
        await super().__init__(llm_config, **kwargs)  # returns once the engine is up
        self._hub = hub
        self._model = llm_config.model_id
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        log.info("replica %s of %s serving", self._replica_id, self._model)

    async def _start_engine(self) -> None:
        # LLMServer._start_engine also pushes a Ray usage-telemetry report, which creates a
        # detached actor process on the head node (~225 MB resident) that nobody asked for.
        await self.engine.start()

    async def _report_forever(self) -> None:
        while True:
            try:
                # A dead engine stops reporting, so the hub ages this replica out of /ready.
                await self.engine.check_health()
                families = [f for f in REGISTRY.collect() if f.name.startswith("vllm:")]
                await self._hub.report.remote(self._replica_id, self._model, families)
            except Exception as err:  # the hub may be restarting; liveness resumes next tick
                log.warning("report to state hub failed: %s", err)
            await asyncio.sleep(REPORT_INTERVAL_S)


class LocalModelCallback(CallbackBase):
    """For models already on local disk: skip Ray Serve LLM's per-node download task.

    That task only fetches files a local directory already has, and costs a Ray worker process
    plus ~10 s of imports on every replica start. (On a multi-node cluster the directory must
    exist at the same path on every node; the README says so.)
    """

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
