"""The phases a run can have, in the one order they run in: the registry every stage iterates.

The trainer, resume and checkpoint meta, `jaxsae.load_sae`, evaluation, export, the report and the
ahead-of-time check all read this table; no other module lists phase names. A phase declares:

    name       what `phases:` in a config lists, the checkpoint directory and the eval.json key
    section    the config section with its settings (its own tokens, optimiser and schedule)
    starts     where its SAE comes from: the first of these that ran before it (a phase name or
               "init", the SAE of finetune.init_from); () = a fresh SAE of its own
    holds      what its checkpoints hold: "sae" (load_sae / eval / export read it) or "adapter" (an
               adapter around a frozen SAE, evaluated together)
    kl_share   a fixed KL share replacing the section's (the control is the fine-tune with 0)
    runner     "module:function" that trains it, imported only when it runs (this module stays
               importable from config validation and from `jaxsae.sae`)

Adding a phase: its entry here and its runner module (plus a config section if it needs settings of
its own).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Literal


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    section: str
    runner: str
    starts: tuple[str, ...] = ()
    holds: Literal["sae", "adapter"] = "sae"
    kl_share: float | None = None
    color: str = "tab:blue"  # its colour in the report's plot

    def load(self) -> Callable:
        module, attr = self.runner.split(":")
        return getattr(importlib.import_module(module), attr)


_KL = "jaxsae.train.kl_phase:run_phase"

PHASES: tuple[Phase, ...] = (
    Phase("mse", "mse", "jaxsae.train.mse:run_phase", color="tab:blue"),
    # the MSE-only continuation over the fine-tune's window: what extra tokens alone give the MSE SAE
    Phase("control", "finetune", _KL, starts=("mse",), kl_share=0.0, color="tab:gray"),
    Phase("finetune", "finetune", _KL, starts=("mse", "init"), color="tab:red"),
    Phase("adapter", "adapter", _KL, starts=("finetune", "mse"), holds="adapter", color="tab:orange"),
    Phase("e2e", "e2e", _KL, color="tab:green"),
)
NAMES = tuple(p.name for p in PHASES)
BY_NAME = {p.name: p for p in PHASES}


def get(name: str) -> Phase:
    return BY_NAME[name]


def ordered(names) -> list[Phase]:
    """The registry's entries for `names`, in run order."""
    return [p for p in PHASES if p.name in set(names)]


def sae_phases() -> list[Phase]:
    """The phases whose checkpoints hold an SAE, in run order (the last one present is a run's SAE)."""
    return [p for p in PHASES if p.holds == "sae"]


def check_phases(phases, has_init: bool) -> str | None:
    """None if `phases` (a config's list) is runnable, else a one-line message naming the fix."""
    if not phases:
        return f"phases is empty: list at least one of {', '.join(NAMES)}"
    for name in phases:
        if name not in BY_NAME:
            return f"phases: {name!r} is not a phase; choose from {', '.join(NAMES)}"
    if len(set(phases)) != len(phases):
        dup = next(n for n in phases if list(phases).count(n) > 1)
        return f"phases lists {dup} twice: list each phase once"
    if list(phases) != [p.name for p in ordered(phases)]:
        return f"phases: {list(phases)} is out of order; phases run as {', '.join(NAMES)}: list them in that order"
    ran = {"init"} if has_init else set()
    for p in ordered(phases):
        if p.starts and not ran & set(p.starts):
            need = " or ".join("finetune.init_from" if s == "init" else s for s in p.starts)
            return f"phases: {p.name} continues the SAE of {need}; list it before {p.name}"
        ran.add(p.name)
    return None


def start_of(phase: Phase, ran) -> str | None:
    """The phase (or "init") whose SAE `phase` continues, given the names that ran before it."""
    return next((s for s in phase.starts if s in ran), None)
