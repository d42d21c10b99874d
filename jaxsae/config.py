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
from typing import Any, Literal

import yaml

from jaxsae.errors import UserError
from jaxsae.sae.config import SAEConfig


class ConfigError(UserError, ValueError):
    """A user error in a config; the message names the key and the fix."""


# "auto": bfloat16 on an accelerator (GPU, TPU), float32 on the CPU (`resolve_dtype`), decided once per run
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
StoreDtype = Literal["auto", "float32", "bfloat16"]
LMSharding = Literal["replicated", "fsdp", "tensor"]
# warmup_decay: linear warm-up, constant, linear decay to 0 over the last decay_fraction (the paper's MSE
# phase); linear: lr -> 0 over the phase (the fine-tune); constant (the e2e baseline)
Schedule = Literal["warmup_decay", "linear", "constant"]
AdapterKind = Literal["lm_lora", "sae_lora", "output", "output_mlp"]
InitFormat = Literal["", "jaxsae", "saelens", "dictionary_learning"]
TrackerKind = Literal["none", "tensorboard", "wandb"]


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    path: str = "shipped"  # a local HF directory, a hub id, or "shipped" (the small stdlib Pythia)
    # The LM's weights and activations. The SAE, its optimiser state and the logits that feed the CE and
    # the KL stay float32 whatever this says (`jaxsae.splice`, the families' `unembed`).
    dtype: Dtype = "auto"
    # Where the LM's weights live (jaxsae.sharding.LM_RULES): replicated on every device (fastest for
    # small models), fsdp (split over the mesh's data axis, gathered per use) or tensor (heads, MLP
    # and vocabulary over the model axis). fsdp/tensor let a model fit that a replicated copy would not.
    lm_sharding: LMSharding = "replicated"


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
    # Whether position 0 counts for the MSE, the KL and evaluation (same everywhere). The paper's reference
    # splices and scores every position (the paper configs set true); position 0 of a packed context
    # attends only to itself and has an outsized norm, so the library default leaves it out.
    include_first_position: bool = False
    # SAEBench's convention on top: BOS, EOS and PAD token ids are neither spliced nor counted in the KL
    # phases and evaluation (the MSE phase still trains on every stored row)
    exclude_special_tokens: bool = False
    # A KL phase's window is streamed in blocks of this many sequences, each shuffled on its own, so only
    # one block (int32[block, context]) is in memory; a window of one block is shuffled as a whole
    window_shuffle_sequences: int = 65_536


@dataclasses.dataclass(frozen=True)
class StoreCfg:
    path: str = ""  # tensorstore kvstore path or URL; "" -> <run_dir>/store
    dtype: StoreDtype = "auto"  # auto: an existing store's dtype, else as model.dtype's auto
    tokens: int = 500_000_000  # rows collected; the MSE phase reads them once (1 epoch) by default
    batch_contexts: int = 32  # contexts per LM forward, collecting or streaming
    norm_sample_tokens: int = 65_536
    # disk: collect `tokens` rows into the store first, then train on them (reusable by many runs);
    # stream: the LM makes the MSE phase's rows inside its loop, through a shuffle buffer on device
    # (`jaxsae.data.stream`): no store on disk, every MSE token a new one, `tokens` unused
    mode: Literal["disk", "stream"] = "disk"
    # stream mode: rows per refill of the shuffle buffer (1.5x that on device); SAELens's default buffer at
    # context 1024 (20 x 32 contexts). Small buffers mix few contexts per batch and train worse
    buffer_rows: int = 655_360


@dataclasses.dataclass(frozen=True)
class PhaseCfg:
    """What every training phase sets for itself (no phase borrows another's): its budget, its optimiser
    (Adam, or AdamW when weight_decay > 0, after a global-norm clip when clip > 0) and its schedule."""

    tokens: int = 25_000_000  # tokens the phase trains on
    lr: float = 5e-5
    schedule: Schedule = "linear"
    warmup_steps: int = 0  # warmup_decay only
    decay_fraction: float = 0.2  # warmup_decay only: the share of steps over which lr decays to 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0  # 0 = no clipping
    seed: int = 0

    def schedule_name(self) -> str:
        """The lr schedule this phase runs (a section may leave `schedule` to a per-kind default)."""
        return self.schedule


