"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead").

f = pre * H(pre - theta) with a learned per-latent threshold
theta = exp(log_threshold) > 0. H has zero derivative almost everywhere, so
theta is trained with straight-through estimators (STEs): in the backward
pass the Dirac delta dH/dtheta is replaced by a rectangle kernel of width
eps (= cfg.jumprelu_bandwidth), both in the JumpReLU output and in the L0
penalty l0_coeff * mean_tokens sum_i H(pre_i - theta_i).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.sae.base import SAEBase


def _rectangle(u: jax.Array) -> jax.Array:
    """Kernel K(u) = 1 on (-1/2, 1/2), else 0 (integrates to 1)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g: jax.Array, shape) -> jax.Array:
    """Sum a broadcast gradient back down to `shape` (leading dims)."""
    return jnp.sum(g, axis=tuple(range(g.ndim - len(shape)))).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(x: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """x * H(x - threshold). x: f32[..., S], threshold: f32[S]."""
    return jnp.where(x > threshold, x, 0.0)


def _jumprelu_fwd(x, threshold, bandwidth):
    return jumprelu(x, threshold, bandwidth), (x, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    x, threshold = res
    # d/dx: the pass-through gate; d/dtheta: -(theta/eps) K((x - theta)/eps).
    x_grad = jnp.where(x > threshold, g, 0.0)
    t_grad = -(threshold / bandwidth) * _rectangle((x - threshold) / bandwidth) * g
    return x_grad, _sum_to(t_grad, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_step(x: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(x - threshold) as float. x: f32[..., S], threshold: f32[S]."""
    return (x > threshold).astype(x.dtype)


def _step_fwd(x, threshold, bandwidth):
    return heaviside_step(x, threshold, bandwidth), (x, threshold)


def _step_bwd(bandwidth, res, g):
    x, threshold = res
    # No gradient to x (the paper's choice: L0 only moves thresholds);
    # d/dtheta: -(1/eps) K((x - theta)/eps).
    t_grad = -(1.0 / bandwidth) * _rectangle((x - threshold) / bandwidth) * g
    return jnp.zeros_like(x), _sum_to(t_grad, threshold.shape)


heaviside_step.defvjp(_step_fwd, _step_bwd)


class JumpReLUSAE(SAEBase):
    """JumpReLU SAE; extra param `log_threshold` f32[d_sae].

    The output's penalties['l0_loss'] = l0_coeff * mean_tokens L0 (STE-differentiable).
    """

    def setup(self):
        super().setup()
        init = nn.initializers.constant(math.log(self.cfg.jumprelu_init_threshold))
        self.log_threshold = self.param(
            "log_threshold", nn.with_logical_partitioning(init, ("d_sae",)), (self.cfg.d_sae,)
        )

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        return jumprelu(pre, jnp.exp(self.log_threshold), self.cfg.jumprelu_bandwidth)

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff):
        on = heaviside_step(pre, jnp.exp(self.log_threshold), self.cfg.jumprelu_bandwidth)
        l0 = jnp.mean(jnp.sum(on, axis=-1))
        return {"l0_loss": self.cfg.l0_coeff * l0}


def inference_threshold(cfg, params) -> np.ndarray:
    """f32[d_sae] theta with f = pre * (pre > theta): exp(log_threshold)."""
    return np.exp(np.asarray(params["log_threshold"], np.float32))
