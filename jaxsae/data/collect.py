"""Collection: an LM's residuals over a text stream into the activation store (`store.py`), resumable.

One process: shards are written in row order and committed to meta.json one by one (`tokens_written`).

Several processes (`jax.process_count() > 1`, each with its own devices): shard s belongs to process
s mod P. Every process walks the same packed text stream, runs the LM (its own copy, on its own
devices) only on the contexts of its shards, writes them, and records its progress in
`progress/process-<p>.json`; after a barrier, process 0 measures the scale and marks the store
complete. The rows are the same as one process would write, every row written once, and a killed
collection resumes per process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from collections import deque
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorstore as ts

from jaxsae.data.store import (FORMAT_VERSION, ActivationStore, PathLike, StoreError, _create_array, _jsonable,
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


def _identity(lm, layer, source, tokenizer, *, n_tokens, context, batch_contexts, dtype, bos, eos, drop,
              norm_sample_tokens, chunk_rows, shard_rows) -> dict[str, Any]:
    cfg = lm.config
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size()
    return _jsonable({
        "model": {"path": str(lm.path) if lm.path is not None else None, "arch": cfg.arch,
                  "d_model": lm.d_model, "n_layers": lm.n_layers, "config": dataclasses.asdict(cfg)},
        "layer": layer, "hook": hook_name(layer), "dtype": dtype, "context": context,
        "batch_contexts": batch_contexts,
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
                      "vocab_size": vocab, "bos_id": bos, "eos_id": eos},
        "source": source.describe() if hasattr(source, "describe") else {"kind": type(source).__name__},
        "positions": {"bos_prepended": bos is not None, "dropped": list(range(drop)),
                      "rows_per_context": context - drop,
                      "padding": "none: contexts are fully packed; the trailing partial context is dropped"},
        "tokens_target": n_tokens, "norm_sample_tokens": norm_sample_tokens,
        "chunk_rows": chunk_rows, "shard_rows": shard_rows})


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
    """
    from tqdm.auto import tqdm

    import jax
    from jaxsae.data.text import batch_contexts as _batch, iter_contexts

    layer = lm.check_layer(layer)
    np_dtype = _np_dtype(dtype)
    if n_tokens < 1 or batch_contexts < 1 or shard_chunks < 1:
        raise ValueError("n_tokens, batch_contexts and shard_chunks must be >= 1")
    bos = getattr(tokenizer, "bos_token_id", None) if bos_id == "auto" else bos_id
    eos = getattr(tokenizer, "eos_token_id", None) if eos_id == "auto" else eos_id
    # drop_first decides outright; otherwise position 0 goes only when it holds a prepended BOS.
    # (Without BOS, position 0 of a packed context still attends only to itself and is an outlier
    # too: the trainer passes drop_first from data.include_first_position.)
    drop = int(drop_first) if drop_first is not None else (1 if drop_bos and bos is not None else 0)
    r = context - drop  # rows per context
    if r < 1:
        raise ValueError(f"context={context} leaves no rows after dropping {drop} position(s)")
    d = lm.d_model
    chunk_rows = chunk_rows or chunk_rows_for(d, dtype)
    shard_rows = chunk_rows * shard_chunks
    want = _identity(lm, layer, source, tokenizer, n_tokens=n_tokens, context=context,
                     batch_contexts=batch_contexts, dtype=dtype, bos=bos, eos=eos, drop=drop,
                     norm_sample_tokens=norm_sample_tokens, chunk_rows=chunk_rows, shard_rows=shard_rows)

    kv = _open_kv(path)
    if jax.process_count() > 1:
        return _collect_processes(lm, layer, source, tokenizer, kv, want, n_tokens=n_tokens, context=context,
                                  batch_contexts=batch_contexts, dtype=dtype, bos=bos, eos=eos, drop=drop,
                                  overwrite=overwrite, progress=progress)
    meta = None if overwrite else read_meta(kv)
    if meta is None:
        arr = _create_array(kv, n_tokens, d, dtype, chunk_rows, shard_rows)
        meta = {"format_version": FORMAT_VERSION, **want, "created": _now(), "tokens_written": 0,
                "contexts_consumed": 0, "scale": None, "complete": False, "text_exhausted": False}
        _write_meta(kv, meta)
    else:
        _check_identity(meta, want, kv.url)
        _check_processes(meta, 1, kv.url)
        arr = _open_array(kv, meta)
    done = meta["tokens_written"]  # a multiple of shard_rows, unless the final partial shard

    def info() -> StoreInfo:
        return _info(kv, meta)

    if meta["complete"]:
        return info()

    n_scale = min(norm_sample_tokens, n_tokens)
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    inflight: deque[tuple[int, Any]] = deque()  # (end row, write future), oldest first

    def commit(block: bool) -> None:
        # In order, so tokens_written never passes a shard that is still being written.
        while inflight and (block or inflight[0][1].done() or len(inflight) > _MAX_INFLIGHT_WRITES):
            end, fut = inflight.popleft()
            fut.result()
            meta.update(tokens_written=end, contexts_consumed=-(-end // r))  # contexts touched
            if meta["scale"] is None and end >= n_scale:
                meta["scale"] = _scale(arr, n_scale, d, 4 * chunk_rows)
            _write_meta(kv, meta)
            if delay:
                time.sleep(delay)

    rows_of = _residual_rows(lm, layer, drop, np_dtype, batch_contexts, mesh)
    per_batch = batch_contexts * r
    b0 = done // per_batch  # restart at a batch boundary: same batches -> bit-identical rows

    def batches() -> Iterator[tuple[int, Any]]:
        contexts = iter_contexts(source, tokenizer, context, bos_id=bos, eos_id=eos,
                                 skip_contexts=b0 * batch_contexts)
        for toks in _batch(contexts, batch_contexts, drop_last=False):
            yield len(toks), rows_of(toks)

    skip, pos = done - b0 * per_batch, done  # pos: first row not yet handed to tensorstore
    buf: list[np.ndarray] = []
    n_buf = 0
    bar = tqdm(total=n_tokens, initial=done, unit="tok", unit_scale=True, disable=not progress,
               desc=f"collect {hook_name(layer)}", dynamic_ncols=True)
    try:
        for n_real, out in _one_ahead(batches() if done < n_tokens else ()):
            rows = np.asarray(out)[skip:n_real * r][:n_tokens - pos - n_buf]
            skip = 0
            buf.append(rows)
            n_buf += len(rows)
            bar.update(len(rows))
            final = pos + n_buf == n_tokens
            k = n_buf if final else n_buf // shard_rows * shard_rows
            if k:
                x = np.concatenate(buf)
                inflight.append((pos + k, arr[pos:pos + k].write(x[:k])))
                pos, buf, n_buf = pos + k, [x[k:]], n_buf - k
            commit(block=False)
            if final:
                break
        if n_buf:  # text ran out: write the partial last shard
            inflight.append((pos + n_buf, arr[pos:pos + n_buf].write(np.concatenate(buf))))
            pos += n_buf
        commit(block=True)
    finally:
        bar.close()
    if pos == 0:
        raise StoreError(f"the text source yielded no complete {context}-token context; use more text")
    if pos < n_tokens:
        warnings.warn(f"text source ran out after {pos} of {n_tokens} tokens; the store at {kv.url} "
                      "is truncated to them", stacklevel=2)
        arr = arr.resize(exclusive_max=[pos, d], shrink_only=True).result()
        meta["text_exhausted"] = True
    if meta["scale"] is None:
        meta["scale"] = _scale(arr, min(n_scale, pos), d, 4 * chunk_rows)
    meta.update(complete=True, manifest=store_manifest(kv, pos))  # every write above has finished
    _write_meta(kv, meta)
    return info()


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


def _local_mesh(lm, batch_contexts: int):
    """(lm on this process's devices, their data-parallel mesh): collection needs no other process."""
    import math

    import jax

    from jaxsae.sharding import lm_param_shardings, make_mesh, shard

    devices = jax.local_devices()
    n = math.gcd(len(devices), batch_contexts)  # as many devices as split the batch evenly
    mesh = make_mesh(n, 1, devices[:n])
    local = _process_local(lm)
    return type(local)(local.config, shard(local.params, lm_param_shardings(local.config, mesh)), local.path), mesh


def _process_local(lm):
    """`lm` with its params as this process's own copy: collection needs no other process."""
    import jax
    from jax.experimental import multihost_utils

    from jaxsae.models.lm import LM

    def local(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return a
        if a.is_fully_replicated:
            return a.addressable_data(0)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return LM(lm.config, jax.tree.map(local, lm.params), lm.path)


def _read_json(kv: ts.KvStore, key: str) -> dict | None:
    res = kv.read(key).result()
    return json.loads(bytes(res.value).decode()) if res.state == "value" else None


def _collect_processes(lm, layer, source, tokenizer, kv, want, *, n_tokens, context, batch_contexts, dtype,
                       bos, eos, drop, overwrite, progress) -> StoreInfo:
    """Collection by every process at once (see the module docstring)."""
    from tqdm.auto import tqdm

    import jax
    from jaxsae.data.text import batch_contexts as _batch, iter_contexts
    from jaxsae.distributed import barrier

    n_proc, me = jax.process_count(), jax.process_index()
    d, r = want["model"]["d_model"], want["positions"]["rows_per_context"]
    chunk_rows, shard_rows = want["chunk_rows"], want["shard_rows"]
    if me == 0:
        meta = None if overwrite else read_meta(kv)
        if meta is None:
            _create_array(kv, n_tokens, d, dtype, chunk_rows, shard_rows)
            _write_meta(kv, {"format_version": FORMAT_VERSION, **want, "created": _now(), "tokens_written": 0,
                             "contexts_consumed": 0, "scale": None, "complete": False, "text_exhausted": False,
                             "processes": n_proc})
    barrier("jaxsae-collect-begin")
    meta = read_meta(kv)
    _check_identity(meta, want, kv.url)
    _check_processes(meta, n_proc, kv.url)
    if meta["complete"]:
        return _info(kv, meta)
    arr = _open_array(kv, meta)

    n_shards = -(-n_tokens // shard_rows)
    mine = list(range(me, n_shards, n_proc))
    key = f"progress/process-{me}.json"
    prog = _read_json(kv, key)
    if prog is None or prog.get("created") != meta["created"]:  # none yet, or left by an overwritten store
        prog = {"created": meta["created"], "shards_done": 0, "text_rows": None}
    todo = mine[prog["shards_done"]:]
    local_lm, local_mesh = _local_mesh(lm, batch_contexts)
    rows_of = _residual_rows(local_lm, layer, drop, _np_dtype(dtype), batch_contexts, local_mesh)
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", disable=not progress or me != 0,
               desc=f"collect {hook_name(layer)} ({n_proc} processes)", dynamic_ncols=True)
    if todo and prog["text_rows"] is None:
        first = todo[0] * shard_rows // r
        stream = enumerate(iter_contexts(source, tokenizer, context, bos_id=bos, eos_id=eos,
                                         skip_contexts=first), start=first)
        recent: deque = deque()  # the last contexts pulled, in case the next shard starts inside them
        for s in todo:
            start, end = s * shard_rows, min((s + 1) * shard_rows, n_tokens)
            c0, c1 = start // r, -(-end // r)
            ctxs = [c for i, c in recent if i >= c0]
            last = recent[-1][0] if recent else first - 1
            for i, c in stream if last < c1 - 1 else ():
                recent.append((i, c))
                if len(recent) > 4:
                    recent.popleft()
                if i >= c0:
                    ctxs.append(c)
                if i == c1 - 1:
                    break
            rows = [np.asarray(rows_of(t))[:len(t) * r] for t in _batch(iter(ctxs), batch_contexts, drop_last=False)]
            rows = np.concatenate(rows) if rows else np.zeros((0, d), _np_dtype(dtype))
            part = rows[start - c0 * r:][:end - start]
            if len(part):
                arr[start:start + len(part)].write(part).result()
            prog["shards_done"] += 1
            if len(part) < end - start:  # the text ran out inside (or before) this shard
                prog.update(shards_done=len(mine), text_rows=(c0 + len(ctxs)) * r)
            kv.write(key, json.dumps(prog).encode()).result()
            bar.update(1)
            if delay:
                time.sleep(delay)
            if prog["text_rows"] is not None:
                break
    bar.close()
    barrier("jaxsae-collect-written")
    if me == 0:
        _finish_processes(kv, meta, arr, n_proc, n_shards, r)
    barrier("jaxsae-collect-end")
    meta = read_meta(kv)
    if not meta["complete"]:
        raise StoreError(f"the text source yielded no complete {context}-token context; use more text")
    return _info(kv, meta)


def _finish_processes(kv, meta, arr, n_proc: int, n_shards: int, r: int) -> None:
    """Process 0, after every process wrote its shards: truncation, scale, `complete`."""
    n, d = meta["tokens_target"], meta["model"]["d_model"]
    progs = [_read_json(kv, f"progress/process-{q}.json") or {} for q in range(n_proc)]
    for q, prog in enumerate(progs):
        owned = len(range(q, n_shards, n_proc))
        assert prog.get("shards_done", 0) == owned, f"process {q} finished {prog.get('shards_done')} of {owned}"
    short = [prog["text_rows"] for prog in progs if prog.get("text_rows") is not None]
    pos = min([n, *short])
    if pos == 0:
        return
    if pos < n:
        warnings.warn(f"text source ran out after {pos} of {n} tokens; the store at {kv.url} is truncated "
                      "to them", stacklevel=3)
        arr = arr.resize(exclusive_max=[pos, d], shrink_only=True).result()
    meta.update(tokens_written=pos, contexts_consumed=-(-pos // r), text_exhausted=pos < n, complete=True,
                scale=_scale(arr, min(meta["norm_sample_tokens"], pos), d, 4 * meta["chunk_rows"]),
                manifest=store_manifest(kv, pos))  # after the barrier: every process's shards are written
    _write_meta(kv, meta)
