"""Shared fixtures. The integration stack is started once per session on a tiny random-weight
model (fast), through the real `factory serve` command: Ray Serve, vLLM (CPU), HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from factory.metering.ledger import Ledger
from factory.models import build_tiny_model
from tests.support import FactoryProcess, free_port, serving, write_config

TINY_MODEL = "tiny"
TINY_CONTEXT = 512
# The tiny model's random weights make nearly every greedy choice a near tie, so the CPU precision
# check (factory/precision.py) would move it to float32 on one machine and not on another; tests
# serve its checkpoint's bf16 as configured. The check itself is tested in test_precision.py.
TINY_DTYPE = "bfloat16"
TENANT = "acme"
TENANT_TOKENS = 100_000_000


@dataclass(frozen=True)
class Keys:
    tenant: str  # acme's key
    admin: str
    ledger_path: Path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Keys:
    """A fresh ledger with tenant acme (a key and a large package) and an admin key."""
    path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    ledger = Ledger(path)
    try:
        ledger.create_tenant(TENANT, priority="standard")
        _, tenant_key = ledger.create_key(TENANT, label="tests")
        ledger.grant_package(TENANT, TENANT_TOKENS)
        _, admin_key = ledger.create_key(None, admin=True, label="tests")
    finally:
        ledger.close()
    return Keys(tenant_key, admin_key, path)


def tiny_model(model_dir, **extra) -> dict:
    """The tiny test model as a config's `models` entry, with `extra` fields."""
    return {"name": TINY_MODEL, "source": str(model_dir), "dtype": TINY_DTYPE, "max_model_len": TINY_CONTEXT, **extra}


@pytest.fixture(scope="session")
def tiny_factory(tiny_model_dir, tmp_path_factory, keys):
    """A running factory serving the tiny model with auth required; yields the FactoryProcess."""
    work = tmp_path_factory.mktemp("tiny-factory")
    port = free_port()
    config = write_config(
        work / "factory.yaml",
        port=port,
        models=[tiny_model(tiny_model_dir, max_num_seqs=32)],
        auth="required",
        ledger={"path": str(keys.ledger_path)},
        # Levels fall after 1 s clear of their threshold (5 s by default), so power tests end quickly.
        power={"governor": {"hold_s": 1.0}},
        cost={"timezone": "Asia/Shanghai"},  # the operator's zone: monthly plans renew by its calendar
    )
    with serving(
        FactoryProcess(config, work / "serve.log", port), probe_chat_model=TINY_MODEL, probe_headers=bearer(keys.tenant)
    ) as factory:
        yield factory


@pytest.fixture(scope="session")
def base_url(tiny_factory):
    return tiny_factory.base_url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client(base_url, keys):
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key=keys.tenant, max_retries=0, timeout=60)


@pytest.fixture()
def api(base_url, keys):
    """Raw HTTP as tenant acme."""
    with httpx.Client(base_url=base_url, headers=bearer(keys.tenant), timeout=60) as c:
        yield c


@pytest.fixture()
def admin(base_url, keys):
    """Raw HTTP with the admin key."""
    with httpx.Client(base_url=base_url, headers=bearer(keys.admin), timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One real PostgreSQL server for the session (tests/postgres.py)."""
    from tests.postgres import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture()
def pg_url(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres.new_database()
