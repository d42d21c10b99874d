"""Token packing: documents of a text source (`text.py`) tokenized and cut into fixed-length contexts,
and positions in that packed stream from which iteration resumes without reading what came before.

The stream is ``doc0 + [eos] + doc1 + [eos] + doc2 ...`` (EOS only between non-empty documents), cut
into consecutive bodies of ``context`` tokens (``context - 1`` after a prepended BOS). At a cut the
packer holds nothing but where the next token lies, so a `Position` (document index, token offset) is
the whole state: iterating from it yields exactly what continuing the original iteration would.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

Auto = Literal["auto"]


@dataclass(frozen=True, order=True)
class Position:
    """Where the packed stream goes on: its next token is token `token` of the source's document `doc`
    (documents counted from 0, empty ones included), or, with token = -1, the EOS that comes before
    document `doc` (before the next non-empty one, when `doc` is empty).

    A position depends on the source and the tokenizer (and on whether there is an EOS), not on the
    context length or BOS: a stream can be packed differently after it.
    """

    doc: int
    token: int

    def __post_init__(self) -> None:
        assert self.doc >= 0 and self.token >= -1, self

    def to_json(self) -> dict[str, int]:
        return {"doc": self.doc, "token": self.token}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Position:
        return cls(int(d["doc"]), int(d["token"]))


START = Position(0, 0)  # the stream's beginning: nothing before it, so no EOS is owed


def docs_from(source: Iterable[str], doc: int) -> Iterator[str]:
    """The documents of `source` from index `doc` on. A source with ``docs_from`` (every source in
    `text.py`) jumps there without reading the ones before; any other iterable is read through them."""
    if doc == 0:
        return iter(source)
    jump = getattr(source, "docs_from", None)
    return jump(doc) if jump is not None else itertools.islice(iter(source), doc, None)


def _position_at(segments: list[tuple[int, int, np.ndarray]], ends: np.ndarray, cut: int) -> Position:
    """The position of token `cut` of the concatenated `segments` (doc, first token's offset or -1 for
    an EOS, ids), whose cumulative sizes are `ends`; a cut at the very end lies before the next doc's EOS."""
    j = int(np.searchsorted(ends, cut, side="right"))
    if j == len(segments):
        return Position(segments[-1][0] + 1, -1)
    doc, t0, ids = segments[j]
    off = cut - (int(ends[j]) - ids.size)
    assert t0 >= 0 or off == 0, "a cut inside an EOS segment"
    return Position(doc, t0 + off if t0 >= 0 else -1)


def pack_positioned(docs: Iterable[tuple[int, Sequence[int]]], context: int, bos_id: int | None = None,
                    eos_id: int | None = None, start: Position = START) -> Iterator[tuple[np.ndarray, Position]]:
    """Packs (document index, token ids) pairs, the first being document `start.doc`, into contexts.

    Yields (int32[context], the Position after it). From `start` the stream is document start.doc's
    tokens from start.token on (token -1: its EOS first), then every later non-empty document after
    an EOS; from START it is the whole stream. A trailing partial context is dropped.
    """
    body = context - (bos_id is not None)
    if body < 1:
        raise ValueError(f"context={context} leaves no room for tokens (bos_id={bos_id})")
    prefix = np.asarray([bos_id] if bos_id is not None else [], dtype=np.int32)
    sep = np.asarray([eos_id] if eos_id is not None else [], dtype=np.int32)
    pending: list[tuple[int, int, np.ndarray]] = []  # (doc, offset of its first token or -1: EOS, ids)
    n_pending = 0
    first = start.token >= 0  # nothing before: the next non-empty document needs no EOS
    for doc, ids in docs:
        ids, t0 = np.asarray(ids, dtype=np.int32).reshape(-1), 0
        if doc == start.doc and start.token > 0:
            ids, t0 = ids[start.token:], start.token
        if ids.size == 0:
            continue
        if not first and sep.size:
            pending.append((doc, -1, sep))
            n_pending += sep.size
        first = False
        pending.append((doc, t0, ids))
        n_pending += ids.size
        if n_pending < body:
            continue
        # Concatenate only when at least one context is ready: O(total) amortized.
        flat = np.concatenate([s for _, _, s in pending])
        ends = np.cumsum([s.size for _, _, s in pending])
        n_full = flat.size // body
        for k in range(1, n_full + 1):
            yield np.concatenate([prefix, flat[(k - 1) * body:k * body]]), _position_at(pending, ends, k * body)
        cut = n_full * body
        j = int(np.searchsorted(ends, cut, side="right"))
        if j == len(pending):
            pending, n_pending = [], 0
        else:
            d, t, s = pending[j]
            off = cut - (int(ends[j]) - s.size)
            pending = [(d, t + off if t >= 0 else t, s[off:]), *pending[j + 1:]]
            n_pending = flat.size - cut


