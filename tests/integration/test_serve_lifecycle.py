"""The embedded default, as a user runs it: `factory models pull`, `factory serve`, a real
question to SmolLM2-135M, then SIGTERM mid-stream: the stream finishes (drain) and no process of
the factory remains."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.support import FACTORY_BIN, FactoryProcess, free_port, write_config

pytestmark = [pytest.mark.stack, pytest.mark.smollm]
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm_factory(tmp_path_factory):
    pulled = subprocess.run([str(FACTORY_BIN), "models", "pull", MODEL], capture_output=True, text=True, timeout=900)
    assert pulled.returncode == 0, pulled.stderr
    work = tmp_path_factory.mktemp("smollm-factory")
    port = free_port()
    # The embedded default (auth disabled on loopback), with a ledger of its own.
    config = write_config(
        work / "factory.yaml", port=port, models=[{"source": MODEL}], ledger={"path": str(work / "ledger.db")}
    )
    factory = FactoryProcess(config, work / "serve.log", port)
    try:
        factory.wait_ready()
        yield factory
    finally:
        factory.kill_everything()


def test_smollm_knows_the_capital_of_france(smollm_factory):
    client = OpenAI(base_url=smollm_factory.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    # Right on this CPU by the precision check: bf16 where it answers as float32 does, else float32.
    log = smollm_factory.log_path.read_text(errors="replace")
    assert f"precision: {MODEL} serves " in log
    # Without auth the request is booked to 'anonymous', with its energy, and shows in /v1/usage.
    assert r.usage.energy_joules > 0
    rows = httpx.get(smollm_factory.base_url + "/v1/usage", params={"since": "2000-01-01"}).json()["data"]
    assert [(row["tenant"], row["completion_tokens"]) for row in rows] == [("anonymous", r.usage.completion_tokens)]


def test_sigterm_drains_in_flight_stream_and_leaves_no_process(smollm_factory):
    factory = smollm_factory
    client = OpenAI(base_url=factory.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    family = [psutil.Process(factory.proc.pid), *factory.descendants()]
    assert len(family) > 5, "expected Ray daemons, replicas and engine processes under factory serve"

    first_chunk = threading.Event()
    result: dict = {}

    def stream() -> None:
        try:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                max_tokens=160,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, finish, usage = [], None, None
            for c in chunks:
                if c.choices:
                    text.append(c.choices[0].delta.content or "")
                    finish = c.choices[0].finish_reason or finish
                    first_chunk.set()
                usage = c.usage or usage
            result.update(text="".join(text), finish=finish, usage=usage)
        except Exception as err:  # reported by the assertions below
            result["error"] = err
            first_chunk.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(60)
    factory.proc.send_signal(15)  # SIGTERM, as a process manager would
    t.join(120)
    assert "error" not in result, f"in-flight stream was cut: {result.get('error')!r}"
    assert result["finish"] == "length"
    assert result["usage"].completion_tokens == 160

    assert factory.proc.wait(120) == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(0.5)
    left = [f"{p.pid} {p.name()}" for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"processes left behind: {left}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(factory.base_url + "/health", timeout=2)
