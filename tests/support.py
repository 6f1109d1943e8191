"""Start and stop `factory serve` exactly as a user would: the console script, a YAML file, HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import yaml

FACTORY_BIN = Path(sys.executable).with_name("factory")


@contextmanager
def background_load(send: Callable[[int], None], workers: int) -> Iterator[None]:
    """Call send(worker index) in a loop on `workers` threads for as long as the block runs."""
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            send(i)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, *, port: int, models: list[dict], **extra) -> Path:
    path.write_text(yaml.safe_dump({"server": {"port": port, "drain_timeout_s": 30}, "models": models, **extra}))
    return path


class FactoryProcess:
    """A `factory serve CONFIG` subprocess with its log in a file."""

    def __init__(self, config: Path, log_path: Path, port: int):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(FACTORY_BIN), "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        self.seen_while_starting: list[httpx.Response] = []

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(
        self, timeout_s: float = 420, probe_chat_model: str | None = None, probe_headers: dict | None = None
    ) -> None:
        """Poll /ready; keep the 503s seen on the way (and one chat attempt) for tests to inspect."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"factory serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.base_url + "/ready", timeout=5)
                if r.status_code == 200:
                    return
                # Until the app's routes exist (about a second after the proxy binds), Ray Serve's
                # proxy itself answers 404 in plain text; from then on the ingress answers.
                from_ingress = r.headers.get("content-type", "").startswith("application/json")
                if from_ingress and not self.seen_while_starting and probe_chat_model:
                    self.seen_while_starting.append(r)
                    self.seen_while_starting.append(
                        httpx.post(
                            self.base_url + "/v1/chat/completions",
                            json={"model": probe_chat_model, "messages": [{"role": "user", "content": "hi"}]},
                            headers=probe_headers,
                            timeout=10,
                        )
                    )
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"factory not ready after {timeout_s}s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill_everything(self) -> None:
        """Last resort in teardown, so a failed test never leaves a stack running."""
        procs = self.descendants()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
