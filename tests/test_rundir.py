"""A run directory you can trust: the run lock, atomic and torn-tolerant files (jaxsae.rundir), checkpoints
that fall back past damaged steps and never delete what they do not manage (jaxsae.checkpoint), and the
interop CLI that refuses to clobber (jaxsae.interop.__main__). Real files, real processes, no mocks."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxsae.checkpoint import Checkpointer, CheckpointError, check_keep
from jaxsae.rundir import (
    LOCK_FILE,
    CorruptFileError,
    RunDirBusy,
    RunDirLock,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_jsonl,
    write_jsonl,
)

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait_for(proc: subprocess.Popen, line: str) -> None:
    got = proc.stdout.readline()
    assert got.strip() == line, (got, proc.stderr.read() if proc.poll() is not None else "")


# --------------------------------------------------------------------------- the lock

_HOLD = """
    import sys
    from jaxsae.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    print("LOCKED", flush=True)
    sys.stdin.read()  # hold until stdin closes (or a kill)
"""
_TRY = """
    import sys
    from jaxsae.rundir import RunDirBusy, RunDirLock
    try:
        with RunDirLock(sys.argv[1]) as lock:
            print("ACQUIRED", (lock.previous or {}).get("pid"), flush=True)
    except RunDirBusy as e:
        print(e, file=sys.stderr)
        sys.exit(3)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen(_python(_HOLD) + [str(run_dir)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(p, "LOCKED")
    return p


def _try(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_python(_TRY) + [str(run_dir)], env=ENV, capture_output=True, text=True, timeout=60)


def test_second_process_fails_fast_naming_the_holder(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        r = _try(tmp_path / "run")
        assert r.returncode == 3, r
        assert f"in use by pid {holder.pid} on host" in r.stderr and f"kill {holder.pid}" in r.stderr
        info = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid and info["host"] and info["started"]
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}") as e:  # a second lock in this process too
            RunDirLock(tmp_path / "run").acquire()
        assert e.value.holder["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    r = _try(tmp_path / "run")  # released on exit: the lock file was emptied, nobody is named
    assert r.returncode == 0 and r.stdout.split() == ["ACQUIRED", "None"], r
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_sigkilled_holder_releases_the_lock(tmp_path):
    holder = _hold(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    r = _try(tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ACQUIRED", str(holder.pid)]  # took over from the dead holder, and knows it


def test_lock_kept_by_dead_holders_child_is_taken_over(tmp_path):
    # The holder forks a child (which inherits the locked descriptor) and is killed; the child keeps the
    # flock, but the lock file names a dead process on this host: the run is gone, the lock is stale.
    code = _HOLD.replace('    print("LOCKED"', '    import os, time\n    if os.fork() == 0:\n        time.sleep(600)\n'
                                                    '    print("LOCKED"')
    holder = subprocess.Popen(_python(code) + [str(tmp_path / "run")], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(holder, "LOCKED")
    child = int(subprocess.run(["pgrep", "-P", str(holder.pid)], capture_output=True, text=True).stdout.split()[0])
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        r = _try(tmp_path / "run")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["ACQUIRED", str(holder.pid)]
    finally:
        os.kill(child, signal.SIGKILL)


def test_url_lease_is_exclusive_and_released():
    url = "memory://leases/run"
    with RunDirLock(url, ttl_s=60) as a:
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(url, ttl_s=60).acquire()
        assert a.held and not a.lost
    with RunDirLock(url, ttl_s=60) as b:  # released: the lease object was deleted
        assert b.previous is None


# --------------------------------------------------------------------------- files

def test_jsonl_drops_a_torn_last_line_and_append_repairs_it(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert read_jsonl(p) == []
    for s in range(3):
        append_jsonl(p, {"phase": "mse", "step": s})
    whole = p.read_bytes()
    p.write_bytes(whole + b'{"phase": "mse", "st')  # a kill mid-append
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2]
    append_jsonl(p, {"phase": "mse", "step": 3})
    assert p.read_bytes() == whole + b'{"phase": "mse", "step": 3}\n'
    p.write_bytes(whole + b'{"phase": "mse", "step": 9}')  # whole record, newline lost: kept
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2, 9]
    append_jsonl(p, {"phase": "mse", "step": 10})
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2, 9, 10] and p.read_bytes().endswith(b"}\n")
    p.write_bytes(b'{"step": 0}\n{"step": \n{"step": 2}\n')  # damage in the middle is not a torn write
    with pytest.raises(CorruptFileError, match="metrics.jsonl: line 2 is not valid JSON.*fix or delete line 2"):
        read_jsonl(p)
    write_jsonl(p, [{"step": 0}, {"step": 1}])
    assert read_jsonl(p) == [{"step": 0}, {"step": 1}]


def test_read_json_names_corrupt_file_or_recovers(tmp_path):
    p = tmp_path / "eval.json"
    assert read_json(p, {}) == {}
    with pytest.raises(FileNotFoundError):
        read_json(p)
    atomic_write_text(p, json.dumps({"mse": {"fve": 0.9}}))
    assert read_json(p) == {"mse": {"fve": 0.9}}
    p.write_text('{"mse": {"fve": 0.')
    with pytest.raises(CorruptFileError, match="eval.json is not valid JSON"):
        read_json(p, {})
    assert read_json(p, {}, recover=True) == {}
    assert not p.exists() and (tmp_path / "eval.json.corrupt").read_text() == '{"mse": {"fve": 0.'


_WRITER = """
    import sys
    from jaxsae.rundir import atomic_write_text
    path, i = sys.argv[1], 0
    while True:
        atomic_write_text(path, str(i % 10) * 4_000_000)
        if i == 1:
            print("WRITING", flush=True)
        i += 1
"""


def test_atomic_write_survives_a_kill(tmp_path):
    p = tmp_path / "config.yaml"
    atomic_write_text(p, "old")
    for delay in (0.0, 0.05, 0.2):
        w = subprocess.Popen(_python(_WRITER) + [str(p)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        _wait_for(w, "WRITING")
        time.sleep(delay)
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=30)
        text = p.read_text()
        assert len(text) == 4_000_000 and len(set(text)) == 1  # one whole version, never a mix or a prefix
    for f in glob.glob(str(tmp_path / ".config.yaml.*.tmp")):  # a kill may leave a hidden temp file ...
        os.unlink(f)
    atomic_write_text(p, "new")
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # ... a failed write does not
    assert p.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["config.yaml"]


# --------------------------------------------------------------------------- checkpoints

STATE = {"params": {"w": jnp.zeros((2, 3))}, "step": jnp.int32(0)}


def _state(v: float) -> dict:
    return {"params": {"w": jnp.full((2, 3), v)}, "step": jnp.int32(int(v))}


def _written(d: Path, steps=(10, 20), keep: int = 3) -> Path:
    c = Checkpointer(d, keep=keep)
    for s in steps:
        c.save(s, _state(s), {"step": s})
    c.close()
    return d


def test_keep_is_validated():
    assert check_keep(1) == 1
    for bad in (0, -1, 1.5, True, None, "2"):
        with pytest.raises(ValueError, match="checkpoint.keep=.* must be an integer >= 1"):
            check_keep(bad)
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer("/nonexistent-never-created", keep=0)


def _truncate_data(step_dir: Path) -> None:
    for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(5)


@pytest.mark.parametrize("damage", ["truncated data", "deleted manifest", "deleted meta", "missing state"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys, damage):
    d = _written(tmp_path / "mse")
    {"truncated data": lambda: _truncate_data(d / "20"),
     "deleted manifest": lambda: (d / "20" / "state" / "manifest.ocdbt").unlink(),
     "deleted meta": lambda: (d / "20" / "meta" / "metadata").unlink(),
     "missing state": lambda: shutil.rmtree(d / "20" / "state")}[damage]()
    c = Checkpointer(d, keep=3)
    assert c.latest_step() == 20  # on disk, not yet known to be unreadable
    with pytest.raises(CheckpointError, match="step 20 .* unreadable"):
        c.restore(STATE, 20)
    state, meta, step = c.restore_latest_readable(STATE)
    err = capsys.readouterr().err.strip().splitlines()
    assert step == 10 and meta == {"step": 10} and float(state["params"]["w"][0, 0]) == 10
    assert len(err) == 1 and f"step(s) 20 in {d}" in err[0] and "using step 10" in err[0]
    # set aside, not deleted: the resumed run saves step 20 again (Orbax would silently skip it otherwise)
    assert c.latest_step() == 10 and (d / "20.unreadable").is_dir()
    c.save(20, _state(21), {"step": 20})
    c.close()
    assert Checkpointer(d).restore(STATE)[1] == {"step": 20}


def test_no_readable_checkpoint_names_the_directory(tmp_path):
    d = _written(tmp_path / "mse")
    for s in ("10", "20"):
        _truncate_data(d / s)
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {d}.*step 20.*step 10.*delete"):
        Checkpointer(d).restore_latest_readable(STATE)
    assert sorted(os.listdir(d)) == ["10", "20"]  # nothing is set aside when nothing restores
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore_latest_readable(STATE)


def test_checkpointer_never_deletes_what_it_does_not_manage(tmp_path):
    run = _written(tmp_path / "run" / "checkpoints" / "mse")
    c = Checkpointer(run, keep=1)  # the old interop import: keep=1, step 0, force
    with pytest.raises(CheckpointError, match="refusing to save step 0 .* already holds step 20"):
        c.save(0, _state(0), {}, force=True)
    assert sorted(os.listdir(run)) == ["10", "20"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds todo.txt, which are not jaxsae checkpoints"):
        Checkpointer(other).save(1, _state(1), {})
    assert os.listdir(other) == ["todo.txt"]


# --------------------------------------------------------------------------- the interop CLI

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxsae.interop", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def public_saes(tmp_path_factory):
    """A tiny SAE exported in both formats."""
    import jax

    from jaxsae import interop
    from jaxsae.sae import SAEConfig, init_sae
    from jaxsae.sae.load import LoadedSAE

    root = tmp_path_factory.mktemp("public")
    cfg = SAEConfig(kind="relu", d_model=8, d_sae=16).validate()
    sae = LoadedSAE(cfg, dict(init_sae(cfg, jax.random.key(0))), 1.0, {"hook_layer": 1, "model": "m"})
    return interop.export(sae, root / "sl", "saelens"), interop.export(sae, root / "dl", "dictionary_learning")


def test_cli_refuses_to_clobber(public_saes, tmp_path):
    sl, _ = public_saes
    run = _written(tmp_path / "run" / "checkpoints" / "mse")
    before = _snapshot(run)
    _refused(_cli("import", sl, run), str(run), "--force")
    _refused(_cli("export", run, run, "--format", "saelens"), str(run), "--force")
    assert _snapshot(run) == before
    (tmp_path / "file").write_text("x")
    _refused(_cli("import", sl, tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_cli_names_truncated_inputs(public_saes, tmp_path):
    sl, dl = public_saes
    for src, name, cut in [(sl, "sae_weights.safetensors", 0.5), (sl, "cfg.json", 0.5), (dl, "ae.pt", 0.7),
                           (dl, "config.json", 0.5)]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(src, bad)
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[:int(len(data) * cut)])
        _refused(_cli("import", bad, tmp_path / "out"), str(bad / name))
        assert not (tmp_path / "out").exists()


def test_cli_force_replaces(public_saes, tmp_path):
    from jaxsae.sae.load import load_sae

    sl, _ = public_saes
    run = _written(tmp_path / "mse")
    r = _cli("import", sl, run, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run)) == ["0"] and load_sae(run).cfg.d_sae == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mse"]  # no temp directories left behind
