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

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxsae.sae import SAEConfig, dead_mask, kind_of, make_sae, maybe_unit_norm_decoder, update_dead_counter
from jaxsae.sharding import jit_step
from jaxsae.splice import Splice, branch_logits, kl_per_token, residual, splice
from jaxsae.sweep import k_groups, run_by_k, sae_axis_split
from jaxsae.train.adapters import identity_composition
from jaxsae.train.mse import post_update, skip_auxk_unless_dead, vmap_members


@dataclasses.dataclass(frozen=True)
class KLLoss:
    """How a step weighs its terms (static: part of the compiled step).

    kl_share: s in (1 - s)·MSE + s·β·KL; ½ is the paper's, 0 the MSE-only control (no suffix runs).
    kl_only: loss = KL alone (LoRA on the LM: the MSE target moves with the LM).
    l1_controller: hold L0 at the state's l0_target by moving λ every step (ReLU SAEs): `control_l1`.
    l1_control, l1_rate, l1_gain: the rule (sign | pi) and its rate / integral gain and proportional gain.
    auxk: the SAE's AuxK dead-latent term (the reference's fine-tune has none).
    """

    kl_share: float = 0.5
    kl_only: bool = False
    l1_controller: bool = False
    l1_rate: float = 0.001
    l1_control: str = "sign"
    l1_gain: float = 0.5  # as the config's finetune.l1_gain
    auxk: bool = True


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


def control_l1(loss: KLLoss, l1: jax.Array, l1_base: jax.Array | None, l0: jax.Array, target: jax.Array):
    """(λ for the next step, the PI rule's integral state): the L1 controller after a step whose batch had L0 `l0`.

    sign (the reference): λ·(1 + rate) when L0 > target, else λ·(1 - rate): a pure integral action at a
      fixed speed, which lags when the fine-tune pushes L0 up faster than the rate allows.
    pi: with e = log(L0/target) (clipped to ±0.5 against a freak batch), the integral state moves as
      log λ_I += rate·e and λ = λ_I·exp(gain·e): the proportional part answers a jump of L0 in the same
      step, the integral part removes the steady offset. Both act on log λ, so they are scale free.
    l1, l1_base: f32[]; l1_base is the integral state λ_I (pi; carried unchanged by sign)."""
    if loss.l1_control == "sign":
        return jnp.where(l0 > target, l1 * (1 + loss.l1_rate), l1 * (1 - loss.l1_rate)), l1_base
    e = jnp.clip(jnp.log(jnp.maximum(l0, 1e-3) / jnp.maximum(target, 1e-3)), -0.5, 0.5)
    base = l1_base * jnp.exp(loss.l1_rate * e)
    return base * jnp.exp(loss.l1_gain * e), base


def init_ft_state(params, tx, sae_cfg: SAEConfig, dead, l1_coeff: float, l0_target: float, seed: int,
                  frozen=None, probe_batches: int = 0) -> dict:
    """Fine-tune state: the MSE phase's fields plus the L1 coefficient λ and the L0 it holds.
    With an adapter, `params` are the adapter's and `frozen` the SAE it wraps (carried unchanged).
    probe_batches: the L1 probe's batches (`probe_l0`); l0_target is then f32[probe_batches], the L0 that
    each probe batch is held at (its starting L0: `l0_target` may give one per batch)."""
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                 dead=jnp.asarray(dead, jnp.int32), rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                 l1=jnp.asarray(l1_coeff, jnp.float32), l1_base=jnp.asarray(l1_coeff, jnp.float32),
                 l0_target=jnp.asarray(l0_target, jnp.float32))
    if probe_batches:
        state["l0_target"] = jnp.broadcast_to(state["l0_target"], (probe_batches,))
    return state if frozen is None else {**state, "frozen": frozen}


