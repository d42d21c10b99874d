"""dictionary_learning format (saprmarks/dictionary_learning): `ae.pt` + `config.json`.

Matched against dictionary_learning 0.1.0 (PyPI; same classes and trainer configs as the GitHub main branch;
MatryoshkaBatchTopKSAE as trainers/matryoshka_batch_top_k.py on the main branch has it):

    dict_class              kind                  ae.pt (torch state dict in state_dict() order; f32 unless noted)
    AutoEncoder             relu                  bias [D], encoder.weight [S, D], encoder.bias [S],
                                                  decoder.weight [D, S]
    AutoEncoderTopK         topk                  b_dec [D], k i32[], threshold f32[] (-1: unused),
                                                  decoder.weight [D, S], encoder.weight [S, D], encoder.bias [S]
    BatchTopKSAE            batchtopk             same keys as AutoEncoderTopK; threshold is the inference threshold
                                                  (-1: not calibrated yet)
    JumpReluAutoEncoder     jumprelu              W_enc [D, S], b_enc [S], W_dec [S, D], b_dec [D], threshold [S]
    MatryoshkaBatchTopKSAE  matryoshka_batchtopk  W_enc [D, S], b_enc [S], W_dec [S, D], b_dec [D], k i32[],
                                                  threshold f32[], group_sizes i64[G]

Their encoders: AutoEncoder relu(enc(x - bias)); AutoEncoderTopK top-k of relu(enc(x - b_dec));
BatchTopKSAE (inference) r * (r > threshold) with r = relu(enc(x - b_dec)), and MatryoshkaBatchTopKSAE the
same with r = relu((x - b_dec) @ W_enc + b_enc); JumpReluAutoEncoder relu(p * (p > threshold)) with
p = x @ W_enc + b_enc, b_dec not subtracted (apply_b_dec_to_input is False and not saved), so export folds
b_dec into b_enc. Decoders: dec(f) + bias / b_dec.

`config.json` is {"trainer": <the matching trainer's `config` dict>, "buffer": {...}}, as `trainSAE` writes
it; the fields with a jaxsae equivalent are filled from the run's config, the others are null. Import reads
back those that describe the SAE (k, the Matryoshka groups) and JumpReluTrainer's loss settings (target_l0,
sparsity_penalty, bandwidth, sparsity_warmup_steps).
The activation scale is folded into the weights (`fold.to_raw`): latents equal jaxsae's. (dictionary_learning's
own `normalize_activations` folds it into the biases instead, which multiplies latents by the scale; both
reconstruct raw activations identically, and import reads either.)

Each class is one `DLClass` row of `CLASSES`; the jaxsae kind it stands for is the kind whose registry entry
(`jaxsae.sae.kinds`) names it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxsae.interop.fold import log_threshold, threshold_of, to_raw
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.kinds import REGISTRY
from jaxsae.sae.load import LoadedSAE
from jaxsae.sae.matryoshka import group_sizes

DICTIONARY_LEARNING_VERSION = "0.1.0"
AE_FILE, CFG_FILE = "ae.pt", "config.json"


def _no_fields(cfg: SAEConfig) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class DLClass:
    """One dictionary_learning dictionary class.

    trainer_class / trainer_keys: the trainer that trains it and the keys (in order) of its `config` property.
    keys: the state dict's keys in state_dict() order.
    write: (cfg, raw params) -> the state dict as numpy arrays (raw: `fold.to_raw`'s params).
    read: (state dict as numpy f32 arrays, the `k` entry as int or None, config.json's trainer dict)
        -> (jaxsae params, SAEConfig fields besides kind, d_model and d_sae).
    trainer_fields: (cfg) -> the class's own values of trainer keys (the shared ones are filled generically).
    """

    trainer_class: str
    trainer_keys: tuple[str, ...]
    keys: tuple[str, ...]
    write: Callable[[SAEConfig, dict], dict]
    read: Callable[[dict, int | None, dict], tuple[dict, dict]]
    trainer_fields: Callable[[SAEConfig], dict] = _no_fields


def _k(cfg: SAEConfig) -> np.ndarray:
    return np.asarray(cfg.k, np.int32)


def _k_of(k_entry: int | None, trainer: dict) -> dict:
    k = k_entry if k_entry is not None else trainer.get("k")
    if not isinstance(k, int):
        raise ValueError("the state dict has no k and config.json's trainer.k is missing: put the trainer's "
                         "config.json next to ae.pt")
    return {"k": k}


def _threshold_fields(cfg: SAEConfig) -> dict:
    return {"threshold_beta": cfg.threshold_decay, "threshold_start_step": cfg.threshold_start_step}


# --- AutoEncoder (relu) ---

def _write_relu(cfg, p):
    return {"bias": p["b_dec"], "encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"],
            "decoder.weight": p["W_dec"].T}


def _read_relu(w, k, trainer):
    return {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T,
            "b_dec": w["bias"]}, {}


# --- AutoEncoderTopK and BatchTopKSAE (topk, batchtopk): one layout ---

def _write_topk(cfg, p):
    return {"b_dec": p["b_dec"], "k": _k(cfg), "threshold": np.asarray(-1.0, np.float32),
            "decoder.weight": p["W_dec"].T, "encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"]}


def _read_topk(w, k, trainer):
    return {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T,
            "b_dec": w["b_dec"]}, _k_of(k, trainer)


def _write_batchtopk(cfg, p):
    # the raw threshold: an uncalibrated -1 stays -1, which dictionary_learning's trainer also reads as such
    return {**_write_topk(cfg, p), "threshold": np.asarray(p["threshold"], np.float32).reshape(())}


def _read_batchtopk(w, k, trainer):
    params, fields = _read_topk(w, k, trainer)
    return {**params, "threshold": np.asarray(w["threshold"], np.float32).reshape(())}, fields


# --- JumpReluAutoEncoder (jumprelu) ---

def _write_jumprelu(cfg, p):
    # JumpReluAutoEncoder does not subtract b_dec before encoding: fold it into b_enc.
    return {"W_enc": p["W_enc"], "b_enc": p["b_enc"] - p["b_dec"] @ p["W_enc"], "W_dec": p["W_dec"],
            "b_dec": p["b_dec"], "threshold": threshold_of(cfg, p)}


def _read_jumprelu(w, k, trainer):
    # jaxsae subtracts b_dec before encoding; this class does not
    params = {"W_enc": w["W_enc"], "b_enc": w["b_enc"] + w["b_dec"] @ w["W_enc"], "W_dec": w["W_dec"],
              "b_dec": w["b_dec"], "log_threshold": log_threshold(w["threshold"])}
    return params, _jumprelu_training(trainer)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jumprelu_training(trainer: dict) -> dict:
    """The JumpReluTrainer settings config.json records, as SAEConfig fields (those absent or null are left
    at jaxsae's defaults); a fine-tune still takes its training settings from the run (`load_init`)."""
    fields = {}
    if _number(trainer.get("target_l0")) and trainer["target_l0"] > 0:
        fields["l0_target"] = float(trainer["target_l0"])
    if _number(trainer.get("sparsity_penalty")) and trainer["sparsity_penalty"] >= 0:
        fields["l0_coeff"] = float(trainer["sparsity_penalty"])
    if _number(trainer.get("bandwidth")) and trainer["bandwidth"] > 0:
        fields["jumprelu_bandwidth"] = float(trainer["bandwidth"])
    warm = trainer.get("sparsity_warmup_steps")
    if isinstance(warm, int) and not isinstance(warm, bool) and warm >= 0:
        fields["l0_warmup_steps"] = warm
    return fields


def _jumprelu_fields(cfg: SAEConfig) -> dict:
    # target_l0 stays null for the paper's l0_coeff * L0 penalty, which JumpReluTrainer has no key for
    return {"target_l0": cfg.l0_target, "sparsity_warmup_steps": cfg.l0_warmup_steps}


# --- MatryoshkaBatchTopKSAE (matryoshka_batchtopk) ---

def _dl_group_weights(cfg: SAEConfig) -> list[float]:
    g = len(cfg.group_fractions)
    return list(cfg.group_weights) if cfg.group_weights is not None else [1.0 / g] * g


def _write_matryoshka(cfg, p):
    return {"W_enc": p["W_enc"], "b_enc": p["b_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"], "k": _k(cfg),
            "threshold": np.asarray(p["threshold"], np.float32).reshape(()),
            "group_sizes": np.asarray(group_sizes(cfg), np.int64)}


def _read_matryoshka(w, k, trainer):
    sizes = [int(s) for s in np.asarray(w["group_sizes"]).reshape(-1)]
    d_sae = sum(sizes)
    # the trainer's own fractions when they give these sizes, else the sizes' shares (which floor back exactly)
    fractions = trainer.get("group_fractions")
    cfg = SAEConfig(kind="matryoshka_batchtopk", d_sae=d_sae, group_fractions=tuple(fractions or ()))
    if not fractions or len(fractions) != len(sizes) or list(group_sizes(cfg)) != sizes:
        fractions = [s / d_sae for s in sizes]
    weights = trainer.get("group_weights")
    if not weights or len(weights) != len(sizes) or len(set(weights)) == 1:
        weights = None  # equal weights (its default 1 / G each) are jaxsae's default
    fields = {**_k_of(k, trainer), "group_fractions": tuple(float(f) for f in fractions),
              "group_weights": tuple(float(x) for x in weights) if weights else None}
    params = {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
              "threshold": np.asarray(w["threshold"], np.float32).reshape(())}
    return params, fields


def _matryoshka_fields(cfg: SAEConfig) -> dict:
    weights = _dl_group_weights(cfg)
    # its loss is (w_G / G) times jaxsae's reconstruction terms plus auxk_alpha * AuxK (`jaxsae.sae.matryoshka`)
    return {**_threshold_fields(cfg), "group_fractions": list(cfg.group_fractions), "group_weights": weights,
            "group_sizes": list(group_sizes(cfg)), "auxk_alpha": cfg.auxk_coeff * weights[-1] / len(weights)}


_TOPK_KEYS = ("b_dec", "k", "threshold", "decoder.weight", "encoder.weight", "encoder.bias")
CLASSES: dict[str, DLClass] = {
    "AutoEncoder": DLClass(
        "StandardTrainerAprilUpdate",
        ("dict_class", "trainer_class", "activation_dim", "dict_size", "lr", "l1_penalty", "warmup_steps",
         "sparsity_warmup_steps", "steps", "decay_start", "seed", "device", "layer", "lm_name", "wandb_name",
         "submodule_name"),
        ("bias", "encoder.weight", "encoder.bias", "decoder.weight"), _write_relu, _read_relu,
        lambda cfg: {"sparsity_warmup_steps": cfg.l1_warmup_steps}),
    "AutoEncoderTopK": DLClass(
        "TopKTrainer",
        ("trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta",
         "threshold_start_step", "seed", "activation_dim", "dict_size", "k", "device", "layer", "lm_name",
         "wandb_name", "submodule_name"),
        _TOPK_KEYS, _write_topk, _read_topk, lambda cfg: {"threshold_start_step": 0}),
    "BatchTopKSAE": DLClass(
        "BatchTopKTrainer",
        ("trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta",
         "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size", "k", "device", "layer",
         "lm_name", "wandb_name", "submodule_name"),
        _TOPK_KEYS, _write_batchtopk, _read_batchtopk, _threshold_fields),
    "JumpReluAutoEncoder": DLClass(
        "JumpReluTrainer",
        ("trainer_class", "dict_class", "lr", "steps", "seed", "activation_dim", "dict_size", "device", "layer",
         "lm_name", "wandb_name", "submodule_name", "bandwidth", "sparsity_penalty", "sparsity_warmup_steps",
         "target_l0"),
        ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), _write_jumprelu, _read_jumprelu, _jumprelu_fields),
    "MatryoshkaBatchTopKSAE": DLClass(
        "MatryoshkaBatchTopKTrainer",
        ("trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta",
         "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size", "group_fractions",
         "group_weights", "group_sizes", "k", "device", "layer", "lm_name", "wandb_name", "submodule_name"),
        ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"), _write_matryoshka, _read_matryoshka,
        _matryoshka_fields),
}
# jaxsae kind <-> class, from the kinds' registry entries
DICT_CLASS = {k.name: k.dictionary_learning for k in REGISTRY.values() if k.dictionary_learning in CLASSES}
KIND = {v: k for k, v in DICT_CLASS.items()}


def _torch():
    try:
        import torch
    except ImportError as e:  # torch is only needed for this format
        raise ImportError("the dictionary_learning format is a torch state dict: pip install torch") from e
    return torch


def _dict_class(cfg: SAEConfig) -> str:
    name = DICT_CLASS.get(cfg.kind)
    if name is None:
        raise ValueError(f"a {cfg.kind} SAE has no dictionary_learning class: export it as saelens")
    return name


def _trainer_config(sae: LoadedSAE, run_config: dict | None, lm_name: str | None) -> dict:
    cfg, rc = sae.cfg, run_config or {}
    cls = CLASSES[_dict_class(cfg)]
    mse = rc.get("mse", {})
    steps = (mse["tokens"] // mse["batch_size"]) if "tokens" in mse and "batch_size" in mse else None
    layer = sae.meta.get("hook_layer")
    known = {
        "trainer_class": cls.trainer_class, "dict_class": _dict_class(cfg),
        "activation_dim": cfg.d_model, "dict_size": cfg.d_sae, "k": cfg.k,
        "lr": mse.get("lr"), "steps": steps, "warmup_steps": mse.get("warmup_steps"),
        "decay_start": int(steps * (1 - mse["decay_fraction"])) if steps and "decay_fraction" in mse else None,
        "seed": mse.get("seed"), "device": "cpu", "layer": layer, "lm_name": lm_name or sae.meta.get("model"),
        "wandb_name": None, "submodule_name": f"resid_post_layer_{layer}",
        "auxk_alpha": cfg.auxk_coeff, "top_k_aux": cfg.effective_k_aux,
        "l1_penalty": cfg.l1_coeff, "bandwidth": cfg.jumprelu_bandwidth, "sparsity_penalty": cfg.l0_coeff,
        **cls.trainer_fields(cfg),
    }
    return {k: known.get(k) for k in cls.trainer_keys}


def state_dict(sae: LoadedSAE) -> dict[str, np.ndarray]:
    """The dictionary_learning state dict of `sae` acting on raw activations, as numpy arrays."""
    cfg = sae.cfg
    raw = {k: np.asarray(v, np.float32) for k, v in to_raw(cfg, sae.params, sae.scale).items()}
    return CLASSES[_dict_class(cfg)].write(cfg, raw)


def export_dictionary_learning(sae: LoadedSAE, out_dir: str | Path, *, run_config: dict | None = None,
                               model_name: str | None = None) -> Path:
    """Writes `sae` as `out_dir/ae.pt` + `out_dir/config.json`; returns out_dir."""
    torch = _torch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict(sae).items()}
    torch.save(sd, out_dir / AE_FILE)
    data = (run_config or {}).get("data", {})
    config = {"trainer": _trainer_config(sae, run_config, model_name),
              "buffer": {"d_submodule": sae.cfg.d_model, "io": "out", "n_ctxs": None, "ctx_len": data.get("context"),
                         "refresh_batch_size": None, "out_batch_size": (run_config or {}).get("mse", {}).get("batch_size"),
                         "device": "cpu"}}
    (out_dir / CFG_FILE).write_text(json.dumps(config, indent=4) + "\n")
    return out_dir


def _class_from_keys(keys: set) -> list[str]:
    """The classes whose state dict keys the file has, but for those another such class's keys include."""
    fits = [n for n, c in CLASSES.items() if set(c.keys) <= keys]
    return [n for n in fits if not any(set(CLASSES[n].keys) < set(CLASSES[m].keys) for m in fits)]


def import_dictionary_learning(path: str | Path, *, layer: int | None = None, model: str | None = None) -> LoadedSAE:
    """Reads `ae.pt` (+ `config.json` next to it) into a `LoadedSAE` acting on raw activations (scale 1.0).

    path: the directory or the .pt file. layer / model override config.json's trainer.layer / lm_name.
    """
    torch = _torch()
    path = Path(path)
    pt = path / AE_FILE if path.is_dir() else path
    if not pt.exists():
        raise FileNotFoundError(f"{path} is not a dictionary_learning SAE: no {AE_FILE}")
    cfg_path = pt.parent / CFG_FILE
    trainer = json.loads(cfg_path.read_text()).get("trainer", {}) if cfg_path.exists() else {}
    sd = {k: v.detach().cpu() for k, v in torch.load(pt, map_location="cpu", weights_only=True).items()}
    w = {k: v.float().numpy() for k, v in sd.items()}
    dict_class = trainer.get("dict_class")
    if dict_class is None:
        found = _class_from_keys(set(w))
        if len(found) != 1:
            raise ValueError(
                f"{pt}: cannot tell {' from '.join(found)} apart without {CFG_FILE}: put its config.json "
                "(trainer.dict_class) next to it" if found else
                f"{pt}: its keys {sorted(w)} match no dictionary_learning class jaxsae imports ({', '.join(KIND)})")
        dict_class = found[0]
    if dict_class not in KIND:
        raise ValueError(f"{pt}: dict_class={dict_class!r} has no jaxsae equivalent; jaxsae imports {', '.join(KIND)}")
    kind = KIND[dict_class]
    k_entry = int(sd["k"].item()) if "k" in sd else None
    try:
        params, fields = CLASSES[dict_class].read(w, k_entry, trainer)
    except KeyError as e:
        raise ValueError(f"{pt} lacks {e.args[0]}: not a {dict_class} state dict") from None
    d_in, d_sae = params["W_enc"].shape
    cfg = SAEConfig(kind=kind, d_model=int(d_in), d_sae=int(d_sae), **fields).validate()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    meta = {"phase": "imported", "sae": dataclasses.asdict(cfg), "scale": 1.0,
            "hook_layer": layer if layer is not None else trainer.get("layer"),
            "model": model or trainer.get("lm_name"),
            "source": {"format": "dictionary_learning", "path": str(pt), "dict_class": dict_class}}
    return LoadedSAE(cfg, params, 1.0, meta)
