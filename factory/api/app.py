"""The HTTP app every engine replica serves (Ray Serve direct ingress, behind HAProxy).

One replica answers a request whole: the OpenAI routes (factory/api/completions.py, vLLM's
serving classes inside), `/v1/models`, `/health`, `/ready`, `/metrics`, `/v1/usage`, `/admin/*`
and `/dashboard` (factory/api/admin.py, factory/dashboard/routes.py). Only these routes exist:
vLLM's other routes (responses, embeddings, tokenize, ...) would generate tokens or reveal
state without the factory's keys and metering, so none of vLLM's own app is mounted.

`ReplicaContext` is what the routes share: the replica's model, its serving objects and
billing, handles to the ledger, governor and hub, and the views of readiness and of the
governor's admission rules that the replica keeps fresh off the request path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response

from factory.api.admin import bearer_token, missing_key
from factory.api.admission import Refused, Ticket
from factory.api.errors import APIError, engine_unavailable, install_handlers, not_ready
from factory.api.metrics import RequestMetricsMiddleware, factory_metrics
from factory.engine.billing import Billing
from factory.engine.vllm_seams import ServingObjects

RETRY_AFTER_S = 5
# A slowed priority class is admitted at this rate per replica; a request waits at most Retry-After for its turn.
SLOWED_ADMISSIONS_PER_S = 1.0


@dataclass
class ReplicaContext:
    """What one replica's routes share."""

    model: str  # the model this replica serves
    category: str  # its category: the packages that may pay for it
    models: dict[str, int]  # every configured model -> its max_model_len (what /v1/models lists)
    billing: Billing
    hub: DeploymentHandle
    ledger: DeploymentHandle
    governor: DeploymentHandle
    auth_required: bool
    local_only: bool  # auth disabled on a loopback address: only this host (and the cluster's nodes) may call
    currency: str
    replica_id: str
    created_unix: int = field(default_factory=lambda: int(time.time()))
    readiness: dict[str, Any] = field(default_factory=lambda: {"ready": False, "draining": False, "models": {}})
    admission: dict[str, Any] = field(
        default_factory=lambda: {"version": 0, "level": 0, "slowed": [], "shed": [], "retry_after_s": RETRY_AFTER_S}
    )
    node_ips: frozenset[str] = frozenset()  # the Ray cluster's nodes (HAProxy may run on any of them)
    serving: ServingObjects | None = None  # vLLM's serving objects (set once the engine is up, before any request)
    _slow_next_s: float = 0.0

    # -- who may call, and whether we serve ----------------------------------------------------------
    def check_client(self, request: Request) -> None:
        """With auth disabled the replica's own port (open on every interface, as Serve binds it)
        answers only this host and the cluster's nodes, as the public port answers loopback only."""
        if not self.local_only or request.client is None:
            return
        host = request.client.host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and host not in self.node_ips:
            raise APIError(403, "This factory runs without keys and answers only its own host.", code="forbidden")

    def caller_token(self, request: Request) -> str | None:
        """The API key (401 when auth is required and it is missing or malformed)."""
        self.check_client(request)
        if not self.auth_required:
            return None
        token = bearer_token(request)
        if token is None:
            raise missing_key()
        return token

    def require_model(self, model: str | None) -> None:
        """404 for a model nobody serves; 503 + Retry-After while this replica cannot serve it."""
        if model is not None and model not in self.models:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        if self.readiness.get("draining"):
            raise not_ready(RETRY_AFTER_S, "it is shutting down (draining in-flight requests)")
        if model is not None and model != self.model:
            # The router sends a request only to a replica of its model; this one was picked while
            # the model had no replica serving yet.
            raise not_ready(RETRY_AFTER_S, f"no replica of model '{model}' is serving yet")
        if self.engine_down():
            raise engine_unavailable(self.model)

    def engine_down(self) -> bool:
        """The engine died: its own client knows at once (no flag of ours to keep in step)."""
        return self.serving is not None and self.serving.engine_dead()

    # -- admission ------------------------------------------------------------------------------------
    async def admit(self, ticket: Ticket) -> None:
        """Key and reservation of the request's worst case in one ledger call, then the power gate."""
        if self.auth_required:
            answer = await self.ledger.admit.remote(ticket.token, ticket.key, ticket.worst_tokens, self.category)
            if not answer["ok"]:
                raise Refused(ledger_refusal(answer))
            ticket.tenant, ticket.priority, ticket.reserved = answer["tenant"], answer["priority"], True
        try:
            await self._power_gate(ticket.priority)
        except APIError as err:
            if ticket.reserved:
                await self.ledger.release.remote(ticket.key)
                ticket.reserved = False
            raise Refused(err) from None

    async def _power_gate(self, priority: str) -> None:
        """The governor's admission rules: a shed class gets 503 + Retry-After; a slowed one is let
        through at SLOWED_ADMISSIONS_PER_S, waiting up to Retry-After for its turn."""
        rules = self.admission
        retry_s = int(rules.get("retry_after_s", RETRY_AFTER_S))
        if priority in rules.get("shed", ()):
            raise power_refusal(f"'{priority}' priority requests are paused ({rules.get('reason')})", retry_s)
        if priority in rules.get("slowed", ()):
            now = time.monotonic()
            turn = max(now, self._slow_next_s)
            if turn - now > retry_s:
                raise power_refusal(f"'{priority}' priority requests are slowed; the queue is full", retry_s)
            self._slow_next_s = turn + 1.0 / SLOWED_ADMISSIONS_PER_S
            await asyncio.sleep(turn - now)

    # -- the operator's routes ------------------------------------------------------------------------
    async def caller(self, request: Request) -> dict[str, Any] | None:
        """Who is calling (from the ledger), None when auth is disabled; 401 on a bad key."""
        token = self.caller_token(request)
        if token is None:
            return None
        who = await self.ledger.authenticate.remote(token)
        if not who["ok"]:
            raise ledger_refusal(who)
        return who

    async def require_admin(self, request: Request) -> None:
        who = await self.caller(request)
        if who is not None and not who["admin"]:
            raise APIError(403, "This route needs the admin key.", code="admin_key_required")

    async def ledger_op(self, op: str, **kwargs: Any) -> Any:
        answer = await self.ledger.admin.remote(op, kwargs)
        if not answer["ok"]:
            raise ledger_refusal(answer)
        return answer["result"]


