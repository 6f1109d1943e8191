"""The RayService in configs/kuberay/ is one KubeRay accepts and one that deploys what `factory
serve` would: checked against KubeRay v1.7.0's CRD (tests/data/kuberay/) and the operator's own
rules, and against the factory's config parser, serve environment and image. No cluster, no
network, no Ray started.

Not covered: the CRD's CEL rules (3, on `managedBy` and `gcsFaultToleranceOptions`, which the
manifest does not set), the operator's rules beyond those mirrored in `operator_errors`, and
whether the pods start and serve: no cluster has run the manifest.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private import ray_constants
from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from factory.config import FactoryConfig, parse_config
from factory.launcher import APP_NAME
from factory.ray_seams import PINNED_RAY, SETUP_HOOK, serve_environment

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "configs" / "kuberay").glob("*.yaml"))
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
# Where Dockerfile.cuda puts the repository in the image (WORKDIR /app, COPY configs ./configs).
IMAGE_WORKDIR = Path("/app")
# ray-operator/controllers/ray/utils/constant.go, v1.7.0: MaxRayClusterNameLength - 6.
MAX_RAYSERVICE_NAME = 47
SERVE_PORTS = {  # serve_environment's `ports` and the variables that carry them
    "stats": "RAY_SERVE_HAPROXY_STATS_PORT",
    "metrics": "RAY_SERVE_HAPROXY_METRICS_PORT",
    "fallback_http": "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "fallback_grpc": "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
}


# -- the CRD, as the API server applies it ---------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD's schema with the API server's semantics made explicit for a JSON-schema validator:
    a field the schema does not declare is an error (`kubectl apply` asks for strict field
    validation by default; without it the server drops the field in silence, the same mistake
    deployed), and `nullable` admits null. int-or-string fields come with controller-gen's
    `anyOf: [integer, string]`, which the validator applies; list types are checked by
    `_list_type`; the other `x-kubernetes-*` keywords are not checked."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, kind, instance, schema):
    """`x-kubernetes-list-type`: a `set` holds no item twice, a `map` no two items with the same
    `x-kubernetes-list-map-keys` (a key left out counts as its default, as the server defaults it)."""
    if not validator.is_type(instance, "array") or kind not in ("set", "map"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if kind == "set":
            key = json.dumps(item, sort_keys=True)
        elif isinstance(item, dict):
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in schema["x-kubernetes-list-map-keys"])
        else:
            continue
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list-type {kind}")
        seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


@pytest.fixture(scope="module")
def crd() -> jsonschema.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB
    doc = yaml.load(CRD.read_text(), Loader=loader)
    assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return K8sValidator(_strict(v1["schema"]["openAPIV3Schema"]))


def crd_errors(crd: jsonschema.Validator, svc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd.iter_errors(svc))


def operator_errors(svc: dict) -> list[str]:
    """The operator's own checks of a RayService that this manifest could trip (v1.7.0,
    ray-operator/controllers/ray/utils/validation.go)."""
    errors = []
    name = svc["metadata"]["name"]
    if len(name) > MAX_RAYSERVICE_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r} is not a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters")
    cluster = svc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for g in groups:
        if not g["template"]["spec"].get("containers"):
            errors.append("a group has no container")
        starts = g.get("rayStartParams", {})
        if g.get("resources") and any(starts.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append("resources set both in rayStartParams and in the group's resources")
        if "labels" in starts:
            errors.append("rayStartParams['labels'] is not supported")
    for g in cluster.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not cluster.get("enableInTreeAutoscaling") and (lo is None or hi is None):
            errors.append(f"worker group {g['groupName']} needs minReplicas and maxReplicas without autoscaling")
        elif lo is not None and hi is not None and not 0 <= lo <= hi:
            errors.append(f"worker group {g['groupName']}: minReplicas {lo} > maxReplicas {hi}")
    if cluster.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(p) for p in cluster.get("rayVersion", "0").split(".")[:3])
        if version < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion 2.52.0 or later")
    return errors


# -- the manifest ------------------------------------------------------------------------------


def _rayservices() -> list[tuple[str, dict]]:
    found = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayService":
                found.append((path.name, doc))
    return found


RAYSERVICES = _rayservices()
IDS = [name for name, _ in RAYSERVICES]


def _serve_config(svc: dict) -> dict:
    return yaml.safe_load(svc["spec"]["serveConfigV2"])


def _factory_config(svc: dict) -> FactoryConfig:
    (app,) = _serve_config(svc)["applications"]
    return parse_config(app["args"]["config"], origin="serveConfigV2")


def _head(svc: dict) -> dict:
    return svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _workers(svc: dict) -> list[tuple[dict, dict]]:
    """(worker group, its Ray container) pairs; KubeRay runs Ray in a pod's first container."""
    groups = svc["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    return [(g, g["template"]["spec"]["containers"][0]) for g in groups]


def _ray_containers(svc: dict) -> list[dict]:
    return [_head(svc)] + [c for _, c in _workers(svc)]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_there_is_a_rayservice_to_check():
    assert RAYSERVICES, f"no RayService in {[str(p) for p in MANIFESTS]}"


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_kuberays_crd_and_operator_accept_it(crd, svc):
    assert crd_errors(crd, svc) == []
    assert operator_errors(svc) == []


def _misspell_a_field(svc):
    c = _head(svc)
    c["imagePullpolicy"] = c.pop("imagePullPolicy")


def _unquote_an_env_value(svc):
    _env(_head(svc))["RAY_SERVE_ENABLE_HA_PROXY"]["value"] = 1


def _repeat_an_env_name(svc):
    _head(svc)["env"].append({"name": "PGPASSWORD", "value": "x"})


def _bound_replicas_the_wrong_way(svc):
    group = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 3, 2  # the CRD has no rule for this; the operator does


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (_misspell_a_field, "'imagePullpolicy' was unexpected"),
        (_unquote_an_env_value, "1 is not of type 'string'"),
        (_repeat_an_env_name, "duplicate entry ('PGPASSWORD',)"),
        (_bound_replicas_the_wrong_way, "minReplicas 3 > maxReplicas 2"),
    ],
    ids=["misspelt field", "env value not a string", "env name twice", "min above max replicas"],
)
def test_the_checks_catch_a_broken_manifest(crd, mistake, expected):
    svc = copy.deepcopy(RAYSERVICES[0][1])
    mistake(svc)
    found = crd_errors(crd, svc) + operator_errors(svc)
    assert any(expected in e for e in found), found


