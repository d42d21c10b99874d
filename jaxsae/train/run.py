"""A whole run: check everything, collect the store, train the MSE phase, evaluate.

Every check that can fail on user input (config keys and values, the hook layer against the model,
an existing store built from another model or layer) runs before a single weight is loaded.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxsae import config as C
from jaxsae.checkpoint import Checkpointer
from jaxsae.train.loop import (MetricsLog, PhaseLoop, eval_sequences, resolve_model_path, take_contexts,
                               write_eval)


@dataclasses.dataclass
class Context:
    """What the phases share once the checks have passed."""

    cfg: C.RunConfig
    run_dir: Path  # local: config.yaml, metrics.jsonl, eval.json, report.*
    model_path: str
    store_path: str
    sae_cfg: object
    log: MetricsLog
    mcfg: object  # the LM's config (read from config.json; no weights yet)
    mesh: object  # jax.sharding.Mesh over all devices of all processes
    remote: str | None = None  # a gs://... run directory: checkpoints and store live there, files are copied up
    lm: object = None
    store: object = None
    init: object = None  # the LoadedSAE of finetune.init_from, if set

    def checkpointer(self, phase: str) -> Checkpointer:
        root = self.cfg.checkpoint.dir.rstrip("/") or f"{self.remote or self.run_dir}/checkpoints"
        return Checkpointer(f"{root}/{phase}", keep=self.cfg.checkpoint.keep)

    def lm_shardings(self):
        from jaxsae.sharding import lm_param_shardings

        return lm_param_shardings(self.mcfg, self.mesh, self.cfg.model.lm_sharding)


SYNCED = ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "report.png")


def split_run_dir(cfg: C.RunConfig, run_dir) -> tuple[Path, str | None]:
    """(local dir, remote URL or None). A URL run dir (gs://bucket/run: shared by every host of a pod)
    holds the checkpoints and the store; the small files are written under runs/<name> and copied up."""
    text = str(run_dir)
    if "://" in text:
        return Path("runs") / cfg.name, text.rstrip("/")
    return Path(run_dir), None


def sync_remote(ctx: "Context", down: bool = False) -> None:
    """Copies the run's small files up to the remote run dir (or, on resume, down when missing here)."""
    if ctx.remote is None:
        return
    from etils import epath

    from jaxsae.distributed import is_main

    for name in SYNCED:
        local, remote = ctx.run_dir / name, epath.Path(ctx.remote) / name
        if down and not local.exists() and remote.exists():
            local.write_bytes(remote.read_bytes())
        elif not down and is_main() and local.exists():
            remote.write_bytes(local.read_bytes())


def prepare(cfg: C.RunConfig, run_dir) -> Context:
    """All checks that need no compute: the model's config.json, the mesh, the store's metadata."""
    from jaxsae.data.store import read_meta
    from jaxsae.distributed import is_main
    from jaxsae.models import read_config
    from jaxsae.models.hf import resolve

    run_dir, remote = split_run_dir(cfg, run_dir)
    model_path = resolve_model_path(cfg.model.path)
    mcfg = read_config(resolve(model_path), cfg.model.dtype)
    C.check_against_model(cfg, mcfg.n_layers, mcfg.d_model)
    mesh = mesh_for(cfg, jax.devices(), jax.process_count())
    model = mesh.shape["model"]
    if model > 1 and cfg.model.lm_sharding == "replicated" and {"finetune", "e2e"} & set(cfg.phases) and is_main():
        print(f"warning: mesh.model={model} with a replicated LM repeats the LM's forward passes on each of the "
              f"{model} devices of a model row; model.lm_sharding=tensor splits that work", file=sys.stderr)
    store_path = cfg.store.path or f"{remote or run_dir}/store"
    meta = read_meta(store_path) if (cfg.store.path or remote or (run_dir / "store").exists()) else None
    if meta is not None:
        d, layer = meta.get("model", {}).get("d_model"), meta.get("layer")
        if d != mcfg.d_model:
            raise C.ConfigError(f"store.path={store_path} holds d_model={d} activations but the model has "
                                f"d_model={mcfg.d_model}: point store.path at a store of this model or a new path")
        if layer != cfg.hook.layer:
            raise C.ConfigError(f"store.path={store_path} was collected at layer {layer}, not hook.layer="
                                f"{cfg.hook.layer}: set hook.layer={layer} or use a new store.path")
    sae_cfg, init = C.sae_config(cfg, mcfg.d_model), None
    if cfg.finetune.init_from:
        from jaxsae.interop import load_init

        try:
            init = load_init(cfg.finetune.init_from, cfg.finetune.init_format, sae_cfg, cfg.hook.layer)
        except (ValueError, FileNotFoundError) as e:
            raise C.ConfigError(str(e)) from e
        sae_cfg = init.cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, run_dir, model_path, store_path, sae_cfg,
                  MetricsLog(run_dir / "metrics.jsonl", enabled=is_main()), mcfg, mesh, remote, init=init)
    sync_remote(ctx, down=True)  # a resumed pod run continues the metrics written before
    if is_main():
        (run_dir / "config.yaml").write_text(C.dump(cfg))
    return ctx


