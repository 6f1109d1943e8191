"""The harness against HTTP/1.1 servers that manage their connections their own way: each one a
raw asyncio server on loopback, so the wire is exactly what the test says.

- closes after every response without saying so (legal: HTTP/1.1 lets a server close any time);
- closes after every response with `Connection: close`;
- answers HTTP/1.0-style (no chunking, no length: the body ends when the connection does);
- keeps connections alive but drops them after a short idle time;
- resets a fresh connection after reading the request (a real failure: counted, not retried).
Every completed request must be a record, with the server's usage, and the level's failures
only the server's own."""

from __future__ import annotations

import asyncio
import json

import pytest

from factory.bench.datasets import BenchRequest
from factory.bench.load import LoadSpec, run_level

CHUNKS = 4


def _events() -> bytes:
    out = b""
    for i in range(CHUNKS):
        chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
        out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": CHUNKS, "total_tokens": 3 + CHUNKS}}
    return out + b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """Reads one request (head and its Content-Length body); False at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    length = 0
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    await reader.readexactly(length)
    return True


SSE_HEAD = "Content-Type: text/event-stream\r\n"


async def close_silently(reader, writer):
    if await _read_request(reader):
        writer.write(("HTTP/1.1 200 OK\r\n" + SSE_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode())
        writer.write(_chunked(_events()))
        await writer.drain()
    writer.close()


async def close_saying_so(reader, writer):
    if await _read_request(reader):
        head = "HTTP/1.1 200 OK\r\n" + SSE_HEAD + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + _chunked(_events()))
        await writer.drain()
    writer.close()


async def http10_style(reader, writer):
    if await _read_request(reader):
        writer.write(("HTTP/1.0 200 OK\r\n" + SSE_HEAD + "\r\n").encode() + _events())
        await writer.drain()
    writer.close()


async def idle_timeout(reader, writer, idle_s: float = 0.05):
    """Keep-alive, but a connection idle for idle_s is dropped."""
    while True:
        try:
            ok = await asyncio.wait_for(_read_request(reader), idle_s)
        except asyncio.TimeoutError:
            break
        if not ok:
            break
        body = _events()
        writer.write(
            ("HTTP/1.1 200 OK\r\n" + SSE_HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        )
        await writer.drain()
    writer.close()


async def reset_after_request(reader, writer):
    if await _read_request(reader):
        writer.transport.abort()  # RST: the request was received and dropped
    else:
        writer.close()


async def _level(handler, n: int, load: LoadSpec):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reqs = [BenchRequest(index=i, messages=[{"role": "user", "content": "hi"}], max_tokens=CHUNKS, expected_input_tok=1) for i in range(n)]
    try:
        return await run_level(
            reqs, url=f"http://127.0.0.1:{port}", model="m", api_key=None, load=load, seed=0,
            duration_s=None, on_result=None, timeout_s=10,
        )  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("handler", [close_silently, close_saying_so, http10_style, idle_timeout])
@pytest.mark.parametrize("load", [LoadSpec("concurrency", 4), LoadSpec("rate", 40.0)], ids=["c4", "rate40"])
def test_every_request_to_a_server_that_closes_its_connections_is_measured(handler, load):
    run = asyncio.run(_level(handler, 24, load))
    assert run.failures == []
    assert len(run.records) == 24
    assert all(r["n_out"] == CHUNKS and r["n_out_source"] == "usage" for r in run.records)
    assert all(len(r["chunk_s"]) == CHUNKS for r in run.records)


def test_a_server_that_drops_requests_gets_them_counted_as_failures():
    run = asyncio.run(_level(reset_after_request, 6, LoadSpec("concurrency", 2)))
    assert run.records == []
    assert len(run.failures) == 6
    assert all(f["status"] is None for f in run.failures)


def test_only_a_request_on_a_pooled_connection_is_retried_and_its_record_says_so():
    """A server that closes silently leaves stale connections in the pool: some requests go out on
    one, fail before any byte comes back, and are sent again on a fresh connection."""
    run = asyncio.run(_level(close_silently, 40, LoadSpec("concurrency", 8)))
    assert run.failures == []
    retried = [r for r in run.records if r.get("reconnected")]
    assert retried  # the stale connections were met (the old harness failed these requests)
    # A fresh connection never needs it: the first request of each worker.
    assert len(retried) < len(run.records)
