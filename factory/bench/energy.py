"""Energy during a benchmark: a cumulative counter (J) and power (W) sampled in a background thread.

Sources (`--energy`):
- server: the factory's own `/metrics`: every `factory_energy_joules_total` series summed (J) and
  every `factory_power_watts` series summed (W). Its `source` label says measured (NVML on the
  server) or modeled, and the result carries it: "server:measured" | "server:modeled" | "server:mixed".
- nvml: this machine's GPUs through NVML: total-energy counters (mJ) summed, power usage (mW)
  summed; right only when the server runs on this machine. "nvml:measured".
- none: no samples.
- auto: server if its /metrics has the energy counter, else nvml if the URL is this machine and
  NVML sees a GPU, else none.

The counter is made monotonic here: each series' increase is summed, and a series that goes
down (a replica or driver restart) counts from zero again, so a restart mid-run is not a
negative energy. `gpus` is the number of energy series (one per device per replica).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx

ENERGY_SERIES = "factory_energy_joules_total"
POWER_SERIES = "factory_power_watts"
_LINE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Reading = tuple[dict[str, float], float | None]  # (counter J per series, total power W or None)


class EnergyError(RuntimeError):
    """An energy source that was asked for and cannot be read; the message says why."""


def parse_metrics(text: str) -> tuple[dict[str, float], float | None, set[str]]:
    """(energy J per series, summed power W or None, source label values) from Prometheus text.
    Only the two factory series are parsed: vLLM's /metrics is long and this runs 4x a second."""
    energy: dict[str, float] = {}
    power, sources = None, set()
    for line in text.splitlines():
        if not (line.startswith(ENERGY_SERIES) or line.startswith(POWER_SERIES)):
            continue
        m = _LINE.match(line)
        if m is None or m.group(1) not in (ENERGY_SERIES, POWER_SERIES):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        value = float(m.group(3))
        if m.group(1) == POWER_SERIES:
            power = (power or 0.0) + value
            continue
        sources.add(labels.pop("source", "unknown"))
        key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        energy[key] = energy.get(key, 0.0) + value
    return energy, power, sources


