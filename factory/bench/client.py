"""One streamed chat completion, timed the way METRICS.md defines it, into a RECORD or a FAILURE.

Timing rules this module keeps (each avoids a known trap):
- t_send is read immediately before the request goes out, after the body is built.
- A chunk's arrival time is read when its bytes come off the socket, before any JSON parsing:
  every SSE line completed by one network read gets that read's time.
- TTFT/E2E use content chunks only (non-empty `choices[0].delta.content`); the usage chunk and
  `[DONE]` do not count.
- N_out is the server's `usage.completion_tokens` (asked with stream_options.include_usage).
  Without usage the record counts content chunks (n_out_source "chunks") and keeps the answer's
  text, which the runner retokenises with `--tokenizer` when given (factory/bench/retokenise.py).
  It never uses max_tokens as N_out (n_out_expected carries it, only to report mismatches).

A request that fails (non-2xx, connection error, timeout, an error inside the stream, a stream
with no content or one that ends before `[DONE]`) is a FAILURE dict; send() never raises for it.

Connections are pooled (HTTP/1.1 keep-alive), but a server may close one after any response
(with or without `Connection: close`, or when it has been idle too long), and the client may
learn so only when it sends the next request on it. A request that went out on a pooled
connection and failed with the connection closed or reset before any response byte arrived is
sent once more on a fresh connection (t_send restarts; the record says `reconnected`): the
server never saw it, or saw it on a connection it had chosen to drop. A failure on a fresh
connection, or once the response began, is the server's.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from factory.bench.datasets import BenchRequest

_ERROR_BODY_CHARS = 500


async def _on_reuse(_session, ctx, _params) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["pooled"] = True


# Give the session this trace config: it tells send() whether a request went out on a pooled connection.
POOL_TRACE = aiohttp.TraceConfig()
POOL_TRACE.on_connection_reuseconn.append(_on_reuse)
# Closed or reset by the peer: what a pooled connection the server had dropped raises.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def request_body(model: str, req: BenchRequest, extra_body: dict | None = None) -> bytes:
    body = {
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Exact output lengths: vLLM and the factory accept it, so every request costs what it asks.
        "ignore_eos": True,
    }
    if extra_body:
        body.update(extra_body)
    return json.dumps(body).encode()


def error_message(text: str) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body itself."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:_ERROR_BODY_CHARS].strip() or "(empty body)"
    err = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return text[:_ERROR_BODY_CHARS]


class _StreamFailed(Exception):
    pass


async def send(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    req: BenchRequest,
    *,
    api_key: str | None,
    t0: float,
    extra_body: dict | None = None,
    fresh: aiohttp.ClientSession | None = None,
) -> tuple[dict | None, dict | None]:
    """(RECORD, None) for a completed request, (None, FAILURE) otherwise. Times relative to t0.
    `fresh`: a session that never reuses a connection (TCPConnector(force_close=True)), for the
    one retry of a request whose pooled connection had been closed; default `session`."""
    data = request_body(model, req, extra_body)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    for attempt in range(2):
        outcome = await _attempt(session if attempt == 0 else (fresh or session), endpoint, data, headers, req, t0)
        if not (isinstance(outcome, _Stale) and attempt == 0):
            break
    if isinstance(outcome, _Stale):
        return None, outcome.failure
    if isinstance(outcome, dict):
        return None, outcome
    status, t_send, arrivals, pieces, usage, done = outcome
    reconnected = attempt == 1
    if not arrivals:
        return None, _failure(req, t_send - t0, "stream ended without any content", status)
    if not done:
        return None, _failure(req, t_send - t0, f"stream ended before [DONE] after {len(arrivals)} chunks", status)
    has_usage = usage is not None and usage.get("completion_tokens") is not None
    record = {
        "index": req.index,
        "t_send_s": t_send - t0,
        "chunk_s": [t - t_send for t in arrivals],
        "n_in": usage.get("prompt_tokens") if usage else None,
        "n_out": int(usage["completion_tokens"]) if has_usage else len(arrivals),
        "n_out_source": "usage" if has_usage else "chunks",
        "n_out_expected": req.max_tokens,
    }
    if reconnected:
        record["reconnected"] = True
    if not has_usage:
        record["text"] = "".join(pieces)  # the runner retokenises it (then drops it) when it has a tokenizer
    return record, None


class _Stale:
    """A request that failed on a pooled connection before any response byte: worth one retry."""

    def __init__(self, failure: dict):
        self.failure = failure


async def _attempt(session, endpoint: str, data: bytes, headers: dict, req: BenchRequest, t0: float):
    """One try: (status, t_send, arrivals, pieces, usage, saw [DONE]), a FAILURE dict, or _Stale."""
    conn: dict = {}
    status: int | None = None
    arrivals: list[float] = []
    pieces: list[str] = []  # the answer's text, kept only for retokenising when usage is missing
    t_send = time.perf_counter()
    try:
        async with session.post(endpoint, data=data, headers=headers, trace_request_ctx=conn) as resp:
            status = resp.status
            if status // 100 != 2:
                text = await resp.text(errors="replace")
                return _failure(req, t_send - t0, f"HTTP {status}: {error_message(text)}", status)
            usage, done = await _read_stream(resp, arrivals, pieces)
    except _StreamFailed as err:
        return _failure(req, t_send - t0, str(err), status)
    except (asyncio.TimeoutError, TimeoutError):
        return _failure(req, t_send - t0, f"timeout after {time.perf_counter() - t_send:.1f} s", status)
    except (aiohttp.ClientError, OSError, ValueError) as err:
        failure = _failure(req, t_send - t0, f"{type(err).__name__}: {err}", status)
        if status is None and conn.get("pooled") and isinstance(err, _STALE):
            return _Stale(failure)
        return failure
    return status, t_send, arrivals, pieces, usage, done


async def _read_stream(
    resp: aiohttp.ClientResponse, arrivals: list[float], pieces: list[str]
) -> tuple[dict | None, bool]:
    """Reads SSE to the end; appends each content chunk's arrival time and text. -> (usage, saw [DONE])."""
    usage, done, buf = None, False, b""
    async for data in resp.content.iter_any():
        now = time.perf_counter()  # before any parsing: the arrival of every line this read completes
        buf += data
        if b"\n" not in data:
            continue
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            if done or not line.startswith(b"data:"):
                continue  # blank separators, ": comments", event:/id: fields, trailing bytes
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True  # keep reading to EOF so the connection goes back to the pool
                continue
            try:
                event = json.loads(payload)
            except ValueError as err:
                raise _StreamFailed(f"bad SSE data: {payload[:200]!r} ({err})") from None
            if not isinstance(event, dict):
                raise _StreamFailed(f"bad SSE data: {payload[:200]!r}")
            if event.get("error"):
                raise _StreamFailed(f"error in stream: {error_message(json.dumps(event))}")
            choices = event.get("choices")
            if choices:
                delta = choices[0].get("delta")
                content = delta.get("content") if delta else None
                if content:
                    arrivals.append(now)
                    pieces.append(content)
            if event.get("usage"):
                usage = event["usage"]
    return usage, done


def _failure(req: BenchRequest, t_send_s: float, error: str, status: int | None) -> dict:
    return {"index": req.index, "t_send_s": t_send_s, "error": error, "status": status}
