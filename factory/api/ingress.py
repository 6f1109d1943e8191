"""The factory's HTTP ingress: Ray Serve LLM's `OpenAiIngress`, extended.

vLLM's own serving classes (inside each `LLMServer` replica) build the OpenAI responses; this
class adds what a token seller needs in front of them: readiness gating (503 + Retry-After
while replicas start), request checks that vLLM leaves to later, OpenAI-shaped errors for every
failure, `/health`, `/ready` and `/metrics`. Later layers (auth, quotas, metering) hook in here.
"""

from __future__ import annotations

import asyncio
import logging
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

from factory.api.errors import APIError, install_handlers, not_ready
from factory.api.metrics import RequestMetricsMiddleware, factory_metrics

log = logging.getLogger("factory.ingress")

READINESS_POLL_S = 0.5
RETRY_AFTER_S = 5


class FactoryIngress(OpenAiIngress):
    """OpenAI routes for every configured model, gated on replica readiness."""

    async def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle],
        model_cards: dict[str, ModelCard],
        *,
        lora_paths: dict[str, str] | None = None,
        hub: DeploymentHandle,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._hub = hub
        self._id = serve.get_replica_context().replica_id.unique_id
        self._readiness: dict[str, Any] = {"ready": False, "draining": False, "models": {}}
        # Readiness is refreshed off the request path, so a request never waits on the hub.
        self._poller = asyncio.get_running_loop().create_task(self._poll_readiness())

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
        return Response(factory_metrics().exposition(families), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        _check_messages(body.messages)
        _check_max_tokens(body.max_tokens, "max_tokens")
        _check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
        await self._get_model_id(body.model)  # unknown model -> 404 before any readiness talk
        self._require_serving(body.model)
        return await super().chat(body, request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if body.prompt is None or body.prompt == "" or body.prompt == []:
            raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
        _check_max_tokens(body.max_tokens, "max_tokens")
        await self._get_model_id(body.model)
        self._require_serving(body.model)
        return await super().completions(body, request)


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
}


def make_ingress_class() -> type:
    """FactoryIngress bound to a FastAPI app whose errors are all OpenAI-shaped."""
    app = FastAPI(title="Token Factory", docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    return make_fastapi_ingress(FactoryIngress, endpoint_map=ENDPOINTS, app=app)
