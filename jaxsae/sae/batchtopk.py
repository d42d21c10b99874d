"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * N largest activations over the whole flattened batch
of N tokens, so tokens share a sparsity budget of k on average. At inference
a token cannot see the batch, so a single scalar threshold (an EMA of the
smallest activation kept during training, `update_threshold`) replaces the
top-k: f = pre * (pre > threshold).

The threshold lives in params as `threshold` f32[] but never receives a
gradient (stop_gradient); the trainer overwrites it after each step:

    params['threshold'] = update_threshold(params['threshold'], out.f)

(exclude it from weight decay if the optimizer has any).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsae.sae.topk import TopKSAE


def batch_topk_activation(pre: jax.Array, k: int) -> jax.Array:
    """f32[N, S] -> f32[N, S] keeping the top k*N ReLU'd entries of the batch."""
    n, s = pre.shape
    flat = jax.nn.relu(pre).reshape(-1)
    vals, idx = jax.lax.top_k(flat, min(k * n, n * s))
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(n, s)


def update_threshold(threshold: jax.Array, f: jax.Array, decay: float = 0.99) -> jax.Array:
    """f32[]: EMA of the minimum positive activation of a training batch.

    Args:
      threshold: f32[] current threshold; <= 0 means "not calibrated yet",
        in which case the batch minimum is taken as is (no bias towards 0).
      f: f32[..., d_sae] training-mode activations (SAEOutput.f).
      decay: EMA decay.
    Batches with no active latent leave the threshold unchanged.
    """
    f = jax.lax.stop_gradient(f)
    pos = f > 0
    min_pos = jnp.min(jnp.where(pos, f, jnp.inf))
    ema = decay * threshold + (1.0 - decay) * min_pos
    new = jnp.where(threshold > 0, ema, min_pos)
    return jnp.where(jnp.any(pos), new, threshold).astype(jnp.float32)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE; extra param `threshold` f32[] (init 0 = uncalibrated).

    AuxK and the unit-norm decoder are as for TopK.
    """

    def setup(self):
        super().setup()
        self.threshold = self.param(
            "threshold", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), ()
        )

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        if train:
            return batch_topk_activation(pre, self.cfg.k)
        # Clamp at 0: an uncalibrated (0) threshold degrades to plain ReLU.
        thr = jnp.maximum(jax.lax.stop_gradient(self.threshold), 0.0)
        return jnp.where(pre > thr, pre, 0.0)
