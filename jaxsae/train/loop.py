"""The loop every training phase runs: resume or start, step, log, checkpoint, show progress.

A run directory holds:
    config.yaml           the resolved config
    store/                the activation store (unless store.path points elsewhere)
    checkpoints/<phase>/  Orbax checkpoints of each training phase (jaxsae.phases lists them)
    metrics.jsonl         one line per logged step: phase, step, tokens, losses, l0, lr, tokens/s
    eval.json             evaluation after every phase
    run.lock              who runs in it now (`jaxsae.rundir.RunDirLock`, held for the whole run)

Starting the same command again resumes: a complete store is reused, an incomplete one resumes
collection, and each phase continues from its newest readable checkpoint (or is skipped when finished).
A checkpoint records everything that shapes its phase's trajectory (`trajectory`); a resume whose config
differs in any of it stops, naming the key and the value on disk. Every step's metrics are checked
(finite, and by the divergence guard, `jaxsae.train.guard`) before its checkpoint is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsae import config as C
from jaxsae.checkpoint import Checkpointer
from jaxsae.rundir import append_jsonl, atomic_write_text, read_json, read_jsonl, write_jsonl
from jaxsae.sharding import abstract_with
from jaxsae.train.guard import Guard, TrainingError

__all__ = ["TrainingError", "MetricsLog", "PhaseLoop", "StepParts", "check_resume", "run_steps", "write_eval"]


class MetricsLog:
    """metrics.jsonl: one JSON line per logged step, appended (a torn last line, left by a kill, is cut
    off first); on resume, the lines past the restored step are dropped. `guard`: the divergence guard
    settings (config `guard:`) that every phase's steps are checked against. `tracker`: where every
    line is mirrored (config `tracker:`, `jaxsae.tracking`); the steps a resume drops and computes again
    are not sent to it twice."""

    def __init__(self, path: Path, enabled: bool = True, guard: C.GuardCfg = C.GuardCfg(), tracker=None):
        from jaxsae.tracking import NullTracker

        self.path = path
        self.enabled = enabled  # False on every process but the first: metrics are logged once
        self.guard = guard
        self.tracker = tracker if tracker is not None and enabled else NullTracker()
        self.tracked: dict[str, int] = {}  # phase -> the last step the tracker has from a killed run

    def rewind(self, phase: str, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        records = read_jsonl(self.path)
        keep = [r for r in records if not (r.get("phase") == phase and r.get("step", 0) > step)]
        dropped = [r.get("step", 0) for r in records if r.get("phase") == phase and r.get("step", 0) > step]
        if dropped:
            self.tracked[phase] = max(dropped)
        if len(keep) != len(records) or not self.path.read_bytes().endswith(b"\n"):
            write_jsonl(self.path, keep)

    def has(self, phase: str) -> bool:
        """Whether a line of `phase` was logged already."""
        return any(r.get("phase") == phase for r in read_jsonl(self.path))

    def write(self, record: dict) -> None:
        if self.enabled:
            if record.get("step", 0) > self.tracked.get(record.get("phase"), -1):
                self.tracker.log(record)
            append_jsonl(self.path, record)


class PhaseLoop:
    """Drives one phase's steps: logs step N-1's metrics after dispatching step N (the host never
    stalls the device), stops on a NaN naming the step, checkpoints, shows progress."""

    def __init__(self, phase: str, total_steps: int, tokens_per_step: int, log: MetricsLog,
                 ckpt: Checkpointer, every: int, start_step: int, log_every: int = 10,
                 names: list[str] | None = None):
        self.phase, self.total, self.tps = phase, total_steps, tokens_per_step
        self.log, self.ckpt, self.every, self.log_every = log, ckpt, every, log_every
        self.start = start_step
        # a sweep's metrics have a leading SAE axis: each member is checked and logged on its own line
        self.names = names
        self.guards = {n: Guard(phase if n is None else f"{phase} ({n})", log.guard, start_step)
                       for n in (names or [None])}
        self.guard = next(iter(self.guards.values()))
        self.t0 = time.time()
        self.pending: tuple[int, Any] | None = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=phase, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0,
                        mininterval=1.0)
        self.last: dict[str, float] = {}
        # Testing hook: seconds to sleep per step, so a kill can land mid-phase in resume tests.
        self.delay = float(os.environ.get("JAXSAE_STEP_DELAY", "0"))

    def _flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        got = jax.device_get(metrics)
        rows = ([(None, {k: float(v) for k, v in got.items()})] if self.names is None else
                [(n, {k: float(v[i]) for k, v in got.items()}) for i, n in enumerate(self.names)])
        elapsed = time.time() - self.t0
        rate = (step - self.start) * self.tps / max(elapsed, 1e-9)
        for name, m in rows:
            who = self.phase if name is None else f"{self.phase} ({name})"
            bad = [k for k, v in m.items() if not math.isfinite(v)]
            if bad:
                raise TrainingError(f"{who} step {step}: {', '.join(bad)} is not finite ({m[bad[0]]}); lower "
                                    f"{self.guard.phase_section()}.lr or check the activations' normalisation")
            self.guards[name].check(step, m)
            if step % self.log_every == 0 or step == self.total:
                self.log.write({"phase": self.phase, **({} if name is None else {"sae": name}), "step": step,
                                "tokens": step * self.tps, **{k: round(v, 6) for k, v in m.items()},
                                "perf/tokens_per_s": round(rate, 1)})
        m = {k: float(np.mean([r[1][k] for r in rows])) for k in rows[0][1]}  # the bar shows the mean
        self.last = m
        post = {"tok/s": f"{rate:,.0f}", "tokens": f"{step * self.tps:,}"}
        if "train/loss" in m:
            post["loss"] = f"{m['train/loss']:.4f}"
        if "train/l0" in m:
            post["L0"] = f"{m['train/l0']:.1f}"
        self.bar.set_postfix(post, refresh=False)

    def after_step(self, step: int, metrics: Any, state: Any, meta: dict) -> None:
        """Call right after dispatching step `step` (1-based count of finished steps)."""
        self._flush()
        self.pending = (step, metrics)
        self.bar.update(1)
        if self.delay:
            time.sleep(self.delay)
        if step % self.every == 0 or step == self.total:
            # a checkpoint is written only once its step's metrics are checked finite, and its params
            # too (a step's metrics come from the params before its update): a NaN is never saved, so a
            # rerun never finds a "finished" phase that diverged at its last step
            self._flush()
            bad = nonfinite_params(state, self.names)
            if bad:
                raise TrainingError(f"{self.phase} step {step}: the updated params {bad} are not finite; lower "
                                    f"{self.guard.phase_section()}.lr or check the activations' normalisation")
            self.ckpt.save(step, state, {**meta, "step": step, "tokens": step * self.tps})

    def finish(self) -> dict[str, float]:
        self._flush()
        self.ckpt.wait()
        self.bar.close()
        return self.last


def nonfinite_params(state: dict, names: list[str] | None = None) -> str:
    """'' if every float leaf of state["params"] (and of an adapter phase's frozen SAE) is finite, else
    the first leaf that is not, by its path (and a sweep's member, by name)."""
    trees = {k: state[k] for k in ("params", "frozen") if k in state}
    leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
    # a sweep's leaves have a leading SAE axis: one verdict per member, so the error can name it
    ok = jax.device_get([jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) if names
                         else jnp.all(jnp.isfinite(x)) for _, x in leaves])
    for (p, _), good in zip(leaves, ok):
        good = np.atleast_1d(good)
        if not good.all():
            who = f" of {names[int(np.argmin(good))]}" if names else ""
            return jax.tree_util.keystr(p) + who
    return ""


def check_eval(phase: str, metrics: dict) -> None:
    """TrainingError naming `phase` if an evaluation metric is not finite (eval.json never holds NaN)."""
    if metrics and all(isinstance(v, dict) for v in metrics.values()):  # a sweep's: name -> metrics
        for name, m in metrics.items():
            check_eval(f"{phase} ({name})", m)
        return
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingError(f"{phase}: evaluation gave {bad[0]}={metrics[bad[0]]} (not finite), so its SAE is "
                            f"broken: lower {phase}'s lr, or see metrics.jsonl for where training went wrong")


def write_eval(run_dir: Path, phase: str, metrics: dict) -> None:
    """Adds `phase`'s metrics to eval.json (atomically; a damaged eval.json is set aside and rebuilt)."""
    if jax.process_index() != 0:  # written once
        return
    check_eval(phase, metrics)
    path = run_dir / "eval.json"
    data = read_json(path, {}, recover=True)
    data[phase] = metrics
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


class StepParts(NamedTuple):
    """A phase's optimizer, abstract state, shardings and jit step: the trainer and `jaxsae.aot` build
    the step from the same function, so the ahead-of-time check compiles what the trainer runs."""

    total: int
    tx: Any
    abstract: Any  # the state's ShapeDtypeStructs
    state_sh: Any
    batch_sh: Any
    step: Any
    probe_sh: Any = None  # the sharding of a KL step's fourth argument, the L1 controller's probe; None: none


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and scalars are leaves)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: list(v) if isinstance(v, tuple) else v})
    return out