def pack_tokens(docs_token_ids: Iterable[Sequence[int]], context: int,
                bos_id: int | None = None, eos_id: int | None = None) -> Iterator[np.ndarray]:
    """Pack tokenized documents into fixed-length contexts (see `pack_positioned`): the stream is
    ``doc0 + [eos] + doc1 + [eos] + doc2 ...`` (empty documents dropped, so no EOS pairs appear), cut
    into chunks of ``context`` tokens, or of ``context - 1`` with BOS prepended when ``bos_id`` is given.

    Yields fresh ``int32[context]`` arrays.
    """
    return (row for row, _ in pack_positioned(enumerate(docs_token_ids), context, bos_id, eos_id))


def _batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """``docs -> token ids`` without special tokens, via the Rust backend when there is one.

    The backend path skips transformers' per-call overhead and its "sequence
    longer than model_max_length" warnings, which whole source files trigger.
    Each document is encoded on its own, so its tokens do not depend on the batch it came in.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "encode_batch"):
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())  # private copy; never truncate
            backend.no_truncation()
            backend.no_padding()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return lambda docs: [e.ids for e in encode(docs, add_special_tokens=False)]
    return lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]


def _special(value: int | None | Auto, tokenizer: Any, attr: str) -> int | None:
    return getattr(tokenizer, attr, None) if value == "auto" else value


def iter_positioned(source: Iterable[str], tokenizer: Any, context: int, *, bos_id: int | None | Auto = "auto",
                    eos_id: int | None | Auto = "auto", start: Position = START,
                    doc_batch_size: int = 64) -> Iterator[tuple[np.ndarray, Position]]:
    """(int32[context], the Position after it) for the packed contexts of `source` from `start`; only
    documents from start.doc on are read and tokenized (`docs_from`).

    ``bos_id``/``eos_id`` default to the tokenizer's; pass ``None`` to disable.
    """
    encode = _batch_encoder(tokenizer)
    docs = docs_from(source, start.doc)

    def token_docs() -> Iterator[tuple[int, list[int]]]:
        i = start.doc
        while batch := list(itertools.islice(docs, doc_batch_size)):
            for ids in encode(batch):
                yield i, ids
                i += 1

    return pack_positioned(token_docs(), context, _special(bos_id, tokenizer, "bos_token_id"),
                           _special(eos_id, tokenizer, "eos_token_id"), start)


def iter_contexts(source: Iterable[str], tokenizer: Any, context: int, *,
                  bos_id: int | None | Auto = "auto", eos_id: int | None | Auto = "auto",
                  skip_contexts: int = 0, start: Position = START, doc_batch_size: int = 64) -> Iterator[np.ndarray]:
    """Tokenize ``source`` in batches of documents and yield packed ``int32[context]`` rows.

    ``bos_id``/``eos_id`` default to the tokenizer's; pass ``None`` to disable.
    ``start`` resumes at a recorded `Position` without reading what came before; ``skip_contexts``
    then drops the next N contexts (read and tokenized), e.g. to continue where an earlier phase
    that consumed N contexts stopped when its position was not recorded.
    """
    if skip_contexts < 0:
        raise ValueError(f"skip_contexts must be >= 0, got {skip_contexts}")
    rows = iter_positioned(source, tokenizer, context, bos_id=bos_id, eos_id=eos_id, start=start,
                           doc_batch_size=doc_batch_size)
    return (row for row, _ in itertools.islice(rows, skip_contexts, None))


def batch_contexts(contexts: Iterable[np.ndarray], batch_size: int,
                   drop_last: bool = True) -> Iterator[np.ndarray]:
    """Stack ``int32[context]`` rows into ``int32[batch, context]`` (last partial batch dropped by default)."""
    it = iter(contexts)
    while rows := list(itertools.islice(it, batch_size)):
        if len(rows) < batch_size and drop_last:
            return
        yield np.stack(rows)
