"""A real two-node Ray cluster on this one machine: the head's raylet on the host, the worker's in
a network namespace of its own with its own address, joined over a veth pair, as two machines on
one network would be. Built with `ray start` exactly as the README tells an operator.

Needs root (network namespaces); the tests run as root here and in CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support import free_port, kill_processes

RAY_BIN = Path(sys.executable).with_name("ray")
HEAD_IP, WORKER_IP = "10.77.0.1", "10.77.0.2"
OBJECT_STORE_BYTES = 200 * 1024 * 1024


class TwoNodeCluster:
    def __init__(self, root: Path, *, head_cpus: int, worker_cpus: int):
        self.root = root
        self.ns = f"fw{os.getpid() % 100000}"
        self.head_link, self.worker_link = f"{self.ns}h", f"{self.ns}w"
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.env = {
            **os.environ,
            # As `factory serve` does for a local Ray (launcher.py): the engine at nice 0, no usage report.
            "RAY_worker_niceness": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Token authentication, as an operator should run a cluster (Ray 2.60 turns it on by
            # itself only when the head finds a token): the token in ~/.ray/auth_token, made by
            # the head if missing; every node and driver says so and presents it. One home
            # directory here; on real machines the operator copies the file.
            "RAY_AUTH_MODE": "token",
        }

    # -- the network ------------------------------------------------------------------------

    def _ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)

    def _in_ns(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def start(self) -> TwoNodeCluster:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise RuntimeError("a two-node cluster needs root and iproute2 (network namespaces)")
        self._ip("netns", "add", self.ns)
        self._ip("link", "add", self.head_link, "type", "veth", "peer", "name", self.worker_link)
        self._ip("link", "set", self.worker_link, "netns", self.ns)
        self._ip("addr", "add", f"{HEAD_IP}/24", "dev", self.head_link)
        self._ip("link", "set", self.head_link, "up")
        self._ip("netns", "exec", self.ns, "ip", "addr", "add", f"{WORKER_IP}/24", "dev", self.worker_link)
        self._ip("netns", "exec", self.ns, "ip", "link", "set", self.worker_link, "up")
        self._ip("netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        self._run(
            [
                str(RAY_BIN), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
                "--include-dashboard=false", "--disable-usage-stats",
                # Ports of its own: other tests' Rays on this host hold the defaults (52365, 10001).
                f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            self.root / "head.log",
        )  # fmt: skip
        self.start_worker()
        return self

    def start_worker(self) -> None:
        self._run(
            self._in_ns(
                str(RAY_BIN), "start", f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
                f"--num-cpus={self.worker_cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
                "--disable-usage-stats",
            ),
            self.root / "worker.log",
        )  # fmt: skip

    def _run(self, cmd: list[str], log: Path) -> None:
        with log.open("ab") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")

    # -- the worker node's life -------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_worker(self) -> None:
        """The worker machine dies: every process in its namespace gets SIGKILL at once."""
        pids = self.worker_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while self.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.2)

    def nodes_alive(self) -> int:
        import json

        script = "import ray, json; ray.init(address=%r); print(json.dumps(sum(n['Alive'] for n in ray.nodes())))"
        out = subprocess.run(
            [sys.executable, "-c", script % self.address], capture_output=True, text=True, env=self.env, timeout=60
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    def head_processes(self) -> list[psutil.Process]:
        """This cluster's processes on the host: those naming its GCS address or port, with
        their children. (`ray stop` would stop every Ray on the machine, other tests' too.)"""
        marks = (self.address, f"--gcs_server_port={self.port}", f"--gcs-server-port={self.port}")
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(mark in " ".join(p.info["cmdline"] or []) for mark in marks):
                    for q in [p, *p.children(recursive=True)]:
                        found[q.pid] = q
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self) -> None:
        self.kill_worker()
        kill_processes(self.head_processes())
        # `ray start --head` left its address for drivers to find; it names a cluster that is gone.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip() == self.address:
            current.unlink()
        subprocess.run(["ip", "link", "del", self.head_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
