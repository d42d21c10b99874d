"""Collection: an LM's residuals over a text stream into the activation store (`store.py`), resumable.

One process: shards are written in row order and committed to meta.json one by one (`tokens_written`,
`contexts_consumed`, and `stream_position`: the `Position` of the text stream after the last context those
rows touched, where a KL phase's window starts without re-reading the store's text). A killed collection
restarts at the last whole batch before its committed rows, from the position recorded for it
(`resume_at`), without re-reading the text before.
Several processes: `collect_multi.py` (each process writes the shards it owns).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections import deque
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorstore as ts

from jaxsae.data.store import (FORMAT_VERSION, NORM, ActivationStore, PathLike, StoreError, _create_array, _jsonable,
                               _now, _np_dtype, _open_array, _open_kv, _scale, _write_meta, chunk_rows_for,
                               hook_name, open_store, read_meta, store_manifest)

# Test hook: seconds to sleep after each commit, so a test can SIGKILL a collection mid-way.
COMMIT_DELAY_ENV = "JAXSAE_STORE_COMMIT_DELAY"
_MAX_INFLIGHT_WRITES = 2  # shard writes in flight while the next batches are computed
# Meta fields that must match between a store and the arguments of a resumed collection.
_IDENTITY_KEYS = ("model", "layer", "hook", "dtype", "context", "batch_contexts", "tokenizer", "source",
                  "positions", "tokens_target", "norm_sample_tokens", "chunk_rows", "shard_rows")


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What ``collect`` produced: the committed row count, shape facts and the full metadata."""

    url: str
    n_tokens: int
    d_model: int
    dtype: str
    scale: float | None
    complete: bool
    text_exhausted: bool
    meta: dict[str, Any]

    def open(self, allow_incomplete: bool = False) -> ActivationStore:
        return open_store(self.url, allow_incomplete=allow_incomplete)


@dataclasses.dataclass(frozen=True)
class CollectSpec:
    """How a store is collected, resolved once from `collect`'s arguments (special-token ids looked up,
    the dropped positions and the chunk layout decided)."""

    layer: int
    n_tokens: int
    context: int
    batch_contexts: int
    dtype: str
    bos: int | None
    eos: int | None
    drop: int  # leading positions of each context not stored
    norm_sample_tokens: int
    chunk_rows: int
    shard_rows: int

    @property
    def rows_per_context(self) -> int:
        return self.context - self.drop


def _identity(lm, source, tokenizer, spec: CollectSpec) -> dict[str, Any]:
    cfg = lm.config
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size()
    return _jsonable({
        "model": {"path": str(lm.path) if lm.path is not None else None, "arch": cfg.arch,
                  "d_model": lm.d_model, "n_layers": lm.n_layers, "config": dataclasses.asdict(cfg)},
        "layer": spec.layer, "hook": hook_name(spec.layer), "dtype": spec.dtype, "context": spec.context,
        "batch_contexts": spec.batch_contexts,
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
                      "vocab_size": vocab, "bos_id": spec.bos, "eos_id": spec.eos},
        "source": source.describe() if hasattr(source, "describe") else {"kind": type(source).__name__},
        "positions": {"bos_prepended": spec.bos is not None, "dropped": list(range(spec.drop)),
                      "rows_per_context": spec.rows_per_context,
                      "padding": "none: contexts are fully packed; the trailing partial context is dropped"},
        "tokens_target": spec.n_tokens, "norm_sample_tokens": spec.norm_sample_tokens, "norm": NORM,
        "chunk_rows": spec.chunk_rows, "shard_rows": spec.shard_rows})


