"""Building blocks shared by the ports: parameters with logical axes, norms, rotary, attention.

Every parameter is created through `param()`, which attaches logical axis names (`embed`, `heads`,
`head_dim`, `mlp`, `vocab`, ...). `jaxsae.sharding` maps those names onto a device mesh in one table;
nothing here knows about devices.

Shapes: `b` batch, `t` query positions, `s` key positions, `h` query heads, `k` key/value heads,
`g` query heads per key/value head, `d` head_dim, `D` d_model.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          dtype=jnp.float32, init: Callable = _INIT) -> jax.Array:
    """Declares `name` on `module` with logical axis names `axes` (one per dim)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# Activations by the names Hugging Face configs use. "gelu" is the exact erf form in transformers.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias over the last axis (GPT-NeoX). x: [..., D] -> [..., D]."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w = param(self, "scale", (d,), ("embed",), self.dtype, nn.initializers.ones)
        b = param(self, "bias", (d,), ("embed",), self.dtype, nn.initializers.zeros)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + w) before the cast back.

    The `1 +` is Gemma's quirk: the stored weight is zero-centred. transformers multiplies in float32
    and then casts (not cast-then-multiply as in Llama), and so do we. x: [..., D] -> [..., D].
    """

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = param(self, "scale", (x.shape[-1],), ("embed",), self.dtype, nn.initializers.zeros)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, rot_dim: int, base: float,
           inv_freq: jax.Array | None = None) -> jax.Array:
    """Rotary embedding on the first `rot_dim` features of each head ("rotate half" layout).

    x: [b, t, h, d]; positions: int[t]. Features past `rot_dim` pass through (GPT-NeoX's partial
    rotary). cos/sin are computed in float32 and cast to x's dtype, as transformers does.
    inv_freq: f32[rot_dim / 2] replaces the default base^(-2i / rot_dim) (scaled RoPE variants).
    """
    if rot_dim == 0:
        return x
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    assert inv_freq.shape == (rot_dim // 2,), (inv_freq.shape, rot_dim)
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [t, rot_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]  # [1, t, 1, rot_dim]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def attention_mask(t: int, sliding_window: int | None = None,
                   key_valid: jax.Array | None = None) -> jax.Array:
    """Boolean mask bool[b or 1, 1, 1, t, s]: causal, optionally banded and with invalid keys removed.

    A key j is visible from query i when j <= i, and, with a window w, j > i - w (transformers'
    sliding-window convention). key_valid: bool[b, s] marks padding as False.
    """
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    mask = j <= i
    if sliding_window is not None:
        mask = mask & (j > i - sliding_window)
    mask = mask[None, None, None]  # [1, 1, 1, t, s]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, None, :]
    return mask



class AttentionMask(NamedTuple):
    """Which keys each query sees, kept as its parts: key j is visible from query i when j <= i, with a
    window w also j > i - w (transformers' sliding-window convention), and key_valid[b, j].

    The parts, not a dense [t, s] array, reach `attend`, which skips the keys a block of queries cannot
    see (blocked attention), or hands them to cuDNN's flash attention on a GPU.
    """

    t: int
    window: int | None = None
    key_valid: jax.Array | None = None  # bool[b, s], padding False

    def dense(self) -> jax.Array:
        """bool[b or 1, 1, 1, t, s] (`attention_mask`)."""
        return attention_mask(self.t, self.window, self.key_valid)


def run_blocks(layers, h: jax.Array, start: int, stop: int, key_valid: jax.Array | None = None,
               window=lambda i: None) -> jax.Array:
    """Blocks layers[start:stop] on the residual h: [b, t, D] -> [b, t, D], each with its
    `AttentionMask` (window(i): block i's sliding window, None = full causal; Gemma 2 alternates two)."""
    for i in range(start, stop):
        h = layers[i](h, AttentionMask(h.shape[1], window(i), key_valid))
    return h


# Query positions per block of `attend`'s blocked path: each block of queries meets only the keys it can
# see (causal, and within a sliding window), so the masked upper triangle is mostly skipped. 128 measured
# best on CPU for t 256..1024 (a Pythia-70m-shaped block's attention, 8 x 256 tokens: 40 ms for the whole
# masked [t, s] softmax, 16 ms in blocks of 128, 18 ms in blocks of 64); a block as long as the sequence
# is the dense masked softmax.
ATTENTION_BLOCK = 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
           softcap: float | None = None, block: int = ATTENTION_BLOCK) -> jax.Array:
    """Scaled dot-product self-attention with grouped key/value heads.

    q: [b, t, h, d]; k, v: [b, t, kv, d] with h a multiple of kv. Returns [b, t, h, d]. The softmax
    runs in float32, its unnormalised terms meet v in the activation dtype (as transformers' probabilities
    do) with a float32 accumulation.
    On a GPU in bfloat16/float16 without a soft-cap: cuDNN's flash attention through
    `jax.nn.dot_product_attention`. Everywhere else (CPU, TPU, float32, Gemma 2's soft-capped logits):
    `blocked_attention`, the masked softmax computed per block of queries over the keys that block sees.
    """
    if softcap is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        out = _cudnn_attention(q, k, v, mask, scale)
        if out is not None:
            return out
    return blocked_attention(q, k, v, mask, scale, softcap, block)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
                      softcap: float | None = None, block: int = ATTENTION_BLOCK) -> jax.Array:
    """`attend` as a loop over blocks of `block` query positions, each against keys [lo, stop) only:
    stop is the block's end (causal) and lo the first key its first query's window reaches (0 without
    a window). Every key a block skips is masked for all of its queries, so each query's softmax has the
    same terms as the dense masked one, and the same value (a query with no visible key, padding itself,
    has no defined output in either). Logits are soft-capped before masking, as transformers does.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    # Head-major operands ([b, kv, g, t, d], [b, kv, s, d]): both einsums become plain batched
    # matmuls over contiguous [t, d] / [s, d] blocks (the whole forward of a Pythia-70m-shaped model
    # ran 1.16x faster on CPU than contracting the token-major layout in place; bench_collect.py).
    qg = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    dense = mask.dense()  # [b or 1, 1, 1, t, s]; each block reads its [tq, s] slice
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        lo = 0 if mask.window is None else max(0, start - mask.window + 1)
        logits = jnp.einsum("bkgtd,bksd->bkgts", qg[:, :, :, start:stop], kh[:, :, lo:stop])
        logits = (logits * jnp.asarray(scale, q.dtype)).astype(jnp.float32)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        logits = jnp.where(dense[..., start:stop, lo:stop], logits, jnp.finfo(jnp.float32).min)
        # softmax with the normalisation after the value matmul: dividing [t, d] instead of [t, s]
        # measured the attention 1.3-1.5x faster forward and backward on CPU (8 x 256 tokens, heads of
        # 32 and 64). The max is a constant of the softmax, so no gradient flows through it.
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        o = jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), vh[:, :, lo:stop], preferred_element_type=jnp.float32)
        outs.append((o / jnp.sum(e, axis=-1)[..., None]).astype(v.dtype))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                     scale: float) -> jax.Array | None:
    """cuDNN's flash attention (skips the masked half): causal and windowed by flags, padding by a key
    mask [b, 1, 1, s]. None where cuDNN does not take the shape or version (it fails at trace time)."""
    key_mask = None if mask.key_valid is None else mask.key_valid[:, None, None, :]
    # left window w - 1 and no right window: j in (i - w, i], the convention of `AttentionMask`
    window = None if mask.window is None else (mask.window - 1, 0)
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=key_mask, scale=scale, is_causal=True,
                                            local_window_size=window, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
        return None


def sqrt_in_dtype(n: int, dtype) -> jax.Array:
    """√n rounded to `dtype` first, as Gemma's embedding scale is (matters in bfloat16)."""
    return jnp.asarray(math.sqrt(n), dtype=jnp.float32).astype(dtype)


def unembed_f32(h: jax.Array, w: jax.Array) -> jax.Array:
    """Logits in float32 from the normed residual h [..., D] and W_U [D, V], in any activation dtype.

    The CE and the KL read these logits, and a bfloat16 LM's logits rounded to bfloat16 carry an error
    of ~2^-9 of their size (~0.03 at logit 10), several times the error of the matmul itself. The inputs stay
    in the LM's dtype and only the accumulation and the output are float32: an upcast of h and W_U
    before the matmul measured no closer to a float32 LM on the shipped model (KL to it 1.00e-4 vs 1.01e-4
    nats/token over the whole forward), but would run the largest matmul of a big-vocabulary model in
    float32 on the accelerator and hold a float32 copy of W_U (Gemma 2 2B: 2.4 GB)."""
    return jnp.matmul(h, w, preferred_element_type=jnp.float32)
