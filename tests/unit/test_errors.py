"""Error translation: every failure becomes {"error": {message, type, param, code}}."""

from __future__ import annotations

from factory.api.errors import error_body, upstream_error


def test_error_body_has_exactly_the_openai_keys():
    body = error_body(400, "bad", param="messages", code="invalid_value")
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "invalid_value"}
    }
    assert error_body(503, "wait")["error"]["type"] == "service_unavailable_error"
    assert error_body(502, "x")["error"]["type"] == "server_error"


def test_engine_client_errors_keep_their_words():
    err = upstream_error(400, "This model's maximum context length is 512 tokens. However, you requested 900 tokens.")
    assert err.status == 400
    assert err.code == "context_length_exceeded"
    assert "512" in err.message


def test_engine_server_errors_hide_internals():
    err = upstream_error(500, "CUDA error: device-side assert at /secret/path.py:12")
    assert err.status == 500
    assert "secret" not in err.message and "CUDA" not in err.message


def test_nonsense_status_becomes_500():
    assert upstream_error(200, "odd").status == 500


def test_a_dead_engine_is_a_503_with_retry_after_never_a_500():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    from factory.api.errors import install_handlers

    app = FastAPI()
    install_handlers(app)

    @app.get("/dead")
    async def dead():
        raise EngineDeadError()

    @app.get("/failed")
    async def failed():
        raise EngineGenerateError()

    client = TestClient(app)
    for path in ("/dead", "/failed"):
        r = client.get(path)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) > 0
        err = r.json()["error"]
        assert err["code"] == "engine_unavailable" and err["type"] and err["message"]
