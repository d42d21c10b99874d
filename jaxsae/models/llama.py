"""Llama (Llama 2 and 3, 3.1, 3.2) in Flax Linen, and its family entry (config whitelist, HF table, unembedding).

Quirks handled here:
- RMSNorm without Gemma's `1 +`: normalised in float32, cast back to the activation dtype, *then*
  multiplied by the weight (as transformers does; Gemma multiplies before the cast);
- SwiGLU MLP, down(silu(gate(x)) * up(x)), with optional biases (`mlp_bias`);
- grouped-query attention, optional q/k/v/o biases (`attention_bias`), `head_dim` independent of
  d_model / n_heads (Llama 3.2);
- RoPE over the whole head, by default or with Llama 3.1's frequency-dependent scaling
  (`rope_type: llama3`, `llama3_inv_freq`);
- tied (Llama 3.2 1B/3B) or untied (`lm_head`) unembedding; no embedding scale.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.models import hf
from jaxsae.models.family import Family, register
from jaxsae.models.hf import CheckpointError, Rule, Transform, heads_in, heads_out, identity, transpose
from jaxsae.models.layers import ACTIVATIONS, AttentionMask, attend, param, rotary, run_blocks, unembed_f32


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None  # None: default RoPE
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"

    arch = "llama"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def llama3_inv_freq(head_dim: int, base: float, s: Llama3RopeScaling | None) -> np.ndarray:
    """RoPE inverse frequencies f32[head_dim / 2], default or Llama-3.1-scaled.

    With wavelength λ = 2π / f: λ < L / high_freq_factor keeps f; λ > L / low_freq_factor uses f / factor;
    in between f blends linearly in L / λ (L = original_max_position_embeddings). float32 throughout, as
    transformers computes it.
    """
    f32 = np.float32
    inv = (f32(1.0) / (f32(base) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))).astype(f32)
    if s is None:
        return inv
    L = f32(s.original_max_position_embeddings)
    low_wavelen, high_wavelen = L / f32(s.low_freq_factor), L / f32(s.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / f32(s.factor), inv)
    smooth = (L / wavelen - f32(s.low_freq_factor)) / f32(s.high_freq_factor - s.low_freq_factor)
    blended = (f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(f32)


class LlamaRMSNorm(nn.Module):
    """x: [..., D] -> w * (x / rms(x)), normalised in float32 and cast back before the multiply."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = param(self, "scale", (x.shape[-1],), ("embed",), self.dtype, nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)).astype(x.dtype)
        return w * y


