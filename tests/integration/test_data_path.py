"""The data path on the real stack: a client's connection goes to HAProxy, HAProxy's to the chosen
replica's own HTTP server (one native hop, no Ray call per chunk); two models on one port, each
request on a replica of its model; a stream in flight survives another replica's replacement
(which reloads HAProxy)."""

from __future__ import annotations

import glob
import re
import threading
import time

import httpx
import psutil
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_DTYPE
from tests.support import FactoryProcess, free_port, serving, write_config

pytestmark = pytest.mark.stack

MODELS = ("tiny-a", "tiny-b")
ENGINE_TITLE = "ray::ServeReplica:factory:FactoryEngine"
REQUEST_TIMEOUT_S = 40  # HAProxy's hard-stop-after is derived from it: 45 s


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("two-models")
    port = free_port()
    models = [
        {
            "name": name,
            "source": str(tiny_model_dir),
            "dtype": TINY_DTYPE,
            "max_model_len": 2048,
            "max_num_seqs": 8,
            "cpu_kv_cache_gib": 0.1,
        }
        for name in MODELS
    ]
    config = write_config(
        work / "factory.yaml",
        port=port,
        models=models,
        auth="disabled",
        ledger={"path": str(work / "ledger.db")},
        server={"port": port, "drain_timeout_s": 30, "request_timeout_s": REQUEST_TIMEOUT_S},
    )
    with serving(FactoryProcess(config, work / "serve.log", port)) as factory:
        yield factory


def _client(factory: FactoryProcess) -> OpenAI:
    return OpenAI(base_url=factory.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _served_by_replica(base_url: str) -> dict[str, dict[str, float]]:
    """Per replica, completed requests per model, from vLLM's own counters on /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in family.samples:
            if s.name == "vllm:request_success_total" and s.value:
                per = out.setdefault(s.labels["replica"], {})
                per[s.labels["model_name"]] = per.get(s.labels["model_name"], 0.0) + s.value
    return out


def _engine_replicas(factory: FactoryProcess) -> list[psutil.Process]:
    return [p for p in factory.descendants() if _title(p).startswith(ENGINE_TITLE)]


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


class SlowStream:
    """A streamed completion read one chunk every `pause_s`, in a thread: the answer is made fast,
    but the connection through HAProxy stays open while the client reads."""

    def __init__(self, factory: FactoryProcess, model: str, max_tokens: int, pause_s: float):
        self.result: dict = {}
        self.started = threading.Event()
        self._args = (factory, model, max_tokens, pause_s)
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        factory, model, max_tokens, pause_s = self._args
        try:
            chunks = _client(factory).completions.create(
                model=model,
                prompt="Count the stars:",
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            n, usage = 0, None
            for c in chunks:
                self.started.set()
                n += sum(1 for choice in c.choices if choice.text)
                usage = c.usage or usage
                time.sleep(pause_s)
            self.result.update(chunks=n, usage=usage)
        except Exception as err:
            self.result["error"] = err
        finally:
            self.started.set()

    def join(self, timeout_s: float) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not finish"
        return self.result


def _replica_of(factory: FactoryProcess, model: str) -> tuple[psutil.Process, int]:
    """The engine replica serving `model`, and the port of its own HTTP server: the replica id from
    vLLM's series on /metrics, its port from HAProxy's generated config, its process from the port."""
    replica = next(
        s.labels["replica"]
        for family in text_string_to_metric_families(httpx.get(factory.base_url + "/metrics").text)
        for s in family.samples
        if s.name == "vllm:num_requests_running" and s.labels.get("model_name") == model
    )
    cfg = next(
        text
        for path in glob.glob("/tmp/haproxy-serve/*/haproxy.cfg")
        if f":{factory.port}\n" in (text := open(path).read())
    )
    port = int(re.search(rf"server SERVE_REPLICA_factory-FactoryEngine-{replica} [0-9.]+:(\d+)", cfg).group(1))
    for p in _engine_replicas(factory):
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections(kind="tcp")):
            return p, port
    raise AssertionError(f"no process listens on replica {replica}'s port {port}")


def _haproxy_streams_to(factory: FactoryProcess, port: int) -> bool:
    """Whether an HAProxy process holds an open connection to `port`."""
    for hp in (p for p in factory.descendants() if p.name() == "haproxy"):
        for c in hp.net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port:
                return True
    return False


def test_two_models_answer_on_one_port_each_on_its_own_replica(two_models):
    client = _client(two_models)
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)
    for _ in range(3):
        for model in MODELS:
            r = client.completions.create(model=model, prompt="Say hi", max_tokens=3)
            assert r.model == model and r.usage.completion_tokens >= 1
    deadline = time.monotonic() + 10  # replicas report their counters once a second
    while time.monotonic() < deadline:
        served = _served_by_replica(two_models.base_url)
        if sum(sum(v.values()) for v in served.values()) >= 6:
            break
        time.sleep(0.5)
    # Every replica served one model only, and each model was served.
    assert len(served) == 2, served
    assert sorted(m for per in served.values() for m in per) == sorted(MODELS), served


def test_a_stream_flows_from_haproxy_straight_to_the_replicas_own_server(two_models):
    """No Ray call per chunk: while a stream runs, HAProxy holds a TCP connection to the port an
    engine replica's own HTTP server listens on (Serve's Python proxy is not in the path)."""
    stream = SlowStream(two_models, MODELS[0], max_tokens=200, pause_s=0.02)
    assert stream.started.wait(60)
    _, port = _replica_of(two_models, MODELS[0])
    assert _haproxy_streams_to(two_models, port)
    proxies = [p for p in two_models.descendants() if "ProxyActor" in _title(p)]
    for proxy in proxies:
        established = [c for c in proxy.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED]
        assert all(c.laddr.port != two_models.port for c in established)
    result = stream.join(120)
    assert "error" not in result, result
    assert result["usage"].completion_tokens == 200


def test_a_stream_survives_another_replicas_replacement(two_models):
    """The other model's replica is killed: Serve replaces it and HAProxy reloads (twice), but
    the old HAProxy process keeps the running stream to its end (hard-stop-after outlives every
    request). Meanwhile that model's requests get 503 + Retry-After, never a 500."""
    stream = SlowStream(two_models, MODELS[0], max_tokens=400, pause_s=0.05)  # ~20 s of reading
    assert stream.started.wait(60)
    serving_a, _ = _replica_of(two_models, MODELS[0])
    serving_b, _ = _replica_of(two_models, MODELS[1])
    assert serving_a.pid != serving_b.pid
    serving_b.kill()
    statuses = set()
    while stream.thread.is_alive():
        r = httpx.post(
            two_models.base_url + "/v1/completions",
            json={"model": MODELS[1], "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        statuses.add(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["message"] and "Retry-After" in r.headers
        assert r.status_code != 500, r.text
        time.sleep(0.5)
    result = stream.join(60)
    assert "error" not in result, f"the stream was cut: {result['error']!r}"
    assert result["usage"].completion_tokens == 400
    assert 503 in statuses, statuses  # the model was unavailable while its replica was replaced
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        r = httpx.post(
            two_models.base_url + "/v1/completions", json={"model": MODELS[1], "prompt": "hi", "max_tokens": 2}
        )
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            return
        time.sleep(1)
    raise AssertionError("the replaced replica never served again")