@dataclasses.dataclass(frozen=True)
class MSECfg(PhaseCfg):
    """The MSE phase over shuffled store rows (paper: ~500M tokens, Adam, warm-up, decay over the last 20%)."""

    tokens: int = 500_000_000
    batch_size: int = 2048  # tokens (activation rows) per step
    lr: float = 3e-4
    schedule: Schedule = "warmup_decay"
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    clip: float = 1.0  # as every dictionary_learning trainer
    data_seed: int | None = None  # the store reader's shuffle; None = seed (a sweep shares one order)


@dataclasses.dataclass(frozen=True)
class KLCfg(PhaseCfg):
    """A phase of the fused KL+MSE step over token sequences (PAPER.md "The fine-tune step")."""

    batch_sequences: int = 8  # paper: 8 sequences of 1024 for Pythia, 2 for Gemma
    kl_share: float = 0.5  # loss = (1 - s) MSE + s beta KL; s = 1/2 is the paper's
    # hold L0 (measured on the window's first batches) by moving the L1 coefficient every step;
    # None = on for the kinds with an L1 penalty (ReLU) when the phase continues a trained SAE
    l1_controller: bool | None = None
    # sign: the reference's λ·(1 ± l1_rate); pi: proportional-integral on log(L0/target), whose speed grows
    # with the error (for an L0 pushed up faster than the sign rule's fixed rate; `finetune.control_l1`)
    l1_control: Literal["sign", "pi"] = "sign"
    # sign: None = sized to the window so that λ can move by up to 20x over it, as the reference's 0.1% per
    # step does over its ~3,000 steps; pi: the integral gain (None = 0.1)
    l1_rate: float | None = None
    l1_gain: float = 0.5  # pi: the proportional gain, log λ's immediate response to log(L0/target)
    # > 0: the controller holds the L0 of this many training-source sequences read just before the window
    # and never trained on (one batch of them per step, in turn), instead of each training batch's own L0
    # (the reference's). The fine-tune lowers L0 on the files it trains on, so a window's own batches read
    # low while held-out text drifts up (`finetune.probe_l0`). A multiple of batch_sequences.
    l0_probe_sequences: int = 0
    # where the probe is read: "train", whole documents of data.source just before the window; "eval", whole
    # documents of data.eval_source after the eval.sequences contexts that evaluation reads (held-out
    # validation text of the evaluation's distribution, never evaluated on; the window then starts at the
    # store's end). The eval split's L0 can drift where the training text's holds (the ReLU demo).
    l0_probe_source: Literal["train", "eval"] = "train"
    auxk: bool = False  # the AuxK dead-latent loss; the reference's fine-tune has none


@dataclasses.dataclass(frozen=True)
class FinetuneCfg(KLCfg):
    """The KL+MSE fine-tune window (paper: the last ~25M tokens, lr 5e-5 -> 0, AdamW wd 0.01, clip 1).
    The `control` phase runs this same window with kl_share 0 (an MSE-only continuation)."""

    # Start from a saved SAE instead of the mse phase (phases: [finetune]): a jaxsae run or checkpoint
    # directory, a SAELens directory or a dictionary_learning ae.pt; its kind, d_sae and k replace sae.*'s.
    init_from: str = ""
    init_format: InitFormat = ""  # "" = detected from the files


@dataclasses.dataclass(frozen=True)
class E2ECfg(KLCfg):
    """The full end-to-end baseline: the fused step from a fresh SAE for the whole budget."""

    tokens: int = 0  # 0 = mse.tokens + finetune.tokens, so the comparison is at equal tokens
    schedule: Schedule = "constant"  # as in the paper's baseline
    auxk: bool = True  # a fresh SAE needs its dead latents revived, as in the MSE phase


