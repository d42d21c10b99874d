"""Interop with SAELens and dictionary_learning: export jaxsae SAEs, import theirs.

    from jaxsae import load_sae
    from jaxsae.interop import export, load, save_jaxsae
    export(load_sae("runs/x"), "out/x-saelens", "saelens", run_config=...)   # or "dictionary_learning"
    sae = load("path/to/public_sae")            # format detected from the files; a LoadedSAE, scale 1.0
    save_jaxsae(sae, "out/imported")            # then jaxsae.load_sae / python -m jaxsae.eval read it

Exported weights act on raw activations (the training scale is folded in, `fold.py`) and give the
same latents as `LoadedSAE.encode`. A public SAE starts the KL fine-tune with the run config keys
`finetune.init_from` (+ `finetune.init_format`) and `phases: [finetune]`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxsae.interop.dictionary_learning import export_dictionary_learning, import_dictionary_learning
from jaxsae.interop.fold import to_raw, to_scale
from jaxsae.interop.saelens import export_saelens, import_saelens
from jaxsae.sae.config import ARCHITECTURE_FIELDS, SAEConfig
from jaxsae.sae.load import LoadedSAE

FORMATS = ("jaxsae", "saelens", "dictionary_learning")


def detect_format(path: str | Path) -> str:
    """'saelens' (cfg.json + sae_weights.safetensors), 'dictionary_learning' (ae.pt or a .pt file) or
    'jaxsae' (a run, phase or checkpoint directory); anything else is a FileNotFoundError naming both."""
    p = Path(path)
    if (p / "cfg.json").exists() and (p / "sae_weights.safetensors").exists():
        return "saelens"
    if (p / "ae.pt").exists() or (p.is_file() and p.suffix == ".pt"):
        return "dictionary_learning"
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "state").exists()
                       or any(c.is_dir() and c.name.isdigit() for c in p.iterdir())):
        return "jaxsae"
    raise FileNotFoundError(f"{p} holds no SAE jaxsae can read: expected a SAELens directory (cfg.json + "
                            "sae_weights.safetensors), a dictionary_learning one (ae.pt + config.json) or a "
                            "jaxsae run/checkpoint directory")


def load(path: str | Path, fmt: str | None = None, **kw) -> LoadedSAE:
    """Any supported SAE as a LoadedSAE. fmt: one of FORMATS or None (detected). kw: layer=, model=."""
    fmt = fmt or detect_format(path)
    if fmt == "saelens":
        return import_saelens(path, **kw)
    if fmt == "dictionary_learning":
        return import_dictionary_learning(path, **kw)
    if fmt == "jaxsae":
        from jaxsae.sae.load import load_sae

        return load_sae(path)
    raise ValueError(f"format {fmt!r} is unknown: choose one of {', '.join(FORMATS)}")


def export(sae: LoadedSAE, out_dir: str | Path, fmt: str, **kw) -> Path:
    """Writes `sae` in `fmt` ('saelens' or 'dictionary_learning'). kw: run_config=, model_name=."""
    if fmt == "saelens":
        return export_saelens(sae, out_dir, **kw)
    if fmt == "dictionary_learning":
        return export_dictionary_learning(sae, out_dir, **kw)
    raise ValueError(f"export format {fmt!r} is unknown: choose saelens or dictionary_learning")


def save_jaxsae(sae: LoadedSAE, out_dir: str | Path) -> Path:
    """Writes `sae` as a one-step jaxsae checkpoint directory that `jaxsae.load_sae(out_dir)` restores."""
    from jaxsae.checkpoint import Checkpointer

    ckpt = Checkpointer(out_dir, keep=1)
    try:
        meta = {**sae.meta, "sae": dataclasses.asdict(sae.cfg), "scale": float(sae.scale)}
        ckpt.save(0, {"params": dict(sae.params)}, meta, force=True)
    finally:
        ckpt.close()
    return Path(out_dir)


def load_init(path: str | Path, fmt: str | None, run_sae: SAEConfig, layer: int) -> LoadedSAE:
    """The SAE a fine-tune starts from (`finetune.init_from`), checked against the run.

    The architecture (`ARCHITECTURE_FIELDS`: kind, d_sae, k, Matryoshka groups) comes from the file; the
    training settings (l1_coeff, l0_coeff, auxk_coeff, bandwidth, dtype, ...) from the run's `sae:` section.
    A d_model other than the model's or a hook layer other than the run's `hook.layer` is a ValueError
    naming both.
    """
    sae = load(path, fmt or None)
    file_layer = sae.meta.get("hook_layer")
    if file_layer is not None and int(file_layer) != layer:
        raise ValueError(f"finetune.init_from={path} was trained after block {file_layer} but hook.layer={layer}: "
                         f"set hook.layer={file_layer}")
    if sae.cfg.d_model != run_sae.d_model:
        raise ValueError(f"finetune.init_from={path} is an SAE of d_in={sae.cfg.d_model} but the model's "
                         f"residual stream has d_model={run_sae.d_model}: use an SAE trained on this model")
    arch = {k: getattr(sae.cfg, k) for k in ARCHITECTURE_FIELDS}
    cfg = dataclasses.replace(run_sae, **arch).validate()
    return dataclasses.replace(sae, cfg=cfg)


__all__ = ["FORMATS", "detect_format", "load", "export", "save_jaxsae", "load_init", "to_raw", "to_scale",
           "export_saelens", "import_saelens", "export_dictionary_learning", "import_dictionary_learning"]
