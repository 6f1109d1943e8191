"""Foundation benchmark: time from `make serve` to the first answered request, and the resident
memory of the whole stack with one replica of the embedded model.

    .venv/bin/python bench/startup.py [--command "make serve"] [--port 8000] [--out result.json]

Run it with the venv installed and the model pulled (the measurement is of a warm install, as
the issue defines it). Prints a table and writes JSON. Memory is reported as RSS (counts shared
pages once per process, so it over-counts) and PSS (shared pages split between the processes
that map them: the honest total), summed over the launched process and all its descendants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import httpx
import psutil

QUESTION = "What is the capital of France?"


def _first_answer(proc: subprocess.Popen, base: str, model: str, deadline: float) -> tuple[float, str]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering (see its log)")
        try:
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
            if r.status_code == 200:
                return time.monotonic(), r.json()["choices"][0]["message"]["content"]
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError("no answer before the deadline")


def _memory(root: psutil.Process) -> dict:
    procs = [root, *root.children(recursive=True)]
    rows, rss, pss = [], 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            name = " ".join(p.cmdline()[:2])[-60:] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        rows.append(
            {
                "pid": p.pid,
                "name": p.name(),
                "cmd": name,
                "rss_mib": info.rss / 2**20,
                "pss_mib": getattr(info, "pss", 0) / 2**20,
            }
        )
    rows.sort(key=lambda r: -r["pss_mib"])
    return {"processes": len(rows), "rss_gib": rss / 2**30, "pss_gib": pss / 2**30, "top": rows[:12]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", default="make serve", help="what a user runs (default: make serve)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    cmd = shlex.split(args.command)
    if cmd[:2] == ["make", "serve"] and args.port != 8000:
        cmd.append(f"SERVE_ARGS=--port {args.port}")
    log = open(os.environ.get("STARTUP_LOG", "/tmp/factory-startup.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    try:
        t_answer, text = _first_answer(proc, f"http://127.0.0.1:{args.port}", args.model, t0 + args.timeout_s)
        time.sleep(2)  # let the post-start allocations settle before reading memory
        mem = _memory(root)
    finally:
        family = [root, *root.children(recursive=True)]
        os.killpg(proc.pid, signal.SIGTERM)  # like Ctrl-C in the terminal: the whole group
        proc.wait(180)
        psutil.wait_procs(family, timeout=180)  # the launcher drains after make has returned
    gpu = "NVIDIA GPU present" if os.path.exists("/dev/nvidia0") else "no GPU"
    mem_gib = psutil.virtual_memory().total / 2**30
    result = {
        "where": f"{platform.node()} ({psutil.cpu_count()} CPUs, {mem_gib:.0f} GiB, {gpu})",
        "command": args.command,
        "first_answer_s": round(t_answer - t0, 1),
        "answer": text,
        "stack_rss_gib": round(mem["rss_gib"], 2),
        "stack_pss_gib": round(mem["pss_gib"], 2),
        "processes": mem["processes"],
        "top_processes": mem["top"],
    }
    print(f"first answer after {result['first_answer_s']} s: {text!r}")
    print(f"whole stack: {mem['processes']} processes, PSS {mem['pss_gib']:.2f} GiB, RSS {mem['rss_gib']:.2f} GiB")
    for r in mem["top"]:
        print(f"  {r['pss_mib']:8.0f} MiB PSS {r['rss_mib']:8.0f} MiB RSS  {r['cmd']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
