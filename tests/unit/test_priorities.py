"""Which processes of a factory node back off (factory/priorities.py)."""

from __future__ import annotations

import subprocess

import psutil
import pytest

from factory import priorities


@pytest.mark.parametrize(
    "cmdline",
    [
        "ray::ServeController",
        "ray::ServeReplica:factory:StateHub",
        "ray::ServeReplica:factory:LedgerService",
        "ray::ServeReplica:factory:PowerGovernor",
        "/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray",
        "/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir=x",
        "/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/dashboard/agent.py --node-ip-address=x",
    ],
)
def test_off_path_processes_are_background(cmdline):
    assert priorities.is_background(cmdline.split())


@pytest.mark.parametrize(
    "cmdline",
    [
        "ray::ServeReplica:factory:FactoryEngine",  # the engine replica: HTTP side + AsyncLLM
        "ray::ServeReplica:factory:FactoryRouter",  # HAProxy asks it for every POST
        "VLLM::EngineCore",
        "VLLM::Worker_TP0",
        # Its flags name the agents it starts; it must not be taken for one of them.
        "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node_id=x "
        "--dashboard_agent_command=/venv/bin/python -u /venv/ray/dashboard/agent.py --log-dir=x "
        "--runtime_env_agent_command=/venv/bin/python -u /venv/ray/_private/runtime_env/agent/main.py",
        "ray::IDLE",
        "ray::HAProxyManager",
        "haproxy -f /tmp/ray/haproxy.cfg",
    ],
)
def test_the_data_path_and_what_spawns_it_keep_their_niceness(cmdline):
    assert not priorities.is_background(cmdline.split())


def test_settle_raises_only_background_descendants_and_only_once():
    # Processes named as Ray and vLLM name theirs (argv[0]).
    background = subprocess.Popen(["ray::ServeController", "30"], executable="/bin/sleep")
    path = subprocess.Popen(["VLLM::EngineCore", "30"], executable="/bin/sleep")
    try:
        me = psutil.Process()
        before = psutil.Process(path.pid).nice()
        assert priorities.settle_priorities(me) == 1
        assert psutil.Process(background.pid).nice() == priorities.BACKGROUND_NICE
        assert psutil.Process(path.pid).nice() == before
        assert priorities.settle_priorities(me) == 0
    finally:
        for p in (background, path):
            p.kill()
            p.wait()
