"""The dashboard's HTTP side, on every replica: the page, its state, its live stream, and the
power budgets it shows.

The page and its static files are public (they hold no data); the state, the stream and the
budget routes need the admin key when auth is required (the page keeps the key in session
storage and sends it as a Bearer header, so it never appears in a URL or a log).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import FileResponse, JSONResponse, StreamingResponse

from factory.api.errors import APIError
from factory.dashboard.state import merge_power, site_state

STATIC = Path(__file__).resolve().parent / "static"
_STATIC_FILES = {p.name for p in STATIC.iterdir()} if STATIC.is_dir() else set()
# Twice a second: a change (a new budget, a replica down) shows within a second, delivery included.
STREAM_INTERVAL_S = 0.5
TENANTS_REFRESH_S = 2.0


class BudgetIn(BaseModel):
    """The whole set of budgets (PUT replaces it); W, null or absent = no budget at that scope."""

    model_config = ConfigDict(extra="forbid")
    site_w: float | None = Field(None, gt=0, description="Site power budget, W.")
    node_w: float | None = Field(None, gt=0, description="Budget of each node, W.")
    gpu_w: float | None = Field(None, gt=0, description="Budget of each GPU, W (a replica's: times its GPUs).")
    nodes: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict, description="Single nodes, W.")
    replicas: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict, description="Single replicas, W.")


router = APIRouter()
# Per-tenant totals since this replica started, refreshed at most every TENANTS_REFRESH_S.
_tenants_cache: dict[str, Any] = {"at": 0.0, "rows": []}
_STARTED = datetime.now(UTC)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/dashboard/static/{name}")
async def dashboard_static(name: str) -> FileResponse:
    if name not in _STATIC_FILES:
        raise APIError(404, f"No dashboard file '{name}'.", code="not_found")
    return FileResponse(STATIC / name)


@router.get("/dashboard/api/auth")
async def dashboard_auth(request: Request) -> JSONResponse:
    """Public: whether the page must ask for the admin key before it asks for data."""
    return JSONResponse({"auth_required": request.app.state.factory.auth_required})


@router.get("/dashboard/api/state")
async def dashboard_state(request: Request) -> JSONResponse:
    ctx = request.app.state.factory
    await ctx.require_admin(request)
    return JSONResponse(await _dashboard_doc(ctx, with_history=True))


@router.get("/dashboard/api/stream")
async def dashboard_stream(request: Request) -> StreamingResponse:
    ctx = request.app.state.factory
    await ctx.require_admin(request)

    async def events():
        # Ends when the factory drains, so an open dashboard never holds a shutdown up.
        while not ctx.readiness.get("draining"):
            doc = await _dashboard_doc(ctx, with_history=False)
            yield f"data: {json.dumps(doc)}\n\n"
            await asyncio.sleep(STREAM_INTERVAL_S)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/admin/power/budget")
async def get_power_budget(request: Request) -> JSONResponse:
    ctx = request.app.state.factory
    await ctx.require_admin(request)
    return JSONResponse(await ctx.governor.budgets.remote())


@router.put("/admin/power/budget")
async def put_power_budget(body: BudgetIn, request: Request) -> JSONResponse:
    """Demand response: new budgets, enforced at once (engines hear within one exchange)."""
    ctx = request.app.state.factory
    await ctx.require_admin(request)
    return JSONResponse(await ctx.governor.set_budgets.remote(body.model_dump()))


@router.get("/admin/power")
async def get_power(request: Request) -> JSONResponse:
    """The governor's state: budgets, per-replica power, caps, levels and reasons, admission."""
    ctx = request.app.state.factory
    await ctx.require_admin(request)
    return JSONResponse(await ctx.governor.state.remote())


async def _dashboard_doc(ctx, with_history: bool) -> dict[str, Any]:
    hub = await ctx.hub.dashboard.remote(with_history)
    power = await ctx.governor.state.remote()
    merge_power(hub["replicas"], power)
    doc = site_state(
        time.time(),
        hub["replicas"],
        budgets=power["budgets"],
        expected=hub["expected"],
        tenants=await _tenant_totals(ctx),
        currency=ctx.currency,
        admission=power["admission"],
    )
    doc["auth_required"] = ctx.auth_required
    if with_history:
        doc["history"] = hub["history"]
    return doc


async def _tenant_totals(ctx) -> list[dict[str, Any]]:
    """Per-tenant totals since this replica started, refreshed at most every 2 s."""
    if time.monotonic() - _tenants_cache["at"] > TENANTS_REFRESH_S:
        _tenants_cache["rows"] = await ctx.ledger_op("usage_summary", since=_STARTED)
        _tenants_cache["at"] = time.monotonic()
    return _tenants_cache["rows"]
