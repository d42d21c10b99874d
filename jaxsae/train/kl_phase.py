"""The phases of the fused KL+MSE step over token windows (`jaxsae.phases` runners): the fine-tune,
its MSE-only control, an adapter around a frozen SAE, and the e2e baseline from a fresh SAE.

They differ only in data: where their SAE starts (`Phase.starts`), their section's optimiser, schedule
and KL share (the control's is fixed at 0), and, for the adapter, what is trained. The fine-tune and the
control read the window from where the store's contexts end (the position the store recorded); the adapter
the same window; e2e its budget from the start of the text. Windows are streamed a block at a time
(`jaxsae.data.windows`); the block starts found so far go into every checkpoint, so a resume jumps to its
block without reading the text before it. A sweep (`jaxsae.sweep`) runs every phase on its stacked SAEs with one step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxsae import config as C
from jaxsae.sae import kind_of
from jaxsae.train.finetune import KLLoss, init_ft_state, make_finetune_step
from jaxsae.train.loop import StepParts, run_steps
from jaxsae.splice import residual
from jaxsae.train.optim import optimizer


# The reference moves λ by 0.1% per step over a ~3,000-step window: up to ~20x either way. A window of
# another length gets the rate that allows the same range.
CONTROLLER_RANGE = 20.0
# The PI controller's integral gain per step on log(L0/target) (`finetune.control_l1`).
PI_INTEGRAL_GAIN = 0.1
# The batches at the window's start over which the L0 the controller holds is measured.
TARGET_BATCHES = 32


def loss_of(cfg: C.RunConfig, phase, sae_cfg, trains_sae: bool, continues: bool, total_steps: int) -> KLLoss:
    """The phase's loss settings; the L1 controller (default: on for kinds with an L1 penalty) holds the
    L0 of the SAE it continues, so it is off for a fresh SAE and for a frozen one."""
    sec = C.section(cfg, phase.name)
    controller = kind_of(sae_cfg).l1_controlled if sec.l1_controller is None else sec.l1_controller
    share = sec.kl_share if phase.kl_share is None else phase.kl_share
    if sec.l1_rate is not None:
        rate = sec.l1_rate
    elif sec.l1_control == "sign":
        rate = CONTROLLER_RANGE ** (1.0 / max(total_steps, 1)) - 1.0
    else:
        rate = PI_INTEGRAL_GAIN
    return KLLoss(kl_share=share, l1_controller=controller and trains_sae and continues, l1_rate=rate,
                  l1_control=sec.l1_control, l1_gain=sec.l1_gain, auxk=sec.auxk)


def uses_probe(cfg: C.RunConfig, phase, loss: KLLoss) -> bool:
    """The controller reads the L0 of held-out probe text (`finetune.l0_probe_sequences`) in this phase."""
    return loss.l1_controller and C.section(cfg, phase.name).l0_probe_sequences > 0


def probe_batches(cfg: C.RunConfig, phase, sae_cfg, trains_sae: bool, continues: bool) -> int:
    """The number of batches of the L1 controller's probe in this phase (0: it reads each training batch)."""
    sec = C.section(cfg, phase.name)
    total = C.phase_tokens(cfg, phase.name) // C.phase_batch_tokens(cfg, phase.name)
    on = uses_probe(cfg, phase, loss_of(cfg, phase, sae_cfg, trains_sae, continues, total))
    return sec.l0_probe_sequences // sec.batch_sequences if on else 0


def kl_parts(cfg: C.RunConfig, phase, sae_cfg, mesh, splice, lm_sh, fresh, compose=None,
             continues: bool = True, members=()) -> StepParts:
    """The fused step of `phase` (a `jaxsae.phases.Phase`). fresh(tx) -> the phase's first state (one
    member's, with sweep `members`: the step's state is then stacked over them)."""
    from jaxsae.sharding import batch_sharding, probe_sharding, sae_state_shardings, stack_shardings
    from jaxsae.sweep import hparams

    sec = C.section(cfg, phase.name)
    total = C.phase_tokens(cfg, phase.name) // C.phase_batch_tokens(cfg, phase.name)
    tx, sched = optimizer(sec, total, sae_cfg if compose is None else None)
    abstract = jax.eval_shape(lambda: fresh(tx))
    state_sh, batch_sh = sae_state_shardings(abstract, sae_cfg, mesh), batch_sharding(mesh)
    sweep = None
    if members:
        n = len(members)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), abstract)
        state_sh = stack_shardings(state_sh, n)
        sweep = (hparams(cfg, members, phase.section),
                 lambda lr: optimizer(dataclasses.replace(sec, lr=lr), total, sae_cfg))
    loss = loss_of(cfg, phase, sae_cfg, compose is None or compose.sae_trains, continues, total)
    probe = uses_probe(cfg, phase, loss)
    shardings = (state_sh, lm_sh, batch_sh) + ((probe_sharding(mesh),) if probe else ())
    step = make_finetune_step(splice, sae_cfg, tx, sched, loss, compose=compose, shardings=shardings,
                              sweep=sweep, probe=probe)
    return StepParts(total, tx, abstract, state_sh, batch_sh, step, shardings[3] if probe else None)


