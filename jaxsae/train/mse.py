"""The MSE phase: a pure, jit-compiled `step(state, x) -> (state, metrics)` over shuffled activations.

The state is a plain pytree (what Orbax saves and the sharding rules see):
    params      SAE params (`jaxsae.sae.init_sae`)
    opt_state   optax Adam state (in the unit-norm decoder wrapper when `sae_cfg.unit_norm_decoder`)
    step        i32[]
    dead        i32[d_sae]  tokens since each latent last fired (AuxK's dead mask)
    rng         u32[2]      carried for kinds or phases that sample; checkpointed so resume is exact
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxsae import config as C
from jaxsae.sae import (SAEConfig, dead_mask, kind_of, l0_coeff_at, l1_coeff_at, reconstruction_loss,
                        update_dead_counter)
from jaxsae.sharding import jit_step
from jaxsae.train.loop import StepParts, run_steps
from jaxsae.train.optim import optimizer


def init_state(params, tx: optax.GradientTransformation, sae_cfg: SAEConfig, seed: int) -> dict:
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                dead=jnp.zeros((sae_cfg.d_sae,), jnp.int32),
                rng=jax.random.key_data(jax.random.PRNGKey(seed)))


def sae_loss(sae_module, sae_cfg: SAEConfig, params, x, dead, step, k=None, l1=None):
    """MSE-phase loss. x: f32[batch, d_model] (normalised). Returns (loss, (mse, SAEOutput)).
    k, l1: a sweep member's (traced) k and L1 coefficient (None: the config's). dead: the dead-latent
    counter, or None when no latent is dead (AuxK skipped statically). The sparsity coefficients (L1 for
    relu, L0 for jumprelu) are warmed up from 0 over their kind's warm-up steps."""
    x_hat, out = sae_module.apply({"params": params}, x, dead=None if dead is None else dead_mask(dead, sae_cfg),
                                  train=True, l1_coeff=l1_coeff_at(step, sae_cfg, l1), k=k,
                                  l0_coeff=l0_coeff_at(step, sae_cfg))
    mse = reconstruction_loss(x, x_hat)
    return mse + out.aux_loss, (mse, out)


def post_update(sae_cfg: SAEConfig, params, dead, out, n_tokens, step):
    """Bookkeeping after update `step` (i32[], 0 first): the kind's (BatchTopK's inference threshold) and
    the dead-latent counters."""
    params = kind_of(sae_cfg).post_update(sae_cfg, params, out, step)
    return params, update_dead_counter(dead, out.fired, n_tokens)


def mse_update(sae_module, sae_cfg: SAEConfig, tx, schedule, state: dict, x: jax.Array, k=None, l1=None,
               auxk: bool = True):
    """One MSE step of one SAE: (state, metrics). x: [batch, d_model]; k, l1 as in `sae_loss`;
    auxk=False: no latent is dead (the caller knows), AuxK is not computed."""
    x = x.astype(jnp.float32)
    dead = state["dead"] if auxk else None
    (loss, (mse, out)), grads = jax.value_and_grad(
        lambda p: sae_loss(sae_module, sae_cfg, p, x, dead, state["step"], k, l1), has_aux=True)(state["params"])
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


def make_mse_step(sae_cfg: SAEConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  state_shardings=None, batch_sharding=None, sweep=None):
    """Returns the jit-compiled step with the state donated.

    With `state_shardings` (`jaxsae.sharding.sae_state_shardings`) and `batch_sharding`, the step's
    inputs and outputs are pinned to them: the new state keeps the old one's layout, metrics are
    replicated.
    sweep: (hp, tx_of) for a stacked state of N SAEs (`jaxsae.sweep`): hp {name: [N]} their
    hyperparameters, tx_of(lr) -> (tx, schedule) a member's optimiser; every member reads the same batch.
    Members that share a k run vmapped at that k, group after group (`jaxsae.sweep.k_groups`).
    """

    from jaxsae.sae import make_sae

    sae_module = make_sae(sae_cfg)
    if sweep is None:
        def step(state: dict, x: jax.Array) -> tuple[dict, dict]:
            return mse_update(sae_module, sae_cfg, tx, schedule, state, x)
    else:
        from jaxsae.sweep import k_groups, run_by_k, sae_axis_split

        hp, tx_of = sweep
        groups = k_groups(kind_of(sae_cfg).uses_k, hp["k"], sae_axis_split(state_shardings))

        def group(state, x, h, k, auxk):
            # k: the group's static k (its own SAE config), or None: each member's traced k under the largest
            cfg = sae_cfg if k is None else dataclasses.replace(sae_cfg, k=k)
            module = sae_module if k is None else make_sae(cfg)

            def member(st, hh):
                tx_m, sched_m = tx_of(hh["lr"])
                return mse_update(module, cfg, tx_m, sched_m, st, x, hh["k"] if k is None else None,
                                  hh["l1_coeff"], auxk)

            return vmap_members(member, state, h)

        def step(state: dict, x: jax.Array) -> tuple[dict, dict]:
            h = {k: jnp.asarray(v) for k, v in hp.items()}
            return skip_auxk_unless_dead(
                sae_cfg, state, lambda s, auxk: run_by_k(groups, s, h, lambda st, hh, k: group(st, x, hh, k, auxk)))

    return jit_step(step, (state_shardings, batch_sharding), state_shardings)


def vmap_members(member, state, h: dict):
    """jax.vmap(member)(state, h) over the leading SAE axis; a group of one member runs unbatched (the
    single run's own program: batching rules for a size-1 axis cost up to a third more on CPU)."""
    if jax.tree.leaves(h)[0].shape[0] == 1:
        out = member(jax.tree.map(lambda a: a[0], state), jax.tree.map(lambda a: a[0], h))
        return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(member)(state, h)