@dataclasses.dataclass(frozen=True)
class AdapterCfg(KLCfg):
    """An adapter trained around the frozen SAE (paper, "Adapters"; jaxsae.train.adapters). After mse
    alone it wraps the MSE SAE; listed after finetune it wraps the fine-tuned one."""

    kind: AdapterKind = "output"
    rank: int | None = 16  # 0 or null = full rank (d_model)
    alpha: float | None = None  # LoRA scale alpha/rank; None = 32 for sae_lora (the reference's PEFT), rank for lm_lora
    dropout: float = 0.0  # sae_lora: PEFT's lora_dropout on each factor pair's input (the reference: 0.1)
    lm_layers: Literal["all", "after"] = "all"  # lm_lora: all blocks, or only those after the hook
    loss: Literal["auto", "kl", "kl_mse"] = "auto"  # auto: kl for lm_lora, else the fine-tune's kl_mse
    # None: constant for the output adapters (the reference's), linear decay for the LoRAs (as the fine-tune)
    schedule: Schedule | None = None

    def schedule_name(self) -> str:
        if self.schedule is not None:
            return self.schedule
        return "constant" if self.kind in ("output", "output_mlp") else "linear"


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
class GuardCfg:
    """The divergence guard of every training phase (`jaxsae.train.guard`): the loop stops, naming the
    step, when training has plainly gone wrong, instead of spending the rest of the budget on it."""

    enabled: bool = True
    # stop when train/loss exceeds loss_ratio x its running minimum over the phase's steps so far ...
    loss_ratio: float = 1000.0
    # ... checked from this step of the phase on (Adam's first steps may swing while its moments fill)
    grace_steps: int = 20
    # stop when no latent fires (train/l0 == 0) or every latent is dead (train/dead_fraction == 1) for
    # this many steps in a row
    dead_steps: int = 20


@dataclasses.dataclass(frozen=True)
class TrackerCfg:
    """An experiment tracker that receives what metrics.jsonl and eval.json hold (`jaxsae.tracking`):
    every logged step (tag <phase>/<key>, e.g. mse/train/loss, at the phase's step), each phase's
    evaluation and the report figure at the end. Optional extras: pip install jaxsae[tensorboard] or
    jaxsae[wandb]. Written by process 0 only; metrics.jsonl stays the record of the run."""

    kind: TrackerKind = "none"
    project: str = "jaxsae"  # wandb's project (tensorboard ignores it)
    name: str | None = None  # the tracker's run name; None = the config's `name`
    dir: str = ""  # "" -> <run_dir>/tracker (tensorboard's event files; wandb's offline files)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    phases: tuple = ("mse", "finetune")  # names from jaxsae.phases.PHASES, in that order
    model: ModelCfg = ModelCfg()
    mesh: MeshCfg = MeshCfg()
    hook: HookCfg = HookCfg()
    data: DataCfg = DataCfg()
    store: StoreCfg = StoreCfg()
    sae: SAEConfig = SAEConfig()  # d_model stays 0: it comes from the model
    mse: MSECfg = MSECfg()
    finetune: FinetuneCfg = FinetuneCfg()
    e2e: E2ECfg = E2ECfg()
    adapter: AdapterCfg = AdapterCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    eval: EvalCfg = EvalCfg()
    guard: GuardCfg = GuardCfg()
    tracker: TrackerCfg = TrackerCfg()
    # keys that vary across SAEs trained as one program (`jaxsae.sweep`): {"sae.k": [8, 16], ...}
    sweep: dict = dataclasses.field(default_factory=dict)

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
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices:
            return value
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(repr(c) for c in choices)}")
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
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}: valid keys here are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b]... = value. A key inside a mapping-valued field (data.source.split) updates that key of
    the field's current value (the default when the file does not set it), not the whole mapping."""
    parts = dotted.split(".")
    node, cls, default = tree, RunConfig, RunConfig()
    for p in parts[:-1]:
        field = default if cls is None else getattr(default, p, None)
        if p not in node and isinstance(field, dict):
            node[p] = dict(field)
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        cls, default = (type(field), field) if _is_dataclass_type(type(field)) else (None, None)
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())}); quote it "
                          "or fix its brackets") from None


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file `path` ({} for an empty file); ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file {p} {what}; see configs/ for examples")
    try:
        loaded = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} holds a YAML {type(loaded).__name__}, not a mapping of sections: write "
                          "it as `key: value` lines (see configs/demo.yaml)")
    return loaded


