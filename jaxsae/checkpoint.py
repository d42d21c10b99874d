"""Orbax checkpoints: one `CheckpointManager` per training phase, with two items.

- `state`: the train state pytree (SAE params, optimizer state, step, dead-latent counters, RNG);
- `meta`: JSON (phase, step, tokens, the reader's position, the SAE config and store scale).

Saves are atomic (Orbax writes to a temporary directory and renames), so a run killed at any moment
restores the last finished checkpoint. Restoring goes through an abstract target that carries the
current shardings, so a checkpoint written on one mesh restores onto another.

A finished step can still be damaged later (a truncated data file, a deleted item or metadata
file). Restoring without naming a step therefore walks back from the newest step to the newest one
that restores, says so on stderr in one line, and (when resuming) moves the unreadable newer steps
aside to `<step>.unreadable` so that the resumed run can save those steps again: Orbax silently
skips a save whose step is not above the newest one on disk. Nothing is deleted.

A Checkpointer only ever deletes (through `keep`) steps older than ones it saved itself: it refuses
to write into a directory that holds anything but jaxsae checkpoints, or a step older than one
already there (the import that wiped a run's checkpoints through `keep=1`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxsae.errors import UserError

ITEMS = ("state", "meta")
UNREADABLE = ".unreadable"  # suffix of a step directory set aside by a resume
_TMP = ".orbax-checkpoint-tmp"  # Orbax's in-progress saves


class CheckpointError(UserError, RuntimeError):
    """No readable checkpoint, a step that does not restore, or a directory we must not write into."""


def check_keep(keep: Any) -> int:
    """`keep` (checkpoints kept per phase) as an int >= 1; a ValueError naming the setting otherwise."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint.keep={keep!r} must be an integer >= 1: the number of checkpoints kept per "
                         "phase (1 keeps only the newest)")
    return keep


class Restored(NamedTuple):
    state: Any
    meta: dict
    step: int  # the step actually restored


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _ours(p: epath.Path) -> bool:
    """A step directory with our items, one set aside, or an Orbax save in progress."""
    if _TMP in p.name:
        return True
    step, aside, _ = p.name.partition(UNREADABLE)
    if aside:
        return step.isdigit()
    return p.name.isdigit() and p.is_dir() and any((p / i).exists() for i in ITEMS)


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        d = str(directory)
        # a URL (gs://...) as given: on a pod every process writes its shards there
        self.directory = epath.Path(d) if "://" in d else epath.Path(Path(d).absolute())
        self.keep = check_keep(keep)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self._saved: set[int] = set()
        self._writable = False

    # -- steps ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finished step on disk (None: none), whether or not it still restores; resume
        with `restore_latest_readable`, which tells which step it actually used."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving --------------------------------------------------------------------------------
    def _check_writable(self, step: int) -> None:
        if not self._writable:
            d = self.directory
            foreign = [p.name for p in d.iterdir() if not _ours(p)] if d.exists() else []
            if foreign:
                shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
                raise CheckpointError(f"refusing to write checkpoints into {d}: it holds {shown}, which are not "
                                      "jaxsae checkpoints (Orbax would manage, and delete, steps there); use an "
                                      "empty or new directory")
            self._writable = True
        latest = self.latest_step()
        if latest is not None and step not in self._saved and step <= latest:
            raise CheckpointError(f"refusing to save step {step} into {self.directory}: it already holds step {latest} "
                                  f"from an earlier run, and Orbax would skip this save or, with keep={self.keep}, "
                                  "delete the newer steps; use an empty directory or move those steps away")

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        self._check_writable(step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)
        self._saved.add(step)

    # -- restoring -----------------------------------------------------------------------------
    def _newest_readable(self, load: Callable[[int], Any], what: str) -> tuple[Any, int, list[tuple[int, str]]]:
        """(load(step), step, [(newer unreadable step, why)]) for the newest step that loads."""
        bad: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return load(step), step, bad
            except Exception as e:  # noqa: BLE001 - any failure to read a step makes it unreadable
                bad.append((step, _reason(e)))
        if not bad:
            raise CheckpointError(f"no checkpoint in {self.directory}: nothing to restore")
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({what}): "
                              + "; ".join(f"step {s}: {why}" for s, why in bad)
                              + ". Restore the files, or delete the directory to start this phase afresh")

    def _report(self, bad: list[tuple[int, str]], used: int, moved: bool) -> None:
        if bad:
            steps = ", ".join(str(s) for s, _ in bad)
            aside = f"; moved aside as <step>{UNREADABLE}" if moved else ""
            _say(f"checkpoint step(s) {steps} in {self.directory} unreadable ({bad[0][1]}); using step {used}{aside}")

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `<step>.unreadable` (process 0), so those steps can be
        saved again; then every process re-lists the directory."""
        from jaxsae.distributed import barrier

        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst, n = self.directory / f"{s}{UNREADABLE}", 1
                while dst.exists():
                    dst, n = self.directory / f"{s}{UNREADABLE}-{n}", n + 1
                src.rename(dst)
        barrier("jaxsae-checkpoint-set-aside")
        self.manager.reload()

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest_readable(self, abstract_state: Any, set_aside: bool = True,
                                check: Callable[[Any], None] | None = None) -> Restored:
        """The newest step that restores onto ``abstract_state``, as (state, meta, step).

        Unreadable newer steps are reported on stderr in one line and, with ``set_aside``, renamed to
        `<step>.unreadable` so the resumed run can save them again. ``check(state)``: raises when a
        restored state is unusable (say, params that are not finite); that step counts as unreadable.
        CheckpointError naming the directory if there is no step, or none restores."""
        def load(s: int) -> tuple[Any, dict]:
            state, meta = self._restore_step(s, abstract_state)
            if check is not None:
                check(state)
            return state, meta

        (state, meta), step, bad = self._newest_readable(load, "state")
        if bad and set_aside:
            self._set_aside([s for s, _ in bad])
        self._report(bad, step, bool(bad) and set_aside)
        return Restored(state, meta, step)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding) or arrays like the state.

        step None: `restore_latest_readable` (falls back past unreadable steps; its `.step` says which
        was used). An explicit step restores exactly that step, or raises CheckpointError."""
        if step is None:
            return tuple(self.restore_latest_readable(abstract_state)[:2])
        try:
            return self._restore_step(step, abstract_state)
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable ({_reason(e)}); "
                                  "restore with step=None to use the newest readable step") from e

    def restore_meta(self, step: int | None = None) -> dict:
        """The `meta` item of ``step`` (None: of the newest step whose meta reads; read-only)."""
        def load(s: int) -> dict:
            return self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

        if step is not None:
            return load(step)
        meta, used, bad = self._newest_readable(load, "meta")
        self._report(bad, used, False)
        return meta

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict]:
        """The state as saved (numpy/jax arrays on the default device), for analysis; step None: the
        newest readable step (read-only: nothing is moved aside)."""
        def load(s: int) -> tuple[Any, dict]:
            out = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            return out["state"], out["meta"]

        if step is not None:
            return load(step)
        out, used, bad = self._newest_readable(load, "state")
        self._report(bad, used, False)
        return out

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
