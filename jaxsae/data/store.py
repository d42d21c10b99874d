"""Tensorstore activation store: layout, metadata, resumable collection, opening and validation.

Layout under any tensorstore kvstore (a local directory, ``file://``, ``memory://`` or ``gs://``):

    meta.json      the metadata record (below); rewritten after every committed write
    activations/   zarr3 array f32|bf16[rows, d_model], chunked along tokens only

The array's *read chunk* is ~1 MB (``chunk_rows`` rows, a power of two). With ``shard_chunks > 1``
the chunks are packed into shard files of ``shard_rows = chunk_rows * shard_chunks`` rows
(zarr3 ``sharding_indexed`` codec), so a billion-token store is thousands of files, not millions.
Collection writes whole shards only (a partial shard write would read-modify-write the shard file)
and bumps ``tokens_written`` in meta.json only after the shard write has finished: every row below
``tokens_written`` is durable, everything above it is garbage to be overwritten on resume.

Rows are the residual stream after block ``layer`` (``blocks.{layer}.hook_resid_post``) at every
position of packed contexts except the dropped ones (position 0 when ``drop_first``, or by default
when the packer prepends BOS and ``drop_bos``: its residual is a huge-norm outlier that says nothing about the text). Contexts are
fully packed, so there is no padding. ``scale`` is one scalar with E||x / scale||^2 = d_model over
the first ``norm_sample_tokens`` rows; readers multiply by 1/scale, exporters fold it back in.
``contexts_consumed`` counts the contexts with rows in the store (the last possibly in part), so a
later phase that skips that many contexts of the same text stream never reuses this text.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
import warnings
from collections import deque
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorstore as ts

FORMAT_VERSION = 1
META_KEY = "meta.json"
ARRAY_DIR = "activations/"
DTYPES = ("float32", "bfloat16")
# Test hook: seconds to sleep after each commit, so a test can SIGKILL a collection mid-way.
COMMIT_DELAY_ENV = "JAXSAE_STORE_COMMIT_DELAY"
_MAX_INFLIGHT_WRITES = 2  # shard writes in flight while the next batches are computed
# One context for the whole process: memory:// stores live in a context resource, so without a
# shared context every open would see a fresh, empty memory store.
_CONTEXT = ts.Context()
# Meta fields that must match between a store and the arguments of a resumed collection.
_IDENTITY_KEYS = ("model", "layer", "hook", "dtype", "context", "batch_contexts", "tokenizer", "source",
                  "positions", "tokens_target", "norm_sample_tokens", "chunk_rows", "shard_rows")
_REQUIRED_KEYS = ("format_version", "model", "dtype", "chunk_rows", "shard_rows", "tokens_target",
                  "tokens_written", "scale", "complete")

PathLike = str | os.PathLike | Mapping[str, Any] | ts.KvStore


class StoreError(ValueError):
    """A store is missing, corrupt, incomplete or does not match the requested configuration."""


# --------------------------------------------------------------------------- kvstore + metadata

def kvstore_spec(path: PathLike) -> dict[str, Any]:
    """Normalises a local path, URL (``file://``, ``memory://``, ``gs://``), spec dict or KvStore
    to a kvstore spec dict whose ``path`` is a directory (ends with ``/``)."""
    if isinstance(path, ts.KvStore):
        spec = path.spec().to_json()
    elif isinstance(path, Mapping):
        spec = dict(path)
    else:
        s = os.fspath(path)
        spec = ts.KvStore.Spec(s).to_json() if "://" in s else {"driver": "file", "path": os.path.abspath(s)}
    p = spec.get("path", "")
    if p and not p.endswith("/"):
        spec["path"] = p + "/"
    return spec


def _open_kv(path: PathLike) -> ts.KvStore:
    try:
        return ts.KvStore.open(kvstore_spec(path), context=_CONTEXT).result()
    except Exception as e:  # bad URL, unknown driver, no credentials ...
        raise StoreError(f"cannot open kvstore {path}: {e}") from e


def read_meta(path: PathLike) -> dict[str, Any] | None:
    """The parsed meta.json of the store at ``path``; None when there is none; StoreError if corrupt."""
    kv = path if isinstance(path, ts.KvStore) else _open_kv(path)
    res = kv.read(META_KEY).result()
    if res.state != "value":
        return None
    fix = ("restore it, or re-run collection into a fresh path (or with overwrite=True) to rebuild the store")
    try:
        meta = json.loads(bytes(res.value).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{META_KEY} of store {kv.url} is corrupt (not valid JSON: {e}); {fix}") from e
    if not isinstance(meta, dict):
        raise StoreError(f"{META_KEY} of store {kv.url} is corrupt (a JSON {type(meta).__name__}, "
                         f"not an object); {fix}")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if not isinstance(meta.get("model", {}), dict) or "d_model" not in meta.get("model", {}):
        missing.append("model.d_model")
    if missing:
        raise StoreError(f"{META_KEY} of store {kv.url} is corrupt: missing field(s) {missing}; {fix}")
    if meta["format_version"] != FORMAT_VERSION:
        raise StoreError(f"store {kv.url} has format_version {meta['format_version']!r}; this jaxsae reads "
                         f"version {FORMAT_VERSION}. Re-collect it with this version of jaxsae.")
    return meta


def _write_meta(kv: ts.KvStore, meta: dict[str, Any]) -> None:
    meta["updated"] = _now()
    # A single-key write is atomic on every kvstore driver (file: temp file + rename; gcs: object put),
    # so a kill leaves either the old or the new record, never half of one.
    kv.write(META_KEY, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()).result()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def chunk_rows_for(d_model: int, dtype: str, target_bytes: int = 1 << 20) -> int:
    """Rows per read chunk: the power of two nearest (in log scale) to ``target_bytes`` of rows."""
    row_bytes = d_model * np.dtype(_np_dtype(dtype)).itemsize
    return 1 << max(0, round(math.log2(max(1.0, target_bytes / row_bytes))))


def _np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    import ml_dtypes
    return np.float32 if dtype == "float32" else ml_dtypes.bfloat16


def hook_name(layer: int) -> str:
    """TransformerLens-style name of the hook the store holds."""
    return f"blocks.{layer}.hook_resid_post"


def _array_spec(kv: ts.KvStore, rows: int, d_model: int, dtype: str, chunk_rows: int,
                shard_rows: int) -> dict[str, Any]:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]  # activations barely compress
    if shard_rows == chunk_rows:
        codecs = raw
    else:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_rows, d_model], "codecs": raw, "index_location": "end",
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
    return {"driver": "zarr3", "kvstore": (kv / ARRAY_DIR).spec().to_json(), "metadata": {
        "shape": [rows, d_model], "data_type": dtype, "fill_value": 0, "codecs": codecs,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d_model]}}}}


def _create_array(kv, rows, d_model, dtype, chunk_rows, shard_rows) -> ts.TensorStore:
    spec = _array_spec(kv, rows, d_model, dtype, chunk_rows, shard_rows)
    return ts.open(spec, create=True, delete_existing=True, context=_CONTEXT).result()


def _open_array(kv: ts.KvStore, meta: Mapping[str, Any]) -> ts.TensorStore:
    """Opens the array and checks it against ``meta``; StoreError naming the mismatch otherwise."""
    where = kv.url
    try:
        arr = ts.open({"driver": "zarr3", "kvstore": (kv / ARRAY_DIR).spec().to_json()}, open=True,
                      context=_CONTEXT).result()
    except Exception as e:
        raise StoreError(f"store {where} has {META_KEY} but its activations array is missing or unreadable "
                         f"({e}); re-run collection into a fresh path (or with overwrite=True)") from e
    d, written = meta["model"]["d_model"], meta["tokens_written"]
    problems = []
    if arr.rank != 2 or arr.shape[1] != d:
        problems.append(f"array shape {list(arr.shape)} does not have d_model={d} columns")
    elif arr.shape[0] < written or (meta["complete"] and arr.shape[0] != written):
        problems.append(f"array has {arr.shape[0]} rows but {META_KEY} says {written} tokens were written"
                        + (" and the store is complete" if meta["complete"] else ""))
    if arr.chunk_layout.read_chunk.shape[0] != meta["chunk_rows"]:
        problems.append(f"array chunks have {arr.chunk_layout.read_chunk.shape[0]} rows, {META_KEY} says "
                        f"{meta['chunk_rows']}")
    if str(arr.dtype.name) != meta["dtype"]:
        problems.append(f"array dtype {arr.dtype.name} != {META_KEY} dtype {meta['dtype']}")
    if problems:
        raise StoreError(f"store {where}: {'; '.join(problems)}. The metadata and the array disagree "
                         "(corrupt or mixed-up store); re-run collection into a fresh path.")
    return arr


# --------------------------------------------------------------------------- reading

class ActivationStore:
    """An opened store. ``read(start, stop)`` -> f32[stop - start, d_model] (many rows per call)."""

    def __init__(self, kv: ts.KvStore, meta: dict[str, Any], array: ts.TensorStore):
        self.kv, self.meta, self.array = kv, meta, array
        self.url: str = kv.url
        self.n_tokens: int = meta["tokens_written"]  # committed rows; rows above are not data
        self.d_model: int = meta["model"]["d_model"]
        self.dtype: str = meta["dtype"]
        self.scale: float | None = meta["scale"]
        self.chunk_rows: int = meta["chunk_rows"]
        self.shard_rows: int = meta["shard_rows"]
        self.complete: bool = meta["complete"]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({self.url!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, "
                f"dtype={self.dtype}, scale={self.scale}, complete={self.complete})")

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) are outside the store's [0, {self.n_tokens})")

    def read_async(self, start: int, stop: int) -> ts.Future:
        """A future of the stored rows (store dtype) [start, stop): several can be in flight at once."""
        self._check(start, stop)
        return self.array[start:stop].read()

    def inv_scale(self) -> float:
        if self.scale is None:
            raise StoreError(f"store {self.url} has no normalisation scale yet (fewer rows committed than "
                             "norm_sample_tokens); finish collection first or read with normalize=False")
        return 1.0 / self.scale

    def read(self, start: int, stop: int, normalize: bool = False) -> np.ndarray:
        """Rows [start, stop) as f32[stop - start, d_model]; divided by ``scale`` if ``normalize``."""
        x = np.asarray(self.read_async(start, stop).result(), dtype=np.float32)
        return x * np.float32(self.inv_scale()) if normalize else x


def open_store(path: PathLike, *, allow_incomplete: bool = False) -> ActivationStore:
    """Opens and validates a store. Incomplete stores are refused unless ``allow_incomplete``
    (then only the committed rows are visible)."""
    kv = _open_kv(path)
    meta = read_meta(kv)
    if meta is None:
        has_array = kv.read(ARRAY_DIR + "zarr.json").result().state == "value"
        why = ("it has an activations array but no metadata: the metadata was lost, or collection was "
               "killed before it wrote any; re-run collection with the same config to rebuild it"
               if has_array else "create one with jaxsae.data.store.collect(...)")
        raise StoreError(f"no activation store at {kv.url}: {META_KEY} is missing; {why}")
    array = _open_array(kv, meta)
    if not meta["complete"] and not allow_incomplete:
        raise StoreError(f"store {kv.url} is incomplete: {meta['tokens_written']} of {meta['tokens_target']} "
                         "tokens committed. Re-run collection with the same config to resume it, or pass "
                         "allow_incomplete=True to read the committed rows.")
    return ActivationStore(kv, meta, array)


def _scale(array: ts.TensorStore, n: int, d_model: int, block: int) -> float:
    """s with E||x/s||^2 = d_model over stored rows [0, n) (as readers will see them), read in blocks
    and accumulated in f64."""
    total = 0.0
    for a in range(0, n, block):
        x = np.asarray(array[a:min(n, a + block)].read().result(), dtype=np.float64)
        total += float(np.einsum("ij,ij->", x, x))
    return math.sqrt(total / (n * d_model)) if total > 0 else 1.0


def write_array_store(path: PathLike, x: Any, *, dtype: str = "float32", chunk_rows: int | None = None,
                      shard_chunks: int = 1, scale: float | None = None,
                      extra: Mapping[str, Any] | None = None) -> ActivationStore:
    """Writes rows ``x`` (f32[n, d_model], or anything with ``.shape`` whose row slices give arrays)
    as a complete store, shard by shard: tests, benchmarks, activations made elsewhere.
    ``scale`` defaults to the one that gives E||x/scale||^2 = d_model over all rows."""
    n, d = x.shape
    chunk_rows = chunk_rows or chunk_rows_for(d, dtype)
    shard_rows = chunk_rows * shard_chunks
    kv = _open_kv(path)
    kv.delete_range(ts.KvStore.KeyRange(META_KEY, META_KEY + "\0")).result()  # invalid until rewritten
    arr = _create_array(kv, n, d, dtype, chunk_rows, shard_rows)
    step = shard_rows * max(1, (64 << 20) // (shard_rows * d * 4))  # ~64 MB of f32 per write
    for a in range(0, n, step):
        arr[a:min(n, a + step)].write(np.asarray(x[a:min(n, a + step)]).astype(_np_dtype(dtype))).result()
    meta = {"format_version": FORMAT_VERSION, "model": {"path": None, "arch": None, "d_model": d,
            "n_layers": None}, "dtype": dtype, "chunk_rows": chunk_rows, "shard_rows": shard_rows,
            "tokens_target": n, "tokens_written": n, "complete": True, "created": _now(),
            "scale": float(scale) if scale is not None else _scale(arr, n, d, 4 * chunk_rows),
            **(extra or {})}
    _write_meta(kv, meta)
    return open_store(kv)


# --------------------------------------------------------------------------- collection

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
            overwrite: bool = False, progress: bool = True) -> StoreInfo:
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
    meta = None if overwrite else read_meta(kv)
    if meta is None:
        arr = _create_array(kv, n_tokens, d, dtype, chunk_rows, shard_rows)
        meta = {"format_version": FORMAT_VERSION, **want, "created": _now(), "tokens_written": 0,
                "contexts_consumed": 0, "scale": None, "complete": False, "text_exhausted": False}
        _write_meta(kv, meta)
    else:
        _check_identity(meta, want, kv.url)
        arr = _open_array(kv, meta)
    done = meta["tokens_written"]  # a multiple of shard_rows, unless the final partial shard

    def info() -> StoreInfo:
        return StoreInfo(kv.url, meta["tokens_written"], d, dtype, meta["scale"], meta["complete"],
                         meta["text_exhausted"], dict(meta))

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

    post = jax.jit(lambda h: h[:, drop:].reshape(-1, d).astype(np_dtype))
    per_batch = batch_contexts * r
    b0 = done // per_batch  # restart at a batch boundary: same batches -> bit-identical rows

    def batches() -> Iterator[tuple[int, Any]]:
        contexts = iter_contexts(source, tokenizer, context, bos_id=bos, eos_id=eos,
                                 skip_contexts=b0 * batch_contexts)
        for toks in _batch(contexts, batch_contexts, drop_last=False):
            n_real = len(toks)  # pad the last batch so its shape (and compiled program) stays the same
            toks = np.concatenate([toks, np.zeros((batch_contexts - n_real, context), np.int32)])
            yield n_real, post(lm.residual(toks, layer))

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
    meta["complete"] = True
    _write_meta(kv, meta)
    return info()