def window_l0(ctx, sae_params, tokens: np.ndarray, ks=None, per: int | None = None):
    """The SAE's mean L0 over every token of tokens: int[b, t] (the training step's own measure), taken
    `per` sequences at a time (None: all at once); for a sweep (stacked params, ks: each member's k), an
    array of one L0 per member."""
    from jaxsae.sae import make_sae

    module = make_sae(ctx.sae_cfg)

    sp = ctx.splice

    @jax.jit
    def l0(lm_params, params, toks, ks):
        x = residual(sp, lm_params, toks).astype(jax.numpy.float32) / sp.scale
        if ks is None:
            return module.apply({"params": params}, x, train=True)[1].l0
        return jax.vmap(lambda p, k: module.apply({"params": p}, x, train=True, k=k)[1].l0)(params, ks)

    per = per or len(tokens)
    out = np.mean([np.asarray(l0(ctx.lm.params, sae_params, tokens[i:i + per], ks))
                   for i in range(0, len(tokens) - per + 1, per)], axis=0)
    return float(out) if ks is None else np.asarray(out)


def probe_activations(ctx, tokens: np.ndarray, per: int) -> np.ndarray:
    """f32[n / per, per * t, d_model]: the normalised hook activations of tokens int[n, t], `per` sequences
    (one training batch) to a row: the L1 controller's probe (`finetune.probe_l0`)."""
    sp = ctx.splice
    acts = jax.jit(lambda lm_params, toks: residual(sp, lm_params, toks).astype(jax.numpy.float32) / sp.scale)
    rows = [np.asarray(acts(ctx.lm.params, tokens[i:i + per])).reshape(per * tokens.shape[1], -1)
            for i in range(0, len(tokens), per)]
    return np.stack(rows)


def probe_targets(sae_cfg, params, probe) -> np.ndarray:
    """f32[n]: the L0 of `params` on each of the probe's n batches (`finetune.probe_l0`)."""
    from jaxsae.train.finetune import probe_l0

    one = jax.jit(lambda p, x, i: probe_l0(sae_cfg, p, x, i))
    return np.asarray([one(params, probe, np.int32(i)) for i in range(probe.shape[0])], np.float32)


