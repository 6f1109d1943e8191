"""Nothing lost, on either ledger backend: kill -9 the whole factory under load, start it again on
the same ledger, and every request a client saw complete is there with the tokens it returned; no
reservation stays stuck (the killed run's reservations expire and are released at start). And a
PostgreSQL ledger that goes away under load costs only 503s with Retry-After while it is gone:
never a 500, never a lost row."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from factory.metering.ledger import Ledger
from tests.conftest import TINY_CONTEXT, TINY_MODEL, bearer, tiny_model
from tests.support import FactoryProcess, engine_process, free_port, kill_processes, write_config

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
    kill_processes([psutil.Process(factory.proc.pid), *factory.descendants()])


def _ledger_section(request, tmp_path, backend: str) -> tuple[str, dict]:
    """(ledger target, the config's ledger section) for a fresh ledger on `backend`."""
    if backend == "sqlite":
        target = str(tmp_path / "ledger.db")
        return target, {"path": target}
    target = request.getfixturevalue("pg_url")
    return target, {"url": target}


def _tenant_and_config(target: str, section: dict, tenant: str, tiny_model_dir, tmp_path) -> tuple[str, Path, int]:
    """A tenant with a key and 10 M tokens in the ledger at `target`, and a config serving the
    tiny model on a free port with keys required: (key, config path, port)."""
    with Ledger(target) as ledger:
        ledger.create_tenant(tenant)
        _, key = ledger.create_key(tenant)
        ledger.grant_package(tenant, 10_000_000)
    port = free_port()
    config = write_config(
        tmp_path / "factory.yaml",
        port=port,
        models=[tiny_model(tiny_model_dir)],
        auth="required",
        ledger=section,
    )
    return key, config, port


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_loses_no_completed_request(request, backend, tiny_model_dir, tmp_path):
    ledger_path, section = _ledger_section(request, tmp_path, backend)
    section = {**section, "reservation_ttl_s": RESERVATION_TTL_S}
    key, config, port = _tenant_and_config(ledger_path, section, "durable", tiny_model_dir, tmp_path)
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


def _recording_loop(base_url: str, key: str, log: list, stop: threading.Event, seed: int) -> None:
    """Send small requests until stopped; log (time answered, status, Retry-After, error code,
    request id, tokens used, time sent) of every answer, and ("transport", …) for a broken one."""
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=60) as c:
        while not stop.is_set():
            body = {"model": TINY_MODEL, "prompt": [rng.randint(1, 400) for _ in range(3)],
                    "max_tokens": rng.randint(2, 24), "ignore_eos": True}  # fmt: skip
            sent = time.monotonic()
            try:
                r = c.post("/v1/completions", json=body)
            except httpx.HTTPError as err:
                log.append((time.monotonic(), "transport", None, repr(err), None, 0, sent))
                continue
            ok = r.status_code == 200
            code = None if ok else r.json().get("error", {}).get("code")
            used = r.json()["usage"]["total_tokens"] if ok else 0
            log.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), code,
                        r.headers.get("x-factory-request-id"), used, sent))  # fmt: skip
            if r.status_code == 503:
                time.sleep(0.2)


STREAM_WORST = TINY_CONTEXT - 5  # what the long stream reserves: 3 prompt tokens + max_tokens


