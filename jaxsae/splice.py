"""The spliced forward pass, the paper's core operation, written once (PAPER.md "The fine-tune step").

    x        = blocks[0..L](embed(tokens))                      the residual after the hook, once
    x̂        = scale · SAE(x / scale)                            at the counted positions
    clean    = suffix(x)                                         blocks after L, final norm, unembedding
    spliced  = suffix(x with x̂ at the counted positions)
    zero     = suffix(x with 0 at the counted positions)         (evaluation only)

The fine-tune, the e2e baseline, the adapters, the MSE-only control and evaluation all call `splice` and
`branch_logits`; only what they do with the logits differs (a loss, or sums of metrics). Every function is
pure in its array arguments, so a caller can vmap the per-SAE part (`splice` given a shared `x`, then
`branch_logits`) over a leading SAE axis while the prefix and the clean suffix run once.

With an adapter (`jaxsae.train.adapters.Composition`) the spliced branch may run other SAE params, other
LM params (its own prefix when the LM changes before the hook) and an output map on x̂; the clean and
zero-ablated branches always run the original LM.

Shapes: b sequences of t tokens, D = d_model, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Splice:
    """Where an SAE goes into its LM: hashable, so it can be a static argument of a jit.

    lm: the `jaxsae.models.LM` (its params are passed separately, so a jit does not bake them in);
    layer: the hook (the residual after this block); scale: the store's normalisation (the SAE reads
    x / scale); include_first: whether position 0 of a context is spliced and counted; exclude_ids: token
    ids never spliced or counted (SAEBench's convention: BOS, EOS, PAD)."""

    lm: Any
    layer: int
    scale: float
    include_first: bool = False
    exclude_ids: tuple[int, ...] = ()


class Spliced(NamedTuple):
    """What `splice` computed, before any suffix runs.

    mask:    bool[b, t]     positions spliced and counted
    x:       [b, t, D]      the original LM's residual (the clean and zero-ablated branches read it)
    x_in:    [b, t, D]      the residual the SAE reads (x, unless an adapted LM reruns its prefix)
    x_hat_n: f32[b, t, D]   the reconstruction in normalised units (after an adapter's output map)
    out:     SAEOutput      the SAE's auxiliary outputs (latents, L0, penalties)
    spliced: [b, t, D]      x_in with scale · x̂ at the counted positions
    """

    mask: jax.Array
    x: jax.Array
    x_in: jax.Array
    x_hat_n: jax.Array
    out: Any
    spliced: jax.Array


def position_mask(shape: tuple[int, int], include_first: bool) -> jax.Array:
    """bool[b, t]: which positions are spliced and counted (position 0 only with include_first)."""
    b, t = shape
    m = jnp.ones((b, t), bool)
    return m if include_first else m.at[:, 0].set(False)


def counted_mask(sp: Splice, tokens: jax.Array) -> jax.Array:
    """bool[b, t]: the positions of tokens int[b, t] that are spliced and counted (position convention and
    excluded ids)."""
    mask = position_mask(tokens.shape, sp.include_first)
    for i in sp.exclude_ids:
        mask = mask & (tokens != i)
    return mask


def kl_per_token(clean_logits: jax.Array, spliced_logits: jax.Array) -> jax.Array:
    """KL(p_clean || p_spliced) in nats, f32[b, t], over the full vocabulary (a true KL, not a CE)."""
    lp = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(spliced_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def residual(sp: Splice, lm_params, tokens: jax.Array) -> jax.Array:
    """int[b, t] -> the residual after the hook [b, t, D]: embedding and blocks 0..layer only."""
    return sp.lm.prefix(tokens, sp.layer, params=lm_params)


def splice(sp: Splice, lm_params, tokens: jax.Array, sae_apply: Callable, comp, x: jax.Array | None = None) -> Spliced:
    """Runs the SAE on the hook's residual and inserts its reconstruction.

    sae_apply(sae_params, xn f32[b, t, D]) -> (x̂_n f32[b, t, D], SAEOutput): the caller picks the SAE's
    mode (training with a dead mask and λ, or inference). comp: a `Composition` (the adapter's view of
    what the spliced branch runs; `identity_composition` for a plain SAE). x: the original residual when
    the caller already has it (shared by several SAEs); otherwise computed here.
    """
    mask = counted_mask(sp, tokens)
    x = residual(sp, lm_params, tokens) if x is None else x
    x_in = residual(sp, comp.lm_params, tokens) if comp.rerun_prefix else x
    x_hat_n, out = sae_apply(comp.sae_params, x_in.astype(jnp.float32) / sp.scale)
    if comp.out_map is not None:
        x_hat_n = comp.out_map(x_hat_n)
    spliced = jnp.where(mask[..., None], (x_hat_n * sp.scale).astype(x_in.dtype), x_in)
    return Spliced(mask, x, x_in, x_hat_n, out, spliced)


def branch_logits(sp: Splice, lm_params, comp, s: Spliced, *, clean: bool = True, zero: bool = False,
                  joint: bool = False) -> tuple[jax.Array | None, jax.Array, jax.Array | None]:
    """(clean, spliced, zero-ablated) logits [b, t, V]; a branch not asked for is None.

    joint: the branches that run the same LM params go through the suffix as one batch (evaluation).
    A training step keeps them apart, with the clean branch under stop_gradient, so its backward pass
    covers the spliced branch only.
    """
    inputs = {"clean": s.x if clean else None, "spliced": s.spliced,
              "zero": jnp.where(s.mask[..., None], jnp.zeros_like(s.x), s.x) if zero else None}
    params = {"clean": lm_params, "spliced": comp.lm_params, "zero": lm_params}
    names = [n for n, h in inputs.items() if h is not None]
    groups = ([[n for n in names if params[n] is p] for p in {id(params[n]): params[n] for n in names}.values()]
              if joint else [[n] for n in names])
    out = {}
    for group in groups:
        h = inputs[group[0]] if len(group) == 1 else jnp.concatenate([inputs[n] for n in group])
        logits = sp.lm.suffix(h, sp.layer, params=params[group[0]])
        out.update(zip(group, jnp.split(logits, len(group)) if len(group) > 1 else [logits]))
    if "clean" in out:
        out["clean"] = jax.lax.stop_gradient(out["clean"])  # the target: never differentiated
    return out.get("clean"), out["spliced"], out.get("zero")
