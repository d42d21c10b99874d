"""`tracker:`: TensorBoard event files (read back with TensorBoard's own reader) and a wandb offline run
mirror metrics.jsonl and eval.json; a tracker whose package is missing stops the run before compute."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import HAS_TENSORBOARD, ROOT

needs_tb = pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs tensorboardX and tensorboard (the test extra)")


def read_events(logdir: Path) -> dict:
    """{"scalars": {tag: [(step, value), ...]}, "images": [...], "texts": [...]} of every event file in
    `logdir`, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
            "images": {t: acc.Images(t) for t in tags["images"]}, "tensors": tags["tensors"]}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run_dir: Path) -> dict:
    want: dict[str, list] = {}
    for r in records(run_dir):
        for k, v in r.items():
            if k not in ("phase", "step"):
                want.setdefault(f"{r['phase']}/{k}", []).append((r["step"], float(v)))
    return want


@needs_tb
def test_tensorboard_mirrors_metrics_eval_and_report(finished_run):
    """The shared tiny run logs to TensorBoard: every metrics.jsonl number at its phase's step, once;
    every phase's evaluation; the report figure."""
    got = read_events(finished_run / "tracker")
    want = expected_scalars(finished_run)
    assert {"mse/train/loss", "finetune/train/kl", "control/train/loss", "collect/scale"} <= set(want)
    for tag, points in want.items():
        assert [s for s, _ in got["scalars"][tag]] == [s for s, _ in points], tag
        assert [v for _, v in got["scalars"][tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    evals = json.loads((finished_run / "eval.json").read_text())
    last = {r["phase"]: r["step"] for r in records(finished_run)}
    for phase, m in evals.items():
        for k in ("ce_gap", "fve", "l0", "kl"):
            assert got["scalars"][f"{phase}/eval/{k}"] == [(last[phase], pytest.approx(m[k], rel=1e-6))]
    assert set(got["scalars"]) == set(want) | {f"{p}/eval/{k}" for p, m in evals.items() for k, v in m.items()
                                               if isinstance(v, (int, float))}
    assert {f"{p}/eval/text_summary" for p in evals} <= set(got["tensors"])  # the eval table, as text
    (image,) = got["images"]["report"]
    from jaxsae.tracking import read_png

    h, w, _ = read_png(finished_run / "report.png").shape
    assert (image.height, image.width) == (h, w)


@needs_tb
def test_resumed_run_logs_each_step_once(tmp_path):
    """A killed run logged steps past its checkpoint; the resume drops them from metrics.jsonl and
    computes them again, but does not send them to the tracker a second time."""
    from jaxsae.config import TrackerCfg
    from jaxsae.train.loop import MetricsLog
    from jaxsae.tracking import open_tracker

    cfg = TrackerCfg(kind="tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tracker=open_tracker(cfg, tmp_path))
    for step in range(10, 60, 10):  # killed after logging step 50; its last checkpoint is step 30
        log.write({"phase": "mse", "step": step, "train/loss": 1.0 / step})
    log.tracker.close()
    log = MetricsLog(tmp_path / "metrics.jsonl", tracker=open_tracker(cfg, tmp_path))
    log.rewind("mse", 30)
    for step in range(40, 110, 10):
        log.write({"phase": "mse", "step": step, "train/loss": 1.0 / step})
    log.tracker.close()
    assert [r["step"] for r in records(tmp_path)] == list(range(10, 110, 10))
    got = read_events(tmp_path / "tracker")["scalars"]["mse/train/loss"]
    assert sorted(s for s, _ in got) == list(range(10, 110, 10))  # two files in one second: either order
    assert len(list((tmp_path / "tracker").glob("events.*"))) == 2  # each start appends its own file


def test_missing_package_is_one_line_exit_2_before_compute(tiny_model, tmp_path, monkeypatch, capsys):
    from conftest import tiny_args
    from jaxsae.train.__main__ import main

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # its import fails as if it were not installed
    run_dir = tmp_path / "run"
    rc = main(tiny_args(tiny_model, run_dir, "--set", "tracker.kind=tensorboard")[3:])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: tracker.kind=tensorboard needs the tensorboardX package")
    assert "pip install jaxsae[tensorboard]" in err[0]
    assert not run_dir.exists()


def test_wandb_offline_run_holds_the_metrics(finished_run, tmp_path, monkeypatch):
    """The wandb tracker, offline, fed the tiny run's records: its run file holds every step's numbers."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from jaxsae.config import TrackerCfg
    from jaxsae.tracking import log_run_end, open_tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "eval.json", "report.png"):
        (run_dir / name).write_bytes((finished_run / name).read_bytes())
    tracker = open_tracker(TrackerCfg(kind="wandb", project="jaxsae-test"), run_dir, "tiny")
    for r in records(run_dir):
        tracker.log(r)
    log_run_end(tracker, run_dir)
    tracker.close()
    import wandb

    wandb.teardown()  # the service writes the run file; it has written all of it once it has stopped
    (run_file,) = (run_dir / "tracker" / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    got = {(h["mse/step"], h["mse/train/loss"]) for h in history if "mse/train/loss" in h}
    want = {(r["step"], r["train/loss"]) for r in records(run_dir) if r["phase"] == "mse"}
    assert got == want
    assert any(h.get("report/_type") == "image-file" for h in history)  # the report figure
    assert any(any(k.startswith("eval/") for k in h) for h in history)  # the eval table


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a wandb run file (its LevelDB-style log of Record protos: a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(parts)
            parts = b""
    out = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            out.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in rec.history.item})
    return out


def test_config_section_documented():
    readme = (ROOT / "README.md").read_text()
    assert "tracker:" in readme and "pip install jaxsae[tensorboard]" in readme
