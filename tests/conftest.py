"""The tiny training runs several test files share: the shipped 4-layer model, a store of 20k tokens, 100
MSE steps and 24 fine-tune steps (about half a minute on two CPU cores), each trained once per session."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# the test extra installs both; the shared run then also logs to TensorBoard (tests/test_tracking.py)
HAS_TENSORBOARD = all(importlib.util.find_spec(m) is not None for m in ("tensorboardX", "tensorboard"))


def eight_devices():
    """The marks of a test that needs the 8 fake CPU devices of the multi-device run (tests/run.sh)."""
    import jax

    return [pytest.mark.multidevice,
            pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: run with "
                               "XLA_FLAGS=--xla_force_host_platform_device_count=8 in a fresh process")]


def tiny_args(model: Path | str, run_dir: Path, *extra: str) -> list[str]:
    """`python -m jaxsae.train` on configs/demo.yaml shrunk to the tiny run, into `run_dir`."""
    return [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--run-dir", str(run_dir), "--set", f"model.path={model}", "--set", "hook.layer=1",
            "--set", "data.context=32", "--set", "store.tokens=20000", "--set", "store.batch_contexts=16",
            "--set", "store.norm_sample_tokens=4096", "--set", "sae.d_sae=128", "--set", "sae.k=8",
            "--set", "mse.tokens=25600", "--set", "mse.batch_size=256", "--set", "mse.warmup_steps=5",
            "--set", "finetune.tokens=3072", "--set", "finetune.batch_sequences=4",
            "--set", "checkpoint.every_steps=10", "--set", "eval.sequences=8", "--set", "eval.batch_sequences=4",
            *extra]


def run_cmd(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def kill_mid_phase(args, run_dir: Path, phase: str = "mse", after_step: int = 30) -> list[int]:
    """Starts `python -m jaxsae.train` (args), SIGKILLs it once `phase` has a checkpoint at or past
    after_step (steps slowed down so the kill lands mid-phase); returns the checkpoint steps left."""
    env = {**os.environ, "JAXSAE_STEP_DELAY": "0.05"}
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints" / phase
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(d.name.isdigit() and int(d.name) >= after_step
                                                                 for d in ckpts.iterdir())):
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) if ckpts.exists() else []


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The shipped 4-layer pythia-stdlib: small, and trained, so zero-ablation really hurts."""
    from jaxsae.models.shipped import SHIPPED

    return SHIPPED


@pytest.fixture(scope="session")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    """A finished tiny run (mse + control + finetune, logged to TensorBoard when it is installed); copy it (shutil.copytree) before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    tracker = ("--set", "tracker.kind=tensorboard") if HAS_TENSORBOARD else ()
    r = run_cmd(tiny_args(tiny_model, run_dir, *tracker))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


# The tiny run without the control, with a fine-tune learning rate that helps at this size.
MSE_FINETUNE = ("--set", "phases=[mse, finetune]", "--set", "finetune.lr=1e-3")


@pytest.fixture(scope="session")
def mse_finetune_run(tiny_model, tmp_path_factory) -> Path:
    """The tiny run's `MSE_FINETUNE` variant (checkpoints/mse, checkpoints/finetune), on the CPU as one JAX
    process on one device: the one-process reference of tests/test_multiprocess.py and the run that
    tests/test_delta.py analyses. Read-only: copy it (shutil.copytree) before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("runs") / "mse_finetune"
    r = run_cmd(tiny_args(tiny_model, run_dir, *MSE_FINETUNE),
                env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache (new and empty each session) for the JAX processes the tests
    start, which inherit it through the environment. Many tests run `python -m jaxsae.train` on the same
    tiny shapes; each later process loads those programs instead of compiling them again. A cached program
    is the compiler's own output, so results are the same bits (the resume tests compare to runs that
    compiled theirs)."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the tiny programs compile in under a second
    if importlib.util.find_spec("filelock") is not None:  # (torch needs it) a bound makes JAX lock the cache,
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(1 << 30)  # so concurrent processes never read a half-written entry
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # and the tests' own process: its in-process runs (resume tests, phase tests) build new step functions
    # per run, so each run traces again but loads the programs the previous ones compiled
    import jax

    options = {"jax_compilation_cache_dir": env["JAX_COMPILATION_CACHE_DIR"],
               "jax_persistent_cache_min_compile_time_secs": 0.0}
    if "JAX_COMPILATION_CACHE_MAX_SIZE" in env:  # the same locked cache the test processes share
        options["jax_compilation_cache_max_size"] = int(env["JAX_COMPILATION_CACHE_MAX_SIZE"])
    before = {k: getattr(jax.config, k) for k in options}
    for k, v in options.items():
        jax.config.update(k, v)
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
