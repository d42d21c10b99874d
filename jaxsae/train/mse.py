"""The MSE phase: a pure, jit-compiled `step(state, x) -> (state, metrics)` over shuffled activations.

The state is a plain pytree (what Orbax saves and the sharding rules see):
    params      SAE params (`jaxsae.sae.init_sae`)
    opt_state   optax Adam state (the unit-norm decoder wrapper for TopK kinds)
    step        i32[]
    dead        i32[d_sae]  tokens since each latent last fired (AuxK's dead mask)
    rng         u32[2]      carried for kinds or phases that sample; checkpointed so resume is exact
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsae.config import MSECfg
from jaxsae.sharding import jit_step
from jaxsae.sae import (SAEConfig, dead_mask, kind_of, l1_coeff_at, maybe_unit_norm_decoder, reconstruction_loss,
                        update_dead_counter)


def mse_schedule(cfg: MSECfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up, constant, linear decay to 0 over the last `decay_fraction` of steps (paper)."""
    decay_start = int(total_steps * (1.0 - cfg.decay_fraction))
    warm = min(cfg.warmup_steps, decay_start)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, 0.0, max(total_steps - decay_start, 1))],
        boundaries=[warm, decay_start])


def mse_optimizer(cfg: MSECfg, sae_cfg: SAEConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = mse_schedule(cfg, total_steps)
    return maybe_unit_norm_decoder(sae_cfg, optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)), schedule


def init_state(params, tx: optax.GradientTransformation, sae_cfg: SAEConfig, seed: int) -> dict:
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                dead=jnp.zeros((sae_cfg.d_sae,), jnp.int32),
                rng=jax.random.key_data(jax.random.PRNGKey(seed)))


def sae_loss(sae_module, sae_cfg: SAEConfig, params, x, dead, step):
    """MSE-phase loss. x: f32[batch, d_model] (normalised). Returns (loss, (mse, SAEOutput))."""
    x_hat, out = sae_module.apply({"params": params}, x, dead=dead_mask(dead, sae_cfg), train=True,
                                  l1_coeff=l1_coeff_at(step, sae_cfg))
    mse = reconstruction_loss(x, x_hat)
    return mse + out.aux_loss, (mse, out)


def post_update(sae_cfg: SAEConfig, params, dead, out, n_tokens, step):
    """Bookkeeping after update `step` (i32[], 0 first): the kind's (BatchTopK's inference threshold) and
    the dead-latent counters."""
    params = kind_of(sae_cfg).post_update(sae_cfg, params, out, step)
    return params, update_dead_counter(dead, out.fired, n_tokens)


def make_mse_step(sae_module, sae_cfg: SAEConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  state_shardings=None, batch_sharding=None):
    """Returns the jit-compiled step with the state donated.

    With `state_shardings` (`jaxsae.sharding.sae_state_shardings`) and `batch_sharding`, the step's
    inputs and outputs are pinned to them: the new state keeps the old one's layout, metrics are
    replicated.
    """

    def step(state: dict, x: jax.Array) -> tuple[dict, dict]:
        x = x.astype(jnp.float32)
        (loss, (mse, out)), grads = jax.value_and_grad(
            lambda p: sae_loss(sae_module, sae_cfg, p, x, state["dead"], state["step"]), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params, dead = post_update(sae_cfg, params, state["dead"], out, x.shape[0], state["step"])
        # FVE against this batch's own variance (the eval uses held-out data)
        var = jnp.mean(jnp.sum((x - x.mean(0)) ** 2, -1))
        metrics = {"train/loss": loss, "train/mse": mse, "train/fve": 1.0 - mse / var, "train/l0": out.l0,
                   **{f"train/{k}": v for k, v in out.penalties.items()}, "train/lr": schedule(state["step"]),
                   "train/dead_fraction": jnp.mean(dead_mask(dead, sae_cfg).astype(jnp.float32))}
        new = dict(params=params, opt_state=opt_state, step=state["step"] + 1, dead=dead, rng=state["rng"])
        return new, metrics

    return jit_step(step, (state_shardings, batch_sharding), state_shardings)