# The keys that size a run: a config file must set them itself (or through --set), so that a file that
# says nothing never starts the defaults' 500M-token run.
def _size_keys(tree: dict) -> list[str]:
    from jaxsae.phases import BY_NAME

    phases = tree.get("phases", RunConfig.phases)
    store = tree.get("store")
    keys = [] if isinstance(store, dict) and store.get("mode") == "stream" else ["store.tokens"]
    for name in phases if isinstance(phases, (list, tuple)) else ():
        if name == "e2e":  # e2e.tokens 0 means mse.tokens + finetune.tokens
            keys += [] if _has(tree, "e2e.tokens") else ["mse.tokens", "finetune.tokens"]
        elif name in BY_NAME:
            keys.append(f"{BY_NAME[name].section}.tokens")
    return list(dict.fromkeys(keys))


def _has(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_sized(tree: dict, path: str | Path) -> None:
    """ConfigError unless the config tree sets every key that sizes its run (`_size_keys`)."""
    missing = [k for k in _size_keys(tree) if not _has(tree, k)]
    if missing:
        raise ConfigError(f"config file {path} does not set {', '.join(missing)}: a run's size must be chosen, not "
                          f"defaulted (the defaults are the paper's 500M-token run); set them in the file or with "
                          f"--set {missing[0]}=N")


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                require_size: bool = False) -> RunConfig:
    """YAML file (or `base` dict) + `key.path=value` overrides -> a checked RunConfig.
    require_size: the file (with the overrides) must set the keys that size the run (`check_sized`)."""
    tree: dict = dict(base or {})
    if path is not None:
        tree = read_yaml(path)
    if tree.get("mesh") == "auto":
        tree["mesh"] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    if require_size and path is not None:
        check_sized(tree, path)
    cfg = build(RunConfig, tree)
    from jaxsae.validate import check_static

    check_static(cfg)
    return cfg


ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(value: str, platform: str) -> str:
    """A dtype setting made concrete for devices of `platform` (jax's `Device.platform`): "auto" is
    bfloat16 on an accelerator, where matmuls run at twice float32's rate or more and activations take half
    the memory, and float32 on the CPU, which gains no speed from bfloat16 and would only lose precision.
    Any other value is returned as it is."""
    if value != "auto":
        return value
    return "bfloat16" if platform.lower() in ACCELERATORS else "float32"


def resolve_dtypes(cfg: RunConfig, platform: str, store_meta: dict | None = None) -> RunConfig:
    """`cfg` with model.dtype and store.dtype concrete, for a run on `platform`'s devices.

    An existing store (store_meta: its meta.json) decides what `auto` means: the store keeps its own dtype,
    and the LM runs in the dtype it was collected with, which the store's identity records (so resuming or
    reusing it is accepted, and the fine-tune splices into the LM whose activations the SAE learnt from).
    Explicit values are kept, and a store that disagrees with them is refused by the caller."""
    store_meta = store_meta or {}
    lm_had = (store_meta.get("model") or {}).get("config", {}).get("dtype")
    model = cfg.model.dtype if cfg.model.dtype != "auto" or not lm_had else lm_had
    store = cfg.store.dtype if cfg.store.dtype != "auto" or "dtype" not in store_meta else store_meta["dtype"]
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dtype=resolve_dtype(model, platform)),
        store=dataclasses.replace(cfg.store, dtype=resolve_dtype(store, platform)))


def section(cfg: RunConfig, phase: str) -> PhaseCfg:
    """The settings of `phase` (a name in jaxsae.phases.PHASES)."""
    from jaxsae.phases import get

    return getattr(cfg, get(phase).section)


def phase_tokens(cfg: RunConfig, phase: str) -> int:
    """Tokens `phase` trains on; e2e's 0 means the MSE SAE's and its fine-tune's together (equal tokens)."""
    tokens = section(cfg, phase).tokens
    return tokens or (cfg.mse.tokens + cfg.finetune.tokens) if phase == "e2e" else tokens


def phase_batch_tokens(cfg: RunConfig, phase: str) -> int:
    """Tokens one step of `phase` reads."""
    sec = section(cfg, phase)
    return sec.batch_size if isinstance(sec, MSECfg) else sec.batch_sequences * cfg.data.context


def dump(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d["phases"] = list(d["phases"])
    return yaml.safe_dump(d, sort_keys=False)
