"""How a model's config becomes Ray Serve LLM's LLMConfig, on CPU and on GPU nodes."""

from __future__ import annotations

import dataclasses

import pytest
import ray

import factory.app
from factory.app import build, llm_config_for, on_gpu
from factory.config import ModelConfig
from factory.engine.server import FactoryLLMServer, LocalModelCallback
from factory.models import ModelSourceError, ResolvedModel

LOCAL = ResolvedModel("/m/tiny", "/m/tiny", "local", "tiny")
HF = ResolvedModel("org/model", "org/model", "hf", "org/model")


def test_cpu_replica_is_eager_with_its_kv_cache_in_bytes_and_a_cpu_bundle():
    c = llm_config_for(ModelConfig(source="/m/tiny", cpu_kv_cache_gib=0.25), LOCAL, gpu=False, drain_timeout_s=7)
    assert c.engine_kwargs["enforce_eager"] is True
    assert c.engine_kwargs["dtype"] == "auto"
    assert c.engine_kwargs["kv_cache_memory_bytes"] == 2**28
    assert "gpu_memory_utilization" not in c.engine_kwargs
    assert c.placement_group_config == {"bundles": [{"CPU": 1.0}]}
    assert c.deployment_config["ray_actor_options"] == {"num_cpus": 0}
    assert c.deployment_config["graceful_shutdown_timeout_s"] == 7
    assert c.runtime_env == {"env_vars": {"VLLM_USE_AOT_COMPILE": "0"}}
    assert c.server_cls is FactoryLLMServer
    assert c.log_engine_metrics is False


def test_gpu_replica_compiles_and_sizes_by_memory_share():
    c = llm_config_for(ModelConfig(source="org/model", gpu_memory_utilization=0.8), HF, gpu=True, drain_timeout_s=30)
    assert c.engine_kwargs["enforce_eager"] is False
    assert c.engine_kwargs["gpu_memory_utilization"] == 0.8
    assert "kv_cache_memory_bytes" not in c.engine_kwargs
    assert c.placement_group_config is None
    # NVML and CUDA must number the boards alike, or the meter reads another replica's GPU.
    assert c.runtime_env == {"env_vars": {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}
    assert c.engine_kwargs["scheduler_cls"] == "factory.engine.scheduler.AsyncMeteringScheduler"


def test_explicit_settings_win_over_the_device_defaults():
    m = ModelConfig(
        source="/m/tiny", enforce_eager=False, dtype="float32", engine_kwargs={"enable_prefix_caching": True}
    )
    c = llm_config_for(m, LOCAL, gpu=False, drain_timeout_s=30)
    assert c.engine_kwargs["enforce_eager"] is False
    assert c.engine_kwargs["dtype"] == "float32"
    assert c.engine_kwargs["enable_prefix_caching"] is True


def test_local_models_skip_ray_llms_download_task_and_hub_ids_keep_it():
    local = llm_config_for(ModelConfig(source="/m/tiny"), LOCAL, gpu=False, drain_timeout_s=30)
    hub = llm_config_for(ModelConfig(source="org/model"), HF, gpu=False, drain_timeout_s=30)
    assert local.callback_config.callback_class is LocalModelCallback
    assert hub.callback_config.callback_class is not LocalModelCallback


def test_device_choice():
    assert on_gpu(ModelConfig(device="auto"), gpu_available=True)
    assert not on_gpu(ModelConfig(device="auto"), gpu_available=False)
    assert not on_gpu(ModelConfig(device="cpu"), gpu_available=True)
    assert on_gpu(ModelConfig(device="cuda"), gpu_available=False)


def test_cpu_replica_is_metered_with_the_sync_scheduler_and_unmetered_when_disabled():
    model = ModelConfig(source="org/model")
    metered = llm_config_for(model, HF, gpu=False, drain_timeout_s=30)
    assert metered.engine_kwargs["scheduler_cls"] == "factory.engine.scheduler.MeteringScheduler"
    plain = llm_config_for(model, HF, gpu=False, drain_timeout_s=30, metered=False)
    assert "scheduler_cls" not in plain.engine_kwargs


@pytest.fixture
def built(monkeypatch) -> dict:
    """What build() hands to build_application (which would bind vLLM deployments)."""
    seen: dict = {}

    def capture(cfg, resolved, gpu_available):
        seen.update(cfg=cfg, resolved=resolved, gpu=gpu_available)
        return "app"

    monkeypatch.setattr(factory.app, "build_application", capture)
    return seen


@pytest.mark.parametrize(("resources", "gpu"), [({"CPU": 16.0, "GPU": 2.0}, True), ({"CPU": 16.0}, False)])
def test_build_from_the_config_alone_resolves_the_models_and_counts_the_clusters_gpus(
    built, monkeypatch, resources, gpu
):
    # A KubeRay RayService's serveConfigV2 passes only the config (configs/kuberay/).
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert build({"config": {"models": [{"source": "org/model", "name": "m"}]}}) == "app"
    assert built["resolved"] == {"m": ResolvedModel("org/model", "org/model", "hf", "org/model")}
    assert built["gpu"] is gpu
    assert built["cfg"].models[0].served_name == "m"


def test_build_from_the_config_alone_fails_on_a_model_it_cannot_find(built, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
    with pytest.raises(ModelSourceError, match="does not exist"):
        build({"config": {"models": [{"source": "/no/such/model"}]}})


def test_build_keeps_what_the_launcher_decided(built, monkeypatch):
    def refuse(*_args):
        raise AssertionError("the launcher already decided this")

    monkeypatch.setattr(ray, "cluster_resources", refuse)
    monkeypatch.setattr(factory.app, "resolve_models", refuse)
    build(
        {
            "config": {"models": [{"source": "/m/tiny"}]},
            "resolved": {"tiny": dataclasses.asdict(LOCAL)},
            "gpu_available": True,
        }
    )
    assert built["resolved"] == {"tiny": LOCAL}
    assert built["gpu"] is True
