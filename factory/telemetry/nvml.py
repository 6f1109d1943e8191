"""The NVML power source: the board's energy counter, instant power and static facts.

The only module that touches `pynvml` (package `nvidia-ml-py`), imported when a source is
opened so that importing `factory.telemetry` never needs it. Vendor errors become
`TelemetryError` (or None for optional facts) in `_call`, nowhere else.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from factory.telemetry.sources import PowerReading, PowerSource, TelemetryError

logger = logging.getLogger("factory.telemetry")

# How instant power is read, best first. The field is a true instant value; power usage is a
# 1-s average on Ampere/Hopper; the counter delta is what is left when neither is supported.
POWER_FIELD, POWER_USAGE, POWER_COUNTER = "instant field", "power usage (1 s average)", "energy counter delta"


@dataclass(slots=True)
class _Device:
    name: str  # "gpu{nvml_index}"
    index: int  # NVML index of the board
    handle: object  # the board's handle (a MIG slice is replaced by its parent: energy is per board)
    mig_slice: bool  # selected through a MIG- UUID
    power_method: str = POWER_USAGE
    facts: dict = field(default_factory=dict)
    raw_mj: int = 0  # last counter value, mJ since driver load
    energy_mj: float = 0.0  # accumulated since open, across counter resets
    mark: tuple[float, float] = (0.0, 0.0)  # (time_s, energy_mj) when the counter last moved, for POWER_COUNTER
    last_power_w: float = 0.0
    unsupported: set[str] = field(default_factory=set)  # optional per-read metrics not to ask for again


class NvmlPowerSource(PowerSource):
    """The GPUs a replica sees, read through NVML. One reading per board."""

    source = "nvml"

    def __init__(self, cuda_visible_devices: str | None = None, *, nvml=None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                raise TelemetryError(f"NVML unavailable: cannot import pynvml (nvidia-ml-py): {e}") from e
        self._nvml = nvml
        self._lock = threading.Lock()
        self._closed = False
        self._warned: set[str] = set()
        self._call("nvmlInit", what="NVML unavailable")
        try:
            self._devices = self._select(cuda_visible_devices)
            if not self._devices:
                raise TelemetryError("NVML found no GPU")
            now_s = time.monotonic()
            for d in self._devices:
                d.raw_mj = self._call(
                    "nvmlDeviceGetTotalEnergyConsumption", d.handle, what=f"{d.name}: energy counter not supported"
                )
                d.mark = (now_s, 0.0)
                d.power_method = self._probe_power(d)
            self.refresh_facts()
        except BaseException:
            self.close()
            raise

    # -- vendor calls: the one place NVML errors are translated --

    def _call(self, fn: str, *args, what: str | None = None, optional: bool = False):
        """Call pynvml.`fn`. A failure raises TelemetryError("`what`: ...") or, when `optional`,
        returns None (a missing function in an older pynvml counts as not supported)."""
        try:
            return getattr(self._nvml, fn)(*args)
        except (self._nvml.NVMLError, AttributeError) as e:
            if optional:
                return None
            raise TelemetryError(f"{what or 'NVML call failed'}: {fn}: {e}") from e

    def _optional_metric(self, d: _Device, fn: str, *args):
        """A per-read metric; one that is not supported is not asked for again."""
        if fn in d.unsupported:
            return None
        try:
            return getattr(self._nvml, fn)(*args)
        except (self._nvml.NVMLError, AttributeError) as e:
            if isinstance(e, AttributeError) or e.value in (
                self._nvml.NVML_ERROR_NOT_SUPPORTED,
                self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND,
            ):
                d.unsupported.add(fn)
            return None

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # -- opening --

    def _select(self, cuda_visible_devices: str | None) -> list[_Device]:
        """The boards CUDA_VISIBLE_DEVICES names (indices in NVML order, GPU-/MIG- UUIDs or
        unique GPU- prefixes); None or "" = all. One entry per board, in the order given."""
        count = self._call("nvmlDeviceGetCount", what="NVML cannot count devices")
        tokens = [t.strip() for t in (cuda_visible_devices or "").split(",") if t.strip()]
        handles = []
        for token in tokens or [str(i) for i in range(count)]:
            if token.isdigit():
                if int(token) >= count:
                    raise TelemetryError(f"CUDA_VISIBLE_DEVICES names GPU {token} but NVML sees {count}")
                handles.append(self._call("nvmlDeviceGetHandleByIndex", int(token)))
            elif token.startswith(("GPU-", "MIG-")):
                handles.append(self._by_uuid(token, count))
            else:
                raise TelemetryError(f"CUDA_VISIBLE_DEVICES entry {token!r} is neither an index nor a GPU-/MIG- UUID")
        devices: dict[int, _Device] = {}
        for handle in handles:
            slice_ = bool(self._call("nvmlDeviceIsMigDeviceHandle", handle, optional=True))
            if slice_:
                handle = self._call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
            index = self._call("nvmlDeviceGetIndex", handle)
            if index in devices:  # two slices of one board: its energy is counted once
                devices[index].mig_slice |= slice_
            else:
                devices[index] = _Device(f"gpu{index}", index, handle, slice_)
        return list(devices.values())

    def _by_uuid(self, uuid: str, count: int):
        try:
            return self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        except self._nvml.NVMLError as e:
            if uuid.startswith("GPU-"):  # CUDA accepts a unique prefix of the UUID
                handles = [self._call("nvmlDeviceGetHandleByIndex", i) for i in range(count)]
                hits = [h for h in handles if _text(self._call("nvmlDeviceGetUUID", h)).startswith(uuid)]
                if len(hits) == 1:
                    return hits[0]
            raise TelemetryError(f"CUDA_VISIBLE_DEVICES names {uuid}, which NVML does not find: {e}") from e

    def _probe_power(self, d: _Device) -> str:
        if hasattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT"):
            try:
                self._field_power_w(d.handle)
                return POWER_FIELD
            except (self._nvml.NVMLError, AttributeError):
                pass
        if self._call("nvmlDeviceGetPowerUsage", d.handle, optional=True) is not None:
            return POWER_USAGE
        return POWER_COUNTER

    def refresh_facts(self) -> None:
        """Re-read what changes only by an operator's hand: limits, MIG mode, names."""
        nvml = self._nvml
        driver = _text(self._call("nvmlSystemGetDriverVersion", optional=True))
        for d in self._devices:
            h = d.handle
            limits = self._call("nvmlDeviceGetPowerManagementLimitConstraints", h, optional=True) or (None, None)
            mig_mode = self._call("nvmlDeviceGetMigMode", h, optional=True)
            d.facts = {
                "device": d.name,
                "index": d.index,
                "name": _text(self._call("nvmlDeviceGetName", h, optional=True)),
                "uuid": _text(self._call("nvmlDeviceGetUUID", h, optional=True)),
                "driver_version": driver,
                "power_limit_w": _w(self._call("nvmlDeviceGetEnforcedPowerLimit", h, optional=True)),
                "power_limit_min_w": _w(limits[0]),
                "power_limit_max_w": _w(limits[1]),
                "mig": d.mig_slice or bool(mig_mode and mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE),
            }

    def facts(self) -> list[dict]:
        """Per device: name, uuid, driver version, power limit and its constraints (W), MIG, power method."""
        return [dict(d.facts, power_method=d.power_method) for d in self._devices]

    def describe(self) -> str:
        """One line for the log: how many devices, which, and how power is read."""
        names = ", ".join(f"{d.name} {d.facts['name']}" + (" [MIG]" if d.facts["mig"] else "") for d in self._devices)
        methods = ", ".join(sorted({d.power_method for d in self._devices}))
        driver = self._devices[0].facts["driver_version"]
        count = f"{len(self._devices)} device" + ("s" if len(self._devices) > 1 else "")
        return f"{count}: {names}; driver {driver}; power via {methods}"

    # -- reading --

    @property
    def nvml(self):
        """The NVML module in use (the optional actuators drive the same boards through it)."""
        return self._nvml

    def boards(self) -> list[tuple[str, object]]:
        """(name, NVML handle) of each board this replica reads."""
        return [(d.name, d.handle) for d in self._devices]

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self._devices]

    def _update_energy(self, d: _Device) -> float:
        """Advance the device's energy from its counter; a decrease means the counter reset."""
        raw_mj = self._call("nvmlDeviceGetTotalEnergyConsumption", d.handle, what=f"{d.name}: energy counter")
        if raw_mj < d.raw_mj:
            self._warn_once(
                "reset",
                "%s: NVML energy counter went back (%d -> %d mJ): counting on from the reset",
                d.name,
                d.raw_mj,
                raw_mj,
            )
            d.energy_mj += raw_mj
        else:
            d.energy_mj += raw_mj - d.raw_mj
        d.raw_mj = raw_mj
        return d.energy_mj

    def _field_power_w(self, handle) -> float:
        nvml = self._nvml
        value = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(value.nvmlReturn)
        return _field_number(value) / 1000.0

    def _power_w(self, d: _Device, now_s: float) -> float:
        if d.power_method == POWER_FIELD:
            try:
                return self._field_power_w(d.handle)
            except self._nvml.NVMLError as e:
                self._warn_once(f"field-{d.name}", "%s: instant power field failed (%s): using power usage", d.name, e)
                d.power_method = POWER_USAGE
        if d.power_method == POWER_USAGE:
            usage_mw = self._call("nvmlDeviceGetPowerUsage", d.handle, optional=True)
            if usage_mw is not None:
                return usage_mw / 1000.0
        # The counter moves every ~100 ms: between its updates keep the last figure.
        mark_s, mark_mj = d.mark
        dt_s = now_s - mark_s
        if d.energy_mj > mark_mj and dt_s > 0:
            d.last_power_w = (d.energy_mj - mark_mj) / 1000.0 / dt_s
            d.mark = (now_s, d.energy_mj)
        return d.last_power_w

    def read(self) -> list[PowerReading]:
        nvml = self._nvml
        readings = []
        with self._lock:
            self._check_open()
            for d in self._devices:
                h = d.handle
                energy_mj = self._update_energy(d)
                now_s = time.monotonic()
                power_w = self._power_w(d, now_s)
                util = self._optional_metric(d, "nvmlDeviceGetUtilizationRates", h)
                temperature_c = self._optional_metric(d, "nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU)
                readings.append(
                    PowerReading(
                        time_s=now_s,
                        device=d.name,
                        source=self.source,
                        energy_mj=energy_mj,
                        power_w=power_w,
                        power_limit_w=d.facts["power_limit_w"],
                        power_limit_min_w=d.facts["power_limit_min_w"],
                        power_limit_max_w=d.facts["power_limit_max_w"],
                        sm_clock_mhz=self._optional_metric(d, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM),
                        temperature_c=None if temperature_c is None else float(temperature_c),
                        utilization_pct=None if util is None else float(util.gpu),
                        mig=d.facts["mig"],
                    )
                )
        return readings

    def energy_mj(self) -> float:
        with self._lock:
            self._check_open()
            return sum(self._update_energy(d) for d in self._devices)

    def _check_open(self) -> None:
        if self._closed:
            raise TelemetryError("NVML power source is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._call("nvmlShutdown", optional=True)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _w(milliwatts) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


# nvmlValueType_t -> the union member holding the value
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def _field_number(value) -> float:
    return float(getattr(value.value, _VALUE_MEMBERS[value.valueType]))
