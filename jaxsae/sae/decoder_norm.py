"""Unit-norm decoder constraint (TopK / BatchTopK SAEs; others with `sae.decoder_unit_norm: true`).

With a unit-norm decoder the latent activation is the feature's magnitude,
and the encoder cannot cheat sparsity by shrinking activations while growing
decoder rows. Two pure pytree steps implement it (Bricken et al. 2023):

1. `project_out_parallel_grad`: remove from each W_dec row's gradient its
   component along the row, so the step moves along the unit sphere
   (to first order) instead of fighting the renormalisation.
2. `renormalize_decoder`: rescale rows back to exactly unit norm after the
   optimizer step.

All functions find W_dec by its dict key, so they work on `init_sae`'s flat
params, on `{'params': {...}}` variables, and on nested train states.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsae.sae.config import SAEConfig

_EPS = 1e-8


def _is_w_dec(path) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == "W_dec"


def _unit(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), _EPS)


def project_out_parallel_grad(grads, params):
    """grads with each W_dec row's component parallel to that row removed.

    W_dec is f32[d_sae, d_model]; row i is latent i's decoder direction:
        g_i <- g_i - (g_i . u_i) u_i,   u_i = W_i / ||W_i||.
    Other leaves pass through unchanged.
    """

    def f(path, g, w):
        if not _is_w_dec(path):
            return g
        u = _unit(w.astype(jnp.float32))
        g32 = g.astype(jnp.float32)
        return (g32 - jnp.sum(g32 * u, axis=-1, keepdims=True) * u).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(f, grads, params)


def renormalize_decoder(params):
    """params with every W_dec row rescaled to unit L2 norm."""

    def f(path, w):
        return _unit(w.astype(jnp.float32)).astype(w.dtype) if _is_w_dec(path) else w

    return jax.tree_util.tree_map_with_path(f, params)


class UnitNormDecoderState(NamedTuple):
    inner: optax.OptState


def unit_norm_decoder(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap an optimizer so decoder rows stay unit-norm.

    update(grads, state, params): project the W_dec gradient, run `inner`,
    then return updates u such that optax.apply_updates(params, u) has unit
    W_dec rows. `params` is required.
    """

    def init_fn(params):
        return UnitNormDecoderState(inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("unit_norm_decoder needs params: call tx.update(grads, state, params)")
        updates = project_out_parallel_grad(updates, params)
        updates, inner_state = inner.update(updates, state.inner, params)

        def fix(path, u, p):
            if not _is_w_dec(path):
                return u
            new = _unit((p + u).astype(jnp.float32))
            return (new - p.astype(jnp.float32)).astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(fix, updates, params)
        return updates, UnitNormDecoderState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def maybe_unit_norm_decoder(cfg: SAEConfig, tx: optax.GradientTransformation):
    """`unit_norm_decoder(tx)` when `cfg.unit_norm_decoder` (the kind's default or the config's), else tx."""
    return unit_norm_decoder(tx) if cfg.unit_norm_decoder else tx
