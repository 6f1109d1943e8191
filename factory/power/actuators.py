"""Optional hardware actuators: drive a board's own power limit, or its locked SM clocks, toward
the governor's cap.

Off by default, and used only with the operator's explicit consent (`power.actuators.*` in the
config): they change the card's settings, which need root, outlive the process if it is killed,
and affect everything else on the board. The factory's own throttling (batch caps and pauses
between steps) needs none of this; an actuator only lets the board save a little more at the
same cap (lower clocks at lower voltage). Every setting is restored at `restore()` (the engine's
shutdown). Tests run against a fake `pynvml`; nothing here is ever run on a lent GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("factory.power")


@dataclass
class _Board:
    name: str
    handle: Any
    default_limit_mw: int
    min_limit_mw: int
    max_limit_mw: int
    min_clock_mhz: int | None = None
    max_clock_mhz: int | None = None


class NvmlActuator:
    """Sets each of a replica's boards to its share of the replica's cap (and back)."""

    def __init__(self, nvml: Any, boards: list[tuple[str, Any]], *, power_limit: bool, locked_clocks: bool):
        if not (power_limit or locked_clocks):
            raise ValueError("an actuator needs consent for at least one of power_limit, locked_clocks")
        self._nvml = nvml
        self._power_limit = power_limit
        self._locked_clocks = locked_clocks
        self._boards: list[_Board] = []
        for name, handle in boards:
            lo, hi = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            board = _Board(name, handle, nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle), lo, hi)
            if locked_clocks:
                clocks = nvml.nvmlDeviceGetSupportedGraphicsClocks(
                    handle, nvml.nvmlDeviceGetSupportedMemoryClocks(handle)[0]
                )
                board.min_clock_mhz, board.max_clock_mhz = min(clocks), max(clocks)
            self._boards.append(board)
        self.enabled = True
        self.applied_w: float | None = None

    def apply(self, cap_w: float | None) -> None:
        """The replica's cap in W (split evenly over its boards), or None to restore the defaults."""
        if not self.enabled:
            return
        if cap_w is None:
            self.restore()
            return
        try:
            for b in self._boards:
                share_mw = int(1000 * cap_w / len(self._boards))
                limit_mw = max(b.min_limit_mw, min(b.default_limit_mw, share_mw))
                if self._power_limit:
                    self._nvml.nvmlDeviceSetPowerManagementLimit(b.handle, limit_mw)
                if self._locked_clocks:
                    self._nvml.nvmlDeviceSetGpuLockedClocks(b.handle, b.min_clock_mhz, self._clock_for(b, limit_mw))
            self.applied_w = cap_w
        except self._nvml.NVMLError as err:  # no permission, not supported: the pauses still hold the cap
            log.error("NVML actuator disabled (%s); throttling continues without it", err)
            self.enabled = False
            self.restore()

    def _clock_for(self, b: _Board, limit_mw: int) -> int:
        """The highest SM clock for a limit: scaled between the board's lowest and highest clock by
        where the limit sits between its lowest and default limit (a first-order rule; a
        calibrated profile would map power to clock per card)."""
        span = max(1, b.default_limit_mw - b.min_limit_mw)
        share = (limit_mw - b.min_limit_mw) / span
        return int(b.min_clock_mhz + share * (b.max_clock_mhz - b.min_clock_mhz))

    def restore(self) -> None:
        """Every board back to its default limit and unlocked clocks."""
        for b in self._boards:
            try:
                if self._power_limit:
                    self._nvml.nvmlDeviceSetPowerManagementLimit(b.handle, b.default_limit_mw)
                if self._locked_clocks:
                    self._nvml.nvmlDeviceResetGpuLockedClocks(b.handle)
            except self._nvml.NVMLError as err:
                log.error("restoring %s's settings failed: %s", b.name, err)
        self.applied_w = None
