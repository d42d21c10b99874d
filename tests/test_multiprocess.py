"""Two JAX processes (separate OS processes joined by jax.distributed on localhost) collect one store
together and read disjoint slices of it that cover every row once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MSE_FINETUNE, tiny_args

from jaxsae.data.collect import collect
from jaxsae.data.store import StoreError, open_store
from jaxsae.data.text import StdlibSource
from jaxsae.models.shipped import SHIPPED
from jaxsae.models.lm import load_lm

ROOT = Path(__file__).parent.parent
KW = dict(context=32, batch_contexts=4, chunk_rows=32, shard_chunks=2, norm_sample_tokens=500)
N_TOKENS = 3000  # 47 shards of 64 rows, the last partial: uneven ownership between the processes

_WORKER = """
import json, sys
import numpy as np
from jaxsae.distributed import maybe_initialize
assert maybe_initialize()
import jax
from jaxsae.data.collect import collect
from jaxsae.data.reader import ShuffledReader
from jaxsae.data.text import StdlibSource
from jaxsae.models.lm import load_lm

store, out, n_tokens, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
lm = load_lm(sys.argv[5])
info = collect(lm, 1, StdlibSource("val"), lm.tokenizer, store, n_tokens=n_tokens, progress=False, **kw)
p, n = jax.process_index(), jax.process_count()
reader = ShuffledReader(info.open(), 32, seed=3, process_index=p, process_count=n, normalize=False)
rows = []
while sum(map(len, rows)) < reader.n_rows:  # the stream's first n_rows rows are exactly epoch 0
    rows.append(next(reader))
reader.close()
np.save(f"{out}/rows-{p}.npy", np.concatenate(rows)[:reader.n_rows])
print(json.dumps({"process": p, "count": n, "n_tokens": info.n_tokens, "complete": info.complete}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store: Path, out: Path, n_proc: int = 2, n_tokens: int = N_TOKENS, **env_extra) -> list:
    port = _free_port()
    procs = []
    for p in range(n_proc):
        env = {**os.environ, "JAXSAE_COORDINATOR": f"127.0.0.1:{port}", "JAXSAE_NUM_PROCESSES": str(n_proc),
               "JAXSAE_PROCESS_ID": str(p), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env_extra}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(store), str(out), str(n_tokens), json.dumps(KW), str(SHIPPED)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(store: Path, out: Path, n_proc: int = 2, n_tokens: int = N_TOKENS) -> list[dict]:
    procs = _start(store, out, n_proc, n_tokens)
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture(scope="module")
def two_process_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    results = _launch(d / "store", d)
    return d, results


def test_two_processes_write_one_store_like_one_process(two_process_store, tmp_path):
    d, results = two_process_store
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["count"] == 2 for r in results)
    assert all(r["complete"] and r["n_tokens"] == N_TOKENS for r in results)
    lm = load_lm(SHIPPED)
    collect(lm, 1, StdlibSource("val"), lm.tokenizer, tmp_path / "one", n_tokens=N_TOKENS, progress=False, **KW)
    two, one = open_store(d / "store"), open_store(tmp_path / "one")
    # every row written once, in the single-process order (process-local forwards of the same
    # contexts in same-shaped batches: equal to float32 rounding)
    np.testing.assert_allclose(two.read(0, N_TOKENS), one.read(0, N_TOKENS), rtol=1e-5, atol=1e-5)
    assert abs(two.scale - one.scale) < 1e-5 * one.scale
    skip = ("created", "updated", "processes")
    assert {k: v for k, v in two.meta.items() if k not in skip} == {k: v for k, v in one.meta.items()
                                                                   if k not in skip}
    assert two.meta["processes"] == 2 and "stream_position" in two.meta  # where a KL window starts, as one process's
    progress = [json.loads((d / "store" / "progress" / f"process-{p}.json").read_text()) for p in (0, 1)]
    assert [p["shards_done"] for p in progress] == [24, 23]  # shards 0, 2, .., 46 and 1, 3, .., 45


