"""Shared fixtures. The integration stack is started once per session on a tiny random-weight
model (fast), through the real `factory serve` command: Ray Serve, vLLM (CPU), HTTP."""

from __future__ import annotations

import pytest

from factory.models import build_tiny_model
from tests.support import FactoryProcess, free_port, write_config

TINY_MODEL = "tiny"
TINY_CONTEXT = 512


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_factory(tiny_model_dir, tmp_path_factory):
    """A running factory serving the tiny model; yields the FactoryProcess."""
    work = tmp_path_factory.mktemp("tiny-factory")
    port = free_port()
    config = write_config(
        work / "factory.yaml",
        port=port,
        models=[{"name": TINY_MODEL, "source": str(tiny_model_dir), "max_model_len": TINY_CONTEXT, "max_num_seqs": 32}],
    )
    factory = FactoryProcess(config, work / "serve.log", port)
    try:
        factory.wait_ready(probe_chat_model=TINY_MODEL)
        yield factory
    finally:
        try:
            factory.stop()
        finally:
            factory.kill_everything()


@pytest.fixture(scope="session")
def base_url(tiny_factory):
    return tiny_factory.base_url


@pytest.fixture()
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
