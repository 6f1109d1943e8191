"""The factory's ingress request router: the deployment HAProxy asks, once per POST, which engine
replica takes the request (ray-project's `/internal/route` contract, factory/ray_seams.py).

It reads the fields routing needs from the forwarded body (`model`, `messages` or `prompt`) and
runs the engine deployment's own request router (EnergyAwareRouter) through its handle, which
ranks the replicas; HAProxy then pins the request to the first. Nothing of the request passes
through here but its head: the stream flows HAProxy <-> replica.

A body HAProxy cut at its buffer (`routing.body_limit_kib`) is not valid JSON; its `model` is
still read from the head (it routes to the right model's replicas), its prompt is not (no prefix
affinity for that request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse

from factory.ray_seams import (
    BODY_TRUNCATED_HEADER,
    NO_REPLICA,
    ROUTE_PATH,
    ROUTE_REPLICA_FIELD,
    init_handle,
    pick_replica,
)

log = logging.getLogger("factory.routing")

router_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
_MODEL_IN_HEAD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_HEAD_BYTES = 4096
# Under HAProxy's 5 s wait for this answer: with no replica up, say so before HAProxy gives up.
PICK_TIMEOUT_S = 3.0


def routing_fields(body: bytes, truncated: bool) -> SimpleNamespace | None:
    """The request's model and prompt, as the router reads them (attributes, like the request
    objects it ranks); None for an empty or non-object body (then load alone decides)."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        if not truncated:
            return None
        match = _MODEL_IN_HEAD.search(body[:_HEAD_BYTES])
        return SimpleNamespace(model=json.loads(b'"' + match.group(1) + b'"')) if match else None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    return SimpleNamespace(
        model=model if isinstance(model, str) else None,
        messages=data.get("messages") if isinstance(data.get("messages"), list) else None,
        prompt=data.get("prompt"),
    )


@serve.ingress(router_app)
class FactoryRouter:
    def __init__(self, engines: DeploymentHandle):
        self._engines = engines
        init_handle(engines)

    @router_app.post(ROUTE_PATH)
    async def route(self, request: Request) -> JSONResponse:
        fields = routing_fields(await request.body(), BODY_TRUNCATED_HEADER in request.headers)
        args: tuple[Any, ...] = (fields,) if fields is not None else ()
        try:
            replica_id = await asyncio.wait_for(pick_replica(self._engines, *args), PICK_TIMEOUT_S)
        except Exception as err:  # no replica at all (a dead one being replaced, scale from zero)
            log.warning("no engine replica to route to (%s): the fallback proxy holds the request", err)
            replica_id = NO_REPLICA
        return JSONResponse({ROUTE_REPLICA_FIELD: replica_id})
