"""`python -m jaxsae.train --config configs/NAME.yaml [--set key.path=value ...] [--run-dir DIR]`.

Parses and checks the config, initialises distributed JAX when the environment asks for it, logs the
device layout and hands over to `jaxsae.train.pipeline`. A user error (a config key, a file, a busy run
directory, a run that diverged) ends with one line on stderr and exit status 2, no traceback; the
errors found before compute leave the run directory as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxsae import cli


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m jaxsae.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML file (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one config value; repeatable")
    ap.add_argument("--run-dir", default=None,
                    help="default: runs/<name>; a gs://... URL on a multi-host pod (checkpoints and store there)")
    a = ap.parse_args(argv)
    return cli.guarded(lambda: train(a.config, a.overrides, a.run_dir))


def train(config: str, overrides: list[str], run_dir: str | None) -> int:
    from jaxsae.config import ConfigError, load_config

    cfg = load_config(config, overrides, require_size=True)  # before JAX starts: config errors are instant
    from jaxsae.distributed import maybe_initialize

    try:
        maybe_initialize()  # before anything touches a device
    except ValueError as e:
        raise ConfigError(str(e)) from e
    import jax

    print(f"jaxsae: {jax.process_count()} process(es), devices {jax.devices()}", flush=True)
    from jaxsae.train.pipeline import run

    run(cfg, run_dir or Path("runs") / cfg.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
