"""`python -m jaxsae.train`: a whole tiny run, resume after a real kill, and errors before compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxsae

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The shipped 4-layer pythia-stdlib: small, and trained, so zero-ablation really hurts."""
    from jaxsae.models.shipped import SHIPPED

    return SHIPPED


def _args(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--run-dir", str(run_dir), "--set", f"model.path={model}", "--set", "hook.layer=1",
            "--set", "data.context=32", "--set", "store.tokens=20000", "--set", "store.batch_contexts=16",
            "--set", "store.norm_sample_tokens=4096", "--set", "sae.d_sae=128", "--set", "sae.k=8",
            "--set", "mse.tokens=25600", "--set", "mse.batch_size=256", "--set", "mse.warmup_steps=5",
            "--set", "finetune.tokens=3072", "--set", "finetune.batch_sequences=4",
            "--set", "checkpoint.every_steps=10", "--set", "eval.sequences=8", "--set", "eval.batch_sequences=4",
            *extra]


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


@pytest.fixture(scope="session")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    r = _run(_args(tiny_model, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_run_dir_has_everything(finished_run):
    assert (finished_run / "config.yaml").exists()
    evals = json.loads((finished_run / "eval.json").read_text())
    assert list(evals) == ["mse", "finetune"]
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
    env = {**os.environ, "JAXSAE_STEP_DELAY": "0.05"}  # slow steps down so the kill lands mid-phase
    p = subprocess.Popen(_args(tiny_model, run_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
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
    r = _run(_args(tiny_model, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = jaxsae.load_sae(finished_run), jaxsae.load_sae(run_dir)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["phase"] == "mse"]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated lines after the resume


@pytest.mark.parametrize("extra,match", [
    (["--set", "hook.layer=7"], "hook.layer=7 is out of range for a 4-layer model: choose 0..3"),
    (["--set", "sae.kay=3"], "unknown config key sae.kay"),
    (["--set", "sae.k=500"], "sae.k=500 exceeds sae.d_sae=128"),
])
def test_bad_config_fails_before_compute(tiny_model, tmp_path, extra, match):
    r = _run(_args(tiny_model, tmp_path / "bad", *extra))
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "store").exists()


def test_store_of_another_layer_is_refused(tiny_model, finished_run, tmp_path):
    r = _run(_args(tiny_model, tmp_path / "other", "--set", f"store.path={finished_run / 'store'}",
                   "--set", "hook.layer=2"))
    assert r.returncode == 2 and "collected at layer 1, not hook.layer=2" in r.stderr


def test_eval_cli_on_a_checkpoint(finished_run):
    r = _run([sys.executable, "-m", "jaxsae.eval", str(finished_run / "checkpoints" / "mse")])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    want = json.loads((finished_run / "eval.json").read_text())["mse"]
    assert got["phase"] == "mse"
    for k in ("ce_clean", "ce_spliced", "ce_zero", "kl", "fve", "l0"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k


def test_checkpoint_of_another_sae_is_refused(tiny_model, finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    r = _run(_args(tiny_model, run_dir, "--set", "sae.d_sae=256"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds a mse checkpoint trained with sae.d_sae=128, but the config says sae.d_sae=256" in r.stderr


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
