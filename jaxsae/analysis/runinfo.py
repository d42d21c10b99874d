"""What an analysis needs to know about a finished run, read and checked before any compute.

A run directory (written by `python -m jaxsae.train`) holds `config.yaml` and
`checkpoints/<phase>/<step>/` (Orbax, with a JSON `meta` item naming the SAE config, the store scale,
the model and the hook layer). `inspect_run` reads only those small files, so every user error (no
run, no checkpoint, a feature index past d_sae, no store) is reported before a weight is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxsae import config as C
from jaxsae.errors import UserError


class AnalysisError(UserError, ValueError):
    """A user error in an analysis request; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """The facts of a run that an analysis uses.

    checkpoint: the phase directory whose latest step is analysed (fine-tune if present, else MSE).
    include_first: whether position 0 of a packed context counts (the training rule, `data.include_first_position`).
    """

    run_dir: Path
    cfg: C.RunConfig
    checkpoint: Path
    meta: dict
    model_path: str
    layer: int
    d_sae: int

    @property
    def phase(self) -> str:
        return self.meta.get("phase", self.checkpoint.name)

    @property
    def include_first(self) -> bool:
        return self.cfg.data.include_first_position

    @property
    def store_path(self) -> str:
        return self.cfg.store.path or str(self.run_dir / "store")


def _latest_phase(run_dir: Path) -> Path:
    from jaxsae.sae.load import checkpoint_dir

    root = run_dir / "checkpoints"
    if not root.is_dir():
        raise AnalysisError(f"{run_dir} has no checkpoints/ directory: point at a run directory written by "
                            "`python -m jaxsae.train` (it needs at least one finished phase)")
    try:
        return checkpoint_dir(run_dir)[0]
    except FileNotFoundError:
        raise AnalysisError(f"{root} holds no finished checkpoint: let the run save one (checkpoint.every_steps) "
                            "or finish it, then analyse again") from None


def inspect_run(run_dir: str | Path) -> RunInfo:
    """Reads config.yaml and the latest checkpoint's meta; raises AnalysisError naming the fix."""
    from jaxsae.checkpoint import Checkpointer
    from jaxsae.models.shipped import resolve_model_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory {run_dir} does not exist")
    ckpt = _latest_phase(run_dir)
    meta = Checkpointer(ckpt).restore_meta()
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise AnalysisError(f"run directory {run_dir} has no config.yaml (it says which text, store and model the "
                            "run used): restore it from the run")
    try:
        cfg = C.load_config(cfg_file)
    except C.ConfigError as e:
        raise AnalysisError(f"{cfg_file}: {e}") from e
    # config.yaml names the model as the user gave it ("shipped" resolves on any machine)
    model = resolve_model_path(cfg.model.path)
    layer = int(meta.get("hook_layer", cfg.hook.layer))
    return RunInfo(run_dir, cfg, ckpt, meta, str(model), layer, int(meta["sae"]["d_sae"]))


def check_features(features: list[int], d_sae: int) -> list[int]:
    """Features in the order given, without repeats; AnalysisError for one outside 0..d_sae-1."""
    if not features:
        raise AnalysisError("no features requested: pass --features with one or more indices")
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise AnalysisError(f"feature {bad[0]} is out of range: this SAE has d_sae={d_sae} features, "
                            f"indices 0..{d_sae - 1}")
    return list(dict.fromkeys(int(f) for f in features))