# -- what it deploys is what `factory serve` deploys -------------------------------------------


def _builder_params(import_path: str) -> list[str]:
    """The parameters of the builder an import path names, read from source: importing
    factory.app would import vLLM (~13 s)."""
    module, func = import_path.split(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
    return [a.arg for a in node.args.args]


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_serve_config_builds_the_factory_app_from_its_config(svc):
    serve_cfg = _serve_config(svc)
    ServeDeploySchema.model_validate(serve_cfg)  # what Serve's REST API, KubeRay's client, takes
    (app,) = serve_cfg["applications"]
    # Serve ignores keys it does not know: a misspelt one would deploy its default in silence.
    assert set(serve_cfg) <= set(ServeDeploySchema.model_fields)
    assert set(serve_cfg["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert (app["name"], app["route_prefix"], app["import_path"]) == (APP_NAME, "/", "factory.app:build")
    assert _builder_params(app["import_path"]) == ["args"]  # Serve passes args as one dict
    assert set(app["args"]) == {"config"}  # build() resolves models and counts GPUs itself
    cfg = _factory_config(svc)
    http = serve_cfg["http_options"]
    # `factory serve` starts Serve with these from the config (launcher.serve_forever).
    assert (http["host"], http["port"], http["request_timeout_s"]) == (
        cfg.server.host,
        cfg.server.port,
        cfg.server.request_timeout_s,
    )
    # Every node's HAProxy sends requests to every replica: a loopback host would hide them.
    assert not cfg.server.is_loopback
    assert cfg.auth == "required"


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_gpu_workers_hold_exactly_the_replicas_the_config_asks_for(svc):
    cfg = _factory_config(svc)
    # The application may be built before the GPU workers join: `auto` would then choose CPU.
    assert all(m.device == "cuda" for m in cfg.models)
    gpus = 0
    for group, container in _workers(svc):
        per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert per_pod >= 1, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus += per_pod * group["replicas"]
    assert gpus == sum(m.replicas * m.tensor_parallel_size for m in cfg.models)
    assert "nvidia.com/gpu" not in _head(svc).get("resources", {}).get("limits", {})


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_every_pod_has_the_launchers_serve_switches_and_setup_hook(svc):
    cfg = _factory_config(svc)
    head_env = _env(_head(svc))
    ports = {key: int(head_env[var]["value"]) for key, var in SERVE_PORTS.items()}
    energy = cfg.routing.policy == "energy"
    expected = serve_environment(
        request_timeout_s=cfg.server.request_timeout_s,
        route_body_limit_bytes=cfg.routing.body_limit_kib * 1024 if energy else None,
        ports=ports,
    )
    for container in _ray_containers(svc):
        env = _env(container)
        serve_vars = {k: e.get("value") for k, e in env.items() if k.startswith("RAY_SERVE_")}
        assert serve_vars == expected, container["name"]
        # Read by every Ray worker process at start (ray/_private/workers/default_worker.py).
        assert env[ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR]["value"] == SETUP_HOOK, container["name"]


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_pods_expose_the_api_port_and_workers_are_ready_without_wget(svc):
    cfg = _factory_config(svc)
    # KubeRay's <name>-serve-svc sends clients to the container port named `serve`.
    for container in _ray_containers(svc):
        assert {"containerPort": cfg.server.port, "name": "serve"} in container["ports"], container["name"]
    assert cfg.server.port == 8000
    for _, container in _workers(svc):
        probe = container["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == ("/-/healthz", cfg.server.port)


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_the_ledger_password_comes_from_a_secret_to_the_head_alone(svc):
    cfg = _factory_config(svc)
    assert cfg.ledger.url is not None and cfg.ledger.url.startswith("postgresql://")
    head_env = _env(_head(svc))
    password = head_env["PGPASSWORD"]
    assert "value" not in password
    assert set(password["valueFrom"]["secretKeyRef"]) >= {"name", "key"}
    # `kubectl exec` ledger commands on the head reach the ledger the server uses.
    assert head_env["FACTORY_LEDGER"]["value"] == cfg.ledger.url
    for _, container in _workers(svc):
        assert "PGPASSWORD" not in _env(container)
    for container in _ray_containers(svc):
        for name, entry in _env(container).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", name) and not name.startswith("__RAY"):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{container['name']}: {name} is not from a Secret"


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_pods_run_the_image_the_readme_builds(svc):
    readme = (REPO / "README.md").read_text()
    dockerfile = (REPO / "Dockerfile.cuda").read_text()
    build = re.compile(r"docker build -f Dockerfile\.cuda -t (\S+) \.")
    tags = set(build.findall(readme)) | set(build.findall(dockerfile))
    assert len(tags) == 1, tags
    (tag,) = tags
    assert {c["image"] for c in _ray_containers(svc)} == {tag}
    # A scheduler profile given as a path inside the image is a file of this repository there.
    profile = _factory_config(svc).scheduler.profile
    if profile not in (None, "auto") and Path(profile).is_absolute():
        assert f"WORKDIR {IMAGE_WORKDIR}" in dockerfile and "COPY configs ./configs" in dockerfile
        assert (REPO / Path(profile).relative_to(IMAGE_WORKDIR)).is_file(), profile


@pytest.mark.parametrize("svc", [s for _, s in RAYSERVICES], ids=IDS)
def test_the_cluster_runs_the_pinned_ray_and_outlives_its_longest_request(svc):
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == PINNED_RAY == ray.__version__
    # After an upgrade the old cluster is deleted this long after traffic left it.
    assert svc["spec"]["rayClusterDeletionDelaySeconds"] >= _factory_config(svc).server.request_timeout_s