def _long_stream(base_url: str, key: str, out: dict) -> None:
    """One long streamed answer."""
    body = {"model": TINY_MODEL, "prompt": [7, 8, 9], "max_tokens": STREAM_WORST - 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            out["status"], out["request_id"] = r.status_code, r.headers.get("x-factory-request-id")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    out["done_at"] = time.monotonic()
    out["complete"] = bool(lines) and lines[-1] == "data: [DONE]"
    if out["complete"]:
        out["usage"] = json.loads(lines[-2][6:])["usage"]


def test_postgresql_going_away_under_load_costs_only_503s(postgres, pg_url, tiny_model_dir, tmp_path):
    """Load on a factory whose ledger is on PostgreSQL; the server stops (fast shutdown: sessions
    cut mid-transaction) and comes back 4 s later, the worst form of `pg_ctl restart`, while a
    long stream is mid-answer. While it is gone, requests get 503 ledger_unavailable with
    Retry-After; no answer is a 500; the stream finishes once it is back (its settlement held);
    afterwards every 200 has its usage row, the package is charged exactly what was served, and
    nothing is left reserved."""
    key, config, port = _tenant_and_config(pg_url, {"url": pg_url}, "steady", tiny_model_dir, tmp_path)
    factory = FactoryProcess(config, tmp_path / "serve.log", port)
    answers: list = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_recording_loop, args=(factory.base_url, key, answers, stop, i), daemon=True)
        for i in range(4)
    ]
    stream: dict = {}
    straddler = threading.Thread(target=_long_stream, args=(factory.base_url, key, stream), daemon=True)
    try:
        factory.wait_ready()
        for t in clients:
            t.start()
        time.sleep(3)
        # The stream is admitted while its engine is held still, so that it is certainly mid-answer
        # when the server stops (the tiny model would otherwise finish in well under a second).
        engine = engine_process(factory, "VLLM::EngineCore")
        engine.suspend()
        try:
            straddler.start()
            with Ledger(pg_url) as ledger:
                deadline = time.monotonic() + 60
                while ledger.balance("steady")["reserved"] < STREAM_WORST and time.monotonic() < deadline:
                    time.sleep(0.05)
            down_at = time.monotonic()
            postgres.pg_ctl("stop")
        finally:
            engine.resume()
        # The load's clients may all be waiting on held settlements now: new requests, meanwhile,
        # must be refused with a time to come back.
        probes = []
        with httpx.Client(base_url=factory.base_url, headers=bearer(key), timeout=30) as c:
            while time.monotonic() < down_at + 4:
                body = {"model": TINY_MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
                probes.append(c.post("/v1/completions", json=body))
                time.sleep(0.5)
        postgres.pg_ctl("start")
        up_at = time.monotonic()
        time.sleep(6)
        stop.set()
        for t in [*clients, straddler]:
            t.join(90)
    finally:
        stop.set()
        try:
            factory.stop()
        finally:
            factory.kill_everything()
            if not (postgres.data / "postmaster.pid").exists():
                postgres.pg_ctl("start")  # the session's other tests need it

    statuses = {a[1] for a in answers}
    assert statuses <= {200, 503}, f"answers other than 200/503: {statuses}\n{factory.log_tail()}"
    assert len(probes) >= 2 and {r.status_code for r in probes} == {503}, [r.text for r in probes]
    assert {r.json()["error"]["code"] for r in probes} == {"ledger_unavailable"}
    assert all(int(r.headers["retry-after"]) > 0 for r in probes)
    refused = [a for a in answers if a[1] == 503]
    assert all(a[2] is not None and int(a[2]) > 0 for a in refused), "a 503 without Retry-After"
    assert {a[3] for a in refused} <= {"ledger_unavailable"}
    assert all(down_at <= a[0] for a in refused)
    assert stream.get("complete") and stream["status"] == 200, stream
    assert stream["done_at"] > up_at, "the stream was not running across the outage: nothing was held"
    served_before = [a for a in answers if a[1] == 200 and a[0] < down_at]
    served_after = [a for a in answers if a[1] == 200 and a[0] > up_at + 1]
    assert served_before and served_after, "the factory did not serve both before and after the outage"

    with Ledger(pg_url) as ledger:
        rows = {u.request_id: u for u in ledger.usage(tenant="steady")}
        balance = ledger.balance("steady")
    served = [a for a in answers if a[1] == 200]
    served.append((stream["done_at"], 200, None, None, stream["request_id"], stream["usage"]["total_tokens"]))
    missing = [a[4] for a in served if a[4] not in rows]
    assert not missing, f"{len(missing)} of {len(served)} served requests have no usage row"
    assert balance["reserved"] == 0
    charged = sum(u.prompt_tokens + u.completion_tokens for u in rows.values())
    assert balance["used"] == sum(a[5] for a in served) == charged
