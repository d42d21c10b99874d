"""Sparse autoencoders (TopK, BatchTopK, ReLU+L1, JumpReLU, Matryoshka BatchTopK) as Flax Linen modules.

Typical use:

    cfg = SAEConfig(kind='topk', d_model=768, d_sae=24576, k=32).validate()
    model = make_sae(cfg)
    params = init_sae(cfg, jax.random.key(0), sample=acts[:4096])
    tx = maybe_unit_norm_decoder(cfg, optax.adam(2e-4))
    x_hat, out = model.apply({'params': params}, x, dead=dead)
    loss = reconstruction_loss(x, x_hat) + out.aux_loss
    ... optimizer step ...
    params = post_update(cfg, params, out, step)

Everything kind-specific is in the registry `jaxsae.sae.kinds` (`kind_of(cfg)`).
"""

from __future__ import annotations

import flax.linen as nn

from jaxsae.sae.base import (
    SAEBase,
    SAEOutput,
    dead_mask,
    reconstruction_loss,
    update_dead_counter,
)
from jaxsae.sae.batchtopk import BatchTopKSAE, update_threshold
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.decoder_norm import (
    maybe_unit_norm_decoder,
    project_out_parallel_grad,
    renormalize_decoder,
    unit_norm_decoder,
)
from jaxsae.sae.init import geometric_median, init_sae, sae_param_axes
from jaxsae.sae.jumprelu import JumpReLUSAE, heaviside_step, jumprelu, l0_coeff_at
from jaxsae.sae.kinds import KINDS, SAEKind, kind_of, post_update
from jaxsae.sae.matryoshka import MatryoshkaBatchTopKSAE
from jaxsae.sae.relu import ReLUSAE, l1_coeff_at
from jaxsae.sae.topk import TopKSAE


def make_sae(cfg: SAEConfig) -> nn.Module:
    """Validate cfg and return the Flax module for cfg.kind."""
    cfg.validate()
    return kind_of(cfg).module(cfg)


__all__ = [
    "KINDS",
    "SAEKind",
    "kind_of",
    "post_update",
    "SAEConfig",
    "SAEBase",
    "SAEOutput",
    "TopKSAE",
    "BatchTopKSAE",
    "ReLUSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "make_sae",
    "init_sae",
    "sae_param_axes",
    "geometric_median",
    "reconstruction_loss",
    "update_dead_counter",
    "dead_mask",
    "update_threshold",
    "l1_coeff_at",
    "l0_coeff_at",
    "jumprelu",
    "heaviside_step",
    "project_out_parallel_grad",
    "renormalize_decoder",
    "unit_norm_decoder",
    "maybe_unit_norm_decoder",
]
