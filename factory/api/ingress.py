"""The factory's HTTP ingress: Ray Serve LLM's `OpenAiIngress`, extended.

vLLM's own serving classes (inside each `LLMServer` replica) build the OpenAI responses; this
class adds what a token seller needs in front of them: readiness gating (503 + Retry-After
while replicas start), request checks that vLLM leaves to later, OpenAI-shaped errors for every
failure, `/health`, `/ready` and `/metrics`; and the front half of metering: API keys, the
reservation of each request's worst case against its tenant's token packages (429 when they
cannot cover it), and the tenant/request stamps the engine meter and the replica settle by; and
the power governor's admission rules: under a tight power budget the lowest priority class is
slowed, then shed with 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response
from vllm.entrypoints.generate.base.protocol import StreamOptions

from factory.api.admin import ADMIN_ENDPOINTS, AdminRoutes, bearer_token, missing_key
from factory.api.errors import APIError, install_handlers, not_ready
from factory.api.metrics import RequestMetricsMiddleware, factory_metrics
from factory.api.tokens import PromptCounter
from factory.dashboard.routes import DASHBOARD_ENDPOINTS, DashboardRoutes
from factory.engine.meter import XARG_PRIORITY, XARG_REQUEST, XARG_TENANT
from factory.engine.server import XARG_CLIENT_USAGE

log = logging.getLogger("factory.ingress")

READINESS_POLL_S = 0.5
# Ray Serve's own x-request-id echoes whatever the client sent, so the ledger key (ours, never the
# client's: a reused id must not settle as someone else's request) has its own header.
REQUEST_ID_HEADER = "x-factory-request-id"
RETRY_AFTER_S = 5
# vLLM's priority scheduling runs lower numbers first.
PRIORITY_VALUE = {"high": 0, "standard": 1, "low": 2}
# A slowed priority class is admitted at this rate per ingress; a request waits at most Retry-After for its turn.
SLOWED_ADMISSIONS_PER_S = 1.0


class FactoryIngress(DashboardRoutes, AdminRoutes, OpenAiIngress):
    """OpenAI routes for every configured model, gated on replica readiness and on quota."""

    async def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle],
        model_cards: dict[str, ModelCard],
        *,
        lora_paths: dict[str, str] | None = None,
        hub: DeploymentHandle,
        ledger: DeploymentHandle,
        governor: DeploymentHandle,
        priorities: bool,
        auth_required: bool,
        tokenizers: dict[str, str],
        max_model_len: dict[str, int],
        currency: str = "CNY",
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._hub = hub
        self._ledger = ledger
        self._governor = governor
        self._priorities = priorities  # engines schedule by priority class (the energy-aware scheduler)
        self._admission: dict[str, Any] = {"version": 0, "level": 0, "slowed": [], "shed": [], "retry_after_s": 5}
        self._slow_next_s = 0.0  # when the next slowed-class request may pass
        self._auth_required = auth_required
        self._counter = PromptCounter(tokenizers, max_model_len)
        self._currency = currency
        self._id = serve.get_replica_context().replica_id.unique_id
        self._readiness: dict[str, Any] = {"ready": False, "draining": False, "models": {}}
        # Readiness is refreshed off the request path, so a request never waits on the hub.
        self._poller = asyncio.get_running_loop().create_task(self._poll_readiness())
        self._admission_poller = asyncio.get_running_loop().create_task(self._poll_admission())

    async def _poll_admission(self) -> None:
        """Follow the governor's admission rules (a long poll: a change arrives at once)."""
        while True:
            try:
                self._admission = await self._governor.admission.remote(self._admission["version"])
            except Exception as err:
                log.warning("admission poll failed: %s", err)
                await asyncio.sleep(READINESS_POLL_S)

    async def _poll_readiness(self) -> None:
        while True:
            try:
                metrics = factory_metrics()
                self._readiness = await self._hub.ingress_poll.remote(self._id, metrics.in_flight_now)
                metrics.observe_readiness(self._readiness)
            except Exception as err:  # hub restarting: keep the last view, say so once per poll
                log.warning("readiness poll failed: %s", err)
            await asyncio.sleep(READINESS_POLL_S)

    def _require_serving(self, model: str | None) -> None:
        """503 while draining, or unless a replica of the requested (known) model is serving."""
        if self._readiness.get("draining"):
            raise not_ready(RETRY_AFTER_S, "it is shutting down (draining in-flight requests)")
        models = self._readiness.get("models", {})
        if model is None and len(self._model_cards) == 1:
            model = next(iter(self._model_cards))
        state = models.get(model)
        if model in self._model_cards and (state is None or state["serving"] < 1):
            raise not_ready(RETRY_AFTER_S, f"no replica of model '{model}' is serving yet")

    async def health(self) -> JSONResponse:
        """Liveness: the ingress answers. Says nothing about the engines (that is /ready)."""
        return JSONResponse({"status": "ok"})

    async def ready(self) -> JSONResponse:
        """Readiness: every configured replica of every model is serving."""
        r = self._readiness
        if r.get("ready"):
            return JSONResponse({"status": "ready", "models": r["models"]})
        if r.get("draining"):
            raise not_ready(RETRY_AFTER_S, "it is shutting down")
        waiting = ", ".join(f"{m}: {s['serving']}/{s['expected']}" for m, s in r.get("models", {}).items())
        raise not_ready(RETRY_AFTER_S, f"replicas serving {waiting or 'unknown (state hub not reachable yet)'}")

    async def metrics(self) -> Response:
        """Prometheus text: factory_* from the ingress, vllm:* from every live replica."""
        try:
            families = await self._hub.engine_metrics.remote()
        except Exception as err:
            log.warning("engine metrics unavailable: %s", err)
            families = []
        try:
            ledger_families = await self._ledger.families.remote()
            ledger_families += await self._governor.families.remote()
        except Exception as err:
            log.warning("ledger metrics unavailable: %s", err)
            ledger_families = []
        text = factory_metrics().exposition(families, ledger_families)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        _check_messages(body.messages)
        _check_max_tokens(body.max_tokens, "max_tokens")
        _check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
        model = await self._get_model_id(body.model)  # unknown model -> 404 before any readiness talk
        request_id = await self._admit(body, request, model, chat=True)
        return _with_request_id(await super().chat(body, request), request_id)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if body.prompt is None or body.prompt == "" or body.prompt == []:
            raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
        _check_max_tokens(body.max_tokens, "max_tokens")
        model = await self._get_model_id(body.model)
        request_id = await self._admit(body, request, model, chat=False)
        return _with_request_id(await super().completions(body, request), request_id)

    async def _admit(self, body: Any, request: Request, model: str, *, chat: bool) -> str:
        """Key, readiness, quota, then the stamps the engine and the replica meter by.

        With auth required the request's worst case (prompt + max completion) is reserved
        against the tenant's packages before it reaches an engine; the replica settles it."""
        token = bearer_token(request) if self._auth_required else None
        if self._auth_required and token is None:
            raise missing_key()
        self._require_serving(body.model)
        request_id = f"req-{uuid.uuid4().hex}"
        tenant, priority = "anonymous", "standard"
        if self._auth_required:
            worst = await self._counter.worst_case_tokens(model, body, chat=chat)
            answer = await self._ledger.admit.remote(token, request_id, worst)
            if not answer["ok"]:
                raise APIError(answer["status"], answer["message"], code=answer["code"])
            tenant, priority = answer["tenant"], answer["priority"]
        try:
            await self._power_gate(priority)
        except APIError:
            if self._auth_required:
                await self._ledger.release.remote(request_id)
            raise
        client_usage = not body.stream or bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:  # the replica needs the final usage to settle; it drops it if the client did not ask
            continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
            body.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=continuous)
        # Set last, over anything the client sent under the same names: a tenant is never the client's say.
        body.vllm_xargs = {
            **(body.vllm_xargs or {}),
            XARG_REQUEST: request_id,
            XARG_TENANT: tenant,
            XARG_PRIORITY: priority,
            XARG_CLIENT_USAGE: int(client_usage),
        }
        if self._priorities:
            body.priority = PRIORITY_VALUE[priority]
        return request_id

    async def _power_gate(self, priority: str) -> None:
        """The governor's admission rules: a shed class gets 503 + Retry-After; a slowed one is let
        through at SLOWED_ADMISSIONS_PER_S, waiting up to Retry-After for its turn."""
        rules = self._admission
        retry_s = int(rules.get("retry_after_s", RETRY_AFTER_S))
        if priority in rules.get("shed", ()):
            raise _power_refusal(f"'{priority}' priority requests are paused ({rules.get('reason')})", retry_s)
        if priority in rules.get("slowed", ()):
            now = time.monotonic()
            turn = max(now, self._slow_next_s)
            if turn - now > retry_s:
                raise _power_refusal(f"'{priority}' priority requests are slowed; the queue is full", retry_s)
            self._slow_next_s = turn + 1.0 / SLOWED_ADMISSIONS_PER_S
            await asyncio.sleep(turn - now)


