"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead").

f = pre * H(pre - theta) with a learned per-latent threshold
theta = exp(log_threshold) > 0. H has zero derivative almost everywhere, so
theta is trained with straight-through estimators (STEs): in the backward
pass the Dirac delta dH/dtheta is replaced by a rectangle kernel of width
eps (= cfg.jumprelu_bandwidth), both in the JumpReLU output and in the L0
loss, a function of L0 = mean_tokens sum_i H(pre_i - theta_i):

    sae.l0_target unset   l0_coeff * L0                   the paper's penalty
    sae.l0_target = T     l0_coeff * (L0 / T - 1)^2       dictionary_learning's JumpReluTrainer

l0_coeff is warmed up linearly from 0 over sae.l0_warmup_steps (`l0_coeff_at`). With
sae.decoder_unit_norm: true and Adam b1 = 0 (mse.b1) the MSE phase is that trainer's step. What still
differs from it:
  - theta is parameterised as log_threshold (what checkpoints hold and the SAELens / dictionary_learning
    interop converts), not directly: the gradient reaching the parameter is theta * dLoss/dtheta, so Adam
    moves theta by a relative rather than an absolute amount.
  - the L0 step function is applied to pre, as in the paper; dictionary_learning applies it to
    f = JumpReLU(pre). Forward they agree; the threshold's STE gradient differs only for pre just below
    theta (within eps/2), where its kernel sees f = 0 instead (no gradient there unless theta < eps/2).
  - the encoder subtracts b_dec first (every jaxsae kind does); JumpReluAutoEncoder does not, so b_dec
    also receives the encoder's gradient here.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.sae.base import SAEBase, linear_warmup
from jaxsae.sae.config import SAEConfig


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


def l0_coeff_at(step, cfg: SAEConfig, coeff=None):
    """f32[]: linear warm-up 0 -> coeff (default cfg.l0_coeff) over cfg.l0_warmup_steps; `step` (0 first)
    may be traced. Pass the result as `l0_coeff=` to `JumpReLUSAE.__call__`."""
    coeff = cfg.l0_coeff if coeff is None else coeff
    return coeff * linear_warmup(step, cfg.l0_warmup_steps)


def l0_loss(l0: jax.Array, coeff, target: float | None) -> jax.Array:
    """f32[]: the L0 loss of a mean L0 l0 (f32[], STE-differentiable): coeff * l0 (target None), or
    coeff * (l0 / target - 1)^2, zero at l0 = target and pulling l0 towards it from both sides."""
    if target is None:
        return coeff * l0
    return coeff * (l0 / target - 1.0) ** 2


class JumpReLUSAE(SAEBase):
    """JumpReLU SAE; extra param `log_threshold` f32[d_sae].

    The output's penalties['l0_loss'] = `l0_loss(L0, l0_coeff, cfg.l0_target)` with L0 the mean over
    tokens of the active latents (STE-differentiable).
    """

    def setup(self):
        super().setup()
        init = nn.initializers.constant(math.log(self.cfg.jumprelu_init_threshold))
        self.log_threshold = self.param(
            "log_threshold", nn.with_logical_partitioning(init, ("d_sae",)), (self.cfg.d_sae,)
        )

    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        return jumprelu(pre, jnp.exp(self.log_threshold), self.cfg.jumprelu_bandwidth)

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc=None):
        # the step of pre (the paper's), not of f as dictionary_learning: see the module docstring
        on = heaviside_step(pre, jnp.exp(self.log_threshold), self.cfg.jumprelu_bandwidth)
        l0 = jnp.mean(jnp.sum(on, axis=-1))
        coeff = self.cfg.l0_coeff if l0_coeff is None else l0_coeff
        return {"l0_loss": l0_loss(l0, coeff, self.cfg.l0_target)}


def inference_threshold(cfg, params) -> np.ndarray:
    """f32[d_sae] theta with f = pre * (pre > theta): exp(log_threshold)."""
    return np.exp(np.asarray(params["log_threshold"], np.float32))
