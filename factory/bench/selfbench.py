"""The harness measuring itself: how fast can `factory bench` drive a server that costs nothing?

A trivial OpenAI-shaped streaming server (no model: `tokens` one-word chunks, then usage, then
[DONE]) runs in a separate process on loopback; the harness's own run_level drives it at each
concurrency level. If the harness's request rate here is far above what a real server reaches,
the client is not the bottleneck of a real benchmark. Client CPU per request is this process's
CPU time (user + system) over the level divided by completed requests.

    python -m factory.bench.selfbench [--requests N] [--tokens 64] [--concurrency 1,16,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

from factory.bench.datasets import build_requests
from factory.bench.load import LoadSpec, run_level


@dataclass
class TrivialServer:
    """A running trivial server. in_flight/max_in_flight/arrivals_s are for tests that check load."""

    runner: web.AppRunner
    port: int
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals_s: list[float] = field(default_factory=list)  # perf_counter at each request's arrival

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


def _chunk(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


async def serve_trivial(host: str, port: int, tokens: int, delay_s: float = 0.0) -> TrivialServer:
    """Starts the server on host:port (port 0: an ephemeral one) and returns it running.
    Each answer: `tokens` content chunks (delay_s apart), a usage chunk, [DONE]."""
    base = {"id": "chatcmpl-trivial", "object": "chat.completion.chunk", "created": 0, "model": "trivial"}
    token_chunk = _chunk({**base, "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]})
    done = b"data: [DONE]\n\n"
    state: TrivialServer | None = None

    async def chat(request: web.Request) -> web.StreamResponse:
        state.arrivals_s.append(time.perf_counter())
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            body = await request.json()
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            for _ in range(tokens):
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                await resp.write(token_chunk)
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": tokens,
                "total_tokens": len(prompt.split()) + tokens,
            }
            await resp.write(_chunk({**base, "choices": [], "usage": usage}) + done)
            await resp.write_eof()
            return resp
        finally:
            state.in_flight -= 1

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    state = TrivialServer(runner, runner.addresses[0][1])
    return state


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _server_process(host: str, tokens: int, delay_s: float, conn) -> None:
    async def main() -> None:
        server = await serve_trivial(host, 0, tokens, delay_s)
        conn.send(server.port)
        await asyncio.Event().wait()  # until terminated

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(main())


def _row(c: int, run, cpu_s: float) -> dict:
    recs = run.records
    sends = [r["t_send_s"] for r in recs] + [f["t_send_s"] for f in run.failures]
    duration_s = max(r["t_send_s"] + r["chunk_s"][-1] for r in recs) - min(sends) if recs else 0.0
    return {
        "concurrency": c,
        "completed": len(recs),
        "failed": len(run.failures),
        "duration_s": duration_s,
        "request_s": len(recs) / duration_s if duration_s else 0.0,
        "output_tok_s": sum(r["n_out"] for r in recs) / duration_s if duration_s else 0.0,
        "cpu_ms_per_request": 1000 * cpu_s / max(1, len(recs)),
        "ttft_p50_ms": 1000 * statistics.median(r["chunk_s"][0] for r in recs) if recs else None,
    }


def selfbench(
    concurrency_levels=(1, 16, 64, 256),
    num_requests: int | None = None,
    tokens: int = 64,
    delay_s: float = 0.0,
    host: str = "127.0.0.1",
) -> list[dict]:
    """One row per level: req/s, output tok/s, client CPU ms per request, TTFT p50 (ms).
    num_requests None: 400 or 8 x concurrency, whichever is more. delay_s > 0 spaces the chunks
    so each arrives in its own read, as from a real server (delay 0: a request's chunks coalesce)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_process, args=(host, tokens, delay_s, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("the trivial server did not start within 30 s")
        url = f"http://{host}:{parent.recv()}"

        async def levels() -> list[dict]:
            rows = []
            warm = build_requests("random", 32, 0, input_len="64", output_len=str(tokens))
            await run_level(
                warm,
                url=url,
                model="trivial",
                api_key=None,
                load=LoadSpec("concurrency", 8),
                seed=0,
                duration_s=None,
                on_result=None,
            )
            for c in concurrency_levels:
                n = num_requests or max(400, 8 * c)
                reqs = build_requests("random", n, c, input_len="64", output_len=str(tokens))
                cpu0 = time.process_time()
                run = await run_level(
                    reqs,
                    url=url,
                    model="trivial",
                    api_key=None,
                    load=LoadSpec("concurrency", c),
                    seed=c,
                    duration_s=None,
                    on_result=None,
                )
                rows.append(_row(c, run, time.process_time() - cpu0))
            return rows

        with asyncio.Runner(loop_factory=_new_loop) as runner:
            return runner.run(levels())
    finally:
        proc.terminate()
        proc.join(10)


def format_rows(rows: list[dict]) -> str:
    lines = [
        f"{'conc':>5} {'done':>6} {'fail':>5} {'req/s':>9} {'out tok/s':>11} {'CPU ms/req':>11} {'TTFT p50 ms':>12}"
    ]
    for r in rows:
        ttft = "-" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.2f}"
        lines.append(
            f"{r['concurrency']:>5} {r['completed']:>6} {r['failed']:>5} {r['request_s']:>9.1f} "
            f"{r['output_tok_s']:>11.0f} {r['cpu_ms_per_request']:>11.3f} {ttft:>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="server pause between chunks")
    args = ap.parse_args(argv)
    rows = selfbench(args.concurrency, args.requests, args.tokens, args.delay_ms / 1000)
    cpus = multiprocessing.cpu_count()
    print(
        f"harness self-benchmark: trivial server in its own process, loopback, {args.tokens} tokens/request "
        f"{args.delay_ms:g} ms apart, {cpus} CPUs"
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
