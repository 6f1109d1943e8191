"""Every Ray Serve internal the factory's data path relies on, in one place, for ray==2.60.0.

Ray Serve ships what the factory needs for one native hop per request: HAProxy in front of
ingress replicas that serve HTTP themselves ("direct ingress"), and an ingress request router
that HAProxy asks once per request which replica to pin it to. Parts of that are marked
internal or experimental in 2.60, so each one we touch is named here and nowhere else, and
tests/unit/test_ray_seams.py fails when an upgrade moves any of them:

- the environment switches below, read by Serve's controller, HAProxy manager and replicas
  when they import `ray.serve._private.constants`;
- `Application._with_ingress_request_router` ("internal-only, unstable hook");
- `DeploymentHandle.choose_replica(..., _reserve=False)`: run the deployment's request router
  and return its pick without sending anything (the request goes out through HAProxy);
- the `/internal/route` contract of HAProxy's Lua action: POST with the request body (when
  forwarded), answer 200 with a flat JSON object whose `replica_id` is the replica's full id;
- the late-bound ASGI app of an ingress replica (`__serve_build_asgi_app__`, ray.serve.ingress);
- HAProxy's stats page (`/stats;csv` on RAY_SERVE_HAPROXY_STATS_PORT) and the names Serve gives
  replicas there (`SERVE_REPLICA::app#deployment#id` made HAProxy-safe): what HAProxy routes to;
- the error file HAProxy answers its own 502/503/504 with, which Serve writes as a plain-text 500
  (`HAProxyApi._initialize_directories_and_error_files`): the factory's is an OpenAI-shaped 503
  with Retry-After, installed by a worker-process setup hook (`SETUP_HOOK`);
- under KubeRay (configs/kuberay/), where no `ray.init` of ours passes that hook, the variable
  Ray's workers read it from at start (`ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR`,
  `__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR`) in every pod's environment; tests/unit/test_kuberay.py
  fails if the manifest and Ray's constant part.
"""

from __future__ import annotations

import csv
import io
import json
import urllib.request
from typing import Any

from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

PINNED_RAY = "2.60.0"

# The Lua action's path and the field it reads the pick from (ingress_request_router.lua.tmpl).
ROUTE_PATH = "/internal/route"
ROUTE_REPLICA_FIELD = "replica_id"
# A pick HAProxy cannot map to a server ("unknown_replica_id"): its template then sends the
# request to Serve's fallback proxy, which holds it until a replica is up, as at cold start.
# Any other router failure is HAProxy's own plain-text 503, without Retry-After.
NO_REPLICA = "none"
# HAProxy sets this header when a body was cut at its buffer size before being forwarded.
BODY_TRUNCATED_HEADER = "x-body-truncated"
# HAProxy's stats page (haproxy.py HAProxyConfig.stats_uri) and a replica's server name on it.
STATS_CSV_PATH = "/stats;csv"
REPLICA_SERVER_PREFIX = "SERVE_REPLICA_"

# Run by Ray in every process of the factory's job (ray.init's runtime_env), Serve's HAProxy
# manager among them: see install_haproxy_error_page.
SETUP_HOOK = "factory.ray_seams.install_haproxy_error_page"
HAPROXY_ERROR_RETRY_AFTER_S = 2


def haproxy_error_page() -> bytes:
    """The whole HTTP response HAProxy sends when it cannot get an answer from any replica: none
    up yet, every retry spent, or the replica lost before it answered (its node died). A client
    should come back, so a 503 with Retry-After in OpenAI's error shape, not Serve's text 500."""
    from factory.api.errors import error_body

    message = (
        "No replica could answer the request (one is starting, restarting or was lost). "
        f"Retry after {HAPROXY_ERROR_RETRY_AFTER_S} s."
    )
    body = json.dumps(error_body(503, message, code="replica_unavailable"), separators=(",", ":")).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {HAPROXY_ERROR_RETRY_AFTER_S}\r\n"
        "Cache-Control: no-cache\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def install_haproxy_error_page() -> None:
    """Ray's worker-process setup hook (SETUP_HOOK): make Serve's HAProxy manager, when it writes
    the error file HAProxy answers its own 502/503/504 with, write ours over Serve's 500."""
    from ray.serve._private import haproxy

    write_serves = haproxy.HAProxyApi._initialize_directories_and_error_files
    if getattr(write_serves, "factory_page", False):
        return

    def write_ours(self) -> None:
        write_serves(self)
        with open(self.cfg.error_file_path, "wb") as f:
            f.write(haproxy_error_page())

    write_ours.factory_page = True
    haproxy.HAProxyApi._initialize_directories_and_error_files = write_ours


