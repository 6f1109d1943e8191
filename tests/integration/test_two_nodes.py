"""Beyond one machine: a real two-node Ray cluster (tests/cluster.py: the worker's raylet in a
network namespace with its own address), the factory started on it with `--address` as the README
says, a tiny-model replica on each node, the ledger on PostgreSQL. Both nodes serve and are listed
by /metrics and the dashboard; a budget set for one node caps that node's replica down to it and
leaves the other node's alone; the worker node killed under load costs no 500, no dropped
connection and no lost row (its requests in flight go again to the head's replica); the head
serves on, though at times only after a stall of 13-15 s (open); the node rejoining gets its
replica back."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from factory.metering.ledger import Ledger
from tests.cluster import TwoNodeCluster
from tests.conftest import TINY_MODEL, bearer, tiny_model
from tests.support import FactoryProcess, free_port, write_config

pytestmark = pytest.mark.stack

RESERVATION_TTL_S = 8  # the killed node's reservations are released this long after it died
BACK_WITHIN_S = 240


def _metrics_nodes(base_url: str) -> dict[str, str]:
    """replica -> node, from the factory's /metrics (factory_replica_node)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    placed = {}
    for line in text.splitlines():
        if line.startswith("factory_replica_node{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            placed[labels["replica"].strip('"')] = labels["node"].strip('"')
    return placed


def _wait_for_nodes(base_url: str, n: int, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            placed = _metrics_nodes(base_url)
            if len(set(placed.values())) >= n:
                return placed
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"replicas on {n} nodes not reported within {timeout_s} s: {placed}")


def _load(base_url: str, key: str, answers: list, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=60) as c:
        while not stop.is_set():
            body = {"model": TINY_MODEL, "prompt": [rng.randint(1, 400) for _ in range(3)],
                    "max_tokens": rng.randint(2, 16), "ignore_eos": True}  # fmt: skip
            try:
                r = c.post("/v1/completions", json=body)
            except httpx.HTTPError as err:
                answers.append((time.monotonic(), "transport", repr(err), None, 0, None))
                time.sleep(0.2)
                continue
            ok = r.status_code == 200
            used = r.json()["usage"]["total_tokens"] if ok else 0
            answers.append((time.monotonic(), r.status_code, "" if ok else r.text, r.headers.get("retry-after"),
                            used, r.headers.get("x-factory-request-id")))  # fmt: skip
            if not ok:
                time.sleep(0.2)


def _node_budget_is_held_on_its_node_only(base_url: str, admin: str, placed: dict[str, str]) -> None:
    """Under load: the dashboard lists both nodes; a budget for one node below what its replica
    draws caps that replica and holds the node's power near the budget, the other node's
    replica uncapped; the budget lifted again."""
    auth = bearer(admin)
    doc = httpx.get(base_url + "/dashboard/api/state", headers=auth, timeout=30).json()
    assert {n["node"] for n in doc["nodes"]} == set(placed.values()), doc["nodes"]
    node = sorted(set(placed.values()))[0]
    mine = {r for r, n in placed.items() if n == node}
    budget_w = 50.0  # modeled power here: 40 W idle + 80 W x busy; a replica under load draws more
    r = httpx.put(base_url + "/admin/power/budget", json={"nodes": {node: budget_w}}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    try:
        deadline, held = time.monotonic() + 30, []
        while time.monotonic() < deadline and len(held) < 6:
            time.sleep(1)
            rows = httpx.get(base_url + "/admin/power", headers=auth, timeout=30).json()["replicas"]
            capped = {row["replica"]: row["cap_w"] for row in rows if row["live"] and row["cap_w"] is not None}
            if set(capped) == mine:  # the node's replica capped, the other node's not
                held.append(sum(row["power_w"] for row in rows if row["replica"] in mine))
            assert all(placed.get(rep) == node for rep in capped), (capped, placed)
        assert len(held) == 6, f"node budget not applied to {mine} only within 30 s: {rows}"
        print(f"node budget {budget_w:.0f} W on {node[:12]}: its replica drew {[round(w, 1) for w in held]} W")
        # After the duty controller's first seconds: the node holds its budget (average, 10 % slack).
        assert sum(held[2:]) / len(held[2:]) <= budget_w * 1.1, held
        doc = httpx.get(base_url + "/dashboard/api/state", headers=auth, timeout=30).json()
        assert {n["node"]: n["budget_w"] for n in doc["nodes"]}[node] == budget_w
    finally:
        httpx.put(base_url + "/admin/power/budget", json={}, headers=auth, timeout=30)


def test_two_nodes_serve_lose_a_node_under_load_and_get_it_back(
    postgres, pg_url, tiny_model_dir, tmp_path, monkeypatch
):
    with Ledger(pg_url) as ledger:
        ledger.create_tenant("fleet")
        _, key = ledger.create_key("fleet")
        _, admin = ledger.create_key(None, admin=True)
        ledger.grant_package("fleet", 10_000_000)
    cluster = TwoNodeCluster(tmp_path / "cluster", head_cpus=1, worker_cpus=1)
    (tmp_path / "cluster").mkdir()
    monkeypatch.setenv("RAY_AUTH_MODE", cluster.env["RAY_AUTH_MODE"])  # `factory serve --address` joins it
    port = free_port()
    config = write_config(
        tmp_path / "factory.yaml",
        port=port,
        # Two sequences a replica: the energy router fills one replica before it uses the next, so the
        # load's 4 clients need both nodes.
        models=[tiny_model(tiny_model_dir, replicas=2, replica_num_cpus=1, max_num_seqs=2)],
        # Every node's HAProxy reaches every replica, and a replica listens on server.host: a
        # loopback host would hide each node's replicas from the others (the README says so).
        server={"port": port, "drain_timeout_s": 30, "host": "0.0.0.0"},
        auth="required",
        ledger={"url": pg_url, "reservation_ttl_s": RESERVATION_TTL_S},
        ray={"address": cluster.address},
    )
    answers: list = []
    stop = threading.Event()
    factory = None
    try:
        cluster.start()
        assert cluster.nodes_alive() == 2
        factory = FactoryProcess(config, tmp_path / "serve.log", port)
        factory.wait_ready()
        placed = _wait_for_nodes(factory.base_url, 2, 60)
        clients = [threading.Thread(target=_load, args=(factory.base_url, key, answers, stop, i)) for i in range(4)]
        for t in clients:
            t.start()
        time.sleep(8)
        with Ledger(pg_url) as ledger:
            served_by = {u.replica for u in ledger.usage(tenant="fleet")}
        assert {placed[r] for r in served_by if r in placed} == set(placed.values()), (served_by, placed)
        _node_budget_is_held_on_its_node_only(factory.base_url, admin, placed)

        cluster.kill_worker()
        killed = time.monotonic()
        time.sleep(15)
        stop.set()
        for t in clients:
            t.join(90)
        cluster.start_worker()
        back = _wait_for_nodes(factory.base_url, 2, BACK_WITHIN_S)
        print(f"worker node back with its replica {time.monotonic() - killed:.0f} s after it was killed")
        assert len(set(back.values()) - set(placed.values())) == 1, "the rejoined node is not a new Ray node"
        time.sleep(max(0.0, killed + RESERVATION_TTL_S - time.monotonic()))
        with Ledger(pg_url) as ledger:
            ledger.release_expired()  # as the ledger service does every minute
            rows = {u.request_id: u for u in ledger.usage(tenant="fleet")}
            balance = ledger.balance("fleet")
    finally:
        stop.set()
        if factory is not None:
            try:
                factory.stop()
            finally:
                factory.kill_everything()
        cluster.stop()

    bad = [(round(a[0] - killed, 2), *a[1:3]) for a in answers if a[1] not in (200, 503)]
    assert not bad, bad[:5]
    for a in answers:
        if a[1] == 503:
            assert a[3] is not None, a
    timeline = [(round(a[0] - killed, 1), a[1]) for a in answers if a[0] > killed - 1]
    refused = sum(1 for a in answers if a[0] > killed and a[1] == 503)
    gap = max((b[0] - a[0] for a, b in zip(timeline, timeline[1:], strict=False)), default=None)
    print(f"after the worker node died: {len(timeline)} answers, {refused} x 503, longest gap {gap} s")
    # The head serves on. Measured: in 2 of 4 runs no gap over 0.3 s; in the other 2 every request
    # waited 13-15 s, until Serve declared the lost replica dead (not understood yet: issue 18).
    # Bounded here at what Serve's own detection takes, so a longer stall fails.
    assert gap is not None and gap < 25.0 and timeline[-1][0] > 14, f"the head stalled: {timeline}"
    missing = [a[5] for a in answers if a[1] == 200 and a[5] not in rows]
    assert not missing, f"{len(missing)} served requests have no usage row"
    assert balance["reserved"] == 0, "the lost node's reservations were not released"
    assert balance["used"] == sum(u.prompt_tokens + u.completion_tokens for u in rows.values())
