"""Property-based fuzz of both completion routes on the real stack: whatever the body (valid fields,
wrong types, out-of-range or huge numbers, NaN, unicode, nested junk, missing fields, no JSON at
all), the answer is never a 5xx, every error is OpenAI-shaped, and a 200 is a completion.

Bodies that would run the engine keep `max_tokens` and `n` small, so a run stays within ~1 min on
two cores. Examples are random each run (no database is kept): a failure prints the body to add
as an `@example`."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.stack

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SMALL = 4  # tokens, and sequences, of a body that runs the engine

# -- values -------------------------------------------------------------------------------------------
_huge = st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -1, 0, -(10**20)])
_floats = st.floats(allow_nan=True, allow_infinity=True)  # NaN and Infinity reach the body as such
_text = st.text(max_size=24) | st.sampled_from(["", " ", "\ud800", "\x00", "🙂" * 8, "NaN", "<|endoftext|>"])
_scalar = st.none() | st.booleans() | st.integers() | _huge | _floats | _text
_junk = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=6
)
_token = st.integers(min_value=0, max_value=300) | _huge


def _or_junk(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values OpenAI accepts, sometimes anything at all."""
    return st.one_of(valid, valid, valid, _junk)


_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text}) | st.fixed_dictionaries(
    {"type": st.sampled_from(["image_url", "refusal", "input_audio", "file", "video"])}, optional={"image_url": _junk}
)
_message = st.fixed_dictionaries(
    {"role": _or_junk(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]))},
    optional={
        "content": _or_junk(_text | st.lists(_part, max_size=2)),
        "name": _or_junk(_text),
        "tool_call_id": _or_junk(_text),
        "tool_calls": _or_junk(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": _text,
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries({"name": _text, "arguments": _text}),
                    }
                ),
                max_size=2,
            )
        ),
    },
)
_tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.from_regex(r"[a-z_]{1,10}", fullmatch=True)}, optional={"parameters": _junk}
        ),
    }
)
_COMMON = {
    "temperature": _or_junk(st.floats(0, 2)),
    "top_p": _or_junk(st.floats(0, 1)),
    "n": _or_junk(st.integers(1, SMALL)),
    "max_tokens": _or_junk(st.integers(1, SMALL)),
    "presence_penalty": _or_junk(st.floats(-2, 2)),
    "frequency_penalty": _or_junk(st.floats(-2, 2)),
    "logit_bias": _or_junk(st.dictionaries(st.integers(0, 300).map(str), st.integers(-100, 100), max_size=3)),
    "stop": _or_junk(_text | st.lists(_text, max_size=5)),
    "seed": _or_junk(st.integers(-(2**63), 2**63 - 1)),
    "stream": _or_junk(st.booleans()),
    "stream_options": _or_junk(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "user": _or_junk(_text),
}
_CHAT_FIELDS = {
    **_COMMON,
    "messages": _or_junk(st.lists(_message, max_size=3)),
    "max_completion_tokens": _or_junk(st.integers(1, SMALL)),
    "logprobs": _or_junk(st.booleans()),
    "top_logprobs": _or_junk(st.integers(0, 20)),
    "response_format": _or_junk(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "tools": _or_junk(st.lists(_tool, max_size=2)),
    "tool_choice": _or_junk(st.sampled_from(["none", "auto", "required"])),
    "parallel_tool_calls": _or_junk(st.booleans()),
    "metadata": _or_junk(st.dictionaries(_text, _text, max_size=3)),
    "reasoning_effort": _or_junk(st.sampled_from(["low", "medium", "high"])),
}
_COMPLETION_FIELDS = {
    **_COMMON,
    "prompt": _or_junk(_text | st.lists(_text, max_size=3) | st.lists(_token, max_size=6)),
    "logprobs": _or_junk(st.integers(0, 5)),
    "echo": _or_junk(st.booleans()),
    "suffix": _or_junk(_text),
    "best_of": _or_junk(st.integers(0, SMALL)),
}
_BASE = {
    CHAT: {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": SMALL},
    COMPLETIONS: {"model": TINY_MODEL, "prompt": "hi", "max_tokens": SMALL},
}


@st.composite
def bodies(draw, path: str):
    """A valid body with some of its fields redrawn, some removed and some unknown ones added."""
    fields = _CHAT_FIELDS if path == CHAT else _COMPLETION_FIELDS
    body = dict(_BASE[path])
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[name] = draw(fields[name])
    if draw(st.integers(0, 3)) == 0:  # streams more often than one field in twenty would give
        body["stream"] = True
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(_BASE[path]))))
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(["model", "ignore_eos", "top_k", "foo"]))] = draw(_junk)
    return _bounded(body)


