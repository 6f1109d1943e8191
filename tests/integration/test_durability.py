"""Nothing lost: kill -9 the whole factory under load, start it again on the same ledger, and
every request a client saw complete is there with the tokens it returned; no reservation stays
stuck (the killed run's reservations expire and are released at start)."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import psutil
import pytest

from factory.metering.ledger import Ledger
from tests.conftest import TINY_CONTEXT, TINY_DTYPE, TINY_MODEL, bearer
from tests.support import FactoryProcess, free_port, write_config

pytestmark = pytest.mark.stack

LOAD_S = 8
RESERVATION_TTL_S = 5  # shorter than a restart, so the killed run's reservations have expired


def _client_loop(base_url: str, key: str, seen: list, stop: threading.Event, seed: int) -> None:
    """Send requests until stopped; keep (request id, prompt, completion) of each completed one."""
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=30) as c:
        while not stop.is_set():
            n = rng.randint(2, 12)
            body = {"model": TINY_MODEL, "prompt": [rng.randint(1, 400) for _ in range(rng.randint(1, 6))],
                    "max_tokens": n, "ignore_eos": True}  # fmt: skip
            try:
                if seed % 2:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code == 200:
                        u = r.json()["usage"]
                        seen.append((r.headers["x-factory-request-id"], u["prompt_tokens"], u["completion_tokens"]))
                else:
                    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                    with c.stream("POST", "/v1/completions", json=stream_body) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                        if r.status_code == 200 and lines and lines[-1] == "data: [DONE]":
                            u = json.loads(lines[-2][6:])["usage"]
                            seen.append((r.headers["x-factory-request-id"], u["prompt_tokens"], u["completion_tokens"]))
            except httpx.HTTPError:
                if stop.is_set():
                    return
                time.sleep(0.1)


def _kill_9(factory: FactoryProcess) -> None:
    procs = [psutil.Process(factory.proc.pid), *factory.descendants()]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_kill_9_under_load_loses_no_completed_request(tiny_model_dir, tmp_path):
    ledger_path = tmp_path / "ledger.db"
    with Ledger(ledger_path) as ledger:
        ledger.create_tenant("durable")
        _, key = ledger.create_key("durable")
        ledger.grant_package("durable", 10_000_000)
    port = free_port()
    config = write_config(
        tmp_path / "factory.yaml",
        port=port,
        models=[
            {"name": TINY_MODEL, "source": str(tiny_model_dir), "dtype": TINY_DTYPE, "max_model_len": TINY_CONTEXT}
        ],
        auth="required",
        ledger={"path": str(ledger_path), "reservation_ttl_s": RESERVATION_TTL_S},
    )
    first = FactoryProcess(config, tmp_path / "first.log", port)
    seen: list[tuple[str, int, int]] = []
    stop = threading.Event()
    try:
        first.wait_ready()
        clients = [
            threading.Thread(target=_client_loop, args=(first.base_url, key, seen, stop, i), daemon=True)
            for i in range(6)
        ]
        for t in clients:
            t.start()
        time.sleep(LOAD_S)
        completed_before_kill = len(seen)
        _kill_9(first)
        stop.set()
        for t in clients:
            t.join(30)
    finally:
        first.kill_everything()
    assert completed_before_kill > 20, "too little load to mean anything"

    second = FactoryProcess(config, tmp_path / "second.log", port)
    try:
        second.wait_ready()
        with Ledger(ledger_path) as ledger:
            rows = {u.request_id: u for u in ledger.usage(tenant="durable")}
            balance = ledger.balance("durable")
    finally:
        second.stop()
        second.kill_everything()
    missing = [s for s in seen if s[0] not in rows]
    assert not missing, f"{len(missing)} of {len(seen)} completed requests missing from the ledger"
    for request_id, prompt, completion in seen:
        assert (rows[request_id].prompt_tokens, rows[request_id].completion_tokens) == (prompt, completion)
    assert balance["reserved"] == 0, "a reservation of the killed run is still held"
    assert balance["used"] >= sum(p + c for _, p, c in seen)
