"""`python -m jaxsae.interop export RUN_DIR OUT_DIR --format saelens|dictionary_learning`
and `python -m jaxsae.interop import PATH OUT_DIR [--format ...] [--layer L] [--model PATH]`.

export: a jaxsae run, phase or checkpoint directory -> SAELens or dictionary_learning files acting on raw
activations. import: SAELens / dictionary_learning files -> a jaxsae checkpoint directory that
`jaxsae.load_sae` and `python -m jaxsae.eval` read (--model names a model jaxsae can load when the
file's model name is not one, e.g. an HF hub id or a local directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxsae.interop", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="jaxsae checkpoint -> SAELens / dictionary_learning")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("out_dir", type=Path)
    ex.add_argument("--format", required=True, choices=("saelens", "dictionary_learning"))
    ex.add_argument("--model-name", help="model name to record (default: the checkpoint's model path)")
    im = sub.add_parser("import", help="SAELens / dictionary_learning -> jaxsae checkpoint")
    im.add_argument("path", type=Path)
    im.add_argument("out_dir", type=Path)
    im.add_argument("--format", choices=("saelens", "dictionary_learning"), help="default: detected")
    im.add_argument("--layer", type=int, help="hook layer, if the files' hook name is not a residual hook")
    im.add_argument("--model", help="model path or hub id jaxsae should load for this SAE")
    a = ap.parse_args(argv)

    import yaml

    from jaxsae import interop
    from jaxsae.eval import find_run_config

    try:
        if a.cmd == "export":
            from jaxsae import load_sae

            sae = load_sae(a.run_dir)
            rc_path = find_run_config(a.run_dir.absolute())
            rc = yaml.safe_load(rc_path.read_text()) if rc_path else None
            out = interop.export(sae, a.out_dir, a.format, run_config=rc, model_name=a.model_name)
        else:
            from jaxsae.models.shipped import resolve_model_path

            model = resolve_model_path(a.model) if a.model else None  # "shipped" -> its directory
            sae = interop.load(a.path, a.format, layer=a.layer, model=model)
            out = interop.save_jaxsae(sae, a.out_dir)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "kind": sae.cfg.kind, "d_model": sae.cfg.d_model, "d_sae": sae.cfg.d_sae,
                      "hook_layer": sae.meta.get("hook_layer"), "model": sae.meta.get("model")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
