"""The power governor: one actor (a one-replica Serve deployment) that holds the site, node and
per-GPU power budgets and turns the replicas' power reports into caps and admission levels.

    replica --exchange(report, version)--> governor --(new control, at once on a change)--> replica
        replica --ZeroMQ control socket--> its engine's scheduler (applied at the next step)
    replica --admission(version)--> governor: which priority classes are slowed or shed

Both calls are long polls: the governor answers as soon as something changed for the caller, or
after a short wait with nothing new, so a budget change reaches every engine in one hop without
the governor knowing any replica's address. Budgets change at run time (`PUT
/admin/power/budget`, `factory power budget --site 30kW`): demand response.

The decisions themselves are pure code (factory/policy/throttle.py); this class keeps state,
timestamps and versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from factory.policy.throttle import LEVEL_NAMES, Admission, Budgets, Decision, ReplicaPower, ThrottlePolicy

log = logging.getLogger("factory.power")

# A replica call waits this long for a change before it returns with nothing new (and reports again).
EXCHANGE_WAIT_S = 0.5
ADMISSION_WAIT_S = 2.0
# A replica silent this long is left out of the budget split (it is gone or restarting).
STALE_AFTER_S = 3.0
# Caps closer than this to the one in force are not resent (W).
CAP_RESEND_W = 0.5


class PowerGovernor:
    def __init__(self, budgets: dict[str, Any], governor: dict[str, Any]):
        self._budgets = Budgets.from_dict(budgets)
        self._policy = ThrottlePolicy(
            slow_below=governor["slow_below"],
            shed_below=governor["shed_below"],
            hysteresis=governor["hysteresis"],
            hold_s=governor["hold_s"],
            retry_after_s=governor["retry_after_s"],
        )
        self._interval_s = governor["interval_ms"] / 1000.0
        self._reports: dict[str, tuple[float, str, dict[str, Any]]] = {}  # replica -> (received, node, report)
        self._controls: dict[str, dict[str, Any]] = {}
        self._admission: dict[str, Any] = {**Admission().to_dict(), "version": 0}
        self._decision: Decision | None = None
        # Versions start from the clock, so after a governor restart they still exceed what the
        # replicas last applied (a replica takes only a newer version).
        self._version = time.time_ns() // 1_000_000
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("power governor: budgets %s", self._budgets.to_dict())

    # -- replicas ------------------------------------------------------------------------------------
    async def exchange(self, replica: str, node: str, report: dict[str, Any] | None, known: int) -> dict[str, Any]:
        """A replica's report in, its control out (when newer than `known`, or after a short wait)."""
        if report is not None:
            self._reports[replica] = (time.monotonic(), node, report)
        if replica not in self._controls:
            self._decide()
        if self._controls.get(replica, {}).get("version", 0) <= known:
            await self._wait_change(EXCHANGE_WAIT_S)
        return self._controls.get(replica) or {"version": known}

    async def admission(self, known: int) -> dict[str, Any]:
        """The admission rules (which classes are slowed or shed), when newer than `known`."""
        if self._admission["version"] <= known:
            await self._wait_change(ADMISSION_WAIT_S)
        return self._admission

    async def _wait_change(self, timeout_s: float) -> None:
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass

    # -- operators ---------------------------------------------------------------------------------------
    def set_budgets(self, doc: dict[str, Any]) -> dict[str, Any]:
        """New budgets, in force at once (the replicas hear within one exchange)."""
        self._budgets = Budgets.from_dict(doc)
        log.info("power budgets changed: %s", self._budgets.to_dict())
        self._decide()
        return self._budgets.to_dict()

    def budgets(self) -> dict[str, Any]:
        return self._budgets.to_dict()

    def state(self) -> dict[str, Any]:
        """Budgets, per-replica power/caps/levels, scopes and admission: /admin/power and the dashboard."""
        now = time.monotonic()
        rows = []
        for replica, (received, node, rep) in sorted(self._reports.items()):
            ctrl = self._controls.get(replica, {})
            ack = rep.get("ack") or {}
            rows.append(
                {
                    "replica": replica,
                    "node": node,
                    "live": now - received < STALE_AFTER_S,
                    "power_w": rep["power_w"],
                    "energy_j": rep["energy_j"],
                    "energy_time_s": rep["time_s"],
                    "readings": rep.get("readings", []),  # [(time s, J)] of the last few seconds
                    "source": rep["source"],
                    "demand_w": rep["demand_w"],
                    "tokens_per_joule": rep["tokens_per_joule"],
                    "cap_w": ctrl.get("power_cap_w"),
                    "level": ctrl.get("level", 0),
                    "reason": ctrl.get("reason", "within budget"),
                    "batch_cap": rep.get("batch_cap"),
                    "duty": rep.get("duty"),
                    "control_version": ctrl.get("version", 0),
                    "applied_version": ack.get("version"),
                    "control_latency_s": ack["applied_at"] - ack["sent_at"] if ack else None,
                    # of which from the replica's hand-off to the engine's next step
                    "engine_latency_s": ack["applied_at"] - ack["forwarded_at"] if ack.get("forwarded_at") else None,
                }
            )
        scopes = self._decision.scopes if self._decision else []
        return {
            "budgets": self._budgets.to_dict(),
            "replicas": rows,
            "admission": self._admission,
            "scopes": [
                {"scope": s.scope, "budget_w": s.budget_w, "demand_w": s.demand_w, "ratio": s.ratio} for s in scopes
            ],
        }

    def families(self) -> list[Metric]:
        budget = GaugeMetricFamily("factory_power_budget_watts", "Power budget in force, by scope.", labels=["scope"])
        b = self._budgets
        for scope, watts in (("site", b.site_w), ("node", b.node_w), ("gpu", b.gpu_w)):
            if watts is not None:
                budget.add_metric([scope], watts)
        for node, watts in b.nodes.items():
            budget.add_metric([f"node:{node}"], watts)
        for replica, watts in b.replicas.items():
            budget.add_metric([f"replica:{replica}"], watts)
        level = GaugeMetricFamily(
            "factory_throttle_level",
            "Throttle level per replica: 0 normal, 1 capped, 2 low priority slowed, 3 low priority shed.",
            labels=["replica", "reason"],
        )
        for replica, ctrl in self._controls.items():
            if replica in self._reports:
                level.add_metric([replica, ctrl["reason"]], ctrl["level"])
        admission = GaugeMetricFamily(
            "factory_admission_level", "Site admission level (0 normal .. 3 lowest class shed).", labels=["name"]
        )
        admission.add_metric([LEVEL_NAMES[self._admission["level"]]], self._admission["level"])
        # The fleet by node, from the replicas' live reports: what a node budget is held against.
        placed = GaugeMetricFamily(
            "factory_replica_node", "1 for each live replica, labelled with the Ray node it runs on.",
            labels=["replica", "node"],
        )  # fmt: skip
        node_power = GaugeMetricFamily(
            "factory_node_power_watts", "Power drawn by each node's replicas (live reports).", labels=["node"]
        )
        now, per_node = time.monotonic(), {}
        for replica, (received, node, rep) in sorted(self._reports.items()):
            if now - received < STALE_AFTER_S:
                placed.add_metric([replica, node], 1.0)
                per_node[node] = per_node.get(node, 0.0) + rep["power_w"]
        for node, watts in sorted(per_node.items()):
            node_power.add_metric([node], watts)
        return [budget, level, admission, placed, node_power]

    # -- the loop ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                self._decide()
            except Exception:
                log.exception("governor decision failed")
            await asyncio.sleep(self._interval_s)

    def _decide(self) -> None:
        now = time.monotonic()
        live = []
        for replica, (received, node, rep) in self._reports.items():
            if now - received < STALE_AFTER_S:
                live.append(
                    ReplicaPower(
                        replica=replica,
                        node=node,
                        power_w=rep["power_w"],
                        demand_w=max(rep["demand_w"], rep["idle_w"]),
                        idle_w=rep["idle_w"],
                        tokens_per_joule=rep["tokens_per_joule"],
                        devices=rep["devices"],
                    )
                )
        self._decision = decision = self._policy.decide(live, self._budgets, now)
        changed = False
        for replica, ctrl in decision.controls.items():
            old = self._controls.get(replica)
            if old is None or _differs(old, ctrl.power_cap_w, ctrl.level, ctrl.reason):
                self._version += 1
                self._controls[replica] = {
                    "version": self._version,
                    "power_cap_w": ctrl.power_cap_w,
                    "level": ctrl.level,
                    "reason": ctrl.reason,
                    "sent_at": time.time(),
                }
                changed = True
        admission = decision.admission.to_dict()
        if {k: v for k, v in self._admission.items() if k != "version"} != admission:
            self._version += 1
            self._admission = {**admission, "version": self._version}
            log.info("admission: %s (%s)", admission["name"], admission["reason"])
            changed = True
        if changed:  # wake every long poll; each takes what is newer than it knew
            self._changed.set()
            self._changed = asyncio.Event()


def _differs(old: dict[str, Any], cap_w: float | None, level: int, reason: str) -> bool:
    if old["level"] != level or old["reason"] != reason:
        return True
    a, b = old["power_cap_w"], cap_w
    if a is None or b is None:
        return a is not b
    return abs(a - b) > CAP_RESEND_W
