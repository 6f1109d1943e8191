"""The live line `factory bench` shows while a level runs, and the line it leaves behind.

Per request, on_result only bumps counters and feeds a bounded TTFT reservoir (O(1)); the line
is drawn by rich's refresh thread at 4 Hz, so the display costs the load loop nothing that
grows with the request rate. Disabled (not a terminal, --quiet), it prints one plain summary
line per level to stderr instead.
"""

from __future__ import annotations

import random
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

RESERVOIR = 2048  # TTFT samples kept for the running p50; its error is well under 1 %


class _Level:
    def __init__(self, label: str, total: int | None):
        self.label, self.total = label, total
        self.t_start = time.perf_counter()
        self.sent = self.completed = self.failed = 0
        self.output_tok = 0
        self.ttft_s: list[float] = []
        self.seen = 0  # records offered to the reservoir
        self.rng = random.Random(0)

    def add_ttft(self, ttft_s: float) -> None:
        self.seen += 1
        if len(self.ttft_s) < RESERVOIR:
            self.ttft_s.append(ttft_s)
        else:  # reservoir sampling: every TTFT so far equally likely to be kept
            j = self.rng.randrange(self.seen)
            if j < RESERVOIR:
                self.ttft_s[j] = ttft_s

    def ttft_p50_s(self) -> float | None:
        if not self.ttft_s:
            return None
        values = sorted(self.ttft_s)
        mid = (len(values) - 1) / 2
        lo = int(mid)
        return values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (mid - lo)


class LiveProgress:
    """with LiveProgress(enabled) as p: p.start_level(...); run_level(on_result=p.on_result,
    on_send=p.on_send); p.end_level()."""

    def __init__(self, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._live: Live | None = None
        self._level: _Level | None = None
        self._power_w: float | None = None
        self._energy_source: str | None = None

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._level is not None:
            self.end_level()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def start_level(self, label: str, total: int | None, energy_source: str | None = None) -> None:
        if self._level is not None:
            self.end_level()
        self._level = _Level(label, total)
        self._energy_source = energy_source
        self._power_w = None

    def on_send(self) -> None:
        if self._level is not None:
            self._level.sent += 1

    def on_result(self, record: dict | None, failure: dict | None) -> None:
        lv = self._level
        if lv is None:
            return
        if record is None:
            lv.failed += 1
            return
        lv.completed += 1
        lv.output_tok += record["n_out"]
        lv.add_ttft(record["chunk_s"][0])

    def set_power(self, w: float | None, energy_source: str | None = None) -> None:
        self._power_w = w
        if energy_source is not None:
            self._energy_source = energy_source

    def end_level(self) -> None:
        lv, self._level = self._level, None
        if lv is None:
            return
        line = self._line(lv, final=True)
        if self._live is not None:
            self._live.console.print(line)
        else:
            print(line.plain, file=sys.stderr, flush=True)

    def __rich__(self) -> Group:
        lv = self._level
        return Group(self._line(lv, final=False)) if lv is not None else Group()

    def _line(self, lv: _Level, final: bool) -> Text:
        elapsed_s = time.perf_counter() - lv.t_start
        in_flight = lv.sent - lv.completed - lv.failed
        total = "" if lv.total is None else f"/{lv.total}"
        p50 = lv.ttft_p50_s()
        text = Text()
        text.append(f"{'done' if final else '....'} {lv.label:<18}", style="bold green" if final else "bold cyan")
        text.append(f" sent {lv.sent}{total}  ok {lv.completed}")
        text.append(f"  failed {lv.failed}", style="bold red" if lv.failed else None)
        if not final:
            text.append(f"  in-flight {in_flight}")
        text.append(f"  {elapsed_s:6.1f} s  {lv.output_tok / elapsed_s if elapsed_s > 0 else 0:8.1f} out tok/s")
        text.append("  TTFT p50 " + ("-" if p50 is None else f"{p50 * 1000:.0f} ms"))
        if self._energy_source and self._energy_source != "none":
            power = "" if self._power_w is None else f" {self._power_w:.0f} W"
            text.append(f"  [{self._energy_source}{power}]", style="yellow")
        return text
