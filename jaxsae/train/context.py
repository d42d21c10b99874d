"""What a run's phases share: checked once before any compute (`Plan`), then loaded (`Context`).

Every check that can fail on user input (config keys and values, the hook layer against the model,
an existing store built from another model or layer, a checkpoint to start from) runs in `plan` before a
single weight is loaded or a file of the run directory is written.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax

from jaxsae import config as C
from jaxsae import phases as P
from jaxsae.checkpoint import Checkpointer
from jaxsae.sae import SAEConfig
from jaxsae.splice import Splice
from jaxsae.train.loop import MetricsLog

SYNCED = ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "report.png")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run after its checks: nothing loaded, nothing written."""

    cfg: C.RunConfig
    run_dir: Path  # local: config.yaml, metrics.jsonl, eval.json, report.*
    remote: str | None  # a gs://... run directory: checkpoints and store live there, files are copied up
    model_path: str
    store_path: str
    sae_cfg: SAEConfig
    mcfg: Any  # the LM's config (read from config.json; no weights yet)
    mesh: jax.sharding.Mesh  # over all devices of all processes
    init: Any = None  # the LoadedSAE of finetune.init_from, if set

    def checkpoint_root(self) -> str:
        return self.cfg.checkpoint.dir.rstrip("/") or f"{self.remote or self.run_dir}/checkpoints"

    def checkpointer(self, phase: str) -> Checkpointer:
        return Checkpointer(f"{self.checkpoint_root()}/{phase}", keep=self.cfg.checkpoint.keep)

    def lm_shardings(self):
        from jaxsae.sharding import lm_param_shardings

        return lm_param_shardings(self.mcfg, self.mesh, self.cfg.model.lm_sharding)


@dataclasses.dataclass(frozen=True)
class Context:
    """A run once its model is loaded and its store collected: what every phase runner receives."""

    plan: Plan
    lm: Any  # jaxsae.models.LM
    store: Any  # jaxsae.data.store.ActivationStore, or in stream mode jaxsae.data.stream.StreamStore
    log: MetricsLog

    @property
    def cfg(self) -> C.RunConfig:
        return self.plan.cfg

    @property
    def sae_cfg(self) -> SAEConfig:
        return self.plan.sae_cfg

    @property
    def mesh(self):
        return self.plan.mesh

    @property
    def splice(self) -> Splice:
        return splice_for(self.cfg, self.lm, float(self.store.scale))

    def trajectory(self, phase: str) -> dict:
        """What `phase`'s checkpoints record and a resume must match (see `trajectory`)."""
        return trajectory(self.plan, phase, self.store.meta)

    @property
    def members(self) -> tuple:
        """The sweep's members (`jaxsae.sweep.Member`); () for a run of one SAE."""
        from jaxsae.sweep import members

        return members(self.cfg)

    @property
    def member_names(self) -> list[str] | None:
        return [m.name for m in self.members] or None

    def sweep_meta(self) -> dict:
        """What a sweep's checkpoints record so that `load_sae(run, name)` can take one SAE out:
        {"sweep": [{"name", "sae": its own SAE config}, ...]} ({} without a sweep)."""
        from jaxsae.sweep import member_sae

        if not self.members:
            return {}
        return {"sweep": [{"name": m.name, "sae": dataclasses.asdict(member_sae(self.sae_cfg, m)),
                           "values": {k: v for k, v in m.values}} for m in self.members]}


