"""Model shapes, their FLOP and byte counts per step, and one decode or prefill step of a
Llama-style decoder on random weights (energy depends on shapes and data movement, not on the
values a checkpoint would hold).

The step: per layer RMSNorm, fused QKV projection, attention via torch's SDPA (grouped-query, no
RoPE), O projection, residual, RMSNorm, SwiGLU MLP (fused gate+up, then down), residual; then a
final norm and the lm_head. Decode runs one new token per sequence against `context` keys; prefill
runs `context` new tokens per sequence with causal attention and logits for the last one only, as
vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PHASES = ("decode", "prefill")
CPU_SHAPES = ("tiny", "smollm2-135m")  # small enough for a modeled CPU dry run
# torch >= 2.5 repeats the KV heads inside SDPA; older ones need them repeated by hand.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(frozen=True, slots=True)
class Shape:
    """A decoder's dimensions. Only `probe_layers` of the `layers` are built and run; the layer
    stack's time and energy are scaled by `layer_scale` (= layers / probe_layers), the lm_head is
    counted once."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    probe_layers: int

    def __post_init__(self):
        if not 0 < self.probe_layers <= self.layers:
            raise ValueError(f"{self.name}: probe_layers must be in 1..layers")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads must be a multiple of kv_heads")

    @property
    def layer_scale(self) -> float:
        return self.layers / self.probe_layers

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one layer: QKV, O, gate, up, down."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        return qkv + self.heads * self.head_dim * self.hidden + 3 * self.hidden * self.ffn


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, probe_layers=32),
        # 70B does not fit one GPU: 8 of its 80 layers run, the stack is scaled by 80 / 8.
        Shape("llama-3.1-70b-tp1-slice", 8192, 80, 64, 8, 128, 28672, 128256, probe_layers=8),
        Shape("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, probe_layers=30),
        Shape("tiny", 64, 2, 4, 2, 16, 128, 512, probe_layers=2),
    )
}


