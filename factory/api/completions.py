"""`POST /v1/chat/completions` and `POST /v1/completions` in the replica: vLLM's serving classes
answer; the factory checks, admits, meters and settles around them.

Per request: the checks vLLM leaves to later, the key and the reservation (factory/api/admission.py,
at vLLM's own engine call), then vLLM's response with `usage.energy_joules` and `cost`. A stream's
usage comes from vLLM's own count (`final_usage_info`, set once the stream's last engine output is
handled) and the engine meter's record; it is settled, then sent as the stream's last chunk before
`[DONE]`. No chunk is parsed: vLLM is told not to send its own usage chunk, so the first item its
stream yields after the last engine output is `[DONE]`, and the factory's usage chunk goes before it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from factory.api.admission import CURRENT_TICKET, Refused, Ticket
from factory.api.errors import APIError, engine_unavailable, upstream_error
from factory.engine.vllm_seams import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    StreamOptions,
    final_usage,
    response_id,
    usage_chunk,
)

# Ray Serve's own x-request-id echoes whatever the client sent, so the ledger key (ours, never the
# client's: a reused id must not settle as someone else's request) has its own header.
REQUEST_ID_HEADER = "x-factory-request-id"

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
    _check_messages(body.messages)
    _check_max_tokens(body.max_tokens, "max_tokens")
    _check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    return await _serve(raw, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw: Request) -> Response:
    if body.prompt is None or body.prompt == "" or body.prompt == []:
        raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
    _check_max_tokens(body.max_tokens, "max_tokens")
    return await _serve(raw, body, chat=False)


async def _serve(raw: Request, body: Any, *, chat: bool) -> Response:
    ctx = raw.app.state.factory
    if getattr(body, "use_beam_search", False):
        # Beam search asks the engine for a new request at every step: not metered, not offered.
        raise APIError(
            400, "'use_beam_search' is not supported.", param="use_beam_search", code="unsupported_parameter"
        )
    ctx.require_model(body.model)
    ticket = Ticket(
        token=ctx.caller_token(raw),
        client_usage=not body.stream or bool(body.stream_options and body.stream_options.include_usage),
        _admit=ctx.admit,
    )
    if body.stream:
        # The factory sends the usage chunk itself, with energy and cost (see the module's docstring).
        body.stream_options = StreamOptions(include_usage=False, continuous_usage_stats=False)
    serving = ctx.serving.chat if chat else ctx.serving.completion
    create = serving.create_chat_completion if chat else serving.create_completion
    token = CURRENT_TICKET.set(ticket)
    try:
        result = await create(body, raw)
    except Refused as refused:
        raise refused.error from None
    except BaseException:
        ctx.billing.unfinished(ticket)
        raise
    finally:
        CURRENT_TICKET.reset(token)
    headers = {REQUEST_ID_HEADER: ticket.key}
    if isinstance(result, ErrorResponse):
        ctx.billing.unfinished(ticket)
        if result.error.code >= 500 and ctx.engine_down():
            raise engine_unavailable(ctx.model)
        raise upstream_error(result.error.code, result.error.message, result.error.type)
    if not isinstance(result, AsyncGenerator):  # a whole response: the engine is done
        extras = await ctx.billing.completed(ticket, result.usage.prompt_tokens, result.usage.completion_tokens or 0)
        for name, value in extras.items():
            setattr(result.usage, name, value)
        return JSONResponse(result.model_dump(), headers=headers)
    try:
        await ticket.admitted()  # nothing has run yet: a refusal is still a plain HTTP error
    except Refused as refused:
        await result.aclose()
        raise refused.error from None
    stream = _metered(result, ticket, raw, chat=chat, model=ctx.model, billing=ctx.billing)
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _metered(
    sse: AsyncGenerator[str, None], ticket: Ticket, raw: Request, *, chat: bool, model: str, billing: Any
) -> AsyncGenerator[str, None]:
    """vLLM's stream as it is, with the settled usage chunk before its closing `[DONE]`."""
    try:
        async for item in sse:
            if ticket.engine_done and not ticket.settled:
                counted = final_usage(raw)
                prompt, completion = (counted.prompt_tokens, counted.completion_tokens or 0) if counted else (0, 0)
                extras = await billing.completed(ticket, prompt, completion)
                if ticket.client_usage:
                    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, **extras}  # fmt: skip
                    yield usage_chunk(chat=chat, response_id=response_id(raw) or "", created=ticket.created_unix,
                                      model=model, usage=usage)  # fmt: skip
            yield item
    finally:
        billing.unfinished(ticket)


def _check_messages(messages: list) -> None:
    """What OpenAI rejects and vLLM would quietly accept: no messages, or one without content."""
    if not messages:
        raise APIError(400, "'messages' must contain at least one message.", param="messages", code="invalid_value")
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        calls = msg.get("tool_calls") if isinstance(msg, dict) else getattr(msg, "tool_calls", None)
        if content is None and not (role == "assistant" and calls):
            raise APIError(
                400,
                f"Missing required parameter 'messages[{i}].content'.",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )


def _check_max_tokens(value: int | None, param: str) -> None:
    if value is not None and value < 1:
        raise APIError(400, f"'{param}' must be at least 1, got {value}.", param=param, code="invalid_value")

