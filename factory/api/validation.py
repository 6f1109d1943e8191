"""What a request is checked for before the engine sees it, as OpenAI checks it.

`FIELDS` has one row per request field of OpenAI's Chat Completions and Completions APIs: the
API(s) that define it and the values OpenAI accepts. `check_chat` and `check_completion` run the
rows over the request's JSON body, before vLLM's request models parse it, because:
- OpenAI is stricter than pydantic's lax parsing ("0.5" is no temperature, 2.5 is no `n`);
- OpenAI's answer names the field (`param`, `messages[0].content`) and says what it expected,
  with its own codes (`decimal_above_max_value`, `empty_array`, ...), where vLLM's words differ;
- some values vLLM takes would run the engine anyway: an unknown role, a `stream_options` on a
  plain request.
The first problem found is the answer: a 400 `invalid_request_error`. vLLM's own extensions
(`ignore_eos`, `top_k`, ...) are left to its models, except for what would fail past them, a 5xx:
NaN and Infinity, lone surrogates and integers beyond 64 bits anywhere in the body, and images or
audio sent to a text model. README.md's table is `markdown_table()`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from factory.api.errors import APIError

CHAT = "chat"
COMPLETIONS = "completions"
BOTH = (CHAT, COMPLETIONS)


# -- OpenAI's words ----------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    """A JSON value's type as OpenAI's messages say it ("but got a string instead")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)


