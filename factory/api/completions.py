"""`POST /v1/chat/completions` and `POST /v1/completions` in the replica: vLLM's serving classes
answer; the factory checks, admits, meters and settles around them.

Per request: OpenAI's checks of the body (factory/api/validation.py), the key and the reservation
(factory/api/admission.py, at vLLM's own engine call), then vLLM's response with
`usage.energy_joules` and `cost`. A stream's usage comes from vLLM's own count (`final_usage_info`,
set once the stream's last engine output is handled) and the engine meter's record; it is settled,
then sent as the stream's last chunk before `[DONE]`. No chunk is parsed: vLLM is told not to send
its own usage chunk, so the first item its stream yields after the last engine output is `[DONE]`,
and the factory's usage chunk goes before it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from factory.api import validation
from factory.api.admission import CURRENT_TICKET, Refused, Ticket
from factory.api.errors import APIError, engine_unavailable, upstream_error
from factory.engine.vllm_seams import (
    STREAM_ERROR_PREFIX,
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


# OpenAI's checks (factory/api/validation.py) run on the JSON body first, as dependencies: before
# vLLM's request model parses it.
@router.post("/v1/chat/completions", dependencies=[Depends(validation.chat_body)])
async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
    return await _serve(raw, body, chat=True)


@router.post("/v1/completions", dependencies=[Depends(validation.completion_body)])
async def completions(body: CompletionRequest, raw: Request) -> Response:
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
    """vLLM's stream as it is, with the settled usage chunk before its closing `[DONE]`; if the
    engine fails mid-stream, vLLM's error event (a 500 in its words) becomes the factory's
    `engine_unavailable` one, as a new request would get it."""
    try:
        async for item in sse:
            if ticket.engine_failed and item.startswith(STREAM_ERROR_PREFIX):
                item = f"data: {json.dumps(engine_unavailable(model).body())}\n\n"
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
