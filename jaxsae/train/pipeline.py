"""A whole run: plan (every check), load the LM, collect the store, then each listed phase in the
registry's order (`jaxsae.phases`), evaluating after each; the report at the end."""

from __future__ import annotations

import contextlib
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsae import config as C
from jaxsae import phases as P
from jaxsae.train.context import Context, Plan, plan, positions_convention, sync_remote
from jaxsae.train.loop import MetricsLog


class Start(NamedTuple):
    """The SAE a phase continues: its params, dead-latent counters, the L0 it had on evaluation."""

    name: str  # the phase it comes from ("init": finetune.init_from)
    params: Any
    dead: Any
    l0: float


class Trained(NamedTuple):
    """What a phase runner returns: its final state, the SAE params to evaluate, and the adapter's
    params when the phase trains one (evaluated together with the SAE)."""

    state: dict
    sae_params: Any
    trainable: Any = None

    def start(self, name: str, l0: float) -> Start:
        return Start(name, self.sae_params, self.state["dead"], l0)


def collect_store(p: Plan, lm, log: MetricsLog):
    """The run's activations: the disk store, collected (or resumed, or reused), or in stream mode the
    stream's record (its scale measured once)."""
    from jaxsae.data.collect import collect
    from jaxsae.data.text import make_source

    cfg = p.cfg
    if cfg.store.mode == "stream":
        from jaxsae.data.stream import open_stream

        return open_stream(cfg, lm, p.store_path, p.mesh, log)
    t0 = time.time()
    info = collect(lm, cfg.hook.layer, make_source(cfg.data.source), lm.tokenizer, p.store_path,
                   n_tokens=cfg.store.tokens, context=cfg.data.context, batch_contexts=cfg.store.batch_contexts,
                   dtype=cfg.store.dtype, bos_id="auto" if cfg.data.prepend_bos else None,
                   drop_first=not cfg.data.include_first_position, norm_sample_tokens=cfg.store.norm_sample_tokens,
                   mesh=p.mesh)
    store = info.open()
    if not log.has("collect"):  # once per run directory, not once per rerun
        log.write({"phase": "collect", "step": 0, "tokens": store.n_tokens, "seconds": round(time.time() - t0, 1),
                   "scale": store.scale})
    return store


def evaluate_phase(ctx: Context, phase: str, trained: Trained, seconds: float, start: str | None) -> dict:
    """Evaluates `phase`'s SAE (with its adapter, if any) on the held-out text; writes eval.json.
    A sweep's SAEs are evaluated together; eval.json then maps `phase` to {member name: metrics}."""
    from jaxsae.data.windows import eval_sequences
    from jaxsae.eval import evaluate, evaluate_sweep
    from jaxsae.train.loop import check_eval, write_eval

    cfg = ctx.cfg
    compose = None if trained.trainable is None else adapter_of(ctx)
    seqs = eval_sequences(cfg, ctx.lm.tokenizer)
    if ctx.members:
        from jaxsae.sweep import hparams

        ks = hparams(cfg, ctx.members, "mse")["k"]
        rows = evaluate_sweep(ctx.splice, ctx.sae_cfg, trained.sae_params, ks, seqs, batch=cfg.eval.batch_sequences,
                              mesh=ctx.mesh)
        named = dict(zip(ctx.member_names, rows))
    else:
        named = {None: evaluate(ctx.splice, ctx.sae_cfg, trained.sae_params, seqs, batch=cfg.eval.batch_sequences,
                                compose=compose, trainable=trained.trainable, mesh=ctx.mesh)}
    tokens = C.phase_tokens(cfg, phase) if phase in P.NAMES else 0
    # the MSE phase repeats the store's rows once its tokens outnumber them; the token windows are new text
    unique = min(tokens, int(ctx.store.n_tokens)) if phase == "mse" else tokens
    for m in named.values():
        m.update(phase_tokens=tokens, phase_unique_tokens=unique, phase_seconds=round(seconds, 1), start=start,
                 positions=positions_convention(cfg))
    out = named[None] if None in named else named
    check_eval(phase, out)  # on every process: a NaN stops them all
    write_eval(ctx.plan.run_dir, phase, out)
    sync_remote(ctx.plan)
    if jax.process_index() == 0:
        for name, m in named.items():
            who = phase if name is None else f"{phase} {name}"
            print(f"[{who}] CE clean {m['ce_clean']:.4f}  spliced {m['ce_spliced']:.4f}  zero {m['ce_zero']:.4f}  "
                  f"gap {m['ce_gap']:.4f}  recovered {m['loss_recovered']:.3f}  KL {m['kl']:.4f}  FVE {m['fve']:.3f}  "
                  f"L0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}", flush=True)
    return out


def l0_of(metrics: dict, names: list[str] | None):
    """The evaluated L0 a continuing phase holds: a float, or one per sweep member."""
    return metrics["l0"] if names is None else np.array([metrics[n]["l0"] for n in names], np.float32)


def adapter_of_cfg(cfg: C.RunConfig, d_model: int, n_layers: int):
    """The `adapter:` section's compose object (`jaxsae.train.adapters`)."""
    from jaxsae.train.adapters import make_adapter

    a = cfg.adapter
    return make_adapter(a.kind, a.rank, d_model, cfg.hook.layer, n_layers, a.lm_layers, a.loss, a.alpha, a.dropout)


