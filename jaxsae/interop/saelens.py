"""SAELens format: a directory with `cfg.json` and `sae_weights.safetensors`.

Matched against SAELens 6.54.12 (`SAEConfig.to_dict()` and `SAE.save_model`, read by `SAE.load_from_disk`):

    sae_weights.safetensors   W_enc f32[d_in, d_sae], b_enc f32[d_sae], W_dec f32[d_sae, d_in], b_dec f32[d_in]
                              (+ threshold f32[d_sae] for jumprelu)
    cfg.json                  d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
                              reshape_activations, metadata{sae_lens_version, hook_name, model_name,
                              context_size, prepend_bos, seqpos_slice, ...}, [k, rescale_acts_by_decoder_norm],
                              architecture

SAELens computes pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc, then standard: relu(pre),
topk: relu of the k largest pre (SAELens 6 selects before the ReLU, as jaxsae does), jumprelu:
relu(pre) * (pre > threshold); x_hat = f @ W_dec + b_dec. Each kind's registry entry names its architecture:
topk -> topk, relu -> standard, jumprelu -> jumprelu, and batchtopk and matryoshka_batchtopk -> jumprelu with
every threshold equal to jaxsae's scalar inference threshold (how SAELens itself saves its BatchTopK and
Matryoshka BatchTopK SAEs for inference; they import back as jumprelu SAEs computing the same function, the
original kind staying in metadata.jaxsae_kind). The activation scale is folded
into the weights (`fold.to_raw`), so `normalize_activations` is 'none' and latents equal jaxsae's.
The hook after block L is TransformerLens' `blocks.L.hook_resid_post`.

Import also reads pre-6.0 files (`hook_point`, `activation_fn_kwargs: {k}`), `rescale_acts_by_decoder_norm`
and `apply_b_dec_to_input: false`, all folded exactly into jaxsae's form.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsae.interop.fold import log_threshold, threshold_of, to_raw
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.kinds import REGISTRY
from jaxsae.sae.load import LoadedSAE

SAELENS_VERSION = "6.54.12"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# jaxsae kind -> the SAELens architecture it is written as (the kinds' registry entries)
ARCHITECTURE = {k.name: k.saelens for k in REGISTRY.values()}
# SAELens architecture -> the jaxsae kind that computes exactly it
IMPORTS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def hook_name(layer: int) -> str:
    """TransformerLens' name for the residual stream after block `layer` (0-indexed)."""
    return f"blocks.{layer}.hook_resid_post"


def hook_layer(name: str) -> int:
    """The block after which `name` reads the residual stream; other hooks are a ValueError."""
    m = _HOOK.match(name or "")
    if not m or (m.group(2) == "pre" and int(m.group(1)) == 0):
        raise ValueError(f"hook_name={name!r} is not the residual stream after a block: jaxsae splices "
                         "blocks.L.hook_resid_post (= blocks.L+1.hook_resid_pre); pass the layer explicitly "
                         "(layer=... / --layer) if you know the equivalent site")
    layer = int(m.group(1))
    return layer if m.group(2) == "post" else layer - 1


def export_saelens(sae: LoadedSAE, out_dir: str | Path, *, run_config: dict | None = None,
                   model_name: str | None = None) -> Path:
    """Writes `sae` (any scale) as a SAELens directory acting on raw activations; returns out_dir.

    run_config: the run's resolved config (its config.yaml as a dict) for context size, BOS and
    dataset metadata; model_name: overrides the model path stored in the checkpoint.
    """
    from safetensors.numpy import save_file

    cfg = sae.cfg
    raw = to_raw(cfg, sae.params, sae.scale)
    tensors = {"W_enc": raw["W_enc"], "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    theta = threshold_of(cfg, raw)
    if theta is not None:
        tensors["threshold"] = theta
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}

    rc = run_config or {}
    data = rc.get("data", {})
    include_first = data.get("include_first_position", False)
    metadata = {
        "sae_lens_version": SAELENS_VERSION,  # the format version written, so loaders skip pre-6.0 handling
        "sae_lens_training_version": None,
        "training_library": "jaxsae",
        "jaxsae_kind": cfg.kind,
        "model_name": model_name or sae.meta.get("model"),
        "hook_name": hook_name(int(sae.meta.get("hook_layer", 0))),
        "hook_head_index": None,
        "context_size": data.get("context"),
        "prepend_bos": data.get("prepend_bos"),
        "seqpos_slice": [None] if include_first else [1, None],  # jaxsae drops position 0 unless told
        "dataset_path": (data.get("source") or {}).get("path") or (data.get("source") or {}).get("kind"),
    }
    out = {"d_in": cfg.d_model, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata}
    arch = ARCHITECTURE[cfg.kind]
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out["architecture"] = arch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CFG_FILE).write_text(json.dumps(out, indent=1) + "\n")
    return out_dir


