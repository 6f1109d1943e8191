"""The energy-aware router on the real stack (HAProxy asking the factory's router per request, two
vLLM CPU replicas with prefix caching, HTTP), against HAProxy's own least-connections balance on
the same workload.

Each router gets its own factory, one after the other. The prefix-cache hit rate is vLLM's own
(`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`, summed over the replicas on /metrics)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_MODEL, tiny_model
from tests.support import FactoryProcess, free_port, write_config

pytestmark = pytest.mark.stack

GROUPS = 16  # distinct system prompts ...
PER_GROUP = 3  # ... each asked this many different questions
HOT_REQUESTS = 24  # one system prompt, many at once
HOT_CONCURRENCY = 8
# ~410 tokens of the tiny tokenizer: three whole 128-token KV blocks (vLLM's CPU block size).
SENTENCE = "The meter counts the tokens, the joules and the money of group {g}. "


@dataclass(frozen=True)
class Run:
    hit_rate: float  # prefix-cache hits / queries (tokens) over the shared-prefix workload
    served: dict[str, int]  # replica -> requests it completed, same workload
    hot_served: dict[str, int]  # replica -> requests it completed, hot-prefix burst


def _chat(group: str, question: int, max_tokens: int) -> dict:
    return {
        "model": TINY_MODEL,
        "messages": [
            {"role": "system", "content": SENTENCE.format(g=group) * 20},
            {"role": "user", "content": f"Question {question}: what is the capital of France?"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def _counters(client: httpx.Client) -> dict[str, dict[str, float]]:
    """Per replica: prefix-cache hit and query tokens, and requests completed, from /metrics."""
    wanted = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:request_success_total": "done",
    }
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name in wanted:
                per = out.setdefault(s.labels["replica"], dict.fromkeys(wanted.values(), 0.0))
                per[wanted[s.name]] += s.value
    return out


def _settled(client: httpx.Client, before: dict, requests: int, timeout_s: float = 20) -> dict:
    """/metrics once every request sent since `before` shows as completed (replicas report ~1/s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _counters(client)
        done = sum(v["done"] for v in now.values()) - sum(v["done"] for v in before.values())
        if done >= requests or time.monotonic() > deadline:
            assert done == requests, f"{done} of {requests} requests showed up on /metrics"
            return now
        time.sleep(0.3)


def _delta(after: dict, before: dict, key: str) -> dict[str, int]:
    return {r: int(v[key] - before.get(r, {}).get(key, 0.0)) for r, v in after.items()}


def _measure(router: str, model_dir, work) -> Run:
    port = free_port()
    model = tiny_model(
        model_dir,
        max_num_seqs=16,
        replicas=2,
        cpu_kv_cache_gib=0.1,  # ~50k tokens each: nothing the workload sends is evicted
        engine_kwargs={"enable_prefix_caching": True},
    )
    config = write_config(
        work / f"{router}.yaml",
        port=port,
        models=[model],
        auth="disabled",
        ledger={"path": str(work / "ledger.db")},
        routing={"policy": router},
    )
    factory = FactoryProcess(config, work / f"{router}.log", port)
    try:
        factory.wait_ready()
        with httpx.Client(base_url=factory.base_url, timeout=60) as client:
            # The shared-prefix workload, one request at a time: round r asks every group its
            # r-th question, groups in a shuffled order so no router can profit from a pattern.
            rng = random.Random(6)
            before = _counters(client)
            for question in range(PER_GROUP):
                for group in rng.sample(range(GROUPS), GROUPS):
                    r = client.post("/v1/chat/completions", json=_chat(str(group), question, max_tokens=4))
                    assert r.status_code == 200, r.text
            after = _settled(client, before, GROUPS * PER_GROUP)
            hits = sum(_delta(after, before, "hits").values())
            queries = sum(_delta(after, before, "queries").values())

            # A hot prefix: many requests with one system prompt at once, long enough to pile up.
            def send(i: int) -> None:
                r = client.post("/v1/chat/completions", json=_chat("hot", i, max_tokens=48))
                assert r.status_code == 200, r.text

            with ThreadPoolExecutor(HOT_CONCURRENCY) as pool:
                list(pool.map(send, range(HOT_REQUESTS)))
            hot = _settled(client, after, HOT_REQUESTS)
            return Run(queries and hits / queries, _delta(after, before, "done"), _delta(hot, after, "done"))
    finally:
        try:
            factory.stop()
        finally:
            factory.kill_everything()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Run]:
    """Both routers on the same workload, one factory at a time (two engines each on 2 cores)."""
    work = tmp_path_factory.mktemp("routing")
    return {router: _measure(router, tiny_model_dir, work) for router in ("leastconn", "energy")}


def test_energy_router_sends_shared_prefixes_where_they_are_cached(runs):
    energy, leastconn = runs["energy"].hit_rate, runs["leastconn"].hit_rate
    print(f"prefix-cache hit rate: energy {energy:.3f}, leastconn {leastconn:.3f}")
    # Perfect affinity: every question after a group's first hits its three cached blocks (~0.58
    # of all prompt tokens). One request at a time, least connections finds both replicas idle and
    # alternates, so a group's questions land on its cached replica about half the time (~0.37).
    assert energy > 0.5
    assert energy > leastconn + 0.08


def test_energy_router_spills_a_hot_prefix_instead_of_piling_it_on_one_replica(runs):
    hot = runs["energy"].hot_served
    print(f"hot prefix, requests per replica: {hot}; shared-prefix workload: {runs['energy'].served}")
    assert sum(hot.values()) == HOT_REQUESTS
    assert len(hot) == 2 and min(hot.values()) >= 3, hot