def mesh_for(cfg: C.RunConfig, devices: list, n_processes: int):
    """The run's mesh over `devices` (this machine's, or a described TPU topology's), after the checks."""
    from jaxsae.sharding import make_mesh

    data, model = C.check_mesh(cfg, len(devices), n_processes)
    return make_mesh(data, model, list(devices)[:data * model])


class StepParts(NamedTuple):
    """A phase's optimizer, abstract state, shardings and jit step: the trainer and `jaxsae.aot` build
    the step from the same function, so the ahead-of-time check compiles what the trainer runs."""

    total: int
    tx: object
    abstract: object  # the state's ShapeDtypeStructs
    state_sh: object
    batch_sh: object
    step: object


def mse_parts(cfg: C.RunConfig, sae_cfg, mesh) -> StepParts:
    from jaxsae.sae import init_sae, make_sae
    from jaxsae.sharding import batch_sharding, sae_state_shardings
    from jaxsae.train.mse import init_state, make_mse_step, mse_optimizer

    total = cfg.mse.tokens // cfg.mse.batch_size
    tx, schedule = mse_optimizer(cfg.mse, sae_cfg, total)
    key = jax.random.PRNGKey(cfg.mse.seed)
    abstract = jax.eval_shape(lambda: init_state(init_sae(sae_cfg, key), tx, sae_cfg, cfg.mse.seed))
    state_sh, batch_sh = sae_state_shardings(abstract, sae_cfg, mesh), batch_sharding(mesh)
    step = make_mse_step(make_sae(sae_cfg), sae_cfg, tx, schedule, state_sh, batch_sh)
    return StepParts(total, tx, abstract, state_sh, batch_sh, step)


def kl_parts(cfg: C.RunConfig, phase: str, sae_cfg, mesh, lm, lm_sh, fresh, scale: float,
             compose=None) -> StepParts:
    """The fused KL+MSE step of `phase` (finetune | e2e | adapter). fresh(tx) -> the phase's first state."""
    from jaxsae.sae import make_sae
    from jaxsae.sharding import batch_sharding, sae_state_shardings
    from jaxsae.train.finetune import finetune_optimizer, make_finetune_step

    pc = {"finetune": cfg.finetune, "e2e": cfg.e2e, "adapter": cfg.adapter}[phase]
    tokens = C.e2e_tokens(cfg) if phase == "e2e" else pc.tokens
    total = tokens // (pc.batch_sequences * cfg.data.context)
    tx, schedule = finetune_optimizer(pc.lr, total, sae_cfg if compose is None else None,
                                      weight_decay=cfg.finetune.weight_decay, clip=cfg.finetune.clip,
                                      schedule="constant" if phase == "e2e" else "linear")
    controller = cfg.finetune.l1_controller
    controller = (sae_cfg.kind == "relu") if controller is None else controller
    controller = controller and (compose is None or compose.sae_trains)
    abstract = jax.eval_shape(lambda: fresh(tx))
    state_sh, batch_sh = sae_state_shardings(abstract, sae_cfg, mesh), batch_sharding(mesh)
    step = make_finetune_step(lm, cfg.hook.layer, make_sae(sae_cfg), sae_cfg, tx, schedule, scale=scale,
                              include_first=cfg.data.include_first_position, kl_share=cfg.finetune.kl_share,
                              l1_controller=controller, compose=compose, shardings=(state_sh, lm_sh, batch_sh))
    return StepParts(total, tx, abstract, state_sh, batch_sh, step)


