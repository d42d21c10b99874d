"""Stream mode (`store.mode: stream`, jaxsae/data/stream.py): the MSE phase's rows made by the LM in the loop.

The buffer's arithmetic on row ids (every row once, batch s a pure function of s, two blocks mixed per
window), then the tiny run in stream mode: its scale is the disk store's, a SIGKILL mid-MSE resumes bit for
bit, and the fine-tune's window starts after the text the MSE phase streamed."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.data import stream as S
from jaxsae.data.packing import Position

SPEC = S.StreamSpec(layer=1, context=8, drop=0, batch_contexts=4, block_contexts=12, dtype="float32",
                    norm_sample_tokens=16)  # 96-row blocks, 48-row halves


class IdStream(S.Stream):
    """A stream whose row r is the number r (so batches show which rows they took); counts the blocks made."""

    def __init__(self, spec=SPEC):
        self.spec, self.made, self.take = spec, [], S._take(None)

    def block(self, b, seed):
        self.made.append(b)
        ids = b * self.spec.block_rows + np.arange(self.spec.block_rows)
        return jnp.asarray(ids[S.permutation(seed, S._BLOCK_TAG, b, self.spec.block_rows)], jnp.float32)[:, None]


def ids(reader, steps):
    return [np.asarray(reader.batch(s))[:, 0].astype(int) for s in steps]


def test_window_arithmetic():
    assert [S.window_of(SPEC, r) for r in (0, 47, 48, 143, 144)] == [(0, 0), (0, 47), (1, 0), (1, 95), (2, 0)]
    assert [S.window_start(SPEC, w) for w in range(3)] == [0, 48, 144]
    assert [S.blocks_for(SPEC, n) for n in (0, 1, 48, 49, 144, 145)] == [0, 1, 1, 2, 2, 3]


def test_every_row_once_mixed_over_two_blocks_and_batch_s_is_pure():
    B, steps = 20, 30  # 600 rows: windows 0..6, batches straddling windows
    reader = S.StreamReader(IdStream(), B, seed=3, scale=1.0)
    got = ids(reader, range(steps))
    flat = np.concatenate(got)
    assert len(set(flat.tolist())) == len(flat)  # no row twice
    n_blocks = S.blocks_for(SPEC, B * steps)
    half = SPEC.half
    # the rows are exactly windows 0..w_last: block b's first half (A_b) and, before the last, its second half
    used_blocks = {int(r) // SPEC.block_rows for r in flat}
    assert used_blocks == set(range(n_blocks))
    # window 1 (rows 48..143 of the stream = batches 2.4 .. 7.2) mixes blocks 0 and 1 in each batch
    for s in (3, 4, 5, 6):
        assert {int(r) // SPEC.block_rows for r in got[s]} == {0, 1}, s
    # not stream order: shuffled within windows
    assert not np.array_equal(flat[:half], np.sort(flat[:half]))
    # a fresh reader asked for batch s (a resume) gives the same rows, making only blocks s's window needs
    for s in (0, 7, 17, 29):
        fresh = IdStream()
        again = S.StreamReader(fresh, B, seed=3, scale=1.0)
        np.testing.assert_array_equal(ids(again, [s])[0], got[s])
        w0, w1 = S.window_of(SPEC, s * B)[0], S.window_of(SPEC, s * B + B - 1)[0]
        assert set(fresh.made) <= {max(w0 - 1, 0), *range(w0, w1 + 1)}, (s, fresh.made)
    # another seed, another order
    other = np.concatenate(ids(S.StreamReader(IdStream(), B, seed=4, scale=1.0), range(steps)))
    assert not np.array_equal(other, flat)


def test_reader_keeps_at_most_two_blocks():
    stream = IdStream()
    reader = S.StreamReader(stream, 16, seed=0, scale=2.0)
    for s in range(40):
        x = reader.batch(s)
        assert x.dtype == jnp.float32 and len(reader._blocks) <= 2
    assert stream.made == sorted(set(stream.made))  # each block made once, in order
    assert float(jnp.max(reader.batch(0))) < SPEC.block_rows / 2  # divided by the scale


def test_stream_mode_is_one_process_and_its_buffer_holds_two_batches():
    from jaxsae import config as C
    from jaxsae.validate import check_mesh

    with pytest.raises(C.ConfigError, match="store.buffer_rows=4096 must be at least 2 x mse.batch_size"):
        C.load_config(None, ["store.mode=stream", "store.buffer_rows=4096", "mse.batch_size=4096"])
    cfg = C.load_config(None, ["store.mode=stream"])
    with pytest.raises(C.ConfigError, match="store.mode=stream runs in one process today, not 2"):
        check_mesh(cfg, 8, 2)


# ------------------------------------------------------------------------------ the tiny run, streamed

STREAM = ("--set", "store.mode=stream", "--set", "store.buffer_rows=8192", "--set", "phases=[mse, finetune]",
          "--set", "finetune.lr=1e-3")


@pytest.fixture(scope="module")
def stream_run(tiny_model, tmp_path_factory):
    from conftest import run_cmd, tiny_args

    run_dir = tmp_path_factory.mktemp("runs") / "stream"
    r = run_cmd(tiny_args(tiny_model, run_dir, *STREAM))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_stream_run_writes_no_store_and_measures_the_disk_stores_scale(stream_run, mse_finetune_run):
    meta = json.loads((stream_run / "store" / "meta.json").read_text())
    assert meta["mode"] == "stream" and not (stream_run / "store" / "activations").exists()
    disk = json.loads((mse_finetune_run / "store" / "meta.json").read_text())
    # the same first rows of the same text: the same scale (summed in another order)
    assert meta["scale"] == pytest.approx(disk["scale"], rel=1e-6)
    ev = json.loads((stream_run / "eval.json").read_text())
    assert ev["mse"]["phase_unique_tokens"] == ev["mse"]["phase_tokens"] == 25600
    # quality like the disk run's (same text and budget; another shuffle)
    base = json.loads((mse_finetune_run / "eval.json").read_text())
    assert abs(ev["mse"]["fve"] - base["mse"]["fve"]) < 0.05, (ev["mse"]["fve"], base["mse"]["fve"])


def test_the_finetune_window_starts_after_the_streamed_text(stream_run):
    from jaxsae.checkpoint import Checkpointer

    def meta(phase):
        c = Checkpointer(str(stream_run / "checkpoints" / phase))
        try:
            return c.restore_meta()
        finally:
            c.close()

    starts = [Position.from_json(p) for p in meta("mse")["stream_starts"]]
    spec = S.StreamSpec(1, 32, 0, 16, 8192 // 32, "float32", 4096)  # the tiny run's (position 0 included)
    n = S.blocks_for(spec, 25600)  # 100 steps x 256 rows
    assert len(starts) > n
    assert Position.from_json(meta("finetune")["window_starts"][0]) == starts[n]


def test_stream_run_resumes_bit_identically_after_kill(tiny_model, stream_run, tmp_path):
    import jaxsae
    from conftest import kill_mid_phase, run_cmd, tiny_args

    run_dir = tmp_path / "killed"
    args = tiny_args(tiny_model, run_dir, *STREAM)
    steps = kill_mid_phase(args, run_dir, phase="mse", after_step=20)
    assert steps and steps[-1] < 100, steps  # really interrupted mid-MSE
    r = run_cmd(args)
    assert r.returncode == 0, r.stderr[-3000:]
    for phase in ("mse", "finetune"):
        a = jaxsae.load_sae(stream_run / "checkpoints" / phase)
        b = jaxsae.load_sae(run_dir / "checkpoints" / phase)
        for k in a.params:
            np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=f"{phase} {k}")
    shutil.rmtree(run_dir)


@pytest.mark.multidevice
def test_the_buffer_lives_split_over_the_data_axis_and_gives_one_devices_batches():
    """On a 4 x 2 mesh the LM's rows and every permuted window stay split over `data` (no device holds the
    whole buffer), and the batches are the one-device stream's."""
    import jax

    from jaxsae.data.collect import _residual_rows
    from jaxsae.models.lm import load_lm
    from jaxsae.models.shipped import SHIPPED
    from jaxsae.sharding import batch_sharding, make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    lm = load_lm(SHIPPED)
    spec = S.StreamSpec(1, 32, 1, 8, 16, "float32", 64)  # blocks of 16 contexts (496 rows)
    src = {"kind": "stdlib", "split": "val"}
    mesh = make_mesh(4, 2)

    def reader(m):
        rows_of = _residual_rows(lm, 1, 1, np.float32, 8, m)
        return S.StreamReader(S.Stream(spec, src, lm.tokenizer, None, rows_of,
                                       sharding=None if m is None else batch_sharding(m)), 64, seed=1, scale=2.0)

    one, split = reader(None), reader(mesh)
    for s in range(12):  # windows 0..3: blocks made and carried over
        np.testing.assert_allclose(np.asarray(split.batch(s)), np.asarray(one.batch(s)), rtol=1e-5, atol=1e-5)
    w = split.window(S.window_of(spec, 11 * 64)[0])
    assert w.sharding.spec[0] == "data" and len({d for d in w.sharding.device_set}) == 8
    assert max(s.data.shape[0] for s in w.addressable_shards) == w.shape[0] // 4