def skip_auxk_unless_dead(sae_cfg: SAEConfig, state: dict, run):
    """run(state, auxk: bool) for a sweep's stacked state, with AuxK only when some member has a dead
    latent. AuxK's own `lax.cond` (skip when nothing is dead) becomes a select under vmap, which computes
    its top-k and matmul for every member on every step; this cond sits outside the vmap, so it skips."""
    if not kind_of(sae_cfg).uses_k:  # the k kinds are the ones with AuxK
        return run(state, True)
    any_dead = jnp.any(dead_mask(state["dead"], sae_cfg))
    return jax.lax.cond(any_dead, lambda s: run(s, True), lambda s: run(s, False), state)


def mse_parts(cfg: C.RunConfig, sae_cfg: SAEConfig, mesh, members=()) -> StepParts:
    """The MSE phase's step; with sweep `members` (`jaxsae.sweep.members`) its state is stacked over them."""
    from jaxsae.sae import init_sae
    from jaxsae.sharding import batch_sharding, sae_state_shardings, stack_shardings
    from jaxsae.sweep import hparams

    total = cfg.mse.tokens // cfg.mse.batch_size
    tx, sched = optimizer(cfg.mse, total, sae_cfg)
    key = jax.random.PRNGKey(cfg.mse.seed)
    abstract = jax.eval_shape(lambda: init_state(init_sae(sae_cfg, key), tx, sae_cfg, cfg.mse.seed))
    state_sh, batch_sh = sae_state_shardings(abstract, sae_cfg, mesh), batch_sharding(mesh)
    sweep = None
    if members:
        n = len(members)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), abstract)
        state_sh = stack_shardings(state_sh, n)
        sweep = (hparams(cfg, members, "mse"),
                 lambda lr: optimizer(dataclasses.replace(cfg.mse, lr=lr), total, sae_cfg))
    step = make_mse_step(sae_cfg, tx, sched, state_sh, batch_sh, sweep)
    return StepParts(total, tx, abstract, state_sh, batch_sh, step)


def run_phase(ctx, phase, start):
    """The MSE phase (a `jaxsae.phases` runner): shuffled store rows, or in stream mode rows the LM makes
    as it goes, resumed from its last checkpoint."""
    from jaxsae.data.reader import ShuffledReader
    from jaxsae.sae import init_sae
    from jaxsae.sharding import global_batch
    from jaxsae.train.pipeline import Trained

    from jaxsae.sweep import data_seed, hparams

    cfg, sae_cfg, members = ctx.cfg, ctx.sae_cfg, ctx.members
    parts = mse_parts(cfg, sae_cfg, ctx.mesh, members)

    def one(x, seed):
        return init_state(init_sae(sae_cfg, jax.random.PRNGKey(seed), x), parts.tx, sae_cfg, seed)

    def fresh():
        # b_dec starts at the geometric median of a first sample of (normalised) activations; the state
        # is built under jit straight into its shardings (a sweep's: one per member's seed)
        sample = ctx.store.read(0, min(ctx.store.n_tokens, 4096), normalize=True)
        if members:
            seeds = jax.numpy.asarray(hparams(cfg, members, "mse")["seed"])
            return jax.jit(jax.vmap(one, in_axes=(None, 0)), out_shardings=parts.state_sh)(sample, seeds)
        return jax.jit(lambda x: one(x, cfg.mse.seed), out_shardings=parts.state_sh)(sample)

    readers = []
    ckpt = ctx.plan.checkpointer(phase.name)
    stream = getattr(ctx.store, "stream", None)  # stream mode (`jaxsae.data.stream`)
    if stream is not None:
        from jaxsae.data.packing import Position
        from jaxsae.data.stream import StreamReader

        recorded = ckpt.restore_meta().get("stream_starts") if ckpt.latest_step() else None
        if recorded and len(recorded) > len(stream.starts):  # a resume jumps to its blocks
            stream.starts = [Position.from_json(p) for p in recorded]
        reader = StreamReader(stream, cfg.mse.batch_size, data_seed(cfg), ctx.store.scale)

    def feed(step: int):
        if stream is not None:
            x = reader.batch(step - 1)
            meta["stream_starts"] = stream.starts_json()  # what the next checkpoint records
            return (jax.device_put(x, parts.batch_sh),)
        if not readers:  # each process reads its own slice of the store and feeds batch/P rows
            readers.append(ShuffledReader(ctx.store, cfg.mse.batch_size // jax.process_count(), seed=data_seed(cfg),
                                          start_step=step - 1, process_index=jax.process_index(),
                                          process_count=jax.process_count()))
        return (global_batch(next(readers[0]), parts.batch_sh),)

    meta = {"phase": phase.name, "sae": dataclasses.asdict(sae_cfg), "scale": ctx.store.scale,
            "hook_layer": cfg.hook.layer, "model": ctx.plan.model_path, "total_steps": parts.total,
            "reader": {"seed": data_seed(cfg)}, "trajectory": ctx.trajectory(phase.name), **ctx.sweep_meta()}
    try:
        state = run_steps(ckpt, ctx.log, phase.name, parts, fresh, feed, meta,
                          cfg.checkpoint.every_steps, cfg.mse.batch_size, names=ctx.member_names)
    finally:
        for r in readers:
            r.close()
    if stream is not None:  # the KL windows start after the text this phase streamed
        ctx.store.ended(stream.end(parts.total * cfg.mse.batch_size))
    return Trained(state, state["params"])
