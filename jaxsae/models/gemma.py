"""Gemma 1 and Gemma 2 in Flax Linen (one module: Gemma 2 is Gemma 1 plus a few switches), and their
family entry (config whitelist, HF table, unembedding).

Quirks handled here:
- RMSNorm scales by (1 + w), in float32 (`layers.GemmaRMSNorm`);
- embeddings are multiplied by √d_model rounded to the activation dtype first;
- GeGLU MLP with tanh-approximated GELU (legacy configs say "gelu" and mean it); tied unembedding;
- multi-query / grouped-query attention, with `head_dim` independent of d_model / n_heads;
- Gemma 2: norms after attention and after the MLP as well as before, attention-logit and
  final-logit soft-capping, sliding-window attention on alternating layers (layer 0 slides),
  and queries scaled by `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.models import hf
from jaxsae.models.family import Family, register
from jaxsae.models.hf import CheckpointError, Rule, heads_in, heads_out, identity, transpose
from jaxsae.models.layers import (ACTIVATIONS, AttentionMask, GemmaRMSNorm, attend, param, rotary, run_blocks,
                                  sqrt_in_dtype, unembed_f32)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    version: int = 1  # 1 or 2
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float | None = None  # Gemma 2; None means head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    # One entry per layer: "sliding_attention" or "full_attention" (Gemma 2); empty means all full.
    layer_types: tuple[str, ...] = ()
    max_position_embeddings: int = 8192
    dtype: str = "float32"

    @property
    def arch(self) -> str:
        return "gemma2" if self.version == 2 else "gemma"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def window(self, layer: int) -> int | None:
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


class GemmaAttention(nn.Module):
    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        """x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype
        D, h, kv, d = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        q = jnp.einsum("btD,Dhd->bthd", x, param(self, "q_kernel", (D, h, d), ("embed", "heads", "head_dim"), dt))
        k = jnp.einsum("btD,Dkd->btkd", x, param(self, "k_kernel", (D, kv, d), ("embed", "kv_heads", "head_dim"), dt))
        v = jnp.einsum("btD,Dkd->btkd", x, param(self, "v_kernel", (D, kv, d), ("embed", "kv_heads", "head_dim"), dt))
        pos = jnp.arange(x.shape[1])
        q = rotary(q, pos, d, c.rope_base)
        k = rotary(k, pos, d, c.rope_base)
        scalar = c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else d
        o = attend(q, k, v, mask, scale=scalar**-0.5, softcap=c.attn_logit_softcapping)
        return jnp.einsum("bthd,hdD->btD", o, param(self, "o_kernel", (h, d, D), ("heads", "head_dim", "embed"), dt))


