"""Admission at vLLM's own engine call (factory/api/admission.py), with a scripted engine client:
the worst case comes from what vLLM will run, admission happens once per API request before any
engine request starts, the stamps are the factory's, and the ticket knows when the engine is done."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from factory.api.admission import CURRENT_TICKET, PRIORITY_VALUE, MeteredEngineClient, Refused, Ticket
from factory.api.errors import APIError
from factory.engine.meter import XARG_PRIORITY, XARG_REQUEST, XARG_TENANT


class ScriptedEngine:
    """Yields `outputs` RequestOutput-like items per request; records what it was asked to run."""

    def __init__(self, outputs: int = 3, fail_after: int | None = None):
        self.outputs, self.fail_after = outputs, fail_after
        self.calls: list[dict] = []
        self.model_config = "the model config"

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        self.calls.append({"prompt": prompt, "params": sampling_params, "id": request_id, **kwargs})
        for i in range(self.outputs):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("engine died")
            await asyncio.sleep(0)
            # Deltas, as vLLM's serving classes ask for them: two new tokens per output.
            yield SimpleNamespace(request_id=request_id, index=i, outputs=[SimpleNamespace(token_ids=[i, i])])


def params(max_tokens: int, n: int = 1, extra=None) -> SimpleNamespace:
    return SimpleNamespace(max_tokens=max_tokens, n=n, extra_args=extra)


def client(engine) -> MeteredEngineClient:
    return MeteredEngineClient(engine, prompt_len=lambda prompt: len(prompt["prompt_token_ids"]), priorities=True)


def test_the_worst_case_is_reserved_once_for_every_engine_request_before_any_runs():
    engine, admitted = ScriptedEngine(), []

    async def admit(ticket: Ticket) -> None:
        admitted.append((ticket.worst_tokens, len(engine.calls)))
        ticket.tenant, ticket.priority = "acme", "high"

    async def scenario():
        ticket = Ticket(token="k", client_usage=True, _admit=admit)
        token = CURRENT_TICKET.set(ticket)
        try:
            c = client(engine)
            # Two prompts (a completion batch), the second with n=2: vLLM makes both calls first.
            gens = [
                c.generate({"prompt_token_ids": [1] * 10}, params(20), "cmpl-1-0"),
                c.generate({"prompt_token_ids": [1] * 4}, params(6, n=2, extra={XARG_TENANT: "mallory"}), "cmpl-1-1"),
            ]
        finally:
            CURRENT_TICKET.reset(token)
        outs = await asyncio.gather(*[_drain(g) for g in gens])
        return ticket, outs

    ticket, outs = asyncio.run(scenario())
    assert admitted == [(10 + 20 + 4 + 6 * 2, 0)]  # once, with nothing started yet
    assert (ticket.parts, ticket.calls, ticket.finished) == (3, 2, 2)
    assert (ticket.prompt_tokens, ticket.served_tokens) == (10 + 4, 2 * 3 * 2)
    assert ticket.engine_done and not ticket.engine_failed
    assert [len(o) for o in outs] == [3, 3]
    for call in engine.calls:
        stamps = call["params"].extra_args
        assert (stamps[XARG_REQUEST], stamps[XARG_TENANT], stamps[XARG_PRIORITY]) == (ticket.key, "acme", "high")
        assert call["priority"] == PRIORITY_VALUE["high"]


def test_a_refusal_runs_nothing_and_surfaces_as_refused():
    engine = ScriptedEngine()

    async def admit(ticket: Ticket) -> None:
        raise Refused(APIError(429, "no tokens left", code="insufficient_quota"))

    async def scenario():
        ticket = Ticket(token="k", client_usage=True, _admit=admit)
        token = CURRENT_TICKET.set(ticket)
        gen = client(engine).generate({"prompt_token_ids": [1, 2]}, params(5), "chatcmpl-1")
        CURRENT_TICKET.reset(token)
        with pytest.raises(Refused) as exc:
            await ticket.admitted()
        with pytest.raises(Refused):
            await _drain(gen)
        return exc.value.error

    err = asyncio.run(scenario())
    assert err.status == 429 and engine.calls == []


def test_an_engine_failure_marks_the_ticket_and_requests_without_a_ticket_pass_straight_through():
    engine = ScriptedEngine(fail_after=1)

    async def scenario():
        ticket = Ticket(token=None, client_usage=False)  # auth disabled: no admission call
        token = CURRENT_TICKET.set(ticket)
        gen = client(engine).generate({"prompt_token_ids": [1]}, params(5), "chatcmpl-2")
        CURRENT_TICKET.reset(token)
        with pytest.raises(RuntimeError):
            await _drain(gen)
        plain = await _drain(client(ScriptedEngine()).generate({"prompt_token_ids": [1]}, params(5), "warmup"))
        return ticket, plain

    ticket, plain = asyncio.run(scenario())
    assert ticket.engine_failed and not ticket.engine_done
    assert ticket.served_tokens == 2  # one output of two tokens got out before the engine died
    assert len(plain) == 3 and ticket.calls == 1


async def _drain(gen) -> list:
    return [out async for out in gen]


def test_the_worst_case_is_weighed_at_the_models_rates():
    """A model billed 0.5 a prompt token and 3 an output token reserves 0.5 x prompt + 3 x
    max_tokens x n factory tokens per engine request, each rounded up."""
    from decimal import Decimal

    from factory.metering.rates import Rates

    rates = Rates(input=Decimal("0.5"), cached_input=Decimal("0.1"), output=Decimal("3"))
    engine, admitted = ScriptedEngine(), []

    async def admit(ticket: Ticket) -> None:
        admitted.append(ticket.worst_tokens)

    async def scenario():
        ticket = Ticket(token="k", client_usage=True, _admit=admit)
        token = CURRENT_TICKET.set(ticket)
        try:
            c = MeteredEngineClient(
                engine, prompt_len=lambda p: len(p["prompt_token_ids"]), priorities=False, rates=rates
            )
            gens = [
                c.generate({"prompt_token_ids": [1] * 11}, params(20), "cmpl-2-0"),
                c.generate({"prompt_token_ids": [1] * 4}, params(6, n=2), "cmpl-2-1"),
            ]
        finally:
            CURRENT_TICKET.reset(token)
        await asyncio.gather(*[_drain(g) for g in gens])

    asyncio.run(scenario())
    assert admitted == [(6 + 60) + (2 + 36)]  # ceil(5.5 + 60) + (2 + 3 x 12)
