"""The engine replica: Ray Serve LLM's `LLMServer` (vLLM `AsyncLLM` + vLLM's OpenAI serving
classes), plus what the factory adds per replica:

- metering: the engine meter (inside vLLM's EngineCore, see factory/engine/meter.py) reports
  each request's energy here; a finished request's usage gets `energy_joules` and `cost`, is
  settled in the ledger (committed before the client sees the usage), and only then is sent;
- a once-a-second report to the state hub: liveness, vLLM's `vllm:*` families and the replica's
  `factory_*` power, energy and token families;
- the power governor's control, with the energy-aware scheduler: the replica reports its power
  to the governor (a long poll) and passes each new cap down the engine's control socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import ray
from prometheus_client import REGISTRY
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer

from factory.config import CostConfig, TelemetryConfig
from factory.engine.meter import XARG_REQUEST, XARG_TENANT
from factory.engine.replica_meter import ReplicaMeter
from factory.hub import REPORT_INTERVAL_S
from factory.metering.cost import money_json
from factory.metering.service import cost_model
from factory.routing.stats import QUEUE_GAUGES, queue_lengths, routing_stats

log = logging.getLogger("factory.engine")

# The ingress says whether the client itself asked for a usage chunk (it always asks vLLM).
XARG_CLIENT_USAGE = "factory_client_usage"
FINAL_RECORD_TIMEOUT_S = 5.0


class FactoryLLMServer(LLMServer):
    async def __init__(
        self,
        llm_config: LLMConfig,
        *,
        hub: DeploymentHandle,
        ledger: DeploymentHandle,
        governor: DeploymentHandle,
        metering: dict[str, Any],
        **kwargs,
    ):
        telemetry = TelemetryConfig(**metering["telemetry"])
        self._meter = ReplicaMeter(telemetry, metering.get("scheduler")) if telemetry.enabled else None
        self._governor = governor
        self._control: dict[str, Any] = {"version": 0, "power_cap_w": None, "level": 0, "reason": "within budget"}
        if self._meter is not None:
            self._meter.export_engine_env()  # before the engine (and its EngineCore process) starts
            self._meter.start()
        self._cost = cost_model(CostConfig(**metering["cost"]))
        self._ledger = ledger
        self._background: set[asyncio.Task] = set()
        await super().__init__(llm_config, **kwargs)  # returns once the engine is up
        self._hub = hub
        self._model = llm_config.model_id
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._node = ray.get_runtime_context().get_node_id()
        loop = asyncio.get_running_loop()
        self._reporter = loop.create_task(self._report_forever())
        self._governed = loop.create_task(self._govern_forever()) if metering.get("scheduler") else None
        log.info("replica %s of %s serving", self._replica_id, self._model)

    async def _start_engine(self) -> None:
        # LLMServer._start_engine also pushes a Ray usage-telemetry report, which creates a
        # detached actor process on the head node (~225 MB resident) that nobody asked for.
        await self.engine.start()

    async def chat(self, request, raw_request_info=None):
        return self._metered(request, await super().chat(request, raw_request_info))

    async def completions(self, request, raw_request_info=None):
        return self._metered(request, await super().completions(request, raw_request_info))

    async def _metered(self, request, stream: AsyncGenerator) -> AsyncGenerator:
        """Pass the response through; price, settle and enrich its usage on the way out."""
        xargs = request.vllm_xargs or {}
        key = str(xargs.get(XARG_REQUEST, request.request_id))
        parts = _engine_requests(request)
        tenant = str(xargs.get(XARG_TENANT, "anonymous"))
        client_usage = bool(xargs.get(XARG_CLIENT_USAGE, 1))
        started = datetime.now(UTC)
        settled = failed = False
        try:
            async for item in stream:
                if isinstance(item, list):  # a batch of SSE strings
                    out = []
                    for chunk in item:
                        if isinstance(chunk, str) and chunk.startswith("data: {") and '"usage"' in chunk:
                            payload = json.loads(chunk[6:])
                            if payload.get("usage") and not payload.get("choices"):
                                payload["usage"] = await self._settle(key, parts, tenant, payload["usage"], started)
                                settled = True
                                if not client_usage:
                                    continue
                                chunk = f"data: {json.dumps(payload)}\n\n"
                        elif not isinstance(chunk, str):
                            failed = True
                        out.append(chunk)
                    if out:
                        yield out
                elif getattr(item, "usage", None) is not None:  # a whole response
                    usage = await self._settle(key, parts, tenant, item.usage.model_dump(), started)
                    settled = True
                    for name in ("energy_joules", "energy_source", "cost"):
                        setattr(item.usage, name, usage[name])
                    yield item
                else:  # an ErrorResponse
                    failed = True
                    yield item
        finally:
            if not settled:
                task = asyncio.get_running_loop().create_task(
                    self._settle_unfinished(key, parts, tenant, started, failed)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _settle(
        self, key: str, parts: int, tenant: str, usage: dict[str, Any], started: datetime
    ) -> dict[str, Any]:
        rec = await self._final(key, parts)
        source = rec["source"] if rec else ("missing" if self._meter else "off")
        energy_j, busy_s = (rec["energy_j"], rec["busy_s"]) if rec else (0.0, 0.0)
        tokens = (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        cost = await self._charge(key, tenant, started, tokens, energy_j, busy_s, source, "completed")
        return {
            **usage,
            "energy_joules": round(energy_j, 6),
            "energy_source": source,
            "cost": money_json(cost, self._cost.currency),
        }

    async def _settle_unfinished(self, key: str, parts: int, tenant: str, started: datetime, failed: bool) -> None:
        """A request that ended without usage (client gone, timeout, error): charge what the
        engine did for it up to the end, or release its reservation if the engine never ran it."""
        try:
            rec = await self._final(key, parts)
            if rec is None:
                await self._ledger.release.remote(key)
                return
            tokens = (rec["prompt_tokens"], rec["completion_tokens"])
            status = "failed" if failed else "aborted"
            await self._charge(key, tenant, started, tokens, rec["energy_j"], rec["busy_s"], rec["source"], status)
        except Exception:
            log.exception("settling unfinished request %s failed", key)

    async def _charge(
        self,
        key: str,
        tenant: str,
        started: datetime,
        tokens: tuple[int, int],
        energy_j: float,
        busy_s: float,
        source: str,
        status: str,
    ) -> Decimal:
        """Price a request and settle it in the ledger; returns once the row is committed."""
        finished = datetime.now(UTC)
        cost = self._cost.cost(energy_j=energy_j, busy_s=busy_s, at=finished)
        await self._ledger.settle.remote(
            {
                "request_id": key,
                "tenant": tenant,
                "prompt_tokens": tokens[0],
                "completion_tokens": tokens[1],
                "energy_j": energy_j,
                "energy_source": source,
                "cost": cost,
                "currency": self._cost.currency,
                "model": self._model,
                "replica": self._replica_id,
                "status": status,
                "started_at": started,
                "finished_at": finished,
            }
        )
        return cost

    async def _final(self, key: str, parts: int) -> dict[str, Any] | None:
        return await self._meter.final(key, FINAL_RECORD_TIMEOUT_S, parts) if self._meter else None

    async def _report_forever(self) -> None:
        while True:
            try:
                # A dead engine stops reporting, so the hub ages this replica out of /ready.
                await self.engine.check_health()
                families = [f for f in REGISTRY.collect() if f.name.startswith("vllm:")]
                families += self._meter.families() if self._meter else []
                await self._hub.report.remote(self._replica_id, self._model, families)
            except Exception as err:  # the hub may be restarting; liveness resumes next tick
                log.warning("report to state hub failed: %s", err)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _govern_forever(self) -> None:
        """Report power to the governor; pass every new control down to the engine's scheduler."""
        while True:
            try:
                report = self._meter.power_report()
                ctrl = await self._governor.exchange.remote(
                    self._replica_id, self._node, report, self._control["version"]
                )
                if ctrl.get("version", 0) > self._control["version"]:
                    self._control = ctrl
                    await self._meter.send_control(
                        {
                            "version": ctrl["version"],
                            "power_cap_w": ctrl["power_cap_w"],
                            "sent_at": ctrl["sent_at"],
                            "forwarded_at": time.time(),
                        }
                    )
                if report is None:  # the engine has not sampled yet
                    await asyncio.sleep(0.2)
            except Exception as err:  # the governor may be restarting; the last cap stays in force
                log.warning("power governor unreachable: %s", err)
                await asyncio.sleep(1.0)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's hook, polled every `request_routing_stats_period_s`: this replica's queue and
        power state for EnergyAwareRouter (factory/routing/), beside Ray Serve LLM's own stats."""
        running, waiting = queue_lengths(REGISTRY.restricted_registry(QUEUE_GAUGES).collect())
        return {
            **await super().record_routing_stats(),
            **routing_stats(
                running=running,
                waiting=waiting,
                max_num_seqs=self._llm_config.engine_kwargs["max_num_seqs"],
                control=self._control_stats(),
            ),
        }

    def _control_stats(self) -> dict[str, Any]:
        """This replica's throttle state, for the router."""
        sched = ((self._meter.snapshot if self._meter else None) or {}).get("scheduler") or {}
        return {
            "throttle_level": self._control["level"],
            "power_cap_w": self._control["power_cap_w"],
            "batch_cap": sched.get("batch_cap"),
            "efficient_batch": sched.get("efficient_batch"),
        }


def _engine_requests(request: Any) -> int:
    """How many engine requests vLLM makes of one API request: one per choice (`n`) and, for
    completions, per prompt in a batch. Each reports its own energy under the same key."""
    count = getattr(request, "n", None) or 1
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        count *= len(prompt)
    return count


class LocalModelCallback(CallbackBase):
    """For models already on local disk: skip Ray Serve LLM's per-node download task.

    That task only fetches files a local directory already has, and costs a Ray worker process
    plus ~10 s of imports on every replica start. (On a multi-node cluster the directory must
    exist at the same path on every node; the README says so.)
    """

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