def check_checkpoint(ckpt: Checkpointer, ctx: Context, phase: str) -> None:
    """A run directory whose checkpoints hold another SAE (or, for `adapter`, another adapter) than the
    config says fails clearly, not in Orbax."""
    if ckpt.latest_step() is None:
        return
    meta = ckpt.restore_meta()
    # a field the checkpoint predates counts as its default; `decode` only picks how x_hat is computed
    defaults = {f.name: f.default for f in dataclasses.fields(ctx.sae_cfg)}
    wanted = [("sae", "an SAE", {**defaults, **meta.get("sae", {})}, dataclasses.asdict(ctx.sae_cfg),
               [k for k in defaults if k != "decode"])]
    if phase == "adapter":
        wanted.append(("adapter", "an adapter", meta.get("adapter", {}), dataclasses.asdict(ctx.cfg.adapter),
                       ["kind", "rank", "lm_layers", "loss"]))
    for section, noun, saved, want, keys in wanted:
        k = next((k for k in keys if saved.get(k) != want[k]), None)
        if k is not None:
            raise C.ConfigError(
                f"{ckpt.directory} holds a {phase} checkpoint of {noun} with {k}={saved.get(k)!r}, but the config "
                f"says {section}.{k}={want[k]!r}: use a new --run-dir, or set {section}.{k} back to resume")


def collect_store(ctx: Context) -> None:
    from jaxsae.data.collect import collect
    from jaxsae.data.text import make_source

    cfg = ctx.cfg
    t0 = time.time()
    info = collect(ctx.lm, cfg.hook.layer, make_source(cfg.data.source), ctx.lm.tokenizer, ctx.store_path,
                   n_tokens=cfg.store.tokens, context=cfg.data.context, batch_contexts=cfg.store.batch_contexts,
                   dtype=cfg.store.dtype, bos_id="auto" if cfg.data.prepend_bos else None,
                   drop_first=not cfg.data.include_first_position, norm_sample_tokens=cfg.store.norm_sample_tokens,
                   mesh=ctx.mesh)
    ctx.store = info.open()
    ctx.log.write({"phase": "collect", "step": 0, "tokens": ctx.store.n_tokens,
                   "seconds": round(time.time() - t0, 1), "scale": ctx.store.scale})


def mse_phase(ctx: Context) -> dict:
    """Trains the SAE on shuffled store rows; resumes from the phase's last checkpoint."""
    from jaxsae.data.reader import ShuffledReader
    from jaxsae.sae import init_sae
    from jaxsae.sharding import abstract_with, global_batch, shard
    from jaxsae.train.mse import init_state

    cfg, sae_cfg = ctx.cfg, ctx.sae_cfg
    parts = mse_parts(cfg, sae_cfg, ctx.mesh)
    total = parts.total
    ckpt = ctx.checkpointer("mse")
    check_checkpoint(ckpt, ctx, "mse")
    start = ckpt.latest_step() or 0
    if start:
        # restores onto this run's mesh, whatever mesh wrote the checkpoint
        state, _ = ckpt.restore(abstract_with(parts.abstract, parts.state_sh), start)
        ctx.log.rewind("mse", start)
    else:
        # b_dec starts at the geometric median of a first sample of (normalised) activations
        sample = ctx.store.read(0, min(ctx.store.n_tokens, 4096), normalize=True)
        params = init_sae(sae_cfg, jax.random.PRNGKey(cfg.mse.seed), sample)
        state = shard(init_state(params, parts.tx, sae_cfg, cfg.mse.seed), parts.state_sh)
    meta = {"phase": "mse", "sae": dataclasses.asdict(sae_cfg), "scale": ctx.store.scale,
            "hook_layer": cfg.hook.layer, "model": ctx.model_path, "total_steps": total}
    if start >= total:
        ckpt.close()
        return state
    step_fn, batch_sh = parts.step, parts.batch_sh
    # each process reads its own slice of the store (interleaved blocks) and feeds batch/P rows
    reader = ShuffledReader(ctx.store, cfg.mse.batch_size // jax.process_count(), seed=cfg.mse.seed,
                            start_step=start, process_index=jax.process_index(),
                            process_count=jax.process_count())
    loop = PhaseLoop("mse", total, cfg.mse.batch_size, ctx.log, ckpt, cfg.checkpoint.every_steps, start)
    try:
        for step in range(start + 1, total + 1):
            state, metrics = step_fn(state, global_batch(next(reader), batch_sh))
            loop.after_step(step, metrics, state, {**meta, "reader": {"seed": cfg.mse.seed, "step": step}})
        loop.finish()
    finally:
        reader.close()
        ckpt.close()
    return state


