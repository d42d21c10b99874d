"""Experiment trackers (config `tracker:`): TensorBoard or Weights & Biases, both optional extras.

A tracker receives what the run directory records, on process 0 only:

    log(record)              every metrics.jsonl line: each number as <phase>/<key> (mse/train/loss,
                             collect/scale) at the record's step
    log_eval(phase, m, step) a phase's evaluation (eval.json), as <phase>/eval/<key>, at the end of the run
    log_image(name, path)    the report figure (report.png), at the end of the run
    close()

metrics.jsonl stays the record of the run; a tracker only mirrors it. `check` runs before any compute
(`jaxsae.train.context.plan`): a tracker whose package is missing is a ConfigError naming the extra to
install. This module imports no tracker package until one is opened.

Resume. A killed run may have logged steps past the checkpoint it resumes from; metrics.jsonl drops
them and the resumed run computes them again (`MetricsLog.rewind`). The tracker is not sent those steps a
second time: it keeps the killed run's values (the same numbers, a resume being exact, but for
perf/tokens_per_s). TensorBoard appends a new event file to the same directory on every start, so a
run shows as one curve; wandb continues the same run (its id is kept in <dir>/wandb-id). A kill that
lands between the tracker's write and metrics.jsonl's can still leave that one step twice (or not at
all). A rerun of a finished run evaluates every phase again, and logs those evaluations again.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import uuid
from pathlib import Path
from typing import Protocol

from jaxsae.config import ConfigError, TrackerCfg

# the package each kind writes with (pip install jaxsae[<kind>] installs it)
BACKENDS = {"tensorboard": ("tensorboardX",), "wandb": ("wandb",)}


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...

    def log_eval(self, phase: str, metrics: dict, step: int = 0) -> None: ...

    def log_image(self, name: str, path: Path) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers as {"<phase>/<key>": value} (phase and step are the address; a
    sweep's member adds its name: "<phase>/<sae>/<key>")."""
    phase = record.get("phase", "run") + (f"/{record['sae']}" if "sae" in record else "")
    return {f"{phase}/{k}": float(v) for k, v in record.items()
            if k not in ("phase", "step") and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def eval_scalars(phase: str, metrics: dict) -> dict[str, float]:
    return {f"{phase}/eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}


def eval_markdown(phase: str, metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    return f"| {phase} | |\n|---|---|\n{rows}"


class NullTracker:
    """tracker.kind: none (and every process but the first)."""

    def log(self, record: dict) -> None:
        pass

    def log_eval(self, phase: str, metrics: dict, step: int = 0) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def _import_first(kind: str):
    """The first module of BACKENDS[kind] that imports; ConfigError naming the extra when none does."""
    errors = []
    for name in BACKENDS[kind]:
        try:
            return importlib.import_module(name)
        except ImportError as e:  # noqa: PERF203 - a handful of names
            errors.append(f"{name}: {e}")
    raise ConfigError(f"tracker.kind={kind} needs the {BACKENDS[kind][0]} package, which is not installed "
                      f"({errors[0]}): pip install jaxsae[{kind}], or set tracker.kind=none")


def check(cfg: TrackerCfg) -> None:
    """ConfigError (before any compute) when the tracker's package is not installed."""
    if cfg.kind != "none":
        _import_first(cfg.kind)


class TensorBoardTracker:
    """Event files in `logdir`, written with tensorboardX's protos and its synchronous EventsWriter (its
    SummaryWriter writes on a background thread, so a killed run would lose what it had queued): every
    call is on disk when it returns. Each start writes its own file (named by the second it started
    in, and a random suffix)."""

    def __init__(self, logdir: Path):
        _import_first("tensorboard")
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(logdir / "events"), f".{uuid.uuid4().hex[:8]}")

    def _write(self, step: int, *summaries) -> None:
        import time

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [v for s in summaries for v in s.value]
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()

    def log(self, record: dict) -> None:
        from tensorboardX import summary

        self._write(int(record.get("step", 0)), *(summary.scalar(t, v) for t, v in scalars(record).items()))

    def log_eval(self, phase: str, metrics: dict, step: int = 0) -> None:
        from tensorboardX import summary

        self._write(step, *(summary.scalar(t, v) for t, v in eval_scalars(phase, metrics).items()),
                    summary.text(f"{phase}/eval", eval_markdown(phase, metrics)))

    def log_image(self, name: str, path: Path) -> None:
        from tensorboardX import summary

        self._write(0, summary.image(name, read_png(path), dataformats="HWC"))

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run (offline when WANDB_MODE=offline). Each phase's metrics are plotted against its own step
    (<phase>/step, wandb's define_metric), since wandb's own step must only grow across phases."""

    def __init__(self, cfg: TrackerCfg, wandb_dir: Path, name: str, config: dict):
        self.wandb = _import_first("wandb")
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wandb_dir / "wandb-id"  # a resumed run continues the same wandb run
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(project=cfg.project, name=name, dir=str(wandb_dir), id=run_id, resume="allow",
                                   config=config)
        self.phases: set[str] = set()
        self.rows: dict[str, dict] = {}

    def _phase(self, phase: str) -> None:
        if phase not in self.phases:
            self.phases.add(phase)
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")

    def log(self, record: dict) -> None:
        phase = record.get("phase", "run")
        self._phase(phase)
        self.run.log({**scalars(record), f"{phase}/step": int(record.get("step", 0))})

    def log_eval(self, phase: str, metrics: dict, step: int = 0) -> None:
        for tag, v in eval_scalars(phase, metrics).items():
            self.run.summary[tag] = v
        self.rows[phase] = metrics

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def close(self) -> None:
        if self.rows:
            keys = list(dict.fromkeys(k for m in self.rows.values() for k in m))
            table = self.wandb.Table(columns=["phase", *keys],
                                     data=[[p, *(m.get(k) for k in keys)] for p, m in self.rows.items()])
            self.run.log({"eval": table})
        self.run.finish()


def read_png(path: Path):
    """An RGB uint8 array (H, W, 3) of a PNG file (matplotlib reads it; no other image library)."""
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    return img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)


def tracker_dir(cfg: TrackerCfg, run_dir: Path) -> Path:
    return Path(cfg.dir) if cfg.dir else Path(run_dir) / "tracker"


def open_tracker(cfg: TrackerCfg, run_dir: Path, name: str = "run", config: dict | None = None) -> Tracker:
    """The tracker `cfg` asks for, writing under `tracker_dir` (call on process 0 only)."""
    if cfg.kind == "tensorboard":
        return TensorBoardTracker(tracker_dir(cfg, run_dir))
    if cfg.kind == "wandb":
        return WandbTracker(cfg, tracker_dir(cfg, run_dir), cfg.name or name, config or {})
    return NullTracker()


def log_run_end(tracker: Tracker, run_dir: Path) -> None:
    """The end of a run: every phase's evaluation (eval.json, at the phase's last logged step) and the
    report figure, when they exist."""
    run_dir = Path(run_dir)
    ev_path, png = run_dir / "eval.json", run_dir / "report.png"
    if ev_path.exists():
        from jaxsae.rundir import read_jsonl

        last: dict[str, int] = {}
        for r in read_jsonl(run_dir / "metrics.jsonl"):
            last[r.get("phase")] = max(last.get(r.get("phase"), 0), int(r.get("step", 0)))
        for phase, m in json.loads(ev_path.read_text()).items():
            sweep = bool(m) and all(isinstance(v, dict) for v in m.values())  # a sweep's: name -> metrics
            for name, mm in (m.items() if sweep else [(None, m)]):
                tracker.log_eval(phase if name is None else f"{phase}/{name}", mm, last.get(phase, 0))
    if png.exists():
        tracker.log_image("report", png)

