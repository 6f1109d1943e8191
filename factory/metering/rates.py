"""One token unit across models: what a request costs in factory tokens.

Packages are sold in factory tokens. Each model has three rates, in factory tokens per raw token:
per fresh input (prompt) token, per cached input token (served from the prefix cache: no prefill
computed) and per output token. A request is billed once, rounded up to a whole factory token:

    billed = ceil(input x (prompt - cached) + cached_input x cached + output x completion)

and reserved at its worst case before it runs, `ceil(input x prompt + output x max_tokens)` (no
prefix hit assumed, every token it may generate). Rates of 1 / 1 / 1 are the raw count, what the
ledger charged before it knew rates, and the default.

`rates: auto` derives them from energy (`derive`): one factory token is the energy of one output
token of the reference model (the published H100 / Llama-3.1-8B profile at batch 256 by
default), so a factory token buys about the same joules on every model. A model's output rate is
its decode J/token over the reference's, its input rate its prefill J/token over the same, and a
cached input token is charged `CACHED_SHARE` of a fresh one: it skips the prefill's compute, not
the KV cache it occupies. `factory rates CONFIG` prints the derivation.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

# What a cached prompt token costs as a share of a fresh one under `rates: auto`. Its prefill is
# skipped, but it still holds KV cache for the whole request and is attended to at every step.
CACHED_SHARE = Decimal("0.1")
# The operating point J/token is read at: a busy server (a profile's figure at its largest
# measured batch up to this one).
REFERENCE_BATCH = 256
SIGNIFICANT = 3  # digits a derived rate keeps


@dataclasses.dataclass(frozen=True, slots=True)
class Rates:
    """Factory tokens per raw token."""

    input: Decimal = Decimal(1)
    cached_input: Decimal = Decimal(1)
    output: Decimal = Decimal(1)

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"rate {name} must be a finite Decimal >= 0, got {value!r}")
        if self.cached_input > self.input:
            raise ValueError(f"cached_input ({self.cached_input}) must not exceed input ({self.input})")

    def worst(self, prompt_tokens: int, max_output_tokens: int) -> int:
        """What a request may cost at most: no prefix hit, every output token it may make."""
        return _ceil(self.input * prompt_tokens + self.output * max_output_tokens)

    def billed(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """What a request costs, in whole factory tokens."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return _ceil(
            self.input * (prompt_tokens - cached) + self.cached_input * cached + self.output * completion_tokens
        )

    @property
    def raw(self) -> bool:
        return self.input == self.cached_input == self.output == 1


RAW = Rates()


def _ceil(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def rounded(value: float) -> Decimal:
    """`value` to SIGNIFICANT digits, as a Decimal (a rate an operator can read and publish)."""
    if value <= 0:
        return Decimal(0)
    digits = SIGNIFICANT - 1 - math.floor(math.log10(value))
    return Decimal(str(round(value, digits))).normalize()


@dataclasses.dataclass(frozen=True, slots=True)
class Derivation:
    """How `rates: auto` priced one model: the figures it read and the rates they give."""

    model: str
    profile: str
    batch: int
    decode_j_per_tok: float
    prefill_j_per_tok: float | None  # None: the profile has no prefill points (input priced as output)
    reference: str
    reference_batch: int
    reference_j_per_tok: float
    rates: Rates


def operating_batch(profile, phase: str, batch: int = REFERENCE_BATCH) -> int | None:
    """The largest batch the profile has for `phase`, up to `batch`; None if it has no points."""
    try:
        batches = sorted({p.batch for p in profile.curve(phase)})
    except LookupError:
        return None
    fitting = [b for b in batches if b <= batch]
    return fitting[-1] if fitting else batches[0]


def busy_j_per_tok(profile, phase: str) -> tuple[int, float] | None:
    """(batch, J/token) of `phase` at the profile's busy operating batch; None if it has no points."""
    batch = operating_batch(profile, phase)
    return None if batch is None else (batch, profile.j_per_tok(batch, phase=phase))


def derive(model: str, profile_path: Path, reference_path: Path) -> Derivation:
    """Rates for `model` from its energy profile, in output tokens of the reference model."""
    from factory.policy.profile import load_profile

    profile, reference = load_profile(profile_path), load_profile(reference_path)
    ref, decode = busy_j_per_tok(reference, "decode"), busy_j_per_tok(profile, "decode")
    if ref is None or decode is None:
        raise ValueError(f"{profile_path if decode is None else reference_path} has no decode points to price by")
    (ref_batch, ref_j), (batch, decode_j) = ref, decode
    prefill = busy_j_per_tok(profile, "prefill")
    prefill_j = None if prefill is None else prefill[1]
    output = rounded(decode_j / ref_j)
    fresh = rounded((prefill_j if prefill_j is not None else decode_j) / ref_j)
    rates = Rates(input=fresh, cached_input=rounded(float(fresh * CACHED_SHARE)), output=output)
    return Derivation(
        model, str(profile_path), batch, decode_j, prefill_j, str(reference_path), ref_batch, ref_j, rates
    )


def for_model(model, scheduler, gpu: bool) -> tuple[Rates, Derivation | None]:
    """A configured model's rates (config.ModelConfig), and how they were derived under `auto`."""
    if model.rates != "auto":
        return model.rates.rates(), None
    from factory.config import AUTO_PROFILE_GPU

    path = Path.cwd() / model.energy_profile if model.energy_profile else scheduler.profile_path(gpu)
    if path is None:  # (config validation refuses this)
        raise ValueError(f"model {model.served_name}: rates: auto needs an energy profile")
    found = derive(model.served_name, path, AUTO_PROFILE_GPU)
    return found.rates, found


@dataclasses.dataclass(frozen=True, slots=True)
class PriceRow:
    """What a pack buys on one model, in requests of a stated size."""

    model: str
    rates: Rates
    derivation: Derivation | None
    per_request: int  # factory tokens
    requests: int  # whole requests the pack pays for
    energy_j: tuple[float, str] | None  # per request by the profile, and its source (None: no profile)
    price_per_request: Decimal


def request_energy_j(profile_path: Path, prompt: int, output: int) -> tuple[float, str] | None:
    """A request's energy on a busy server by the profile (prefill J/token x prompt + decode J/token
    x output; decode's figure for the prompt where the profile has no prefill points), and how the
    profile knows it (measured, published, modeled); None without decode points."""
    from factory.policy.profile import load_profile

    profile = load_profile(profile_path)
    decode = busy_j_per_tok(profile, "decode")
    if decode is None:
        return None
    prefill = busy_j_per_tok(profile, "prefill") or decode
    return prompt * prefill[1] + output * decode[1], profile.source


def price_list(cfg, gpu: bool, pack_tokens: int, pack_price: Decimal, prompt: int, output: int) -> list[PriceRow]:
    """Every configured model's rates and what a pack of `pack_tokens` factory tokens at
    `pack_price` buys on it, in requests of `prompt` + `output` tokens (no prefix hit)."""
    rows = []
    for m in cfg.models:
        rates, found = for_model(m, cfg.scheduler, gpu)
        per_request = rates.billed(prompt, 0, output)
        path = Path(found.profile) if found is not None else cfg.scheduler.profile_path(gpu)
        energy = request_energy_j(path, prompt, output) if path is not None and path.exists() else None
        price = (pack_price * per_request / pack_tokens) if pack_tokens else Decimal(0)
        rows.append(PriceRow(m.served_name, rates, found, per_request, pack_tokens // max(per_request, 1), energy,
                             price))  # fmt: skip
    return rows
