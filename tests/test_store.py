"""Tests for jaxsae.data.store (collection, resume, validation) and jaxsae.data.reader (shuffled batches)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsae.data import store as S
from jaxsae.data.reader import ShuffledReader
from jaxsae.data.collect import COMMIT_DELAY_ENV, collect
from jaxsae.data.store import StoreError, open_store, write_array_store
from jaxsae.data.packing import iter_contexts, iter_positioned
from jaxsae.data.text import FilesSource, StdlibSource
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, load_lm

CTX, BATCH = 32, 4
# Small chunks so a ~1-2k row store has many chunks and shards.
KW = dict(context=CTX, batch_contexts=BATCH, chunk_rows=32, shard_chunks=2, norm_sample_tokens=500)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-NeoX saved with save_pretrained, with a 512-token BPE tokenizer beside it."""
    import torch
    import transformers

    from jaxsae.tools.tokenizer import save_tokenizer, train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tiny_neox")
    save_tokenizer(train_bpe_tokenizer(itertools.islice(StdlibSource("val"), 40), 512), d)
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_lm(model_dir)


def _contexts(lm, n: int, bos_id="auto") -> np.ndarray:
    contexts = iter_contexts(StdlibSource("val"), lm.tokenizer, CTX, bos_id=bos_id)
    return np.stack(list(itertools.islice(contexts, n)))


def _position_after(lm, n: int):
    """The stream's Position after its first `n` contexts (read and tokenized)."""
    rows = iter_positioned(StdlibSource("val"), lm.tokenizer, CTX)
    return next(itertools.islice(rows, n - 1, None))[1]


def _residual_rows(lm, layer: int, contexts: np.ndarray, drop: int) -> np.ndarray:
    h = np.concatenate([np.asarray(lm.residual(contexts[i:i + BATCH], layer))
                        for i in range(0, len(contexts), BATCH)])
    return h[:, drop:].reshape(-1, lm.d_model)


# --------------------------------------------------------------------------- collection

@pytest.fixture(scope="module")
def collected(lm):
    url = "memory://roundtrip/"
    info = collect(lm, 1, StdlibSource("val"), lm.tokenizer, url, n_tokens=1000, progress=False, **KW)
    return url, info


