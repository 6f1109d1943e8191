"""Every Ray Serve internal factory/ray_seams.py relies on is still where it was: an upgrade of Ray
that moves one fails here, not in production."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import ray.serve
import ray.serve._private.constants as serve_constants
from ray.serve._private import router as serve_router
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from factory import ray_seams

SERVE_PRIVATE = Path(serve_constants.__file__).parent
PORTS = {"stats": 1001, "metrics": 1002, "fallback_http": 1003, "fallback_grpc": 1004}


def test_the_installed_ray_is_the_pinned_one():
    assert importlib.metadata.version("ray") == ray_seams.PINNED_RAY


def test_every_switch_the_factory_sets_is_one_serve_reads():
    env = ray_seams.serve_environment(request_timeout_s=300, route_body_limit_bytes=262144, ports=PORTS)
    source = Path(serve_constants.__file__).read_text()
    for name in env:
        assert f'"{name}"' in source, f"Ray Serve no longer reads {name}"


def test_the_environment_outlives_the_longest_request_and_uses_the_given_ports():
    env = ray_seams.serve_environment(request_timeout_s=300.0, route_body_limit_bytes=None, ports=PORTS)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert int(env["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"]) > 300
    assert int(env["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"]) > 300
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "1001"
    assert env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] == "1004"
    # No body forwarded: HAProxy neither buffers it nor sends it to the router.
    assert "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY" not in env
    forwarded = ray_seams.serve_environment(request_timeout_s=60, route_body_limit_bytes=4096, ports=PORTS)
    assert forwarded["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] == "1"
    assert forwarded["RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE"] == "4096"


def test_the_ingress_request_router_hook_exists():
    assert callable(getattr(Application, "_with_ingress_request_router", None))
    params = inspect.signature(Application._with_ingress_request_router).parameters
    assert len(params) >= 2  # self, the router application


def test_choose_replica_still_has_the_pick_only_opt_out():
    assert "choose_replica" in vars(DeploymentHandle)
    assert hasattr(DeploymentHandle, "_init")
    # The router pops `_reserve` from the request kwargs: pick without holding a slot.
    assert 'request_kwargs.pop("_reserve", True)' in inspect.getsource(serve_router)
    selection = inspect.getsource(serve_router)
    assert "replica_id=replica.replica_id.unique_id" in selection and "_replica=replica" in selection


def test_the_lua_action_speaks_the_contract_the_factory_router_answers():
    lua = (SERVE_PRIVATE / "ingress_request_router.lua.tmpl").read_text()
    assert f"POST {ray_seams.ROUTE_PATH} HTTP/1.0" in lua
    assert f'"{ray_seams.ROUTE_REPLICA_FIELD}"' in lua
    assert ray_seams.BODY_TRUNCATED_HEADER.lower() in lua.lower()


def test_a_pick_haproxy_cannot_map_goes_to_the_fallback_proxy():
    from ray.serve._private import haproxy_templates

    lua = (SERVE_PRIVATE / "ingress_request_router.lua.tmpl").read_text()
    assert '"unknown_replica_id"' in lua
    template = inspect.getsource(haproxy_templates)
    assert 'use-server {{ backend.fallback_server.name }} if { var(txn.ingress_request_router_failed) -m str "unknown_replica_id" }' in template
    assert ray_seams.NO_REPLICA.startswith(ray_seams.REPLICA_SERVER_PREFIX) is False


def test_an_ingress_may_build_its_asgi_app_late():
    assert "__serve_build_asgi_app__" in inspect.getsource(ray.serve.api)


STATS_CSV = """# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight
http_frontend,FRONTEND,,,0,1,,1,0,0,0,0,0,,,,,OPEN,
http-factory,SERVE_REPLICA_factory-FactoryEngine-up1,0,0,0,1,,1,0,0,,0,,0,0,0,0,UP,1
http-factory,SERVE_REPLICA_factory-FactoryEngine-down1,0,0,0,1,,1,0,0,,0,,0,0,0,0,DOWN,1
http-factory,SERVE_REPLICA_factory-FactoryEngine-going,0,0,0,1,,1,0,0,,0,,0,0,0,0,UP 1/2,1
http-factory,SERVE_REPLICA_factory-FactoryRouter-rtr,0,0,0,1,,1,0,0,,0,,0,0,0,0,UP,1
http-factory,SERVE_PROXY_ACTOR-fallback-abc,0,0,0,1,,1,0,0,,0,,0,0,0,0,UP,1
http-factory,BACKEND,0,0,0,1,,1,0,0,0,0,,0,0,0,0,UP,1
"""


def test_haproxy_replicas_reads_the_stats_page():
    import http.server
    import threading

    class Stats(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = STATS_CSV.encode() if self.path == ray_seams.STATS_CSV_PATH else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert ray_seams.haproxy_replicas(port, "factory", "FactoryEngine") == {"up1", "going"}
    finally:
        server.shutdown()
        server.server_close()
    assert ray_seams.haproxy_replicas(port, "factory", "FactoryEngine") is None  # nothing listening


def test_haproxy_names_replicas_and_serves_stats_where_the_factory_reads_them():
    from ray.serve._private import common, haproxy

    assert haproxy.HAProxyConfig.__dataclass_fields__["stats_uri"].default + ";csv" == ray_seams.STATS_CSV_PATH
    full = "SERVE_REPLICA::factory#FactoryEngine#abc123"
    assert common.REPLICA_ID_FULL_ID_STR_PREFIX == "SERVE_REPLICA::"
    assert haproxy.HAProxyManager.get_safe_name(full) == ray_seams.REPLICA_SERVER_PREFIX + "factory-FactoryEngine-abc123"


def test_haproxy_answers_its_own_errors_with_the_factorys_openai_shaped_503(tmp_path):
    """The setup hook makes Serve's HAProxy manager write our error file where Serve writes its
    text 500; a real HAProxy with no live server then answers every request with it."""
    import json
    import subprocess
    import time

    import httpx
    from ray.serve._private import haproxy

    from tests.support import free_port

    assert callable(haproxy.HAProxyApi._initialize_directories_and_error_files)
    ray_seams.install_haproxy_error_page()
    ray_seams.install_haproxy_error_page()  # twice (every process of the job runs it): still one page
    cfg = haproxy.HAProxyConfig(socket_path=str(tmp_path / "run" / "admin.sock"))
    api = haproxy.HAProxyApi(cfg, config_file_path=str(tmp_path / "cfg" / "haproxy.cfg"))
    page = Path(api.cfg.error_file_path).read_bytes()
    assert page == ray_seams.haproxy_error_page()

    # Serve's template points 502, 503 and 504 at that file; so does this minimal config.
    port, dead = free_port(), free_port()
    config = tmp_path / "mini.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n"
        "  retries 1\n  option redispatch 1\n"
        + "".join(f"  errorfile {code} {api.cfg.error_file_path}\n" for code in (502, 503, 504))
        + f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
        + f"backend b\n  server gone 127.0.0.1:{dead}\n"
    )
    proc = subprocess.Popen([haproxy.get_haproxy_binary(), "-f", str(config)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m"}, timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert r.status_code == 503
    assert r.headers["retry-after"] == str(ray_seams.HAPROXY_ERROR_RETRY_AFTER_S)
    error = json.loads(r.content)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "replica_unavailable")
