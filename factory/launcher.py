"""`factory serve`: start (or join) Ray, deploy the application, wait until it answers, and on
SIGINT/SIGTERM drain in-flight requests and take everything down, leaving no process behind.

Two processes: the one the user started (the supervisor) and the launcher it spawns in a new
session. Ray's local daemons are children of the launcher, so they sit outside the terminal's
process group: Ctrl-C (or `timeout`, or a process manager signalling the group) reaches only
the supervisor, which asks the launcher to drain, instead of killing the raylet mid-request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil

from factory.config import FactoryConfig, parse_config
from factory.models import ModelPullError, ModelSourceError, ResolvedModel, resolve
from factory.priorities import settle_priorities
from factory.ray_seams import SETUP_HOOK, haproxy_replicas, serve_environment

log = logging.getLogger("factory")

APP_NAME = "factory"
# The engine deployment's name (factory/app.py builds it; HAProxy's stats name its replicas by it).
ENGINE_DEPLOYMENT = "FactoryEngine"

READY_POLL_S = 1.0
# Once serving, Serve's own controller restarts failed replicas; the launcher only watches for a
# failed application, and polling serve.status() once a second kept the launcher at 3 % of a
# core under load on the 2-core machine (CPU the engine wants); every 10 s it drops out of sight.
SERVING_POLL_S = 10.0
# How often the launcher tells the hub which replicas HAProxy routes to (one local HTTP call):
# /ready counts a replica only once HAProxy's reloaded config has it.
ROUTABLE_POLL_S = 1.0
# `flat` leaves every process at Ray's worker niceness (for measuring what factory/priorities.py buys).
PRIORITIES_ENV = "FACTORY_PRIORITIES"


def resolve_models(cfg: FactoryConfig) -> dict[str, ResolvedModel]:
    """Resolve every model source before Ray starts (pulls embedded models on first use)."""
    return {m.served_name: resolve(m.source) for m in cfg.models}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_url(cfg: FactoryConfig) -> str:
    host = cfg.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://{host}:{cfg.server.port}"


def _ready(base_url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(base_url + "/ready", timeout=2) as r:
            return r.status == 200, "ready"
    except urllib.error.HTTPError as err:
        try:
            return False, json.loads(err.read())["error"]["message"]
        except Exception:
            return False, f"HTTP {err.code}"
    except Exception as err:
        return False, f"not answering yet ({type(err).__name__})"


def _banner(cfg: FactoryConfig, elapsed_s: float) -> str:
    url = _local_url(cfg)
    model = cfg.models[0].served_name
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    auth = " -H 'Authorization: Bearer $FACTORY_KEY'" if cfg.auth == "required" else ""
    keys = (
        "Auth is required: `factory tenants create NAME`, `factory keys create --tenant NAME` and\n"
        "`factory packages grant --tenant NAME --tokens N` make a key with tokens to spend.\n"
        if cfg.auth == "required"
        else ""
    )
    return (
        f"\nToken Factory ready in {elapsed_s:.1f}s at {url}  (OpenAI API under {url}/v1)\n{keys}"
        f"Try:\n  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{body}'\n"
        f"Metrics: {url}/metrics   Usage: {url}/v1/usage   Ctrl-C to stop.\n"
    )


class _Stop:
    """SIGINT/SIGTERM -> an event the main thread waits on (no work in the signal handler)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def serve_forever(cfg: FactoryConfig) -> int:
    """Run the factory until a signal; returns the process exit code."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    started = time.monotonic()
    stop = _Stop()
    stop.install()
    try:
        resolved = resolve_models(cfg)  # before Ray: a bad source fails fast, with nothing to stop
    except (ModelPullError, ModelSourceError) as err:
        log.error("%s", err)
        return 2
    log.info("models: %s", {k: v.path_or_id for k, v in resolved.items()})

    joined = cfg.ray.address is not None
    ports = {name: _free_port() for name in ("stats", "metrics", "fallback_http", "fallback_grpc")}
    serve_env = serve_environment(
        request_timeout_s=cfg.server.request_timeout_s,
        route_body_limit_bytes=cfg.routing.body_limit_kib * 1024 if cfg.routing.policy == "energy" else None,
        ports=ports,
    )
    # Every process of the job runs the hook: Serve's HAProxy then answers its own errors in
    # OpenAI's shape, 503 + Retry-After, instead of a text 500 (ray_seams.install_haproxy_error_page).
    hook = {"worker_process_setup_hook": SETUP_HOOK}
    if joined:
        # Serve's processes on the cluster read the data path's switches from the job's environment.
        ray.init(address=cfg.ray.address, namespace="factory", runtime_env={"env_vars": serve_env, **hook})
    else:
        # Ray starts workers at nice 15; the engine then loses the CPU to everything else on the
        # node. Stock vLLM runs at nice 0, and so do we (DESIGN §3).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # An operator's node does not report usage to Ray's maintainers unless it opts in.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.update(serve_env)
        # address="local": a new Ray of our own, never a cluster some `ray start` left on this host.
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.dashboard,
            namespace="factory",
            runtime_env=hook,
        )
    stop.install()  # ray.init installs handlers of its own; ours must win so we can drain.
    # Replicas go wherever Ray places them, so ask the cluster, not this node: a CPU-only head
    # in front of GPU workers must still configure GPU replicas.
    gpu_available = ray.cluster_resources().get("GPU", 0) > 0
    log.info("Ray cluster: %s", "GPUs found" if gpu_available else "no GPU, replicas run on CPU")
    outcome = 1
    try:
        serve.start(
            http_options={
                "host": cfg.server.host,
                "port": cfg.server.port,
                "request_timeout_s": cfg.server.request_timeout_s,
            }
        )
        # Deploy by import path: Serve builds the graph in a short-lived task, so this process
        # never imports vLLM and torch (~520 MB it would hold for the server's whole life).
        app = ServeApplicationSchema(
            name=APP_NAME,
            route_prefix="/",
            import_path="factory.app:build",
            args={
                "config": cfg.model_dump(mode="json"),
                "resolved": {name: dataclasses.asdict(r) for name, r in resolved.items()},
                "gpu_available": gpu_available,
            },
        )
        _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
        outcome = _wait(cfg, stop, started, ports["stats"])
    finally:
        _shutdown(cfg, joined)
    return outcome


def _wait(cfg: FactoryConfig, stop: _Stop, started: float, stats_port: int) -> int:
    from ray import serve

    base = _local_url(cfg)
    announced, last_state = False, ""
    me = psutil.Process(os.getpid())
    background_nice = os.environ.get(PRIORITIES_ENV, "background") != "flat"
    routable = _Routable(stats_port)
    next_look = 0.0
    while not stop.event.wait(ROUTABLE_POLL_S):
        routable.tell_hub()
        if time.monotonic() < next_look:
            continue
        next_look = time.monotonic() + (SERVING_POLL_S if announced else READY_POLL_S)
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":
            log.error("deployment failed: %s", app.message)
            return 1
        if background_nice:
            settle_priorities(me)  # processes (re)started since the last look
        if announced:
            continue
        ok, state = _ready(base)
        if ok:
            print(_banner(cfg, time.monotonic() - started), flush=True)
            announced = True
        elif state != last_state:
            log.info("waiting for replicas: %s", state)
            last_state = state
    log.info("%s received: draining in-flight requests (up to %.0fs)", stop.signal_name, cfg.server.drain_timeout_s)
    return 0


class _Routable:
    """Tells the hub which engine replicas this node's HAProxy routes to, when that changes (and
    every SERVING_POLL_S, in case the hub was restarted): a replica that serves but is not yet in
    HAProxy's reloaded config does not count toward /ready."""

    def __init__(self, stats_port: int):
        self._stats_port = stats_port
        self._told: frozenset[str] | None = None
        self._told_at = 0.0
        self._hub = None

    def tell_hub(self) -> None:
        from ray import serve

        ids = haproxy_replicas(self._stats_port, APP_NAME, ENGINE_DEPLOYMENT)
        now = time.monotonic()
        current = None if ids is None else frozenset(ids)
        if current == self._told and now - self._told_at < SERVING_POLL_S:
            return
        try:
            if self._hub is None:
                self._hub = serve.get_deployment_handle("StateHub", app_name=APP_NAME)
            self._hub.set_routable.remote(None if current is None else sorted(current)).result(timeout_s=5)
        except Exception as err:  # the app is not deployed yet, or the hub is being replaced
            log.debug("routable replicas not passed to the hub: %s", err)
            return
        self._told, self._told_at = current, now


