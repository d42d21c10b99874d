"""Checks of the files a run will use, before anything is loaded or written (`jaxsae.train.context.plan`).

Each raises one user error (ConfigError, CheckpointError, StoreError, CorruptFileError) naming the file
or key and the fix: the run directory (a directory, writable, its metrics readable), the model's
files (config.json, the weights' headers and shapes), the text sources, an existing store (its
manifest), the experiment tracker's package, and the SAE of finetune.init_from (a unit-norm decoder where the fine-tune keeps one).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jaxsae import config as C


def check_run_dir(run_dir: Path) -> None:
    """The run directory is (or can be created as) a writable directory; its metrics.jsonl parses."""
    from jaxsae.rundir import read_jsonl

    here = base = Path(os.path.abspath(run_dir))
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        what = "is a file" if base == here else f"lies under {base}, which is a file"
        raise C.ConfigError(f"--run-dir {run_dir} {what}, not a directory: choose another --run-dir")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".jaxsae-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise C.ConfigError(f"run directory {run_dir} is not writable ({base}: {e.strerror}): fix its permissions "
                            "or choose another --run-dir") from None
    p = here / "metrics.jsonl"  # appended to in place (the other files are replaced whole)
    if p.exists() and not os.access(p, os.W_OK):
        raise C.ConfigError(f"{p} is read-only: fix its permissions or choose another --run-dir")
    read_jsonl(p)  # CorruptFileError naming a damaged line


def check_model_files(path: Path, mcfg) -> None:
    """The weights' headers parse, no safetensors file is truncated, and every tensor config.json implies
    is there with its shape (no tensor data is read). A PyTorch-only checkpoint is checked on loading."""
    from flax import traverse_util

    from jaxsae.models import hf
    from jaxsae.models.lm import abstract_params

    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        return
    weights = hf.open_weights(path)
    expected = traverse_util.flatten_dict(abstract_params(mcfg), sep="/")
    hf.check_weights(mcfg, weights, {k: v.shape for k, v in expected.items()})


def check_sources(cfg: C.RunConfig) -> None:
    """data.source and data.eval_source: a known kind with valid keys, files that exist, `datasets`
    installed for kind hf."""
    from jaxsae.data.text import check_source

    for key in ("source", "eval_source"):
        try:
            check_source(getattr(cfg.data, key))
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            raise C.ConfigError(f"data.{key}: {e}") from None


def check_existing_store(store_path: str) -> None:
    """A complete store opens: its manifest's files exist with their sizes (a truncated shard fails)."""
    from jaxsae.data.store import open_store

    open_store(store_path)


def check_init(init) -> None:
    """The SAE of finetune.init_from can be re-expressed as the fine-tune trains it (`interop.to_scale`):
    a unit-norm-decoder kind needs rows of one common norm."""
    from jaxsae.interop.fold import unit_rows

    try:
        unit_rows(init.cfg, init.params)
    except ValueError as e:
        raise C.ConfigError(f"finetune.init_from: {e}") from None


def check_tracker(cfg: C.RunConfig) -> None:
    """tracker.kind's package is installed (`jaxsae.tracking.check`); the message names the extra."""
    from jaxsae.tracking import check

    check(cfg.tracker)
