"""The loop every training phase runs: resume or start, step, log, checkpoint, show progress.

A run directory holds:
    config.yaml           the resolved config
    store/                the activation store (unless store.path points elsewhere)
    checkpoints/<phase>/  Orbax checkpoints of each training phase (jaxsae.phases lists them)
    metrics.jsonl         one line per logged step: phase, step, tokens, losses, l0, lr, tokens/s
    eval.json             evaluation after every phase

Starting the same command again resumes: a complete store is reused, an incomplete one resumes
collection, and each phase continues from its last checkpoint (or is skipped when finished). A
checkpoint records everything that shapes its phase's trajectory (`trajectory`); a resume whose config
differs in any of it stops, naming the key and the value on disk.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
from tqdm import tqdm

from jaxsae import config as C
from jaxsae.checkpoint import Checkpointer
from jaxsae.sharding import abstract_with


class TrainingError(RuntimeError):
    pass


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines past the restored step."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on every process but the first: metrics are logged once

    def rewind(self, phase: str, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and not ((r := json.loads(line))["phase"] == phase and r["step"] > step)]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def to_floats(tree: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class PhaseLoop:
    """Drives one phase's steps: logs step N-1's metrics after dispatching step N (the host never
    stalls the device), stops on a NaN naming the step, checkpoints, shows progress."""

    def __init__(self, phase: str, total_steps: int, tokens_per_step: int, log: MetricsLog,
                 ckpt: Checkpointer, every: int, start_step: int, log_every: int = 10):
        self.phase, self.total, self.tps = phase, total_steps, tokens_per_step
        self.log, self.ckpt, self.every, self.log_every = log, ckpt, every, log_every
        self.start = start_step
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
        m = to_floats(metrics)
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"{self.phase} step {step}: {', '.join(bad)} is not finite ({m[bad[0]]}); "
                                "lower the learning rate or check the activations' normalisation")
        elapsed = time.time() - self.t0
        rate = (step - self.start) * self.tps / max(elapsed, 1e-9)
        self.last = m
        if step % self.log_every == 0 or step == self.total:
            self.log.write({"phase": self.phase, "step": step, "tokens": step * self.tps,
                            **{k: round(v, 6) for k, v in m.items()}, "perf/tokens_per_s": round(rate, 1)})
        loss_key = next((k for k in ("train/loss",) if k in m), None)
        post = {"tok/s": f"{rate:,.0f}", "tokens": f"{step * self.tps:,}"}
        if loss_key:
            post["loss"] = f"{m[loss_key]:.4f}"
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
            # a checkpoint is written only once its step's metrics are checked finite: a NaN is never
            # saved, so a rerun never finds a "finished" phase that diverged at its last step
            self._flush()
            self.ckpt.save(step, state, {**meta, "step": step, "tokens": step * self.tps})

    def finish(self) -> dict[str, float]:
        self._flush()
        self.ckpt.wait()
        self.bar.close()
        return self.last


def write_eval(run_dir: Path, phase: str, metrics: dict) -> None:
    if jax.process_index() != 0:  # written once
        return
    path = run_dir / "eval.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[phase] = metrics
    path.write_text(json.dumps(data, indent=1) + "\n")


class StepParts(NamedTuple):
    """A phase's optimizer, abstract state, shardings and jit step: the trainer and `jaxsae.aot` build
    the step from the same function, so the ahead-of-time check compiles what the trainer runs."""

    total: int
    tx: Any
    abstract: Any  # the state's ShapeDtypeStructs
    state_sh: Any
    batch_sh: Any
    step: Any


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


def run_steps(ckpt: Checkpointer, log: MetricsLog, phase: str, parts: StepParts, fresh: Callable[[], Any],
              feed: Callable[[int], tuple], meta: dict, every: int, tokens_per_step: int) -> Any:
    """Resumes `phase` from its last checkpoint (or starts from fresh()), runs steps start+1..total with
    parts.step(state, *feed(step)), checkpoints and logs; returns the final state.
    meta: what every checkpoint records besides its step (with "trajectory", checked on resume)."""
    try:
        start = check_resume(ckpt, phase, meta["trajectory"])
        if start:
            # restores onto this run's mesh, whatever mesh wrote the checkpoint
            state, _ = ckpt.restore(abstract_with(parts.abstract, parts.state_sh), start)
            log.rewind(phase, start)
        else:
            state = fresh()
        if start >= parts.total:
            return state
        loop = PhaseLoop(phase, parts.total, tokens_per_step, log, ckpt, every, start)
        for step in range(start + 1, parts.total + 1):
            state, metrics = parts.step(state, *feed(step))
            loop.after_step(step, metrics, state, meta)
        loop.finish()
        return state
    finally:
        ckpt.close()
