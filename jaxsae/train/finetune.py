"""The KL+MSE fine-tune (Karvonen 2025): one jit-compiled step through the spliced model.

Per batch of token sequences (PAPER.md "The fine-tune step"):
    x        = blocks[0..L](embed(tokens))                     once, no gradient
    p        = softmax(suffix(x))                              clean branch, under stop_gradient
    x̂        = scale · SAE(x / scale)                           spliced in at the counted positions
    log q    = log_softmax(suffix(x̂))
    KL       = mean over counted tokens of KL(p ‖ q), full vocabulary
    MSE      = mean over counted tokens of ‖x/scale − SAE(x/scale)‖², as in the MSE phase
    β        = sg(MSE) / (sg(KL) + 1e-8)                        recomputed every batch
    loss     = (1 − s)·MSE + s·β·KL  (+ the SAE's own sparsity / AuxK terms)
With the KL share s = ½ this is ½(MSE + β·KL): its value equals the MSE, so the MSE phase's learning-rate
scale, L1 coefficient and k keep their meaning; its gradient is ½·MSE·(∇log KL + ∇log MSE).

Only the SAE's parameters are differentiated. The LM's parameters enter as an argument that is never
differentiated (no gradient, no optimizer state) rather than as baked-in constants, so a 2B-parameter
model is not embedded in the executable and can be sharded like any other input.

The same step trains a fresh SAE for the whole budget: the paper's full end-to-end baseline.

It also trains the paper's adapters around a frozen SAE (`jaxsae.train.adapters`): with `compose` set, the
differentiated pytree is the adapter's, and `compose(trainable, frozen SAE params, lm_params)` gives the SAE
params, the spliced branch's LM params and an output map; the clean branch keeps the original LM. The plain
fine-tune is the case compose=None (trainable = SAE params).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsae.evaluate import kl_per_token, position_mask
from jaxsae.sae import SAEConfig, dead_mask, maybe_unit_norm_decoder, update_dead_counter
from jaxsae.sharding import jit_step
from jaxsae.train.adapters import identity_composition
from jaxsae.train.mse import post_update


def finetune_optimizer(lr: float, total_steps: int, sae_cfg: SAEConfig | None, weight_decay: float = 0.01,
                       clip: float = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       schedule: str = "linear") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW, linear decay lr → 0 over the window with no warm-up (or constant for e2e), clip 1.0,
    and for unit-norm decoders the parallel-gradient projection before / renormalisation after
    (sae_cfg=None: the trainable params are not an SAE's, e.g. an adapter's)."""
    sched = (optax.linear_schedule(lr, 0.0, max(total_steps, 1)) if schedule == "linear"
             else optax.constant_schedule(lr))
    inner = optax.chain(optax.clip_by_global_norm(clip),
                        optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return (inner if sae_cfg is None else maybe_unit_norm_decoder(sae_cfg, inner)), sched


def init_ft_state(params, tx, sae_cfg: SAEConfig, dead, l1_coeff: float, l0_target: float, seed: int,
                  frozen=None) -> dict:
    """Fine-tune state: the MSE phase's fields plus the L1 coefficient λ and the L0 it holds.
    With an adapter, `params` are the adapter's and `frozen` the SAE it wraps (carried unchanged)."""
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                 dead=jnp.asarray(dead, jnp.int32), rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                 l1=jnp.asarray(l1_coeff, jnp.float32), l0_target=jnp.asarray(l0_target, jnp.float32))
    return state if frozen is None else {**state, "frozen": frozen}


