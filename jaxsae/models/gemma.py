"""Gemma 1 and Gemma 2 in Flax Linen (one module: Gemma 2 is Gemma 1 plus a few switches).

Quirks handled here (see `hf.py` for the weight side):
- RMSNorm scales by (1 + w), in float32 (`layers.GemmaRMSNorm`);
- embeddings are multiplied by √d_model rounded to the activation dtype first;
- GeGLU MLP with tanh-approximated GELU; tied unembedding;
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

from jaxsae.models.layers import ACTIVATIONS, GemmaRMSNorm, attend, attention_mask, param, rotary, sqrt_in_dtype


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
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
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
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
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
        masks: dict[int | None, jax.Array] = {}
        for i in range(start, stop):
            w = self.cfg.window(i)
            if w not in masks:
                masks[w] = attention_mask(h.shape[1], w, key_valid)
            h = self.layers[i](h, masks[w])
        return h

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final norm, tied unembedding, optional final soft-cap: [b, t, D] -> logits [b, t, V]."""
        logits = self.norm(h) @ self.embed_tokens.T
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = (jnp.tanh(logits.astype(jnp.float32) / cap) * cap).astype(logits.dtype)
        return logits

    def __call__(self, tokens: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        return self.unembed(self.blocks(self.embed(tokens), 0, self.cfg.n_layers, key_valid))
