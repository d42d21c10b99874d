"""Restoring a trained SAE alone, for analysis: `jaxsae.load_sae(run_dir_or_checkpoint)`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsae.sae.config import SAEConfig


@dataclasses.dataclass
class LoadedSAE:
    """An SAE with its activation scale. encode/decode take and give raw (unnormalised) activations."""

    cfg: SAEConfig
    params: dict
    scale: float
    meta: dict

    @property
    def module(self):
        from jaxsae.sae import make_sae

        return make_sae(self.cfg)

    def encode(self, x) -> jnp.ndarray:
        """x: f32[..., d_model] raw activations -> f32[..., d_sae]."""
        return self.module.apply({"params": self.params}, jnp.asarray(x) / self.scale, method="encode")

    def decode(self, f) -> jnp.ndarray:
        """f32[..., d_sae] -> f32[..., d_model] in the raw activation scale."""
        return self.module.apply({"params": self.params}, jnp.asarray(f), method="decode") * self.scale


def checkpoint_dir(path: Path):
    """Accepts a run dir, a phase dir (checkpoints/mse) or a step dir (checkpoints/mse/500)."""
    from jaxsae.checkpoint import Checkpointer

    if (path / "checkpoints").is_dir():
        from jaxsae.phases import sae_phases

        for phase in reversed([p.name for p in sae_phases()]):  # the last phase that ran
            d = path / "checkpoints" / phase
            if d.is_dir() and Checkpointer(d).latest_step() is not None:
                return d, None
        raise FileNotFoundError(f"{path}/checkpoints holds no finished checkpoint")
    if path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    if path.is_dir():
        return path, None
    raise FileNotFoundError(f"{path} is neither a run directory nor a checkpoint directory")


def width_members(path: Path) -> dict[str, Path]:
    """A run of a sweep over widths (`jaxsae.sweep.width_groups`): member name -> the run directory of its
    width group (`<run>/widths/d<d_sae>`), in the sweep's order; {} for any other path."""
    if not (path / "widths").is_dir() or not (path / "config.yaml").exists():
        return {}
    import yaml

    from jaxsae.config import load_config
    from jaxsae.sweep import members, width_groups

    cfg = load_config(base=yaml.safe_load((path / "config.yaml").read_text()))
    return {m.name: path / "widths" / f"d{w}" for w, g in width_groups(cfg) for m in members(g)}


def sweep_names(meta: dict) -> list[str]:
    """The member names of a sweep's checkpoint ([] for one SAE's)."""
    return [m["name"] for m in meta.get("sweep", [])]


def load_sae(path: str | Path, name: str | None = None) -> LoadedSAE:
    """The SAE of a run dir (its last phase's), a phase dir or a step dir. A sweep's checkpoints hold
    every member stacked: `name` (e.g. "k16-s0") picks one, with its own config (its k)."""
    from jaxsae.checkpoint import Checkpointer

    groups = width_members(Path(path))
    if groups:  # each width trained as a sweep of its own, in its own run directory
        if name not in groups:
            raise ValueError(f"{path} holds a sweep of {len(groups)} SAEs ({', '.join(groups)}): name one of them "
                             f"(load_sae(path, name), or --sae NAME)" if name is None else
                             f"{path} holds no SAE named {name!r}: its sweep has {', '.join(groups)}")
        return load_sae(groups[name], name)
    d, step = checkpoint_dir(Path(path))
    state, meta = Checkpointer(d).restore_raw(step)
    names = sweep_names(meta)
    if names and name is None:
        raise ValueError(f"{path} holds a sweep of {len(names)} SAEs ({', '.join(names)}): name one of them "
                         f"(load_sae(path, name), or --sae NAME)")
    if name is not None and name not in names:
        raise ValueError(f"{path} holds no SAE named {name!r}: " + (f"its sweep has {', '.join(names)}" if names
                                                                     else "it is a single SAE (leave the name out)"))
    if names:
        i = names.index(name)
        cfg = SAEConfig(**meta["sweep"][i]["sae"])
        params = {k: jnp.asarray(np.asarray(v)[i]) for k, v in state["params"].items()}
        meta = {**meta, "sae": meta["sweep"][i]["sae"], "sae_name": name}
    else:
        cfg = SAEConfig(**meta["sae"])
        params = {k: jnp.asarray(np.asarray(v)) for k, v in state["params"].items()}
    return LoadedSAE(cfg, params, float(meta["scale"]), meta)
