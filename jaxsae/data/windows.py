"""Token windows of a run: the held-out evaluation contexts and the sequence windows of the KL phases.

A KL phase (control, finetune, adapter, e2e) reads packed contexts of the training source: the fine-tune's
window starts where the store's contexts end (the `Position` the store recorded), e2e's at the start. A
window is streamed in blocks of data.window_shuffle_sequences sequences, each read from its start
position and shuffled on its own, so only one block is in memory and batch s is a pure function of
(seed, s, the window's start): a resumed phase reads exactly the batches an uninterrupted one would.
A window of one block (every demo config) is today's materialised window, in today's order.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxsae import config as C
from jaxsae.data.packing import START, Position


def take_contexts(cfg: C.RunConfig, source: dict, tokenizer, n: int, skip: int, where: str, what: str) -> np.ndarray:
    """The first `n` packed contexts int32[n, context] of `source` after `skip`; a source too short
    for them is a ConfigError naming `what` to lower."""
    from jaxsae.data.packing import iter_contexts
    from jaxsae.data.text import make_source

    bos = "auto" if cfg.data.prepend_bos else None
    rows = list(itertools.islice(iter_contexts(make_source(source), tokenizer, cfg.data.context, bos_id=bos,
                                               skip_contexts=skip), n))
    if len(rows) < n:
        raise C.ConfigError(f"{where} holds only {len(rows)} contexts of {cfg.data.context} tokens; {what} needs "
                            f"{n}: lower {what} or use a larger source")
    return np.stack(rows).astype(np.int32)


def eval_sequences(cfg: C.RunConfig, tokenizer) -> np.ndarray:
    """Held-out contexts int32[eval.sequences, context] from data.eval_source."""
    return take_contexts(cfg, cfg.data.eval_source, tokenizer, cfg.eval.sequences, 0, "data.eval_source",
                         "eval.sequences")


def store_end(cfg: C.RunConfig, tokenizer, store_meta: dict) -> Position:
    """Where the training stream goes on after the store's contexts: the position the store recorded,
    or, for a store collected before stores recorded it, the position found by reading (and tokenizing)
    the stream through its contexts_consumed contexts."""
    if "stream_position" in store_meta:
        return Position.from_json(store_meta["stream_position"])
    from jaxsae.data.packing import iter_positioned
    from jaxsae.data.text import make_source

    skip = store_meta["contexts_consumed"]
    if skip == 0:
        return START
    bos = "auto" if cfg.data.prepend_bos else None
    rows = iter_positioned(make_source(cfg.data.source), tokenizer, cfg.data.context, bos_id=bos)
    last = next(itertools.islice(rows, skip - 1, None), None)
    if last is None:
        raise C.ConfigError(f"data.source holds fewer than the {skip} contexts the store used: collect the store "
                            "from this data.source")
    return last[1]


def next_document(pos: Position) -> Position:
    """`pos` when the stream is at a document's start there, else the start of the next document."""
    return pos if pos.token <= 0 else Position(pos.doc + 1, 0)


def eval_end(cfg: C.RunConfig, tokenizer) -> Position:
    """The Position in data.eval_source after the eval.sequences contexts that evaluation reads."""
    from jaxsae.data.packing import iter_positioned
    from jaxsae.data.text import make_source

    if cfg.eval.sequences == 0:
        return START
    bos = "auto" if cfg.data.prepend_bos else None
    rows = iter_positioned(make_source(cfg.data.eval_source), tokenizer, cfg.data.context, bos_id=bos)
    last = next(itertools.islice(rows, cfg.eval.sequences - 1, None), None)
    if last is None:
        raise C.ConfigError(f"data.eval_source holds fewer than eval.sequences={cfg.eval.sequences} contexts of "
                            f"{cfg.data.context} tokens: lower eval.sequences or use a larger source")
    return last[1]


def read_probe(cfg: C.RunConfig, tokenizer, n: int, start: Position, what: str,
               source: str = "source") -> tuple[np.ndarray, Position]:
    """(int32[n, context] the first n contexts of data.<source> ("source" or "eval_source") from the
    document at or after `start`, the start of the document after the last of them): held-out text of
    whole documents that a window (or, in data.eval_source, the evaluation) starting there never reads
    (the L1 controller's probe, `finetune.l0_probe_sequences`)."""
    from jaxsae.data.packing import iter_positioned
    from jaxsae.data.text import make_source

    begin = next_document(start)
    bos = "auto" if cfg.data.prepend_bos else None
    got = list(itertools.islice(iter_positioned(make_source(getattr(cfg.data, source)), tokenizer, cfg.data.context,
                                                bos_id=bos, start=begin), n))
    if len(got) < n:
        raise C.ConfigError(f"data.{source} from {begin} holds only {len(got)} contexts of {cfg.data.context} "
                            f"tokens; {what} needs {n}: lower {what} or use a larger source")
    return np.stack([r for r, _ in got]).astype(np.int32), next_document(got[-1][1])


