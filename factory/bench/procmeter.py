"""Modeled energy for a server on a machine with no power sensor: the CPU time of its process tree.

`factory bench vs-vllm` on CPU needs one energy figure that means the same for stock vLLM and
for the factory. The factory's own counter models only its engine's busy time; stock vLLM has no
counter at all. This meter charges both alike, from what the kernel counts for every process in
the server's tree (engine, API server, Ray's daemons and workers, all of it):

    power_w = idle_w + core_w x (CPU seconds used per second)

with idle_w 40 W and core_w 40 W by default (a 2-core box then spans 40-120 W, the range the
factory's modeled telemetry uses). It is a model, labelled `process:modeled` wherever it is
printed, never a measurement; what it compares fairly is how much CPU each stack burns per token.
"""

from __future__ import annotations

import time

import psutil

from factory.bench.energy import EnergyMeter


class _TreeCpu:
    """CPU seconds (user + system) used by a process tree, counting exited members' last reading."""

    def __init__(self, pid: int):
        self.pid = pid
        self._seen: dict[int, float] = {}

    def __call__(self) -> float:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                t = p.cpu_times()
                self._seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return sum(self._seen.values())


def process_meter(pid: int, *, idle_w: float = 40.0, core_w: float = 40.0, interval_s: float = 0.25) -> EnergyMeter:
    """An EnergyMeter (factory/bench/energy.py) whose counter integrates the modeled power of the
    process tree rooted at `pid`: idle_w + core_w x CPU seconds per second."""
    cpu_s = _TreeCpu(pid)
    state = {"t": time.perf_counter(), "cpu": cpu_s(), "j": 0.0}

    def read() -> tuple[dict[str, float], float]:
        now, cpu = time.perf_counter(), cpu_s()
        dt = max(now - state["t"], 1e-9)
        power_w = idle_w + core_w * max(0.0, cpu - state["cpu"]) / dt
        state["j"] += power_w * dt
        state.update(t=now, cpu=cpu)
        return {"tree": state["j"]}, power_w

    return EnergyMeter("process:modeled", 0, read, interval_s=interval_s)
