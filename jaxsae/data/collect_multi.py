"""Collection by several processes at once (`jax.process_count() > 1`, each with its own devices).

Shard s belongs to process s mod P. Every process walks the same packed text stream, runs the LM (its own
copy, on its own devices) only on the contexts of its shards, writes them, and records its progress in
`progress/process-<p>.json` (with the stream's `Position` after its last shard's contexts); after a
barrier, process 0 measures the scale, records the position after the store's last context (from the
process that wrote the last shard) and marks the store complete.
The rows are the same as one process would write, every row written once, and a killed collection
resumes per process (begun by P processes, a store resumes only with P).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from collections import deque

import numpy as np
import tensorstore as ts

from jaxsae.data.collect import (COMMIT_DELAY_ENV, CollectSpec, StoreInfo, _check_identity, _check_processes,
                                 _info, _residual_rows)
from jaxsae.data.store import (FORMAT_VERSION, StoreError, _create_array, _np_dtype, _now, _open_array, _scale,
                               _write_meta, hook_name, read_meta, store_manifest)


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


def collect_processes(lm, source, tokenizer, kv, want: dict, spec: CollectSpec, overwrite: bool,
                       progress: bool) -> StoreInfo:
    """Collection by every process at once (see the module docstring)."""
    import jax

    from jaxsae.distributed import barrier

    n_proc, me = jax.process_count(), jax.process_index()
    if me == 0:
        meta = None if overwrite else read_meta(kv)
        if meta is None:
            _create_array(kv, spec.n_tokens, want["model"]["d_model"], spec.dtype, spec.chunk_rows, spec.shard_rows)
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
    n_shards = -(-spec.n_tokens // spec.shard_rows)
    _write_own_shards(lm, source, tokenizer, kv, meta, arr, spec, list(range(me, n_shards, n_proc)), progress)
    barrier("jaxsae-collect-written")
    if me == 0:
        _finish_processes(kv, meta, arr, n_proc, n_shards, spec.rows_per_context)
    barrier("jaxsae-collect-end")
    meta = read_meta(kv)
    if not meta["complete"]:
        raise StoreError(f"the text source yielded no complete {spec.context}-token context; use more text")
    return _info(kv, meta)


def _shard_contexts(stream, recent: deque, c0: int, c1: int, first: int) -> list:
    """The contexts c0..c1-1 of the packed stream (enumerated from `first`; each a (row, Position after
    it) pair), pulling only what the previous shards did not; `recent` keeps the last few, as a shard
    may start inside them."""
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
    return ctxs


def _write_own_shards(lm, source, tokenizer, kv, meta: dict, arr, spec: CollectSpec, mine: list[int],
                      progress: bool) -> None:
    """This process's shards (`mine`): their contexts through its own LM copy, recorded one by one in
    progress/process-<p>.json so a killed process resumes after its last shard."""
    from tqdm.auto import tqdm

    import jax
    from jaxsae.data.packing import batch_contexts as _batch, iter_positioned

    me, r, d = jax.process_index(), spec.rows_per_context, meta["model"]["d_model"]
    key = f"progress/process-{me}.json"
    prog = _read_json(kv, key)
    if prog is None or prog.get("created") != meta["created"]:  # none yet, or left by an overwritten store
        prog = {"created": meta["created"], "shards_done": 0, "text_rows": None, "stream_position": None}
    todo = mine[prog["shards_done"]:]
    local_lm, local_mesh = _local_mesh(lm, spec.batch_contexts)
    rows_of = _residual_rows(local_lm, spec.layer, spec.drop, _np_dtype(spec.dtype), spec.batch_contexts, local_mesh)
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", disable=not progress or me != 0,
               desc=f"collect {hook_name(spec.layer)} ({jax.process_count()} processes)", dynamic_ncols=True)
    if todo and prog["text_rows"] is None:
        first = todo[0] * spec.shard_rows // r
        positioned = iter_positioned(source, tokenizer, spec.context, bos_id=spec.bos, eos_id=spec.eos)
        stream = enumerate(itertools.islice(positioned, first, None), start=first)
        recent: deque = deque()
        for s in todo:
            start, end = s * spec.shard_rows, min((s + 1) * spec.shard_rows, spec.n_tokens)
            c0 = start // r
            ctxs = _shard_contexts(stream, recent, c0, -(-end // r), first)
            rows = [np.asarray(rows_of(t))[:len(t) * r] for t in _batch((c for c, _ in ctxs), spec.batch_contexts,
                                                                        drop_last=False)]
            rows = np.concatenate(rows) if rows else np.zeros((0, d), _np_dtype(spec.dtype))
            part = rows[start - c0 * r:][:end - start]
            if len(part):
                arr[start:start + len(part)].write(part).result()
            prog["shards_done"] += 1
            if recent:  # after the shard's last context, or the text's last when it ran out
                prog["stream_position"] = (ctxs[-1] if ctxs else recent[-1][1])[1].to_json()
            if len(part) < end - start:  # the text ran out inside (or before) this shard
                prog.update(shards_done=len(mine), text_rows=(c0 + len(ctxs)) * r)
            kv.write(key, json.dumps(prog).encode()).result()
            bar.update(1)
            if delay:
                time.sleep(delay)
            if prog["text_rows"] is not None:
                break
    bar.close()


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
    # the process that wrote the store's last context knows where the stream goes on after it
    last = progs[(n_shards - 1) % n_proc] if pos == n else next(p for p in progs if p.get("text_rows") == pos)
    if last.get("stream_position") is not None:
        meta["stream_position"] = last["stream_position"]
    meta.update(tokens_written=pos, contexts_consumed=-(-pos // r), text_exhausted=pos < n, complete=True,
                scale=_scale(arr, min(meta["norm_sample_tokens"], pos), 4 * meta["chunk_rows"]),
                manifest=store_manifest(kv, pos))  # after the barrier: every process's shards are written
    _write_meta(kv, meta)