def test_two_readers_cover_every_row_once(two_process_store):
    d, _ = two_process_store
    rows = [np.load(d / f"rows-{p}.npy") for p in (0, 1)]
    store = open_store(d / "store").read(0, N_TOKENS)
    assert len(rows[0]) + len(rows[1]) == N_TOKENS and min(map(len, rows)) > 0

    def keyed(x):  # rows as sortable byte strings
        return np.sort(np.ascontiguousarray(x).view(f"V{x.shape[1] * x.itemsize}").ravel())

    # As multisets (some rows repeat in the data: the same token right after BOS), the two epochs
    # together are the store: every row read once, by exactly one process.
    np.testing.assert_array_equal(keyed(np.concatenate(rows)), keyed(store))


def test_both_processes_killed_mid_collection_resume_to_the_same_store(two_process_store, tmp_path):
    d, _ = two_process_store
    store = tmp_path / "killed"
    procs = _start(store, tmp_path, JAXSAE_STORE_COMMIT_DELAY="0.3")
    try:
        deadline = time.monotonic() + 300
        while True:  # SIGKILL both once each has committed a few shards
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the processes never committed shards"
            done = [json.loads(f.read_text())["shards_done"] if f.exists() else 0
                    for f in (store / "progress" / f"process-{p}.json" for p in (0, 1))]
            if min(done) >= 3:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert not json.loads((store / "meta.json").read_text())["complete"]
    assert max(done) < 24  # really killed mid-way
    results = _launch(store, tmp_path)  # the same command again, on a new coordinator
    assert all(r["complete"] and r["n_tokens"] == N_TOKENS for r in results)
    np.testing.assert_array_equal(open_store(store).read(0, N_TOKENS), open_store(d / "store").read(0, N_TOKENS))
    assert open_store(store).scale == open_store(d / "store").scale


def test_unfinished_store_resumes_only_with_its_process_count(two_process_store, tmp_path):
    d, _ = two_process_store
    meta = json.loads((d / "store" / "meta.json").read_text())
    bad = tmp_path / "half"
    (bad / "activations").mkdir(parents=True)
    for f in (d / "store" / "activations").rglob("*"):
        if f.is_file():
            target = bad / "activations" / f.relative_to(d / "store" / "activations")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    (bad / "meta.json").write_text(json.dumps({**meta, "complete": False, "scale": None}))
    lm = load_lm(SHIPPED)
    with pytest.raises(StoreError, match=r"begun by 2 process\(es\).*resume it with 2"):
        collect(lm, 1, StdlibSource("val"), lm.tokenizer, bad, n_tokens=N_TOKENS, progress=False, **KW)


def _train_args(run_dir: Path) -> list[str]:
    """The tiny run's `MSE_FINETUNE` variant (the one-process reference is conftest's `mse_finetune_run`)."""
    return tiny_args(SHIPPED, run_dir, *MSE_FINETUNE)


def test_two_process_training_run_matches_one_process(mse_finetune_run, tmp_path):
    """`python -m jaxsae.train` on 2 processes (1 CPU device each, gloo collectives): one global
    mesh, each process reads its own slice of the store, metrics and eval written once. The same
    command on one process (1 CPU device) is `mse_finetune_run`."""
    port = _free_port()
    procs = [subprocess.Popen(_train_args(tmp_path / "two"),
                              env={**os.environ, "JAXSAE_COORDINATOR": f"127.0.0.1:{port}", "JAX_PLATFORMS": "cpu",
                                   "JAXSAE_NUM_PROCESSES": "2", "JAXSAE_PROCESS_ID": str(p), "XLA_FLAGS": ""},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert "[finetune]" in outs[0] and "[finetune]" not in outs[1]  # printed once
    two_eval, one_eval = (json.loads((d / "eval.json").read_text()) for d in (tmp_path / "two", mse_finetune_run))
    assert set(two_eval) == {"mse", "finetune"}
    for phase in ("mse", "finetune"):  # other rows per MSE step, the same fine-tune window: close, not equal
        assert two_eval[phase]["ce_clean"] == pytest.approx(one_eval[phase]["ce_clean"], rel=1e-5)
        assert two_eval[phase]["ce_gap"] == pytest.approx(one_eval[phase]["ce_gap"], rel=0.05)
    assert two_eval["finetune"]["ce_gap"] < two_eval["mse"]["ce_gap"]
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["step"]) for r in lines]
    assert len(keys) == len(set(keys))  # logged once
    assert open_store(tmp_path / "two" / "store").meta["processes"] == 2
