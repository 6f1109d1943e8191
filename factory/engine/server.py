"""The engine replica: Ray Serve LLM's `LLMServer` (vLLM `AsyncLLM` + vLLM's OpenAI serving
classes) as the factory's HTTP ingress. HAProxy forwards each client connection to the replica
its router picked; the replica answers the request whole (factory/api/app.py):

- the model it serves is the hub's answer at start (every replica of the one engine deployment
  can serve any configured model; the router sends each request to a replica of its model);
- keys, reservation and the power gate in the replica, at vLLM's own engine call
  (factory/api/admission.py); settlement from the engine meter's final record (billing.py);
- a once-a-second report to the state hub: liveness, vLLM's `vllm:*` families and the replica's
  `factory_*` power, energy, token and HTTP families; twice a second, readiness and drain state
  back from it;
- the power governor's control: the replica reports its power (a long poll) and passes each new
  cap down the engine's control socket; it follows the governor's admission rules the same way.

Shared state (ledger, governor, hub) is called once per request or polled off the request path;
nothing here runs per token.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import ray
from prometheus_client import REGISTRY
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer

from factory.api.admission import MeteredEngineClient
from factory.api.app import ReplicaContext, build_app
from factory.api.metrics import factory_metrics
from factory.config import TelemetryConfig
from factory.engine.billing import Billing
from factory.engine.replica_meter import ReplicaMeter
from factory.engine.vllm_seams import serving_objects
from factory.engine.wire import Control
from factory.hub import REPORT_INTERVAL_S
from factory.metering.service import cost_model
from factory.precision import Plan
from factory.routing.stats import QUEUE_GAUGES, queue_lengths, routing_stats

log = logging.getLogger("factory.engine")

POLL_S = 0.5  # readiness and drain state from the hub
NODES_REFRESH_S = 30.0  # the cluster's node addresses (who may call a keyless factory)


class FactoryLLMServer(LLMServer):
    async def __init__(
        self,
        llm_config: LLMConfig,
        *,
        models: dict[str, LLMConfig],
        hub: DeploymentHandle,
        ledger: DeploymentHandle,
        governor: DeploymentHandle,
        settings: dict[str, Any],
        **kwargs,
    ):
        """Returns once the engine serves: only then does Serve start the replica's HTTP server and
        HAProxy send it requests. (vLLM's engine start blocks the event loop for most of its
        duration, so a replica could not answer meanwhile anyway; while no replica of the factory
        is up, Serve's fallback proxy holds requests until one is.)"""
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._hub, self._ledger, self._governor = hub, ledger, governor
        self._control: dict[str, Any] = {"version": 0, "power_cap_w": None, "level": 0, "reason": "within budget"}
        self._model = await hub.assign.remote(self._replica_id)
        config = models[self._model]
        self._precision = await asyncio.to_thread(
            Plan.for_engine,
            self._model,
            config.model_loading_config.model_source,
            config.engine_kwargs,
            settings["precision_reference"].get(self._model),
        )
        self._init_shared(_with_dtype(config, self._precision.dtype), **kwargs)  # LLMServer's, engine not started
        telemetry: TelemetryConfig = settings["telemetry"]
        self._scheduler = settings["scheduler"]
        self._meter = ReplicaMeter(telemetry, self._scheduler) if telemetry.enabled else None
        if self._meter is not None:
            self._meter.export_engine_env()  # before the engine (and its EngineCore process) starts
            self._meter.start()
        cost = cost_model(settings["cost"])
        self._rates = settings["rates"][self._model]
        category = settings["categories"][self._model]
        self._ctx = ReplicaContext(
            model=self._model,
            category=category,
            models=dict(settings["max_model_len"]),
            billing=Billing(self._meter, cost, ledger, self._model, self._replica_id, self._rates, category),
            hub=hub,
            ledger=ledger,
            governor=governor,
            auth_required=settings["auth_required"],
            local_only=settings["local_only"],
            currency=cost.currency,
            replica_id=self._replica_id,
        )
        self._node = ray.get_runtime_context().get_node_id()
        # Polling from now on keeps this replica's model claim alive while its engine starts.
        self._tasks = [asyncio.get_running_loop().create_task(self._poll_forever())]
        log.info("replica %s serves %s; starting its engine", self._replica_id, self._model)
        await self._start_serving()

    async def _start_serving(self) -> None:
        await self.start()  # LLMServer: the engine, vLLM's serving objects
        serving = serving_objects(self.engine)
        if self._precision.pending and await self._precision.run(serving.engine_client) == "float32":
            # Its 16-bit answers are not float32's on this machine: the same engine again, in float32.
            serving.engine_client.shutdown()
            await self.engine.shutdown()
            self._llm_config = _with_dtype(self._llm_config, "float32")
            await self.start()
            serving = serving_objects(self.engine)
        serving.install_engine_client(
            MeteredEngineClient(
                serving.engine_client,
                serving.prompt_len,
                priorities=self._scheduler is not None,
                rates=self._rates,
            )
        )
        self._ctx.serving = serving
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._report_forever()), loop.create_task(self._follow_admission())]
        if self._scheduler is not None:
            self._tasks.append(loop.create_task(self._govern_forever()))
        if self._ctx.local_only:
            self._tasks.append(loop.create_task(self._watch_nodes()))
        # What exists now (vLLM, torch, the app) lives as long as the replica: frozen out of the
        # collector's sight (as vLLM does in its EngineCore), a full collection scans only what
        # requests made since, instead of stalling every stream for up to seconds.
        gc.collect()
        gc.freeze()
        log.info("replica %s of %s serving", self._replica_id, self._model)

    async def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress app: the factory's routes, nothing of vLLM's own app."""
        return build_app(self._ctx)

    async def _start_engine(self) -> None:
        # LLMServer._start_engine also pushes a Ray usage-telemetry report, which creates a
        # detached actor process on the head node (~225 MB resident) that nobody asked for.
        await self.engine.start()

    # -- loops off the request path ------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        """Say how many requests are in flight (the drain waits on it); learn readiness and drain state."""
        while True:
            try:
                metrics = factory_metrics()
                self._ctx.readiness = await self._hub.replica_poll.remote(self._replica_id, metrics.in_flight_now)
                metrics.observe_readiness(self._ctx.readiness)
            except Exception as err:  # hub restarting: keep the last view
                log.warning("readiness poll failed: %s", err)
            await asyncio.sleep(POLL_S)

    async def _report_forever(self) -> None:
        while True:
            try:
                # A dead engine stops reporting, so the hub ages this replica out of /ready, and
                # the replica answers 503 until Serve's health check replaces it.
                await self.engine.check_health()
                families = [f for f in REGISTRY.collect() if f.name.startswith("vllm:")]
                families += self._meter.families() if self._meter else []
                families += factory_metrics().http_families()
                await self._hub.report.remote(self._replica_id, self._model, families)
            except Exception as err:  # the hub may be restarting; liveness resumes next tick
                log.warning("report to state hub failed: %s", err)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _follow_admission(self) -> None:
        """The governor's admission rules (a long poll: a change arrives at once)."""
        while True:
            try:
                self._ctx.admission = await self._governor.admission.remote(self._ctx.admission["version"])
            except Exception as err:
                log.warning("admission poll failed: %s", err)
                await asyncio.sleep(POLL_S)

    async def _watch_nodes(self) -> None:
        while True:
            try:
                nodes = await asyncio.to_thread(ray.nodes)
                self._ctx.node_ips = frozenset(n["NodeManagerAddress"] for n in nodes if n.get("Alive"))
            except Exception as err:
                log.warning("listing the cluster's nodes failed: %s", err)
            await asyncio.sleep(NODES_REFRESH_S)

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
                        Control(
                            version=ctrl["version"],
                            power_cap_w=ctrl["power_cap_w"],
                            sent_at=ctrl["sent_at"],
                            forwarded_at=time.time(),
                        )
                    )
                if report is None:  # the engine has not sampled yet
                    await asyncio.sleep(0.2)
            except Exception as err:  # the governor may be restarting; the last cap stays in force
                log.warning("power governor unreachable: %s", err)
                await asyncio.sleep(1.0)

    # -- Ray Serve's hooks ---------------------------------------------------------------------------
    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled every `request_routing_stats_period_s`: this replica's model, queue and power state
        for EnergyAwareRouter (factory/routing/)."""
        running, waiting = queue_lengths(REGISTRY.restricted_registry(QUEUE_GAUGES).collect())
        http = factory_metrics()
        return routing_stats(
            model=self._model,
            received=http.posts_received,
            in_flight=http.in_flight_now,
            duration_s=http.post_duration_s,
            running=running,
            waiting=waiting,
            max_num_seqs=self._llm_config.engine_kwargs["max_num_seqs"],
            control=self._control_stats(),
            engine_down=self._ctx.engine_down(),
        )

    def _control_stats(self) -> dict[str, Any]:
        """This replica's throttle state, for the router."""
        snap = self._meter.snapshot if self._meter else None
        sched = snap.scheduler if snap is not None else None
        return {
            "throttle_level": self._control["level"],
            "power_cap_w": self._control["power_cap_w"],
            "batch_cap": sched.batch_cap if sched else None,
            "efficient_batch": sched.efficient_batch if sched else None,
        }


def _with_dtype(config: LLMConfig, dtype: str | None) -> LLMConfig:
    if dtype is None or config.engine_kwargs.get("dtype") == dtype:
        return config
    config = config.model_copy(deep=True)
    config.update_engine_kwargs(dtype=dtype)  # Ray's own: also its cached engine config
    return config


class LocalModelCallback(CallbackBase):
    """For models already on local disk: skip Ray Serve LLM's per-node download task.

    That task only fetches files a local directory already has, and costs a Ray worker process
    plus ~10 s of imports on every replica start. (On a multi-node cluster the directory must
    exist at the same path on every node; the README says so.)
    """

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
