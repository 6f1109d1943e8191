"""A fake `pynvml` for machines without a GPU: N boards whose energy counter (mJ) advances with
a settable power, counter resets, MIG slices, the field-values API, and NVML's errors.

Time is explicit: `advance(seconds)` moves every board's counter by power * seconds. Calls are
counted in `calls` so tests can see what a read costs. Install it as the `pynvml` module with
`monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(...))` or inject it directly.
"""

from __future__ import annotations

import types
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_FI_DEV_POWER_INSTANT = 186


class NVMLError(Exception):
    """Like pynvml's: NVMLError(code) builds the subclass for that code; `value` is the code."""

    _by_code: dict[int, type] = {}

    def __new__(cls, value=None):
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value if value is not None else cls.code
        return obj

    def __init__(self, value=None):
        super().__init__()

    def __str__(self):
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
}


def _error_class(name: str, code: int) -> type:
    cls = type(name, (NVMLError,), {"code": code})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)


@dataclass
class FakeGpu:
    """One board. A field set to None is NotSupported on it; `instant_field` is "ok", "raise"
    (the field-values call raises) or "bad_return" (the call succeeds, the field reports an error)."""

    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    power_w: float = 100.0
    energy_mj: int | None = 5_000_000  # counter since driver load; None = not supported
    power_limit_mw: int | None = 700_000
    constraints_mw: tuple[int, int] | None = (200_000, 700_000)
    instant_field: str = "ok"
    power_usage_w: float | None = None  # the 1-s average; None = same as power_w
    sm_clock_mhz: int | None = 1980
    temperature_c: int | None = 45
    utilization_pct: int | None = 50
    mig_mode: tuple[int, int] | None = (0, 0)  # (current, pending); None = not supported
    mig_slices: list[str] = field(default_factory=list)  # MIG- UUIDs of its slices
    # Settings (the actuators' side): False = setting anything raises NoPermission (not root).
    settable: bool = True
    default_limit_mw: int = 700_000
    graphics_clocks_mhz: tuple[int, ...] = (345, 990, 1410, 1980)
    locked_clocks_mhz: tuple[int, int] | None = None

    def __post_init__(self):
        self.uuid = self.uuid or f"GPU-{self.index:08x}-1111-2222-3333-444455556666"


@dataclass(frozen=True)
class MigHandle:
    parent: FakeGpu
    uuid: str


def _supported(value):
    if value is None:
        raise NVMLError_NotSupported()
    return value