def evaluate_phase(ctx: Context, phase: str, params, seconds: float, tokens: int, trainable=None) -> dict:
    """trainable: the adapter's params (phase `adapter`): the spliced model is evaluated with it."""
    from jaxsae.evaluate import evaluate
    from jaxsae.sae import make_sae

    cfg = ctx.cfg
    seqs = eval_sequences(cfg, ctx.lm.tokenizer)
    m = evaluate(ctx.lm, make_sae(ctx.sae_cfg), params, seqs, cfg.hook.layer, ctx.store.scale,
                 include_first=cfg.data.include_first_position, batch=cfg.eval.batch_sequences,
                 compose=None if trainable is None else adapter_of(ctx), trainable=trainable, mesh=ctx.mesh)
    m.update(phase_tokens=tokens, phase_seconds=round(seconds, 1))
    write_eval(ctx.run_dir, phase, m)
    sync_remote(ctx)
    if jax.process_index() == 0:
        print(f"[{phase}] CE clean {m['ce_clean']:.4f}  spliced {m['ce_spliced']:.4f}  zero {m['ce_zero']:.4f}  "
              f"gap {m['ce_gap']:.4f}  recovered {m['loss_recovered']:.3f}  KL {m['kl']:.4f}  FVE {m['fve']:.3f}  "
              f"L0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}", flush=True)
    return m


def window_sequences(ctx: Context, n_seqs: int, skip: int, seed: int, what: str) -> np.ndarray:
    """int32[n_seqs, context]: contexts of the training source after the first `skip`, shuffled at the
    sequence level with `seed` (the whole window is materialised, so batch s is a pure function of s)."""
    seqs = take_contexts(ctx.cfg, ctx.cfg.data.source, ctx.lm.tokenizer, n_seqs, skip,
                         f"data.source after the {skip} contexts the store used", what)
    return seqs[np.random.default_rng(seed).permutation(len(seqs))]


def adapter_of(ctx: Context):
    from jaxsae.train.adapters import make_adapter

    a = ctx.cfg.adapter
    return make_adapter(a.kind, a.rank, ctx.lm.d_model, ctx.cfg.hook.layer, ctx.lm.n_layers, a.lm_layers, a.loss)


