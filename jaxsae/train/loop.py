"""Phases of a run (collect → MSE → eval), with metrics, progress and resume.

A run directory holds:
    config.yaml           the resolved config
    store/                the activation store (unless store.path points elsewhere)
    checkpoints/<phase>/  Orbax checkpoints of each training phase
    metrics.jsonl         one line per logged step: phase, step, tokens, losses, l0, lr, tokens/s
    eval.json             evaluation after every phase

Starting the same command again resumes: a complete store is reused, an incomplete one resumes
collection, and each phase continues from its last checkpoint (or is skipped when finished).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxsae import config as C
from jaxsae.checkpoint import Checkpointer


class TrainingError(RuntimeError):
    pass


def resolve_model_path(path: str) -> str:
    if path == "shipped":
        from jaxsae.demo_lm import SHIPPED

        return str(SHIPPED)
    return path


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


def take_contexts(cfg: C.RunConfig, source: dict, tokenizer, n: int, skip: int, where: str, what: str) -> np.ndarray:
    """The first `n` packed contexts int32[n, context] of `source` after `skip`; a source too short
    for them is a ConfigError naming `what` to lower."""
    from jaxsae.data.text import iter_contexts, make_source

    bos = "auto" if cfg.data.prepend_bos else None
    rows = []
    for row in iter_contexts(make_source(source), tokenizer, cfg.data.context, bos_id=bos, skip_contexts=skip):
        rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise C.ConfigError(f"{where} holds only {len(rows)} contexts of {cfg.data.context} tokens; {what} needs "
                            f"{n}: lower {what} or use a larger source")
    return np.stack(rows).astype(np.int32)


def eval_sequences(cfg: C.RunConfig, tokenizer) -> np.ndarray:
    """Held-out contexts int32[eval.sequences, context] from data.eval_source."""
    return take_contexts(cfg, cfg.data.eval_source, tokenizer, cfg.eval.sequences, 0, "data.eval_source",
                         "eval.sequences")
