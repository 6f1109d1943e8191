"""The Ray Serve application graph, built from a FactoryConfig.

    client -> HAProxy (Ray Serve's, one public port) --POST: which replica?--> FactoryRouter
                 | one native TCP hop per request            (EnergyAwareRouter over the engines)
                 v
              FactoryEngine x replicas: FactoryLLMServer, each its own HTTP server (direct ingress):
              the factory's routes, admission and metering around vLLM's serving classes + AsyncLLM
    StateHub <- replicas: model assignment, liveness, metrics, readiness and drain state
    LedgerService <- replicas admit (key + reservation) and settle (group commit), once per request
    PowerGovernor <- replicas exchange power reports for caps and follow admission (long polls)

Built with Ray Serve LLM's own pieces (`LLMConfig`, `build_llm_deployment`, `server_cls`), so
vLLM's serving code answers every OpenAI request; the Ray internals used are in ray_seams.py.
"""

from __future__ import annotations

import ray
from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from factory.config import FactoryConfig, ModelConfig, parse_config
from factory.engine.server import FactoryLLMServer, LocalModelCallback
from factory.engine.wire import SchedulerSettings
from factory.hub import StateHub
from factory.launcher import ENGINE_DEPLOYMENT, resolve_models
from factory.metering import rates
from factory.metering.service import LedgerService
from factory.models import ResolvedModel
from factory.power.governor import PowerGovernor
from factory.ray_seams import with_ingress_request_router
from factory.routing.ingress import FactoryRouter
from factory.routing.stats import ROUTING_STATS_PERIOD_S


def on_gpu(model: ModelConfig, gpu_available: bool) -> bool:
    """Whether this model's replicas run on GPUs: its `device`, with auto = what the node has."""
    return model.device == "cuda" or (model.device == "auto" and gpu_available)


HEALTH_CHECK_PERIOD_S = 2


def request_router_config(models: list[str]) -> dict:
    """The engine deployment's request router, which FactoryRouter runs for HAProxy.

    Replicas publish their routing stats every ROUTING_STATS_PERIOD_S; the router counts its own
    picks in between, so the period bounds only how stale the replicas' own queue counts are."""
    return {
        "request_router_class": "factory.routing.router.EnergyAwareRouter",
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        "request_router_kwargs": {"models": models},
    }


def scheduler_cls(policy: str, gpu: bool, metered: bool) -> str | None:
    """The vLLM scheduler class a replica runs: ours (energy-aware, or vLLM's metered), or vLLM's own."""
    if not metered:
        return None
    kind = "EnergyAware" if policy == "energy" else "Metering"
    return f"factory.engine.scheduler.{'Async' if gpu else ''}{kind}Scheduler"