def get_shape(shape: str | Shape) -> Shape:
    if isinstance(shape, Shape):
        return shape
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def check_point(phase: str, batch: int, context: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1 (got {batch}, {context})")


def tokens_per_step(phase: str, batch: int, context: int) -> int:
    """Tokens one step produces (decode) or ingests (prefill)."""
    return batch if phase == "decode" else batch * context


def step_flops(shape: str | Shape, phase: str, batch: int, context: int) -> float:
    """FLOPs of one whole-model step (all `layers`, not only the probed ones): matmuls and
    attention at 2 per multiply-add; norms, activations and residuals left out. Decode attends
    each new token to `context` keys (itself included); prefill is causal (query i sees i + 1
    keys) and computes logits for the last token of each sequence only."""
    s = get_shape(shape)
    check_point(phase, batch, context)
    pairs = batch * context if phase == "decode" else batch * context * (context + 1) // 2
    attention = 4 * pairs * s.heads * s.head_dim  # QK^T and PV
    matmuls = 2 * tokens_per_step(phase, batch, context) * s.layer_matmul_params
    return float(s.layers * (matmuls + attention) + 2 * batch * s.hidden * s.vocab)


def step_bytes(shape: str | Shape, phase: str, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """Fewest bytes one whole-model step moves through device memory: every weight read once
    (norms and lm_head included, no embedding: the probe starts from hidden states) plus the KV
    cache. Decode reads `context` tokens' K and V per layer and writes the new token's; prefill
    writes `context` tokens' K and V per layer. Activations are left out."""
    s = get_shape(shape)
    check_point(phase, batch, context)
    weights = s.layers * (s.layer_matmul_params + 2 * s.hidden) + s.hidden + s.hidden * s.vocab
    kv_tokens = batch * (context + 1 if phase == "decode" else context)
    kv = s.layers * kv_tokens * 2 * s.kv_heads * s.head_dim
    return float((weights + kv) * dtype_bytes)


def footprint_bytes(shape: str | Shape, phase: str, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """Estimated memory a point needs beyond the weights (one layer's KV cache and the largest
    activations); the probe runs points in increasing order of it, so out-of-memory ones come last."""
    s = get_shape(shape)
    check_point(phase, batch, context)
    kv = 2 * batch * s.kv_heads * context * s.head_dim
    per_token = 2 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 2 * s.ffn
    return float((kv + tokens_per_step(phase, batch, context) * per_token + batch * s.vocab) * dtype_bytes)


@dataclass(slots=True)
class Model:
    """Random weights for `shape.probe_layers` layers on one device (bf16 on cuda, float32 on cpu)."""

    shape: Shape
    device: torch.device
    dtype: torch.dtype
    layers: list[dict[str, torch.Tensor]]
    norm: torch.Tensor
    lm_head: torch.Tensor


def build_model(shape: str | Shape, device: str | torch.device = "cuda", seed: int = 0) -> Model:
    s, device = get_shape(shape), torch.device(device)
    if device.type == "cpu" and s.name not in CPU_SHAPES:
        raise ValueError(
            f"shape {s.name!r} is too large for a CPU dry run: on --device cpu only {', '.join(CPU_SHAPES)} "
            "are allowed (the probe measures a GPU)"
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)

    def weight(out_features: int, in_features: int) -> torch.Tensor:  # unit-variance outputs
        w = torch.randn(out_features, in_features, generator=gen, device=device, dtype=dtype)
        return w.mul_(in_features**-0.5)

    def norm() -> torch.Tensor:
        return torch.rand(s.hidden, generator=gen, device=device, dtype=dtype).add_(0.5)

    qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
    layers = [
        {
            "attn_norm": norm(),
            "qkv": weight(qkv_out, s.hidden),
            "o": weight(s.hidden, s.heads * s.head_dim),
            "mlp_norm": norm(),
            "gate_up": weight(2 * s.ffn, s.hidden),
            "down": weight(s.hidden, s.ffn),
        }
        for _ in range(s.probe_layers)
    ]
    return Model(s, device, dtype, layers, norm(), weight(s.vocab, s.hidden))


def alloc_kv(model: Model, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V cache, [batch, kv_heads, context, head_dim], shared by every layer: the
    whole model's cache would not fit beside the weights (32 layers x batch 256 x 2048 tokens of
    llama-3.1-8b is 68 GB), and one layer's is far larger than L2, so each layer still reads it
    from device memory and the traffic stays realistic. Random, never zeros."""
    s = model.shape
    dims = (batch, s.kv_heads, context, s.head_dim)
    return tuple(torch.randn(dims, device=model.device, dtype=model.dtype) for _ in range(2))


def make_input(model: Model, phase: str, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Fresh random hidden states: [batch, hidden] for decode, [batch, context, hidden] for prefill."""
    batch, _, context, _ = kv[0].shape
    dims = (batch, model.shape.hidden) if phase == "decode" else (batch, context, model.shape.hidden)
    return torch.randn(dims, device=model.device, dtype=model.dtype)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-5)
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@torch.inference_mode()
def run_layers(model: Model, phase: str, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The probed layer stack. Decode writes the new token's K and V into the cache's last slot and
    attends over all `context` slots; prefill writes all `context` tokens' K and V, then attends
    causally."""
    s, (k_cache, v_cache) = model.shape, kv
    batch, _, context, d = k_cache.shape
    split = [s.heads * d, s.kv_heads * d, s.kv_heads * d]
    for p in model.layers:
        q, k, v = F.linear(_rms(x, p["attn_norm"]), p["qkv"]).split(split, dim=-1)
        if phase == "decode":
            k_cache[:, :, context - 1] = k.unflatten(-1, (s.kv_heads, d))
            v_cache[:, :, context - 1] = v.unflatten(-1, (s.kv_heads, d))
            q = q.unflatten(-1, (s.heads, 1, d))
            a = _attend(q, k_cache, v_cache, causal=False).flatten(1)
        else:
            k_cache.copy_(k.unflatten(-1, (s.kv_heads, d)).transpose(1, 2))
            v_cache.copy_(v.unflatten(-1, (s.kv_heads, d)).transpose(1, 2))
            q = q.unflatten(-1, (s.heads, d)).transpose(1, 2)
            a = _attend(q, k_cache, v_cache, causal=True).transpose(1, 2).flatten(2)
        x = x + F.linear(a, p["o"])
        gate, up = F.linear(_rms(x, p["mlp_norm"]), p["gate_up"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, p["down"])
    return x


@torch.inference_mode()
def run_head(model: Model, phase: str, x: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head: logits [batch, vocab] (prefill: the last token of each sequence)."""
    if phase == "prefill":
        x = x[:, -1]
    return F.linear(_rms(x, model.norm), model.lm_head)


def step(model: Model, phase: str, kv: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor | None = None):
    """One step on `x` (fresh random hidden states when None); returns the logits."""
    x = make_input(model, phase, kv) if x is None else x
    return run_head(model, phase, run_layers(model, phase, x, kv))


def decode_step(model: Model, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return step(model, "decode", kv)


def prefill_step(model: Model, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return step(model, "prefill", kv)