def _check_identity(meta: Mapping[str, Any], want: Mapping[str, Any], where: str) -> None:
    diffs = []
    for k in _IDENTITY_KEYS:
        have, new = meta.get(k), want[k]
        if isinstance(have, dict) and isinstance(new, dict):  # name the innermost differing fields
            diffs += [f"{k}.{f}: store has {have.get(f)!r}, arguments give {new.get(f)!r}"
                      for f in sorted(set(have) | set(new)) if have.get(f) != new.get(f)]
        elif have != new:
            diffs.append(f"{k}: store has {have!r}, arguments give {new!r}")
    if diffs:
        raise StoreError(f"store {where} was collected with a different configuration: " + "; ".join(diffs)
                         + ". Pass the same arguments to resume it, or collect into a fresh path "
                         "(or pass overwrite=True to discard it).")


def _one_ahead(it: Iterable[Any]) -> Iterator[Any]:
    """Yields each item only after the next one was produced: the device computes batch i+1
    (async dispatch) while the host copies and writes batch i."""
    it = iter(it)
    prev = next(it, None)
    for cur in it:
        yield prev
        prev = cur
    if prev is not None:
        yield prev


def collect(lm, layer: int, source, tokenizer, path: PathLike, *, n_tokens: int, context: int,
            batch_contexts: int, dtype: str = "float32", drop_bos: bool = True, drop_first: bool | None = None,
            norm_sample_tokens: int = 1 << 16, bos_id: int | None | str = "auto",
            eos_id: int | None | str = "auto", chunk_rows: int | None = None, shard_chunks: int = 16,
            overwrite: bool = False, progress: bool = True, mesh=None) -> StoreInfo:
    """Collects ``n_tokens`` rows of ``lm``'s residual after block ``layer`` into the store at ``path``.

    Text is packed into int32[context] contexts (``iter_contexts``), run through ``lm.residual`` in
    int32[batch_contexts, context] batches, dropped positions removed, and written in whole shards;
    each shard is committed to meta.json only after its write finished. Calling ``collect`` again
    with the same arguments resumes after the last committed shard (no duplicate or missing rows;
    bit-identical to an uninterrupted run, because batches are recomputed from batch boundaries);
    on a complete store it returns at once. If the text runs out first the store is truncated to
    the rows written (``text_exhausted`` in the metadata, and a warning).

    drop_first decides outright whether position 0 is stored; otherwise (None) it goes only when it
    holds a prepended BOS and drop_bos. The trainer passes drop_first from data.include_first_position.
    """
    import jax

    if n_tokens < 1 or batch_contexts < 1 or shard_chunks < 1:
        raise ValueError("n_tokens, batch_contexts and shard_chunks must be >= 1")
    bos = getattr(tokenizer, "bos_token_id", None) if bos_id == "auto" else bos_id
    eos = getattr(tokenizer, "eos_token_id", None) if eos_id == "auto" else eos_id
    drop = int(drop_first) if drop_first is not None else (1 if drop_bos and bos is not None else 0)
    if context - drop < 1:
        raise ValueError(f"context={context} leaves no rows after dropping {drop} position(s)")
    chunk_rows = chunk_rows or chunk_rows_for(lm.d_model, dtype)
    spec = CollectSpec(lm.check_layer(layer), n_tokens, context, batch_contexts, dtype, bos, eos, drop,
                       norm_sample_tokens, chunk_rows, chunk_rows * shard_chunks)
    kv = _open_kv(path)
    want = _identity(lm, source, tokenizer, spec)
    if jax.process_count() > 1:
        from jaxsae.data.collect_multi import collect_processes

        return collect_processes(lm, source, tokenizer, kv, want, spec, overwrite, progress)
    meta, arr = _begin(kv, want, spec, overwrite)
    if not meta["complete"]:
        pos = _write_rows(lm, source, tokenizer, kv, meta, arr, spec, progress, mesh)
        _complete(kv, meta, arr, pos, spec)
    return _info(kv, meta)


