"""dictionary_learning format (saprmarks/dictionary_learning): `ae.pt` + `config.json`.

Matched against dictionary_learning 0.1.0 (PyPI; same classes and trainer configs as the GitHub main branch):

    dict_class            kind        ae.pt (torch state dict, f32 unless noted)
    AutoEncoder           relu        bias [D], encoder.weight [S, D], encoder.bias [S], decoder.weight [D, S]
    AutoEncoderTopK       topk        b_dec [D], k i32[], threshold f32[] (-1: unused), decoder.weight [D, S],
                                      encoder.weight [S, D], encoder.bias [S]
    BatchTopKSAE          batchtopk   same keys as AutoEncoderTopK; threshold is the inference threshold
    JumpReluAutoEncoder   jumprelu    W_enc [D, S], b_enc [S], W_dec [S, D], b_dec [D], threshold [S]

Their encoders: AutoEncoder relu(enc(x - bias)); AutoEncoderTopK top-k of relu(enc(x - b_dec));
BatchTopKSAE (inference) r * (r > threshold) with r = relu(enc(x - b_dec)); JumpReluAutoEncoder
relu(p * (p > threshold)) with p = x @ W_enc + b_enc, b_dec not subtracted (apply_b_dec_to_input is
False and not saved), so export folds b_dec into b_enc. Decoders: dec(f) + bias / b_dec.

`config.json` is {"trainer": <the matching trainer's `config` dict>, "buffer": {...}}, as `trainSAE` writes
it; the fields with a jaxsae equivalent are filled from the run's config, the others are null.
The activation scale is folded into the weights (`fold.to_raw`): latents equal jaxsae's. (dictionary_learning's
own `normalize_activations` folds it into the biases instead, which multiplies latents by the scale; both
reconstruct raw activations identically, and import reads either.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsae.interop.fold import log_threshold, threshold_of, to_raw
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.load import LoadedSAE

DICTIONARY_LEARNING_VERSION = "0.1.0"
AE_FILE, CFG_FILE = "ae.pt", "config.json"
DICT_CLASS = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
              "jumprelu": "JumpReluAutoEncoder"}
KIND = {v: k for k, v in DICT_CLASS.items()}
TRAINER_CLASS = {"relu": "StandardTrainerAprilUpdate", "topk": "TopKTrainer", "batchtopk": "BatchTopKTrainer",
                 "jumprelu": "JumpReluTrainer"}
# Keys (in order) of each trainer's `config` property.
TRAINER_KEYS = {
    "relu": ["dict_class", "trainer_class", "activation_dim", "dict_size", "lr", "l1_penalty", "warmup_steps",
             "sparsity_warmup_steps", "steps", "decay_start", "seed", "device", "layer", "lm_name", "wandb_name",
             "submodule_name"],
    "topk": ["trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start",
             "threshold_beta", "threshold_start_step", "seed", "activation_dim", "dict_size", "k", "device",
             "layer", "lm_name", "wandb_name", "submodule_name"],
    "batchtopk": ["trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start",
                  "threshold_beta", "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size",
                  "k", "device", "layer", "lm_name", "wandb_name", "submodule_name"],
    "jumprelu": ["trainer_class", "dict_class", "lr", "steps", "seed", "activation_dim", "dict_size", "device",
                 "layer", "lm_name", "wandb_name", "submodule_name", "bandwidth", "sparsity_penalty",
                 "sparsity_warmup_steps", "target_l0"],
}


def _torch():
    try:
        import torch
    except ImportError as e:  # torch is only needed for this format
        raise ImportError("the dictionary_learning format is a torch state dict: pip install torch") from e
    return torch


def _trainer_config(sae: LoadedSAE, run_config: dict | None, lm_name: str | None) -> dict:
    cfg, rc = sae.cfg, run_config or {}
    mse = rc.get("mse", {})
    steps = (mse["tokens"] // mse["batch_size"]) if "tokens" in mse and "batch_size" in mse else None
    layer = sae.meta.get("hook_layer")
    known = {
        "trainer_class": TRAINER_CLASS[cfg.kind], "dict_class": DICT_CLASS[cfg.kind],
        "activation_dim": cfg.d_model, "dict_size": cfg.d_sae, "k": cfg.k,
        "lr": mse.get("lr"), "steps": steps, "warmup_steps": mse.get("warmup_steps"),
        "decay_start": int(steps * (1 - mse["decay_fraction"])) if steps and "decay_fraction" in mse else None,
        "seed": mse.get("seed"), "device": "cpu", "layer": layer, "lm_name": lm_name or sae.meta.get("model"),
        "wandb_name": None, "submodule_name": f"resid_post_layer_{layer}",
        "auxk_alpha": cfg.auxk_coeff, "top_k_aux": cfg.effective_k_aux,
        "threshold_beta": 0.99 if cfg.kind == "batchtopk" else None, "threshold_start_step": 0,
        "l1_penalty": cfg.l1_coeff, "sparsity_warmup_steps": cfg.l1_warmup_steps if cfg.kind == "relu" else None,
        "bandwidth": cfg.jumprelu_bandwidth, "sparsity_penalty": cfg.l0_coeff, "target_l0": None,
    }
    return {k: known.get(k) for k in TRAINER_KEYS[cfg.kind]}


def state_dict(sae: LoadedSAE) -> dict[str, np.ndarray]:
    """The dictionary_learning state dict of `sae` acting on raw activations, as numpy arrays."""
    cfg = sae.cfg
    raw = {k: np.asarray(v, np.float32) for k, v in to_raw(cfg, sae.params, sae.scale).items()}
    W_enc, b_enc, W_dec, b_dec = raw["W_enc"], raw["b_enc"], raw["W_dec"], raw["b_dec"]
    if cfg.kind == "relu":
        return {"bias": b_dec, "encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T}
    if cfg.kind in ("topk", "batchtopk"):
        thr = float(threshold_of(cfg, raw)[0]) if cfg.kind == "batchtopk" else -1.0
        return {"b_dec": b_dec, "k": np.asarray(cfg.k, np.int32), "threshold": np.asarray(thr, np.float32),
                "decoder.weight": W_dec.T, "encoder.weight": W_enc.T, "encoder.bias": b_enc}
    # JumpReluAutoEncoder does not subtract b_dec before encoding: fold it into b_enc.
    return {"W_enc": W_enc, "b_enc": b_enc - b_dec @ W_enc, "W_dec": W_dec, "b_dec": b_dec,
            "threshold": threshold_of(cfg, raw)}


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


def _kind_from_keys(keys: set) -> str | None:
    if {"bias", "encoder.weight", "decoder.weight"} <= keys:
        return "relu"
    if {"W_enc", "W_dec", "threshold"} <= keys:
        return "jumprelu"
    return None


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
    kind = KIND.get(dict_class) if dict_class else _kind_from_keys(set(w))
    if kind is None:
        raise ValueError(
            f"{pt}: dict_class={dict_class!r} has no jaxsae equivalent; jaxsae imports {', '.join(KIND)}"
            if dict_class else f"{pt}: cannot tell AutoEncoderTopK from BatchTopKSAE without {CFG_FILE}: put its "
            "config.json (trainer.dict_class) next to it")
    try:
        if kind == "relu":
            W_enc, b_enc, W_dec, b_dec = w["encoder.weight"].T, w["encoder.bias"], w["decoder.weight"].T, w["bias"]
        elif kind == "jumprelu":
            W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
            b_enc = b_enc + b_dec @ W_enc  # jaxsae subtracts b_dec before encoding; this class does not
        else:
            W_enc, b_enc, W_dec, b_dec = w["encoder.weight"].T, w["encoder.bias"], w["decoder.weight"].T, w["b_dec"]
    except KeyError as e:
        raise ValueError(f"{pt} lacks {e.args[0]}: not a {DICT_CLASS[kind]} state dict") from None
    d_in, d_sae = W_enc.shape
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    extra = {}
    if kind in ("topk", "batchtopk"):
        extra["k"] = int(sd["k"].item()) if "k" in sd else int(trainer.get("k"))
    if kind == "batchtopk":
        params["threshold"] = np.asarray(w["threshold"], np.float32).reshape(())
    if kind == "jumprelu":
        params["log_threshold"] = log_threshold(w["threshold"])
    cfg = SAEConfig(kind=kind, d_model=int(d_in), d_sae=int(d_sae), **extra).validate()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    meta = {"phase": "imported", "sae": dataclasses.asdict(cfg), "scale": 1.0,
            "hook_layer": layer if layer is not None else trainer.get("layer"),
            "model": model or trainer.get("lm_name"),
            "source": {"format": "dictionary_learning", "path": str(pt), "dict_class": DICT_CLASS[kind]}}
    return LoadedSAE(cfg, params, 1.0, meta)
