"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (ReLU applied after the
top-k, so fewer than k may be active if some of the top-k are negative).
Sparsity is exact by construction, so there is no L1 term; the decoder rows
are kept at unit norm by `decoder_norm.unit_norm_decoder`, and dead latents
are revived with the AuxK loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae.base import SAEBase, auxk_loss, keep_first, scatter_rows
from jaxsae.sae.selection import top_k
from jaxsae.sae.sparse_grad import gathered_pre


def topk_activation(pre: jax.Array, k: int) -> jax.Array:
    """f32[N, S] -> f32[N, S] with only each row's top-k (ReLU'd) entries kept.

    A global top-k over the whole d_sae axis; with d_sae split over the mesh it
    runs in two stages instead of gathering the axis (`jaxsae.sae.selection`).
    """
    vals, idx = top_k(pre, k)
    return scatter_rows(pre.shape, idx, jax.nn.relu(vals))


class TopKSAE(SAEBase):
    """TopK sparse autoencoder; see `SAEBase` for params and interface.

    `__call__(x, dead)` puts penalties['auxk'] = auxk_coeff * AuxK(dead) in
    the output, nonzero when a dead mask with at least one dead latent is passed.
    """

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        return topk_activation(pre, self.cfg.k)

    def activate_sparse(self, pre: jax.Array, train: bool, k=None, enc=None):
        # a sweep's member (k given, under vmap) selects in one stage: its SAE axis may already hold the
        # mesh's model axis, so a member's d_sae is not split
        vals, idx = top_k(pre, self.cfg.k) if k is None else jax.lax.top_k(pre, self.cfg.k)
        if enc is not None:  # the same values, with a gradient at the k selected latents only
            *inputs, dtype = enc
            vals = gathered_pre(pre, *inputs, idx, dtype)
        vals = keep_first(jax.nn.relu(vals), k)
        return scatter_rows(pre.shape, idx, vals), (idx, vals)

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc=None):
        if dead is None:  # static: skip the extra top-k entirely
            return {"auxk": jnp.zeros((), jnp.float32)}
        # The residual is a fixed target: AuxK must not pull the main
        # reconstruction towards what the dead latents can express.
        residual = jax.lax.stop_gradient(x - x_hat)
        aux = auxk_loss(pre, jnp.asarray(dead, bool), residual, self.W_dec,
                        self.cfg.effective_k_aux, enc)
        return {"auxk": self.cfg.auxk_coeff * aux}
