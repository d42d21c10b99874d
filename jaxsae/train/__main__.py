"""`python -m jaxsae.train --config configs/NAME.yaml [--set key.path=value ...] [--run-dir DIR]`.

Parses and checks the config, initialises distributed JAX when the environment asks for it, logs the
device layout and hands over to `jaxsae.train.pipeline`. User errors end with one line, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxsae.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML file (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one config value; repeatable")
    ap.add_argument("--run-dir", default=None,
                    help="default: runs/<name>; a gs://... URL on a multi-host pod (checkpoints and store there)")
    a = ap.parse_args(argv)

    from jaxsae.config import ConfigError, load_config
    from jaxsae.data.store import StoreError
    from jaxsae.models.hf import CheckpointError

    try:
        cfg = load_config(a.config, a.overrides)
        run_dir = a.run_dir or Path("runs") / cfg.name
        from jaxsae.distributed import maybe_initialize

        try:
            maybe_initialize()  # before anything touches a device
        except ValueError as e:
            raise ConfigError(str(e)) from e
        import jax

        print(f"jaxsae: {jax.process_count()} process(es), devices {jax.devices()}", file=sys.stderr)
        from jaxsae.train.pipeline import run

        run(cfg, run_dir)
    except (ConfigError, StoreError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
