"""Every message between a replica and its engine's EngineCore process, typed (msgspec, as vLLM
uses for its own engine messages). Each struct is built in one place and read in one place:

    replica (ReplicaMeter)  <--- meter socket (msgpack): Final | Snapshot | ControlApplied ---  EngineMeter
                            ---- control socket (msgpack): Control --------------------------> scheduler
    replica environment (JSON, inherited by the EngineCore process): MeterSettings, SchedulerSettings

Units are in the field names and converted once, where the settings are made from the config.
"""

from __future__ import annotations

import msgspec

# The environment variables the replica sets before vLLM starts its EngineCore process.
METER_ENV = "FACTORY_METER"
SCHEDULER_ENV = "FACTORY_SCHEDULER"


class MeterSettings(msgspec.Struct, frozen=True):
    """How the engine meter measures and where it reports (built by ReplicaMeter)."""

    endpoint: str  # the replica's meter socket (ZeroMQ IPC address)
    source: str  # auto | nvml | modeled
    interval_s: float  # sampler period
    idle_w: float  # modeled source: power with nothing running
    max_w: float  # modeled source: power while busy
    prefill_weight: float  # energy of a prompt token relative to a generated one
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


class SchedulerSettings(msgspec.Struct, frozen=True):
    """What the energy-aware scheduler is told (built by factory.app from the config)."""

    slo_ttft_s: float | None = None  # p99 targets; None = no target
    slo_tpot_s: float | None = None
    profile: str | None = None  # energy profile path, None = learn from the first steps
    admission_horizon_tokens: int = 128  # KV room kept for each running request's growth
    nvml_power_limit: bool = False  # consent to set the boards' power limit
    nvml_locked_clocks: bool = False  # consent to lock their clocks
    control_endpoint: str | None = None  # the replica's control socket (set by ReplicaMeter)


class Control(msgspec.Struct, frozen=True):
    """A governor decision on its way to the scheduler (applied at its next step)."""

    version: int
    power_cap_w: float | None
    sent_at: float  # when the governor decided, wall clock s
    forwarded_at: float  # when the replica passed it on
    batch_cap: int | None = None


class DeviceReading(msgspec.Struct, frozen=True):
    device: str
    energy_j: float  # since the meter started
    power_w: float
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    mig: bool = False


class SchedulerStats(msgspec.Struct, frozen=True):
    """The energy-aware scheduler's state, riding on each snapshot."""

    batch_cap: int  # running requests allowed this step
    token_budget: int  # tokens a step may carry
    duty: float  # share of time the engine may compute under its power cap
    power_cap_w: float | None
    control_version: int
    efficient_batch: int  # the policy's batch (fewest J/token within the SLO)
    reason: str
    preemptions: int
    cap_violations: int
    max_batch_seen: int
    steps: int
    step_energy_buckets_j: tuple[float, ...]
    step_energy_counts: tuple[int, ...]
    step_energy_sum_j: float
    paused_s: float  # cumulative time slept to hold the power cap
    idle_w: float


class Final(msgspec.Struct, frozen=True, tag="final"):
    """One engine request's end (completed or aborted): what it used."""

    request: str  # the factory's ledger id (several engine requests may share it: n > 1, prompt lists)
    engine_request: str
    tenant: str
    status: str  # completed | aborted
    energy_j: float
    busy_s: float
    prompt_tokens: int
    completion_tokens: int
    source: str  # nvml | modeled
    ttft_s: float | None = None
    tpot_s: float | None = None
    cached_tokens: int = 0  # of prompt_tokens, found in the prefix cache


class Snapshot(msgspec.Struct, frozen=True, tag="snapshot"):
    """The engine meter's totals after each sample."""

    source: str
    devices: tuple[DeviceReading, ...]
    observed_j: float  # energy measured since the meter started
    idle_j: float  # ... of it with no request running
    attributed_j: dict[str, float]  # tenant -> J attributed to its requests
    tokens: dict[str, tuple[int, int]]  # tenant -> (prompt, completion) tokens
    busy_s: float
    running: int
    time_s: float  # wall clock of the sample
    slo_attainment: dict[str, float] | None = None  # ttft / tpot -> share of recent requests on target
    scheduler: SchedulerStats | None = None


class ControlApplied(msgspec.Struct, frozen=True, tag="control_applied"):
    """The scheduler's acknowledgement: when a control message took effect."""

    version: int
    sent_at: float
    forwarded_at: float | None
    applied_at: float


MeterMessage = Final | Snapshot | ControlApplied

_encoder = msgspec.msgpack.Encoder()
_meter_decoder = msgspec.msgpack.Decoder(MeterMessage)
_control_decoder = msgspec.msgpack.Decoder(Control)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_meter(data: bytes) -> MeterMessage:
    return _meter_decoder.decode(data)


def decode_control(data: bytes) -> Control:
    return _control_decoder.decode(data)


def settings_json(settings: msgspec.Struct) -> str:
    return msgspec.json.encode(settings).decode()


def meter_settings(raw: str) -> MeterSettings:
    return msgspec.json.decode(raw, type=MeterSettings)


def scheduler_settings(raw: str) -> SchedulerSettings:
    return msgspec.json.decode(raw, type=SchedulerSettings)