def ledger_refusal(answer: dict[str, Any]) -> APIError:
    """The ledger service's error answer as the client sees it (a 503 tells when to retry)."""
    retry = answer.get("retry_after")
    headers = None if retry is None else {"Retry-After": str(retry)}
    return APIError(answer["status"], answer["message"], code=answer.get("code"), headers=headers)


def power_refusal(why: str, retry_s: int) -> APIError:
    return APIError(
        503,
        f"The power budget is tight and {why}. Retry after {retry_s} s.",
        code="power_budget_exceeded",
        headers={"Retry-After": str(retry_s)},
    )


def build_app(ctx: ReplicaContext) -> FastAPI:
    """The replica's ASGI app: only the factory's routes, every error OpenAI-shaped."""
    from factory.api.admin import router as admin_router
    from factory.api.completions import router as completions_router
    from factory.dashboard.routes import router as dashboard_router

    app = FastAPI(title="Token Factory", docs_url=None, redoc_url=None)
    app.state.factory = ctx
    install_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    app.include_router(completions_router)
    app.include_router(_ops_router())
    app.include_router(admin_router)
    app.include_router(dashboard_router)
    return app


def _ops_router():
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        ctx = request.app.state.factory
        ctx.check_client(request)
        return JSONResponse({"object": "list", "data": [_card(ctx, m) for m in ctx.models]})

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        ctx = request.app.state.factory
        ctx.check_client(request)
        if model not in ctx.models:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(_card(ctx, model))

    @router.get("/health")
    async def health() -> JSONResponse:
        """Liveness: this replica answers. Says nothing about the engines (that is /ready)."""
        return JSONResponse({"status": "ok"})

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: every configured replica of every model is serving."""
        r = request.app.state.factory.readiness
        if r.get("ready"):
            return JSONResponse({"status": "ready", "models": r["models"]})
        if r.get("draining"):
            raise not_ready(RETRY_AFTER_S, "it is shutting down")
        waiting = ", ".join(f"{m}: {s['serving']}/{s['expected']}" for m, s in r.get("models", {}).items())
        raise not_ready(RETRY_AFTER_S, f"replicas serving {waiting or 'unknown (state hub not reachable yet)'}")

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text: this replica's HTTP series, every live replica's engine and power series
        (through the hub), the ledger's and the governor's. One scrape covers the whole factory."""
        ctx = request.app.state.factory
        try:
            families = await ctx.hub.engine_metrics.remote()
        except Exception:
            families = []
        try:
            app_families = await ctx.ledger.families.remote() + await ctx.governor.families.remote()
        except Exception:
            app_families = []
        text = factory_metrics().exposition(families, app_families)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


def _card(ctx: ReplicaContext, model: str) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": ctx.created_unix,
        "owned_by": "token-factory",
        "max_model_len": ctx.models[model],
    }