def check_resume(ckpt: Checkpointer, phase: str, trajectory: dict) -> int:
    """The step to resume `phase` from (0: none). A checkpoint whose recorded trajectory (config keys that
    shape the phase) differs from this run's is refused with the first differing key. Keys the checkpoint
    predates are not compared."""
    start = ckpt.latest_step() or 0
    if not start:
        return 0
    saved = flat(ckpt.restore_meta().get("trajectory", {}))
    for key, now in flat(trajectory).items():
        if key in saved and saved[key] != now:
            raise C.ConfigError(
                f"{ckpt.directory} holds a {phase} checkpoint trained with {key}={saved[key]!r}, but the config "
                f"says {key}={now!r}: set {key} back to resume, or use a new --run-dir")
    return start


def resume(ckpt: Checkpointer, phase: str, parts: StepParts, trajectory: dict) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint of `phase` that restores (onto this run's mesh, whatever
    mesh wrote it) and holds finite params, or (None, 0) when there is none. Newer steps that do not are
    reported in one line and set aside (`Checkpointer.restore_latest_readable`)."""
    if not check_resume(ckpt, phase, trajectory):
        return None, 0

    def finite(state: Any) -> None:
        bad = nonfinite_params(state)
        if bad:
            raise ValueError(f"params {bad} are not finite")

    r = ckpt.restore_latest_readable(abstract_with(parts.abstract, parts.state_sh), check=finite)
    return r.state, r.step


def run_steps(ckpt: Checkpointer, log: MetricsLog, phase: str, parts: StepParts, fresh: Callable[[], Any],
              feed: Callable[[int], tuple], meta: dict, every: int, tokens_per_step: int,
              names: list[str] | None = None) -> Any:
    """Resumes `phase` from its newest readable checkpoint (or starts from fresh()), runs steps
    start+1..total with parts.step(state, *feed(step)), checkpoints and logs; returns the final state.
    A phase counts as finished only when its final checkpoint restores with finite params.
    meta: what every checkpoint records besides its step (with "trajectory", checked on resume).
    names: a sweep's member names (the state and metrics then have a leading SAE axis)."""
    try:
        state, start = resume(ckpt, phase, parts, meta["trajectory"])
        log.rewind(phase, start)  # drops what a killed run logged past its last checkpoint
        if not start:
            state = fresh()
        if start >= parts.total:
            return state
        loop = PhaseLoop(phase, parts.total, tokens_per_step, log, ckpt, every, start, names=names)
        try:
            for step in range(start + 1, parts.total + 1):
                state, metrics = parts.step(state, *feed(step))
                loop.after_step(step, metrics, state, meta)
            loop.finish()
        finally:
            loop.bar.close()  # a stopped phase leaves its bar finished, before the error line
        return state
    finally:
        ckpt.close()