def _shutdown(cfg: FactoryConfig, joined: bool) -> None:
    import ray
    from ray import serve

    # A second signal during shutdown should not interrupt the drain half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = psutil.Process(os.getpid())
    _drain(cfg.server.drain_timeout_s)
    try:
        if joined:
            serve.delete(APP_NAME)  # leave the shared cluster's Serve running for others
        else:
            serve.shutdown()
    except Exception as err:
        log.warning("serve shutdown: %s", err)
    descendants = me.children(recursive=True)
    ray.shutdown()
    _reap(descendants)
    log.info("stopped")


def _drain(timeout_s: float) -> None:
    """Refuse new requests, then wait until the replicas report none in flight."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    try:
        hub = serve.get_deployment_handle("StateHub", app_name=APP_NAME)
        hub.start_draining.remote().result(timeout_s=10)
        while time.monotonic() < deadline:
            in_flight = hub.in_flight.remote().result(timeout_s=10)
            if in_flight == 0:
                log.info("drained: no request in flight")
                return
            time.sleep(0.25)
        log.warning("drain timeout (%.0fs): stopping with requests still in flight", timeout_s)
    except Exception as err:  # app never came up, or is already gone: nothing to drain
        log.info("nothing to drain (%s)", type(err).__name__)


def _reap(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """Ray stops its own processes; anything it left (engine workers) is ended here."""
    alive = [p for p in procs if p.is_running()]
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def supervise(cfg: FactoryConfig) -> int:
    """Run the launcher in its own session and relay SIGINT/SIGTERM to it as SIGTERM."""
    child = subprocess.Popen([sys.executable, "-m", "factory.launcher", cfg.model_dump_json()], start_new_session=True)

    def relay(signum, _frame) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, relay)
    return child.wait()  # PEP 475: a relayed signal does not interrupt the wait


def setup_logging(level: str) -> None:
    """Our own handler on the `factory` logger: Ray restyles the root logger in its processes."""
    logger = logging.getLogger("factory")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


if __name__ == "__main__":
    _cfg = parse_config(json.loads(sys.argv[1]), origin="factory serve")
    setup_logging(_cfg.log_level)
    sys.exit(serve_forever(_cfg))