def _quoted(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"'{text[:64]}...'" if len(text) > 64 else f"'{text}'"


def _listed(values: tuple[str, ...]) -> str:
    """'a', 'b', and 'c' (OpenAI's list of supported values)."""
    quoted = [f"'{v}'" for v in values]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + (", and " if len(quoted) > 2 else " and ") + quoted[-1]


def _error(param: str | None, message: str, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def _invalid_type(param: str | None, expected: str, value: Any) -> APIError:
    where = f"'{param}'" if param else "the request body"
    return _error(
        param, f"Invalid type for {where}: expected {expected}, but got {_kind(value)} instead.", "invalid_type"
    )


def _missing(param: str) -> APIError:
    return _error(param, f"Missing required parameter: '{param}'.", "missing_required_parameter")


# -- rules: the values one field accepts --------------------------------------------------------------
class Rule(ABC):
    """The values one field accepts: `check` raises OpenAI's 400 for any other; `accepts` and
    `codes` are its row in the README; `json_type` and `expected` are the JSON type it takes."""

    json_type: type | tuple[type, ...]
    expected: str  # in OpenAI's words, for invalid_type: "expected a string"
    accepts: str

    @property
    def codes(self) -> tuple[str, ...]:
        return ("invalid_type",)

    @abstractmethod
    def check(self, param: str, value: Any) -> None: ...


@dataclass(frozen=True)
class Number(Rule):
    """An integer or a decimal (any JSON number; 2.0 counts as an integer), within [lo, hi]."""

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    json_type = (int, float)

    @property
    def expected(self) -> str:
        return "an integer" if self.integer else "a decimal"

    @property
    def accepts(self) -> str:
        what = "integer" if self.integer else "number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in [{_number(self.lo)}, {_number(self.hi)}]"
        if self.lo is not None:
            return f"{what} ≥ {_number(self.lo)}"
        return what

    @property
    def codes(self) -> tuple[str, ...]:
        word = "integer" if self.integer else "decimal"
        bounds = [f"{word}_below_min_value"] * (self.lo is not None)
        bounds += [f"{word}_above_max_value"] * (self.hi is not None)
        return ("invalid_type", *bounds)

    def check(self, param: str, value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (self.integer and isinstance(value, float) and not value.is_integer()):
            raise _invalid_type(param, self.expected, value)
        word = "integer" if self.integer else "decimal"
        if self.lo is not None and value < self.lo:
            raise _error(
                param,
                f"Invalid '{param}': {word} below minimum value. Expected a value >= {_number(self.lo)}, "
                f"but got {_number(value)} instead.",
                f"{word}_below_min_value",
            )
        if self.hi is not None and value > self.hi:
            raise _error(
                param,
                f"Invalid '{param}': {word} above maximum value. Expected a value <= {_number(self.hi)}, "
                f"but got {_number(value)} instead.",
                f"{word}_above_max_value",
            )


@dataclass(frozen=True)
class Boolean(Rule):
    json_type = bool
    expected = "a boolean"
    accepts = "boolean"

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise _invalid_type(param, self.expected, value)


@dataclass(frozen=True)
class Text(Rule):
    """A string, optionally non-empty, bounded in length, or matching a pattern."""

    min_length: int = 0
    max_length: int | None = None
    pattern: str | None = None
    json_type = str
    expected = "a string"

    @property
    def accepts(self) -> str:
        limits = [f"≥ {self.min_length} characters"] * bool(self.min_length)
        limits += [f"≤ {self.max_length} characters"] * (self.max_length is not None)
        limits += [f"matching `{self.pattern}`"] * (self.pattern is not None)
        return "string" + (f" ({', '.join(limits)})" if limits else "")

    @property
    def codes(self) -> tuple[str, ...]:
        extra = ["string_below_min_length"] * bool(self.min_length)
        extra += ["string_above_max_length"] * (self.max_length is not None)
        extra += ["invalid_value"] * (self.pattern is not None)
        return ("invalid_type", *extra)

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, str):
            raise _invalid_type(param, self.expected, value)
        if len(value) < self.min_length:
            raise _error(
                param,
                f"Invalid '{param}': string too short. Expected a string with minimum length {self.min_length}, "
                f"but got a string with length {len(value)} instead.",
                "string_below_min_length",
            )
        if self.max_length is not None and len(value) > self.max_length:
            raise _error(
                param,
                f"Invalid '{param}': string too long. Expected a string with maximum length {self.max_length}, "
                f"but got a string with length {len(value)} instead.",
                "string_above_max_length",
            )
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _error(
                param,
                f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
                f"'{self.pattern}'.",
                "invalid_value",
            )


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a few strings."""

    values: tuple[str, ...]
    json_type = str
    expected = "a string"

    @property
    def accepts(self) -> str:
        return " \\| ".join(f"`{v}`" for v in self.values)

    @property
    def codes(self) -> tuple[str, ...]:
        return ("invalid_type", "invalid_value")

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, str):
            raise _invalid_type(param, self.expected, value)
        if value not in self.values:
            raise _error(
                param,
                f"Invalid value: {_quoted(value)}. Supported values are: {_listed(self.values)}.",
                "invalid_value",
            )


@dataclass(frozen=True)
class ArrayOf(Rule):
    item: Rule
    non_empty: bool = False
    max_items: int | None = None
    json_type = list
    expected = "an array"

    @property
    def accepts(self) -> str:
        size = f" (≤ {self.max_items} items)" if self.max_items is not None else ""
        return f"{'non-empty ' * self.non_empty}array{size} of {self.item.accepts}"

    @property
    def codes(self) -> tuple[str, ...]:
        own = ["empty_array"] * self.non_empty + ["array_above_max_length"] * (self.max_items is not None)
        return _union(("invalid_type", *own), self.item.codes)

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, list):
            raise _invalid_type(param, self.expected, value)
        if self.non_empty and not value:
            raise _error(
                param,
                f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array "
                "instead.",
                "empty_array",
            )
        if self.max_items is not None and len(value) > self.max_items:
            raise _error(
                param,
                f"Invalid '{param}': array too long. Expected an array with maximum length {self.max_items}, "
                f"but got an array with length {len(value)} instead.",
                "array_above_max_length",
            )
        for i, item in enumerate(value):
            if item is None:
                raise _invalid_type(f"{param}[{i}]", self.item.expected, item)
            self.item.check(f"{param}[{i}]", item)


@dataclass(frozen=True)
class MapOf(Rule):
    """An object of at most `max_items` entries, its keys matching `key_pattern`, its values `value`."""

    value: Rule
    max_items: int
    key_pattern: str
    key_words: str  # what a key must be, in words
    json_type = dict
    expected = "an object"

    @property
    def accepts(self) -> str:
        return f"object of ≤ {self.max_items} entries: {self.key_words} → {self.value.accepts}"

    @property
    def codes(self) -> tuple[str, ...]:
        return _union(("invalid_type", "object_above_max_properties", "invalid_value"), self.value.codes)

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _invalid_type(param, self.expected, value)
        if len(value) > self.max_items:
            raise _error(
                param,
                f"Invalid '{param}': too many properties. Expected an object with at most {self.max_items} "
                f"properties, but got an object with {len(value)} properties instead.",
                "object_above_max_properties",
            )
        for key, item in value.items():
            if not re.fullmatch(self.key_pattern, key):
                raise _error(
                    param, f"Invalid key in '{param}': {_quoted(key)}. Expected {self.key_words}.", "invalid_value"
                )
            if item is None:
                raise _invalid_type(f"{param}.{key}", self.value.expected, item)
            self.value.check(f"{param}.{key}", item)


@dataclass(frozen=True)
class Key:
    """One key of an object: its rule, and whether it is required (always, or given the object)."""

    rule: Rule
    required: bool | Callable[[dict], bool] = False


@dataclass(frozen=True)
class ObjectOf(Rule):
    """An object with these keys (null is the same as absent, as in OpenAI's nullable fields); other
    keys are let through, as vLLM's extensions are."""

    keys: dict[str, Key] = field(default_factory=dict)
    words: str = "object"
    json_type = dict
    expected = "an object"

    @property
    def accepts(self) -> str:
        return self.words

    @property
    def codes(self) -> tuple[str, ...]:
        required = any(k.required for k in self.keys.values())
        return _union(
            ("invalid_type", *["missing_required_parameter"] * required), *(k.rule.codes for k in self.keys.values())
        )

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _invalid_type(param, self.expected, value)
        for name, key in self.keys.items():
            item = value.get(name)
            if item is None:
                if key.required is True or (callable(key.required) and key.required(value)):
                    raise _missing(f"{param}.{name}")
                continue
            key.rule.check(f"{param}.{name}", item)


@dataclass(frozen=True)
class Tagged(Rule):
    """An object whose `tag` key says which shape it has (a message's role, a content part's type)."""

    tag: str
    variants: dict[str, ObjectOf]
    words: str
    json_type = dict
    expected = "an object"

    @property
    def accepts(self) -> str:
        return self.words

    @property
    def codes(self) -> tuple[str, ...]:
        own = ("invalid_type", "missing_required_parameter", "invalid_value")
        return _union(own, *(v.codes for v in self.variants.values()))

    def check(self, param: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _invalid_type(param, self.expected, value)
        tag = value.get(self.tag)
        if tag is None:
            raise _missing(f"{param}.{self.tag}")
        OneOf(tuple(self.variants)).check(f"{param}.{self.tag}", tag)
        self.variants[tag].check(param, value)


@dataclass(frozen=True)
class AnyOf(Rule):
    """One of several rules, picked by the value's JSON type (a string, or an array of strings)."""

    options: tuple[Rule, ...]
    words: str

    @property
    def expected(self) -> str:
        return "one of " + " or ".join(o.expected for o in self.options)

    @property
    def accepts(self) -> str:
        return self.words

    @property
    def codes(self) -> tuple[str, ...]:
        return _union(*(o.codes for o in self.options))

    @property
    def json_type(self) -> tuple[type, ...]:
        return tuple(o.json_type for o in self.options)

    def check(self, param: str, value: Any) -> None:
        for option in self.options:
            if isinstance(value, option.json_type):
                return option.check(param, value)
        raise _invalid_type(param, self.expected, value)


@dataclass(frozen=True)
class Prompt(Rule):
    """A completion's prompt: a string, or a non-empty array of strings, of token ids or of arrays of
    token ids (one kind throughout, as its first item says)."""

    json_type = (str, list)
    expected = "one of a string, an array of strings, an array of integers, or an array of arrays of integers"
    accepts = "non-empty string, or non-empty array of strings, of token ids (integers ≥ 0) or of arrays of token ids"

    @property
    def codes(self) -> tuple[str, ...]:
        return ("invalid_type", "string_below_min_length", "empty_array", "integer_below_min_value")

    def check(self, param: str, value: Any) -> None:
        if isinstance(value, str):
            return Text(min_length=1).check(param, value)
        if not isinstance(value, list):
            raise _invalid_type(param, self.expected, value)
        first = value[0] if value else None
        token = Number(lo=0, integer=True)
        item: Rule = Text(min_length=1) if isinstance(first, str) else token
        if isinstance(first, list):
            item = ArrayOf(token, non_empty=True)
        ArrayOf(item, non_empty=True).check(param, value)


# -- cross-field conditions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """A field allowed only alongside others' values: `holds(body)` false -> 400 with `message`."""

    holds: Callable[[dict], bool]
    message: str
    words: str  # for the README
    code: str = "invalid_value"


# -- the table ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    name: str
    apis: tuple[str, ...]
    rule: Rule
    required: bool = False
    needs: tuple[Needs, ...] = ()
    words: str | None = None  # for the README, where the rule's own words would not do

    @property
    def accepts(self) -> str:
        return "; ".join([self.words or self.rule.accepts, *(n.words for n in self.needs)])

    @property
    def codes(self) -> tuple[str, ...]:
        required = ("missing_required_parameter",) * self.required
        return _union(required, self.rule.codes, tuple(n.code for n in self.needs))


def _union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(code for group in groups for code in group))


_TEXT_PART = ObjectOf({"text": Key(Text(), required=True)})
_FUNCTION_NAME = Text(max_length=64, pattern=r"[a-zA-Z0-9_-]+")
_TOOL_CALL = ObjectOf(
    {
        "id": Key(Text(), required=True),
        "type": Key(OneOf(("function",)), required=True),
        "function": Key(
            ObjectOf({"name": Key(Text(), required=True), "arguments": Key(Text(), required=True)}), required=True
        ),
    }
)


def _content(parts: dict[str, ObjectOf], words: str) -> AnyOf:
    """A message's content: a string, or a non-empty array of the content parts its role may send."""
    part = Tagged("type", parts, words=f"content part ({', '.join(parts)})")
    return AnyOf((Text(), ArrayOf(part, non_empty=True)), words=words)


_TEXT_ONLY = _content({"text": _TEXT_PART}, "string or array of text parts")
_ROLES = {
    "system": ObjectOf({"content": Key(_TEXT_ONLY, required=True), "name": Key(Text())}),
    "developer": ObjectOf({"content": Key(_TEXT_ONLY, required=True), "name": Key(Text())}),
    "user": ObjectOf(
        {
            "content": Key(
                _content(
                    {
                        "text": _TEXT_PART,
                        "image_url": ObjectOf(
                            {"image_url": Key(ObjectOf({"url": Key(Text(), required=True)}), required=True)}
                        ),
                        "input_audio": ObjectOf({"input_audio": Key(ObjectOf(), required=True)}),
                        "file": ObjectOf({"file": Key(ObjectOf(), required=True)}),
                    },
                    "string or array of content parts",
                ),
                required=True,
            ),
            "name": Key(Text()),
        }
    ),
    "assistant": ObjectOf(
        {
            # Content may be left out only by a message that calls tools (or, deprecated, a function).
            "content": Key(
                _content(
                    {"text": _TEXT_PART, "refusal": ObjectOf({"refusal": Key(Text(), required=True)})},
                    "string or array of text/refusal parts",
                ),
                required=lambda msg: not (msg.get("tool_calls") or msg.get("function_call")),
            ),
            "name": Key(Text()),
            "refusal": Key(Text()),
            "tool_calls": Key(ArrayOf(_TOOL_CALL)),
            "function_call": Key(
                ObjectOf({"name": Key(Text(), required=True), "arguments": Key(Text(), required=True)})
            ),
        }
    ),
    "tool": ObjectOf({"content": Key(_TEXT_ONLY, required=True), "tool_call_id": Key(Text(), required=True)}),
    "function": ObjectOf({"content": Key(Text(), required=True), "name": Key(Text(), required=True)}),
}
_MESSAGES = ArrayOf(
    Tagged(
        "role",
        _ROLES,
        words="message: `role` one of " + ", ".join(f"`{r}`" for r in _ROLES) + "; `content` a string or content "
        "parts (required unless an assistant message has `tool_calls`); `tool_call_id` on tool messages",
    ),
    non_empty=True,
)
_TOOLS = ArrayOf(
    ObjectOf(
        {
            "type": Key(OneOf(("function",)), required=True),
            "function": Key(
                ObjectOf(
                    {
                        "name": Key(_FUNCTION_NAME, required=True),
                        "description": Key(Text()),
                        "parameters": Key(ObjectOf()),
                        "strict": Key(Boolean()),
                    }
                ),
                required=True,
            ),
        },
        words="function tool (`function.name` ≤ 64 characters of `a-zA-Z0-9_-`)",
    ),
    non_empty=True,
    max_items=128,
)
_NAMED_FUNCTION = ObjectOf(
    {
        "type": Key(OneOf(("function",)), required=True),
        "function": Key(ObjectOf({"name": Key(Text(), required=True)}), required=True),
    },
    words="`{type: function, function: {name}}`",
)
_RESPONSE_FORMAT = Tagged(
    "type",
    {
        "text": ObjectOf(),
        "json_object": ObjectOf(),
        "json_schema": ObjectOf(
            {
                "json_schema": Key(
                    ObjectOf(
                        {
                            "name": Key(_FUNCTION_NAME, required=True),
                            "description": Key(Text()),
                            "schema": Key(ObjectOf()),
                            "strict": Key(Boolean()),
                        }
                    ),
                    required=True,
                )
            }
        ),
    },
    words="object, `type` one of `text`, `json_object`, `json_schema` (then `json_schema.name` required)",
)
_STOP = AnyOf((Text(), ArrayOf(Text(), max_items=4)), words="string, or array of ≤ 4 strings")
_LOGIT_BIAS = MapOf(
    Number(-100, 100, integer=True), max_items=300, key_pattern=r"[0-9]{1,10}", key_words="a token id (digits)"
)
_INT64 = Number(-(2**63), 2**63 - 1, integer=True)
_METADATA = MapOf(
    Text(max_length=512), max_items=16, key_pattern=r"(?s).{1,64}", key_words="a key of 1 to 64 characters"
)


FIELDS: tuple[Field, ...] = (
    Field("model", BOTH, Text(), required=True),
    Field("messages", (CHAT,), _MESSAGES, required=True),
    Field("prompt", (COMPLETIONS,), Prompt(), required=True),
    Field("temperature", BOTH, Number(0, 2)),
    Field("top_p", BOTH, Number(0, 1)),
    Field("n", BOTH, Number(1, 128, integer=True)),
    Field("max_tokens", BOTH, Number(1, integer=True)),
    Field("max_completion_tokens", (CHAT,), Number(1, integer=True)),
    Field("presence_penalty", BOTH, Number(-2, 2)),
    Field("frequency_penalty", BOTH, Number(-2, 2)),
    Field("logit_bias", BOTH, _LOGIT_BIAS),
    Field("logprobs", (CHAT,), Boolean()),
    Field("logprobs", (COMPLETIONS,), Number(0, 5, integer=True)),
    Field(
        "top_logprobs",
        (CHAT,),
        Number(0, 20, integer=True),
        needs=(
            Needs(
                lambda body: body.get("logprobs") is True,
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
                "only with `logprobs: true`",
            ),
        ),
    ),
    Field("stop", BOTH, _STOP),
    Field("seed", BOTH, _INT64, words="integer (64-bit)"),
    Field("stream", BOTH, Boolean()),
    Field(
        "stream_options",
        BOTH,
        ObjectOf({"include_usage": Key(Boolean())}, words="object (`include_usage`: boolean)"),
        needs=(
            Needs(
                lambda body: body.get("stream") is True,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "only with `stream: true`",
            ),
        ),
    ),
    Field(
        "best_of",
        (COMPLETIONS,),
        Number(0, 20, integer=True),
        needs=(
            Needs(
                lambda body: body["best_of"] >= (body.get("n") or 1),
                "Invalid 'best_of': 'best_of' must be greater than or equal to 'n'.",
                "≥ `n`",
            ),
            # vLLM's engine has no best-of sampling: it would answer `n` samples, none chosen as best.
            Needs(
                lambda body: body["best_of"] <= (body.get("n") or 1),
                "'best_of' greater than 'n' is not supported by this server.",
                "≤ `n` (the engine has no best-of sampling)",
                code="unsupported_value",
            ),
        ),
    ),
    Field("echo", (COMPLETIONS,), Boolean()),
    Field("suffix", (COMPLETIONS,), Text()),
    Field("user", BOTH, Text()),
    Field("response_format", (CHAT,), _RESPONSE_FORMAT),
    Field("tools", (CHAT,), _TOOLS),
    Field(
        "tool_choice",
        (CHAT,),
        AnyOf(
            (OneOf(("none", "auto", "required")), _NAMED_FUNCTION),
            words="`none` \\| `auto` \\| `required` \\| `{type: function, function: {name}}`",
        ),
        needs=(
            Needs(
                lambda body: body.get("tools") is not None,
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "only with `tools`",
            ),
        ),
    ),
    Field("parallel_tool_calls", (CHAT,), Boolean()),
    Field(
        "function_call",
        (CHAT,),
        AnyOf(
            (OneOf(("none", "auto")), ObjectOf({"name": Key(Text(), required=True)})),
            words="`none` \\| `auto` \\| `{name}` (deprecated)",
        ),
    ),
    Field(
        "functions",
        (CHAT,),
        ArrayOf(ObjectOf({"name": Key(_FUNCTION_NAME, required=True)}, words="function (deprecated)"), non_empty=True),
    ),
    Field("reasoning_effort", (CHAT,), OneOf(("none", "minimal", "low", "medium", "high", "xhigh"))),
    Field("verbosity", (CHAT,), OneOf(("low", "medium", "high"))),
    Field("service_tier", (CHAT,), OneOf(("auto", "default", "flex", "scale", "priority"))),
    Field("store", (CHAT,), Boolean()),
    Field("metadata", (CHAT,), _METADATA),
    Field("modalities", (CHAT,), ArrayOf(OneOf(("text", "audio")))),
    Field("audio", (CHAT,), ObjectOf()),
    Field("prediction", (CHAT,), ObjectOf()),
    Field("web_search_options", (CHAT,), ObjectOf()),
    Field("prompt_cache_key", (CHAT,), Text()),
    Field("safety_identifier", (CHAT,), Text(max_length=64)),
)


# -- checks -------------------------------------------------------------------------------------------
def _check(body: Any, api: str) -> None:
    if not isinstance(body, dict):
        raise _invalid_type(None, "an object", body)
    fields = [f for f in FIELDS if api in f.apis]
    for f in fields:
        value = body.get(f.name)
        if value is None:
            if f.required:
                raise _missing(f.name)
            continue
        f.rule.check(f.name, value)
    # Only now, with every field well-formed, the conditions between fields.
    for f in fields:
        if body.get(f.name) is None:
            continue
        for need in f.needs:
            if not need.holds(body):
                raise _error(f.name, need.message, need.code)


def check_chat(body: Any, *, media: bool = True) -> None:
    """A Chat Completions request body (parsed JSON) as OpenAI checks it: 400 at the first problem.
    `media`: whether the model takes content parts other than text (images, audio, files)."""
    _check(body, CHAT)
    if not media:
        _check_text_only(body["messages"])


def check_completion(body: Any) -> None:
    """A Completions request body (parsed JSON) as OpenAI checks it: 400 at the first problem."""
    _check(body, COMPLETIONS)


def _check_text_only(messages: list[dict]) -> None:
    """OpenAI's answer to an image or audio part sent to a text model (vLLM's is a bare ValueError
    while it renders the prompt: a 500)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part["type"] not in ("text", "refusal"):
                raise _error(
                    f"messages[{i}].content[{j}].type",
                    f"Invalid content type. {part['type']} is only supported by certain models.",
                    "invalid_value",
                )


# -- the JSON body ------------------------------------------------------------------------------------
# What Python's parser takes but no engine can: NaN and Infinity (no JSON, OpenAI rejects them), a
# lone UTF-16 surrogate ("\ud800": no Unicode text, the tokenizer fails on it) and an integer beyond
# 64 bits (vLLM's models take any int; the engine cannot carry it). Rare, so looked for only in a
# body whose bytes may hold one.
_SUSPECT = re.compile(rb"NaN|Infinity|\\u[dD][89a-fA-F]|[0-9]{19}")
_UNPARSED = object()


class _NotJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJSON(name)


def _check_representable(value: Any, param: str) -> None:
    """`value` (at `param`, "" for the whole body) holds no lone surrogate and no integer beyond 64 bits."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = f"'{param}'" if param else "the request body"
            raise _error(
                param or None,
                f"Invalid {where}: a lone UTF-16 surrogate (\\ud800-\\udfff) is no text.",
                "invalid_value",
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        _INT64.check(param, value)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_representable(item, f"{param}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_representable(key, param)
            _check_representable(item, f"{param}.{key}" if param else key)


def _check_strict_json(raw: bytes) -> None:
    """What the body's bytes may hold that Python's parser took and the engine cannot (above),
    checked first: NaN is no JSON whatever field holds it."""
    if not _SUSPECT.search(raw):
        return
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
        if isinstance(body, dict):  # else not an object: the checks' own answer
            _check_representable(body, "")
    except _NotJSON as exc:
        raise _error(
            None, f"The request body is not valid JSON ({exc} is not a JSON number).", "invalid_value"
        ) from None
    except RecursionError:
        raise _error(None, "The request body is nested too deeply.", "invalid_value") from None


async def _body(request: Request) -> Any:
    """The request's JSON body as FastAPI parsed it; an empty body is `{}` ("model" is then what
    is missing), and a body that is no JSON at all is left to FastAPI's own answer."""
    if not (await request.body()).strip():
        return {}
    try:
        return await request.json()
    except ValueError:
        return _UNPARSED


def _takes_media(request: Request) -> bool:
    """Whether the replica's model takes images and audio (vLLM's own test, before it renders)."""
    serving = request.app.state.factory.serving
    return serving is not None and serving.takes_media()


async def _checked_body(request: Request) -> Any:
    """The parsed body once the whole-body checks passed, or _UNPARSED (FastAPI answers that)."""
    body = await _body(request)
    if body is not _UNPARSED:
        _check_strict_json(await request.body())
    return body


async def chat_body(request: Request) -> None:
    """FastAPI dependency of `POST /v1/chat/completions`: runs before vLLM's model parses the body."""
    body = await _checked_body(request)
    if body is not _UNPARSED:
        check_chat(body, media=_takes_media(request))


async def completion_body(request: Request) -> None:
    """FastAPI dependency of `POST /v1/completions`: runs before vLLM's model parses the body."""
    body = await _checked_body(request)
    if body is not _UNPARSED:
        check_completion(body)


def markdown_table() -> str:
    """README.md's table of what is checked, from FIELDS."""
    lines = ["| field | API | accepted | 400 `code` |", "|---|---|---|---|"]
    for f in FIELDS:
        required = "**required**; " if f.required else ""
        codes = ", ".join(f"`{c}`" for c in f.codes)
        api = "both" if f.apis == BOTH else f.apis[0]
        lines.append(f"| `{f.name}` | {api} | {required}{f.accepts} | {codes} |")
    return "\n".join(lines)
