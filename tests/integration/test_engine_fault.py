"""An engine that dies does not take the service down with a 500: kill -9 of a replica's vLLM
EngineCore, or of its Worker, under load. While it is down every new request gets 503 +
Retry-After in the OpenAI shape, streams in flight end with an error event (no 500), Serve
replaces the replica (its health check fails at once) and the service answers again. The ledger
balances: every request is charged exactly the tokens its client was sent (a cut stream too),
and nothing stays reserved."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from factory.metering.ledger import Ledger
from tests.conftest import TINY_DTYPE, bearer
from tests.support import FactoryProcess, engine_process, free_port, serving, write_config

pytestmark = pytest.mark.stack

MODEL = "tiny"
BACK_WITHIN_S = 150  # generous for a loaded 2-core CI machine; the measured figure is printed
TENANT, GRANT = "fault", 10_000_000


@pytest.fixture
def factory(tiny_model_dir, tmp_path):
    yield from _factory(tiny_model_dir, tmp_path, replicas=1)


@pytest.fixture
def two_replicas(tiny_model_dir, tmp_path):
    yield from _factory(tiny_model_dir, tmp_path, replicas=2)


def _factory(tiny_model_dir, tmp_path, replicas: int):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.create_tenant(TENANT)
        _, key = ledger.create_key(TENANT)
        ledger.grant_package(TENANT, GRANT)
    port = free_port()
    config = write_config(
        tmp_path / "factory.yaml",
        port=port,
        models=[
            {
                "name": MODEL,
                "source": str(tiny_model_dir),
                "dtype": TINY_DTYPE,
                "max_model_len": 2048,
                "max_num_seqs": 8,
                "cpu_kv_cache_gib": 0.1,
                "replicas": replicas,
            }
        ],  # fmt: skip
        auth="required",
        ledger={"path": str(tmp_path / "ledger.db")},
    )
    with serving(FactoryProcess(config, tmp_path / "serve.log", port)) as f:
        f.key, f.ledger_path = key, tmp_path / "ledger.db"
        yield f


def _tokens_sent(text: str) -> tuple[int, int | None, bool]:
    """(completion tokens a stream carried, the usage it reported or None, whether it ended in the
    OpenAI-shaped `engine_unavailable` error event). Each chunk lists its tokens (logprobs: 0)."""
    tokens, usage, error = 0, None, False
    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"].get("code") == "engine_unavailable" and "message" in event["error"]
        for choice in event.get("choices") or []:
            tokens += len((choice.get("logprobs") or {}).get("tokens") or [])
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
    return tokens, usage, error


@pytest.mark.parametrize("victim", ["VLLM::EngineCore", "VLLM::Worker"])
def test_kill_9_of_the_engine_under_load_costs_503s_never_a_500_and_the_ledger_balances(factory, victim):
    statuses: list[tuple[float, int]] = []  # (when the answer ended, status; -1 = cut stream)
    sent: dict[str, int] = {}  # request id -> completion tokens its client was sent
    cut_with_error: list[str] = []
    streaming: set[int] = set()  # threads whose stream is delivering tokens now
    ended: list[tuple[float, int, bool, str]] = []  # every answer: when, status, streamed, its tail
    problems: list[str] = []
    stop = threading.Event()

    def load(stream: bool) -> None:
        with httpx.Client(base_url=factory.base_url, headers=bearer(factory.key), timeout=120) as client:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": "Count:", "max_tokens": 32, "stream": stream, "logprobs": 0}
                if stream:  # long enough to be in flight when the engine dies
                    body.update(max_tokens=1500, ignore_eos=True, stream_options={"include_usage": True})
                try:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        lines = []
                        for line in r.iter_lines():
                            lines.append(line)
                            if stream and len(lines) == 3:
                                streaming.add(threading.get_ident())  # tokens are flowing
                        streaming.discard(threading.get_ident())
                        text = "\n".join(lines)
                        ended.append((time.monotonic(), r.status_code, stream, text[-200:]))
                        if r.status_code >= 500 and r.status_code != 503:
                            problems.append(f"{r.status_code}: {text[:300]}")
                        if r.status_code == 503:
                            if "Retry-After" not in r.headers or '"error"' not in text:
                                problems.append(f"503 without Retry-After or OpenAI body: {text[:300]}")
                            time.sleep(0.2)
                        if r.status_code == 200:
                            rid = r.headers["x-factory-request-id"]
                            if stream:
                                tokens, usage, error = _tokens_sent(text)
                                if usage is not None and usage != tokens:
                                    problems.append(f"{rid}: usage says {usage}, the stream carried {tokens}")
                                if usage is None:
                                    if not error:
                                        problems.append(f"{rid}: cut without an error event: {text[-300:]}")
                                    cut_with_error.append(rid)
                                sent[rid] = tokens
                            else:
                                sent[rid] = json.loads(text)["usage"]["completion_tokens"]
                        statuses.append((time.monotonic(), r.status_code))
                except httpx.HTTPError:  # a stream cut by the dying engine
                    statuses.append((time.monotonic(), -1))

    process = engine_process(factory, victim)  # found first: walking the process tree takes seconds
    threads = [threading.Thread(target=load, args=(s,)) for s in (True, True, False)]
    for t in threads:
        t.start()
    try:
        # Kill while a stream is delivering tokens (the first answers after a start can take
        # seconds on a loaded machine).
        deadline = time.monotonic() + 90
        while not streaming:
            assert time.monotonic() < deadline and not problems, (statuses[-5:], problems[:3])
            time.sleep(0.05)
        process.kill()
        killed = time.monotonic()
        back = None
        while back is None and time.monotonic() - killed < BACK_WITHIN_S:
            time.sleep(1)
            after = [(t, s) for t, s in statuses if t > killed]
            failed = [t for t, s in after if s != 200]
            if failed:
                ok = [t for t, s in after if s == 200 and t > failed[-1]]
                if len(ok) >= 3:
                    back = ok[0]
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert not problems, problems[:5]
    assert back is not None, f"not serving again within {BACK_WITHIN_S} s: {statuses[-5:]}"
    refused = sum(1 for t, s in statuses if t > killed and s == 503)
    around = [(round(t - killed, 2), st, sm, tail[-120:]) for t, st, sm, tail in ended if abs(t - killed) < 2]
    assert cut_with_error, f"no stream ended with the error event; answers around the kill: {around}"
    dropped = sum(1 for _, s in statuses if s == -1)
    assert dropped == 0, f"{dropped} connection(s) dropped without an HTTP answer"
    print(f"{victim} killed: served again after {back - killed:.1f} s; {refused} x 503 meanwhile; "
          f"{len(cut_with_error)} stream(s) ended with an error event")  # fmt: skip
    deadline = time.monotonic() + 60
    while httpx.get(factory.base_url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "never ready again"
        time.sleep(1)

    # The ledger: every request charged what its client was sent, nothing left reserved.
    deadline = time.monotonic() + 30
    while True:
        with Ledger(factory.ledger_path) as ledger:
            rows = {u.request_id: u for u in ledger.usage(tenant=TENANT)}
            balance = ledger.balance(TENANT)
        if balance["reserved"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert balance["reserved"] == 0, balance
    wrong = {rid: (n, rows[rid].completion_tokens if rid in rows else None) for rid, n in sent.items()
             if n and (rid not in rows or rows[rid].completion_tokens != n)}  # fmt: skip
    assert not wrong, f"charged != sent (request: (sent, charged)): {list(wrong.items())[:5]}"
    charged = sum(u.prompt_tokens + u.completion_tokens for u in rows.values())
    assert balance["used"] == charged, (balance, charged)


@pytest.mark.xfail(
    strict=False,
    reason=(
        "open (issue 18 note, 2026-12-08): in 2 of 4 runs on the 2-core AMD EPYC the router never heard "
        "engine_down and the dead replica took requests (instant 503s) until Serve removed it at ~6 s; "
        "in the other 2, 0 and 9 x 503 within 0.9 s, as before. Cause not found yet"
    ),
)
def test_with_two_replicas_requests_go_to_the_live_one_while_the_dead_one_is_replaced(two_replicas):
    """The dead replica says so in its routing stats (polled every 0.5 s): the router ranks it
    last, so after the first second or so every request is served by the live replica."""
    factory = two_replicas
    cores = [p for p in factory.descendants() if p.name().startswith("VLLM::EngineCor")]
    assert len(cores) == 2, cores
    answers: list[tuple[float, int]] = []
    problems: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=factory.base_url, headers=bearer(factory.key), timeout=60) as client:
            while not stop.is_set():
                r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Count:", "max_tokens": 16})
                if r.status_code not in (200, 503) or (r.status_code == 503 and "Retry-After" not in r.headers):
                    problems.append(f"{r.status_code}: {r.text[:300]}")
                answers.append((time.monotonic(), r.status_code))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        cores[0].kill()
        killed = time.monotonic()
        time.sleep(12)  # past the first health checks, before the replacement is up
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not problems, problems[:5]
    after = [(t - killed, s) for t, s in answers if t > killed]
    refused = [round(t, 2) for t, s in after if s == 503]
    served = sum(1 for t, s in after if s == 200)
    print(f"one of two engines killed: {len(refused)} x 503 (at {refused} s), {served} served")
    # Without the routing stats saying so, the dead replica kept its share until Serve dropped it:
    # 13 x 503 over ~3 s in the same test. With them, 503s come only before the router hears (the
    # replica's check and the stats poll, every 0.5 s each): 1 to 9 of them, all by 0.9 s (a dead
    # replica answers 503 at once, so how many depends on how fast the clients come back, not on
    # routing; when the last one comes is what routing decides).
    assert max(refused, default=0.0) <= 1.5, f"requests kept going to the dead replica: 503 at {refused} s"
    assert served >= 20, f"the live replica served only {served} requests"


def test_a_lost_replica_costs_openai_shaped_503s_never_a_500(two_replicas):
    """A whole replica lost at once, as when its node dies: its Serve actor and its engine get
    SIGKILL together under load. Requests it was answering and those sent to it before Serve and
    the router hear of it are HAProxy's to answer: retried on the other replica, or HAProxy's own
    error, which is the factory's OpenAI-shaped 503 with Retry-After (Serve's page is a text 500;
    test_ray_seams shows HAProxy serving ours). Never a 500; the other replica serves on. (Measured
    on the 2-core AMD EPYC: 0 x 503, 76 served in the 9 s after.)"""
    factory = two_replicas
    replicas = [p for p in factory.descendants() if "ServeReplica:factory:FactoryEngine" in " ".join(p.cmdline())]
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    answers: list[tuple[float, int, str, str | None]] = []
    stop = threading.Event()

    def load(i: int) -> None:
        with httpx.Client(base_url=factory.base_url, headers=bearer(factory.key), timeout=60) as client:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": "Count:", "max_tokens": 24 if i % 2 else 4}
                r = client.post("/v1/completions", json=body)
                text = "" if r.status_code == 200 else r.text
                answers.append((time.monotonic(), r.status_code, text, r.headers.get("retry-after")))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        doomed = [victim, *victim.children(recursive=True)]
        for p in doomed:
            p.kill()
        killed = time.monotonic()
        time.sleep(12)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    bad = [a for a in answers if a[1] not in (200, 503)]
    assert not bad, bad[:5]
    refused = [a for a in answers if a[1] == 503]
    for _, _, text, retry in refused:
        assert retry is not None and int(retry) > 0, text
        assert json.loads(text)["error"]["type"] == "service_unavailable_error", text
    served_after = sum(1 for t, s, _, _ in answers if t > killed + 3 and s == 200)
    codes = sorted({json.loads(a[2])["error"]["code"] for a in refused})
    print(f"one of two replicas lost: {len(refused)} x 503 ({codes}), {served_after} served after 3 s")
    assert served_after >= 10, f"the live replica served only {served_after} requests"
