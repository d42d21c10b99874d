"""Run configuration: frozen dataclasses, loaded from YAML with every key checked.

A YAML file in `configs/` says only what differs from the defaults (which are the paper's settings).
`--set a.b=value` overrides any key. Unknown keys, wrong types and impossible values stop the run with
one line naming the key and the fix (`ConfigError`), before any model is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a config; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    path: str = "shipped"  # a local HF directory, a hub id, or "shipped" (the small stdlib Pythia)
    dtype: str = "float32"
    # Where the LM's weights live (jaxsae.sharding.LM_RULES): replicated on every device (fastest for
    # small models), fsdp (split over the mesh's data axis, gathered per use) or tensor (heads, MLP
    # and vocabulary over the model axis). fsdp/tensor let a model fit that a replicated copy would not.
    lm_sharding: str = "replicated"


@dataclasses.dataclass(frozen=True)
class MeshCfg:
    """The device mesh over all devices of all processes (`mesh: auto` = these defaults)."""

    data: int | None = None  # batch split; None = every device the model axis leaves
    model: int = 1  # the SAE's latents (d_sae) split; 1 = no model parallelism


@dataclasses.dataclass(frozen=True)
class HookCfg:
    layer: int = 1  # the residual stream after this block (0-indexed)


@dataclasses.dataclass(frozen=True)
class DataCfg:
    source: dict = dataclasses.field(default_factory=lambda: {"kind": "stdlib", "split": "train"})
    eval_source: dict = dataclasses.field(default_factory=lambda: {"kind": "stdlib", "split": "val"})
    context: int = 128
    prepend_bos: bool = False  # start every context with BOS (Gemma); Pythia packs without one
    # Whether position 0 counts for the MSE, the KL and evaluation (same everywhere). Position 0 of
    # a packed context attends only to itself and has an outsized norm, so it is excluded by default.
    include_first_position: bool = False


@dataclasses.dataclass(frozen=True)
class StoreCfg:
    path: str = ""  # tensorstore kvstore path or URL; "" -> <run_dir>/store
    dtype: str = "float32"
    tokens: int = 500_000_000  # rows collected; the MSE phase reads them once (1 epoch) by default
    batch_contexts: int = 32
    norm_sample_tokens: int = 65_536


def _sae_section():
    """The `sae:` section: jaxsae.sae.SAEConfig's fields (one source of truth for names, types and
    defaults) minus d_model, which comes from the model; kind and d_sae get run defaults."""
    from jaxsae.sae.config import SAEConfig

    defaults = {"kind": "topk", "d_sae": 4096}
    fields = []
    for f in dataclasses.fields(SAEConfig):
        if f.name == "d_model":
            continue
        fields.append((f.name, f.type, dataclasses.field(default=defaults.get(f.name, f.default))))
    cls = dataclasses.make_dataclass("SAECfg", fields, frozen=True)
    cls.__module__ = __name__  # so get_type_hints resolves the string annotations here
    return cls


SAECfg = _sae_section()


@dataclasses.dataclass(frozen=True)
class MSECfg:
    tokens: int = 500_000_000  # activation rows the MSE phase trains on (paper: ~500M)
    batch_size: int = 2048  # tokens per step
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.999
    warmup_steps: int = 1000
    decay_fraction: float = 0.2  # linear decay to 0 over the last 20% of steps (paper)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FinetuneCfg:
    """The KL+MSE fine-tune window (paper: the last ~25M tokens, lr 5e-5 -> 0, AdamW wd 0.01, clip 1)."""

    tokens: int = 25_000_000
    batch_sequences: int = 8  # paper: 8 sequences of 1024 for Pythia, 2 for Gemma
    lr: float = 5e-5
    weight_decay: float = 0.01
    clip: float = 1.0
    kl_share: float = 0.5  # loss = (1 - s) MSE + s beta KL; s = 1/2 is the paper's
    l1_controller: bool | None = None  # hold L0 by nudging the L1 coefficient; None = on for ReLU SAEs
    seed: int = 0
    # Start from a saved SAE instead of the mse phase (phases: [finetune]): a jaxsae run or checkpoint
    # directory, a SAELens directory or a dictionary_learning ae.pt; its kind, d_sae and k replace sae.*'s.
    init_from: str = ""
    init_format: str = ""  # jaxsae | saelens | dictionary_learning; "" = detected from the files


@dataclasses.dataclass(frozen=True)
class E2ECfg:
    """The full end-to-end baseline: the fine-tune's step from a fresh SAE for the whole budget."""

    tokens: int = 0  # 0 = mse.tokens + finetune.tokens, so the comparison is at equal tokens
    batch_sequences: int = 8
    lr: float = 5e-5  # constant, as in the paper's baseline
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class AdapterCfg:
    """An adapter trained around the frozen SAE (paper, "Adapters"; jaxsae.train.adapters). After mse
    alone it wraps the MSE SAE; listed after finetune it wraps the fine-tuned one. Same window as the fine-tune."""

    kind: str = "output"  # lm_lora | sae_lora | output | output_mlp
    rank: int | None = 16  # 0 or null = full rank (d_model); LoRA alpha = rank
    lm_layers: str = "all"  # lm_lora: all blocks, or only those after the hook
    loss: str = "auto"  # kl | kl_mse (the fine-tune's balance) | auto: kl for lm_lora, else kl_mse
    tokens: int = 25_000_000
    batch_sequences: int = 8
    lr: float = 5e-5
    seed: int = 0