def special_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's BOS, EOS and PAD ids (those it has)."""
    ids = {getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")}
    return tuple(sorted(i for i in ids if i is not None))


def splice_for(cfg: C.RunConfig, lm, scale: float, layer: int | None = None) -> Splice:
    """The run's splice: its hook, scale and position convention (data.include_first_position,
    data.exclude_special_tokens)."""
    exclude = special_ids(lm.tokenizer) if cfg.data.exclude_special_tokens else ()
    return Splice(lm, cfg.hook.layer if layer is None else layer, scale, cfg.data.include_first_position, exclude)


def positions_convention(cfg: C.RunConfig) -> str:
    """How a run counts positions, in words (the report states it)."""
    first = "every position (position 0 included, as the reference)" if cfg.data.include_first_position \
        else "every position but position 0"
    return first + ("; BOS/EOS/PAD tokens excluded (SAEBench)" if cfg.data.exclude_special_tokens else "")


def planned_starts(cfg: C.RunConfig) -> dict[str, str | None]:
    """Phase name -> the phase (or "init") whose SAE it continues, for the phases `cfg` lists."""
    ran, out = ({"init"} if cfg.finetune.init_from else set()), {}
    for p in P.ordered(cfg.phases):
        out[p.name] = P.start_of(p, ran) if p.starts else None
        if p.holds == "sae":
            ran.add(p.name)
    return out


def trajectory(plan: Plan, phase: str, store_meta: dict | None) -> dict:
    """The settings that shape `phase`'s trajectory: its section (with the registry's fixed KL share), the
    SAE, hook, training data, model, the store's rows and scale, and the phase it continues. Recorded in
    every checkpoint; a resume that differs is refused (`jaxsae.train.loop.check_resume`)."""
    cfg, p = plan.cfg, P.get(phase)
    sec = dataclasses.asdict(C.section(cfg, phase))
    if p.kl_share is not None:
        sec["kl_share"] = p.kl_share
    data = dataclasses.asdict(cfg.data)
    data.pop("eval_source")
    sae = dataclasses.asdict(plan.sae_cfg)
    sae.pop("decode")  # only how x_hat is computed, not what
    out = {p.section: sec, "sae": sae, "hook": {"layer": cfg.hook.layer}, "data": data,
           "model": {"path": plan.model_path, "dtype": cfg.model.dtype}, "start": planned_starts(cfg)[phase]}
    if cfg.sweep:
        from jaxsae.sweep import members

        out["sweep"] = [m.name for m in members(cfg)]
    if store_meta is not None and store_meta.get("mode") == "stream":
        out["store"] = {"mode": "stream", "buffer_rows": cfg.store.buffer_rows, "scale": float(store_meta["scale"])}
    elif store_meta is not None and store_meta.get("complete"):
        out["store"] = {"tokens": int(store_meta["tokens_written"]), "scale": float(store_meta["scale"])}
    return out


def check_resumes(plan: Plan, store_meta: dict | None) -> None:
    """Every listed phase with checkpoints must have been trained as this config says, checked before
    anything in the run directory changes. A directory that does not exist is not created."""
    from jaxsae.train.loop import check_resume

    for phase in plan.cfg.phases:
        d = plan.checkpoint_root() + f"/{phase}"
        if "://" not in d and not Path(d).is_dir():
            continue
        ckpt = plan.checkpointer(phase)
        try:
            check_resume(ckpt, phase, trajectory(plan, phase, store_meta))
        finally:
            ckpt.close()


def split_run_dir(cfg: C.RunConfig, run_dir) -> tuple[Path, str | None]:
    """(local dir, remote URL or None). A URL run dir (gs://bucket/run: shared by every host of a pod)
    holds the checkpoints and the store; the small files are written under runs/<name> and copied up."""
    text = str(run_dir)
    if "://" in text:
        return Path("runs") / cfg.name, text.rstrip("/")
    return Path(run_dir), None


def sync_remote(plan: Plan, down: bool = False) -> None:
    """Copies the run's small files up to the remote run dir (or, on resume, down when missing here)."""
    if plan.remote is None:
        return
    from etils import epath

    from jaxsae.distributed import is_main

    for name in SYNCED:
        local, remote = plan.run_dir / name, epath.Path(plan.remote) / name
        if down and not local.exists() and remote.exists():
            local.write_bytes(remote.read_bytes())
        elif not down and is_main() and local.exists():
            remote.write_bytes(local.read_bytes())


def mesh_for(cfg: C.RunConfig, devices: list, n_processes: int):
    """The run's mesh over `devices` (this machine's, or a described TPU topology's), after the checks."""
    from jaxsae.sharding import make_mesh
    from jaxsae.validate import check_mesh

    data, model = check_mesh(cfg, len(devices), n_processes)
    return make_mesh(data, model, list(devices)[:data * model])


def check_store(cfg: C.RunConfig, store_path: str, d_model: int, meta: dict | None) -> dict | None:
    """`meta` of an existing store (None: none yet); a store of another model, layer or dtype fails clearly.
    cfg's dtypes are resolved (`C.resolve_dtypes`), so `auto` has already taken the store's."""
    if meta is None:
        return None
    d, layer = meta.get("model", {}).get("d_model"), meta.get("layer")
    if d != d_model:
        raise C.ConfigError(f"store.path={store_path} holds d_model={d} activations but the model has "
                            f"d_model={d_model}: point store.path at a store of this model or a new path")
    if layer != cfg.hook.layer:
        raise C.ConfigError(f"store.path={store_path} was collected at layer {layer}, not hook.layer="
                            f"{cfg.hook.layer}: set hook.layer={layer} or use a new store.path")
    mode = meta.get("mode", "disk")
    if mode != cfg.store.mode:
        raise C.ConfigError(f"store.path={store_path} holds a {mode}-mode store, but store.mode={cfg.store.mode}: "
                            f"set store.mode={mode} or use a new store.path")
    if meta.get("dtype") != cfg.store.dtype:
        raise C.ConfigError(f"store.path={store_path} holds {meta.get('dtype')} activations, not store.dtype="
                            f"{cfg.store.dtype}: set store.dtype={meta.get('dtype')} (or auto) or use a new store.path")
    lm_had = meta.get("model", {}).get("config", {}).get("dtype")
    if lm_had is not None and lm_had != cfg.model.dtype:
        raise C.ConfigError(f"store.path={store_path} was collected with the LM in {lm_had}, not model.dtype="
                            f"{cfg.model.dtype}: set model.dtype={lm_had} (or auto) or use a new store.path")
    return meta


def plan(cfg: C.RunConfig, run_dir) -> Plan:
    """All checks that need no compute: the model's config.json, the mesh, the store's metadata, the SAE
    to start from. Writes nothing. The plan's config has its `auto` dtypes resolved (`C.resolve_dtypes`)."""
    from jaxsae.data.store import read_meta
    from jaxsae.distributed import is_main
    from jaxsae.models import read_config
    from jaxsae.models.hf import resolve
    from jaxsae.models.shipped import resolve_model_path
    from jaxsae.train import preflight
    from jaxsae.validate import check_against_model, sae_config

    run_dir, remote = split_run_dir(cfg, run_dir)
    preflight.check_run_dir(run_dir)
    preflight.check_sources(cfg)
    preflight.check_tracker(cfg)
    model_path = resolve_model_path(cfg.model.path)
    store_path = cfg.store.path or f"{remote or run_dir}/store"
    store_meta = None
    if cfg.store.path or remote or (run_dir / "store").exists():
        store_meta = read_meta(store_path)
    # `auto` dtypes are decided here, once, so that the LM, the store, the checkpoints' trajectory and the
    # config.yaml written to the run directory all see the same concrete dtype
    cfg = C.resolve_dtypes(cfg, jax.devices()[0].platform, store_meta)
    mcfg = read_config(resolve(model_path), cfg.model.dtype)
    check_against_model(cfg, mcfg.n_layers, mcfg.d_model)
    preflight.check_model_files(resolve(model_path), mcfg)
    mesh = mesh_for(cfg, jax.devices(), jax.process_count())
    model = mesh.shape["model"]
    kl_phases = [p for p in cfg.phases if p != "mse"]
    if model > 1 and cfg.model.lm_sharding == "replicated" and kl_phases and is_main():
        print(f"warning: mesh.model={model} with a replicated LM repeats the LM's forward passes on each of the "
              f"{model} devices of a model row; model.lm_sharding=tensor splits that work", file=sys.stderr)
    store_meta = check_store(cfg, store_path, mcfg.d_model, store_meta)
    if store_meta is not None and store_meta.get("complete") and cfg.store.mode == "disk":
        preflight.check_existing_store(store_path)
    sae_cfg, init = sae_config(cfg, mcfg.d_model), None
    if cfg.finetune.init_from:
        from jaxsae.interop import load_init

        try:
            init = load_init(cfg.finetune.init_from, cfg.finetune.init_format, sae_cfg, cfg.hook.layer)
        except (ValueError, FileNotFoundError) as e:
            raise C.ConfigError(str(e)) from e
        preflight.check_init(init)
        sae_cfg = init.cfg
    if cfg.sweep:  # one program for all members, built at the largest k (`jaxsae.sweep`)
        from jaxsae.sweep import group_sae, members

        sae_cfg = group_sae(sae_cfg, members(cfg))
    p = Plan(cfg, run_dir, remote, model_path, store_path, sae_cfg, mcfg, mesh, init)
    check_resumes(p, store_meta)
    return p
