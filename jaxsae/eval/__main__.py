"""`python -m jaxsae.eval PATH [--set key.path=value ...]`: evaluate any SAE checkpoint in its model.

PATH is a run directory (its last phase), a phase directory (`runs/x/checkpoints/mse`) or one step
(`runs/x/checkpoints/mse/500`). The model, hook layer and activation scale come from the checkpoint;
the held-out text and its packing from the run's `config.yaml` (overridable with --set).
Prints the metrics of `jaxsae.eval` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def find_run_config(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if (p / "config.yaml").exists():
            return p / "config.yaml"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxsae.eval", description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    a = ap.parse_args(argv)

    import jaxsae
    from jaxsae.config import ConfigError, load_config
    from jaxsae.eval import evaluate
    from jaxsae.models import load_lm
    from jaxsae.models.hf import CheckpointError
    from jaxsae.data.windows import eval_sequences
    from jaxsae.train.context import splice_for

    try:
        sae = jaxsae.load_sae(a.path)
        cfg = load_config(find_run_config(a.path.absolute()), a.overrides)
        lm = load_lm(sae.meta["model"], cfg.model.dtype)
        seqs = eval_sequences(cfg, lm.tokenizer)
        sp = splice_for(cfg, lm, sae.scale, sae.meta["hook_layer"])
        m = evaluate(sp, sae.cfg, sae.params, seqs, batch=cfg.eval.batch_sequences)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(a.path), "phase": sae.meta.get("phase"), **m}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
