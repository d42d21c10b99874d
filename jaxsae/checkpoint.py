"""Orbax checkpoints: one `CheckpointManager` per training phase, with two items.

- `state`: the train state pytree (SAE params, optimizer state, step, dead-latent counters, RNG);
- `meta`: JSON (phase, step, tokens, the reader's position, the SAE config and store scale).

Saves are atomic (Orbax writes to a temporary directory and renames), so a run killed at any moment
restores the last finished checkpoint. Restoring goes through an abstract target that carries the
current shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        d = str(directory)
        # a URL (gs://...) as given: on a pod every process writes its shards there
        self.directory = epath.Path(d) if "://" in d else epath.Path(Path(d).absolute())
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding) or arrays like the state."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict]:
        """The state as saved (numpy/jax arrays on the default device), for analysis."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
