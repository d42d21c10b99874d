"""GPT-NeoX (the Pythia family) in Flax Linen, and its family entry (config whitelist, HF table, unembedding).

Quirks handled here:
- parallel residual (`use_parallel_residual`): x + attn(ln1(x)) + mlp(ln2(x)), else the serial form;
- partial rotary: only the first `rotary_pct * head_dim` features of each head rotate;
- an untied unembedding (`embed_out`), unless `tie_word_embeddings`;
- the MLP activation is whatever `hidden_act` names (Pythia: exact-erf "gelu");
- HF's fused `query_key_value` is interleaved per head (`fused_qkv`).

The forward pass is cut into `embed`, `blocks(start, stop)` and `unembed` so callers can run the prefix
up to a hook layer once and the suffix more than once.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.models import hf
from jaxsae.models.family import Family, register
from jaxsae.models.hf import Rule, Transform, heads_out, identity, transpose
from jaxsae.models.layers import (ACTIVATIONS, AttentionMask, LayerNorm, attend, param, rotary, run_blocks,
                                  unembed_f32)


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"

    arch = "gpt_neox"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


class NeoXAttention(nn.Module):
    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        """x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype
        h, d, D = c.n_heads, c.head_dim, c.d_model
        qkv_axes = ("embed", "heads", "head_dim")
        q = jnp.einsum("btD,Dhd->bthd", x, param(self, "q_kernel", (D, h, d), qkv_axes, dt))
        k = jnp.einsum("btD,Dhd->bthd", x, param(self, "k_kernel", (D, h, d), qkv_axes, dt))
        v = jnp.einsum("btD,Dhd->bthd", x, param(self, "v_kernel", (D, h, d), qkv_axes, dt))
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q = q + param(self, "q_bias", (h, d), ("heads", "head_dim"), dt, zeros)
            k = k + param(self, "k_bias", (h, d), ("heads", "head_dim"), dt, zeros)
            v = v + param(self, "v_bias", (h, d), ("heads", "head_dim"), dt, zeros)
        pos = jnp.arange(x.shape[1])
        q = rotary(q, pos, c.rot_dim, c.rotary_base)
        k = rotary(k, pos, c.rot_dim, c.rotary_base)
        o = attend(q, k, v, mask, scale=d**-0.5)
        out = jnp.einsum("bthd,hdD->btD", o, param(self, "o_kernel", (h, d, D), ("heads", "head_dim", "embed"), dt))
        if c.attention_bias:
            out = out + param(self, "o_bias", (D,), ("embed",), dt, nn.initializers.zeros)
        return out


