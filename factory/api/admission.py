"""Admission of one API request, inside the replica that serves it, at the moment vLLM knows
exactly what it will run.

vLLM's serving classes turn an OpenAI request into engine requests by calling
`engine_client.generate(prompt, sampling_params, request_id, ...)`, once per prompt, before they
read any output. The replica hands them a `MeteredEngineClient` in place of vLLM's engine
client, so at that call the factory learns what the engine will run (the tokenized prompt, the
resolved `max_tokens`, `n`) without tokenizing anything twice. Its worst case (prompt +
max_tokens x n, in factory tokens at the model's rates) is reserved once, before the first
engine request starts: a refusal (401, 403, 429, a power-shed 503) is an HTTP error before any
byte of a stream is sent. The engine
requests then carry the stamps the engine meter books energy by (ledger id, tenant, priority);
a client cannot set them.

The request's `Ticket` travels from the route handler to these calls in a context variable
(vLLM awaits them in the handler's own task). Per streamed chunk this adds one generator layer
and nothing else.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from factory.engine.meter import XARG_PRIORITY, XARG_REQUEST, XARG_TENANT
from factory.metering.rates import RAW, Rates

# vLLM's priority scheduling runs lower numbers first.
PRIORITY_VALUE = {"high": 0, "standard": 1, "low": 2}

CURRENT_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("factory_ticket", default=None)


class Refused(Exception):
    """The request may not run: carries the client error (an api.errors.APIError) to answer with."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class Ticket:
    """One API request on its way through admission, the engine and settlement."""

    token: str | None  # the caller's API key (None with auth disabled); never logged
    client_usage: bool  # the client asked for usage (non-streamed answers always carry it)
    key: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")  # the ledger's id; never the client's
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    created_unix: int = field(default_factory=lambda: int(time.time()))
    worst_tokens: int = 0  # factory tokens (metering/rates.py) of prompt + max_tokens x n, every engine request
    prompt_tokens: int = 0  # over every engine request
    served_tokens: int = 0  # output tokens the engine handed to vLLM's serving code (to send to the client)
    parts: int = 0  # engine requests (n per prompt), each reporting its own energy under `key`
    tenant: str = "anonymous"
    priority: str = "standard"
    reserved: bool = False  # the ledger holds a reservation under `key`
    calls: int = 0  # engine requests vLLM asked for
    finished: int = 0  # ... and that ended normally
    engine_failed: bool = False  # one of them raised (engine error, abort)
    settled: bool = False
    _admission: asyncio.Task | None = None
    _admit: Callable[[Ticket], Awaitable[None]] | None = None

    def plan(self, prompt_tokens: int, max_tokens: int, n: int, rates: Rates = RAW) -> None:
        """vLLM is about to run one engine request of this API request, of a model billed at `rates`."""
        self.worst_tokens += rates.worst(prompt_tokens, max_tokens * n)
        self.prompt_tokens += prompt_tokens
        self.parts += n
        self.calls += 1

    @property
    def engine_done(self) -> bool:
        """Every engine request of this API request has returned its last output."""
        return self.calls > 0 and self.finished == self.calls and not self.engine_failed

    async def admitted(self) -> None:
        """Admit once (the first caller runs the admission, later ones wait for it); raises
        Refused with the client error when the request may not run."""
        if self._admission is None:
            if self._admit is None:
                return
            self._admission = asyncio.ensure_future(self._admit(self))
        await asyncio.shield(self._admission)

    def stamps(self) -> dict[str, Any]:
        """What the engine meter books this request's energy and tokens by."""
        return {XARG_REQUEST: self.key, XARG_TENANT: self.tenant, XARG_PRIORITY: self.priority}


class MeteredEngineClient:
    """vLLM's engine client with the factory's admission in front of every engine request.

    Everything but `generate` is the wrapped client's own. `prompt_len(prompt)` is vLLM's own
    count of an engine input's prompt tokens."""

    def __init__(self, engine: Any, prompt_len: Callable[[Any], int], priorities: bool, rates: Rates = RAW):
        self._engine = engine
        self._prompt_len = prompt_len
        self._priorities = priorities  # engines schedule by priority class (the energy-aware scheduler)
        self._rates = rates  # the model's, in factory tokens: what its worst case reserves

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        ticket = CURRENT_TICKET.get()
        if ticket is None:  # not an API request (vLLM's own warm-up or health probes)
            return self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        n = getattr(sampling_params, "n", 1) or 1
        max_tokens = getattr(sampling_params, "max_tokens", None) or 0
        ticket.plan(self._prompt_len(prompt), max_tokens, n, self._rates)
        return self._run(ticket, prompt, sampling_params, request_id, args, kwargs)

    async def _run(
        self, ticket: Ticket, prompt: Any, sampling_params: Any, request_id: str, args: tuple, kwargs: dict
    ) -> AsyncGenerator[Any, None]:
        await ticket.admitted()
        # Set last, over anything the client sent under the same names.
        sampling_params.extra_args = {**(sampling_params.extra_args or {}), **ticket.stamps()}
        if self._priorities:
            kwargs["priority"] = PRIORITY_VALUE[ticket.priority]
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                # New tokens only (vLLM's serving classes ask for deltas, or one final output): what
                # is settled if the engine dies with the stream half sent and its meter record with it.
                for completion in out.outputs:
                    ticket.served_tokens += len(completion.token_ids)
                yield out
        except BaseException:
            ticket.engine_failed = True
            raise
        ticket.finished += 1