def _bounded(body: dict) -> dict:
    """Valid counts above SMALL would run the engine long (chat's default length is the context):
    they come down to SMALL; out-of-range ones stay, to be rejected."""
    for name in ("max_tokens", "max_completion_tokens", "n", "best_of"):
        value = body.get(name)
        if (value is None and name == "max_tokens") or (_is_int(value) and SMALL < value <= 128):
            body[name] = SMALL
    return body


def _is_int(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


# -- the property -------------------------------------------------------------------------------------
def _assert_openai_answer(r: httpx.Response, path: str, stream: bool) -> None:
    assert r.status_code < 500, r.text
    # --hypothesis-show-statistics: how many examples ran the engine, how many were refused and why.
    event(f"{r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else 'stream' if stream else 'ok'}")
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)
        return
    assert r.status_code == 200, r.text
    if stream:
        lines = [line for line in r.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]", r.text[-500:]
        for line in lines[:-1]:
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk and isinstance(chunk["choices"], list), chunk
        return
    answer = r.json()
    assert answer["object"] == ("chat.completion" if path == CHAT else "text_completion")
    assert answer["choices"] and answer["usage"]["total_tokens"] >= 1
    for choice in answer["choices"]:
        assert isinstance(choice["message"]["content"] if path == CHAT else choice["text"], (str, type(None)))


def _post(api: httpx.Client, path: str, body: dict) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity go as the bare words Python writes
    r = api.post(path, content=raw, headers={"Content-Type": "application/json"})
    stream = r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream")
    _assert_openai_answer(r, path, stream)


# `api` is one HTTP client for every example of a test: nothing in it changes between them.
_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=_QUIET)


@FUZZ
@given(body=bodies(CHAT))
# What the fuzz found, each a 5xx before: a lone surrogate quoted in an error message (the response
# could not be encoded), or in a message (the tokenizer failed), an image part for a text model
# (vLLM's renderer raised a bare ValueError), an integer beyond 64 bits (the engine could not carry it).
@example(body={**_BASE[CHAT], "logit_bias": {"\ud800": None}})
@example(body={**_BASE[CHAT], "messages": [{"role": "user", "content": "x\ud800"}]})
@example(
    body={
        **_BASE[CHAT],
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://localhost/cat.png"}}]}
        ],
    }
)
@example(body={**_BASE[CHAT], "top_k": 2**70})
def test_chat_never_5xx(api, body):
    _post(api, CHAT, body)


@FUZZ
@given(body=bodies(COMPLETIONS))
@example(body={**_BASE[COMPLETIONS], "prompt": "a\ud800b", "echo": True})
def test_completions_never_5xx(api, body):
    _post(api, COMPLETIONS, body)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=_QUIET)
@given(
    path=st.sampled_from([CHAT, COMPLETIONS]),
    raw=st.binary(max_size=64)
    | _junk.map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b"", b"{", b'{"model": "tiny", "messages": [', b"\xff\xfe", b"[]", b"null", b'"hi"', b"1e999"]),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_any_bytes_are_answered_openai_style(api, path, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    _assert_openai_answer(api.post(path, content=raw, headers=headers), path, stream=False)
