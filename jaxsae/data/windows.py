"""Token windows of a run: the held-out evaluation contexts and the sequence windows of the KL phases.

A KL phase (control, finetune, adapter, e2e) reads packed contexts of the training source: the fine-tune's
window starts after the contexts the store used, e2e's at the start. The window is materialised and
shuffled at the sequence level, so batch s is a pure function of (seed, s) and a resume is exact.
"""

from __future__ import annotations

import numpy as np

from jaxsae import config as C


def take_contexts(cfg: C.RunConfig, source: dict, tokenizer, n: int, skip: int, where: str, what: str) -> np.ndarray:
    """The first `n` packed contexts int32[n, context] of `source` after `skip`; a source too short
    for them is a ConfigError naming `what` to lower."""
    from jaxsae.data.packing import iter_contexts
    from jaxsae.data.text import make_source

    bos = "auto" if cfg.data.prepend_bos else None
    rows = []
    for row in iter_contexts(make_source(source), tokenizer, cfg.data.context, bos_id=bos, skip_contexts=skip):
        rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise C.ConfigError(f"{where} holds only {len(rows)} contexts of {cfg.data.context} tokens; {what} needs "
                            f"{n}: lower {what} or use a larger source")
    return np.stack(rows).astype(np.int32)


def eval_sequences(cfg: C.RunConfig, tokenizer) -> np.ndarray:
    """Held-out contexts int32[eval.sequences, context] from data.eval_source."""
    return take_contexts(cfg, cfg.data.eval_source, tokenizer, cfg.eval.sequences, 0, "data.eval_source",
                         "eval.sequences")


def window_sequences(cfg: C.RunConfig, tokenizer, n_seqs: int, skip: int, seed: int, what: str) -> np.ndarray:
    """int32[n_seqs, context]: contexts of the training source after the first `skip`, shuffled at the
    sequence level with `seed`."""
    seqs = take_contexts(cfg, cfg.data.source, tokenizer, n_seqs, skip,
                         f"data.source after the {skip} contexts the store used", what)
    return seqs[np.random.default_rng(seed).permutation(len(seqs))]
