"""OpenAI's request checks (factory/api/validation.py): for each row of the table, a value OpenAI
accepts passes and each value it rejects is a 400 naming the field, with OpenAI's code; the
routes run them before vLLM's models; README.md's table is the module's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from factory.api.errors import APIError
from factory.api.validation import CHAT, COMPLETIONS, FIELDS, check_chat, check_completion, markdown_table

ABSENT = object()
USER = {"role": "user", "content": "hi"}
BASE = {CHAT: {"model": "tiny", "messages": [USER]}, COMPLETIONS: {"model": "tiny", "prompt": "hi"}}
CHECK = {CHAT: check_chat, COMPLETIONS: check_completion}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@dataclass(frozen=True)
class Case:
    api: str
    field: str
    value: Any
    error: tuple[str, str] | None = None  # (param, code); None: OpenAI accepts it
    extra: tuple[tuple[str, Any], ...] = ()  # other fields of the body

    def body(self) -> dict:
        body = {**BASE[self.api], **dict(self.extra)}
        if self.value is ABSENT:
            body.pop(self.field, None)
        else:
            body[self.field] = self.value
        return body

    def __str__(self) -> str:
        shown = "absent" if self.value is ABSENT else repr(self.value)[:40]
        return f"{self.api}-{self.field}-{shown}-{'ok' if self.error is None else self.error[1]}"


def ok(api: str, field: str, value: Any, **extra: Any) -> Case:
    return Case(api, field, value, None, tuple(extra.items()))


def bad(api: str, field: str, value: Any, param: str, code: str, **extra: Any) -> Case:
    return Case(api, field, value, (param, code), tuple(extra.items()))


def both(make, field: str, value: Any, *args: Any, **extra: Any) -> list[Case]:
    return [make(CHAT, field, value, *args, **extra), make(COMPLETIONS, field, value, *args, **extra)]


def _number_cases(field: str, good: list, low: Any, high: Any, word: str) -> list[Case]:
    cases = [c for v in good for c in both(ok, field, v)]
    if low is not None:
        cases += both(bad, field, low, field, f"{word}_below_min_value")
    if high is not None:
        cases += both(bad, field, high, field, f"{word}_above_max_value")
    return cases + both(bad, field, "1", field, "invalid_type") + both(bad, field, True, field, "invalid_type")


TYPE = "invalid_type"
VALUE = "invalid_value"
MISSING = "missing_required_parameter"
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

CASES: list[Case] = [
    *both(ok, "model", "tiny"),
    *both(bad, "model", ABSENT, "model", MISSING),
    *both(bad, "model", 5, "model", TYPE),
    # messages
    ok(CHAT, "messages", [{"role": "developer", "content": "be brief"}, USER]),
    ok(CHAT, "messages", [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, USER]),
    ok(CHAT, "messages", [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}]),
    ok(
        CHAT,
        "messages",
        [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
    ),
    ok(CHAT, "messages", [USER, {"role": "assistant", "content": "hello"}, USER]),
    ok(CHAT, "messages", [{"role": "user", "content": ""}]),
    bad(CHAT, "messages", ABSENT, "messages", MISSING),
    bad(CHAT, "messages", [], "messages", "empty_array"),
    bad(CHAT, "messages", "hello", "messages", TYPE),
    bad(CHAT, "messages", [5], "messages[0]", TYPE),
    bad(CHAT, "messages", [None], "messages[0]", TYPE),
    bad(CHAT, "messages", [{"content": "hi"}], "messages[0].role", MISSING),
    bad(CHAT, "messages", [{"role": "bot", "content": "hi"}], "messages[0].role", VALUE),
    bad(CHAT, "messages", [{"role": 1, "content": "hi"}], "messages[0].role", TYPE),
    bad(CHAT, "messages", [{"role": "user"}], "messages[0].content", MISSING),
    bad(CHAT, "messages", [{"role": "user", "content": None}], "messages[0].content", MISSING),
    bad(CHAT, "messages", [USER, {"role": "assistant"}], "messages[1].content", MISSING),
    bad(CHAT, "messages", [{"role": "user", "content": 5}], "messages[0].content", TYPE),
    bad(CHAT, "messages", [{"role": "user", "content": []}], "messages[0].content", "empty_array"),
    bad(CHAT, "messages", [{"role": "user", "content": [{"type": "video"}]}], "messages[0].content[0].type", VALUE),
    bad(CHAT, "messages", [{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", MISSING),
    bad(
        CHAT,
        "messages",
        [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "messages[0].content[0].type",
        VALUE,
    ),
    bad(CHAT, "messages", [{"role": "tool", "content": "sunny"}], "messages[0].tool_call_id", MISSING),
    bad(CHAT, "messages", [{"role": "user", "content": "hi", "name": 5}], "messages[0].name", TYPE),
    bad(
        CHAT,
        "messages",
        [{"role": "assistant", "tool_calls": [{**CALL, "type": "x"}]}],
        "messages[0].tool_calls[0].type",
        VALUE,
    ),
    # prompt
    ok(COMPLETIONS, "prompt", "once upon a time"),
    ok(COMPLETIONS, "prompt", ["a", "b"]),
    ok(COMPLETIONS, "prompt", [1, 2, 3]),
    ok(COMPLETIONS, "prompt", [[1, 2], [3]]),
    bad(COMPLETIONS, "prompt", ABSENT, "prompt", MISSING),
    bad(COMPLETIONS, "prompt", "", "prompt", "string_below_min_length"),
    bad(COMPLETIONS, "prompt", [], "prompt", "empty_array"),
    bad(COMPLETIONS, "prompt", [[]], "prompt[0]", "empty_array"),
    bad(COMPLETIONS, "prompt", [1, "a"], "prompt[1]", TYPE),
    bad(COMPLETIONS, "prompt", [-1], "prompt[0]", "integer_below_min_value"),
    bad(COMPLETIONS, "prompt", 5, "prompt", TYPE),
    bad(COMPLETIONS, "prompt", {"text": "hi"}, "prompt", TYPE),
    # numbers
    *_number_cases("temperature", [0, 0.7, 2], -0.1, 2.5, "decimal"),
    *_number_cases("top_p", [0, 0.5, 1], -1, 1.1, "decimal"),
    *_number_cases("n", [1, 2.0, 128], 0, 129, "integer"),
    *both(bad, "n", 1.5, "n", TYPE),
    *_number_cases("max_tokens", [1, 4], 0, None, "integer"),
    *both(bad, "max_tokens", -5, "max_tokens", "integer_below_min_value"),
    ok(CHAT, "max_completion_tokens", 4),
    bad(CHAT, "max_completion_tokens", 0, "max_completion_tokens", "integer_below_min_value"),
    bad(CHAT, "max_completion_tokens", "4", "max_completion_tokens", TYPE),
    *_number_cases("presence_penalty", [-2, 0, 2], -2.5, 2.01, "decimal"),
    *_number_cases("frequency_penalty", [-2, 1.5], -3, 3, "decimal"),
    *_number_cases("seed", [0, -7, 2**63 - 1], -(2**63) - 1, 2**63, "integer"),
    # logit_bias
    *both(ok, "logit_bias", {"50256": -100, "1": 100}),
    *both(bad, "logit_bias", {"a": 1}, "logit_bias", VALUE),
    *both(bad, "logit_bias", {"-1": 1}, "logit_bias", VALUE),
    *both(bad, "logit_bias", {"1": 101}, "logit_bias.1", "integer_above_max_value"),
    *both(bad, "logit_bias", {"1": -101}, "logit_bias.1", "integer_below_min_value"),
    *both(bad, "logit_bias", {"1": 0.5}, "logit_bias.1", TYPE),
    *both(bad, "logit_bias", {str(i): 1 for i in range(301)}, "logit_bias", "object_above_max_properties"),
    *both(bad, "logit_bias", [1], "logit_bias", TYPE),
    # logprobs
    ok(CHAT, "logprobs", True),
    bad(CHAT, "logprobs", 1, "logprobs", TYPE),
    ok(COMPLETIONS, "logprobs", 0),
    ok(COMPLETIONS, "logprobs", 5),
    bad(COMPLETIONS, "logprobs", 6, "logprobs", "integer_above_max_value"),
    bad(COMPLETIONS, "logprobs", -1, "logprobs", "integer_below_min_value"),
    bad(COMPLETIONS, "logprobs", True, "logprobs", TYPE),
    ok(CHAT, "top_logprobs", 20, logprobs=True),
    ok(CHAT, "top_logprobs", 0, logprobs=True),
    bad(CHAT, "top_logprobs", 21, "top_logprobs", "integer_above_max_value", logprobs=True),
    bad(CHAT, "top_logprobs", -1, "top_logprobs", "integer_below_min_value", logprobs=True),
    bad(CHAT, "top_logprobs", 2, "top_logprobs", VALUE),
    bad(CHAT, "top_logprobs", 2, "top_logprobs", VALUE, logprobs=False),
    # stop
    *both(ok, "stop", "\n"),
    *both(ok, "stop", ["a", "b", "c", "d"]),
    *both(bad, "stop", ["a", "b", "c", "d", "e"], "stop", "array_above_max_length"),
    *both(bad, "stop", [1], "stop[0]", TYPE),
    *both(bad, "stop", 5, "stop", TYPE),
    # streaming
    *both(ok, "stream", True),
    *both(ok, "stream", False),
    *both(bad, "stream", "yes", "stream", TYPE),
    *both(ok, "stream_options", {"include_usage": True}, stream=True),
    *both(bad, "stream_options", {"include_usage": True}, "stream_options", VALUE),
    *both(bad, "stream_options", {"include_usage": True}, "stream_options", VALUE, stream=False),
    *both(bad, "stream_options", {"include_usage": "y"}, "stream_options.include_usage", TYPE, stream=True),
    *both(bad, "stream_options", 5, "stream_options", TYPE, stream=True),
    # completions only
    ok(COMPLETIONS, "best_of", 1),
    ok(COMPLETIONS, "best_of", 3, n=3),
    bad(COMPLETIONS, "best_of", 1, "best_of", VALUE, n=2),
    bad(COMPLETIONS, "best_of", 2, "best_of", "unsupported_value"),
    bad(COMPLETIONS, "best_of", 21, "best_of", "integer_above_max_value", n=21),
    bad(COMPLETIONS, "best_of", -1, "best_of", "integer_below_min_value"),
    bad(COMPLETIONS, "best_of", "2", "best_of", TYPE),
    ok(COMPLETIONS, "echo", True),
    bad(COMPLETIONS, "echo", "yes", "echo", TYPE),
    ok(COMPLETIONS, "suffix", "the end"),
    bad(COMPLETIONS, "suffix", 5, "suffix", TYPE),
    *both(ok, "user", "user-1234"),
    *both(bad, "user", 5, "user", TYPE),
    # chat only
    ok(CHAT, "response_format", {"type": "text"}),
    ok(CHAT, "response_format", {"type": "json_object"}),
    ok(
        CHAT,
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
    ),
    bad(CHAT, "response_format", {"type": "xml"}, "response_format.type", VALUE),
    bad(CHAT, "response_format", {}, "response_format.type", MISSING),
    bad(CHAT, "response_format", {"type": "json_schema"}, "response_format.json_schema", MISSING),
    bad(
        CHAT,
        "response_format",
        {"type": "json_schema", "json_schema": {"schema": {}}},
        "response_format.json_schema.name",
        MISSING,
    ),
    bad(CHAT, "response_format", "json", "response_format", TYPE),
    ok(CHAT, "tools", [TOOL]),
    bad(CHAT, "tools", [], "tools", "empty_array"),
    bad(CHAT, "tools", [TOOL] * 129, "tools", "array_above_max_length"),
    bad(CHAT, "tools", [{"type": "function"}], "tools[0].function", MISSING),
    bad(CHAT, "tools", [{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name", VALUE),
    bad(
        CHAT,
        "tools",
        [{"type": "function", "function": {"name": "f" * 65}}],
        "tools[0].function.name",
        "string_above_max_length",
    ),
    bad(CHAT, "tools", [{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type", VALUE),
    bad(CHAT, "tools", {"type": "function"}, "tools", TYPE),
    ok(CHAT, "tool_choice", "auto", tools=[TOOL]),
    ok(CHAT, "tool_choice", "none", tools=[TOOL]),
    ok(CHAT, "tool_choice", {"type": "function", "function": {"name": "get_weather"}}, tools=[TOOL]),
    bad(CHAT, "tool_choice", "auto", "tool_choice", VALUE),
    bad(CHAT, "tool_choice", "sometimes", "tool_choice", VALUE, tools=[TOOL]),
    bad(CHAT, "tool_choice", {"type": "function"}, "tool_choice.function", MISSING, tools=[TOOL]),
    bad(CHAT, "tool_choice", 5, "tool_choice", TYPE, tools=[TOOL]),
    ok(CHAT, "parallel_tool_calls", False),
    bad(CHAT, "parallel_tool_calls", "no", "parallel_tool_calls", TYPE),
    ok(CHAT, "function_call", "auto"),
    ok(CHAT, "function_call", {"name": "f"}),
    bad(CHAT, "function_call", "always", "function_call", VALUE),
    bad(CHAT, "function_call", {"nam": "f"}, "function_call.name", MISSING),
    ok(CHAT, "functions", [{"name": "f", "parameters": {}}]),
    bad(CHAT, "functions", [], "functions", "empty_array"),
    bad(CHAT, "functions", [{"description": "x"}], "functions[0].name", MISSING),
    ok(CHAT, "reasoning_effort", "low"),
    bad(CHAT, "reasoning_effort", "max", "reasoning_effort", VALUE),
    ok(CHAT, "verbosity", "medium"),
    bad(CHAT, "verbosity", "loud", "verbosity", VALUE),
    ok(CHAT, "service_tier", "auto"),
    bad(CHAT, "service_tier", "gold", "service_tier", VALUE),
    ok(CHAT, "store", False),
    bad(CHAT, "store", "no", "store", TYPE),
    ok(CHAT, "metadata", {"project": "demo"}),
    bad(CHAT, "metadata", {f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties"),
    bad(CHAT, "metadata", {"k": 5}, "metadata.k", TYPE),
    bad(CHAT, "metadata", {"k": "v" * 513}, "metadata.k", "string_above_max_length"),
    bad(CHAT, "metadata", {"k" * 65: "v"}, "metadata", VALUE),
    ok(CHAT, "modalities", ["text"]),
    bad(CHAT, "modalities", ["video"], "modalities[0]", VALUE),
    bad(CHAT, "modalities", "text", "modalities", TYPE),
    ok(CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    bad(CHAT, "audio", "alloy", "audio", TYPE),
    ok(CHAT, "prediction", {"type": "content", "content": "x"}),
    bad(CHAT, "prediction", "x", "prediction", TYPE),
    ok(CHAT, "web_search_options", {}),
    bad(CHAT, "web_search_options", [], "web_search_options", TYPE),
    ok(CHAT, "prompt_cache_key", "k"),
    bad(CHAT, "prompt_cache_key", 5, "prompt_cache_key", TYPE),
    ok(CHAT, "safety_identifier", "hash-of-user"),
    bad(CHAT, "safety_identifier", "x" * 65, "safety_identifier", "string_above_max_length"),
]


def _row(api: str, name: str):
    return next(f for f in FIELDS if f.name == name and api in f.apis)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_field_as_openai_checks_it(case: Case):
    if case.error is None:
        CHECK[case.api](case.body())
        return
    with pytest.raises(APIError) as caught:
        CHECK[case.api](case.body())
    err = caught.value
    assert (err.status, err.param, err.code) == (400, *case.error), err.message
    assert err.message
    # The README's codes column is complete: the row lists every code its field can answer.
    assert err.code in _row(case.api, case.field).codes


def test_every_row_of_the_table_is_tested_both_ways():
    for f in FIELDS:
        for api in f.apis:
            cases = [c for c in CASES if (c.api, c.field) == (api, f.name)]
            assert any(c.error is None for c in cases), f"no accepted value tested for {api} {f.name}"
            assert any(c.error is not None for c in cases), f"no rejected value tested for {api} {f.name}"


@pytest.mark.parametrize(
    "check, field, value, message",
    [
        (
            check_chat,
            "temperature",
            3,
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.",
        ),
        (check_chat, "n", 0, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
        (
            check_chat,
            "temperature",
            "hot",
            "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        ),
        (
            check_chat,
            "messages",
            [],
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ),
        (
            check_chat,
            "stream_options",
            {"include_usage": True},
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ),
        (
            check_chat,
            "messages",
            [{"role": "bot", "content": "x"}],
            "Invalid value: 'bot'. Supported values are: 'system', 'developer', 'user', 'assistant', 'tool', "
            "and 'function'.",
        ),
        (check_completion, "prompt", ABSENT, "Missing required parameter: 'prompt'."),
    ],
)
def test_messages_are_openais(check, field, value, message):
    body = {**BASE[CHAT if check is check_chat else COMPLETIONS]}
    body.pop(field) if value is ABSENT else body.__setitem__(field, value)
    with pytest.raises(APIError) as caught:
        check(body)
    assert caught.value.message == message


def test_a_body_that_is_no_object_is_invalid_type():
    for body in ([], "hi", 5):
        with pytest.raises(APIError) as caught:
            check_chat(body)
        assert (caught.value.param, caught.value.code) == (None, "invalid_type")


def test_vllm_extensions_are_left_to_vllm():
    check_completion({**BASE[COMPLETIONS], "ignore_eos": True, "top_k": 5, "min_tokens": 2})


def test_images_and_audio_only_for_a_model_that_takes_them():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = {**BASE[CHAT], "messages": [USER, {"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    check_chat(body, media=True)
    with pytest.raises(APIError) as caught:
        check_chat(body, media=False)
    assert (caught.value.param, caught.value.code) == ("messages[1].content[1].type", "invalid_value")
    assert caught.value.message == "Invalid content type. image_url is only supported by certain models."


def test_the_readme_table_is_the_modules():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, (
        "README.md's table under 'What a request is checked for' is out of date; replace it with the output of\n"
        "  .venv/bin/python -c 'from factory.api.validation import markdown_table; print(markdown_table())'"
    )


# -- through the routes, before vLLM's request models -------------------------------------------------
class _Reached(Exception):
    """Raised where the route would start serving: the body passed every check."""


@pytest.fixture(scope="module")
def http():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.responses import JSONResponse

    from factory.api.completions import router
    from factory.api.errors import install_handlers

    class Context:
        serving = None  # no engine: a text model, as far as the checks can tell

        def require_model(self, model):
            raise _Reached(model)

    app = FastAPI()
    install_handlers(app)
    app.include_router(router)
    app.state.factory = Context()

    @app.exception_handler(_Reached)
    async def _reached(_, exc):
        return JSONResponse({"reached": True}, status_code=299)

    with TestClient(app) as client:
        yield client


def _error(r) -> dict:
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.json()["error"]


def test_a_valid_body_reaches_the_engine(http):
    assert http.post("/v1/chat/completions", json=BASE[CHAT]).status_code == 299
    assert http.post("/v1/completions", json={**BASE[COMPLETIONS], "ignore_eos": True}).status_code == 299


def test_the_checks_run_before_vllms_models(http):
    # vLLM would say "Stream options can only be defined when `stream=True`."; OpenAI's words win.
    err = _error(http.post("/v1/chat/completions", json={**BASE[CHAT], "stream_options": {"include_usage": True}}))
    assert err["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    # pydantic would take "0.5" as a temperature.
    err = _error(http.post("/v1/completions", json={**BASE[COMPLETIONS], "temperature": "0.5"}))
    assert (err["param"], err["code"]) == ("temperature", "invalid_type")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(http, constant):
    raw = b'{"model": "tiny", "prompt": "NaN", "temperature": ' + constant + b"}"
    err = _error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}))
    assert "not valid JSON" in err["message"] and err["param"] is None


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        (b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
        (b'{"model": "tiny", "prompt": "hi", "top_k": 1180591620717411303424}', "top_k"),
        (b'{"model": "tiny", "prompt": "hi", "stop_token_ids": [-9223372036854775809]}', "stop_token_ids[0]"),
    ],
    ids=["surrogate", "surrogate-in-list", "int-beyond-64-bits", "negative-int-beyond-64-bits"],
)
def test_what_the_engine_cannot_carry_is_400(http, raw, param):
    """Python's parser takes them; the tokenizer (a lone surrogate) and the engine (an integer
    beyond 64 bits) failed on them past vLLM's models: 500 and 503."""
    err = _error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}))
    assert err["param"] == param


