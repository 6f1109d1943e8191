"""Settlement of one API request in the replica that served it: its energy from the engine
meter's final record, its price, its ledger row (committed before the client sees its usage).

A request that ends normally is settled with vLLM's own token counts. One that ends otherwise
(client gone, timeout, engine error) is charged what the engine meter recorded it used up to the
end; when the engine died and its record with it, the tokens the client was sent; its reservation
is released when the engine never ran it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ray.serve.handle import DeploymentHandle

from factory.api.admission import Ticket
from factory.engine.replica_meter import ReplicaMeter
from factory.engine.wire import Final
from factory.metering.cost import CostModel, money_json
from factory.metering.rates import RAW, Rates

log = logging.getLogger("factory.engine")

FINAL_RECORD_TIMEOUT_S = 5.0


class Billing:
    def __init__(
        self,
        meter: ReplicaMeter | None,
        cost: CostModel,
        ledger: DeploymentHandle,
        model: str,
        replica: str,
        rates: Rates = RAW,
        category: str | None = None,
    ):
        self._rates = rates  # the model's factory tokens per raw token (metering/rates.py)
        self._category = category  # the model's category: what a charge past the reservation may spend
        self._meter = meter
        self._cost = cost
        self._ledger = ledger
        self._model = model
        self._replica = replica
        self._background: set[asyncio.Task] = set()

    async def completed(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """Settle a request that ended normally; returns the usage fields the factory adds. A client
        that leaves meanwhile does not stop the settlement (it is shielded from cancellation)."""
        ticket.settled = True
        return await asyncio.shield(self._completed(ticket, prompt_tokens, completion_tokens))

    async def _completed(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        rec = await self._final(ticket)
        source = rec.source if rec else ("missing" if self._meter else "off")
        energy_j, busy_s = (rec.energy_j, rec.busy_s) if rec else (0.0, 0.0)
        cached = rec.cached_tokens if rec else 0  # without the engine's record: billed as fresh prompt
        cost, billed = await self._charge(
            ticket, (prompt_tokens, completion_tokens), energy_j, busy_s, source, "completed", cached
        )
        return {
            "factory_tokens": billed,
            "energy_joules": round(energy_j, 6),
            "energy_source": source,
            "cost": money_json(cost, self._cost.currency),
        }

    def unfinished(self, ticket: Ticket) -> None:
        """Settle, in the background, a request that ended without its usage being sent."""
        if ticket.settled:
            return
        ticket.settled = True
        task = asyncio.get_running_loop().create_task(self._unfinished(ticket))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unfinished(self, ticket: Ticket) -> None:
        try:
            rec = await self._final(ticket) if ticket.calls else None
            if rec is None and ticket.engine_failed and ticket.served_tokens:
                # The engine died with the answer half sent, and the meter's record went with it:
                # the tenant pays for the tokens it was sent (energy unknown), the rest is released.
                tokens = (ticket.prompt_tokens, ticket.served_tokens)
                await self._charge(ticket, tokens, 0.0, 0.0, "missing", "failed")
                return
            if rec is None:
                if ticket.reserved:
                    await self._ledger.release.remote(ticket.key)
                return
            status = "failed" if ticket.engine_failed and rec.status != "aborted" else "aborted"
            tokens = (rec.prompt_tokens, rec.completion_tokens)
            await self._charge(ticket, tokens, rec.energy_j, rec.busy_s, rec.source, status, rec.cached_tokens)
        except Exception:
            log.exception("settling unfinished request %s failed", ticket.key)

    async def _charge(
        self,
        ticket: Ticket,
        tokens: tuple[int, int],
        energy_j: float,
        busy_s: float,
        source: str,
        status: str,
        cached_tokens: int = 0,
    ) -> tuple[Decimal, int]:
        """Price a request and settle it in the ledger; returns (cost, factory tokens billed) once
        the row is committed."""
        finished = datetime.now(UTC)
        cost = self._cost.cost(energy_j=energy_j, busy_s=busy_s, at=finished)
        cached_tokens = min(cached_tokens, tokens[0])
        billed = self._rates.billed(tokens[0], cached_tokens, tokens[1])
        await self._ledger.settle.remote(
            {
                "request_id": ticket.key,
                "tenant": ticket.tenant,
                "prompt_tokens": tokens[0],
                "completion_tokens": tokens[1],
                "energy_j": energy_j,
                "energy_source": source,
                "cost": cost,
                "currency": self._cost.currency,
                "model": self._model,
                "replica": self._replica,
                "status": status,
                "started_at": ticket.started,
                "finished_at": finished,
                "reserved": ticket.reserved,
                "cached_tokens": cached_tokens,
                "billed_tokens": billed,
                "category": self._category,
            }
        )
        return cost, billed

    async def _final(self, ticket: Ticket) -> Final | None:
        if self._meter is None:
            return None
        return await self._meter.final(ticket.key, FINAL_RECORD_TIMEOUT_S, ticket.parts)