def _begin(kv: ts.KvStore, want: dict, spec: CollectSpec, overwrite: bool) -> tuple[dict, Any]:
    """(meta, array) of a new store, or of the existing one after checking it was begun like this."""
    meta = None if overwrite else read_meta(kv)
    if meta is None:
        arr = _create_array(kv, spec.n_tokens, want["model"]["d_model"], spec.dtype, spec.chunk_rows,
                            spec.shard_rows)
        meta = {"format_version": FORMAT_VERSION, **want, "created": _now(), "tokens_written": 0,
                "contexts_consumed": 0, "scale": None, "complete": False, "text_exhausted": False}
        _write_meta(kv, meta)
        return meta, arr
    _check_identity(meta, want, kv.url)
    _check_processes(meta, 1, kv.url)
    return meta, _open_array(kv, meta)


class _Committer:
    """Shard writes in flight, committed to meta.json in row order as they finish, so tokens_written
    never passes a shard that is still being written."""

    def __init__(self, kv, meta: dict, arr, spec: CollectSpec):
        self.kv, self.meta, self.arr, self.spec = kv, meta, arr, spec
        self.inflight: deque[tuple[int, Any]] = deque()  # (end row, write future), oldest first
        self.n_scale = min(spec.norm_sample_tokens, spec.n_tokens)
        self.delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
        self.after: dict[int, Any] = {}  # contexts read -> the stream's Position after them (since the last commit)

    def write(self, start: int, rows: np.ndarray) -> None:
        self.inflight.append((start + len(rows), self.arr[start:start + len(rows)].write(rows)))

    def commit(self, block: bool) -> None:
        meta, spec = self.meta, self.spec
        while self.inflight and (block or self.inflight[0][1].done() or len(self.inflight) > _MAX_INFLIGHT_WRITES):
            end, fut = self.inflight.popleft()
            fut.result()
            used = -(-end // spec.rows_per_context)  # contexts touched
            restart = end // (spec.batch_contexts * spec.rows_per_context) * spec.batch_contexts
            meta.update(tokens_written=end, contexts_consumed=used, stream_position=self.after[used].to_json(),
                        resume_at={"contexts": restart, "position": self.after[restart].to_json()})
            self.after = {c: p for c, p in self.after.items() if c >= restart}  # later commits restart after it
            if meta["scale"] is None and end >= self.n_scale:
                meta["scale"] = _scale(self.arr, self.n_scale, 4 * spec.chunk_rows)
            _write_meta(self.kv, meta)
            if self.delay:
                time.sleep(self.delay)


def _write_rows(lm, source, tokenizer, kv, meta: dict, arr, spec: CollectSpec, progress: bool, mesh) -> int:
    """Runs the LM over the text after the committed rows and writes whole shards; returns the rows
    written in all (fewer than n_tokens when the text ran out)."""
    from tqdm.auto import tqdm

    from jaxsae.data.packing import START, Position, batch_contexts as _batch, iter_positioned

    done, r, n = meta["tokens_written"], spec.rows_per_context, spec.n_tokens
    rows_of = _residual_rows(lm, spec.layer, spec.drop, _np_dtype(spec.dtype), spec.batch_contexts, mesh)
    per_batch = spec.batch_contexts * r
    b0 = done // per_batch  # restart at a batch boundary: same batches -> bit-identical rows
    writer = _Committer(kv, meta, arr, spec)
    first = b0 * spec.batch_contexts
    # the last commit recorded where the text goes on after `first` contexts; a store from before that
    # was recorded restarts by reading (and tokenizing) them again
    resume = meta.get("resume_at") or {}
    jump = first > 0 and resume.get("contexts") == first
    start, i0 = (Position.from_json(resume["position"]), first) if jump else (START, 0)
    writer.after[i0] = start
    positioned = iter_positioned(source, tokenizer, spec.context, bos_id=spec.bos, eos_id=spec.eos, start=start)

    def contexts() -> Iterator[np.ndarray]:
        for i, (row, after) in enumerate(positioned, start=i0 + 1):
            if i >= first:
                writer.after[i] = after
            if i > first:
                yield row

    batches = ((len(t), rows_of(t)) for t in _batch(contexts(), spec.batch_contexts, drop_last=False))
    skip, pos = done - b0 * per_batch, done  # pos: first row not yet handed to tensorstore
    buf: list[np.ndarray] = []
    n_buf = 0
    bar = tqdm(total=n, initial=done, unit="tok", unit_scale=True, disable=not progress,
               desc=f"collect {hook_name(spec.layer)}", dynamic_ncols=True)
    try:
        for n_real, out in _one_ahead(batches if done < n else ()):
            rows = np.asarray(out)[skip:n_real * r][:n - pos - n_buf]
            skip = 0
            buf.append(rows)
            n_buf += len(rows)
            bar.update(len(rows))
            final = pos + n_buf == n
            k = n_buf if final else n_buf // spec.shard_rows * spec.shard_rows
            if k:
                x = np.concatenate(buf)
                writer.write(pos, x[:k])
                pos, buf, n_buf = pos + k, [x[k:]], n_buf - k
            writer.commit(block=False)
            if final:
                break
        if n_buf:  # text ran out: write the partial last shard
            writer.write(pos, np.concatenate(buf))
            pos += n_buf
        writer.commit(block=True)
    finally:
        bar.close()
    return pos


def _complete(kv, meta: dict, arr, pos: int, spec: CollectSpec) -> None:
    """Marks the store complete once every write has finished: truncation, scale, manifest."""
    d = meta["model"]["d_model"]
    if pos == 0:
        raise StoreError(f"the text source yielded no complete {spec.context}-token context; use more text")
    if pos < spec.n_tokens:
        warnings.warn(f"text source ran out after {pos} of {spec.n_tokens} tokens; the store at {kv.url} "
                      "is truncated to them", stacklevel=3)
        arr = arr.resize(exclusive_max=[pos, d], shrink_only=True).result()
        meta["text_exhausted"] = True
    if meta["scale"] is None:
        meta["scale"] = _scale(arr, min(spec.norm_sample_tokens, spec.n_tokens, pos), 4 * spec.chunk_rows)
    meta.pop("resume_at", None)  # only an unfinished store resumes
    meta.update(complete=True, manifest=store_manifest(kv, pos))
    _write_meta(kv, meta)


def _info(kv: ts.KvStore, meta: Mapping[str, Any]) -> StoreInfo:
    return StoreInfo(kv.url, meta["tokens_written"], meta["model"]["d_model"], meta["dtype"], meta["scale"],
                     meta["complete"], meta["text_exhausted"], dict(meta))


def _check_processes(meta: Mapping[str, Any], n: int, url: str) -> None:
    # Shard ownership depends on the process count, so an unfinished store resumes with the same count.
    begun = meta.get("processes", 1)
    if not meta["complete"] and begun != n:
        raise StoreError(f"store {url} was begun by {begun} process(es) and is unfinished; resume it with "
                         f"{begun} process(es), or collect into a fresh path")


def _residual_rows(lm, layer: int, drop: int, np_dtype, batch: int, mesh=None):
    """toks: int[n <= batch, context] -> rows [batch * (context - drop), D] (on device; the first
    n * (context - drop) are real). The batch is zero-padded to `batch` rows, so its shape (and the
    compiled program) stays the same. With `mesh`, it is split over the data axis (a numpy batch would
    otherwise be replicated: every device computing all of it)."""
    import jax

    from jaxsae.sharding import batch_from_global, batch_sharding

    post = jax.jit(lambda h: h[:, drop:].reshape(-1, h.shape[-1]).astype(np_dtype))
    place = (lambda t: t) if mesh is None else functools.partial(batch_from_global, sharding=batch_sharding(mesh))

    def rows_of(toks):
        toks = np.concatenate([toks, np.zeros((batch - len(toks), toks.shape[1]), np.int32)])
        return post(lm.residual(place(toks), layer))

    return rows_of