def kl_mse_loss(sp: Splice, lm_params, sae_cfg: SAEConfig, params, tokens, loss: KLLoss, *, dead, l1_coeff,
                compose=None, frozen=None, shared=None, k=None, kl_share=None, rng=None):
    """The fused loss. tokens: int[b, t]. Returns (loss, aux dict).

    params: the differentiated pytree: the SAE's, or with `compose` an adapter's around the `frozen` SAE.
    dead: the dead-latent counter, or None to skip AuxK (a frozen SAE).
    shared: (x, clean logits or None) computed once for a sweep's SAEs (`shared_branches`); None: here.
    k, kl_share: a sweep member's (traced) k and KL share (None: the config's).
    rng: this step's key, for an adapter with dropout (SAE-LoRA); None: no dropout.
    """
    module = make_sae(sae_cfg)
    comp = (identity_composition(params, lm_params) if compose is None
            else compose(params, frozen, lm_params, rng=rng))
    mask_dead = None if dead is None else dead_mask(dead, sae_cfg)
    x, clean_shared = (None, None) if shared is None else shared
    s = splice(sp, lm_params, tokens, lambda p, xn: module.apply({"params": p}, xn, train=True, l1_coeff=l1_coeff,
                                                                 dead=mask_dead, k=k, lora=comp.sae_lora),
               comp, x=x)
    mf = s.mask.astype(jnp.float32)
    n = jnp.maximum(mf.sum(), 1.0)
    xn = jax.lax.stop_gradient(s.x_in.astype(jnp.float32) / sp.scale)
    mse = jnp.sum(jnp.sum((xn - s.x_hat_n) ** 2, -1) * mf) / n
    if loss.kl_share == 0.0 and not loss.kl_only:  # the MSE-only control: no suffix, no KL
        nan = jnp.full((), jnp.nan, jnp.float32)
        return mse + s.out.aux_loss, dict(kl=nan, mse=mse, beta=nan, out=s.out, n=n)
    clean, logits, _ = branch_logits(sp, lm_params, comp, s, clean=clean_shared is None)
    clean = clean_shared if clean is None else clean
    kl = jnp.sum(kl_per_token(clean, logits) * mf) / n
    beta = jax.lax.stop_gradient(mse) / (jax.lax.stop_gradient(kl) + 1e-8)
    share = loss.kl_share if kl_share is None else kl_share
    total = kl if loss.kl_only else (1.0 - share) * mse + share * beta * kl + s.out.aux_loss
    return total, dict(kl=kl, mse=mse, beta=beta, out=s.out, n=n)


def shared_branches(sp: Splice, lm_params, tokens: jax.Array, clean: bool):
    """(x [b, t, D], clean logits [b, t, V] or None): what a sweep's SAEs share in a step, computed once:
    the prefix to the hook and, when a KL is taken, the clean suffix (a constant target)."""
    x = residual(sp, lm_params, tokens)
    return x, (jax.lax.stop_gradient(sp.lm.suffix(x, sp.layer, params=lm_params)) if clean else None)


def probe_l0(sae_cfg: SAEConfig, params, probe: jax.Array, step: jax.Array, k=None) -> jax.Array:
    """f32[]: the SAE's mean L0 on batch `step mod n` of the probe f32[n, m, d_model] (normalised activations
    of held-out training text, `finetune.l0_probe_sequences`), which the L1 controller reads instead of the
    training batch's own L0."""
    chunk = jax.lax.dynamic_index_in_dim(probe, step % probe.shape[0], keepdims=False)
    out = make_sae(sae_cfg).apply({"params": jax.lax.stop_gradient(params)}, chunk, train=True, k=k)[1]
    return out.l0