def _read_cfg(path: Path) -> dict:
    cfg = json.loads((path / CFG_FILE).read_text())
    meta = cfg.get("metadata") or {}
    major = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "0").split(".")[0]
    if not major.isdigit() or int(major) < 6:  # pre-6.0: flat keys, activation_fn_kwargs, hook_point
        meta = {**cfg, **meta}
        meta.setdefault("hook_name", cfg.get("hook_point"))
        if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
            cfg.setdefault("architecture", "topk")
            cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        cfg.setdefault("architecture", "standard")
        if isinstance(cfg.get("normalize_activations"), bool) or cfg.get("normalize_activations") is None:
            cfg["normalize_activations"] = "expected_average_only_in" if cfg.get("normalize_activations") else "none"
    cfg["metadata"] = meta
    return cfg


def import_saelens(path: str | Path, *, layer: int | None = None, model: str | None = None) -> LoadedSAE:
    """Reads a SAELens directory into a jaxsae `LoadedSAE` acting on raw activations (scale 1.0).

    layer / model override the hook layer and model path read from cfg.json's metadata.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CFG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} is not a SAELens SAE: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    c = _read_cfg(path)
    arch = c.get("architecture")
    kind = IMPORTS.get(arch)
    if kind is None:
        raise ValueError(f"{path}/{CFG_FILE}: architecture={arch!r} has no jaxsae equivalent; "
                         f"jaxsae imports {', '.join(IMPORTS)} SAEs")
    if c.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path}/{CFG_FILE}: normalize_activations={c['normalize_activations']!r} needs a "
                         "run-time norm jaxsae does not apply; fold it into the weights in SAELens first "
                         "(e.g. the activation scaler's fold) so that it reads 'none'")
    if c.get("reshape_activations", "none") != "none" or c["metadata"].get("hook_head_index") is not None:
        raise ValueError(f"{path}/{CFG_FILE}: per-head (hook_z) SAEs are not residual-stream SAEs; jaxsae "
                         "cannot splice them")
    w = {k: np.asarray(v, np.float32) for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
               if k not in w]
    if missing:
        raise ValueError(f"{path}/{WEIGHTS_FILE} lacks {missing[0]}: not a SAELens {arch} SAE")
    if "scaling_factor" in w and not np.allclose(w["scaling_factor"], 1.0):
        raise ValueError(f"{path}/{WEIGHTS_FILE} holds a finetuning scaling_factor; jaxsae cannot import it")
    d_in, d_sae = w["W_enc"].shape
    if w["W_dec"].shape != (d_sae, d_in) or (c.get("d_in", d_in), c.get("d_sae", d_sae)) != (d_in, d_sae):
        raise ValueError(f"{path}: W_enc {w['W_enc'].shape}, W_dec {w['W_dec'].shape} and cfg.json d_in/d_sae "
                         "disagree")
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    theta = w.get("threshold")
    if arch == "topk" and c.get("rescale_acts_by_decoder_norm"):
        # f = topk(pre * n), x_hat = (f / n) @ W_dec: the same SAE as encoder * n, decoder / n.
        n = np.linalg.norm(W_dec, axis=-1)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    if not c.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # jaxsae always subtracts b_dec before encoding
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = c.get("k") if arch == "topk" else None
    if arch == "topk" and not isinstance(k, int):
        raise ValueError(f"{path}/{CFG_FILE}: a topk SAE needs an integer k (or activation_fn_kwargs.k)")
    if arch == "jumprelu":
        params["log_threshold"] = log_threshold(theta)
    cfg = SAEConfig(kind=kind, d_model=int(d_in), d_sae=int(d_sae), **({"k": k} if k else {})).validate()
    params = {k_: jnp.asarray(v, jnp.float32) for k_, v in params.items()}
    hook = c["metadata"].get("hook_name")
    meta = {"phase": "imported", "sae": dataclasses.asdict(cfg), "scale": 1.0,
            "hook_layer": layer if layer is not None else (hook_layer(hook) if hook else None),
            "model": model or c["metadata"].get("model_name"),
            "source": {"format": "saelens", "path": str(path), "architecture": arch}}
    return LoadedSAE(cfg, params, 1.0, meta)