class GemmaMLP(nn.Module):
    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """GeGLU: down(act(gate(x)) * up(x)); x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype
        gate = x @ param(self, "gate_kernel", (c.d_model, c.d_mlp), ("embed", "mlp"), dt)
        up = x @ param(self, "up_kernel", (c.d_model, c.d_mlp), ("embed", "mlp"), dt)
        return (ACTIVATIONS[c.hidden_act](gate) * up) @ param(
            self, "down_kernel", (c.d_mlp, c.d_model), ("mlp", "embed"), dt)


class GemmaBlock(nn.Module):
    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        c, dt = self.cfg, self.cfg.jnp_dtype
        norm = lambda name: GemmaRMSNorm(c.rms_norm_eps, dt, name=name)  # noqa: E731
        a = GemmaAttention(c, name="self_attn")(norm("input_layernorm")(x), mask)
        if c.version == 2:
            # Gemma 2 norms the branch output too; HF calls that norm post_attention_layernorm.
            x = x + norm("post_attention_layernorm")(a)
            m = GemmaMLP(c, name="mlp")(norm("pre_feedforward_layernorm")(x))
            return x + norm("post_feedforward_layernorm")(m)
        # In Gemma 1, HF's post_attention_layernorm is the norm in front of the MLP.
        x = x + a
        return x + GemmaMLP(c, name="mlp")(norm("post_attention_layernorm")(x))


class Gemma(nn.Module):
    """The whole model; call `embed`, `blocks` and `unembed` through `apply(..., method=...)`."""

    cfg: GemmaConfig

    def setup(self):
        c, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.d_model), dt)
        self.layers = [GemmaBlock(c) for _ in range(c.n_layers)]
        self.norm = GemmaRMSNorm(c.rms_norm_eps, dt)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[b, t] -> residual [b, t, D], scaled by √D in the activation dtype."""
        e = jnp.take(self.embed_tokens, tokens, axis=0)
        return e * sqrt_in_dtype(self.cfg.d_model, e.dtype)

    def blocks(self, h: jax.Array, start: int, stop: int, key_valid: jax.Array | None = None) -> jax.Array:
        """Runs blocks start..stop-1 on the residual h: [b, t, D] -> [b, t, D]."""
        return run_blocks(self.layers, h, start, stop, key_valid, self.cfg.window)

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final norm, tied unembedding, optional final soft-cap: [b, t, D] -> logits f32[b, t, V]."""
        logits = unembed_f32(self.norm(h), self.embed_tokens.T)  # float32 (see unembed_f32)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, tokens: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        return self.unembed(self.blocks(self.embed(tokens), 0, self.cfg.n_layers, key_valid))


# ------------------------------------------------------------------------------------- the family

_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "hidden_act", "hidden_activation", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "attention_bias", "tie_word_embeddings",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
    "layer_types", "sliding_window_pattern",
}


def parse_config(raw: dict, dtype: str) -> GemmaConfig:
    """config.json of model_type gemma or gemma2 -> GemmaConfig (version 1 or 2)."""
    hf.check_keys(raw, _KEYS, "gemma")
    version = 2 if raw["model_type"] == "gemma2" else 1
    rope = hf.rope_parameters(raw, {"default": set()})
    if raw.get("attention_bias"):
        raise CheckpointError("attention_bias=true is not supported for Gemma; official checkpoints have none")
    if not raw.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings=false is not supported for Gemma; official checkpoints tie them")
    n_layers = raw["num_hidden_layers"]
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":  # legacy Gemma configs say "gelu" but mean the tanh approximation (as transformers does)
        act = "gelu_pytorch_tanh"
    layer_types: tuple[str, ...] = ()
    if version == 2:
        layer_types = tuple(raw.get("layer_types") or
                            ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)])
        if len(layer_types) != n_layers:
            raise CheckpointError(f"layer_types has {len(layer_types)} entries for {n_layers} layers; fix config.json")
    v2 = lambda key: raw.get(key) if version == 2 else None  # noqa: E731 -- Gemma 2's switches only
    d_model, n_heads = raw["hidden_size"], raw["num_attention_heads"]
    return GemmaConfig(
        vocab_size=raw["vocab_size"], d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads", n_heads),
        head_dim=raw.get("head_dim") or d_model // n_heads, d_mlp=raw["intermediate_size"], version=version,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        hidden_act=hf.activation(act), query_pre_attn_scalar=v2("query_pre_attn_scalar"),
        attn_logit_softcapping=v2("attn_logit_softcapping"), final_logit_softcapping=v2("final_logit_softcapping"),
        sliding_window=v2("sliding_window"), layer_types=layer_types,
        max_position_embeddings=int(raw.get("max_position_embeddings", 8192)), dtype=dtype,
    )


def conversion_table(c: GemmaConfig) -> list[Rule]:
    rules: list[Rule] = [("embed_tokens", "model.embed_tokens.weight", identity),
                         ("norm/scale", "model.norm.weight", identity)]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c.version == 2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(c.n_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        rules += [(f"{ours}/{n}/scale", f"{theirs}.{n}.weight", identity) for n in norms]
        rules += [(f"{ours}/self_attn/q_kernel", f"{theirs}.self_attn.q_proj.weight", heads_in(c.n_heads)),
                  (f"{ours}/self_attn/k_kernel", f"{theirs}.self_attn.k_proj.weight", heads_in(c.n_kv_heads)),
                  (f"{ours}/self_attn/v_kernel", f"{theirs}.self_attn.v_proj.weight", heads_in(c.n_kv_heads)),
                  (f"{ours}/self_attn/o_kernel", f"{theirs}.self_attn.o_proj.weight", heads_out(c.n_heads)),
                  (f"{ours}/mlp/gate_kernel", f"{theirs}.mlp.gate_proj.weight", transpose),
                  (f"{ours}/mlp/up_kernel", f"{theirs}.mlp.up_proj.weight", transpose),
                  (f"{ours}/mlp/down_kernel", f"{theirs}.mlp.down_proj.weight", transpose)]
    return rules


def final_norm_and_unembed(params, c: GemmaConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """RMSNorm's effective weight 1 + w f32[D], the tied W_U = embed_tokens^T f32[D, V], no centring."""
    return (1.0 + np.asarray(params["norm"]["scale"], np.float32),
            np.asarray(params["embed_tokens"], np.float32).T, False)


FAMILY = register(Family("gemma", ("gemma", "gemma2"), GemmaConfig, Gemma, parse_config, conversion_table,
                         final_norm_and_unembed))
