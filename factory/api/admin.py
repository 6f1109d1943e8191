"""The operator's `/admin` HTTP API and the tenant's own `/v1/usage`, on every replica.

Mirrors the `factory tenants|keys|packages|plans|usage` commands; every call goes to the ledger
deployment. With `auth: required`, `/admin` needs the admin key (401 without a valid key, 403
with a tenant's key) and `/v1/usage` shows only the caller's own tenant. With `auth: disabled`
(loopback only) both are open.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from factory.api.errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantIn(_Body):
    name: str = Field(description="Tenant name: 1-64 of A-Z a-z 0-9 . _ -")
    priority: Literal["high", "standard", "low"] = "standard"


class KeyIn(_Body):
    tenant: str | None = Field(None, description="Tenant the key spends for; null with admin=true.")
    admin: bool = False
    label: str = ""


class PackageIn(_Body):
    tenant: str
    tokens: int = Field(gt=0)
    expires_at: datetime | None = None
    price: Decimal | None = Field(None, ge=0)
    currency: str = "CNY"
    category: str | None = Field(None, description="The model category it pays for; null: every model.")


class PlanIn(_Body):
    name: str
    kind: Literal["pack", "monthly", "trial"]
    tokens: int = Field(gt=0, description="Factory tokens per pack, trial or month.")
    price: Decimal | None = Field(None, ge=0)
    currency: str = "CNY"
    valid_days: int | None = Field(
        None, gt=0, description="pack / trial: days from purchase (null: a pack never expires)."
    )
    category: str | None = Field(None, description="The model category it pays for; null: every model.")
    rollover: bool = Field(False, description="monthly: unused tokens carry into the next month.")


class PurchaseIn(_Body):
    tenant: str
    plan: str


def bearer_token(request: Request) -> str | None:
    """The key from `Authorization: Bearer <key>`; None when absent. Never logged."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key")
    return token.strip()


def missing_key() -> APIError:
    return APIError(
        401,
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        code="missing_api_key",
    )


router = APIRouter()


def _ctx(request: Request):
    return request.app.state.factory