PHASES = ("mse", "finetune", "e2e", "adapter")


@dataclasses.dataclass(frozen=True)
class CheckpointCfg:
    every_steps: int = 500
    keep: int = 2
    dir: str = ""  # "" -> <run_dir>/checkpoints; a gs:// URL on a multi-host pod (every process writes)


@dataclasses.dataclass(frozen=True)
class EvalCfg:
    sequences: int = 64
    batch_sequences: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    phases: tuple = ("mse", "finetune")  # of mse, finetune (after mse, or finetune.init_from), e2e, adapter (after mse)
    model: ModelCfg = ModelCfg()
    mesh: MeshCfg = MeshCfg()
    hook: HookCfg = HookCfg()
    data: DataCfg = DataCfg()
    store: StoreCfg = StoreCfg()
    sae: SAECfg = SAECfg()
    mse: MSECfg = MSECfg()
    finetune: FinetuneCfg = FinetuneCfg()
    e2e: E2ECfg = E2ECfg()
    adapter: AdapterCfg = AdapterCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    eval: EvalCfg = EvalCfg()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------- building

def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(key: str, value: Any, typ) -> Any:
    """Checks `value` against the annotation `typ`; YAML's "1e-3" (a string to PyYAML) becomes a float."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if typ is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{key}={value!r} must be a list")
    if typ is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}={value!r} must be a mapping")
    if _is_dataclass_type(typ):
        return build(typ, value, key)
    raise AssertionError(f"unhandled config type {typ} for {key}")


def build(cls, data: dict | None, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}: valid keys here are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """YAML file (or `base` dict) + `key.path=value` overrides -> a checked RunConfig."""
    tree: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; see configs/ for examples")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        tree = loaded
    if tree.get("mesh") == "auto":
        tree["mesh"] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    cfg = build(RunConfig, tree)
    check_static(cfg)
    return cfg


def check_static(cfg: RunConfig) -> None:
    """Checks that need no model or store (the rest is in `check_against_model`)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(cfg.model.dtype in ("float32", "bfloat16", "float16"), f"model.dtype={cfg.model.dtype!r}: use float32 or bfloat16")
    need(cfg.store.dtype in ("float32", "bfloat16"), f"store.dtype={cfg.store.dtype!r}: use float32 or bfloat16")
    for key in ("data.context", "store.tokens", "store.batch_contexts", "mse.batch_size", "mse.tokens",
                "checkpoint.every_steps", "eval.sequences", "eval.batch_sequences"):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        need(v > 0, f"{key}={v} must be positive")
    need(cfg.data.context >= 2, f"data.context={cfg.data.context} must be at least 2")
    need(cfg.mse.tokens <= cfg.store.tokens * 1000, "mse.tokens is over 1000 epochs of the store: raise store.tokens")
    need(0.0 <= cfg.mse.decay_fraction <= 1.0, f"mse.decay_fraction={cfg.mse.decay_fraction} must be in [0, 1]")
    total = cfg.mse.tokens // cfg.mse.batch_size
    need(total >= 1, f"mse.tokens={cfg.mse.tokens} is less than one batch of mse.batch_size={cfg.mse.batch_size}")
    decay_start = int(total * (1.0 - cfg.mse.decay_fraction))
    need(cfg.mse.warmup_steps <= decay_start,
         f"mse.warmup_steps={cfg.mse.warmup_steps} runs past the decay start (step {decay_start} of {total}): "
         f"lower mse.warmup_steps or raise mse.tokens")
    bad = [p for p in cfg.phases if p not in PHASES]
    need(not bad, f"phases: {bad[0] if bad else ''!r} is not a phase; choose from {', '.join(PHASES)}")
    need(bool(cfg.phases), "phases is empty: list at least one of mse, finetune, e2e")
    init = cfg.finetune.init_from
    need("finetune" not in cfg.phases or "mse" in cfg.phases or bool(init),
         "phases: finetune continues from the mse phase; list mse before it, or set finetune.init_from to a saved SAE")
    need(not (init and "mse" in cfg.phases),
         "finetune.init_from replaces the mse phase: set phases: [finetune] (or drop finetune.init_from)")
    need(cfg.finetune.init_format in ("", "jaxsae", "saelens", "dictionary_learning"),
         f"finetune.init_format={cfg.finetune.init_format!r}: choose jaxsae, saelens, dictionary_learning or ''")
    need(not init or Path(init).exists(), f"finetune.init_from={init} does not exist: point it at an SAE directory")
    need("adapter" not in cfg.phases or "mse" in cfg.phases,
         "phases: adapter wraps the SAE of the mse (or finetune) phase; list mse before it")
    check_adapter(cfg)
    for sec in ("finetune", "e2e"):
        c = getattr(cfg, sec)
        need(c.batch_sequences > 0, f"{sec}.batch_sequences={c.batch_sequences} must be positive")
        need(c.lr > 0, f"{sec}.lr={c.lr} must be positive")
        need(c.tokens >= 0, f"{sec}.tokens={c.tokens} must be >= 0")
    need(0.0 <= cfg.finetune.kl_share <= 1.0, f"finetune.kl_share={cfg.finetune.kl_share} must be in [0, 1]")
    if "finetune" in cfg.phases:
        per = cfg.finetune.batch_sequences * cfg.data.context
        need(cfg.finetune.tokens >= per, f"finetune.tokens={cfg.finetune.tokens} is less than one batch "
             f"({cfg.finetune.batch_sequences} x {cfg.data.context} tokens): raise it or drop the finetune phase")
    need(cfg.mse.lr > 0, f"mse.lr={cfg.mse.lr} must be positive")
    from jaxsae.sharding import LM_SHARDINGS

    need(cfg.model.lm_sharding in LM_SHARDINGS,
         f"model.lm_sharding={cfg.model.lm_sharding!r}: choose one of {', '.join(LM_SHARDINGS)}")
    need(cfg.mesh.model >= 1, f"mesh.model={cfg.mesh.model} must be >= 1")
    need(cfg.mesh.data is None or cfg.mesh.data >= 1, f"mesh.data={cfg.mesh.data} must be >= 1 (or null: all)")
    sae_config(cfg, d_model=1)  # kind, k <= d_sae, penalties (d_model is checked once the model is known)


