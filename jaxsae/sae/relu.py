"""Standard ReLU + L1 SAE, following Anthropic's "April 2024 update".

f = relu(pre). Sparsity comes from an L1 penalty weighted by decoder row
norms, sum_i f_i * ||W_dec,i||, which makes the penalty invariant to moving
scale between encoder and decoder; hence no unit-norm decoder constraint.
The coefficient is warmed up linearly from 0 (`l1_coeff_at`) so latents can
first find useful directions before being pushed to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae.base import SAEBase, linear_warmup
from jaxsae.sae.config import SAEConfig


def l1_coeff_at(step, cfg: SAEConfig, coeff=None):
    """f32[]: linear warm-up 0 -> coeff (default cfg.l1_coeff) over cfg.l1_warmup_steps.

    `step` and `coeff` may be traced (a sweep's per-SAE coefficient); pass the result as `l1_coeff=`
    to `ReLUSAE.__call__`.
    """
    coeff = cfg.l1_coeff if coeff is None else coeff
    return coeff * linear_warmup(step, cfg.l1_warmup_steps)


class ReLUSAE(SAEBase):
    """ReLU SAE with decoder-norm-weighted L1; see `SAEBase` for the interface.

    Decoder rows start at norm 0.1 (April update: small random directions),
    and W_enc = W_dec.T.
    """

    decoder_init_norm = 0.1

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        return jax.nn.relu(pre)

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc=None):
        coeff = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
        dec_norm = jnp.linalg.norm(self.W_dec, axis=-1)  # f32[S]
        l1 = jnp.mean(jnp.sum(f * dec_norm, axis=-1))
        return {"l1": coeff * l1}