def llm_config_for(
    model: ModelConfig,
    resolved: ResolvedModel,
    gpu: bool,
    drain_timeout_s: float,
    metered: bool = True,
    scheduler_policy: str = "stock",
) -> LLMConfig:
    engine_kwargs = {
        "dtype": model.dtype,
        "enforce_eager": model.enforce_eager if model.enforce_eager is not None else not gpu,
        "max_model_len": model.max_model_len,
        "max_num_seqs": model.max_num_seqs,
        "tensor_parallel_size": model.tensor_parallel_size,
        **model.engine_kwargs,
    }
    # Metering rides on vLLM's own scheduler (the async one where vLLM schedules ahead on GPUs).
    cls = scheduler_cls(scheduler_policy, gpu, metered)
    if cls is not None:
        engine_kwargs["scheduler_cls"] = cls
    if cls is not None and scheduler_policy == "energy":
        # Tenants' priority classes order admission (the replica stamps each request's priority).
        engine_kwargs["scheduling_policy"] = "priority"
    if model.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = model.max_num_batched_tokens
    env, placement = {}, {}
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = model.gpu_memory_utilization
        # CUDA's default device order is "fastest first", NVML's is PCI bus order: make them
        # agree so the meter reads the boards this replica's CUDA_VISIBLE_DEVICES names.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    else:
        # Ray Serve LLM asks for a GPU per engine by default; on CPU the bundle holds the
        # replica's CPUs instead (the replica actor itself then reserves none).
        placement = {"placement_group_config": {"bundles": [{"CPU": model.replica_num_cpus}]}}
        # The engine argument takes bytes (VLLM_CPU_KVCACHE_SPACE, its legacy twin, whole GiB only).
        engine_kwargs["kv_cache_memory_bytes"] = int(model.cpu_kv_cache_gib * 2**30)
        # If compiled (enforce_eager: false): vllm-cpu 0.32 + torch 2.13 writes AOT artifacts it
        # cannot load back ("'function' object has no attribute 'finalize_loading'") and
        # recompiles at every start (~45 s for SmolLM2 on 2 cores); inductor's own cache works.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return LLMConfig(
        model_loading_config={"model_id": model.served_name, "model_source": resolved.path_or_id},
        engine_kwargs=engine_kwargs,
        deployment_config={
            "num_replicas": model.replicas,
            "ray_actor_options": {"num_cpus": model.replica_num_cpus if gpu else 0},
            "graceful_shutdown_timeout_s": drain_timeout_s,
        },
        runtime_env={"env_vars": env} if env else None,
        server_cls=FactoryLLMServer,
        # Our replicas report vLLM's own Prometheus families through the state hub instead of
        # Ray's metrics agent, so /metrics on the API port carries them.
        log_engine_metrics=False,
        callback_config={"callback_class": LocalModelCallback} if resolved.kind != "hf" else {},
        **placement,
    )


# The control plane (hub, ledger, governor, router) lives on the head node, where `factory serve`
# runs and Serve's controller is: a worker node that dies takes only its own replicas with it (a
# governor lost with a worker left every replica's admission poll failing until Serve replaced it).
ON_HEAD = {"node:__internal_head__": 0.001}


def _singleton(cls: type, **options):
    """A one-replica deployment on the head node that reserves no CPU and logs no access lines."""
    actor_options = {"num_cpus": 0, "resources": ON_HEAD}
    return serve.deployment(
        cls,
        name=cls.__name__,
        num_replicas=1,
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": False},
        **options,
    )