def serve_environment(
    *,
    request_timeout_s: float,
    route_body_limit_bytes: int | None,
    ports: dict[str, int],
    drain_period_s: float = 3.0,
) -> dict[str, str]:
    """The environment Ray's Serve processes need for the factory's data path.

    Set before Ray starts (a local cluster) or passed as the job's runtime environment (a joined
    one); Serve reads these once, at import, in the controller, the HAProxy manager and every
    replica.

    - HAProxy in place of Serve's Python proxy; it forces direct ingress, so each engine replica
      runs its own HTTP server and HAProxy forwards client connections to it.
    - User code on the replica's main event loop: with Serve's default separate thread, every
      streamed chunk crossed threads and the engine served 0.90x stock vLLM's tokens/s at
      concurrency 32 on the 2-core machine; on the main loop 1.00x (README, "Measured").
    - The request body forwarded to the router (prefix affinity and the `model` field need it),
      buffered up to `route_body_limit_bytes`; `None` forwards no body (HAProxy balances alone).
    - hard-stop-after outlives the longest request: every change of the replica set reloads
      HAProxy, and the old process cuts the streams it still carries at hard-stop-after
      (ray-project/ray #66056; 120 s by default, shorter than a long answer). A stream the old
      process carries began before the reload, so it ends (at the latest, by the request
      timeout) before the old process stops, request_timeout_s + 5 s after the reload.
    - Replicas being replaced keep their listener `drain_period_s` (Serve's default is 30 s), long
      enough for HAProxy's reload to stop sending them new requests; the launcher drains in-flight
      requests itself before Serve shuts down.
    - HAProxy's stats page and Prometheus exporter, and Serve's fallback proxy (which takes
      requests while no replica is up, as when scaling from zero), on ports of our choosing:
      `ports` = {"stats", "metrics", "fallback_http", "fallback_grpc"} (two factories on one host
      would otherwise both bind 8404, 9101, 8500 and 9500).
    """
    timeout = str(int(request_timeout_s) + 1)
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(int(request_timeout_s) + 5),
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": timeout,
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": timeout,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(drain_period_s),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ports["stats"]),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports["metrics"]),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports["fallback_http"]),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports["fallback_grpc"]),
        # Per-request access lines through Ray's log pipeline cost CPU the engine needs.
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # A replica lost while answering (its node died) closes HAProxy's connection with nothing
        # sent back: HAProxy then hung up on the client. Sent again to another replica instead: the
        # lost attempt was never settled, so its reservation expires and nobody pays for it twice.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    }
    if route_body_limit_bytes is not None:
        env["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] = "1"
        env["RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE"] = str(route_body_limit_bytes)
    return env


def haproxy_replicas(stats_port: int, app: str, deployment: str, timeout_s: float = 1.0) -> set[str] | None:
    """The ids of `deployment`'s replicas that this node's HAProxy routes to and holds up (a
    replica Serve runs but HAProxy's config has not reached yet is not among them); None when the
    stats page cannot be read (no HAProxy on this node yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}{STATS_CSV_PATH}", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return None
    prefix = f"{REPLICA_SERVER_PREFIX}{app}-{deployment}-"
    up = set()
    for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
        name, status = row.get("svname") or "", row.get("status") or ""
        if name.startswith(prefix) and (status.startswith("UP") or status == "no check"):
            up.add(name[len(prefix) :])
    return up


def with_ingress_request_router(ingress: Application, router: Application) -> Application:
    """Attach `router` as the deployment HAProxy asks which `ingress` replica takes a request."""
    return ingress._with_ingress_request_router(router)


async def pick_replica(handle: DeploymentHandle, *args: Any) -> str:
    """Run `handle`'s deployment request router on `args` and return the chosen replica's full id
    (what HAProxy's Lua action maps to a server). Nothing is sent and no slot is reserved."""
    async with handle.choose_replica(*args, _reserve=False) as selection:
        return selection._replica.replica_id.to_full_id_str()


def init_handle(handle: DeploymentHandle) -> None:
    """Start the handle's router now, so the first request does not pay for it."""
    handle._init()
