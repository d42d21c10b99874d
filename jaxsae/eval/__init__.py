"""Evaluation of an SAE spliced into its language model, on held-out token sequences.

Metrics (the paper's, see PAPER.md "Metrics"):
- CE clean / spliced / zero-ablated: next-token cross-entropy (nats) with the hook activation kept,
  replaced by the SAE reconstruction, or set to zero;
- CE gap = spliced - clean; loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean);
- KL(clean || spliced) per token over the full vocabulary (a true KL, not a CE offset by the entropy);
- FVE = 1 - sum Var(x - x_hat) / sum Var(x) (dictionary_learning's); `explained_variance`, SAELens and
  SAEBench's: the mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2, the mean taken over each
  evaluation batch's counted tokens (so it depends on eval.batch_sequences, as theirs on their batch);
- L0; dead fraction (latents that never fire over the evaluation tokens); cosine(x, x_hat); ||x_hat|| / ||x||;
- `ce_zero_all` / `loss_recovered_all`: zero-ablation at every position, BOS and position 0 included
  (SAEBench's); `ce_zero` / `loss_recovered` zero the counted positions only, like the splice.

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

from jaxsae.splice import Splice, branch_logits, counted_mask, kl_per_token, residual, splice


def next_token_ce(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over counted positions, count). logits [b, t, V]; tokens int[b, t]; mask bool[b, t].

    Position i predicts token i + 1; it counts when position i is counted.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1]
    return jnp.sum(nll * m), jnp.sum(m)


def batch_sums(sp: Splice, lm_params, sae_cfg, sae_params, tokens, compose=None, trainable=None) -> dict:
    """Sums of every metric over one batch tokens: int[b, t] (pure; `evaluate` jits and accumulates it).

    The prefix runs once; the clean, spliced and zero-ablated suffixes run as one batch (with an adapted
    LM, the spliced suffix runs on its own params)."""
    from jaxsae.sae import make_sae
    from jaxsae.train.adapters import identity_composition

    module = make_sae(sae_cfg)
    comp = (identity_composition(sae_params, lm_params) if compose is None
            else compose(trainable, sae_params, lm_params))
    s = splice(sp, lm_params, tokens, lambda p, xn: module.apply({"params": p}, xn, train=False), comp)
    clean_l, spliced_l, zero_l = branch_logits(sp, lm_params, comp, s, zero=True, joint=True)
    return member_sums(sp, tokens, s, clean_l, spliced_l, zero_l, zero_all_ce(sp, lm_params, tokens, s.x, zero_l))


def zero_all_ce(sp: Splice, lm_params, tokens, x, zero_l) -> tuple[jax.Array, jax.Array]:
    """(CE sum, count) with the hook zeroed at every position (SAEBench's); the counted-positions
    ablation's own when every position counts."""
    mask = counted_mask(sp, tokens)
    if sp.include_first and not sp.exclude_ids:  # every position counted: the two ablations agree
        return next_token_ce(zero_l, tokens, mask)[0], jnp.sum(mask[:, :-1])
    zero_all = sp.lm.suffix(jnp.zeros_like(x), sp.layer, params=lm_params)
    return next_token_ce(zero_all, tokens, jnp.ones_like(mask))


def member_sums(sp: Splice, tokens, s, clean_l, spliced_l, zero_l, zero_all: tuple) -> dict:
    """The sums of one SAE's metrics given its splice `s` and the branches' logits."""
    mask, m3 = s.mask, s.mask[..., None]
    ce = [next_token_ce(lg, tokens, mask)[0] for lg in (clean_l, spliced_l, zero_l)]
    xf, xh = s.x_in.astype(jnp.float32), s.x_hat_n * sp.scale
    mf = mask.astype(jnp.float32)
    sq_tok = jnp.sum((xf - xh) ** 2, -1)
    mu = jnp.sum(xf * mf[..., None], axis=(0, 1)) / jnp.maximum(jnp.sum(mf), 1.0)
    ev_tok = 1.0 - sq_tok / jnp.maximum(jnp.sum((xf - mu) ** 2, -1), 1e-12)
    active = (s.out.f > 0) & m3
    dot = jnp.sum(xf * xh, -1)
    nx, nh = jnp.linalg.norm(xf, axis=-1), jnp.linalg.norm(xh, axis=-1)
    return dict(
        ce_clean=ce[0], ce_spliced=ce[1], ce_zero=ce[2], n_ce=jnp.sum(mask[:, :-1]),
        kl=jnp.sum(kl_per_token(clean_l, spliced_l) * mf), n=jnp.sum(mf),
        sq_err=jnp.sum(sq_tok * mf), ev=jnp.sum(ev_tok * mf),
        ce_zero_all=zero_all[0], n_ce_all=zero_all[1],
        x_sum=jnp.sum(xf * m3, axis=(0, 1)), x_sq=jnp.sum(jnp.sum(xf ** 2, -1) * mf),
        l0=jnp.sum(jnp.sum(active, -1) * mf), fired=jnp.any(active, axis=(0, 1)),
        cos=jnp.sum(dot / jnp.maximum(nx * nh, 1e-12) * mf),
        norm_ratio=jnp.sum(nh / jnp.maximum(nx, 1e-12) * mf),
    )


def sweep_sums(sp: Splice, lm_params, sae_cfg, stacked, tokens, ks) -> dict:
    """`batch_sums` of a sweep's N SAEs (stacked params, ks: i32[N] each one's k), every sum with a
    leading N: the prefix, the clean and the zero-ablated suffixes run once for all of them."""
    from jaxsae.sae import make_sae
    from jaxsae.train.adapters import identity_composition

    module = make_sae(sae_cfg)
    x = residual(sp, lm_params, tokens)
    mask = counted_mask(sp, tokens)
    both = sp.lm.suffix(jnp.concatenate([x, jnp.where(mask[..., None], jnp.zeros_like(x), x)]), sp.layer,
                        params=lm_params)
    clean_l, zero_l = jnp.split(both, 2)
    zero_all = zero_all_ce(sp, lm_params, tokens, x, zero_l)

    def one(params, k):
        comp = identity_composition(params, lm_params)
        s = splice(sp, lm_params, tokens, lambda p, xn: module.apply({"params": p}, xn, train=False, k=k), comp, x=x)
        _, spliced_l, _ = branch_logits(sp, lm_params, comp, s, clean=False)
        return member_sums(sp, tokens, s, clean_l, spliced_l, zero_l, zero_all)

    return jax.vmap(one)(stacked, ks)


def _accumulate(step, tokens: np.ndarray, batch: int, place) -> dict:
    acc: dict[str, Any] = {}
    for i in range(max(1, len(tokens) // batch)):
        out = jax.device_get(step(place(tokens[i * batch:(i + 1) * batch])))
        for k, v in out.items():
            acc[k] = v if k not in acc else (acc[k] | v if k == "fired" else acc[k] + v)
    return acc


def _metrics(acc: dict, scale: float) -> dict[str, float]:
    """The metrics from one SAE's accumulated sums."""
    n, n_ce = float(acc["n"]), float(acc["n_ce"])
    ce_clean, ce_spliced, ce_zero = (float(acc[k]) / n_ce for k in ("ce_clean", "ce_spliced", "ce_zero"))
    ce_zero_all = float(acc["ce_zero_all"]) / float(acc["n_ce_all"])
    total_var = float(acc["x_sq"]) - float(np.sum(acc["x_sum"] ** 2)) / n
    return dict(
        ce_clean=ce_clean, ce_spliced=ce_spliced, ce_zero=ce_zero, ce_gap=ce_spliced - ce_clean,
        loss_recovered=(ce_zero - ce_spliced) / (ce_zero - ce_clean),
        ce_zero_all=ce_zero_all, loss_recovered_all=(ce_zero_all - ce_spliced) / (ce_zero_all - ce_clean),
        explained_variance=float(acc["ev"]) / n,
        kl=float(acc["kl"]) / n, fve=1.0 - float(acc["sq_err"]) / total_var,
        mse_normalized=float(acc["sq_err"]) / n / scale ** 2,
        l0=float(acc["l0"]) / n, dead_fraction=float(1.0 - np.mean(acc["fired"])),
        cos=float(acc["cos"]) / n, norm_ratio=float(acc["norm_ratio"]) / n, eval_tokens=int(n),
    )


def _placer(mesh):
    from jaxsae.sharding import batch_from_global, batch_sharding

    return jnp.asarray if mesh is None else functools.partial(batch_from_global, sharding=batch_sharding(mesh))


def evaluate(sp: Splice, sae_cfg, sae_params, tokens: np.ndarray, batch: int = 8, lm_params: Any = None,
             compose=None, trainable: Any = None, mesh=None) -> dict[str, float]:
    """Metrics over held-out sequences tokens: int[n, t] (n a multiple of batch is not required).
    compose, trainable: evaluate the model with that adapter (`jaxsae.train.adapters`).
    mesh: split each batch over the mesh's data axis (without, a numpy batch is replicated: every
    device would evaluate all of it)."""
    step = _jit_sums(sp, sae_cfg, compose)
    lm_params = sp.lm.params if lm_params is None else lm_params
    acc = _accumulate(lambda toks: step(lm_params, sae_params, toks, trainable), tokens, batch, _placer(mesh))
    return _metrics(acc, sp.scale)


def evaluate_sweep(sp: Splice, sae_cfg, stacked, ks, tokens: np.ndarray, batch: int = 8, lm_params: Any = None,
                   mesh=None) -> list[dict[str, float]]:
    """`evaluate` of a sweep's N SAEs at once (stacked params, ks: each one's k): one metrics dict each."""
    step = _jit_sweep_sums(sp, sae_cfg)
    lm_params = sp.lm.params if lm_params is None else lm_params
    ks = jnp.asarray(ks)
    acc = _accumulate(lambda toks: step(lm_params, stacked, toks, ks), tokens, batch, _placer(mesh))
    return [_metrics({k: v[i] for k, v in acc.items()}, sp.scale) for i in range(len(ks))]


@functools.lru_cache(maxsize=8)
def _jit_sweep_sums(sp: Splice, sae_cfg):
    return jax.jit(lambda lm_params, stacked, tokens, ks: sweep_sums(sp, lm_params, sae_cfg, stacked, tokens, ks))


@functools.lru_cache(maxsize=8)
def _jit_sums(sp: Splice, sae_cfg, compose):
    return jax.jit(lambda lm_params, sae_params, tokens, trainable: batch_sums(sp, lm_params, sae_cfg, sae_params,
                                                                            tokens, compose, trainable))
