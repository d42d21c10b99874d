"""Top activating contexts of each requested feature, kept as a running top-N over streamed batches.

A context's score for feature j is its largest activation over the counted positions; its peak is
the first position reaching it. Each feature keeps the N highest-scoring contexts that fire at all,
ordered by score (descending) and then by the context's index in the stream, so the result is the
same however the stream is cut into batches, and equals a sort over all contexts at once.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One context of one feature: where it peaks and the activations around it.

    tokens: i32[context]; acts: f32[context] (this feature; 0 at uncounted positions).
    """

    value: float
    context: int  # index of the context in the analysed stream
    peak: int  # position of the maximum within the context
    tokens: np.ndarray
    acts: np.ndarray

    def window(self, left: int, right: int) -> tuple[int, int]:
        """[start, stop) of the positions shown: `left` before the peak, `right` after it."""
        return max(0, self.peak - left), min(len(self.tokens), self.peak + right + 1)


class TopContexts:
    """Running top-`n` contexts per feature. `update(tokens, acts, first_context)` per batch."""

    def __init__(self, features: list[int], n: int):
        if n < 1:
            raise ValueError(f"top-n must be >= 1, got {n}")
        self.features, self.n = list(features), n
        self._best: list[list[Example]] = [[] for _ in self.features]

    def update(self, tokens: np.ndarray, acts: np.ndarray, first_context: int) -> None:
        """tokens i32[b, t]; acts f32[b, t, n_features] (uncounted positions already 0);
        the batch's contexts are numbered first_context, first_context + 1, ... in the stream."""
        tokens, acts = np.asarray(tokens), np.asarray(acts, np.float32)
        scores = acts.max(axis=1)  # [b, F]
        peaks = acts.argmax(axis=1)  # first maximum
        for j in range(len(self.features)):
            s = scores[:, j]
            cand = np.nonzero(s > 0)[0]
            if cand.size > self.n:  # stable: equal scores keep stream order
                cand = cand[np.argsort(-s[cand], kind="stable")[:self.n]]
            new = [Example(float(s[i]), first_context + int(i), int(peaks[i, j]), tokens[i].copy(),
                           acts[i, :, j].copy()) for i in cand]
            merged = sorted(self._best[j] + new, key=lambda e: (-e.value, e.context))
            self._best[j] = merged[:self.n]

    def examples(self, feature: int) -> list[Example]:
        """The kept contexts of `feature`, best first."""
        return list(self._best[self.features.index(feature)])