def build_application(cfg: FactoryConfig, resolved: dict[str, ResolvedModel], gpu_available: bool) -> Application:
    """The whole factory as one Serve application: the engine deployment (the HTTP ingress, every
    model's replicas), its router, and the hub, ledger and governor."""
    drain_s = cfg.server.drain_timeout_s
    # Polled several times a second: no access log.
    hub = _singleton(StateHub, max_ongoing_requests=10_000).bind(
        {m.served_name: m.replicas for m in cfg.models}, {m.served_name: m.max_num_seqs for m in cfg.models}
    )
    # A SQLite ledger's file is on the head node too.
    ledger = _singleton(
        LedgerService,
        max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=drain_s,
    ).bind(
        cfg.ledger_target,
        reservation_ttl_s=cfg.reservation_ttl_s,
        commit_interval_ms=cfg.ledger.commit_interval_ms,
        timezone=cfg.cost.timezone,
    )
    governor = _singleton(PowerGovernor, max_ongoing_requests=100_000).bind(
        cfg.power.budget.model_dump(), cfg.power.governor.model_dump()
    )
    energy = cfg.scheduler.policy == "energy"
    configs: dict[str, LLMConfig] = {}
    gpu = False
    for m in cfg.models:
        gpu = on_gpu(m, gpu_available)  # one shape for all models (config validation)
        configs[m.served_name] = llm_config_for(
            m, resolved[m.served_name], gpu, drain_s, cfg.telemetry.enabled, cfg.scheduler.policy
        )
    settings = {
        "telemetry": cfg.telemetry,
        "cost": cfg.cost,
        "scheduler": _scheduler_settings(cfg, gpu) if energy else None,
        "auth_required": cfg.auth == "required",
        "local_only": cfg.auth == "disabled" and not cfg.server.allow_unauthenticated,
        "max_model_len": {m.served_name: m.max_model_len for m in cfg.models},
        "precision_reference": {m.served_name: m.precision_reference for m in cfg.models},
        # What each model's tokens cost in factory tokens, the unit packages are sold in.
        "rates": {m.served_name: rates.for_model(m, cfg.scheduler, gpu)[0] for m in cfg.models},
        "categories": {m.served_name: m.category for m in cfg.models},
    }
    shape = next(iter(configs.values()))
    options: dict = {
        "name": ENGINE_DEPLOYMENT,
        "num_replicas": sum(m.replicas for m in cfg.models),
        # Access lines cost the engine's process CPU per request; HAProxy's own log has them.
        "logging_config": {"enable_access_log": False},
        # A dead engine fails its replica's health check at once (LLMServer.check_health asks the
        # engine); Serve replaces a replica after 3 failed checks: 6 s at this period, not 30 s.
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if cfg.routing.policy == "energy":
        options["request_router_config"] = request_router_config([m.served_name for m in cfg.models])
    engines = build_llm_deployment(
        shape,
        bind_kwargs={"models": configs, "hub": hub, "ledger": ledger, "governor": governor, "settings": settings},
        override_serve_options=options,
        deployment_cls=serve.ingress()(FactoryLLMServer),
    )
    if cfg.routing.policy != "energy":
        return engines  # HAProxy balances by least connections
    router = serve.deployment(
        FactoryRouter,
        name="FactoryRouter",
        num_replicas=1,
        # On the request path once per request, light: no CPU reserved, no per-request access line.
        ray_actor_options={"num_cpus": 0, "resources": ON_HEAD},
        max_ongoing_requests=100_000,
        logging_config={"enable_access_log": False},
    ).bind(engines)
    return with_ingress_request_router(engines, router)


def _scheduler_settings(cfg: FactoryConfig, gpu: bool) -> SchedulerSettings:
    """What the energy-aware scheduler in each engine is told (through the replica's environment)."""
    path = cfg.scheduler.profile_path(gpu)
    if path is not None and not path.exists():
        if cfg.scheduler.profile != "auto":
            raise FileNotFoundError(f"scheduler.profile {path} does not exist")
        path = None  # no bundled profile for this device: the curve is learnt from the first steps
    return SchedulerSettings(
        slo_ttft_s=cfg.scheduler.slo.ttft_s,
        slo_tpot_s=cfg.scheduler.slo.tpot_s,
        profile=str(path) if path is not None else None,
        admission_horizon_tokens=cfg.scheduler.admission_horizon_tokens,
        nvml_power_limit=cfg.power.actuators.nvml_power_limit,
        nvml_locked_clocks=cfg.power.actuators.nvml_locked_clocks,
    )


def build(args: dict) -> Application:
    """Serve's application builder (`import_path: factory.app:build`), called in a Ray task.

    From `factory serve`, `args` carries what the launcher already decided: the validated config,
    each model's resolved source, and whether the cluster has GPUs. A KubeRay RayService
    (configs/kuberay/) passes the config alone; then the sources are resolved and the cluster's
    GPUs counted here, in Serve's build task, on whichever node Ray runs it.
    """
    cfg = parse_config(args["config"], origin="application args")
    if "resolved" in args:
        resolved = {name: ResolvedModel(**r) for name, r in args["resolved"].items()}
    else:
        resolved = resolve_models(cfg)
    if "gpu_available" in args:
        gpu_available = bool(args["gpu_available"])
    else:
        # Only what has joined by now: GPU workers still starting are not counted, which is why
        # a RayService's config says `device: cuda` instead of auto.
        gpu_available = ray.cluster_resources().get("GPU", 0) > 0
    return build_application(cfg, resolved, gpu_available)