def check_adapter(cfg: RunConfig, d_model: int | None = None) -> None:
    from jaxsae.train.adapters import KINDS, LM_LAYERS, LOSSES

    a = cfg.adapter
    if a.kind not in KINDS:
        raise ConfigError(f"adapter.kind={a.kind!r} is not an adapter; choose from {', '.join(KINDS)}")
    if a.lm_layers not in LM_LAYERS:
        raise ConfigError(f"adapter.lm_layers={a.lm_layers!r}: use all or after")
    if a.loss not in LOSSES:
        raise ConfigError(f"adapter.loss={a.loss!r}: use {', '.join(LOSSES)}")
    if a.rank is not None and a.rank < 0:
        raise ConfigError(f"adapter.rank={a.rank} must be >= 0 (0 or null = full rank)")
    if d_model is not None and (a.rank or 0) > d_model:
        raise ConfigError(f"adapter.rank={a.rank} is over d_model={d_model}: use at most {d_model} (or 0 = full rank)")
    if "adapter" in cfg.phases:
        if a.batch_sequences <= 0 or a.lr <= 0:
            raise ConfigError(f"adapter.batch_sequences={a.batch_sequences} and adapter.lr={a.lr} must be positive")
        per = a.batch_sequences * cfg.data.context
        if a.tokens < per:
            raise ConfigError(f"adapter.tokens={a.tokens} is less than one batch ({a.batch_sequences} x "
                              f"{cfg.data.context} tokens): raise it or drop the adapter phase")


