"""Power sources: the interface, the modeled source for machines without a sensor, and the
choice between NVML and the model.

Units are in every name: energy in millijoules (`_mj`, cumulative since the source was opened,
never decreasing), power in watts (`_w`), time in seconds (`_s`, `time.monotonic()`).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("factory.telemetry")

SOURCE_KINDS = ("auto", "nvml", "modeled")


class TelemetryError(RuntimeError):
    """A power source cannot be opened or read; the message says why."""


@dataclass(frozen=True, slots=True)
class PowerReading:
    """One device's state at one instant. `source` travels with every joule so that a modeled
    figure is never shown as a measured one."""

    time_s: float  # time.monotonic() when read
    device: str  # "gpu0", "gpu1"... (NVML index) or "cpu0" for modeled
    source: str  # "nvml" | "modeled"
    energy_mj: float  # cumulative since the source was opened; never decreases (counter resets handled)
    power_w: float  # instantaneous power (modeled: average over the interval since the previous read)
    power_limit_w: float | None = None  # enforced power limit
    power_limit_min_w: float | None = None  # lowest limit the card accepts
    power_limit_max_w: float | None = None  # highest limit the card accepts
    sm_clock_mhz: int | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None  # share of time a kernel was running, 0..100
    mig: bool = False  # MIG enabled: the board's readings are shared by all its slices


class PowerSource(ABC):
    """A set of devices whose energy one replica is charged for."""

    source: str  # "nvml" | "modeled"

    @property
    @abstractmethod
    def devices(self) -> list[str]:
        """Device names, in the order `read()` returns them."""

    @abstractmethod
    def read(self) -> list[PowerReading]:
        """One reading per device. Cheap: called every ~100 ms and at step ends."""

    def energy_mj(self) -> float:
        """Energy of all devices since the source was opened, in mJ (the fast path at request ends)."""
        return sum(r.energy_mj for r in self.read())

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release the sensor. Idempotent."""

    def __enter__(self) -> PowerSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModeledPowerSource(PowerSource):
    """For machines without a sensor: power_w = idle_w + (max_w - idle_w) * busy fraction of the engine.

    Energy is the exact integral of that model, not a sum of samples:
    energy_mj = 1000 * (idle_w * wall_s + (max_w - idle_w) * busy_s), both counted from the open.
    """

    source = "modeled"

    def __init__(
        self,
        idle_w: float,
        max_w: float,
        busy_s: Callable[[], float],
        *,
        device: str = "cpu0",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= idle_w <= max_w:
            raise ValueError(f"modeled power needs 0 <= idle_w <= max_w, got idle {idle_w} W, max {max_w} W")
        self.idle_w = float(idle_w)
        self.max_w = float(max_w)
        self._busy_s = busy_s  # the engine's cumulative busy seconds, including a step in progress
        self._device = device
        self._clock = clock
        self._lock = threading.Lock()
        self._open_s = clock()
        self._open_busy_s = busy_s()
        self._last = (self._open_s, self._open_busy_s)  # (wall, busy) at the previous read()
        self._last_energy_mj = 0.0
        self._last_power_w = self.idle_w

    @property
    def devices(self) -> list[str]:
        return [self._device]

    def _energy_at(self, now_s: float, busy_s: float) -> float:
        wall_s = max(0.0, now_s - self._open_s)
        # The two counters are read one after the other, so busy can run a hair ahead of wall.
        busy_s = min(max(0.0, busy_s - self._open_busy_s), wall_s)
        energy_mj = 1000.0 * (self.idle_w * wall_s + (self.max_w - self.idle_w) * busy_s)
        self._last_energy_mj = max(self._last_energy_mj, energy_mj)
        return self._last_energy_mj

    def energy_mj(self) -> float:
        with self._lock:
            return self._energy_at(self._clock(), self._busy_s())

    def read(self) -> list[PowerReading]:
        with self._lock:
            now_s, busy_s = self._clock(), self._busy_s()
            energy_mj = self._energy_at(now_s, busy_s)
            d_wall_s, d_busy_s = now_s - self._last[0], busy_s - self._last[1]
            if d_wall_s > 0:
                busy_frac = min(max(d_busy_s / d_wall_s, 0.0), 1.0)
                self._last_power_w = self.idle_w + (self.max_w - self.idle_w) * busy_frac
            elif d_busy_s > 0:
                self._last_power_w = self.max_w
            self._last = (now_s, busy_s)
            return [
                PowerReading(
                    time_s=now_s,
                    device=self._device,
                    source=self.source,
                    energy_mj=energy_mj,
                    power_w=self._last_power_w,
                    utilization_pct=100.0 * (self._last_power_w - self.idle_w) / (self.max_w - self.idle_w)
                    if self.max_w > self.idle_w
                    else None,
                )
            ]


def select_power_source(
    kind: str,
    *,
    idle_w: float,
    max_w: float,
    busy_s: Callable[[], float],
    cuda_visible_devices: str | None = None,
) -> PowerSource:
    """Open the power source `kind` names ("auto" | "nvml" | "modeled") and log one line saying
    which was chosen and why. "auto" takes NVML when it opens (devices found, energy counter
    working) and the model otherwise; "nvml" raises TelemetryError when NVML does not work."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"power source must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    reason = "configured"
    if kind in ("auto", "nvml"):
        from factory.telemetry.nvml import NvmlPowerSource

        try:
            source = NvmlPowerSource(cuda_visible_devices)
        except TelemetryError as e:
            if kind == "nvml":
                raise
            reason = str(e)
        else:
            logger.info("power source: nvml (%s)", source.describe())
            return source
    source = ModeledPowerSource(idle_w, max_w, busy_s)
    logger.info("power source: modeled (idle %g W, max %g W): %s", idle_w, max_w, reason)
    return source
