"""Every vLLM (and Ray Serve LLM engine) internal the replica relies on, for vllm==0.32.0 and
ray==2.60.0, in one place; tests/unit/test_vllm_seams.py fails when an upgrade moves any of them.

- vLLM's OpenAI request and response models (its protocol modules);
- the serving objects Ray Serve LLM's `VLLMEngine` builds with `init_app_state`
  (`_oai_serving_chat`, `_oai_serving_completion`) and the `AsyncLLM` it starts (`_engine_client`);
- `OpenAIServing.engine_client`: the serving classes call its `generate(prompt, sampling_params,
  request_id, ...)` once per engine request, before reading any output (the factory's admission
  point, factory/api/admission.py);
- `raw_request.state.request_metadata`: where the serving classes leave the response id and, once
  a stream's last output is handled, `final_usage_info`, vLLM's own token counts;
- `extract_prompt_len`: vLLM's count of an engine input's prompt tokens;
- `AsyncLLM.errored`: true once its EngineCore (or a Worker) died.
"""

from __future__ import annotations

from typing import Any

from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, UsageInfo
from vllm.renderers.inputs.preprocess import extract_prompt_len

PINNED_VLLM = "0.32.0"
# How vLLM's serving classes end a stream that failed: an SSE event of an ErrorResponse's JSON.
STREAM_ERROR_PREFIX = 'data: {"error"'

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "ErrorResponse",
    "ServingObjects",
    "StreamOptions",
    "UsageInfo",
    "final_usage",
    "response_id",
    "serving_objects",
    "usage_chunk",
]


class ServingObjects:
    """vLLM's chat and completion serving objects of one engine, and its engine client."""

    def __init__(self, chat: Any, completion: Any, engine_client: Any):
        self.chat = chat
        self.completion = completion
        self.engine_client = engine_client

    def prompt_len(self, prompt: Any) -> int:
        return extract_prompt_len(self.engine_client.model_config, prompt)

    def takes_media(self) -> bool:
        """Whether the model takes images and audio (vLLM's own test, before it renders a prompt)."""
        return bool(self.engine_client.model_config.is_multimodal_model)

    def engine_dead(self) -> bool:
        """Whether the engine's EngineCore (or one of its Workers) has died."""
        return bool(getattr(self.engine_client, "errored", False))

    def install_engine_client(self, client: Any) -> None:
        """Make both serving objects send their engine requests through `client`."""
        for serving in (self.chat, self.completion):
            if serving is not None:
                serving.engine_client = client


def serving_objects(engine: Any) -> ServingObjects:
    """The serving objects of a started Ray Serve LLM `VLLMEngine`."""
    return ServingObjects(engine._oai_serving_chat, engine._oai_serving_completion, engine._engine_client)


def _metadata(raw_request: Any) -> Any:
    return getattr(raw_request.state, "request_metadata", None)


def final_usage(raw_request: Any) -> UsageInfo | None:
    """vLLM's token counts for a stream, once its generator has handled the last output."""
    md = _metadata(raw_request)
    return md.final_usage_info if md is not None else None


def response_id(raw_request: Any) -> str | None:
    """The id vLLM gives the response (`chatcmpl-...`, `cmpl-...`) and every chunk of its stream."""
    md = _metadata(raw_request)
    return md.request_id if md is not None else None


def usage_chunk(*, chat: bool, response_id: str, created: int, model: str, usage: dict[str, Any]) -> str:
    """One server-sent event with no choices and the request's usage, in vLLM's own chunk model
    (what vLLM sends for `stream_options.include_usage`, with the factory's usage fields)."""
    cls = ChatCompletionStreamResponse if chat else CompletionStreamResponse
    chunk = cls(
        id=response_id,
        object="chat.completion.chunk" if chat else "text_completion",
        created=created,
        model=model,
        choices=[],
        usage=UsageInfo(**usage),
    )
    return f"data: {chunk.model_dump_json(exclude_unset=True, exclude_none=True)}\n\n"