def make_finetune_step(sp: Splice, sae_cfg: SAEConfig, tx, schedule, loss: KLLoss = KLLoss(), *, compose=None,
                       shardings=None, sweep=None, probe: bool = False):
    """Returns jit(step)(state, lm_params, tokens) -> (state, metrics), with the state donated.

    compose: an adapter from `jaxsae.train.adapters` (state["params"] are then its params and
    state["frozen"] the SAE, which the step carries unchanged); None trains the SAE itself.
    shardings: optional (state, lm_params, tokens) shardings; the new state keeps the state's layout.
    sweep: (hp, tx_of) for a state stacked over N SAEs (`jaxsae.sweep`): the prefix and the clean suffix
    run once, each member's splice, spliced suffix and update run under vmap with its hyperparameters
    (members that share a k vmapped at that k, group after group: `jaxsae.sweep.k_groups`).
    probe: the step takes a fourth argument, the L1 controller's probe f32[n, m, d_model] (`probe_l0`);
    shardings then name its sharding too.
    """
    sae_trains = compose is None or compose.sae_trains
    kl_only = loss.kl_only or (compose is not None and compose.kl_only)
    loss = dataclasses.replace(loss, kl_only=kl_only)

    def update(state: dict, lm_params, tokens: jax.Array, tx, schedule, shared=None, k=None, kl_share=None,
               auxk: bool = True, probe=None, sae_cfg: SAEConfig = sae_cfg):
        dead = state["dead"] if sae_trains and loss.auxk and auxk else None
        (total, aux), grads = jax.value_and_grad(
            lambda p: kl_mse_loss(sp, lm_params, sae_cfg, p, tokens, loss, dead=dead, l1_coeff=state["l1"],
                                  compose=compose, frozen=state.get("frozen"), shared=shared, k=k,
                                  kl_share=kl_share, rng=jax.random.fold_in(state["rng"], state["step"])),
            has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = aux["out"]
        if compose is None:
            params, dead = post_update(sae_cfg, params, state["dead"], out, tokens.size, state["step"])
        else:  # the base SAE is frozen: only count which latents fire
            dead = update_dead_counter(state["dead"], out.fired, tokens.size)
        l1, l1_base = state["l1"], state["l1_base"]
        l0, target = out.l0, state["l0_target"]  # the L0 the controller reads: the SAE's before this update
        if probe is not None:
            # this step's probe batch against its own starting L0: probe batches differ by ±10% in L0 (one
            # target for all would hold the median batch, and the mean drifts), and a mean over the
            # batches' latest readings lags by up to a pass over the probe, where the sign rule oscillates
            l0 = probe_l0(sae_cfg, state["params"], probe, state["step"], k)
            target = target[state["step"] % probe.shape[0]]
        if loss.l1_controller:
            l1, l1_base = control_l1(loss, l1, l1_base, l0, target)
        metrics = {"train/loss": total, "train/mse": aux["mse"], "train/l0": out.l0,
                   **{f"train/{k}": v for k, v in out.penalties.items()}, "train/l1_coeff": state["l1"],
                   "train/lr": schedule(state["step"]),
                   "train/dead_fraction": jnp.mean(dead_mask(dead, sae_cfg).astype(jnp.float32))}
        if loss.kl_share > 0.0 or kl_only:
            metrics.update({"train/kl": aux["kl"], "train/beta": aux["beta"]})
        if loss.l1_controller:
            metrics["train/l0_target"] = target
        if probe is not None:
            metrics["train/l0_probe"] = l0
        new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1, "dead": dead, "l1": l1,
               "l1_base": l1_base}
        return new, metrics

    if sweep is None and probe:
        def step(state: dict, lm_params, tokens: jax.Array, probe_x: jax.Array):
            return update(state, lm_params, tokens, tx, schedule, probe=probe_x)
    elif sweep is None:
        def step(state: dict, lm_params, tokens: jax.Array):
            return update(state, lm_params, tokens, tx, schedule)
    else:
        hp, tx_of = sweep
        groups = k_groups(kind_of(sae_cfg).uses_k, hp["k"], sae_axis_split(shardings[0] if shardings else None))

        def step(state: dict, lm_params, tokens: jax.Array):
            shared = shared_branches(sp, lm_params, tokens, clean=loss.kl_share > 0.0 or kl_only)

            def group(st, h, k, auxk):
                # k: the group's static k (its own SAE config), or None: each member's traced k
                cfg = sae_cfg if k is None else dataclasses.replace(sae_cfg, k=k)

                def member(s1, hh):
                    tx_m, sched_m = tx_of(hh["lr"])
                    return update(s1, lm_params, tokens, tx_m, sched_m, shared, hh["k"] if k is None else None,
                                  hh.get("kl_share"), auxk, sae_cfg=cfg)

                return vmap_members(member, st, h)

            h = {k: jnp.asarray(v) for k, v in hp.items()}
            if not (sae_trains and loss.auxk):
                return run_by_k(groups, state, h, lambda st, hh, k: group(st, hh, k, False))
            return skip_auxk_unless_dead(
                sae_cfg, state, lambda s, auxk: run_by_k(groups, s, h, lambda st, hh, k: group(st, hh, k, auxk)))

    return jit_step(step, shardings, shardings[0] if shardings else None)
