"""What the per-request route call costs: HAProxy's Lua action opens a connection to the factory's
router (FactoryRouter) for every POST, forwards the request body, and waits for the pick.

    .venv/bin/python bench/route_cost.py [--config configs/default.yaml] [--calls 300] [--out result.json]

Starts `factory serve` on the config (a free port), then:
- calls the router's `/internal/route` as the Lua action does (HTTP/1.0, a fresh connection per
  call, the body forwarded) with chat bodies of 1 KiB, 16 KiB and 256 KiB (the default
  `routing.body_limit_kib`), and reports the latency percentiles in microseconds;
- reports the router replica's and HAProxy's resident memory (PSS), idle and after a burst of
  concurrent streams whose bodies HAProxy buffered.
Prints a table and writes JSON. CPU model and the config are recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import yaml

ROUTER_TITLE = "ray::ServeReplica:factory:FactoryRouter"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _find(root: psutil.Process, title: str) -> list[psutil.Process]:
    out = []
    for p in root.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title) or p.name() == title:
                out.append(p)
        except psutil.Error:
            pass
    return out


# Serve gives each direct-ingress replica an HTTP port in this range (RAY_SERVE_DIRECT_INGRESS_*_HTTP_PORT);
# the replica's process also listens on Ray's own RPC ports.
HTTP_PORTS = range(30000, 31000)


def _listen_port(p: psutil.Process) -> int:
    return next(
        c.laddr.port
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in HTTP_PORTS
    )


def _pss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def _body(model: str, size: int) -> bytes:
    filler = "The meter counts the tokens and the joules. "
    text = (filler * (size // len(filler) + 1))[: max(0, size - 120)]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()


def _route_once(port: int, body: bytes) -> float:
    """One call as the Lua action makes it; returns seconds."""
    head = (
        f"POST /internal/route HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    elapsed = time.perf_counter() - t0
    if not reply.startswith(b"HTTP/1.1 200") and not reply.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"route call failed: {reply[:200]!r}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    doc = yaml.safe_load(Path(args.config).read_text()) or {}
    port = _free_port()
    doc.setdefault("server", {})["port"] = port
    work = Path(tempfile.mkdtemp(prefix="route-cost-"))
    doc.setdefault("ledger", {})["path"] = str(work / "ledger.db")
    cfg_path = work / "factory.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    model = (doc.get("models") or [{}])[0].get("name") or "smollm2-135m"
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("factory")), "serve", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"cpu_model": _cpu_model(), "config": args.config, "calls_per_size": args.calls}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        root = psutil.Process(proc.pid)
        (router,) = _find(root, ROUTER_TITLE)
        haproxy = _find(root, "haproxy")
        rport = _listen_port(router)
        result["router_pss_mib_idle"] = round(_pss_mib([router]), 1)
        result["haproxy_pss_mib_idle"] = round(_pss_mib(haproxy), 1)
        rows = {}
        for size in (1024, 16 * 1024, 256 * 1024):
            body = _body(model, size)
            for _ in range(20):  # warm-up
                _route_once(rport, body)
            times = sorted(_route_once(rport, body) for _ in range(args.calls))
            rows[size] = {
                "p50_us": round(statistics.median(times) * 1e6),
                "p99_us": round(times[int(0.99 * (len(times) - 1))] * 1e6),
                "mean_us": round(statistics.fmean(times) * 1e6),
            }
        result["route_call"] = {str(k): v for k, v in rows.items()}

        # HAProxy buffers each forwarded body: its memory with 32 concurrent 16 KiB requests.
        big = _body(model, 16 * 1024)

        def send(_: int) -> int:
            return httpx.post(base + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"},
                              timeout=300).status_code  # fmt: skip

        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(send, i) for i in range(32)]
            time.sleep(3)
            result["haproxy_pss_mib_32_in_flight"] = round(_pss_mib(_find(root, "haproxy")), 1)
            result["router_pss_mib_after_burst"] = round(_pss_mib([router]), 1)
            result["statuses"] = sorted({f.result() for f in futures})
    finally:
        proc.send_signal(15)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"CPU: {result['cpu_model']}; config {args.config}")
    print("body      route call p50 / p99 / mean (µs)")
    for size, r in result.get("route_call", {}).items():
        print(f"{int(size) // 1024:>4} KiB  {r['p50_us']:>8} / {r['p99_us']:>8} / {r['mean_us']:>8}")
    for key in ("router_pss_mib_idle", "router_pss_mib_after_burst", "haproxy_pss_mib_idle", "haproxy_pss_mib_32_in_flight"):
        print(f"{key}: {result.get(key)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
