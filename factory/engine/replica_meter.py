"""The replica side of metering: receives the engine meter's messages and serves them.

The engine meter (factory/engine/meter.py, inside vLLM's EngineCore process) pushes one `final`
message per request and a `snapshot` every sample over a ZeroMQ IPC socket that this object
binds. Requests wait here for their `final` (energy, tokens) before their usage is settled and
sent; snapshots become the replica's `factory_*` Prometheus families.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from factory.config import TelemetryConfig
from factory.engine.meter import METER_ENV

log = logging.getLogger("factory.engine")

TOKENS_PER_JOULE_WINDOW_S = 10.0
_KEEP_FINALS = 10_000  # finals nobody waited for (aborted requests) are kept this many deep


class _Waiter:
    def __init__(self, parts: int, records: list[dict[str, Any]]):
        self.parts = parts
        self.records = list(records)
        self.event = asyncio.Event()
        if self.done():
            self.event.set()

    def done(self) -> bool:
        return len(self.records) >= self.parts

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.done():
            self.event.set()


def _merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(records[0])
    for r in records[1:]:
        for k in ("energy_j", "busy_s", "completion_tokens"):
            out[k] += r[k]
        if r["status"] != "completed":
            out["status"] = r["status"]
    return out


class ReplicaMeter:
    def __init__(self, telemetry: TelemetryConfig):
        self.endpoint = f"ipc://{tempfile.gettempdir()}/factory-meter-{uuid.uuid4().hex[:12]}"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(self.endpoint)
        self._engine_cfg = {
            "endpoint": self.endpoint,
            "source": telemetry.source,
            "interval_s": telemetry.sample_interval_ms / 1000.0,
            "idle_w": telemetry.modeled_idle_watts,
            "max_w": telemetry.modeled_max_watts,
            "prefill_weight": telemetry.prefill_token_weight,
        }
        self._finals: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._waiters: dict[str, _Waiter] = {}
        self.snapshot: dict[str, Any] | None = None
        self._history: deque[tuple[float, float, int]] = deque()  # (t, observed J, completion tokens)
        self._task: asyncio.Task | None = None

    def export_engine_env(self) -> None:
        """Make the EngineCore process (started after this, inheriting our environment) meter."""
        os.environ[METER_ENV] = json.dumps(self._engine_cfg)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive_forever())

    async def final(self, request_key: str, timeout_s: float, parts: int = 1) -> dict[str, Any] | None:
        """The engine's final record for a request, waiting up to timeout_s for it.

        A request with `n` > 1 runs in the engine as `n` child requests under one key: their
        records are summed (prompt tokens counted once, as in the response's usage)."""
        got = self._finals.pop(request_key, [])
        waiter = _Waiter(parts, got)
        if not waiter.done():
            self._waiters[request_key] = waiter
            try:
                await asyncio.wait_for(waiter.event.wait(), timeout_s)
            except TimeoutError:
                log.warning("no energy record from the engine for request %s after %.1f s", request_key, timeout_s)
            finally:
                self._waiters.pop(request_key, None)
        return _merge(waiter.records) if waiter.records else None

    async def _receive_forever(self) -> None:
        while True:
            try:
                msg = json.loads(await self._sock.recv())
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("bad meter message: %s", err)
                continue
            if msg.get("type") == "final":
                key = msg["request"]
                waiter = self._waiters.get(key)
                if waiter is not None:
                    waiter.add(msg)
                else:
                    self._finals.setdefault(key, []).append(msg)
                    while len(self._finals) > _KEEP_FINALS:
                        self._finals.popitem(last=False)
            elif msg.get("type") == "snapshot":
                self._on_snapshot(msg)

    def _on_snapshot(self, snap: dict[str, Any]) -> None:
        self.snapshot = snap
        now = time.monotonic()
        completion = sum(t[1] for t in snap["tokens"].values())
        self._history.append((now, snap["observed_j"], completion))
        while len(self._history) > 2 and now - self._history[1][0] >= TOKENS_PER_JOULE_WINDOW_S:
            self._history.popleft()

    def tokens_per_joule(self) -> float:
        """Generated tokens per joule of the device over the last ~10 s."""
        if len(self._history) < 2:
            return 0.0
        (_, j0, n0), (_, j1, n1) = self._history[0], self._history[-1]
        return (n1 - n0) / (j1 - j0) if j1 > j0 else 0.0

    def families(self) -> list[Metric]:
        """factory_* families for this replica (the ingress adds the `replica` label)."""
        snap = self.snapshot
        if snap is None:
            return []
        src = snap["source"]
        power = GaugeMetricFamily(
            "factory_power_watts",
            "Device power now (source: nvml measured, modeled estimated).",
            labels=["device", "source"],
        )
        energy = CounterMetricFamily(
            "factory_energy_joules", "Device energy since the replica started.", labels=["device", "source"]
        )
        limit = GaugeMetricFamily("factory_power_limit_watts", "Enforced device power limit.", labels=["device"])
        for d in snap["devices"]:
            power.add_metric([d["device"], src], d["power_w"])
            energy.add_metric([d["device"], src], d["energy_j"])
            if d.get("power_limit_w") is not None:
                limit.add_metric([d["device"]], d["power_limit_w"])
        attributed = CounterMetricFamily(
            "factory_attributed_energy_joules", "Device energy attributed to requests, by tenant.", labels=["tenant"]
        )
        for tenant, joules in snap["attributed_j"].items():
            attributed.add_metric([tenant], joules)
        idle = CounterMetricFamily("factory_idle_energy_joules", "Device energy with no request running.")
        idle.add_metric([], snap["idle_j"])
        tokens = CounterMetricFamily(
            "factory_tokens", "Tokens processed, by tenant and kind.", labels=["tenant", "kind"]
        )
        for tenant, (prompt, completion) in snap["tokens"].items():
            tokens.add_metric([tenant, "prompt"], prompt)
            tokens.add_metric([tenant, "completion"], completion)
        tpj = GaugeMetricFamily(
            "factory_tokens_per_joule", "Generated tokens per joule of device energy over the last 10 s."
        )
        tpj.add_metric([], self.tokens_per_joule())
        busy = CounterMetricFamily("factory_engine_busy_seconds", "Time the engine spent running steps.")
        busy.add_metric([], snap["busy_s"])
        return [power, energy, limit, attributed, idle, tokens, tpj, busy]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()
        try:
            os.unlink(self.endpoint.removeprefix("ipc://"))
        except OSError:
            pass
