"""The OpenAI-compatible API on the real stack (Ray Serve + vLLM CPU + HTTP), through the
official `openai` client where a client would use it."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.conftest import TINY_CONTEXT, TINY_MODEL

pytestmark = pytest.mark.stack


def test_chat_completion_returns_text_and_exact_usage(client):
    r = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    assert r.model == TINY_MODEL
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_honours_max_tokens(client):
    # ignore_eos makes the random model run to the limit, so the count is exact.
    r = client.completions.create(
        model=TINY_MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6


def test_chat_stream_ends_with_usage_chunk(client):
    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert text
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 10


def test_completion_stream_with_usage(client):
    stream = client.completions.create(
        model=TINY_MODEL,
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 5
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 1


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [TINY_MODEL]
    assert client.models.retrieve(TINY_MODEL).id == TINY_MODEL


def test_health_and_ready(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(base_url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["models"][TINY_MODEL] == {"expected": 1, "serving": 1}


def test_metrics_expose_engine_and_factory_series(client, base_url):
    client.completions.create(model=TINY_MODEL, prompt="metrics", max_tokens=2)
    http_line = re.compile(r'factory_http_requests_total\{path="/v1/completions",replica="[^"]+",status="200"\} [1-9]')
    deadline = time.monotonic() + 5  # replicas send their series to the hub once a second
    while not http_line.search(text := httpx.get(base_url + "/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.3)
    # vLLM's own engine metrics, labelled with the replica that produced them.
    engine_lines = [line for line in text.splitlines() if line.startswith("vllm:")]
    assert engine_lines, "no vllm:* series on /metrics"
    assert all('replica="' in line for line in engine_lines)
    assert any(line.startswith("vllm:prompt_tokens_total") for line in engine_lines)
    # The replicas' own HTTP series, labelled with the replica that answered.
    assert http_line.search(text)
    assert f'factory_replicas_serving{{model="{TINY_MODEL}"}} 1.0' in text


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": TINY_MODEL, "messages": "hello"}, "messages"),
        ({"model": TINY_MODEL, "messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"model": TINY_MODEL, "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": TINY_MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": TINY_MODEL}, "messages"),
        ({"model": TINY_MODEL, "messages": []}, "messages"),
        ({"model": TINY_MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": TINY_MODEL, "messages": USER, "max_tokens": -5}, "max_tokens"),
    ],
    ids=[
        "messages-not-list",
        "max-tokens-str",
        "temperature-str",
        "message-no-content",
        "no-messages",
        "empty-messages",
        "max-tokens-0",
        "max-tokens-negative",
    ],
)
def test_bad_chat_requests_are_400(api, body, param):
    err = _assert_openai_error(api.post(CHAT, json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_malformed_json_is_400(api):
    r = api.post(CHAT, content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"})
    err = _assert_openai_error(r, 400)
    assert "JSON" in err["message"]


def test_empty_completion_prompt_is_400(api):
    err = _assert_openai_error(api.post("/v1/completions", json={"model": TINY_MODEL, "prompt": ""}), 400)
    assert err["param"] == "prompt"


def test_max_tokens_beyond_context_is_400(api):
    body = {"model": TINY_MODEL, "messages": USER, "max_tokens": TINY_CONTEXT + 1}
    err = _assert_openai_error(api.post(CHAT, json=body), 400)
    assert str(TINY_CONTEXT) in err["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_prompt_longer_than_context_is_400(api, stream):
    long_prompt = "word " * (TINY_CONTEXT * 2)
    body = {"model": TINY_MODEL, "prompt": long_prompt, "max_tokens": 4, "stream": stream}
    err = _assert_openai_error(api.post("/v1/completions", json=body), 400)
    assert "context" in err["message"].lower() or "length" in err["message"].lower()


def test_unknown_model_is_404_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert exc.value.status_code == 404
    assert exc.value.body["code"] == "model_not_found"


def test_unknown_path_is_openai_shaped_404(base_url):
    _assert_openai_error(httpx.get(base_url + "/v1/nothing-here"), 404)


def test_server_still_serves_after_bad_requests(client):
    r = client.chat.completions.create(model=TINY_MODEL, messages=USER, max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_a_request_sent_while_the_factory_starts_is_answered_once_it_serves(tiny_factory):
    """Sent as soon as the port accepted connections, long before the engine was up: Serve's
    fallback proxy held it until the first replica served (a retryable 503 would be fine too);
    never a plain-text or 5xx answer."""
    early = tiny_factory.early_request
    assert "error" not in early, early.get("error")
    r = early["response"]
    if r.status_code == 503:
        err = _assert_openai_error(r, 503)
        assert err["code"] == "not_ready" and int(r.headers["Retry-After"]) > 0
    else:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
