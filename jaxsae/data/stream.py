"""Stream mode (`store.mode: stream`): the MSE phase's activations come from the LM inside the training
loop, through a shuffle buffer on device; nothing is written to disk but a small record of the scale.

The training text is cut into *blocks* of whole contexts, `store.buffer_rows` rows each (rounded down to
whole contexts), in stream order. Block b's rows are permuted with a seed from (seed, b) and split in
halves A_b, B_b. The batches are drawn, in order, from *windows*: window 0 is A_0, window w >= 1 is
B_{w-1} followed by A_w, permuted again with (seed, w). So the buffer is refilled when half drained, as
SAELens's mixing buffer is, and each batch mixes the rows of two blocks' contexts; unlike SAELens's the
half that stays is the previous block's alone, which makes batch s a pure function of (seed, s, the
blocks' start positions): a resumed run regenerates blocks w-1 and w (one buffer of LM forwards) from
their recorded start `Position`s and sees exactly the batches an uninterrupted run would. Every row is
used once (the last block's B half is never drawn).

The normalisation scale is estimated once from the stream's first `store.norm_sample_tokens` rows
(the rows a disk store's scale is taken from, in the same order), recorded at `store.path`/meta.json
with what produced it, and reused on every resume.

One process only today: a pod run keeps `store.mode: disk` (each host writes its own shards).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np

from jaxsae.data.packing import START, Position

_BLOCK_TAG, _WINDOW_TAG = 0, 1  # keep the two permutation seed streams apart
# what a stream's record must match on resume: the rows its scale was measured on
_IDENTITY_KEYS = ("model", "layer", "hook", "dtype", "context", "tokenizer", "source", "positions",
                  "norm_sample_tokens")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """How the stream's rows are made: LM layer, packing and the buffer."""

    layer: int
    context: int
    drop: int  # leading positions of each context not used (position 0 unless data.include_first_position)
    batch_contexts: int  # contexts per LM forward (store.batch_contexts)
    block_contexts: int  # contexts per block
    dtype: str  # the buffer's dtype (store.dtype)
    norm_sample_tokens: int

    @property
    def rows_per_context(self) -> int:
        return self.context - self.drop

    @property
    def block_rows(self) -> int:
        return self.block_contexts * self.rows_per_context

    @property
    def half(self) -> int:
        return self.block_rows // 2