def block_order(seed: int, block: int, size: int) -> np.ndarray:
    """int[size]: the order of block `block`'s sequences. The first block's is
    np.random.default_rng(seed).permutation(size), the order a window of one block always had."""
    return np.random.default_rng(seed if block == 0 else (seed, block)).permutation(size)


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """A window: `n` contexts of data.source from `start`, shuffled within blocks of `block` sequences."""

    source: dict
    context: int
    bos: str | None  # "auto" or None, as data.prepend_bos says
    n: int
    block: int
    seed: int
    what: str  # the config key whose budget the window is, for errors

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block)

    def size(self, b: int) -> int:
        return min(self.block, self.n - b * self.block)


def window_spec(cfg: C.RunConfig, n_seqs: int, seed: int, what: str) -> WindowSpec:
    return WindowSpec(cfg.data.source, cfg.data.context, "auto" if cfg.data.prepend_bos else None, n_seqs,
                      cfg.data.window_shuffle_sequences, seed, what)


def read_block(spec: WindowSpec, tokenizer, b: int, start: Position) -> tuple[np.ndarray, Position]:
    """(int32[spec.size(b), context] block b's sequences in stream order, the position after them),
    reading the source from `start` (block b's first context) on."""
    from jaxsae.data.packing import iter_positioned
    from jaxsae.data.text import make_source

    rows = iter_positioned(make_source(spec.source), tokenizer, spec.context, bos_id=spec.bos, start=start)
    got = list(itertools.islice(rows, spec.size(b)))
    if len(got) < spec.size(b):
        have = b * spec.block + len(got)
        raise C.ConfigError(f"data.source from {start} holds only {have} contexts of {spec.context} tokens for this "
                            f"window; {spec.what} needs {spec.n}: lower {spec.what} or use a larger source")
    return np.stack([r for r, _ in got]).astype(np.int32), got[-1][1]


class Window:
    """Sequences of a window, read a block at a time. `starts` holds the start positions of blocks
    0..m known so far (block 0's is the window's start); reading block b also finds block b+1's.
    Recorded in a phase's checkpoints, they let a resume jump to its block without reading the ones
    before; a missing one is found by reading from the last known (slower, same sequences)."""

    def __init__(self, spec: WindowSpec, tokenizer, starts: list[Position]):
        assert starts, "a window needs its start"
        self.spec, self.tokenizer, self.starts = spec, tokenizer, list(starts)
        self._cached: tuple[int, np.ndarray] | None = None  # (block, its shuffled sequences)

    def _block(self, b: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == b:
            return self._cached[1]
        while True:
            k = min(b, len(self.starts) - 1)
            seqs, after = read_block(self.spec, self.tokenizer, k, self.starts[k])
            if k + 1 == len(self.starts) and k + 1 < self.spec.n_blocks:
                self.starts.append(after)
            if k == b:
                break
        self._cached = (b, seqs[block_order(self.spec.seed, b, len(seqs))])
        return self._cached[1]

    def rows(self, i: int, j: int) -> np.ndarray:
        """int32[j - i, context]: the window's sequences i..j-1 in their shuffled order."""
        assert 0 <= i < j <= self.spec.n, (i, j, self.spec.n)
        B = self.spec.block
        parts = [self._block(b)[max(i - b * B, 0):j - b * B] for b in range(i // B, (j - 1) // B + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def starts_json(self) -> list[dict[str, int]]:
        return [p.to_json() for p in self.starts]


def open_window(cfg: C.RunConfig, tokenizer, n_seqs: int, start: Position, seed: int, what: str,
                recorded: list | None = None) -> Window:
    """The window of `n_seqs` sequences from `start` (`recorded`: the block starts a checkpoint of the
    phase recorded, which begin with `start` when they belong to this window)."""
    spec = window_spec(cfg, n_seqs, seed, what)
    starts = [Position.from_json(p) for p in recorded or []]
    if not starts or starts[0] != start:
        starts = [start]
    return Window(spec, tokenizer, starts)