def _power_refusal(why: str, retry_s: int) -> APIError:
    return APIError(
        503,
        f"The power budget is tight and {why}. Retry after {retry_s} s.",
        code="power_budget_exceeded",
        headers={"Retry-After": str(retry_s)},
    )


def _with_request_id(response: Response, request_id: str) -> Response:
    """The id the ledger keeps this request under, so a client can find its usage row."""
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _check_messages(messages: list) -> None:
    """What OpenAI rejects and vLLM would quietly accept: no messages, or one without content."""
    if not messages:
        raise APIError(400, "'messages' must contain at least one message.", param="messages", code="invalid_value")
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        calls = msg.get("tool_calls") if isinstance(msg, dict) else getattr(msg, "tool_calls", None)
        if content is None and not (role == "assistant" and calls):
            raise APIError(
                400,
                f"Missing required parameter 'messages[{i}].content'.",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )


def _check_max_tokens(value: int | None, param: str) -> None:
    if value is not None and value < 1:
        raise APIError(400, f"'{param}' must be at least 1, got {value}.", param=param, code="invalid_value")


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=ModelList),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
    "ready": lambda app: app.get("/ready"),
    "metrics": lambda app: app.get("/metrics"),
    **ADMIN_ENDPOINTS,
    **DASHBOARD_ENDPOINTS,
}


def make_ingress_class() -> type:
    """FactoryIngress bound to a FastAPI app whose errors are all OpenAI-shaped."""
    app = FastAPI(title="Token Factory", docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    return make_fastapi_ingress(FactoryIngress, endpoint_map=ENDPOINTS, app=app)