def stream_spec(cfg, layer: int | None = None) -> StreamSpec:
    """The run config's stream (`store:` and `data:` sections)."""
    drop = 0 if cfg.data.include_first_position else 1
    per = cfg.data.context - drop
    return StreamSpec(cfg.hook.layer if layer is None else layer, cfg.data.context, drop, cfg.store.batch_contexts,
                      max(1, cfg.store.buffer_rows // per), cfg.store.dtype, cfg.store.norm_sample_tokens)


def window_of(spec: StreamSpec, row: int) -> tuple[int, int]:
    """(window, offset in it) of the stream's row `row`."""
    if row < spec.half:
        return 0, row
    w, off = divmod(row - spec.half, spec.block_rows)
    return w + 1, off


def window_start(spec: StreamSpec, w: int) -> int:
    """The stream row where window w begins."""
    return 0 if w == 0 else spec.half + (w - 1) * spec.block_rows


def window_size(spec: StreamSpec, w: int) -> int:
    return spec.half if w == 0 else spec.block_rows


def blocks_for(spec: StreamSpec, rows: int) -> int:
    """Blocks generated to stream `rows` rows (the last window's A half is its block's)."""
    return window_of(spec, rows - 1)[0] + 1 if rows > 0 else 0


class Stream:
    """The rows of a training stream, computed by the LM a block at a time (`StreamSpec`).

    source, tokenizer: the text (a `data.source` spec dict) and its tokenizer; bos: "auto" or None.
    rows_of: int32[n <= batch_contexts, context] -> the LM's residual rows [batch_contexts * rows_per_context,
    d_model] on device (the first n * rows_per_context are real; `collect._residual_rows`).
    starts: the start positions of blocks 0..m known so far (block 0's is the text's start); generating
    block b also finds block b+1's. A missing one is found by reading the text from the last known one
    (tokenizing only, no LM)."""

    def __init__(self, spec: StreamSpec, source: dict, tokenizer, bos, rows_of, starts: list[Position] | None = None,
                 what: str = "mse.tokens", sharding=None):
        from jaxsae.data.windows import WindowSpec

        self.spec, self.tokenizer, self.rows_of = spec, tokenizer, rows_of
        # the buffer's layout (`jaxsae.sharding.batch_sharding`: rows over the mesh's data axis), kept through
        # every permutation; None: wherever the LM's rows are
        self.take = _take(sharding)
        # blocks as a window's blocks (whole contexts from a position); n only sizes error messages
        self._text = WindowSpec(source, spec.context, bos, sys.maxsize, spec.block_contexts, 0, what)
        self.starts = list(starts) if starts else [START]
        self._open: tuple[int, Any] | None = None  # (the block it reads next, the positioned context iterator)

    def _read(self, k: int) -> np.ndarray:
        """Block k's contexts, read on from where block k-1's reading stopped when that was the last block
        read (the usual case: a tokenizer batch straddling two blocks is not tokenized twice), else from
        its recorded start; the same contexts either way (`packing.iter_positioned` resumes exactly)."""
        import itertools

        from jaxsae import config as C
        from jaxsae.data.packing import iter_positioned
        from jaxsae.data.text import make_source

        if self._open is None or self._open[0] != k:
            rows = iter_positioned(make_source(self._text.source), self.tokenizer, self.spec.context,
                                   bos_id=self._text.bos, start=self.starts[k])
            self._open = (k, rows)
        got = list(itertools.islice(self._open[1], self.spec.block_contexts))
        if len(got) < self.spec.block_contexts:
            self._open = None
            raise C.ConfigError(f"data.source ran out after {k * self.spec.block_contexts + len(got)} contexts of "
                                f"{self.spec.context} tokens in block {k} of the stream; {self._text.what} needs more: "
                                f"lower {self._text.what} or use a larger source")
        self._open = (k + 1, self._open[1])
        if k + 1 == len(self.starts):
            self.starts.append(got[-1][1])
        return np.stack([r for r, _ in got]).astype(np.int32)

    def _tokens(self, b: int) -> np.ndarray:
        """int32[block_contexts, context]: block b's contexts in stream order."""
        while True:
            k = min(b, len(self.starts) - 1)
            toks = self._read(k)
            if k == b:
                return toks

    def rows(self, toks: np.ndarray):
        """The LM's residual rows of contexts toks int32[n, context], [n * rows_per_context, d_model] on device
        (in the buffer's dtype), forwards of batch_contexts contexts at a time."""
        import jax.numpy as jnp

        bc, per = self.spec.batch_contexts, self.spec.rows_per_context
        parts = [self.rows_of(toks[i:i + bc])[:len(toks[i:i + bc]) * per] for i in range(0, len(toks), bc)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def block(self, b: int, seed: int):
        """Block b's rows [block_rows, d_model] on device, in their permuted order (seed, b)."""
        import jax.numpy as jnp

        rows = self.rows(self._tokens(b))
        return self.take(rows, jnp.asarray(permutation(seed, _BLOCK_TAG, b, self.spec.block_rows)))

    def first_rows(self, n: int) -> np.ndarray:
        """f32[n, d_model]: the stream's first n rows in text order (not normalised)."""
        from jaxsae.data.windows import read_block

        n_ctx = -(-n // self.spec.rows_per_context)
        toks, _ = read_block(dataclasses.replace(self._text, block=n_ctx), self.tokenizer, 0, START)
        return np.asarray(self.rows(toks)[:n], np.float32)

    def end(self, rows: int) -> Position:
        """Where the text goes on after the blocks that streaming `rows` rows generates (a KL window starts
        there: it never reads their text)."""
        n = blocks_for(self.spec, rows)
        while len(self.starts) <= n:  # tokenize forward from the last known start
            self._tokens(len(self.starts) - 1)
        return self.starts[n]

    def starts_json(self) -> list[dict[str, int]]:
        return [p.to_json() for p in self.starts]


def _take(sharding):
    """rows[perm] (rows: [n, d_model], perm: i32[n]) as one compiled gather, its result laid out by `sharding`."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda rows, perm: jnp.take(rows, perm, axis=0), out_shardings=sharding)


def permutation(seed: int, tag: int, i: int, n: int) -> np.ndarray:
    """int32[n]: the permutation of block (tag 0) or window (tag 1) `i`."""
    return np.random.default_rng(np.random.SeedSequence([seed, tag, i])).permutation(n).astype(np.int32)


class StreamReader:
    """Batches f32[batch_size, d_model] of a `Stream`, divided by `scale`: batch s is the stream's rows
    [s * batch_size, (s + 1) * batch_size) in window order. Holds at most the current window and the block
    whose B half the next window needs (1.5 buffers), plus the block being made."""

    def __init__(self, stream: Stream, batch_size: int, seed: int, scale: float):
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.inv_scale = np.float32(1.0 / scale)
        self._blocks: dict[int, Any] = {}
        self._window: tuple[int, Any] | None = None

    def _block(self, b: int):
        if b not in self._blocks:
            self._blocks = {k: v for k, v in self._blocks.items() if k >= b - 1}
            self._blocks[b] = self.stream.block(b, self.seed)
        return self._blocks[b]

    def window(self, w: int):
        """Window w's rows [window_size, d_model] on device, in their permuted order."""
        import jax.numpy as jnp

        if self._window is not None and self._window[0] == w:
            return self._window[1]
        spec = self.stream.spec
        if w == 0:
            rows = self._block(0)[:spec.half]
        else:
            rows = jnp.concatenate([self._block(w - 1)[spec.half:], self._block(w)[:spec.half]])
        self._blocks.pop(w - 1, None)  # its B half is in this window now
        rows = self.stream.take(rows, jnp.asarray(permutation(self.seed, _WINDOW_TAG, w, len(rows))))
        self._window = (w, rows)
        return rows

    def batch(self, s: int):
        """Batch s, f32[batch_size, d_model] on device (normalised)."""
        import jax.numpy as jnp

        spec, B = self.stream.spec, self.batch_size
        row, parts = s * B, []
        while row < (s + 1) * B:
            w, off = window_of(spec, row)
            take = min((s + 1) * B - row, window_size(spec, w) - off)
            parts.append(self.window(w)[off:off + take])
            row += take
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return x.astype(jnp.float32) * self.inv_scale


# ---------------------------------------------------------------------------------------- the record

class StreamStore:
    """What the phases read of a stream-mode run where a disk store would be: the scale, the first rows
    (the SAE's b_dec starts at their median), `meta` (its `stream_position`: where the MSE phase's text
    ends, set once that phase has run) and the rows the MSE phase streams (`n_tokens`, each one new)."""

    def __init__(self, stream: Stream, meta: dict, n_tokens: int):
        self.stream, self.meta, self.n_tokens = stream, meta, n_tokens
        self.scale = float(meta["scale"])
        self.url = meta.get("url", "stream")

    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def read(self, start: int, stop: int, normalize: bool = False) -> np.ndarray:
        """The stream's rows [start, stop) in text order (start 0 only): f32, divided by scale if `normalize`."""
        assert start == 0, "a stream is read from its start"
        x = self.stream.first_rows(stop)
        return x * np.float32(self.inv_scale()) if normalize else x

    def ended(self, position: Position) -> None:
        """The MSE phase streamed the text up to `position`: a KL phase's window starts there."""
        self.meta["stream_position"] = position.to_json()


def identity(lm, cfg, spec: StreamSpec) -> dict:
    """What produced the stream's rows (as a disk store records it, `collect._identity`)."""
    from jaxsae.data.collect import CollectSpec, _identity
    from jaxsae.data.text import make_source

    tok = lm.tokenizer
    bos = getattr(tok, "bos_token_id", None) if cfg.data.prepend_bos else None
    c = CollectSpec(spec.layer, cfg.mse.tokens, spec.context, spec.batch_contexts, spec.dtype, bos,
                    getattr(tok, "eos_token_id", None), spec.drop, spec.norm_sample_tokens, 1, 1)
    full = _identity(lm, make_source(cfg.data.source), tok, c)
    return {k: full[k] for k in _IDENTITY_KEYS}


def open_stream(cfg, lm, path: str, mesh=None, log=None) -> StreamStore:
    """The run's stream: its scale read from the record at `path` (meta.json), or measured on the stream's
    first rows and recorded there. A record made by another model, layer, text or packing is a StoreError."""
    from jaxsae.data.collect import _np_dtype, _residual_rows
    from jaxsae.data.store import FORMAT_VERSION, NORM, StoreError, _now, _open_kv, _write_meta, read_meta

    spec = stream_spec(cfg)
    rows_of = _residual_rows(lm, spec.layer, spec.drop, _np_dtype(spec.dtype), spec.batch_contexts, mesh)
    from jaxsae.sharding import batch_sharding

    stream = Stream(spec, cfg.data.source, lm.tokenizer, "auto" if cfg.data.prepend_bos else None, rows_of,
                    sharding=None if mesh is None else batch_sharding(mesh))
    want = identity(lm, cfg, spec)
    kv = _open_kv(path)
    meta = read_meta(kv)
    if meta is not None and meta.get("mode") != "stream":
        raise StoreError(f"store.path={path} holds a disk store; with store.mode=stream point store.path at a "
                         "new path (or set store.mode=disk to read it)")
    if meta is None:
        import jax

        t0 = time.time()
        n = spec.norm_sample_tokens
        x = stream.first_rows(n).astype(np.float64)
        total = float(np.einsum("ij,ij->", x, x))
        meta = {"format_version": FORMAT_VERSION, "mode": "stream", **want, "norm": NORM, "created": _now(),
                "scale": math.sqrt(total / n) if total > 0 else 1.0, "complete": True}
        if jax.process_index() == 0:
            _write_meta(kv, meta)
        if log is not None and not log.has("stream"):
            log.write({"phase": "stream", "step": 0, "tokens": 0, "seconds": round(time.time() - t0, 1),
                       "scale": meta["scale"]})
    else:
        diffs = [f"{k}: recorded {meta.get(k)!r}, now {want[k]!r}" for k in _IDENTITY_KEYS if meta.get(k) != want[k]]
        if diffs:
            raise StoreError(f"the stream recorded at store.path={path} was measured with another configuration ("
                             + "; ".join(diffs) + "): resume with the run's own config, or use a new run directory")
    meta = {**meta, "url": kv.url, "stream_position": START.to_json()}
    return StreamStore(stream, meta, cfg.mse.tokens)
