"""The process-tree energy model vs-vllm uses on machines without a power sensor."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from factory.bench.metrics import energy_between
from factory.bench.procmeter import process_meter

BUSY = "import time\nend = time.time() + 3.0\nwhile time.time() < end: pass\n"


def test_a_busy_child_costs_one_core_of_modeled_power_on_top_of_idle():
    """A tree whose only work is one child spinning a core for 3 s: the counter grows by about
    idle + core_w over a second of it (the child is found through the tree, not by its pid)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BUSY!r}])"]
    )
    meter = process_meter(parent.pid, idle_w=10.0, core_w=100.0, interval_s=0.1)
    t0 = time.perf_counter()
    meter.start(t0)
    import psutil

    while not psutil.Process(parent.pid).children():  # the child is spinning once it exists (+ its start-up)
        time.sleep(0.05)
    time.sleep(0.5)
    a = time.perf_counter() - t0
    time.sleep(1.0)
    b = time.perf_counter() - t0
    parent.wait()
    meter.settle()
    meter.stop()
    energy, power = meter.window(a, b)
    mean_w = energy_between(energy, a, b) / (b - a)
    assert meter.source == "process:modeled"
    # one core busy; another process may take part of it on a shared machine, never more than one
    assert 10.0 + 100.0 * 0.5 < mean_w < 10.0 + 100.0 * 1.1
    assert max(w for _, w in power) > 50 and min(w for _, w in power) >= 10.0


def test_an_idle_tree_costs_idle_power_only():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    time.sleep(0.8)  # past the interpreter's start-up
    meter = process_meter(proc.pid, idle_w=40.0, core_w=40.0, interval_s=0.1)
    t0 = time.perf_counter()
    meter.start(t0)
    time.sleep(1.0)
    meter.settle()
    meter.stop()
    proc.kill()
    energy, _ = meter.window(0.1, 1.0)
    assert energy_between(energy, 0.1, 1.0) / 0.9 == pytest.approx(40.0, rel=0.05)
