"""One token unit on the real stack (metering/rates.py): a model billed at 0.5 factory tokens a
fresh prompt token, 0.1 a cached one and 3 an output token. The usage a client gets keeps vLLM's
raw counts and adds the factory tokens charged; the package is charged exactly those; the
reservation is the weighted worst case, so a package that would cover the raw count of a
request but not its factory tokens refuses it with 429."""

from __future__ import annotations

import math
from decimal import Decimal

import httpx
import pytest

from factory.metering.ledger import Ledger
from tests.conftest import TINY_MODEL, bearer, tiny_model
from tests.support import FactoryProcess, free_port, serving, write_config

pytestmark = pytest.mark.stack

RATES = {"input": Decimal("0.5"), "cached_input": Decimal("0.1"), "output": Decimal("3")}
# ~160 prompt tokens of the tiny model: whole KV blocks for the prefix cache to hold.
LONG = "The grid operator publishes the price of power every five minutes. " * 6


def billed(prompt: int, cached: int, completion: int) -> int:
    return math.ceil(RATES["input"] * (prompt - cached) + RATES["cached_input"] * cached + RATES["output"] * completion)


@pytest.fixture(scope="module")
def weighted(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("token-unit")
    ledger_path = work / "ledger.db"
    with Ledger(ledger_path) as ledger:
        ledger.create_tenant("rich")
        ledger.grant_package("rich", 1_000_000)
        _, rich = ledger.create_key("rich")
        ledger.create_tenant("poor")
        ledger.grant_package("poor", 30)
        _, poor = ledger.create_key("poor")
    port = free_port()
    config = write_config(
        work / "factory.yaml",
        port=port,
        models=[
            tiny_model(
                tiny_model_dir,
                max_num_seqs=8,
                rates={k: str(v) for k, v in RATES.items()},
                engine_kwargs={"enable_prefix_caching": True},
            )
        ],
        auth="required",
        ledger={"path": str(ledger_path)},
    )
    with serving(
        FactoryProcess(config, work / "serve.log", port), probe_chat_model=TINY_MODEL, probe_headers=bearer(rich)
    ) as factory:
        yield factory.base_url, rich, poor, ledger_path


def _ask(base_url: str, key: str, max_tokens: int) -> httpx.Response:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": max_tokens,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(base_url + "/v1/chat/completions", json=body, headers=bearer(key), timeout=120)


def test_usage_adds_the_factory_tokens_charged_and_a_cached_prompt_costs_less(weighted):
    base_url, rich, _, ledger_path = weighted
    answers = [_ask(base_url, rich, 8) for _ in range(2)]  # the second finds the first's prompt cached
    for r in answers:
        assert r.status_code == 200, r.text
    rows = {}
    with httpx.Client(base_url=base_url, headers=bearer(rich), timeout=30) as api:
        for row in api.get("/v1/usage").json()["data"]:
            rows[row["request_id"]] = row
        balance = api.get("/v1/usage").json()["balance"]
    charged = 0
    for r in answers:
        usage = r.json()["usage"]
        row = rows[r.headers["x-factory-request-id"]]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert usage["factory_tokens"] == row["billed_tokens"]
        assert row["billed_tokens"] == billed(row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"])
        charged += row["billed_tokens"]
    first, second = (rows[r.headers["x-factory-request-id"]] for r in answers)
    assert first["cached_tokens"] < second["cached_tokens"] <= second["prompt_tokens"]
    assert second["billed_tokens"] < first["billed_tokens"]
    # The package paid the factory tokens, not the raw count (the start-up probe's request too).
    assert balance["used"] == sum(row["billed_tokens"] for row in rows.values()) >= charged
    assert balance["used"] < sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows.values())
    with Ledger(ledger_path) as ledger:
        assert sum(u.billed_tokens for u in ledger.usage("rich")) == balance["used"]


def test_the_weighted_worst_case_is_reserved(weighted):
    """30 factory tokens: 10 prompt tokens and up to 10 output tokens are 20 raw tokens but may
    cost 0.5 x 10 + 3 x 10 = 35 factory tokens: refused; with up to 6, 23: served and charged."""
    base_url, _, poor, _ = weighted
    body = {"model": TINY_MODEL, "prompt": [7] * 10, "max_tokens": 10, "ignore_eos": True}
    r = httpx.post(base_url + "/v1/completions", json=body, headers=bearer(poor), timeout=60)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "up to 35 factory tokens" in error["message"] and "has 30 left" in error["message"]
    body["max_tokens"] = 6
    r = httpx.post(base_url + "/v1/completions", json=body, headers=bearer(poor), timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (10, 6)
    with httpx.Client(base_url=base_url, headers=bearer(poor), timeout=30) as api:
        page = api.get("/v1/usage").json()
    [row] = page["data"]
    assert usage["factory_tokens"] == row["billed_tokens"] == billed(10, row["cached_tokens"], 6)
    assert page["balance"]["used"] == row["billed_tokens"] and page["balance"]["reserved"] == 0
