"""A thread that reads a power source at a fixed rate and hands each batch of readings on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from factory.telemetry.sources import PowerReading, PowerSource

logger = logging.getLogger("factory.telemetry")


class PowerSampler:
    """One per replica: reads the source every interval_s on a daemon thread and hands each
    batch of readings to on_readings.

    The schedule is fixed-rate (tick k at start + k * interval_s), so the time a read and its
    callback take does not stretch the period. Ticks missed while a read was slow are skipped,
    not made up in a burst. Callbacks run only on the sampler thread, one at a time."""

    def __init__(
        self,
        source: PowerSource,
        on_readings: Callable[[list[PowerReading]], None],
        interval_s: float = 0.1,
        name: str = "factory-power-sampler",
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.source = source
        self.on_readings = on_readings
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._logged: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Take one final reading (so the last interval is not lost) and join the thread."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("%s did not stop within %.1f s", self._thread.name, timeout_s)

    def _run(self) -> None:
        next_s = time.monotonic()
        while True:
            self._sample()
            next_s += self.interval_s
            now_s = time.monotonic()
            if next_s < now_s:  # fell behind: drop the missed ticks, keep the phase
                next_s += (now_s - next_s) // self.interval_s * self.interval_s + self.interval_s
            if self._stop.wait(next_s - now_s):
                self._sample()  # the final reading
                return

    def _sample(self) -> None:
        try:
            self.on_readings(self.source.read())
        except Exception as e:  # noqa: BLE001 - a bad read must not stop sampling, but is never silent
            message = f"{type(e).__name__}: {e}"
            if message not in self._logged:
                self._logged.add(message)
                logger.exception("power sampling failed (each distinct error is logged once): %s", message)
