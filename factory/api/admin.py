"""The operator's `/admin` HTTP API and the tenant's own `/v1/usage`, on the ingress.

Mirrors the `factory tenants|keys|packages|usage` commands; every call goes to the ledger
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

from fastapi import Query, Request
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


class AdminRoutes:
    """Mixed into the ingress; expects `self._ledger` (handle) and `self._auth_required`."""

    async def _caller(self, request: Request) -> dict[str, Any] | None:
        """Who is calling (from the ledger), None when auth is disabled; 401 on a bad key."""
        if not self._auth_required:
            return None
        token = bearer_token(request)
        if token is None:
            raise missing_key()
        who = await self._ledger.authenticate.remote(token)
        if who is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return who

    async def _require_admin(self, request: Request) -> None:
        who = await self._caller(request)
        if who is not None and not who["admin"]:
            raise APIError(403, "This route needs the admin key.", code="admin_key_required")

    async def _ledger_op(self, op: str, **kwargs: Any) -> Any:
        answer = await self._ledger.admin.remote(op, kwargs)
        if not answer["ok"]:
            raise APIError(answer["status"], answer["message"], code=answer.get("code"))
        return answer["result"]

    async def admin_list_tenants(self, request: Request) -> JSONResponse:
        await self._require_admin(request)
        return JSONResponse({"data": await self._ledger_op("list_tenants")})

    async def admin_create_tenant(self, body: TenantIn, request: Request) -> JSONResponse:
        await self._require_admin(request)
        return JSONResponse(await self._ledger_op("create_tenant", name=body.name, priority=body.priority), 201)

    async def admin_list_keys(self, request: Request, tenant: str | None = None) -> JSONResponse:
        await self._require_admin(request)
        return JSONResponse({"data": await self._ledger_op("list_keys", tenant=tenant)})

    async def admin_create_key(self, body: KeyIn, request: Request) -> JSONResponse:
        await self._require_admin(request)
        result = await self._ledger_op("create_key", tenant=body.tenant, admin=body.admin, label=body.label)
        return JSONResponse(result, 201)

    async def admin_revoke_key(self, key_id: str, request: Request) -> JSONResponse:
        await self._require_admin(request)
        if not await self._ledger_op("revoke_key", key_id=key_id):
            raise APIError(404, f"No active key with id '{key_id}'.", code="key_not_found")
        return JSONResponse({"key_id": key_id, "revoked": True})

    async def admin_grant_package(self, body: PackageIn, request: Request) -> JSONResponse:
        await self._require_admin(request)
        result = await self._ledger_op(
            "grant_package",
            tenant=body.tenant,
            tokens=body.tokens,
            expires_at=body.expires_at,
            price=body.price,
            currency=body.currency,
        )
        return JSONResponse(result, 201)

    async def admin_list_packages(self, request: Request, tenant: str = Query(...)) -> JSONResponse:
        await self._require_admin(request)
        packages = await self._ledger_op("list_packages", tenant=tenant)
        return JSONResponse({"data": packages, "balance": await self._ledger_op("balance", tenant=tenant)})

    async def admin_usage(
        self,
        request: Request,
        tenant: str | None = None,
        since: datetime | None = None,
        format: Literal["json", "csv"] = "json",
        summary: bool = False,
    ) -> Response:
        await self._require_admin(request)
        return await self._usage_response(tenant, since, format, summary)

    async def tenant_usage(
        self, request: Request, since: datetime | None = None, format: Literal["json", "csv"] = "json"
    ) -> Response:
        """A tenant's own usage and balance; a key never sees another tenant's rows."""
        who = await self._caller(request)
        if who is None:  # auth disabled: everything is booked to 'anonymous' (absent until its first request)
            try:
                return await self._usage_response("anonymous", since, format, False)
            except APIError as err:
                if err.status != 404:
                    raise
                return JSONResponse({"data": []})
        if who["tenant"] is None:
            raise APIError(
                403, "The admin key has no usage of its own; use /admin/usage.", code="admin_key_not_allowed"
            )
        return await self._usage_response(who["tenant"]["name"], since, format, False, with_balance=True)

    async def _usage_response(
        self, tenant: str | None, since: datetime | None, fmt: str, summary: bool, with_balance: bool = False
    ) -> Response:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)  # a bare date or time means UTC
        op = "usage_summary" if summary else "usage"
        rows = await self._ledger_op(op, tenant=tenant, since=since)
        if fmt == "csv":
            buf = io.StringIO()
            if rows:
                w = csv.DictWriter(buf, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            return Response(buf.getvalue(), media_type="text/csv")
        body: dict[str, Any] = {"data": rows}
        if with_balance:
            body["balance"] = await self._ledger_op("balance", tenant=tenant)
        return JSONResponse(body)


ADMIN_ENDPOINTS = {
    "admin_list_tenants": lambda app: app.get("/admin/tenants"),
    "admin_create_tenant": lambda app: app.post("/admin/tenants"),
    "admin_list_keys": lambda app: app.get("/admin/keys"),
    "admin_create_key": lambda app: app.post("/admin/keys"),
    "admin_revoke_key": lambda app: app.delete("/admin/keys/{key_id}"),
    "admin_grant_package": lambda app: app.post("/admin/packages"),
    "admin_list_packages": lambda app: app.get("/admin/packages"),
    "admin_usage": lambda app: app.get("/admin/usage"),
    "tenant_usage": lambda app: app.get("/v1/usage"),
}