class FakePynvml(types.ModuleType):
    """The fake module. `init_error`: an NVMLError class nvmlInit raises (no driver, no library)."""

    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_VALUE_TYPE_UNSIGNED_INT = 1

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_NoPermission = NVMLError_NoPermission

    def __init__(self, gpus: int | list[FakeGpu] = 1, *, init_error: type | None = None, driver: str = "550.54.15"):
        super().__init__("pynvml")
        self.gpus = [FakeGpu(i) for i in range(gpus)] if isinstance(gpus, int) else list(gpus)
        self.init_error = init_error
        self.driver = driver
        self.init_count = 0  # nvmlInit minus nvmlShutdown, as NVML counts them
        self.calls: Counter[str] = Counter()
        self.NVML_FI_DEV_POWER_INSTANT = NVML_FI_DEV_POWER_INSTANT

    # -- test controls --

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: each board's counter grows by its power."""
        for gpu in self.gpus:
            if gpu.energy_mj is not None:
                gpu.energy_mj += round(gpu.power_w * seconds * 1000)

    def reset_counter(self, index: int, to_mj: int = 0) -> None:
        self.gpus[index].energy_mj = to_mj

    def remove_field_api(self) -> None:
        """Act as an old pynvml without the instant-power field constant."""
        del self.NVML_FI_DEV_POWER_INSTANT

    # -- plumbing --

    def _enter(self, fn: str) -> None:
        self.calls[fn] += 1
        if self.init_count <= 0 and fn != "nvmlInit":
            raise NVMLError_Uninitialized()

    def _gpu(self, handle) -> FakeGpu:
        if isinstance(handle, MigHandle):  # a slice answers for little: energy and power are per board
            raise NVMLError_NotSupported()
        if not isinstance(handle, FakeGpu) or handle not in self.gpus:
            raise NVMLError_InvalidArgument()
        return handle

    # -- the NVML API --

    def nvmlInit(self):
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise self.init_error()
        self.init_count += 1

    def nvmlShutdown(self):
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self):
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self):
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._enter("nvmlDeviceGetHandleByUUID")
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            if uuid in gpu.mig_slices:
                return MigHandle(gpu, uuid)
        raise NVMLError_NotFound()

    def nvmlDeviceIsMigDeviceHandle(self, handle):
        self._enter("nvmlDeviceIsMigDeviceHandle")
        return isinstance(handle, MigHandle)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        if not isinstance(handle, MigHandle):
            raise NVMLError_InvalidArgument()
        return handle.parent

    def nvmlDeviceGetIndex(self, handle):
        self._enter("nvmlDeviceGetIndex")
        return self._gpu(handle).index

    def nvmlDeviceGetName(self, handle):
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle):
        self._enter("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._enter("nvmlDeviceGetTotalEnergyConsumption")
        return _supported(self._gpu(handle).energy_mj)

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        self._enter("nvmlDeviceGetFieldValues")
        gpu = self._gpu(handle)
        if gpu.instant_field == "raise":
            raise NVMLError_NotSupported()
        values = []
        for field_id in field_ids:
            ok = field_id == NVML_FI_DEV_POWER_INSTANT and gpu.instant_field == "ok"
            values.append(
                SimpleNamespace(
                    fieldId=field_id,
                    nvmlReturn=NVML_SUCCESS if ok else NVML_ERROR_NOT_SUPPORTED,
                    valueType=self.NVML_VALUE_TYPE_UNSIGNED_INT,
                    value=SimpleNamespace(uiVal=round(gpu.power_w * 1000) if ok else 0),
                )
            )
        return values

    def nvmlDeviceGetPowerUsage(self, handle):
        self._enter("nvmlDeviceGetPowerUsage")
        gpu = self._gpu(handle)
        return round(1000 * (gpu.power_w if gpu.power_usage_w is None else gpu.power_usage_w))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        self._enter("nvmlDeviceGetEnforcedPowerLimit")
        return _supported(self._gpu(handle).power_limit_mw)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):
        self._enter("nvmlDeviceGetPowerManagementLimitConstraints")
        return list(_supported(self._gpu(handle).constraints_mw))

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        self._enter("nvmlDeviceGetClockInfo")
        if clock_type != self.NVML_CLOCK_SM:
            raise NVMLError_InvalidArgument()
        return _supported(self._gpu(handle).sm_clock_mhz)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._enter("nvmlDeviceGetTemperature")
        if sensor != self.NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return _supported(self._gpu(handle).temperature_c)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._enter("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=_supported(self._gpu(handle).utilization_pct), memory=0)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        self._enter("nvmlDeviceGetPowerManagementDefaultLimit")
        return self._gpu(handle).default_limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle, limit_mw):
        self._enter("nvmlDeviceSetPowerManagementLimit")
        gpu = self._settable(handle)
        lo, hi = gpu.constraints_mw
        if not lo <= limit_mw <= hi:
            raise NVMLError_InvalidArgument()
        gpu.power_limit_mw = limit_mw

    def nvmlDeviceGetSupportedMemoryClocks(self, handle):
        self._enter("nvmlDeviceGetSupportedMemoryClocks")
        return [2619]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle, memory_clock_mhz):
        self._enter("nvmlDeviceGetSupportedGraphicsClocks")
        return list(self._gpu(handle).graphics_clocks_mhz)

    def nvmlDeviceSetGpuLockedClocks(self, handle, min_mhz, max_mhz):
        self._enter("nvmlDeviceSetGpuLockedClocks")
        self._settable(handle).locked_clocks_mhz = (min_mhz, max_mhz)

    def nvmlDeviceResetGpuLockedClocks(self, handle):
        self._enter("nvmlDeviceResetGpuLockedClocks")
        self._settable(handle).locked_clocks_mhz = None

    def _settable(self, handle) -> FakeGpu:
        gpu = self._gpu(handle)
        if not gpu.settable:
            raise NVMLError_NoPermission()
        return gpu

    def nvmlDeviceGetMigMode(self, handle):
        self._enter("nvmlDeviceGetMigMode")
        return list(_supported(self._gpu(handle).mig_mode))
