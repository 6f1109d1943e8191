"""The ledger as a Ray Serve deployment: the factory's one door to the ledger while serving
(a SQLite file on the head node, or a PostgreSQL server).

Called once per request to admit it (verify the key, reserve its worst case) and once to settle
it (charge what it used, release the rest); never once per token. Settlements arriving within
`commit_interval_ms` share one transaction (group commit), and each caller returns only once its
row is committed, so a response a client has seen is always in the ledger. Expired reservations
(their request died with a replica or a killed server) are released at start and every minute;
monthly subscriptions are renewed at start, every minute, and at once when a subscriber's
reservation finds nothing left (the month may have just turned).

While the database cannot be reached (a PostgreSQL restart, a network cut), admissions and the
operator's routes answer 503 with Retry-After, and settlements wait and retry until it is back:
nothing a client was served is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from factory.config import CostConfig
from factory.metering.cost import CostModel, TouPeriod
from factory.metering.ledger import Ledger, LedgerError, LedgerUnavailable, QuotaExceeded, UnknownTenant

log = logging.getLogger("factory.ledger")

RELEASE_EXPIRED_EVERY_S = 60.0  # and renew subscriptions
UNAVAILABLE_RETRY_AFTER_S = 2  # what a client is told while the database is away
SETTLE_RETRY_S = (0.1, 2.0)  # settlements retry after 0.1 s, doubling to 2 s, until the database is back


def cost_model(cfg: CostConfig) -> CostModel:
    """The pricing policy for a config's `cost` section."""
    from zoneinfo import ZoneInfo

    tou = [TouPeriod(*p.as_times(), p.price_per_kwh) for p in cfg.tou]
    return CostModel(
        currency=cfg.currency,
        price_per_kwh=None if tou else cfg.price_per_kwh,
        tou=tou,
        pue=cfg.pue,
        gpu_price_per_hour=cfg.gpu_price_per_hour,
        tz=ZoneInfo(cfg.timezone),
    )


def jsonable(value: Any) -> Any:
    """Ledger dataclasses to JSON-ready values: Decimal as string, datetimes ISO-8601."""
    if dataclasses.is_dataclass(value):
        out = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if hasattr(value, "tokens_available"):
            out["tokens_available"] = value.tokens_available
        return out
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# Ledger methods the admin API may call, by name.
_ADMIN_OPS = {
    "create_tenant",
    "list_tenants",
    "get_tenant",
    "set_priority",
    "create_key",
    "revoke_key",
    "list_keys",
    "grant_package",
    "list_packages",
    "balance",
    "usage",
    "usage_summary",
    "create_plan",
    "list_plans",
    "retire_plan",
    "buy",
    "cancel_subscription",
    "renew",
    "statement",
}
_IN_OPERATOR_ZONE = {"buy", "statement"}  # months are counted in the operator's zone


