"""Every phase's optimiser and learning-rate schedule, built from its own config section."""

from __future__ import annotations

import optax

from jaxsae.config import PhaseCfg
from jaxsae.sae import SAEConfig, maybe_unit_norm_decoder


def schedule(pc: PhaseCfg, total_steps: int) -> optax.Schedule:
    """warmup_decay: linear warm-up, constant, linear decay to 0 over the last `decay_fraction` of steps
    (the paper's MSE phase); linear: lr -> 0 over the phase, no warm-up (the fine-tune); constant."""
    name = pc.schedule_name()
    if name == "constant":
        return optax.constant_schedule(pc.lr)
    if name == "linear":
        return optax.linear_schedule(pc.lr, 0.0, max(total_steps, 1))
    decay_start = int(total_steps * (1.0 - pc.decay_fraction))
    warm = min(pc.warmup_steps, decay_start)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, pc.lr, max(warm, 1)), optax.constant_schedule(pc.lr),
         optax.linear_schedule(pc.lr, 0.0, max(total_steps - decay_start, 1))],
        boundaries=[warm, decay_start])


def optimizer(pc: PhaseCfg, total_steps: int, sae_cfg: SAEConfig | None) -> tuple[optax.GradientTransformation,
                                                                                  optax.Schedule]:
    """Adam (AdamW when weight_decay > 0) after a global-norm clip (when clip > 0); for an SAE with a
    unit-norm decoder, the parallel-gradient projection before and the renormalisation after.
    sae_cfg=None: the trainable params are not an SAE's (an adapter's)."""
    sched = schedule(pc, total_steps)
    if pc.weight_decay:
        opt = optax.adamw(sched, b1=pc.b1, b2=pc.b2, eps=pc.eps, weight_decay=pc.weight_decay)
    else:
        opt = optax.adam(sched, b1=pc.b1, b2=pc.b2, eps=pc.eps)
    if pc.clip:
        opt = optax.chain(optax.clip_by_global_norm(pc.clip), opt)
    return (opt if sae_cfg is None else maybe_unit_norm_decoder(sae_cfg, opt)), sched
