"""`python -m jaxsae.eval PATH [--config FILE] [--set key.path=value ...]`: evaluate any SAE checkpoint in its model.

PATH is a run directory (its last phase), a phase directory (`runs/x/checkpoints/mse`) or one step
(`runs/x/checkpoints/mse/500`). The model, hook layer and activation scale come from the checkpoint;
the held-out text and its packing from the run's `config.yaml` (or --config; overridable with --set).
A checkpoint directory outside a run (an imported SAE) uses the default held-out text. A run
directory without its config.yaml is refused rather than evaluated on another text.
Prints the metrics of `jaxsae.eval` as JSON. User errors: one line, exit status 2, before any model loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxsae import cli


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m jaxsae.eval", description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--config", type=Path, default=None, help="held-out text settings (default: the run's config.yaml)")
    ap.add_argument("--sae", default=None, metavar="NAME", help="a sweep's SAE, by name (e.g. k16-s0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    a = ap.parse_args(argv)
    return cli.guarded(lambda: evaluate_path(a.path, a.config, a.overrides, a.sae))


def evaluate_path(path: Path, config: Path | None, overrides: list[str], name: str | None = None) -> int:
    from jaxsae.config import load_config

    if not path.exists():
        raise cli.UsageError(f"{path} does not exist: give a run, phase or step directory")
    cfg = load_config(config or cli.run_config_of(path), overrides)
    from jaxsae.train.preflight import check_sources

    check_sources(cfg)

    import jaxsae
    from jaxsae.data.windows import eval_sequences
    from jaxsae.eval import evaluate
    from jaxsae.models import load_lm
    from jaxsae.train.context import splice_for

    try:
        sae = jaxsae.load_sae(path, name)
    except (FileNotFoundError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    lm = load_lm(sae.meta["model"], cfg.model.dtype)
    seqs = eval_sequences(cfg, lm.tokenizer)
    sp = splice_for(cfg, lm, sae.scale, sae.meta["hook_layer"])
    m = evaluate(sp, sae.cfg, sae.params, seqs, batch=cfg.eval.batch_sequences)
    print(json.dumps({"checkpoint": str(path), "phase": sae.meta.get("phase"),
                      **({"sae": name} if name else {}), **m}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