def _heads(module: nn.Module, name: str, x: jax.Array, n: int, heads_axis: str, bias: bool) -> jax.Array:
    """Projection x: [b, t, D] -> [b, t, n, head_dim] with kernel `{name}_kernel` (and `{name}_bias`)."""
    c = module.cfg
    y = jnp.einsum("btD,Dhd->bthd", x, param(module, f"{name}_kernel", (c.d_model, n, c.head_dim),
                                             ("embed", heads_axis, "head_dim"), c.jnp_dtype))
    if bias:
        y = y + param(module, f"{name}_bias", (n, c.head_dim), (heads_axis, "head_dim"), c.jnp_dtype,
                      nn.initializers.zeros)
    return y


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        """x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype
        bias = c.attention_bias
        q = _heads(self, "q", x, c.n_heads, "heads", bias)
        k = _heads(self, "k", x, c.n_kv_heads, "kv_heads", bias)
        v = _heads(self, "v", x, c.n_kv_heads, "kv_heads", bias)
        pos = jnp.arange(x.shape[1])
        inv_freq = llama3_inv_freq(c.head_dim, c.rope_base, c.rope_scaling)
        q = rotary(q, pos, c.head_dim, c.rope_base, inv_freq)
        k = rotary(k, pos, c.head_dim, c.rope_base, inv_freq)
        o = attend(q, k, v, mask, scale=c.head_dim**-0.5)
        out = jnp.einsum("bthd,hdD->btD", o, param(self, "o_kernel", (c.n_heads, c.head_dim, c.d_model),
                                                   ("heads", "head_dim", "embed"), dt))
        if bias:
            out = out + param(self, "o_bias", (c.d_model,), ("embed",), dt, nn.initializers.zeros)
        return out


class LlamaMLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU: down(act(gate(x)) * up(x)); x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype

        def linear(name, h, n_in, n_out, axes):
            y = h @ param(self, f"{name}_kernel", (n_in, n_out), axes, dt)
            if c.mlp_bias:
                y = y + param(self, f"{name}_bias", (n_out,), axes[1:], dt, nn.initializers.zeros)
            return y

        gate = linear("gate", x, c.d_model, c.d_mlp, ("embed", "mlp"))
        up = linear("up", x, c.d_model, c.d_mlp, ("embed", "mlp"))
        return linear("down", ACTIVATIONS[c.hidden_act](gate) * up, c.d_mlp, c.d_model, ("mlp", "embed"))


class LlamaBlock(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        c = self.cfg
        x = x + LlamaAttention(c, name="self_attn")(LlamaRMSNorm(c.rms_norm_eps, c.jnp_dtype,
                                                                 name="input_layernorm")(x), mask)
        return x + LlamaMLP(c, name="mlp")(LlamaRMSNorm(c.rms_norm_eps, c.jnp_dtype,
                                                       name="post_attention_layernorm")(x))


class Llama(nn.Module):
    """The whole model; call `embed`, `blocks` and `unembed` through `apply(..., method=...)`."""

    cfg: LlamaConfig

    def setup(self):
        c, dt = self.cfg, self.cfg.jnp_dtype
        init = nn.initializers.normal(0.02)
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(init, ("vocab", "embed")), (c.vocab_size, c.d_model), dt)
        self.layers = [LlamaBlock(c) for _ in range(c.n_layers)]
        self.norm = LlamaRMSNorm(c.rms_norm_eps, dt)
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(init, ("embed", "vocab")), (c.d_model, c.vocab_size), dt)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[b, t] -> residual [b, t, D]."""
        return jnp.take(self.embed_tokens, tokens, axis=0)

    def blocks(self, h: jax.Array, start: int, stop: int, key_valid: jax.Array | None = None) -> jax.Array:
        """Runs blocks start..stop-1 on the residual h: [b, t, D] -> [b, t, D]."""
        return run_blocks(self.layers, h, start, stop, key_valid)

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final norm and unembedding: [b, t, D] -> logits f32[b, t, V] (float32 in any dtype: `unembed_f32`)."""
        w = self.embed_tokens.T if self.cfg.tie_word_embeddings else self.lm_head
        return unembed_f32(self.norm(h), w)

    def __call__(self, tokens: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        return self.unembed(self.blocks(self.embed(tokens), 0, self.cfg.n_layers, key_valid))


# ------------------------------------------------------------------------------------- the family

_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters",
    "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
    # Tensor-parallel slicing of the projections at pre-training time: the same sums in another order
    # (transformers 5 ignores it).
    "pretraining_tp",
}
_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(rope: dict, raw: dict) -> Llama3RopeScaling | None:
    if rope["rope_type"] == "default":
        return None
    # transformers falls back to max_position_embeddings for a missing original length
    values = {"original_max_position_embeddings": raw.get("max_position_embeddings"), **rope}
    missing = [k for k in _LLAMA3 if values.get(k) is None]
    if missing:
        raise CheckpointError(f"rope_type='llama3' needs {missing} in rope_parameters / rope_scaling; fix config.json")
    s = Llama3RopeScaling(float(values["factor"]), float(values["low_freq_factor"]),
                          float(values["high_freq_factor"]), int(values["original_max_position_embeddings"]))
    if not s.high_freq_factor > s.low_freq_factor:
        raise CheckpointError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {s}; fix config.json")
    return s


def parse_config(raw: dict, dtype: str) -> LlamaConfig:
    """config.json of model_type llama -> LlamaConfig (old `rope_scaling` or transformers 5's `rope_parameters`)."""
    hf.check_keys(raw, _KEYS, "llama")
    rope = hf.rope_parameters(raw, {"default": set(), "llama3": set(_LLAMA3)})
    d_model, n_heads = raw["hidden_size"], raw["num_attention_heads"]
    n_kv_heads = raw.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise CheckpointError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}; "
                              "fix config.json")
    return LlamaConfig(
        vocab_size=raw["vocab_size"], d_model=d_model, n_layers=raw["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=raw.get("head_dim") or d_model // n_heads, d_mlp=raw["intermediate_size"],
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(rope, raw), hidden_act=hf.activation(raw.get("hidden_act", "silu")),
        attention_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)), dtype=dtype,
    )


def heads_bias(n_heads: int) -> Transform:
    """torch Linear bias [h*d] <-> our [h, d]."""
    return Transform(lambda b: b.reshape(n_heads, -1), lambda b: b.reshape(-1))


def conversion_table(c: LlamaConfig) -> list[Rule]:
    rules: list[Rule] = [("embed_tokens", "model.embed_tokens.weight", identity),
                         ("norm/scale", "model.norm.weight", identity)]
    if not c.tie_word_embeddings:
        rules.append(("lm_head", "lm_head.weight", transpose))
    heads = {"q": c.n_heads, "k": c.n_kv_heads, "v": c.n_kv_heads}
    for i in range(c.n_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        rules += [(f"{ours}/{n}/scale", f"{theirs}.{n}.weight", identity)
                  for n in ("input_layernorm", "post_attention_layernorm")]
        attn, mlp = (f"{ours}/self_attn", f"{theirs}.self_attn"), (f"{ours}/mlp", f"{theirs}.mlp")
        for p, n in heads.items():
            rules.append((f"{attn[0]}/{p}_kernel", f"{attn[1]}.{p}_proj.weight", heads_in(n)))
            if c.attention_bias:
                rules.append((f"{attn[0]}/{p}_bias", f"{attn[1]}.{p}_proj.bias", heads_bias(n)))
        rules.append((f"{attn[0]}/o_kernel", f"{attn[1]}.o_proj.weight", heads_out(c.n_heads)))
        if c.attention_bias:
            rules.append((f"{attn[0]}/o_bias", f"{attn[1]}.o_proj.bias", identity))
        for p in ("gate", "up", "down"):
            rules.append((f"{mlp[0]}/{p}_kernel", f"{mlp[1]}.{p}_proj.weight", transpose))
            if c.mlp_bias:
                rules.append((f"{mlp[0]}/{p}_bias", f"{mlp[1]}.{p}_proj.bias", identity))
    return rules


def final_norm_and_unembed(params, c: LlamaConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """RMSNorm weight f32[D], W_U f32[D, V] (`lm_head`, or `embed_tokens`^T when tied), no centring."""
    W_U = params["embed_tokens"].T if c.tie_word_embeddings else params["lm_head"]
    return np.asarray(params["norm"]["scale"], np.float32), np.asarray(W_U, np.float32), False


FAMILY = register(Family("llama", ("llama",), LlamaConfig, Llama, parse_config, conversion_table,
                         final_norm_and_unembed))