class LedgerService:
    def __init__(self, target: str, *, reservation_ttl_s: float, commit_interval_ms: float, timezone: str = "UTC"):
        self._ledger = Ledger(target)
        self._tz = timezone  # the operator's zone (the config checked it): months of subscriptions, statements
        self._ttl_s = reservation_ttl_s
        self._commit_s = commit_interval_ms / 1000.0
        self._batch: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._cost_total: dict[tuple[str, str], Decimal] = {}
        self._unavailable_warned_at = float("-inf")
        released = self._ledger.release_expired()
        renewed = self._ledger.renew()
        log.info("ledger %s open; %d expired reservation(s) released, %d subscription(s) renewed",
                 self._ledger.where, released, len(renewed))  # fmt: skip
        self._janitor = asyncio.get_event_loop().create_task(self._janitor_forever())

    async def _janitor_forever(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_EXPIRED_EVERY_S)
            try:
                n = await asyncio.to_thread(self._ledger.release_expired)
                if n:
                    log.warning("released %d expired reservation(s)", n)
                renewed = await asyncio.to_thread(self._ledger.renew)
                if renewed:
                    log.info("renewed %d subscription(s) for the month", len(renewed))
            except Exception:
                log.exception("the ledger's minute round (expired reservations, renewals) failed")

    async def authenticate(self, token: str) -> dict[str, Any]:
        """{"ok": True, "key_id", "admin", "tenant"} for a live key: the owner (tenant name and
        priority, or None for an admin key); else an error answer (401, or 503 while the database
        is away) with "status", "code", "message" and perhaps "retry_after"."""
        try:
            info = await asyncio.to_thread(self._ledger.verify_key, token)
            if info is None:
                return {"ok": False, "status": 401, "code": "invalid_api_key", "message": "Incorrect API key provided."}
            tenant = None
            if info.tenant is not None:
                t = await asyncio.to_thread(self._ledger.get_tenant, info.tenant)
                tenant = {"name": t.name, "priority": t.priority} if t else None
        except LedgerUnavailable as err:
            return self._unavailable(err)
        return {"ok": True, "key_id": info.key_id, "admin": info.admin, "tenant": tenant}

    async def admit(self, token: str, request_id: str, tokens: int, category: str | None = None) -> dict[str, Any]:
        """Verify a tenant key and reserve `tokens` of the packages covering the model's
        `category` for the request, in one call.

        Returns {"ok": True, "tenant", "priority"} or {"ok": False, "status", "message", "code"}
        (and "retry_after" with a 503)."""
        who = await self.authenticate(token)
        if not who["ok"]:
            return who
        if who["tenant"] is None:
            return {
                "ok": False,
                "status": 403,
                "code": "admin_key_not_allowed",
                "message": "The admin key cannot spend tokens; use a tenant's key.",
            }
        tenant = who["tenant"]["name"]
        try:
            try:
                await asyncio.to_thread(self._reserve, request_id, tenant, tokens, category)
            except QuotaExceeded:
                # The month may have turned since the last renewal round: renew this tenant's
                # subscriptions now and try once more (only on this path, so it costs nothing else).
                if not await asyncio.to_thread(self._ledger.renew, tenant=tenant):
                    raise
                await asyncio.to_thread(self._reserve, request_id, tenant, tokens, category)
        except LedgerUnavailable as err:
            return self._unavailable(err)
        except QuotaExceeded as err:
            return {"ok": False, "status": 429, "code": "insufficient_quota",
                    "message": await self._quota_message(err, tenant, tokens, category)}  # fmt: skip
        return {"ok": True, "tenant": tenant, "priority": who["tenant"]["priority"]}

    def _reserve(self, request_id: str, tenant: str, tokens: int, category: str | None) -> None:
        self._ledger.reserve(request_id, tenant, tokens, ttl_s=self._ttl_s, category=category)

    async def _quota_message(self, err: QuotaExceeded, tenant: str, tokens: int, category: str | None) -> str:
        """What a 429 says: how much was asked and is left, and, where no package of the tenant
        covers the model's category at all, which category that is and what its packages cover."""
        try:
            covered = await asyncio.to_thread(self._ledger.categories, tenant)
        except (LedgerError, LedgerUnavailable):  # only the message's detail is lost
            covered = {None}
        if category is not None and covered and None not in covered and category not in covered:
            return (
                f"You exceeded your current quota: this model is in category '{category}', and none of tenant "
                f"'{tenant}''s packages covers it (they cover {', '.join(sorted(covered))}). Buy a package or "
                f"plan for category '{category}'."
            )
        scope = "" if category is None else f" for category '{category}'"
        return (
            f"You exceeded your current quota: this request may cost up to {tokens} factory tokens "
            f"and tenant '{tenant}' has {err.available} left{scope}. Buy or be granted a token package."
        )

    async def settle(self, settlement: dict[str, Any]) -> dict[str, Any]:
        """Charge a finished request; returns once the usage row is committed."""
        fut = asyncio.get_running_loop().create_future()
        self._batch.append((settlement, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_after_window())
        return await fut

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self._commit_s)
        retry_s, down_since = SETTLE_RETRY_S[0], None
        while self._batch:
            batch, self._batch = self._batch, []
            try:
                records = await asyncio.to_thread(self._ledger.settle_many, [s for s, _ in batch])
                outcomes = list(zip(batch, records, strict=True))
            except LedgerUnavailable as err:
                # Held, not dropped: the batch (and whatever arrives meanwhile) goes again once the
                # database is back. A commit whose answer was lost is safe to retry: settle is idempotent.
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("ledger unavailable (%s): holding %d settlement(s) until it is back", err, len(batch))
                self._batch = batch + self._batch
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, SETTLE_RETRY_S[1])
                continue
            except Exception:
                # One bad settlement must not fail its neighbours: settle them one by one.
                log.exception("group commit of %d settlement(s) failed; settling one by one", len(batch))
                outcomes = [(item, await self._settle_one(item[0])) for item in batch]
            for (_, fut), rec in outcomes:
                if isinstance(rec, Exception):
                    if not fut.done():
                        fut.set_exception(rec)
                    continue
                key = (rec.tenant, rec.currency)
                self._cost_total[key] = self._cost_total.get(key, Decimal(0)) + rec.cost
                if not fut.done():
                    fut.set_result(jsonable(rec))
            if down_since is not None:
                log.warning("ledger back after %.1f s; held settlements committed", time.monotonic() - down_since)
                retry_s, down_since = SETTLE_RETRY_S[0], None

    async def _settle_one(self, settlement: dict[str, Any]) -> Any:
        try:
            return await asyncio.to_thread(self._ledger.settle, **settlement)
        except Exception as err:
            log.error("settlement of %s failed: %s", settlement.get("request_id"), err)
            return LedgerError(f"settlement failed: {err}")

    async def release(self, request_id: str) -> bool:
        try:
            return await asyncio.to_thread(self._ledger.release, request_id)
        except LedgerUnavailable as err:
            log.warning("could not release %s now (%s); it is released when its reservation expires", request_id, err)
            return False

    async def admin(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Run one ledger operation for the admin API: {"ok": True, "result"} or an error."""
        if op not in _ADMIN_OPS:
            return {"ok": False, "status": 404, "message": f"unknown ledger operation {op!r}"}
        if op in _IN_OPERATOR_ZONE:
            kwargs = {**kwargs, "tz": self._tz}
        try:
            result = await asyncio.to_thread(getattr(self._ledger, op), **kwargs)
        except LedgerUnavailable as err:
            return self._unavailable(err)
        except UnknownTenant as err:
            return {"ok": False, "status": 404, "message": str(err), "code": "tenant_not_found"}
        except (LedgerError, ValueError) as err:
            return {"ok": False, "status": 400, "message": str(err), "code": "invalid_request"}
        if op == "create_key":
            info, token = result
            return {"ok": True, "result": {**jsonable(info), "key": token}}
        return {"ok": True, "result": jsonable(result)}

    def _unavailable(self, err: LedgerUnavailable) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._unavailable_warned_at > 10.0:  # one line per outage, not one per refused request
            self._unavailable_warned_at = now
            log.warning("ledger unavailable, answering 503 meanwhile: %s", err)
        return {
            "ok": False,
            "status": 503,
            "code": "ledger_unavailable",
            "message": f"The factory's ledger is briefly unavailable. Retry after {UNAVAILABLE_RETRY_AFTER_S} s.",
            "retry_after": UNAVAILABLE_RETRY_AFTER_S,
        }

    def families(self) -> list[Metric]:
        cost = CounterMetricFamily(
            "factory_cost", "Money charged for energy and device time, by tenant.", labels=["tenant", "currency"]
        )
        for (tenant, currency), amount in sorted(self._cost_total.items()):
            cost.add_metric([tenant, currency], float(amount))
        return [cost]
