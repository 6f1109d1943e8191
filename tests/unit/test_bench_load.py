"""The load generator and client against real HTTP on loopback (the trivial server, and a
misbehaving one): concurrency is a bound that is reached, rate mode keeps its mean gap, every
failure mode becomes a FAILURE dict, and records carry what METRICS.md needs."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from factory.bench.client import send
from factory.bench.datasets import BenchRequest, build_requests
from factory.bench.load import LoadError, LoadSpec, arrival_times, parse_levels, run_level
from factory.bench.selfbench import serve_trivial


def _requests(n: int, out: int = 4) -> list[BenchRequest]:
    return build_requests("random", n, 0, input_len="12", output_len=str(out))


async def _level(server_url: str, reqs, load: LoadSpec, **kw):
    kw.setdefault("duration_s", None)
    kw.setdefault("on_result", None)
    return await run_level(reqs, url=server_url, model="m", api_key=None, load=load, seed=1, **kw)


def test_concurrency_mode_reaches_but_never_exceeds_n_in_flight():
    async def main():
        server = await serve_trivial("127.0.0.1", 0, tokens=4, delay_s=0.004)
        try:
            seen = []
            run = await _level(
                server.url, _requests(40), LoadSpec("concurrency", 4), on_result=lambda r, f: seen.append((r, f))
            )
        finally:
            await server.close()
        return server, run, seen

    server, run, seen = asyncio.run(main())
    assert server.max_in_flight == 4
    assert run.sent == 40 and len(run.records) == 40 and run.failures == []
    assert len(seen) == 40 and all(r is not None and f is None for r, f in seen)
    assert sorted(r["index"] for r in run.records) == list(range(40))
    for rec in run.records:
        assert rec["n_out"] == 4 and rec["n_out_source"] == "usage" and rec["n_out_expected"] == 4
        assert rec["n_in"] == 12  # the server counts the prompt's words
        assert len(rec["chunk_s"]) == 4 and rec["t_send_s"] >= 0
        assert all(a < b for a, b in zip(rec["chunk_s"], rec["chunk_s"][1:], strict=False))  # 4 ms apart on the server
        assert rec["chunk_s"][0] > 0


def test_rate_mode_keeps_the_mean_inter_arrival_gap():
    async def main():
        server = await serve_trivial("127.0.0.1", 0, tokens=2)
        try:
            return await _level(server.url, _requests(200, out=2), LoadSpec("rate", 200.0))
        finally:
            await server.close()

    run = asyncio.run(main())
    assert len(run.records) == 200
    sends = sorted(r["t_send_s"] for r in run.records)
    schedule = arrival_times(200, 200.0, 1.0, seed=1)
    mean_gap_s = (sends[-1] - sends[0]) / 199
    assert abs(mean_gap_s - 1 / 200) / (1 / 200) < 0.15
    # Each request goes out when scheduled (open loop), not when an earlier one finishes.
    lateness_s = [t - s for t, s in zip(sends, schedule, strict=True)]
    assert statistics.median(lateness_s) < 0.01 and min(lateness_s) > -0.001


def test_gamma_gaps_have_mean_one_over_rate_and_burstiness_sets_their_spread():
    for shape, cv in ((1.0, 1.0), (0.25, 2.0), (4.0, 0.5)):
        gaps = np.diff(arrival_times(20001, 10.0, shape, seed=2))
        assert abs(gaps.mean() - 0.1) < 0.005
        assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.1
    assert arrival_times(3, math.inf, 1.0, seed=0) == [0.0, 0.0, 0.0]
    assert arrival_times(50, 5.0, 1.0, seed=9) == arrival_times(50, 5.0, 1.0, seed=9)


def test_infinite_rate_sends_everything_at_once_and_trace_mode_follows_arrivals():
    async def main():
        server = await serve_trivial("127.0.0.1", 0, tokens=2, delay_s=0.02)
        try:
            burst = await _level(server.url, _requests(30, out=2), LoadSpec("rate", math.inf))
            peak = server.max_in_flight
            timed = [BenchRequest(i, [{"role": "user", "content": "hi"}], 2, 1, arrival_s=0.1 * i) for i in range(4)]
            trace = await _level(server.url, timed, LoadSpec("trace", None))
        finally:
            await server.close()
        return burst, peak, trace

    burst, peak, trace = asyncio.run(main())
    assert len(burst.records) == 30 and peak == 30
    assert max(r["t_send_s"] for r in burst.records) < 0.05
    sends = sorted(r["t_send_s"] for r in trace.records)
    assert all(abs(t - 0.1 * i) < 0.03 for i, t in enumerate(sends))


def test_duration_stops_sending_and_in_flight_requests_still_count():
    async def main():
        server = await serve_trivial("127.0.0.1", 0, tokens=4, delay_s=0.01)
        try:
            return await _level(server.url, _requests(1000), LoadSpec("concurrency", 2), duration_s=0.3)
        finally:
            await server.close()

    run = asyncio.run(main())
    assert 4 <= run.sent < 1000
    assert len(run.records) == run.sent and run.failures == []
    assert max(r["t_send_s"] for r in run.records) < 0.3


async def _start_misbehaving() -> tuple[web.AppRunner, str]:
    """The misbehaving server on an ephemeral loopback port; (runner to clean up, base URL)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _misbehaving)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _misbehaving(request: web.Request) -> web.StreamResponse:
    """The request's model says how to fail."""
    how = (await request.json())["model"]
    if how == "http500":
        return web.json_response({"error": {"message": "engine died", "type": "internal"}}, status=500)
    if how == "http400-text":
        return web.Response(text="bad request, plainly", status=400)
    if how == "slow":
        await asyncio.sleep(2)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":" a"}}]}\n\n'
    if how == "error-in-stream":
        await resp.write(chunk + b'data: {"error": {"message": "out of KV cache", "code": 503}}\n\n')
    elif how == "cut":
        await resp.write(chunk)
        request.transport.close()  # mid-stream, no terminating chunk
        return resp
    elif how == "no-content":
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\ndata: [DONE]\n\n')
    elif how == "no-done":
        await resp.write(chunk)
    elif how == "no-usage":  # split mid-line across writes, with a comment and CRLFs
        await resp.write(b": keep-alive\r\n\r\n" + chunk + chunk[:20])
        await asyncio.sleep(0.01)
        await resp.write(chunk[20:] + b"data: [DONE]\r\n\r\n")
    await resp.write_eof()
    return resp


