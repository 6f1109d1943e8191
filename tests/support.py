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


@contextmanager
def serving(factory: "FactoryProcess", **ready) -> Iterator["FactoryProcess"]:
    """`factory` once it is ready (FactoryProcess.wait_ready's keywords); stopped with SIGTERM on
    the way out, and whatever it left behind killed."""
    try:
        factory.wait_ready(**ready)
        yield factory
    finally:
        try:
            factory.stop()
        finally:
            factory.kill_everything()


def kill_processes(procs: list[psutil.Process], wait_s: float = 30) -> None:
    """SIGKILL each of `procs` (those already gone are skipped), then wait up to `wait_s` for them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if wait_s:
        psutil.wait_procs(procs, timeout=wait_s)


def engine_process(factory: FactoryProcess, title: str) -> psutil.Process:
    """The replica's vLLM process by its title: VLLM::EngineCore or VLLM::Worker."""
    for p in factory.descendants():
        try:
            if p.name().startswith(title[:15]) or title in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no {title} process under the factory")


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
        # A chat request sent before the factory was ready, and what it got (see wait_ready).
        self.early_request: dict = {}

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(
        self, timeout_s: float = 420, probe_chat_model: str | None = None, probe_headers: dict | None = None
    ) -> None:
        """Poll /ready until 200. With `probe_chat_model`, a chat request is sent as soon as the
        application is deployed (before that, for the few seconds Serve takes to build it, HAProxy
        answers 404 in plain text: load balancers gate on /ready), long before the engine is up; its
        answer is kept in `early_request` for tests to inspect (a client that comes early must lose
        nothing)."""
        deadline = time.monotonic() + timeout_s
        probe: threading.Thread | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"factory serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            deployed = False
            try:
                r = httpx.get(self.base_url + "/ready", timeout=2)
                if r.status_code == 200:
                    if probe is not None:
                        probe.join(timeout_s)
                    return
                deployed = r.headers.get("content-type", "").startswith("application/json")
            except httpx.TimeoutException:
                deployed = True  # Serve's fallback proxy holds requests until a replica serves
            except httpx.HTTPError:
                pass
            if probe is None and probe_chat_model and deployed:
                probe = threading.Thread(target=self._early_chat, args=(probe_chat_model, probe_headers, timeout_s))
                probe.start()
            time.sleep(0.5)
        raise TimeoutError(f"factory not ready after {timeout_s}s:\n{self.log_tail()}")

    def _early_chat(self, model: str, headers: dict | None, timeout_s: float) -> None:
        self.early_request["sent_at"] = time.monotonic()
        try:
            self.early_request["response"] = httpx.post(
                self.base_url + "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                headers=headers,
                timeout=timeout_s,
            )
        except httpx.HTTPError as err:
            self.early_request["error"] = err
        self.early_request["answered_at"] = time.monotonic()

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
        kill_processes(self.descendants(), wait_s=0)
        if self.proc.poll() is None:
            self.proc.kill()