def run_phase(ctx, phase, start):
    """Trains `phase` from `start` (None: a fresh SAE, the paper's init: unit-norm decoder, encoder =
    decoder^T, b_dec = 0), resuming from its last checkpoint."""
    from jaxsae.data.packing import START
    from jaxsae.data.windows import eval_end, open_window, read_probe, store_end
    from jaxsae.sae import init_sae
    from jaxsae.sharding import batch_from_global, probe_sharding
    from jaxsae.sweep import hparams
    from jaxsae.train.pipeline import Trained, adapter_of

    cfg, sae_cfg, members = ctx.cfg, ctx.sae_cfg, ctx.members
    sec = C.section(cfg, phase.name)
    compose = adapter_of(ctx) if phase.holds == "adapter" else None
    key = jax.random.PRNGKey(sec.seed)
    if start is None:
        params, dead, l0 = init_sae(sae_cfg, key), np.zeros(sae_cfg.d_sae, np.int32), 0.0
        if members:  # every member of a fresh sweep starts from the same SAE (e2e.seed)
            params, dead, l0 = jax.tree.map(lambda a: np.stack([a] * len(members)), (params, dead, np.float32(l0)))
    else:
        params, dead, l0 = start.params, start.dead, start.l0
    hp = hparams(cfg, members, phase.section) if members else None

    n_probe = probe_batches(cfg, phase, sae_cfg, compose is None or compose.sae_trains, start is not None)

    def fresh(tx, sae_params=params, dead=dead, lm_params=ctx.lm.params, l0_target=l0):
        if compose is not None:
            trainable, _ = compose.init(key, sae_params, lm_params, ctx.lm.param_axes())
            return init_ft_state(trainable, tx, sae_cfg, dead, sae_cfg.l1_coeff, l0_target, sec.seed,
                                 frozen=sae_params)
        return init_ft_state(sae_params, tx, sae_cfg, dead, sae_cfg.l1_coeff, l0_target, sec.seed,
                             probe_batches=n_probe)

    def fresh_one(tx):
        if not members:
            return fresh(tx)
        return fresh(tx, *jax.tree.map(lambda a: a[0], (params, dead)), l0_target=0.0)

    parts = kl_parts(cfg, phase, sae_cfg, ctx.mesh, ctx.splice, ctx.plan.lm_shardings(), fresh_one, compose,
                     continues=start is not None, members=members)
    per = sec.batch_sequences
    ckpt = ctx.plan.checkpointer(phase.name)
    recorded = ckpt.restore_meta().get("window_starts") if ckpt.latest_step() else None
    begin = START if start is None else store_end(cfg, ctx.lm.tokenizer, ctx.store.meta)
    probe = None
    if n_probe:
        # the probe is whole documents after the store's text, and the window starts at the document after
        # them: the fine-tune lowers L0 on the documents it trains on, so a probe that shared one would
        # read low as the window's own batches do (or held-out validation text: l0_probe_source)
        what = f"{phase.section}.l0_probe_sequences"
        if sec.l0_probe_source == "eval":  # validation text after the evaluation's; the window is unmoved
            toks, _ = read_probe(cfg, ctx.lm.tokenizer, sec.l0_probe_sequences, eval_end(cfg, ctx.lm.tokenizer),
                                 what, source="eval_source")
        else:
            toks, begin = read_probe(cfg, ctx.lm.tokenizer, sec.l0_probe_sequences, begin, what)
        probe = jax.device_put(probe_activations(ctx, toks, per), probe_sharding(ctx.mesh))
    window = open_window(cfg, ctx.lm.tokenizer, parts.total * per, begin, sec.seed, f"{phase.section}.tokens",
                         recorded)

    def first_state():
        # only for a phase that does not resume (a checkpoint carries its l0_target): the L0 the controller
        # holds is measured as it measures it, on training text, not the eval's, and over the window's first
        # TARGET_BATCHES batches: one batch's L0 is off by ~7% (demo), which the controller would then hold
        ks = None if hp is None else hp["k"]
        n = min(parts.total, TARGET_BATCHES)
        if start is None:
            target = l0
        elif probe is None:
            target = window_l0(ctx, params, window.rows(0, n * per), ks, per)
        else:  # each probe batch's own L0, as the step reads it
            target = probe_targets(sae_cfg, params, probe)
        return first(params, dead, ctx.lm.params, target)

    def feed(step: int):
        rows = window.rows((step - 1) * per, step * per)
        meta["window_starts"] = window.starts_json()  # what the next checkpoint records
        batch = batch_from_global(rows, parts.batch_sh)
        return (ctx.lm.params, batch) if probe is None else (ctx.lm.params, batch, probe)

    meta = {"phase": phase.name, "sae": dataclasses.asdict(sae_cfg), "scale": ctx.store.scale,
            "hook_layer": cfg.hook.layer, "model": ctx.plan.model_path, "total_steps": parts.total,
            "trajectory": ctx.trajectory(phase.name), **ctx.sweep_meta()}
    # the first state is built under jit straight into its shardings (arrays as arguments, not constants)
    if members:  # each member's λ starts from its own sae.l1_coeff
        def one(p, d, lp, t, l1):
            return {**fresh(parts.tx, p, d, lp, t), "l1": l1, "l1_base": l1}

        l1s = jax.numpy.asarray(hp["l1_coeff"])
        first = jax.jit(lambda p, d, lp, t: jax.vmap(one, in_axes=(0, 0, None, 0, 0))(p, d, lp, t, l1s),
                        out_shardings=parts.state_sh)
    else:
        first = jax.jit(lambda p, d, lp, t: fresh(parts.tx, p, d, lp, t), out_shardings=parts.state_sh)
    state = run_steps(ckpt, ctx.log, phase.name, parts, first_state, feed, meta,
                      cfg.checkpoint.every_steps, per * cfg.data.context, names=ctx.member_names)
    if compose is not None:
        return Trained(state, state["frozen"], state["params"])
    return Trained(state, state["params"])
