"""The token batches an analysis scans: packed contexts of a text source, or the run's own store.

Both yield `Batch`es of whole contexts with a mask of the positions that count (the training rule:
position 0 of a packed context only with `data.include_first_position`). From a text source the
residuals are computed by the LM; from the store they are read back, and the token ids, which the
store does not keep, are re-derived by packing the run's `data.source` again exactly as collection
did (same source, tokenizer, context, BOS/EOS): store row r is position drop + r % (context - drop)
of context r // (context - drop). The source's fingerprint must match the store's record of it.
"""

from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import numpy as np

from jaxsae.analysis.runinfo import AnalysisError, RunInfo


class Batch(NamedTuple):
    tokens: np.ndarray  # i32[b, t]
    valid: np.ndarray  # bool[b, t]: positions that count
    x: np.ndarray | None  # f32[b, t, d_model] raw residuals (store), or None (run the LM)


SOURCE_HELP = ("eval (the run's data.eval_source, default) | train (its data.source) | store (the run's "
               "activation store) | stdlib[:train|val|all] | files:PATH[,PATH...] | hf:NAME[:CONFIG]")


def source_spec(arg: str, info: RunInfo) -> dict | str:
    """A --source argument -> a make_source spec dict, or "store"."""
    kind, _, rest = arg.partition(":")
    if arg == "eval":
        return dict(info.cfg.data.eval_source)
    if arg == "train":
        return dict(info.cfg.data.source)
    if arg == "store":
        return "store"
    if kind == "stdlib":
        split = rest or "val"
        if split not in ("train", "val", "all"):
            raise AnalysisError(f"--source stdlib:{split}: the split must be train, val or all")
        return {"kind": "stdlib", "split": split}
    if kind == "files" and rest:
        return {"kind": "files", "paths": rest.split(",")}
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        return {"kind": "hf", "name": name, "config": config or None}
    raise AnalysisError(f"--source {arg!r} is not understood; use {SOURCE_HELP}")


def _valid(b: int, t: int, first: int) -> np.ndarray:
    v = np.ones((b, t), bool)
    v[:, :first] = False
    return v


def _bos(info: RunInfo) -> str | None:
    return "auto" if info.cfg.data.prepend_bos else None


def text_batches(spec: dict, tokenizer, info: RunInfo, n_contexts: int, batch: int) -> Iterator[Batch]:
    """Up to `n_contexts` packed contexts of `spec`, `batch` at a time (the last batch may be short)."""
    from jaxsae.data.packing import batch_contexts, iter_contexts
    from jaxsae.data.text import make_source

    try:
        source = make_source(spec)
    except (ValueError, TypeError) as e:
        raise AnalysisError(f"--source: {e}") from e
    rows = itertools.islice(iter_contexts(source, tokenizer, info.cfg.data.context, bos_id=_bos(info)),
                            n_contexts)
    first = 0 if info.include_first else 1
    for toks in batch_contexts(rows, batch, drop_last=False):
        yield Batch(toks, _valid(*toks.shape, first), None)


def open_run_store(info: RunInfo):
    """The run's store, checked to be the run's layer and to be re-derivable from data.source."""
    from jaxsae.data.store import StoreError, open_store, read_meta
    from jaxsae.data.text import make_source

    try:
        if read_meta(info.store_path) is None:
            raise AnalysisError(f"--source store: no activation store at {info.store_path}; "
                                "use a text source (--source eval)")
        store = open_store(info.store_path)
    except StoreError as e:
        raise AnalysisError(f"--source store: {e}") from e
    meta = store.meta
    if meta.get("layer") != info.layer:
        raise AnalysisError(f"--source store: the store holds layer {meta.get('layer')}, the SAE reads layer "
                            f"{info.layer}; use a text source (--source eval)")
    want = meta.get("source", {}).get("fingerprint")
    have = make_source(info.cfg.data.source).describe().get("fingerprint")
    if want is None or want != have:
        raise AnalysisError("--source store: the store's token ids cannot be re-derived (its text source's "
                            f"fingerprint {want} differs from data.source's here, {have}); use a text source")
    return store


def store_batches(store, tokenizer, info: RunInfo, n_contexts: int, batch: int) -> Iterator[Batch]:
    """Whole contexts of the store's rows with their re-derived tokens; dropped positions read as 0."""
    from jaxsae.data.packing import iter_contexts
    from jaxsae.data.text import make_source

    meta = store.meta
    t, drop = meta["context"], len(meta["positions"]["dropped"])
    r = t - drop
    n_contexts = min(n_contexts, store.n_tokens // r)  # whole contexts only
    bos, eos = meta["tokenizer"]["bos_id"], meta["tokenizer"]["eos_id"]
    rows = iter_contexts(make_source(info.cfg.data.source), tokenizer, t, bos_id=bos, eos_id=eos)
    first = max(drop, 0 if info.include_first else 1)
    for c0 in range(0, n_contexts, batch):
        b = min(batch, n_contexts - c0)
        toks = np.stack(list(itertools.islice(rows, b)))
        if len(toks) < b:
            raise AnalysisError("--source store: data.source ran out before the store's rows did; "
                                "the store was collected from other text")
        x = np.zeros((b, t, store.d_model), np.float32)
        x[:, drop:] = store.read(c0 * r, (c0 + b) * r).reshape(b, r, store.d_model)
        yield Batch(toks, _valid(b, t, first), x)


def contexts_for(tokens: int, info: RunInfo) -> int:
    """Contexts to scan so that at least `tokens` positions count."""
    per = info.cfg.data.context - (0 if info.include_first else 1)
    return max(1, -(-tokens // per))
