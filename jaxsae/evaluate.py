"""Evaluation of an SAE spliced into its language model, on held-out token sequences.

Metrics (the paper's, see PAPER.md "Metrics"):
- CE clean / spliced / zero-ablated: next-token cross-entropy (nats) with the hook activation kept,
  replaced by the SAE reconstruction, or set to zero;
- CE gap = spliced - clean; loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean);
- KL(clean || spliced) per token over the full vocabulary (a true KL, not a CE offset by the entropy);
- FVE = 1 - sum Var(x - x_hat) / sum Var(x); L0; dead fraction (latents that never fire over the
  evaluation tokens); cosine(x, x_hat); ||x_hat|| / ||x||.

Positions: position 0 of a packed context is excluded unless `include_first_position`; it is neither
spliced nor counted, the same rule as the MSE and the KL in training. Activations enter the SAE divided
by the store's normalisation scale and leave multiplied by it.

With an adapter (`compose`, `trainable` from `jaxsae.train.adapters`) the spliced branch is the adapted
model: the adapted LM (its own prefix when adapted before the hook), the adapted SAE, the output map on x̂;
the clean and zero-ablated branches run the original LM, and FVE etc. compare x̂' with the spliced residual.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def position_mask(shape: tuple[int, int], include_first: bool) -> jax.Array:
    """bool[b, t]: which positions are spliced and counted."""
    b, t = shape
    m = jnp.ones((b, t), bool)
    return m if include_first else m.at[:, 0].set(False)


def next_token_ce(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over counted positions, count). logits [b, t, V]; tokens int[b, t]; mask bool[b, t].

    Position i predicts token i + 1; it counts when position i is counted.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1]
    return jnp.sum(nll * m), jnp.sum(m)


def kl_per_token(clean_logits: jax.Array, spliced_logits: jax.Array) -> jax.Array:
    """KL(p_clean || p_spliced) in nats, f32[b, t], over the full vocabulary."""
    lp = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(spliced_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def make_eval_step(lm, sae_module, layer: int, scale: float, include_first: bool, compose=None):
    """A jit-compiled function (lm_params, sae_params, tokens, trainable=None) -> dict of sums for one batch.

    The prefix up to the hook runs once; the three suffixes (clean, spliced, zero) run as one batch
    (with an adapted LM, the spliced suffix runs on its own params).
    """
    from jaxsae.train.adapters import identity_composition

    def step(lm_params, sae_params, tokens, trainable=None):
        comp = (identity_composition(sae_params, lm_params) if compose is None
                else compose(trainable, sae_params, lm_params))
        mask = position_mask(tokens.shape, include_first)
        x0 = lm.prefix(tokens, layer, params=lm_params)  # [b, t, D], the original model's
        x = lm.prefix(tokens, layer, params=comp.lm_params) if comp.rerun_prefix else x0
        x_hat_n, out = sae_module.apply({"params": comp.sae_params}, x / scale, train=False)
        if comp.out_map is not None:
            x_hat_n = comp.out_map(x_hat_n)
        x_hat = x_hat_n * scale
        m3 = mask[..., None]
        spliced = jnp.where(m3, x_hat.astype(x.dtype), x)
        zero = jnp.where(m3, jnp.zeros_like(x0), x0)
        b = tokens.shape[0]
        if comp.lm_params is lm_params:
            logits = lm.suffix(jnp.concatenate([x0, spliced, zero]), layer, params=lm_params)
            clean_l, spliced_l, zero_l = logits[:b], logits[b:2 * b], logits[2 * b:]
        else:
            logits = lm.suffix(jnp.concatenate([x0, zero]), layer, params=lm_params)
            clean_l, zero_l = logits[:b], logits[b:]
            spliced_l = lm.suffix(spliced, layer, params=comp.lm_params)
        ce = [next_token_ce(lg, tokens, mask)[0] for lg in (clean_l, spliced_l, zero_l)]
        kl = kl_per_token(clean_l, spliced_l)
        xf, xh = x.astype(jnp.float32), x_hat.astype(jnp.float32)
        mf = mask.astype(jnp.float32)
        active = (out.f > 0) & mask[..., None]
        dot = jnp.sum(xf * xh, -1)
        nx, nh = jnp.linalg.norm(xf, axis=-1), jnp.linalg.norm(xh, axis=-1)
        return dict(
            ce_clean=ce[0], ce_spliced=ce[1], ce_zero=ce[2], n_ce=jnp.sum(mask[:, :-1]),
            kl=jnp.sum(kl * mf), n=jnp.sum(mf),
            sq_err=jnp.sum(jnp.sum((xf - xh) ** 2, -1) * mf),
            x_sum=jnp.sum(xf * m3, axis=(0, 1)), x_sq=jnp.sum(jnp.sum(xf ** 2, -1) * mf),
            l0=jnp.sum(jnp.sum(active, -1) * mf), fired=jnp.any(active, axis=(0, 1)),
            cos=jnp.sum(dot / jnp.maximum(nx * nh, 1e-12) * mf),
            norm_ratio=jnp.sum(nh / jnp.maximum(nx, 1e-12) * mf),
        )

    return jax.jit(step)


def evaluate(lm, sae_module, sae_params, tokens: np.ndarray, layer: int, scale: float,
             include_first: bool = False, batch: int = 8, lm_params: Any = None, compose=None,
             trainable: Any = None, mesh=None) -> dict[str, float]:
    """Metrics over held-out sequences tokens: int[n, t] (n a multiple of batch is not required).
    compose, trainable: evaluate the model with that adapter (`jaxsae.train.adapters`).
    mesh: split each batch over the mesh's data axis (without, a numpy batch is replicated: every
    device would evaluate all of it)."""
    from jaxsae.sharding import batch_from_global, batch_sharding

    place = jnp.asarray if mesh is None else functools.partial(batch_from_global, sharding=batch_sharding(mesh))
    step = _cached_step(lm, sae_module, layer, float(scale), include_first, compose)
    lm_params = lm.params if lm_params is None else lm_params
    acc: dict[str, Any] = {}
    n_batches = max(1, len(tokens) // batch)
    for i in range(n_batches):
        out = jax.device_get(step(lm_params, sae_params, place(tokens[i * batch:(i + 1) * batch]), trainable))
        for k, v in out.items():
            acc[k] = v if k not in acc else (acc[k] | v if k == "fired" else acc[k] + v)
    n, n_ce = float(acc["n"]), float(acc["n_ce"])
    ce_clean, ce_spliced, ce_zero = (float(acc[k]) / n_ce for k in ("ce_clean", "ce_spliced", "ce_zero"))
    total_var = float(acc["x_sq"]) - float(np.sum(acc["x_sum"] ** 2)) / n
    return dict(
        ce_clean=ce_clean, ce_spliced=ce_spliced, ce_zero=ce_zero, ce_gap=ce_spliced - ce_clean,
        loss_recovered=(ce_zero - ce_spliced) / (ce_zero - ce_clean),
        kl=float(acc["kl"]) / n, fve=1.0 - float(acc["sq_err"]) / total_var,
        mse_normalized=float(acc["sq_err"]) / n / scale ** 2,
        l0=float(acc["l0"]) / n, dead_fraction=float(1.0 - np.mean(acc["fired"])),
        cos=float(acc["cos"]) / n, norm_ratio=float(acc["norm_ratio"]) / n, eval_tokens=int(n),
    )


@functools.lru_cache(maxsize=8)
def _cached_step(lm, sae_module, layer, scale, include_first, compose):
    return make_eval_step(lm, sae_module, layer, scale, include_first, compose)