def kl_mse_loss(lm, lm_params, layer: int, sae_module, sae_cfg: SAEConfig, params, tokens, *, scale: float,
                include_first: bool, kl_share: float, dead, l1_coeff, compose=None, frozen=None,
                kl_only: bool = False):
    """The fused loss. tokens: int[b, t]. Returns (loss, aux dict).

    params: the differentiated pytree: the SAE's, or with `compose` an adapter's around the `frozen` SAE.
    dead: the dead-latent counter, or None to skip AuxK (a frozen SAE). kl_only: loss = KL (LoRA on the LM).
    """
    comp = identity_composition(params, lm_params) if compose is None else compose(params, frozen, lm_params)
    mask = position_mask(tokens.shape, include_first)  # bool[b, t]
    mf = mask.astype(jnp.float32)
    n = jnp.maximum(mf.sum(), 1.0)
    x = jax.lax.stop_gradient(lm.prefix(tokens, layer, params=lm_params))  # [b, t, D], once
    clean = jax.lax.stop_gradient(lm.suffix(x, layer, params=lm_params))  # [b, t, V]
    # an LM adapted before the hook gives the spliced branch its own residual
    xs = lm.prefix(tokens, layer, params=comp.lm_params) if comp.rerun_prefix else x
    xn = xs.astype(jnp.float32) / scale
    x_hat_n, out = sae_module.apply({"params": comp.sae_params}, xn, train=True, l1_coeff=l1_coeff,
                                    dead=None if dead is None else dead_mask(dead, sae_cfg))
    if comp.out_map is not None:
        x_hat_n = comp.out_map(x_hat_n)
    spliced = jnp.where(mask[..., None], (x_hat_n * scale).astype(xs.dtype), xs)
    logits = lm.suffix(spliced, layer, params=comp.lm_params)
    kl = jnp.sum(kl_per_token(clean, logits) * mf) / n
    mse = jnp.sum(jnp.sum((jax.lax.stop_gradient(xn) - x_hat_n) ** 2, -1) * mf) / n
    beta = jax.lax.stop_gradient(mse) / (jax.lax.stop_gradient(kl) + 1e-8)
    loss = kl if kl_only else (1.0 - kl_share) * mse + kl_share * beta * kl + out.aux_loss
    return loss, dict(kl=kl, mse=mse, beta=beta, out=out, n=n)


def make_finetune_step(lm, layer: int, sae_module, sae_cfg: SAEConfig, tx, schedule, *, scale: float,
                       include_first: bool, kl_share: float = 0.5, l1_controller: bool = False,
                       l1_rate: float = 0.001, compose=None, shardings=None):
    """Returns jit(step)(state, lm_params, tokens) -> (state, metrics), with the state donated.

    compose: an adapter from `jaxsae.train.adapters` (state["params"] are then its params and
    state["frozen"] the SAE, which the step carries unchanged); None trains the SAE itself.
    shardings: optional (state, lm_params, tokens) shardings; the new state keeps the state's layout.
    """
    sae_trains = compose is None or compose.sae_trains

    def step(state: dict, lm_params, tokens: jax.Array):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: kl_mse_loss(lm, lm_params, layer, sae_module, sae_cfg, p, tokens, scale=scale,
                                  include_first=include_first, kl_share=kl_share,
                                  dead=state["dead"] if sae_trains else None, l1_coeff=state["l1"],
                                  compose=compose, frozen=state.get("frozen"),
                                  kl_only=compose is not None and compose.kl_only), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = aux["out"]
        if compose is None:
            params, dead = post_update(sae_cfg, params, state["dead"], out, tokens.size, state["step"])
        else:  # the base SAE is frozen: only count which latents fire
            dead = update_dead_counter(state["dead"], out.fired, tokens.size)
        l1 = state["l1"]
        if l1_controller:
            # The reference holds L0 at its pre-fine-tune value by nudging λ by ±0.1% per step.
            l1 = jnp.where(out.l0 > state["l0_target"], l1 * (1 + l1_rate), l1 * (1 - l1_rate))
        metrics = {"train/loss": loss, "train/mse": aux["mse"], "train/kl": aux["kl"], "train/beta": aux["beta"],
                   "train/l0": out.l0, **{f"train/{k}": v for k, v in out.penalties.items()},
                   "train/l1_coeff": state["l1"],
                   "train/lr": schedule(state["step"]),
                   "train/dead_fraction": jnp.mean(dead_mask(dead, sae_cfg).astype(jnp.float32))}
        new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1, "dead": dead, "l1": l1}
        return new, metrics

    return jit_step(step, shardings, shardings[0] if shardings else None)