def test_collect_round_trip_and_metadata(lm, collected):
    url, info = collected
    assert info.complete and info.n_tokens == 1000 and not info.text_exhausted
    st = open_store(url)
    assert (st.n_tokens, st.d_model, st.dtype, st.chunk_rows, st.shard_rows) == (1000, 32, "float32", 32, 64)
    # BOS is prepended, so position 0 of every context is dropped: 31 rows per context.
    ref = _residual_rows(lm, 1, _contexts(lm, -(-1000 // (CTX - 1))), drop=1)[:1000]
    got = st.read(0, 1000)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    m = st.meta
    assert m["hook"] == "blocks.1.hook_resid_post" and m["layer"] == 1 and m["context"] == CTX
    assert m["positions"]["dropped"] == [0] and m["positions"]["bos_prepended"] is True
    assert m["model"]["arch"] == "gpt_neox" and m["model"]["d_model"] == 32 and m["model"]["n_layers"] == 2
    assert m["model"]["path"] == str(lm.path)
    assert m["tokenizer"]["vocab_size"] == 512 and m["source"]["kind"] == "stdlib"
    assert m["tokens_target"] == m["tokens_written"] == 1000 and m["complete"] is True
    assert m["contexts_consumed"] == 33  # ceil(1000 / 31): contexts whose rows are (partly) stored
    assert m["stream_position"] == _position_after(lm, 33).to_json()  # where a KL window starts
    # Scale from the first norm_sample_tokens rows: E||x/s||^2 = 1 there (dictionary_learning's norm).
    s = np.sqrt(np.mean(np.sum(got[:500].astype(np.float64) ** 2, axis=1)))
    assert st.scale == pytest.approx(s, rel=1e-6) and m["norm"] == "E|x/scale|^2=1"
    assert np.mean(np.sum(st.read(0, 500, normalize=True) ** 2, axis=1)) == pytest.approx(1, rel=1e-4)
    # Collecting again with the same arguments is a no-op on a complete store.
    again = collect(lm, 1, StdlibSource("val"), lm.tokenizer, url, n_tokens=1000, progress=False, **KW)
    assert again.n_tokens == 1000 and np.array_equal(open_store(url).read(0, 1000), got)


def test_collect_bf16_without_bos_drop(lm):
    url = "memory://bf16/"
    info = collect(lm, 0, StdlibSource("val"), lm.tokenizer, url, n_tokens=300, dtype="bfloat16",
                   drop_bos=False, progress=False, **KW)
    st = open_store(url)
    assert info.dtype == st.dtype == "bfloat16" and st.array.dtype.name == "bfloat16"
    assert st.meta["positions"]["dropped"] == [] and st.meta["positions"]["rows_per_context"] == CTX
    ref = _residual_rows(lm, 0, _contexts(lm, -(-300 // CTX)), drop=0)[:300]
    got = st.read(0, 300)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)  # bf16 has an 8-bit mantissa
    assert np.array_equal(got, ref.astype(st.array.dtype.numpy_dtype).astype(np.float32))


def test_collect_text_exhausted_truncates(lm, tmp_path):
    doc = tmp_path / "small.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 40)
    src = FilesSource(doc)
    with pytest.warns(UserWarning, match="ran out"):
        info = collect(lm, 1, src, lm.tokenizer, tmp_path / "st", n_tokens=10_000, progress=False, **KW)
    st = open_store(tmp_path / "st")
    n_ctx = len(list(iter_contexts(src, lm.tokenizer, CTX)))
    assert info.text_exhausted and info.complete and 0 < st.n_tokens == n_ctx * (CTX - 1) < 10_000
    assert st.array.shape[0] == st.n_tokens
    # Killed after the last commit but before `complete` was recorded: a rerun only finishes it.
    rows = st.read(0, st.n_tokens)
    _edit_meta(tmp_path / "st", complete=False, text_exhausted=False)
    with pytest.warns(UserWarning, match="ran out"):
        again = collect(lm, 1, src, lm.tokenizer, tmp_path / "st", n_tokens=10_000, progress=False, **KW)
    assert again.complete and again.n_tokens == len(rows)
    assert np.array_equal(open_store(tmp_path / "st").read(0, len(rows)), rows)


def test_mismatched_arguments_error(lm, collected):
    url, _ = collected
    with pytest.raises(StoreError, match=r"layer: store has 1, arguments give 0.*same arguments"):
        collect(lm, 0, StdlibSource("val"), lm.tokenizer, url, n_tokens=1000, progress=False, **KW)
    cfg = GPTNeoXConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_mlp=64)
    other = LM(cfg, params=None)  # the configuration is checked before any weight is used
    with pytest.raises(StoreError, match=r"model\.d_model: store has 32, arguments give 64"):
        collect(other, 1, StdlibSource("val"), lm.tokenizer, url, n_tokens=1000, progress=False, **KW)
    with pytest.raises(StoreError, match="context"):
        collect(lm, 1, StdlibSource("val"), lm.tokenizer, url, n_tokens=1000, progress=False,
                **{**KW, "context": 16})


_CHILD = """
import sys
from jaxsae.data.collect import collect
from jaxsae.data.text import StdlibSource
from jaxsae.models.lm import load_lm
lm = load_lm(sys.argv[1])
collect(lm, 1, StdlibSource("val"), lm.tokenizer, sys.argv[2], n_tokens=1500, progress=False, **{kw})
print("FINISHED", flush=True)
"""


def test_resume_after_sigkill_equals_uninterrupted_run(lm, model_dir, tmp_path, monkeypatch):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    # Same platform as this process (rows must match bit for bit); don't grab a whole GPU if there is one.
    env = {**os.environ, COMMIT_DELAY_ENV: "0.25", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(kw=repr(KW)), str(model_dir), str(killed)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # kill once >= 2 shards (128 rows: not a batch boundary, 124 rows/batch) committed
            assert child.poll() is None, f"collection ended before it was killed: {child.communicate()}"
            assert time.monotonic() < deadline, "collection never committed a shard"
            meta = S.read_meta(killed) if (killed / "meta.json").exists() else None
            if meta and meta["tokens_written"] >= 128:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    meta = S.read_meta(killed)
    committed = meta["tokens_written"]
    assert not meta["complete"] and 128 <= committed < 1500 and committed % 64 == 0
    with pytest.raises(StoreError, match="incomplete.*resume"):
        open_store(killed)
    partial = open_store(killed, allow_incomplete=True)
    assert partial.n_tokens == committed
    assert meta["stream_position"] == _position_after(lm, meta["contexts_consumed"]).to_json()  # per commit
    restart = meta["resume_at"]  # the last whole batch before the committed rows, and where its text starts
    assert restart["contexts"] == committed // (BATCH * (CTX - 1)) * BATCH > 0
    assert restart["position"] == _position_after(lm, restart["contexts"]).to_json()

    from jaxsae.data import packing

    starts = []  # the resumed collection reads the text from there, not from the beginning
    positioned = packing.iter_positioned
    monkeypatch.setattr(packing, "iter_positioned", lambda *a, **k: starts.append(k["start"]) or positioned(*a, **k))
    resumed = collect(lm, 1, StdlibSource("val"), lm.tokenizer, killed, n_tokens=1500, progress=False, **KW)
    assert starts == [packing.Position.from_json(restart["position"])]
    monkeypatch.undo()
    collect(lm, 1, StdlibSource("val"), lm.tokenizer, ref, n_tokens=1500, progress=False, **KW)
    a, b = open_store(killed), open_store(ref)
    assert resumed.complete and a.n_tokens == b.n_tokens == 1500
    np.testing.assert_array_equal(a.read(0, 1500), b.read(0, 1500))
    assert np.array_equal(partial.read(0, committed), b.read(0, committed))  # committed rows were durable
    skip = ("created", "updated")
    assert ({k: v for k, v in a.meta.items() if k not in skip}
            == {k: v for k, v in b.meta.items() if k not in skip})


# --------------------------------------------------------------------------- validation

def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_missing_and_corrupt_metadata_errors(tmp_path):
    with pytest.raises(StoreError, match="meta.json is missing.*collect"):
        open_store(tmp_path / "nothing")
    p = tmp_path / "st"
    write_array_store(p, np.ones((100, 8), np.float32), chunk_rows=16)
    assert open_store(p).n_tokens == 100
    good = (p / "meta.json").read_text()

    (p / "meta.json").unlink()
    with pytest.raises(StoreError, match="no metadata.*re-run collection"):
        open_store(p)
    (p / "meta.json").write_text('{"format_version": 1, "model": ')
    with pytest.raises(StoreError, match="corrupt.*not valid JSON"):
        open_store(p)
    (p / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(StoreError, match=r"corrupt: missing field\(s\)"):
        open_store(p)
    for changes, pattern in [({"format_version": 99}, "format_version 99"),
                             ({"model": {"d_model": 16}}, "d_model=16.*disagree"),
                             ({"tokens_written": 120, "tokens_target": 120}, "120 tokens were written"),
                             ({"dtype": "bfloat16"}, "dtype float32 != meta.json dtype bfloat16"),
                             ({"complete": False, "tokens_target": 200}, "incomplete: 100 of 200.*resume")]:
        (p / "meta.json").write_text(good)
        _edit_meta(p, **changes)
        with pytest.raises(StoreError, match=pattern):
            open_store(p)
    assert open_store(p, allow_incomplete=True).n_tokens == 100  # the last edit: incomplete is allowed
    (p / "meta.json").write_text(good)
    (p / "activations" / "zarr.json").unlink()
    with pytest.raises(StoreError, match="array is missing"):
        open_store(p)
    with pytest.raises(StoreError, match="outside|cannot open"):
        open_store("nosuchdriver://x/")


def test_collect_refuses_corrupt_metadata_unless_overwrite(lm, tmp_path):
    p = tmp_path / "st"
    p.mkdir()
    (p / "meta.json").write_text("garbage")
    with pytest.raises(StoreError, match="not valid JSON.*overwrite=True"):
        collect(lm, 1, StdlibSource("val"), lm.tokenizer, p, n_tokens=64, progress=False, **KW)
    info = collect(lm, 1, StdlibSource("val"), lm.tokenizer, p, n_tokens=64, overwrite=True, progress=False,
                   **KW)
    assert info.complete and open_store(p).n_tokens == 64


def test_kvstore_paths_normalise():
    assert S.kvstore_spec("memory://a/b") == {"driver": "memory", "path": "a/b/"}
    assert S.kvstore_spec("gs://bucket/acts") == {"driver": "gcs", "bucket": "bucket", "path": "acts/"}
    assert S.kvstore_spec("/tmp/x") == {"driver": "file", "path": "/tmp/x/"}
    assert S.chunk_rows_for(768, "float32") == 256 and S.chunk_rows_for(2048, "bfloat16") == 256


# --------------------------------------------------------------------------- reader

N, D = 1000, 8


@pytest.fixture(scope="module")
def index_store():
    """Row i is filled with the value i, so a batch says which rows it holds. 1000 rows, 64-row chunks
    (the last one partial)."""
    return write_array_store("memory://index/", np.repeat(np.arange(N, dtype=np.float32)[:, None], D, 1),
                             chunk_rows=64, scale=2.0)


def _ids(batches) -> np.ndarray:
    ids = np.concatenate([b[:, 0] for b in batches])
    assert all(np.all(b == b[:, :1]) for b in batches)  # rows are never torn apart
    return ids.astype(np.int64)


def _take(reader: ShuffledReader, n: int) -> list[np.ndarray]:
    try:
        return [next(reader) for _ in range(n)]
    finally:
        reader.close()


def test_reader_every_row_once_per_epoch(index_store):
    r = ShuffledReader(index_store, 96, seed=0, normalize=False, window_blocks=3)
    ids = _ids(_take(r, 40))  # 3840 rows: 3 whole epochs (batches straddle epoch boundaries)
    epochs = [ids[e * N:(e + 1) * N] for e in range(3)]
    for order in epochs:
        assert np.array_equal(np.sort(order), np.arange(N))
    assert not np.array_equal(epochs[0], np.arange(N))  # shuffled ...
    assert not np.array_equal(epochs[0], epochs[1])  # ... differently each epoch
    assert r.position == {"step": 40, "epoch": 3, "row_in_epoch": 840} and r.epoch == 3


def test_reader_two_processes_are_disjoint_and_cover(index_store):
    seen = []
    for p in range(2):
        r = ShuffledReader(index_store, 50, seed=7, process_index=p, process_count=2, normalize=False,
                           window_blocks=2)
        ids = _ids(_take(r, -(-2 * r.n_rows // 50)))
        for e in range(2):
            assert np.array_equal(np.sort(ids[e * r.n_rows:(e + 1) * r.n_rows]),
                                  np.sort(ids[:r.n_rows]))  # same rows every epoch
        seen.append(ids[:r.n_rows])
    union = np.concatenate(seen)
    assert len(union) == N and np.array_equal(np.sort(union), np.arange(N))


def test_reader_deterministic_and_resumes_at_step(index_store):
    kw = dict(normalize=False, window_blocks=3)
    full = _take(ShuffledReader(index_store, 96, seed=5, **kw), 30)
    same = _take(ShuffledReader(index_store, 96, seed=5, **kw), 30)
    assert all(np.array_equal(a, b) for a, b in zip(full, same))
    other = _take(ShuffledReader(index_store, 96, seed=6, **kw), 30)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other))
    for start in (1, 10, 11, 23):  # inside a window, at an epoch boundary (10*96 < 1000 < 11*96), later
        resumed = _take(ShuffledReader(index_store, 96, seed=5, start_step=start, **kw), 30 - start)
        assert all(np.array_equal(a, b) for a, b in zip(full[start:], resumed))
    r = ShuffledReader(index_store, 96, seed=5, **kw)
    assert np.array_equal(r.batch_at(17), full[17])
    r.close()  # its prefetch thread would otherwise go on reading the shared store in the next test


def test_reader_reads_whole_blocks_and_normalizes(index_store, monkeypatch):
    calls = []
    orig = index_store.read_async
    monkeypatch.setattr(index_store, "read_async", lambda a, b: calls.append((a, b)) or orig(a, b))
    r = ShuffledReader(index_store, 64, seed=1, window_blocks=4, block_rows=128)
    batches = _take(r, 20)
    ids = _ids([b * 2.0 for b in batches])  # normalize=True divides by the store's scale (2.0)
    assert np.all(np.isin(ids, np.arange(N)))
    assert calls and all(a % 128 == 0 and b - a == min(128, N - a) for a, b in calls)
    assert not r._thread.is_alive()  # close() stopped the prefetch thread
    with pytest.raises(RuntimeError, match="closed"):
        next(r)
    with pytest.raises(ValueError, match="multiple of the store's chunk_rows"):
        ShuffledReader(index_store, 64, seed=1, block_rows=100)


def test_reader_bf16_store(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    st = write_array_store(tmp_path / "bf", x, dtype="bfloat16", chunk_rows=32, shard_chunks=4)
    assert st.dtype == "bfloat16" and st.shard_rows == 128
    batches = _take(ShuffledReader(tmp_path / "bf", 100, seed=0, normalize=False), 3)
    rows = np.concatenate(batches)
    assert rows.dtype == np.float32
    want = x.astype(st.array.dtype.numpy_dtype).astype(np.float32)
    assert np.array_equal(rows[np.lexsort(rows.T[::-1])], want[np.lexsort(want.T[::-1])])


# --------------------------------------------------------------------------- missing and damaged data

def _shard_files(p) -> list:
    return sorted(f for f in (p / "activations" / "c").rglob("*") if f.is_file())


def test_collected_store_has_a_manifest(collected):
    url, _ = collected
    man = open_store(url).meta["manifest"]
    assert man["rows"] == 1000 and "activations/zarr.json" in man["files"]
    shards = [k for k in man["files"] if k.startswith("activations/c/")]
    assert len(shards) == -(-1000 // 64) and all(v > 0 for v in man["files"].values())


def test_missing_shard_is_an_error_not_zeros(tmp_path):
    p = tmp_path / "st"
    x = np.arange(1, 1 + 256 * 8, dtype=np.float32).reshape(256, 8)
    write_array_store(p, x, chunk_rows=16, shard_chunks=2)  # 8 shard files of 32 rows
    files = _shard_files(p)
    assert len(files) == 8 and set(open_store(p).meta["manifest"]["files"]) == \
        {"activations/zarr.json", *(str(f.relative_to(p)) for f in files)}
    files[3].unlink()  # rows [96, 128)
    with pytest.raises(StoreError, match=r"file activations/c/3/0 is missing.*delete .*st"):
        open_store(p)
    st = open_store(p, verify=False)  # even unchecked, a read of the lost rows fails instead of giving zeros
    assert np.array_equal(st.read(0, 96), x[:96])
    with pytest.raises(StoreError, match=r"missing or corrupt.*c/3/0.*delete"):
        st.read(90, 100)
    r = ShuffledReader(st, 64, seed=0, normalize=False)
    with pytest.raises(StoreError, match="c/3/0"):
        _take(r, 4)  # one epoch: every row is read once


def test_all_zero_rows_are_stored_not_missing(tmp_path):
    x = np.zeros((64, 8), np.float32)
    x[32:] = 1.0  # the first shard is all fill value: it must still be written, and read back
    st = write_array_store(tmp_path / "z", x, chunk_rows=16, shard_chunks=2, scale=1.0)
    assert len(_shard_files(tmp_path / "z")) == 2 and np.array_equal(st.read(0, 64), x)


def test_truncated_or_flipped_shard_is_named(tmp_path):
    p = tmp_path / "st"
    x = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
    write_array_store(p, x, chunk_rows=16, shard_chunks=2)
    a, b = _shard_files(p)[1], _shard_files(p)[2]
    good = a.read_bytes()
    a.write_bytes(good[:len(good) // 2])
    with pytest.raises(StoreError, match=r"file activations/c/1/0 has \d+ bytes, the manifest says \d+"):
        open_store(p)
    a.write_bytes(good)
    data = bytearray(b.read_bytes())
    data[5] ^= 0xFF  # same size: only the chunk checksum can tell
    b.write_bytes(bytes(data))
    st = open_store(p)  # sizes are right
    assert np.array_equal(st.read(0, 64), x[:64])
    with pytest.raises(StoreError, match=r"c/2/0.*[Dd]igest mismatch"):
        st.read(64, 96)
    with pytest.raises(StoreError, match=r"c/2/0"):
        S.verify_store(p, full=True)


def test_missing_key_in_memory_store():
    url = "memory://lost/"
    write_array_store(url, np.ones((64, 8), np.float32), chunk_rows=16, shard_chunks=2)
    kv = S._open_kv(url)
    kv.write("activations/c/1/0", None).result()  # delete
    with pytest.raises(StoreError, match="file activations/c/1/0 is missing"):
        open_store(url)
    with pytest.raises(StoreError, match="missing or corrupt"):
        open_store(url, verify=False).read(0, 64)
