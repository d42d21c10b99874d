"""Encoder gradients that touch only the latents a fixed-k SAE keeps.

A TopK step needs the dense pre-activations pre = xc @ W_enc + b_enc (f32[N, S]) to select each token's
k latents, but the loss depends on pre only through those k entries. Autodiff of the dense matmul would
still build a dense cotangent f32[N, S] (zeros but k entries per row) and spend two more dense matmuls
on it (dW_enc = xc^T @ dpre, dxc = dpre @ W_enc^T). `gathered_pre` reads the k entries from the
already computed pre-activations and writes their gradient into only those k columns of W_enc and b_enc:
k/S of the work, the same numbers.

Notation: N tokens, D = d_model, S = d_sae, k latents per token; xc = x - b_dec (f32[N, D]).
The `pre` argument of both functions is a value only (its cotangent is zero): the gradient is routed to
(x, b_dec, W_enc, b_enc) instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _encoder_rows(W_enc: jax.Array, idx: jax.Array, dtype) -> jax.Array:
    """f32[D, S], i32[N, k] -> [N, k, D]: the encoder column of each selected latent, one row per entry.

    Transposing first makes each latent's column a contiguous row, so the gather (and its scatter-add)
    moves D-long rows."""
    return W_enc.T.astype(dtype)[idx]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gathered_pre(pre: jax.Array, x: jax.Array, b_dec: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                 idx: jax.Array, dtype=jnp.float32) -> jax.Array:
    """vals f32[N, k] = pre[n, idx[n, j]], differentiated as (x[n] - b_dec) . W_enc[:, idx[n, j]] + b_enc[idx[n, j]].

    pre: f32[N, S] the pre-activations (already computed; no gradient flows into it).
    x: f32[N, D]; b_dec: f32[D]; W_enc: f32[D, S]; b_enc: f32[S]; idx: i32[N, k] the selected latents.
    The backward's cost is O(N k D): g_j (x - b_dec) scatter-added into column idx_j of W_enc (g_j into
    b_enc[idx_j]), matmuls in `dtype` with float32 accumulation as the forward's. b_dec's gradient,
    -sum_n sum_j g_nj W_enc[:, idx_nj] = -W_enc @ db_enc, is one matvec; the per-token
    dx = sum_j g_j W_enc[:, idx_j] (a gather of k encoder columns per token) is only computed when
    something asks for d/dx (XLA drops it otherwise, as in a training step, whose x is data).
    """
    del x, b_dec, W_enc, b_enc, dtype
    return jnp.take_along_axis(pre, idx, axis=-1)


def _gathered_fwd(pre, x, b_dec, W_enc, b_enc, idx, dtype=jnp.float32):
    return jnp.take_along_axis(pre, idx, axis=-1), (x, b_dec, W_enc, idx)


def _gathered_bwd(dtype, res, g):
    x, b_dec, W_enc, idx = res
    d, s = W_enc.shape
    g32 = g.astype(jnp.float32)
    xc = (x - b_dec).astype(dtype).astype(jnp.float32)                        # as the forward rounds it
    flat = idx.reshape(-1)
    outer = g32[:, :, None] * xc[:, None, :]                                  # [N, k, D]
    dW_enc_t = jnp.zeros((s, d), jnp.float32).at[flat].add(outer.reshape(-1, d))
    db_enc = jnp.zeros((s,), jnp.float32).at[flat].add(g32.reshape(-1))
    cols = _encoder_rows(W_enc, idx, dtype)                                   # [N, k, D]
    dx = jnp.einsum("nk,nkd->nd", g32.astype(dtype), cols, preferred_element_type=jnp.float32)
    db_dec = -(W_enc.astype(jnp.float32) @ db_enc)
    return (None, dx.astype(x.dtype), db_dec.astype(b_dec.dtype), dW_enc_t.T.astype(W_enc.dtype), db_enc,
            None)


gathered_pre.defvjp(_gathered_fwd, _gathered_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def with_dense_grad(pre: jax.Array, x: jax.Array, b_dec: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                    dtype=jnp.float32) -> jax.Array:
    """pre f32[N, S] unchanged, differentiated as (x - b_dec) @ W_enc + b_enc (dense backward, no second
    forward).

    For a loss that reads every latent's pre-activation (AuxK's top-k over the dead latents) in a step
    whose main path uses `gathered_pre`: called inside that loss's `lax.cond`, its dense backward runs
    only on the steps that take the branch. As there, b_dec's gradient is -W_enc @ sum_n g_n and the
    per-token dx = g @ W_enc^T is left for XLA to drop when unused."""
    del x, b_dec, W_enc, b_enc, dtype
    return pre


def _dense_fwd(pre, x, b_dec, W_enc, b_enc, dtype=jnp.float32):
    return pre, (x, b_dec, W_enc)


def _dense_bwd(dtype, res, g):
    x, b_dec, W_enc = res
    gd = g.astype(dtype)
    xc = (x - b_dec).astype(dtype)
    dW_enc = jnp.dot(xc.T, gd, preferred_element_type=jnp.float32)
    db_enc = jnp.sum(g.astype(jnp.float32), axis=0)
    dx = jnp.dot(gd, W_enc.astype(dtype).T, preferred_element_type=jnp.float32)
    db_dec = -(W_enc.astype(jnp.float32) @ db_enc)
    return None, dx.astype(x.dtype), db_dec.astype(b_dec.dtype), dW_enc.astype(W_enc.dtype), db_enc


with_dense_grad.defvjp(_dense_fwd, _dense_bwd)