class NeoXMLP(nn.Module):
    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [b, t, D] -> [b, t, D]."""
        c, dt = self.cfg, self.cfg.jnp_dtype
        zeros = nn.initializers.zeros
        up = x @ param(self, "up_kernel", (c.d_model, c.d_mlp), ("embed", "mlp"), dt)
        up = up + param(self, "up_bias", (c.d_mlp,), ("mlp",), dt, zeros)
        act = ACTIVATIONS[c.hidden_act](up)
        down = act @ param(self, "down_kernel", (c.d_mlp, c.d_model), ("mlp", "embed"), dt)
        return down + param(self, "down_bias", (c.d_model,), ("embed",), dt, zeros)


class NeoXBlock(nn.Module):
    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        c = self.cfg
        ln1 = LayerNorm(c.layer_norm_eps, c.jnp_dtype, name="input_layernorm")
        ln2 = LayerNorm(c.layer_norm_eps, c.jnp_dtype, name="post_attention_layernorm")
        attn = NeoXAttention(c, name="attention")
        mlp = NeoXMLP(c, name="mlp")
        a = attn(ln1(x), mask)
        if c.use_parallel_residual:
            return x + a + mlp(ln2(x))
        x = x + a
        return x + mlp(ln2(x))


class GPTNeoX(nn.Module):
    """The whole model; call `embed`, `blocks` and `unembed` through `apply(..., method=...)`."""

    cfg: GPTNeoXConfig

    def setup(self):
        c, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_in = self.param(
            "embed_in", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.d_model), dt)
        self.layers = [NeoXBlock(c) for _ in range(c.n_layers)]
        self.final_layer_norm = LayerNorm(c.layer_norm_eps, dt)
        if not c.tie_word_embeddings:
            self.embed_out = self.param(
                "embed_out", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                (c.d_model, c.vocab_size), dt)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[b, t] -> residual [b, t, D]."""
        return jnp.take(self.embed_in, tokens, axis=0)

    def blocks(self, h: jax.Array, start: int, stop: int, key_valid: jax.Array | None = None) -> jax.Array:
        """Runs blocks start..stop-1 on the residual h: [b, t, D] -> [b, t, D]."""
        return run_blocks(self.layers, h, start, stop, key_valid)

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final norm and unembedding: [b, t, D] -> logits f32[b, t, V] (float32 in any dtype: `unembed_f32`)."""
        h = self.final_layer_norm(h)
        w = self.embed_in.T if self.cfg.tie_word_embeddings else self.embed_out
        return unembed_f32(h, w)

    def __call__(self, tokens: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        return self.unembed(self.blocks(self.embed(tokens), 0, self.cfg.n_layers, key_valid))


# ------------------------------------------------------------------------------------- the family

_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "rotary_pct", "rotary_emb_base", "rope_parameters", "rope_scaling", "rope_theta",
    "layer_norm_eps", "use_parallel_residual", "tie_word_embeddings", "attention_bias",
}


def parse_config(raw: dict, dtype: str) -> GPTNeoXConfig:
    """config.json -> GPTNeoXConfig (old flat rotary keys or transformers 5's `rope_parameters`)."""
    hf.check_keys(raw, _KEYS, "gpt_neox")
    rope = hf.rope_parameters(raw, {"default": {"partial_rotary_factor"}})
    return GPTNeoXConfig(
        vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=raw["num_attention_heads"], d_mlp=raw["intermediate_size"],
        rotary_pct=float(rope.get("partial_rotary_factor", raw.get("rotary_pct", 0.25))),
        rotary_base=float(rope.get("rope_theta", raw.get("rotary_emb_base", raw.get("rope_theta", 10000.0)))),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(raw.get("use_parallel_residual", True)),
        hidden_act=hf.activation(raw.get("hidden_act", "gelu")),
        attention_bias=bool(raw.get("attention_bias", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        dtype=dtype,
    )


def fused_qkv(n_heads: int, which: int, bias: bool) -> Transform:
    """GPT-NeoX's fused query_key_value is interleaved per head: rows are [h, (q|k|v), d].

    weight [3*h*d, D] <-> kernel [D, h, d]; bias [3*h*d] <-> [h, d]. `which`: 0 q, 1 k, 2 v.
    """
    if bias:
        return Transform(lambda b: b.reshape(n_heads, 3, -1)[:, which],
                         lambda parts: np.stack(parts, axis=1).reshape(-1), which, 3)
    return Transform(lambda w: w.reshape(n_heads, 3, -1, w.shape[-1])[:, which].transpose(2, 0, 1),
                     lambda parts: np.stack([k.transpose(1, 2, 0) for k in parts], axis=1).reshape(-1, parts[0].shape[0]),
                     which, 3)


def conversion_table(c: GPTNeoXConfig) -> list[Rule]:
    h = c.n_heads
    rules: list[Rule] = [("embed_in", "gpt_neox.embed_in.weight", identity),
                         ("final_layer_norm/scale", "gpt_neox.final_layer_norm.weight", identity),
                         ("final_layer_norm/bias", "gpt_neox.final_layer_norm.bias", identity)]
    if not c.tie_word_embeddings:
        rules.append(("embed_out", "embed_out.weight", transpose))
    for i in range(c.n_layers):
        ours, theirs = f"layers_{i}", f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            rules += [(f"{ours}/{ln}/scale", f"{theirs}.{ln}.weight", identity),
                      (f"{ours}/{ln}/bias", f"{theirs}.{ln}.bias", identity)]
        for j, name in enumerate("qkv"):
            rules.append((f"{ours}/attention/{name}_kernel", f"{theirs}.attention.query_key_value.weight",
                          fused_qkv(h, j, bias=False)))
            if c.attention_bias:
                rules.append((f"{ours}/attention/{name}_bias", f"{theirs}.attention.query_key_value.bias",
                              fused_qkv(h, j, bias=True)))
        rules.append((f"{ours}/attention/o_kernel", f"{theirs}.attention.dense.weight", heads_out(h)))
        if c.attention_bias:
            rules.append((f"{ours}/attention/o_bias", f"{theirs}.attention.dense.bias", identity))
        rules += [(f"{ours}/mlp/up_kernel", f"{theirs}.mlp.dense_h_to_4h.weight", transpose),
                  (f"{ours}/mlp/up_bias", f"{theirs}.mlp.dense_h_to_4h.bias", identity),
                  (f"{ours}/mlp/down_kernel", f"{theirs}.mlp.dense_4h_to_h.weight", transpose),
                  (f"{ours}/mlp/down_bias", f"{theirs}.mlp.dense_4h_to_h.bias", identity)]
    return rules


def final_norm_and_unembed(params, c: GPTNeoXConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """LayerNorm weight f32[D], W_U f32[D, V] (`embed_out`, or `embed_in`^T when tied), centring on."""
    W_U = params["embed_in"].T if c.tie_word_embeddings else params["embed_out"]
    return np.asarray(params["final_layer_norm"]["scale"], np.float32), np.asarray(W_U, np.float32), True


FAMILY = register(Family("gpt_neox", ("gpt_neox",), GPTNeoXConfig, GPTNeoX, parse_config, conversion_table,
                         final_norm_and_unembed))
