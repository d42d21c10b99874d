"""What every `python -m jaxsae.*` command shares: user errors end as one line on stderr and exit status 2.

    ap = cli.ArgumentParser(prog="python -m jaxsae.eval", ...)   # a usage error is one line too
    return cli.guarded(lambda: work(args))                       # UserError / OSError -> "error: ..."

`run_config_of` finds the config.yaml of the run a checkpoint path belongs to (eval and export read it).
Imports nothing heavy: a command that fails on its arguments never loads JAX.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn

from jaxsae.errors import UserError

EXIT_USER = 2


class UsageError(UserError, ValueError):
    """A bad command-line argument or path; the message names it and the fix."""


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def fail(message: str) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return EXIT_USER


def guarded(work: Callable[[], int | None]) -> int:
    """Runs `work`; a UserError, or an OSError (a file that cannot be read or written), ends as one
    line on stderr and exit status 2 instead of a traceback. Anything else is a bug and propagates."""
    try:
        return work() or 0
    except UserError as e:
        return fail(str(e))
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        return fail(f"{e}{where}: check the path and its permissions")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("error: ...; see --help"), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"error: {self.prog}: {one_line(message)}; see {self.prog} --help\n")


def run_config_of(path: Path) -> Path | None:
    """The config.yaml of the run that checkpoint `path` belongs to: `path` itself when it is a run
    directory (it has checkpoints/), or the run directory above a phase directory (run/checkpoints/mse)
    or a step directory (run/checkpoints/mse/500). None for a checkpoint directory outside a run (an
    imported SAE). A run directory without its config.yaml is a UsageError: nothing else says how its
    held-out text was built, and no other directory's config is guessed."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir() or (path / "widths").is_dir():  # widths/: a sweep over widths
        run = path
    elif path.parent.name == "checkpoints":
        run = path.parent.parent
    elif path.name.isdigit() and path.parent.parent.name == "checkpoints":
        run = path.parent.parent.parent
    else:
        return None
    if not (run / "config.yaml").is_file():
        raise UsageError(f"run directory {run} has no config.yaml (it says how the run's held-out text is built): "
                         "restore it from the run, or pass --config FILE")
    return run / "config.yaml"