@pytest.mark.parametrize(
    ("how", "error", "status"),
    [
        ("http500", "HTTP 500: engine died", 500),
        ("http400-text", "HTTP 400: bad request, plainly", 400),
        ("error-in-stream", "error in stream: out of KV cache", 200),
        ("cut", "ClientPayloadError", 200),
        ("no-content", "without any content", 200),
        ("no-done", "before [DONE]", 200),
        ("slow", "timeout", None),
    ],
)
def test_each_failure_becomes_a_failure_dict_not_an_exception(how, error, status):
    async def main():
        runner, url = await _start_misbehaving()
        try:
            reqs = _requests(3)
            return await run_level(
                reqs,
                url=url,
                model=how,
                api_key="k",
                load=LoadSpec("concurrency", 2),
                seed=0,
                duration_s=None,
                on_result=None,
                timeout_s=0.3,
            )
        finally:
            await runner.cleanup()

    run = asyncio.run(main())
    assert run.records == [] and len(run.failures) == 3
    for f in run.failures:
        assert set(f) == {"index", "t_send_s", "error", "status"}
        assert error in f["error"] and f["status"] == status


def test_stream_split_across_reads_without_usage_counts_chunks_and_says_so():
    async def main():
        runner, url = await _start_misbehaving()
        try:
            async with aiohttp.ClientSession() as session:
                t0 = time.perf_counter()
                return await send(
                    session,
                    url,
                    "no-usage",
                    _requests(1)[0],
                    api_key=None,
                    t0=t0,
                )
        finally:
            await runner.cleanup()

    record, failure = asyncio.run(main())
    assert failure is None
    assert record["n_out"] == 2 and record["n_out_source"] == "chunks" and record["n_in"] is None
    assert record["text"] == " a a"  # kept for retokenising (factory/bench/retokenise.py)
    assert record["chunk_s"][1] - record["chunk_s"][0] >= 0.005  # each line timed by the read that completed it


def test_connection_refused_is_a_failure():
    async def main():
        async with aiohttp.ClientSession() as session:
            return await send(session, "http://127.0.0.1:9", "m", _requests(1)[0], api_key=None, t0=time.perf_counter())

    record, failure = asyncio.run(main())
    assert record is None and failure["status"] is None and "Connect" in failure["error"]


def test_parse_levels():
    assert [(s.mode, s.value) for s in parse_levels("1, 8,64", None)] == [
        ("concurrency", 1),
        ("concurrency", 8),
        ("concurrency", 64),
    ]
    rates = parse_levels(None, "2,8,inf", burstiness=0.5)
    assert [s.value for s in rates] == [2.0, 8.0, math.inf] and rates[0].burstiness == 0.5
    assert rates[2].to_dict() == {"mode": "rate", "value": "inf", "burstiness": 0.5}
    assert parse_levels("8", None)[0].to_dict() == {"mode": "concurrency", "value": 8}
    assert LoadSpec("trace", None).to_dict() == {"mode": "trace", "value": None}


@pytest.mark.parametrize(
    ("conc", "rate", "match"),
    [
        (None, None, "exactly one"),
        ("1", "2", "exactly one"),
        ("1,x", None, "not a number"),
        ("0", None, ">= 1"),
        ("1.5", None, "whole number"),
        ("inf", None, "whole number"),
        (None, "0", "> 0"),
    ],
)
def test_bad_levels_say_why(conc, rate, match):
    with pytest.raises(LoadError, match=match):
        parse_levels(conc, rate)


def test_trace_mode_needs_arrival_times():
    with pytest.raises(LoadError, match="arrival_s"):
        asyncio.run(_level("http://127.0.0.1:9", _requests(2), LoadSpec("trace", None)))


def _policy(pid: int) -> int:
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


def test_the_client_runs_ahead_of_servers_while_a_level_runs_and_its_children_do_not():
    from factory.bench.runner import client_first

    before = _policy(0)
    with client_first() as how:
        if how != "fifo":
            pytest.skip(f"no real-time slot for the client here ({how})")
        assert _policy(0) == os.SCHED_FIFO
        child = subprocess.run(  # a server started meanwhile gets the normal policy
            [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], capture_output=True, text=True
        )
        assert int(child.stdout) == os.SCHED_OTHER
    assert _policy(0) == before


def test_without_the_right_the_level_runs_at_normal_priority_and_says_why(monkeypatch):
    from factory.bench.runner import client_first

    def refused(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    with client_first() as how:
        assert how == "normal: Operation not permitted"
