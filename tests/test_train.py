"""`python -m jaxsae.train`: a whole tiny run, resume after a real kill, and errors before compute."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxsae
from conftest import HAS_TENSORBOARD, run_cmd, tiny_args

ROOT = Path(__file__).parent.parent


_args = tiny_args
_run = run_cmd


def test_run_dir_has_everything(finished_run):
    assert (finished_run / "config.yaml").exists()
    evals = json.loads((finished_run / "eval.json").read_text())
    assert list(evals) == ["mse", "control", "finetune"]  # demo.yaml runs the MSE-only control
    for ev in evals.values():
        assert ev["ce_zero"] > ev["ce_clean"] and ev["ce_spliced"] >= ev["ce_clean"] - 1e-3
        assert 0.0 < ev["fve"] <= 1.0 and abs(ev["l0"] - 8) < 1e-6
    assert (finished_run / "report.md").read_text().count("| mse |") == 1
    assert (finished_run / "report.png").stat().st_size > 10_000
    lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    mse = [r for r in lines if r["phase"] == "mse"]
    assert mse[-1]["step"] == 100 and mse[-1]["tokens"] == 25600
    for key in ("train/loss", "train/mse", "train/l0", "train/lr", "perf/tokens_per_s"):
        assert key in mse[-1]
    assert mse[-1]["train/mse"] < mse[0]["train/mse"]  # it learned
    ft = [r for r in lines if r["phase"] == "finetune"]
    assert ft[-1]["step"] == 24 and "train/kl" in ft[-1] and "train/beta" in ft[-1]


def test_load_sae_restores_for_analysis(finished_run):
    sae = jaxsae.load_sae(finished_run)
    assert sae.cfg.kind == "topk" and sae.cfg.d_sae == 128 and sae.cfg.d_model == 128
    x = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32) * sae.scale
    f = sae.encode(x)
    assert f.shape == (5, 128) and int((np.asarray(f) > 0).sum(-1).max()) <= 8
    assert sae.decode(f).shape == (5, 128)
    assert sae.meta["phase"] == "finetune"  # the run directory gives the last phase's SAE
    step_dir = finished_run / "checkpoints" / "finetune" / "24"
    np.testing.assert_array_equal(jaxsae.load_sae(step_dir).params["W_dec"], sae.params["W_dec"])
    mse_sae = jaxsae.load_sae(finished_run / "checkpoints" / "mse")
    assert mse_sae.meta["phase"] == "mse" and not np.array_equal(mse_sae.params["W_dec"], sae.params["W_dec"])


def test_resume_after_kill_matches_uninterrupted(tiny_model, finished_run, tmp_path):
    """Kill the run (SIGKILL) mid-MSE-phase, start the same command again: identical final params."""
    run_dir = tmp_path / "killed"
    tracker = ("--set", "tracker.kind=tensorboard") if HAS_TENSORBOARD else ()
    env = {**os.environ, "JAXSAE_STEP_DELAY": "0.05"}  # slow steps down so the kill lands mid-phase
    p = subprocess.Popen(_args(tiny_model, run_dir, *tracker), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints" / "mse"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(d.name.isdigit() and int(d.name) >= 30
                                                                 for d in ckpts.iterdir())):
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    assert steps and steps[-1] < 100, steps  # it really was interrupted
    r = _run(_args(tiny_model, run_dir, *tracker))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = jaxsae.load_sae(finished_run), jaxsae.load_sae(run_dir)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["phase"] == "mse"]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated lines after the resume
    if tracker:  # the tracker has every step once too (a kill between its write and metrics.jsonl's: twice)
        from test_tracking import read_events

        tb = sorted(s for s, _ in read_events(run_dir / "tracker")["scalars"]["mse/train/loss"])
        assert sorted(set(tb)) == steps_logged and len(tb) - len(set(tb)) <= 1, tb
        assert len(list((run_dir / "tracker").glob("events.*"))) == 2  # the killed run's file, the resume's


# Config errors before compute (hook.layer out of range, an unknown key, k > d_sae, a store of another
# layer, a checkpoint of another SAE): cases of tests/test_cli_errors.py, which also checks that the run
# directory (and the store) stay byte-for-byte as they were.


def test_eval_cli_on_a_checkpoint(finished_run):
    r = _run([sys.executable, "-m", "jaxsae.eval", str(finished_run / "checkpoints" / "mse")])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    want = json.loads((finished_run / "eval.json").read_text())["mse"]
    assert got["phase"] == "mse"
    for k in ("ce_clean", "ce_spliced", "ce_zero", "kl", "fve", "l0"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k


def test_url_run_dir_keeps_checkpoints_remote_and_copies_the_small_files(tmp_path):
    from types import SimpleNamespace

    from jaxsae.config import load_config
    from jaxsae.train.context import split_run_dir, sync_remote

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    local, remote = split_run_dir(cfg, "gs://bucket/runs/demo/")
    assert local == Path("runs") / "demo" and remote == "gs://bucket/runs/demo"
    assert split_run_dir(cfg, tmp_path / "r") == (tmp_path / "r", None)
    # the copy itself goes through etils.epath, which treats a plain path like a bucket path
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    (here / "metrics.jsonl").write_text('{"phase": "mse", "step": 1}\n')
    (here / "eval.json").write_text("{}")
    ctx = SimpleNamespace(run_dir=here, remote=str(there))
    sync_remote(ctx)
    assert (there / "metrics.jsonl").read_text() == (here / "metrics.jsonl").read_text()
    assert not (there / "report.md").exists()
    fresh = SimpleNamespace(run_dir=tmp_path / "new_host", remote=str(there))
    fresh.run_dir.mkdir()
    sync_remote(fresh, down=True)  # a resumed run on a new VM continues the metrics
    assert (fresh.run_dir / "metrics.jsonl").exists() and (fresh.run_dir / "eval.json").read_text() == "{}"


def test_resume_refuses_another_trajectory(tmp_path):
    """A checkpoint records every config key that shapes its phase; a resume that differs in one (here the
    adapter's rank) is refused naming the key and the value on disk. Keys the checkpoint predates are not
    compared."""
    import dataclasses

    from jaxsae.checkpoint import Checkpointer
    from jaxsae.config import ConfigError, load_config
    from jaxsae.train.loop import check_resume

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["adapter.kind=sae_lora", "adapter.rank=2"])
    ckpt = Checkpointer(tmp_path / "ck")
    saved = {"adapter": {**dataclasses.asdict(cfg.adapter), "rank": 64}, "sae": {"k": 16}}
    ckpt.save(5, {"x": np.zeros(2)}, {"trajectory": saved})
    ckpt.wait()
    with pytest.raises(ConfigError, match=r"holds a adapter checkpoint trained with adapter.rank=64, but the "
                                          r"config says adapter.rank=2: set adapter.rank back to resume"):
        check_resume(ckpt, "adapter", {"adapter": dataclasses.asdict(cfg.adapter), "sae": {"k": 16}})
    now = {"adapter": {**dataclasses.asdict(cfg.adapter), "rank": 64}, "sae": {"k": 16, "d_sae": 1024}}
    assert check_resume(ckpt, "adapter", now) == 5  # sae.d_sae: the checkpoint predates the key
    ckpt.close()


# --------------------------------------------------------------------------- a run directory you can trust

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_lines(stderr: str) -> list[str]:
    """stderr's lines without the progress bars (a run that computed shows them before its error)."""
    return [x for x in stderr.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]


def _store_only(finished: Path, dst: Path) -> Path:
    """A run directory holding only the finished run's store: a new run there trains from scratch."""
    shutil.copytree(finished / "store", dst / "store")
    return dst


def test_second_run_is_refused_and_a_killed_run_keeps_its_config(tiny_model, tmp_path):
    """Two `python -m jaxsae.train` on one run directory: the second exits 2 naming the first's pid. The first
    is then killed mid-MSE (SIGKILL); a rerun with another mse.lr exits 2 naming the key, before it
    changes a byte of the run directory (config.yaml included)."""
    run_dir = tmp_path / "shared"
    env = {**os.environ, "JAXSAE_STEP_DELAY": "0.2"}
    first = subprocess.Popen(_args(tiny_model, run_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "checkpoints" / "mse" / "10").exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        second = _run(_args(tiny_model, run_dir))
        assert second.returncode == 2, second.stderr[-2000:]
        lines = _error_lines(second.stderr)
        assert len(lines) == 1 and f"is in use by pid {first.pid}" in lines[0], second.stderr[-2000:]
        assert first.poll() is None  # the second run did not disturb the first
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = _files(run_dir)
    r = _run(_args(tiny_model, run_dir, "--set", "mse.lr=0.002"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "trained with mse.lr=0.001, but the config says mse.lr=0.002" in lines[0]
    assert "set mse.lr back to resume, or use a new --run-dir" in lines[0]
    assert _files(run_dir) == before


def test_torn_metrics_and_truncated_eval_are_rebuilt(tiny_model, finished_run, tmp_path):
    """A kill can leave metrics.jsonl with half a last line and (before atomic writes) eval.json half
    written: the rerun drops the torn line, sets the damaged eval.json aside and rebuilds it."""
    run_dir = tmp_path / "torn"
    shutil.copytree(finished_run, run_dir)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "metrics.jsonl").write_bytes(metrics + b'{"phase": "finetune", "st')
    evals = (run_dir / "eval.json").read_bytes()
    (run_dir / "eval.json").write_bytes(evals[:len(evals) // 2])
    r = _run(_args(tiny_model, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval.json was not valid JSON" in r.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    def metrics(evals: dict) -> dict:  # what was measured, not how long it took
        return {phase: {k: v for k, v in m.items() if k != "phase_seconds"} for phase, m in evals.items()}

    assert metrics(json.loads((run_dir / "eval.json").read_text())) == metrics(json.loads(evals))
    assert (run_dir / "eval.json.corrupt").read_bytes() == evals[:len(evals) // 2]


def test_corrupt_latest_checkpoint_falls_back_and_finishes(tiny_model, finished_run, tmp_path):
    """The fine-tune's newest checkpoint (step 24) is damaged after the run: the rerun says so in one line,
    sets it aside, resumes from step 20 and finishes the phase again."""
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    ft = run_dir / "checkpoints" / "finetune"
    for f in (ft / "24" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:5])
    r = _run(_args(tiny_model, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    said = [x for x in _error_lines(r.stderr) if "unreadable" in x]
    assert len(said) == 1 and "step(s) 24" in said[0] and "using step 20" in said[0], r.stderr[-3000:]
    assert (ft / "24.unreadable").is_dir() and (ft / "24").is_dir()
    a, b = jaxsae.load_sae(finished_run), jaxsae.load_sae(run_dir)
    for k in a.params:  # the four steps again from step 20: exactly the same SAE
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    steps = [(x["phase"], x["step"]) for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))


def test_divergence_stops_the_run_without_a_report(tiny_model, finished_run, tmp_path):
    """mse.lr=1e3 diverges: the guard stops the MSE phase at its first checked step with one line, exit 2;
    no eval.json, no report, and every checkpoint it left holds finite params."""
    run_dir = _store_only(finished_run, tmp_path / "diverged")
    r = _run(_args(tiny_model, run_dir, "--set", "mse.lr=1e3", "--set", "checkpoint.every_steps=5"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: mse step 20: train/loss"), r.stderr[-2000:]
    assert "training diverged: lower mse.lr" in lines[0]
    assert not (run_dir / "eval.json").exists() and not (run_dir / "report.md").exists()
    from jaxsae.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints" / "mse")
    assert ckpt.all_steps()[-1] == 15  # step 20 was never saved
    for step in ckpt.all_steps():
        state, _ = ckpt.restore_raw(step)
        assert all(np.isfinite(np.asarray(v)).all() for v in state["params"].values()), step
    ckpt.close()


def test_guard_rules_and_its_off_switch():
    from jaxsae.config import GuardCfg
    from jaxsae.train.guard import Guard, TrainingError

    ok = {"train/loss": 1.0, "train/l0": 8.0, "train/dead_fraction": 0.0}
    g = Guard("mse", GuardCfg(loss_ratio=100.0, grace_steps=3, dead_steps=2))
    g.check(1, ok)
    g.check(2, {**ok, "train/loss": 500.0})  # within the grace steps
    with pytest.raises(TrainingError, match=r"mse step 3: train/loss 500 is over 100x its minimum 1"):
        g.check(3, {**ok, "train/loss": 500.0})
    g = Guard("finetune", GuardCfg(dead_steps=2))
    g.check(1, {**ok, "train/l0": 0.0})
    g.check(2, ok)  # a step in between resets the count
    g.check(3, {**ok, "train/dead_fraction": 1.0})
    with pytest.raises(TrainingError, match=r"finetune step 4: no latent has fired for 2 steps.*finetune.lr"):
        g.check(4, {**ok, "train/l0": 0.0})
    off = Guard("mse", GuardCfg(enabled=False, dead_steps=1))
    for step in range(1, 50):
        off.check(step, {"train/loss": 10.0 ** step, "train/l0": 0.0, "train/dead_fraction": 1.0})


def test_non_finite_params_are_never_saved_nor_resumed_nor_reported(tmp_path):
    """A step whose metrics are finite but whose updated params are not stops before its checkpoint; a
    checkpoint that holds NaN params anyway (written by something else) is not resumed from; a NaN
    evaluation metric never reaches eval.json."""
    import jax

    from jaxsae.checkpoint import Checkpointer
    from jaxsae.train.loop import MetricsLog, PhaseLoop, TrainingError, check_eval, nonfinite_params, write_eval

    good = {"params": {"W": np.ones((2, 3), np.float32)}, "step": np.int32(0)}
    bad = {"params": {"W": np.full((2, 3), np.nan, np.float32)}, "step": np.int32(0)}
    ckpt = Checkpointer(tmp_path / "ck")
    loop = PhaseLoop("mse", 20, 1, MetricsLog(tmp_path / "m.jsonl"), ckpt, every=5, start_step=0)
    loop.after_step(5, {"train/loss": np.float32(1.0)}, good, {})
    with pytest.raises(TrainingError, match=r"mse step 10: the updated params \['params'\]\['W'\] are not finite"):
        loop.after_step(10, {"train/loss": np.float32(1.0)}, bad, {})
    ckpt.wait()
    assert ckpt.all_steps() == [5] and nonfinite_params(good) == ""
    ckpt.save(10, bad, {"step": 10}, force=True)  # as if another tool had written it
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), good)

    def finite(state):
        if nonfinite_params(state):
            raise ValueError("not finite")

    assert ckpt.restore_latest_readable(abstract, check=finite).step == 5
    ckpt.close()
    with pytest.raises(TrainingError, match=r"finetune: evaluation gave fve=nan"):
        check_eval("finetune", {"ce_clean": 3.0, "fve": float("nan")})
    with pytest.raises(TrainingError):
        write_eval(tmp_path, "mse", {"kl": float("inf")})
    assert not (tmp_path / "eval.json").exists()
