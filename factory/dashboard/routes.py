"""The dashboard's HTTP side, mixed into the ingress: the page, its state, its live stream, and
the power budgets it shows.

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

from fastapi import Request
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


class DashboardRoutes:
    """Expects `self._hub`, `self._governor`, `self._ledger_op`, `self._require_admin`, `self._readiness`,
    `self._auth_required` and `self._currency` (the ingress has them)."""

    _tenants_cache: tuple[float, list] = (0.0, [])
    _started = datetime.now(UTC)

    async def dashboard_page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def dashboard_static(self, name: str) -> FileResponse:
        if name not in _STATIC_FILES:
            raise APIError(404, f"No dashboard file '{name}'.", code="not_found")
        return FileResponse(STATIC / name)

    async def dashboard_auth(self) -> JSONResponse:
        """Public: whether the page must ask for the admin key before it asks for data."""
        return JSONResponse({"auth_required": self._auth_required})

    async def dashboard_state(self, request: Request) -> JSONResponse:
        await self._require_admin(request)
        return JSONResponse(await self._dashboard_doc(with_history=True))

    async def dashboard_stream(self, request: Request) -> StreamingResponse:
        await self._require_admin(request)

        async def events():
            # Ends when the factory drains, so an open dashboard never holds a shutdown up.
            while not self._readiness.get("draining"):
                doc = await self._dashboard_doc(with_history=False)
                yield f"data: {json.dumps(doc)}\n\n"
                await asyncio.sleep(STREAM_INTERVAL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def get_power_budget(self, request: Request) -> JSONResponse:
        await self._require_admin(request)
        return JSONResponse(await self._governor.budgets.remote())

    async def put_power_budget(self, body: BudgetIn, request: Request) -> JSONResponse:
        """Demand response: new budgets, enforced at once (engines hear within one exchange)."""
        await self._require_admin(request)
        return JSONResponse(await self._governor.set_budgets.remote(body.model_dump()))

    async def get_power(self, request: Request) -> JSONResponse:
        """The governor's state: budgets, per-replica power, caps, levels and reasons, admission."""
        await self._require_admin(request)
        return JSONResponse(await self._governor.state.remote())

    async def _dashboard_doc(self, with_history: bool) -> dict[str, Any]:
        hub = await self._hub.dashboard.remote(with_history)
        power = await self._governor.state.remote()
        merge_power(hub["replicas"], power)
        doc = site_state(
            time.time(),
            hub["replicas"],
            budgets=power["budgets"],
            expected=hub["expected"],
            tenants=await self._tenant_totals(),
            currency=self._currency,
            admission=power["admission"],
        )
        doc["auth_required"] = self._auth_required
        if with_history:
            doc["history"] = hub["history"]
        return doc

    async def _tenant_totals(self) -> list[dict[str, Any]]:
        """Per-tenant totals since this ingress started, refreshed at most every 2 s."""
        at, rows = self._tenants_cache
        if time.monotonic() - at > TENANTS_REFRESH_S:
            rows = await self._ledger_op("usage_summary", since=self._started)
            self._tenants_cache = (time.monotonic(), rows)
        return rows


DASHBOARD_ENDPOINTS = {
    "dashboard_page": lambda app: app.get("/dashboard"),
    "dashboard_static": lambda app: app.get("/dashboard/static/{name}"),
    "dashboard_auth": lambda app: app.get("/dashboard/api/auth"),
    "dashboard_state": lambda app: app.get("/dashboard/api/state"),
    "dashboard_stream": lambda app: app.get("/dashboard/api/stream"),
    "get_power_budget": lambda app: app.get("/admin/power/budget"),
    "put_power_budget": lambda app: app.put("/admin/power/budget"),
    "get_power": lambda app: app.get("/admin/power"),
}
