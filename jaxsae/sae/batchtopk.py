"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * N largest ReLU'd pre-activations over the whole
flattened batch of N tokens, so tokens share a sparsity budget of k on
average: some tokens get more than k latents, some fewer. At inference a token
cannot see the batch, so a single scalar threshold replaces the top-k:
f = pre * (pre > threshold).

The threshold lives in params as `threshold` f32[] but never receives a
gradient (stop_gradient); the trainer overwrites it after each step with
`post_update` (through `jaxsae.sae.post_update`). It follows
dictionary_learning's BatchTopKTrainer:

    threshold starts at -1 (uncalibrated: inference is then plain ReLU);
    on the update of optimizer step t > threshold_start_step, with m = the
    smallest positive training activation of the batch (0 if none):
        threshold = m                                       if threshold < 0
        threshold = decay * threshold + (1 - decay) * m     otherwise.

One difference: an SAE whose threshold is already calibrated (>= 0) keeps
updating from step 0, so a fine-tune, whose step count restarts, does not
freeze the threshold of the SAE it starts from for threshold_start_step steps.
Within one run from scratch the two rules are the same, as the threshold stays
-1 until step threshold_start_step + 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.sae.base import keep_first
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.selection import keep_batch_top_k
from jaxsae.sae.topk import TopKSAE

UNCALIBRATED = -1.0


def batch_topk_activation(pre: jax.Array, k: int, k_active=None) -> jax.Array:
    """f32[N, S] -> f32[N, S] keeping the top k*N ReLU'd entries of the batch (k_active*N of them with a
    traced k_active <= k: a sweep's member in a program built at the largest k)."""
    n, s = pre.shape
    if k_active is not None:  # a sweep's member (under vmap): one-stage, then its own k of the kept
        flat = jax.nn.relu(pre).reshape(-1)
        vals, idx = jax.lax.top_k(flat, min(k * n, n * s))
        vals = keep_first(vals, jnp.minimum(k_active * n, n * s))
        return jnp.zeros_like(flat).at[idx].set(vals).reshape(n, s)
    # two-stage when d_sae is split over the mesh: no device gathers the whole [N, S] batch
    return keep_batch_top_k(jax.nn.relu(pre), min(k * n, n * s))


def update_threshold(threshold: jax.Array, f: jax.Array, decay: float = 0.999) -> jax.Array:
    """f32[]: one EMA step towards the minimum positive activation of a training batch.

    Args:
      threshold: f32[] current threshold; < 0 means "not calibrated yet", in
        which case the batch minimum is taken as is (no bias towards -1).
      f: f32[..., d_sae] training-mode activations (SAEOutput.f).
      decay: EMA decay.
    A batch with no active latent contributes 0, as in dictionary_learning.
    """
    f = jax.lax.stop_gradient(f)
    pos = f > 0
    min_pos = jnp.where(jnp.any(pos), jnp.min(jnp.where(pos, f, jnp.inf)), 0.0)
    ema = decay * threshold + (1.0 - decay) * min_pos
    return jnp.where(threshold < 0, min_pos, ema).astype(jnp.float32)


def post_update(cfg: SAEConfig, params: dict, out, step) -> dict:
    """params with the inference threshold updated from this step's training activations.

    step: i32[] the optimizer step just taken (0 for the first). See the module docstring for the rule.
    """
    thr = params["threshold"]
    on = (jnp.asarray(step) > cfg.threshold_start_step) | (thr >= 0)
    new = jnp.where(on, update_threshold(thr, out.f, cfg.threshold_decay), thr)
    return {**params, "threshold": new.astype(thr.dtype)}


def inference_threshold(cfg: SAEConfig, params) -> np.ndarray:
    """f32[d_sae] theta with f = pre * (pre > theta): the scalar threshold, an uncalibrated one as 0."""
    return np.full((cfg.d_sae,), max(float(params["threshold"]), 0.0), np.float32)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE; extra param `threshold` f32[] (init -1 = uncalibrated).

    AuxK and the unit-norm decoder are as for TopK; the activation is not.
    """

    def setup(self):
        super().setup()
        self.threshold = self.param(
            "threshold", nn.with_logical_partitioning(nn.initializers.constant(UNCALIBRATED), ()), ()
        )

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        if train:
            return batch_topk_activation(pre, self.cfg.k)
        # Clamp at 0: an uncalibrated (-1) threshold degrades to plain ReLU.
        thr = jnp.maximum(jax.lax.stop_gradient(self.threshold), 0.0)
        return jnp.where(pre > thr, pre, 0.0)

    def activate_sparse(self, pre: jax.Array, train: bool, k=None, enc=None):
        # Tokens have no fixed k: no per-token rows for a sparse decoder (TopKSAE's would be per-token top-k).
        if train and k is not None:
            return batch_topk_activation(pre, self.cfg.k, k), None
        return self.activate(pre, train), None