def sae_config(cfg: RunConfig, d_model: int):
    """The SAE's own config (jaxsae.sae.SAEConfig) with d_model filled in from the model."""
    from jaxsae.sae import SAEConfig

    try:
        return SAEConfig(d_model=d_model, **dataclasses.asdict(cfg.sae)).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_against_model(cfg: RunConfig, n_layers: int, d_model: int) -> None:
    if not 0 <= cfg.hook.layer < n_layers:
        raise ConfigError(f"hook.layer={cfg.hook.layer} is out of range for a {n_layers}-layer model: "
                          f"choose 0..{n_layers - 1}")
    if "adapter" in cfg.phases and cfg.adapter.kind == "lm_lora" and cfg.adapter.lm_layers == "after" \
            and cfg.hook.layer == n_layers - 1:
        raise ConfigError("adapter.lm_layers=after adapts nothing with the hook after the last block: use all")
    check_adapter(cfg, d_model)
    sae_config(cfg, d_model)


def check_mesh(cfg: RunConfig, n_devices: int, n_processes: int = 1) -> tuple[int, int]:
    """(data, model) sizes of the mesh for `n_devices`, after checking that every batch splits evenly
    over the data axis (and over processes) and the latents over the model axis."""
    m = cfg.mesh.model
    if n_devices % m:
        raise ConfigError(f"mesh.model={m} does not divide the {n_devices} devices: choose a divisor of {n_devices}")
    data = cfg.mesh.data if cfg.mesh.data is not None else n_devices // m
    # a smaller explicit mesh uses the first data*model devices (one process only: a pod's mesh must
    # span every process)
    if data * m > n_devices or (data * m < n_devices and n_processes > 1):
        raise ConfigError(f"mesh.data={data} x mesh.model={m} = {data * m} devices, but there are {n_devices}: "
                          f"set mesh.data=null to use every device, or make the product {n_devices}")
    if data % n_processes:
        # each process feeds its own rows of every batch, so no two processes may share a data slice
        raise ConfigError(f"mesh.data={data} is not a multiple of the {n_processes} processes: make mesh.data a "
                          f"multiple of {n_processes} (and mesh.model = devices / mesh.data)")
    split = data
    batches = {"mse.batch_size": cfg.mse.batch_size, "store.batch_contexts": cfg.store.batch_contexts,
               "eval.batch_sequences": cfg.eval.batch_sequences}
    if "finetune" in cfg.phases:
        batches["finetune.batch_sequences"] = cfg.finetune.batch_sequences
    if "e2e" in cfg.phases:
        batches["e2e.batch_sequences"] = cfg.e2e.batch_sequences
    for key, b in batches.items():
        if b % split:
            raise ConfigError(f"{key}={b} does not split over mesh.data={data}: make it a multiple of {split}")
    if cfg.sae.d_sae % m:
        raise ConfigError(f"sae.d_sae={cfg.sae.d_sae} does not split over mesh.model={m}: make it a multiple of {m}")
    return data, m


def e2e_tokens(cfg: RunConfig) -> int:
    return cfg.e2e.tokens or (cfg.mse.tokens + cfg.finetune.tokens)


def dump(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d["phases"] = list(d["phases"])
    return yaml.safe_dump(d, sort_keys=False)
