"""Process priorities of a factory node, set in one place (README, "Process priorities").

Measured on the 2-core machine, where the engine's Worker takes a core and its EngineCore most of
the other: the data path (HAProxy, the engine replicas' HTTP side with AsyncLLM, their EngineCore
and Worker processes, the router HAProxy asks) runs at the niceness Ray starts workers with, 0 on a
Ray the factory starts (RAY_worker_niceness=0, as stock vLLM runs). What shares the cores without
being on a request's path backs off to BACKGROUND_NICE: Serve's controller and fallback proxy, the
hub, the ledger and the governor (called once per request or less, off the token path), and Ray's
daemons that spawn nothing (GCS, the dashboard and runtime-env agents, the log monitor).

Left alone: the raylet (workers it starts add RAY_worker_niceness to its own niceness, so a
reniced raylet would start replacement replicas at the background niceness), Ray's idle pool
workers (a new replica may be made from one) and HAProxy's manager (each reload starts a new
HAProxy process as its child). Niceness only ever goes up: lowering it needs a privilege the
factory does not ask for.
"""

from __future__ import annotations

import logging

import psutil

log = logging.getLogger("factory")

BACKGROUND_NICE = 10
# Substrings of a process's program (its first arguments, not its flags) that mark it as background.
BACKGROUND = (
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::ServeReplica:factory:StateHub",
    "ray::ServeReplica:factory:LedgerService",
    "ray::ServeReplica:factory:PowerGovernor",
    "gcs_server",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "dashboard/agent.py",
    "runtime_env/agent",
    "log_monitor.py",
    "autoscaler/_private/monitor.py",
)


def is_background(argv: list[str]) -> bool:
    """Whether the process `argv` runs is background. Only the program and the script it runs
    count, never flags: the raylet's flags name the agents it starts (`--dashboard_agent_command=
    ... dashboard/agent.py`), and a reniced raylet would start every worker, the engine's
    included, at the background niceness."""
    program = " ".join(arg for arg in argv[:3] if not arg.startswith("-"))
    return any(mark in program for mark in BACKGROUND)


def settle_priorities(root: psutil.Process) -> int:
    """Raise the niceness of `root`'s background descendants to BACKGROUND_NICE; returns how many
    processes changed. Safe to call repeatedly (restarted actors are picked up next time)."""
    changed = 0
    for p in root.children(recursive=True):
        try:
            if p.nice() < BACKGROUND_NICE and is_background(p.cmdline()):
                p.nice(BACKGROUND_NICE)
                changed += 1
        except psutil.Error:  # gone meanwhile, or not ours to change
            continue
    if changed:
        log.debug("%d background process(es) set to nice %d", changed, BACKGROUND_NICE)
    return changed