class EnergyMeter:
    """Samples `read()` every interval_s between start() and stop(). The null meter (read None)
    records nothing. Times are perf_counter seconds internally, relative to t0 when handed out."""

    def __init__(
        self,
        source: str,
        gpus: int,
        read: Callable[[], Reading] | None = None,
        *,
        interval_s: float = 0.25,
        close: Callable[[], None] | None = None,
        lag_s: float = 0.0,
    ):
        self.source, self.gpus, self.interval_s = source, gpus, interval_s
        self.lag_s = lag_s  # how far the counter trails real time (the factory publishes once a second)
        self._read, self._close = read, close
        self._energy: list[tuple[float, float]] = []  # (perf_counter, monotonic counter J)
        self._power: list[tuple[float, float]] = []
        self._last: dict[str, float] = {}
        self._total_j = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # settle() samples from the caller's thread too
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        self.error: str | None = None  # the first read error while sampling (sampling goes on)
        self.read_errors = 0

    def start(self, t0: float) -> None:
        self.t0 = t0
        if self._read is None:
            return
        self._sample()  # one sample before the first request
        self._thread = threading.Thread(target=self._loop, name="bench-energy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()  # one sample after the last response
        if self._close is not None:
            self._close()
            self._close = None

    def settle(self) -> None:
        """Call at the end of a level: waits out the counter's lag and takes one more sample, so
        the samples cover the level's last response (else its energy window would be open)."""
        if self._read is not None:
            time.sleep(self.lag_s + self.interval_s)
            self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        before = time.perf_counter()
        try:
            counters, power_w = self._read()
        except Exception as err:  # noqa: BLE001 - a failed read loses one sample, not the run
            self.read_errors += 1
            self.error = self.error or f"{self.source}: {err}"
            return
        t = (before + time.perf_counter()) / 2  # the read's midpoint: a slow scrape is not skewed
        for key, value in counters.items():
            last = self._last.get(key)
            if last is not None:
                # A new series starts at zero increase; a counter that went down restarted from zero.
                self._total_j += value - last if value >= last else value
            self._last[key] = value
        self._energy.append((t, self._total_j))
        if power_w is not None:
            self._power.append((t, power_w))

    def latest_power_w(self) -> float | None:
        return self._power[-1][1] if self._power else None

    def window(self, a_s: float, b_s: float, t0: float | None = None) -> tuple[list[list[float]], list[list[float]]]:
        """(energy_samples, power_samples) covering [a_s - interval, b_s + interval], plus the
        nearest sample on each side so the counter can be interpolated at a and b. Times are
        relative to t0 (default: the t0 given to start)."""
        base = self.t0 if t0 is None else t0
        lo_abs, hi_abs = base + a_s - self.interval_s, base + b_s + self.interval_s
        samples = self._energy[:]  # the sampler only appends: a copy is a consistent snapshot
        lo = max(0, bisect.bisect_left(samples, lo_abs, key=lambda s: s[0]) - 1)
        hi = min(len(samples), bisect.bisect_right(samples, hi_abs, key=lambda s: s[0]) + 1)
        energy = [[t - base, j] for t, j in samples[lo:hi]]
        if self._power:
            power = [[t - base, w] for t, w in self._power[:] if lo_abs <= t <= hi_abs]
        else:  # no power reading: derive it from the counter
            power = [
                [(ta + tb) / 2, (jb - ja) / (tb - ta)]
                for (ta, ja), (tb, jb) in zip(energy, energy[1:], strict=False)
                if tb > ta
            ]
        return energy, power


def make_meter(kind: str, url: str, api_key: str | None, *, interval_s: float = 0.25) -> EnergyMeter:
    if kind == "none":
        return EnergyMeter("none", 0, interval_s=interval_s)
    if kind == "server":
        return _server_meter(url, api_key, interval_s)
    if kind == "nvml":
        return _nvml_meter(interval_s)
    if kind != "auto":
        raise EnergyError(f"energy source {kind!r} is not one of auto, server, nvml, none")
    try:
        return _server_meter(url, api_key, interval_s)
    except EnergyError:
        pass
    if _is_local(url):
        try:
            return _nvml_meter(interval_s)
        except EnergyError:
            pass
    return EnergyMeter("none", 0, interval_s=interval_s)


def _server_meter(url: str, api_key: str | None, interval_s: float) -> EnergyMeter:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=max(1.0, 4 * interval_s))

    def read() -> tuple[dict[str, float], float | None, set[str]]:
        resp = client.get("/metrics")
        if resp.status_code != 200:
            raise EnergyError(f"GET {url.rstrip('/')}/metrics: HTTP {resp.status_code}")
        return parse_metrics(resp.text)

    try:
        energy, _, sources = read()
    except (httpx.HTTPError, EnergyError, ValueError) as err:
        client.close()
        raise EnergyError(f"server energy: {err}") from err
    if not energy:
        client.close()
        raise EnergyError(f"server energy: {url.rstrip('/')}/metrics has no {ENERGY_SERIES}")
    source = f"server:{sources.pop()}" if len(sources) == 1 else "server:mixed"
    # The factory's replicas publish their counters to /metrics once a second.
    meter = EnergyMeter(source, len(energy), lambda: read()[:2], interval_s=interval_s, close=client.close, lag_s=1.0)
    return meter


def _nvml_meter(interval_s: float) -> EnergyMeter:
    try:
        import pynvml
    except ImportError as err:
        raise EnergyError("nvml energy: pynvml is not installed") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise EnergyError(f"nvml energy: NVML does not start ({err})") from err
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not handles:
            raise EnergyError("nvml energy: NVML sees no GPU")

        def read() -> Reading:
            energy = {f"gpu{i}": pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000 for i, h in enumerate(handles)}
            return energy, sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000

        read()  # a board without the energy counter (pre-Volta) fails here, not mid-run
    except pynvml.NVMLError as err:
        pynvml.nvmlShutdown()
        raise EnergyError(f"nvml energy: {err}") from err
    except EnergyError:
        pynvml.nvmlShutdown()
        raise
    return EnergyMeter("nvml:measured", len(handles), read, interval_s=interval_s, close=pynvml.nvmlShutdown)


def _is_local(url: str) -> bool:
    """Is the server at `url` this machine (so this machine's GPUs are the ones serving)?"""
    host = urlparse(url).hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return str(addr) in local