def test_an_escaped_surrogate_pair_is_text(http):
    raw = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude42"}'
    assert http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}).status_code == 299


def test_a_string_that_says_nan_is_fine(http):
    raw = b'{"model": "tiny", "prompt": "NaN and Infinity"}'
    assert http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}).status_code == 299


def test_an_empty_body_misses_the_model(http):
    err = _error(http.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"}))
    assert (err["param"], err["code"]) == ("model", "missing_required_parameter")


def test_vllms_own_fields_name_the_field_in_openais_style(http):
    err = _error(http.post("/v1/completions", json={**BASE[COMPLETIONS], "top_k": "x"}))
    assert (err["param"], err["code"]) == ("top_k", "invalid_type")
    err = _error(http.post("/v1/completions", json={**BASE[COMPLETIONS], "stop_token_ids": [1, "a"]}))
    assert (err["param"], err["code"]) == ("stop_token_ids[1]", "invalid_type")
    err = _error(http.post("/v1/completions", json={**BASE[COMPLETIONS], "truncate_prompt_tokens": -2}))
    assert (err["param"], err["code"]) == ("truncate_prompt_tokens", "invalid_value")


def test_an_error_that_quotes_a_lone_surrogate_can_be_sent():
    """What the fuzz found first: the error quoted the request's "\\ud800", and the response could not be
    encoded (a 500). The checks above now refuse the surrogate first; the error body stays safe anyway."""
    from factory.api.errors import error_response

    body = json.loads(error_response(400, "Invalid key: '\ud800'.", param="metadata.\udfff").body)
    assert body["error"]["message"] == "Invalid key: '?'." and body["error"]["param"] == "metadata.?"