@router.get("/admin/tenants")
async def admin_list_tenants(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse({"data": await ctx.ledger_op("list_tenants")})


@router.post("/admin/tenants")
async def admin_create_tenant(body: TenantIn, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse(await ctx.ledger_op("create_tenant", name=body.name, priority=body.priority), 201)


@router.get("/admin/keys")
async def admin_list_keys(request: Request, tenant: str | None = None) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse({"data": await ctx.ledger_op("list_keys", tenant=tenant)})


@router.post("/admin/keys")
async def admin_create_key(body: KeyIn, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    result = await ctx.ledger_op("create_key", tenant=body.tenant, admin=body.admin, label=body.label)
    return JSONResponse(result, 201)


@router.delete("/admin/keys/{key_id}")
async def admin_revoke_key(key_id: str, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    if not await ctx.ledger_op("revoke_key", key_id=key_id):
        raise APIError(404, f"No active key with id '{key_id}'.", code="key_not_found")
    return JSONResponse({"key_id": key_id, "revoked": True})


@router.post("/admin/packages")
async def admin_grant_package(body: PackageIn, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    result = await ctx.ledger_op(
        "grant_package",
        tenant=body.tenant,
        tokens=body.tokens,
        expires_at=body.expires_at,
        price=body.price,
        currency=body.currency,
        category=body.category,
    )
    return JSONResponse(result, 201)


@router.get("/admin/plans")
async def admin_list_plans(request: Request, include_retired: bool = False) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse({"data": await ctx.ledger_op("list_plans", include_retired=include_retired)})


@router.post("/admin/plans")
async def admin_create_plan(body: PlanIn, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    fields = body.model_dump()
    return JSONResponse(await ctx.ledger_op("create_plan", **fields), 201)


@router.delete("/admin/plans/{name}")
async def admin_retire_plan(name: str, request: Request) -> JSONResponse:
    """Stop selling a plan; what was bought stands."""
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse(await ctx.ledger_op("retire_plan", name=name))


@router.post("/admin/purchases")
async def admin_buy(body: PurchaseIn, request: Request) -> JSONResponse:
    """A tenant buys a plan: its package (a monthly plan: a subscription and this month's package)."""
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return JSONResponse(await ctx.ledger_op("buy", tenant=body.tenant, plan=body.plan), 201)


@router.delete("/admin/subscriptions/{tenant}/{plan}")
async def admin_cancel_subscription(tenant: str, plan: str, request: Request) -> JSONResponse:
    """No renewal after the month under way."""
    ctx = _ctx(request)
    await ctx.require_admin(request)
    if not await ctx.ledger_op("cancel_subscription", tenant=tenant, plan=plan):
        raise APIError(404, f"Tenant '{tenant}' has no live subscription to '{plan}'.", code="subscription_not_found")
    return JSONResponse({"tenant": tenant, "plan": plan, "cancelled": True})


@router.get("/admin/packages")
async def admin_list_packages(request: Request, tenant: str = Query(...)) -> JSONResponse:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    packages = await ctx.ledger_op("list_packages", tenant=tenant)
    return JSONResponse({"data": packages, "balance": await ctx.ledger_op("balance", tenant=tenant)})


@router.get("/admin/usage")
async def admin_usage(
    request: Request,
    tenant: str | None = None,
    since: datetime | None = None,
    format: Literal["json", "csv"] = "json",
    summary: bool = False,
) -> Response:
    ctx = _ctx(request)
    await ctx.require_admin(request)
    return await _usage_response(ctx, tenant, since, format, summary)


@router.get("/admin/statements")
async def admin_statement(
    request: Request, tenant: str = Query(...), month: str = Query(..., description="YYYY-MM, in the operator's zone"),
    format: Literal["json", "csv"] = "json",
) -> Response:  # fmt: skip
    """A tenant's monthly statement (metering/statement.py): usage by model and category, totals,
    packages bought and expired; its totals tie out to the usage rows."""
    from factory.metering.statement import to_csv

    ctx = _ctx(request)
    await ctx.require_admin(request)
    doc = await ctx.ledger_op("statement", tenant=tenant, month=month)
    if format == "csv":
        return Response(to_csv(doc), media_type="text/csv")
    return JSONResponse(doc)


@router.get("/v1/usage")
async def tenant_usage(
    request: Request, since: datetime | None = None, format: Literal["json", "csv"] = "json"
) -> Response:
    """A tenant's own usage and balance; a key never sees another tenant's rows."""
    ctx = _ctx(request)
    who = await ctx.caller(request)
    if who is None:  # auth disabled: everything is booked to 'anonymous' (absent until its first request)
        try:
            return await _usage_response(ctx, "anonymous", since, format, False)
        except APIError as err:
            if err.status != 404:
                raise
            return JSONResponse({"data": []})
    if who["tenant"] is None:
        raise APIError(403, "The admin key has no usage of its own; use /admin/usage.", code="admin_key_not_allowed")
    return await _usage_response(ctx, who["tenant"]["name"], since, format, False, with_balance=True)


async def _usage_response(
    ctx, tenant: str | None, since: datetime | None, fmt: str, summary: bool, with_balance: bool = False
) -> Response:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)  # a bare date or time means UTC
    op = "usage_summary" if summary else "usage"
    rows = await ctx.ledger_op(op, tenant=tenant, since=since)
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return Response(buf.getvalue(), media_type="text/csv")
    body: dict[str, Any] = {"data": rows}
    if with_balance:
        body["balance"] = await ctx.ledger_op("balance", tenant=tenant)
        # Each live package: what is left of it, the category it pays for, when it expires or renews.
        packages = await ctx.ledger_op("list_packages", tenant=tenant, live_only=True)
        body["packages"] = [{k: p[k] for k in _PACKAGE_VIEW} for p in packages]
    return JSONResponse(body)


_PACKAGE_VIEW = ("id", "kind", "plan", "category", "tokens_total", "tokens_used", "tokens_reserved",
                 "tokens_available", "expires_at", "renews_at", "period_start", "rolled_in")  # fmt: skip