def kl_phase(ctx: Context, phase: str, start_params=None, start_dead=None, l0_target: float = 0.0) -> dict:
    """The KL+MSE step over token sequences: `finetune` continues the MSE SAE over a short window with
    lr decaying to 0; `e2e` trains a fresh SAE for the whole budget at constant lr (the baseline);
    `adapter` trains an adapter around the frozen start SAE over the fine-tune's window (its state's
    `params` are the adapter's, `frozen` the SAE)."""
    from jaxsae.sae import init_sae
    from jaxsae.sharding import abstract_with, batch_from_global, shard
    from jaxsae.train.finetune import init_ft_state

    cfg, sae_cfg = ctx.cfg, ctx.sae_cfg
    pc = {"finetune": cfg.finetune, "e2e": cfg.e2e, "adapter": cfg.adapter}[phase]
    compose = adapter_of(ctx) if phase == "adapter" else None
    key = jax.random.PRNGKey(pc.seed)
    if phase == "e2e":
        # the paper's fresh init: unit-norm decoder, encoder = decoder^T, b_dec = 0
        start_params, start_dead = init_sae(sae_cfg, key), np.zeros(sae_cfg.d_sae, np.int32)

    def fresh(tx):
        if compose is not None:
            trainable, _ = compose.init(key, start_params, ctx.lm.params, ctx.lm.param_axes())
            return init_ft_state(trainable, tx, sae_cfg, start_dead, sae_cfg.l1_coeff, l0_target, pc.seed,
                                 frozen=start_params)
        return init_ft_state(start_params, tx, sae_cfg, start_dead, sae_cfg.l1_coeff, l0_target, pc.seed)

    parts = kl_parts(cfg, phase, sae_cfg, ctx.mesh, ctx.lm, ctx.lm_shardings(), fresh, ctx.store.scale, compose)
    total, per_step = parts.total, pc.batch_sequences * cfg.data.context
    skip = 0 if phase == "e2e" else ctx.store.meta["contexts_consumed"]
    seqs = window_sequences(ctx, total * pc.batch_sequences, skip, pc.seed, f"{phase}.tokens")
    ckpt = ctx.checkpointer(phase)
    check_checkpoint(ckpt, ctx, phase)
    start = ckpt.latest_step() or 0
    if start:
        state, _ = ckpt.restore(abstract_with(parts.abstract, parts.state_sh), start)
        ctx.log.rewind(phase, start)
    else:
        state = shard(fresh(parts.tx), parts.state_sh)
    meta = {"phase": phase, "sae": dataclasses.asdict(sae_cfg), "scale": ctx.store.scale,
            "hook_layer": cfg.hook.layer, "model": ctx.model_path, "total_steps": total}
    if compose is not None:
        meta["adapter"] = dataclasses.asdict(cfg.adapter)
    if start >= total:
        ckpt.close()
        return state
    step_fn, batch_sh = parts.step, parts.batch_sh
    loop = PhaseLoop(phase, total, per_step, ctx.log, ckpt, cfg.checkpoint.every_steps, start)
    try:
        for step in range(start + 1, total + 1):
            batch = seqs[(step - 1) * pc.batch_sequences:step * pc.batch_sequences]
            state, metrics = step_fn(state, ctx.lm.params, batch_from_global(batch, batch_sh))
            loop.after_step(step, metrics, state, meta)
        loop.finish()
    finally:
        ckpt.close()
    return state


def run(cfg: C.RunConfig, run_dir) -> dict:
    """Runs every phase of `cfg` in `run_dir` (a local path, or a URL shared by all hosts)."""
    from jaxsae.models import load_lm

    ctx = prepare(cfg, run_dir)
    ctx.lm = load_lm(ctx.model_path, cfg.model.dtype, shardings=ctx.lm_shardings())
    collect_store(ctx)
    results, start = {}, None
    if "mse" in cfg.phases:
        t0 = time.time()
        state = mse_phase(ctx)
        results["mse"] = evaluate_phase(ctx, "mse", state["params"], time.time() - t0, cfg.mse.tokens)
        start = (state["params"], state["dead"], results["mse"]["l0"])
    elif ctx.init is not None:
        # finetune.init_from: the saved SAE, re-expressed for this store's scale, is the starting point
        from jaxsae.interop import to_scale

        params = to_scale(ctx.init, ctx.store.scale)
        results["init"] = evaluate_phase(ctx, "init", params, 0.0, 0)
        start = (params, np.zeros(ctx.sae_cfg.d_sae, np.int32), results["init"]["l0"])
    ft = None
    if "finetune" in cfg.phases:
        t0 = time.time()
        ft = kl_phase(ctx, "finetune", start[0], start[1], l0_target=start[2])
        results["finetune"] = evaluate_phase(ctx, "finetune", ft["params"], time.time() - t0, cfg.finetune.tokens)
    if "adapter" in cfg.phases:  # around the fine-tuned SAE when there is one, else the MSE SAE
        base = ft if ft is not None else state
        t0 = time.time()
        ad = kl_phase(ctx, "adapter", base["params"], base["dead"], l0_target=results["mse"]["l0"])
        results["adapter"] = evaluate_phase(ctx, "adapter", ad["frozen"], time.time() - t0,
                                            cfg.adapter.tokens, trainable=ad["params"])
    if "e2e" in cfg.phases:
        t0 = time.time()
        e2e = kl_phase(ctx, "e2e")
        results["e2e"] = evaluate_phase(ctx, "e2e", e2e["params"], time.time() - t0, C.e2e_tokens(cfg))
    from jaxsae.distributed import is_main
    from jaxsae.report import write_report

    if is_main():
        write_report(ctx.run_dir)
    sync_remote(ctx)
    return results