def adapter_of(ctx: Context):
    return adapter_of_cfg(ctx.cfg, ctx.lm.d_model, ctx.lm.n_layers)


def init_start(ctx: Context) -> Start:
    """finetune.init_from: the saved SAE, re-expressed for this store's scale, evaluated as `init`."""
    from jaxsae.interop import to_scale

    params = to_scale(ctx.plan.init, ctx.store.scale)
    m = evaluate_phase(ctx, "init", Trained({"dead": np.zeros(ctx.sae_cfg.d_sae, np.int32)}, params), 0.0, None)
    return Start("init", params, np.zeros(ctx.sae_cfg.d_sae, np.int32), m["l0"])


@contextlib.contextmanager
def locked(p: Plan):
    """Holds the run directory's lock (`jaxsae.rundir.RunDirLock`: a second run there gets RunDirBusy
    naming this one) for the whole run. Process 0 takes it; the other processes follow its outcome."""
    from jaxsae.rundir import RunDirBusy, RunDirLock

    where = p.remote or p.run_dir
    lock, err = None, None
    if jax.process_index() == 0:
        try:
            lock = RunDirLock(where).acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the other processes know
            err = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(err is None))) and err is None:
            err = RunDirBusy(f"run directory {where} could not be locked by process 0 (see its error)", None)
    if err is not None:
        raise err
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def run(cfg: C.RunConfig, run_dir) -> dict:
    """Runs every phase of `cfg` in `run_dir` (a local path, or a URL shared by all hosts): every check
    first (`plan`; for a sweep over widths, every width group's too), then, holding the run directory's
    lock, the phases."""
    p = plan(cfg, run_dir)
    groups = width_plans(p, run_dir)
    with locked(p):
        return run_widths(p, groups) if groups else run_planned(p)


def width_plans(p: Plan, run_dir) -> list[Plan]:
    """The plans of a sweep's width groups (`jaxsae.sweep.width_groups`), each a sweep in
    `<run_dir>/widths/d<d_sae>` that reads the run's store; [] for any other run."""
    import dataclasses

    from jaxsae.sweep import width_groups

    out = []
    for w, gcfg in width_groups(p.cfg):
        gcfg = dataclasses.replace(gcfg, store=dataclasses.replace(gcfg.store, path=p.store_path))
        out.append(plan(gcfg, f"{str(run_dir).rstrip('/')}/widths/d{w}"))
    return out


def run_widths(p: Plan, groups: list[Plan]) -> dict:
    """A sweep over widths: the store once (with the run's LM), then each width group's sweep as a run of
    its own (one program per width), one after another; the run's eval.json and report gather them."""
    from jaxsae.distributed import is_main
    from jaxsae.models import load_lm
    from jaxsae.report import write_report
    from jaxsae.rundir import atomic_write_text
    from jaxsae.train.loop import write_eval

    cfg = p.cfg
    p.run_dir.mkdir(parents=True, exist_ok=True)
    sync_remote(p, down=True)
    if is_main():
        atomic_write_text(p.run_dir / "config.yaml", C.dump(cfg))
    log = MetricsLog(p.run_dir / "metrics.jsonl", enabled=is_main(), guard=cfg.guard)
    lm = load_lm(p.model_path, cfg.model.dtype, shardings=p.lm_shardings())
    collect_store(p, lm, log)
    results: dict[str, dict] = {}
    for g in groups:
        for phase, named in run_planned(g, lm).items():
            results.setdefault(phase, {}).update(named)
    for phase, named in results.items():
        write_eval(p.run_dir, phase, named)
    if is_main():
        write_report(p.run_dir)
    sync_remote(p)
    return results


def run_planned(p: Plan, lm=None) -> dict:
    from jaxsae.distributed import is_main
    from jaxsae.models import load_lm
    from jaxsae.report import write_report
    from jaxsae.rundir import atomic_write_text
    from jaxsae.tracking import NullTracker, log_run_end, open_tracker

    cfg = p.cfg
    p.run_dir.mkdir(parents=True, exist_ok=True)
    sync_remote(p, down=True)  # a resumed pod run continues the metrics written before
    if is_main():
        atomic_write_text(p.run_dir / "config.yaml", C.dump(cfg))
    tracker = open_tracker(cfg.tracker, p.run_dir, cfg.name, cfg.to_dict()) if is_main() else NullTracker()
    try:
        log = MetricsLog(p.run_dir / "metrics.jsonl", enabled=is_main(), guard=cfg.guard, tracker=tracker)
        if lm is None:
            lm = load_lm(p.model_path, cfg.model.dtype, shardings=p.lm_shardings())
        ctx = Context(p, lm, collect_store(p, lm, log), log)
        starts: dict[str, Start] = {"init": init_start(ctx)} if p.init is not None else {}
        results = {}
        for phase in P.ordered(cfg.phases):
            start = starts.get(P.start_of(phase, starts)) if phase.starts else None
            t0 = time.time()
            trained = phase.load()(ctx, phase, start)
            results[phase.name] = evaluate_phase(ctx, phase.name, trained, time.time() - t0,
                                                 None if start is None else start.name)
            if phase.holds == "sae":
                starts[phase.name] = trained.start(phase.name, l0_of(results[phase.name], ctx.member_names))
        if is_main():
            write_report(p.run_dir)
            log_run_end(tracker, p.run_dir)  # the eval table and the report figure
        sync_remote(p)
        return results
    finally:
        tracker.close()
