"""OpenAI-shaped errors: one body format for every failure a client can see.

`{"error": {"message", "type", "param", "code"}}`, the status code in HTTP only. Client mistakes
are 4xx with a message that says what to fix; server faults are 500 without internals (they are
logged with the request id instead). Handlers are installed on every replica's FastAPI app
(factory/api/app.py), so vLLM's and Ray's exceptions reach the client in this shape too.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from vllm.exceptions import VLLMClientError, VLLMNotFoundError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

log = logging.getLogger("factory.api")

# OpenAI's `type` per status family.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to return to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": _utf8(message),
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": None if param is None else _utf8(param),
            "code": code,
        }
    }


def _utf8(text: str) -> str:
    """`text` as UTF-8 can carry it: a message or param that quotes the request may hold a lone
    surrogate (JSON's "\\ud800" escape), which would make the response unencodable, a 500."""
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def not_ready(retry_after_s: int, why: str) -> APIError:
    return APIError(
        503,
        f"The factory is not ready: {why}. Retry shortly.",
        code="not_ready",
        headers={"Retry-After": str(retry_after_s)},
    )


# Seconds a client is told to wait while a dead engine is replaced.
ENGINE_RETRY_AFTER_S = 10


def engine_unavailable(model: str | None = None) -> APIError:
    """The engine serving the request died (crash, OOM kill): 503 + Retry-After, never a 500;
    the replica is being replaced and a live one (or the replacement) will take the retry."""
    what = f"The engine serving '{model}'" if model else "The engine"
    return APIError(
        503,
        f"{what} stopped and is being restarted. Retry shortly.",
        code="engine_unavailable",
        headers={"Retry-After": str(ENGINE_RETRY_AFTER_S)},
    )


def _param(loc: Any) -> str | None:
    """A pydantic location in OpenAI's words: ("body", "messages", 0, "content") -> "messages[0].content"."""
    param = ""
    for part in loc:
        if part != "body":
            param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """First validation problem as (message, param, code), in words a client can act on."""
    errors = exc.errors()
    if not errors:
        return "The request body is invalid.", None, "invalid_value"
    first = errors[0]
    param = _param(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"The request body is not valid JSON ({first.get('msg', 'parse error')}).", None, "invalid_value"
    if kind == "missing" and param:
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}'" if param else "the request body"
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":  # a value of the wrong type
        return f"Invalid type for {where}: {msg}{more}.", param, "invalid_type"
    return f"Invalid value for {where}: {msg}{more}.", param, "invalid_value"


def upstream_error(status: int, message: str, err_type: str | None = None) -> APIError:
    """Translate an engine (vLLM) error into ours: keep its words, give it our shape."""
    status = status if 400 <= status < 600 else 500
    if status >= 500:
        log.error("engine error (%s %s): %s", status, err_type, message)
        return APIError(500, "The engine failed to process the request.", code="engine_error")
    lowered = message.lower()
    too_long = "context length" in lowered or ("maximum" in lowered and "token" in lowered)
    return APIError(status, message, code="context_length_exceeded" if too_long else None)


def install_handlers(app: FastAPI) -> None:
    """Route every exception an endpoint can raise into the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
        code = "model_not_found" if exc.status_code == 404 and "model" in detail.lower() else None
        if exc.status_code == 405:
            detail = "Method not allowed on this path."
        return error_response(exc.status_code, detail, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(OpenAIHTTPException)
    async def _engine(_: Request, exc: OpenAIHTTPException) -> JSONResponse:
        err = upstream_error(exc.status_code, exc.message, exc.type)
        return error_response(err.status, err.message, param=err.param, code=err.code)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineGenerateError)
    async def _engine_gone(_: Request, exc: Exception) -> JSONResponse:
        log.warning("engine failure answered 503: %s", exc)
        err = engine_unavailable()
        return error_response(err.status, err.message, code=err.code, headers=err.headers)

    @app.exception_handler(VLLMClientError)
    async def _vllm_client(_: Request, exc: VLLMClientError) -> JSONResponse:
        # vLLM's request models validate some fields themselves, during body parsing.
        status = 404 if isinstance(exc, VLLMNotFoundError) else 400
        message = str(exc.args[0]) if exc.args else "Invalid request."
        return error_response(status, message, param=getattr(exc, "parameter", None), code="invalid_value")

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error_response(
            400, f"Invalid request: {first.get('msg', exc)}.", param=_param(first.get("loc", ())), code="invalid_value"
        )

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        # A server fault: the client gets a generic 500; the details go to the log only.
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "Internal error while processing the request.", code="internal_error")
