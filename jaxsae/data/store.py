"""Tensorstore activation store: layout, metadata, opening and validation (collection: `collect.py`).

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
fully packed, so there is no padding. ``scale`` is one scalar with E||x / scale||^2 = 1 over the first
``norm_sample_tokens`` rows (dictionary_learning's and SAEBench's normalisation, so an L1 coefficient
means what it means there); readers multiply by 1/scale, exporters fold it back in. A store written
before this convention (E||x / scale||^2 = d_model, no ``norm`` in its meta) is read with its scale
converted.
``contexts_consumed`` counts the contexts with rows in the store (the last possibly in part), and
``stream_position`` is the text stream's `Position` after the last of them (`jaxsae.data.packing`), so
a later phase that starts there never reuses this text and reads none of it (stores written before
positions were recorded lack it: a phase then skips ``contexts_consumed`` contexts, re-reading them).

Missing data is never read as zeros. Every open sets ``fill_missing_data_reads: false`` (a chunk
that is absent from its shard file, or a shard file that is gone, is a read error, not the zarr
fill value) and ``store_data_equal_to_fill_value: true`` (so an all-zero chunk is still written and
never mistaken for a missing one). Every chunk carries a crc32c (zarr3 ``crc32c`` codec), checked by
tensorstore on each read, so flipped or truncated bytes are read errors too; all of them surface as
StoreError naming the file. When a store is completed its ``manifest`` (row count, and every file
under ``activations/`` with its size in bytes) goes into meta.json, and ``open_store`` checks that
every listed file exists with that size before a phase starts: a stat per shard file, cheap even
for thousands of shards. Content is not hashed there: at the ~0.7-2 GB/s a crc32 of the files runs
on one core that would cost minutes per opening of a 100 GB store; ``verify_store(path, full=True)``
reads every row instead (the chunk checksums catch corruption), on request.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Mapping

import numpy as np
import tensorstore as ts

from jaxsae.errors import UserError

FORMAT_VERSION = 1
META_KEY = "meta.json"
ARRAY_DIR = "activations/"
DTYPES = ("float32", "bfloat16")
# One context for the whole process: memory:// stores live in a context resource, so without a
# shared context every open would see a fresh, empty memory store.
_CONTEXT = ts.Context()
# Reads of absent chunks fail (instead of returning the fill value); chunks equal to the fill value
# are still written, so "absent" always means "lost".
_DATA_OPTIONS = {"fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}
_REQUIRED_KEYS = ("format_version", "model", "dtype", "chunk_rows", "shard_rows", "tokens_target",
                  "tokens_written", "scale", "complete")
_STREAM_KEYS = ("format_version", "model", "dtype", "layer", "scale", "complete")

PathLike = str | os.PathLike | Mapping[str, Any] | ts.KvStore


# The normalisation a store's scale stands for (recorded in its meta).
NORM = "E|x/scale|^2=1"


class StoreError(UserError, ValueError):
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
    # a stream-mode run's record (`jaxsae.data.stream`) has no rows, only what its scale was measured on
    required = _STREAM_KEYS if meta.get("mode") == "stream" else _REQUIRED_KEYS
    missing = [k for k in required if k not in meta]
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
    # activations barely compress; the crc32c makes a damaged chunk a read error, not wrong numbers
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    if shard_rows == chunk_rows:
        codecs = raw
    else:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_rows, d_model], "codecs": raw, "index_location": "end",
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
    return {"driver": "zarr3", "kvstore": (kv / ARRAY_DIR).spec().to_json(), **_DATA_OPTIONS, "metadata": {
        "shape": [rows, d_model], "data_type": dtype, "fill_value": 0, "codecs": codecs,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d_model]}}}}


def _create_array(kv, rows, d_model, dtype, chunk_rows, shard_rows) -> ts.TensorStore:
    spec = _array_spec(kv, rows, d_model, dtype, chunk_rows, shard_rows)
    return ts.open(spec, create=True, delete_existing=True, context=_CONTEXT).result()


def _open_array(kv: ts.KvStore, meta: Mapping[str, Any]) -> ts.TensorStore:
    """Opens the array and checks it against ``meta``; StoreError naming the mismatch otherwise."""
    where = kv.url
    try:
        arr = ts.open({"driver": "zarr3", "kvstore": (kv / ARRAY_DIR).spec().to_json(), **_DATA_OPTIONS},
                      open=True, context=_CONTEXT).result()
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


# --------------------------------------------------------------------------- manifest

def _fix(kv: ts.KvStore) -> str:
    return (f"the store is damaged: delete {_where(kv)} (or collect with overwrite=True) and run again to "
            "re-collect it")


def _where(kv: ts.KvStore) -> str:
    spec = kv.spec().to_json()
    return spec["path"].rstrip("/") if spec.get("driver") == "file" else kv.url


def _local_root(kv: ts.KvStore) -> str | None:
    spec = kv.spec().to_json()
    return spec["path"] if spec.get("driver") == "file" else None


def _file_sizes(kv: ts.KvStore, keys: list[str]) -> dict[str, int | None]:
    """Size in bytes of each key (None: absent). Local files are stat-ed; memory:// values are read
    (free); other kvstores (gs://) report None for present keys: listing them is all that is cheap."""
    root = _local_root(kv)
    if root is not None:
        out: dict[str, int | None] = {}
        for k in keys:
            try:
                out[k] = os.stat(root + k).st_size
            except FileNotFoundError:
                out[k] = None
        return out
    present = {k.decode() for k in kv.list(ts.KvStore.KeyRange(ARRAY_DIR, ARRAY_DIR[:-1] + "0")).result()}
    if kv.spec().to_json().get("driver") == "memory":
        return {k: len(kv.read(k).result().value) if k in present else None for k in keys}
    return {k: (-1 if k in present else None) for k in keys}  # -1: present, size not checked


def store_manifest(kv: ts.KvStore, rows: int) -> dict[str, Any]:
    """{"rows": rows, "files": {key: bytes}} for every file of the array (keys relative to the store);
    written into meta.json when a store is completed. Sizes are null where they are not cheap to
    learn (gs://): there only presence is checked."""
    keys = sorted(k.decode() for k in kv.list(ts.KvStore.KeyRange(ARRAY_DIR, ARRAY_DIR[:-1] + "0")).result())
    sizes = _file_sizes(kv, keys)
    return {"rows": int(rows), "files": {k: (v if v is not None and v >= 0 else None) for k, v in sizes.items()}}


def _check_manifest(kv: ts.KvStore, meta: Mapping[str, Any]) -> None:
    man = meta.get("manifest")
    if man is None:  # incomplete, or completed before manifests were written: reads still never fill
        return
    if man.get("rows") != meta["tokens_written"]:
        raise StoreError(f"store {kv.url}: {META_KEY} says {meta['tokens_written']} rows but its manifest "
                         f"says {man.get('rows')}; {_fix(kv)}")
    want: dict[str, int | None] = man.get("files", {})
    have = _file_sizes(kv, list(want))
    for key, size in want.items():
        got = have[key]
        if got is None:
            raise StoreError(f"store {kv.url}: file {key} is missing; {_fix(kv)}")
        if size is not None and got >= 0 and got != size:
            raise StoreError(f"store {kv.url}: file {key} has {got} bytes, the manifest says {size} (truncated or "
                             f"overwritten); {_fix(kv)}")


def _data_error(kv: ts.KvStore, e: BaseException) -> StoreError:
    """A tensorstore read failure (absent chunk, checksum mismatch, short file) as one StoreError line."""
    why = " ".join(str(e).split())
    return StoreError(f"store {kv.url}: its data is missing or corrupt ({why}); {_fix(kv)}")


def verify_store(path: "PathLike | ActivationStore", *, full: bool = False) -> None:
    """Checks the store before any phase uses it; StoreError naming the first bad file.

    Always: the manifest's files exist with their sizes (``open_store`` does this). ``full``: also
    reads every row, shard by shard, so each chunk's crc32c is checked (reads the whole store once).
    """
    st = path if isinstance(path, ActivationStore) else open_store(path, allow_incomplete=True)
    _check_manifest(st.kv, st.meta)
    if full:
        step = st.shard_rows * max(1, (64 << 20) // (st.shard_rows * st.d_model * 4))  # ~64 MB per read
        for a in range(0, st.n_tokens, step):
            st.read(a, min(st.n_tokens, a + step))


# --------------------------------------------------------------------------- reading

class StoreRead:
    """A read in flight (``ActivationStore.read_async``): ``result()`` gives the rows or raises StoreError."""

    def __init__(self, kv: ts.KvStore, future: ts.Future):
        self._kv, self._future = kv, future

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        return self._future.cancel()

    def result(self) -> np.ndarray:
        try:
            return self._future.result()
        except ValueError as e:  # tensorstore reports NOT_FOUND / DATA_LOSS / OUT_OF_RANGE as ValueError
            raise _data_error(self._kv, e) from e


class ActivationStore:
    """An opened store. ``read(start, stop)`` -> f32[stop - start, d_model] (many rows per call)."""

    def __init__(self, kv: ts.KvStore, meta: dict[str, Any], array: ts.TensorStore):
        self.kv, self.meta, self.array = kv, meta, array
        self.url: str = kv.url
        self.n_tokens: int = meta["tokens_written"]  # committed rows; rows above are not data
        self.d_model: int = meta["model"]["d_model"]
        self.dtype: str = meta["dtype"]
        scale = meta["scale"]
        if scale is not None and meta.get("norm") != NORM:  # written with E||x/s||^2 = d_model
            scale *= math.sqrt(self.d_model)
        self.scale: float | None = scale
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

    def read_async(self, start: int, stop: int) -> StoreRead:
        """A future of the stored rows (store dtype) [start, stop): several can be in flight at once.
        Its ``result()`` raises StoreError if any of them is missing or corrupt on disk."""
        self._check(start, stop)
        return StoreRead(self.kv, self.array[start:stop].read())

    def inv_scale(self) -> float:
        if self.scale is None:
            raise StoreError(f"store {self.url} has no normalisation scale yet (fewer rows committed than "
                             "norm_sample_tokens); finish collection first or read with normalize=False")
        return 1.0 / self.scale

    def read(self, start: int, stop: int, normalize: bool = False) -> np.ndarray:
        """Rows [start, stop) as f32[stop - start, d_model]; divided by ``scale`` if ``normalize``."""
        x = np.asarray(self.read_async(start, stop).result(), dtype=np.float32)
        return x * np.float32(self.inv_scale()) if normalize else x


def open_store(path: PathLike, *, allow_incomplete: bool = False, verify: bool = True) -> ActivationStore:
    """Opens and validates a store. Incomplete stores are refused unless ``allow_incomplete``
    (then only the committed rows are visible). ``verify``: check the manifest's files (sizes) now
    (``verify_store``); reads of missing or corrupt data are StoreErrors either way."""
    kv = _open_kv(path)
    meta = read_meta(kv)
    if meta is None:
        has_array = kv.read(ARRAY_DIR + "zarr.json").result().state == "value"
        why = ("it has an activations array but no metadata: the metadata was lost, or collection was "
               "killed before it wrote any; re-run collection with the same config to rebuild it"
               if has_array else "create one with jaxsae.data.collect.collect(...) or python -m jaxsae.train")
        raise StoreError(f"no activation store at {kv.url}: {META_KEY} is missing; {why}")
    if meta.get("mode") == "stream":
        raise StoreError(f"{kv.url} is the record of a stream-mode run (store.mode=stream): it holds no activations; "
                         "read them from the text with the run's LM, or train with store.mode=disk to keep them")
    array = _open_array(kv, meta)
    if not meta["complete"] and not allow_incomplete:
        raise StoreError(f"store {kv.url} is incomplete: {meta['tokens_written']} of {meta['tokens_target']} "
                         "tokens committed. Re-run collection with the same config to resume it, or pass "
                         "allow_incomplete=True to read the committed rows.")
    if verify:
        _check_manifest(kv, meta)
    return ActivationStore(kv, meta, array)


def _scale(array: ts.TensorStore, n: int, block: int) -> float:
    """s with E||x/s||^2 = 1 over stored rows [0, n) (as readers will see them), read in blocks and
    accumulated in f64."""
    total = 0.0
    for a in range(0, n, block):
        x = np.asarray(array[a:min(n, a + block)].read().result(), dtype=np.float64)
        total += float(np.einsum("ij,ij->", x, x))
    return math.sqrt(total / n) if total > 0 else 1.0


def write_array_store(path: PathLike, x: Any, *, dtype: str = "float32", chunk_rows: int | None = None,
                      shard_chunks: int = 1, scale: float | None = None,
                      extra: Mapping[str, Any] | None = None) -> ActivationStore:
    """Writes rows ``x`` (f32[n, d_model], or anything with ``.shape`` whose row slices give arrays)
    as a complete store, shard by shard: tests, benchmarks, activations made elsewhere.
    ``scale`` defaults to the one that gives E||x/scale||^2 = 1 over all rows."""
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
            "scale": float(scale) if scale is not None else _scale(arr, n, 4 * chunk_rows), "norm": NORM,
            **(extra or {}), "manifest": store_manifest(kv, n)}
    _write_meta(kv, meta)
    return open_store(kv)
