"""The divergence guard: stop a phase, naming the step, once its training has plainly gone wrong.

A NaN stops the loop by itself (`PhaseLoop`); a run can also go wrong with finite numbers and then
spend its whole budget producing an SAE that reconstructs nothing. The guard (config `guard:`) stops it
when, after each step's metrics are fetched,

- train/loss exceeds `loss_ratio` x its running minimum over the phase's steps so far (checked from
  step `grace_steps` of the phase on): the optimiser has diverged (a learning rate far too high); or
- no latent fires (train/l0 == 0) or every latent is dead (train/dead_fraction == 1) for `dead_steps`
  steps in a row: nothing will revive them.

The running minimum restarts when a phase resumes from a checkpoint. `guard.enabled: false` turns the
guard off (a NaN still stops the loop).
"""

from __future__ import annotations

import math

from jaxsae.config import GuardCfg
from jaxsae.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A phase whose training went wrong (a NaN, a diverged loss, every latent dead); the message names
    the phase, the step and what to change."""


class Guard:
    """Checks one phase's per-step metrics; `check` raises TrainingError when the run has diverged."""

    def __init__(self, phase: str, cfg: GuardCfg, start_step: int = 0):
        self.phase, self.cfg, self.start = phase, cfg, start_step
        self.min_loss = math.inf
        self.dead_run = 0  # steps in a row with nothing firing

    def check(self, step: int, m: dict[str, float]) -> None:
        if not self.cfg.enabled:
            return
        loss = m.get("train/loss")
        if loss is not None:
            self.min_loss = min(self.min_loss, loss)
            if (step >= self.cfg.grace_steps and self.min_loss > 0
                    and loss > self.cfg.loss_ratio * self.min_loss):
                raise TrainingError(
                    f"{self.phase} step {step}: train/loss {loss:.4g} is over {self.cfg.loss_ratio:g}x its minimum "
                    f"{self.min_loss:.4g}, so training diverged: lower {self.phase_section()}.lr (or set "
                    "guard.loss_ratio, or guard.enabled=false)")
        silent = m.get("train/l0") == 0 or m.get("train/dead_fraction", 0.0) >= 1.0
        self.dead_run = self.dead_run + 1 if silent else 0
        if self.dead_run >= self.cfg.dead_steps:
            raise TrainingError(
                f"{self.phase} step {step}: no latent has fired for {self.dead_run} steps (every latent is dead): "
                f"lower {self.phase_section()}.lr or the sparsity penalty (or set guard.dead_steps, or "
                "guard.enabled=false)")

    def phase_section(self) -> str:
        from jaxsae.phases import BY_NAME

        return BY_NAME[self.phase].section if self.phase in BY_NAME else self.phase
