"""How many tokens a request may use at most: what the ingress reserves before admission.

Prompt tokens are counted with the model's own tokenizer and chat template (the same files the
engine loads), loaded once per model on first use. Completion tokens are the request's
`max_tokens` (times `n`), or the rest of the context when it gives none: vLLM never generates
past `max_model_len`, so prompt + that is a true worst case.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("factory.ingress")

# Upper bound per message for template tokens when the template cannot be rendered here.
_TEMPLATE_SLACK_TOK = 32


class PromptCounter:
    def __init__(self, tokenizer_sources: dict[str, str], max_model_len: dict[str, int]):
        self._sources = tokenizer_sources
        self._max_len = max_model_len
        self._tokenizers: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _tokenizer(self, model: str) -> Any:
        if model not in self._tokenizers:
            async with self._locks.setdefault(model, asyncio.Lock()):
                if model not in self._tokenizers:
                    from transformers import AutoTokenizer

                    self._tokenizers[model] = await asyncio.to_thread(
                        AutoTokenizer.from_pretrained, self._sources[model]
                    )
        return self._tokenizers[model]

    async def worst_case_tokens(self, model: str, body: Any, *, chat: bool) -> int:
        """prompt + the most completion tokens the request may produce."""
        prompt = await self.prompt_tokens(model, body, chat=chat)
        prompts = (
            len(body.prompt)
            if not chat and isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
            else 1
        )
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self._max_len[model] - prompt // prompts
        per_choice = min(limit, room) if limit is not None else room
        return prompt + max(per_choice, 0) * (body.n or 1) * prompts

    async def prompt_tokens(self, model: str, body: Any, *, chat: bool) -> int:
        tok = await self._tokenizer(model)
        if chat:
            messages = [_plain_message(m) for m in body.messages]
            try:
                ids = await asyncio.to_thread(
                    tok.apply_chat_template, messages, add_generation_prompt=True, tokenize=True
                )
                return len(ids["input_ids"] if isinstance(ids, dict) else ids)
            except Exception as err:  # unusual content or template: a safe upper bound instead
                log.debug("chat template not renderable for counting (%s); using an upper bound", err)
                text = "".join(str(m.get("content") or "") for m in messages)
                return len(text.encode()) + _TEMPLATE_SLACK_TOK * len(messages)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):  # already token ids
            return len(prompt)
        total = 0
        for p in prompt:
            total += len(p) if isinstance(p, list) else len(await asyncio.to_thread(tok.encode, p))
        return total


def _plain_message(msg: Any) -> dict[str, Any]:
    """A message as a dict whose content is text (text parts joined), for template rendering."""
    m = dict(msg) if isinstance(msg, dict) else msg.model_dump(exclude_none=True)
    content = m.get("content")
    if isinstance(content, list):
        m["content"] = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return m
