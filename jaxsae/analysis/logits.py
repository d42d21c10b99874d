"""Direct logit effect of a feature's decoder direction through the unembedding.

The feature writes d = scale * W_dec[f] (f32[d_model], in the raw residual's units) into the residual
stream. Its direct effect on the logits, ignoring every later block, goes through the final norm and
the unembedding W_U f32[d_model, vocab]. The norm is not linear; we use its linearisation with the
per-token 1/sigma (or 1/rms) factor dropped:

    effect = W_U^T (gamma * P d)        P = centring (I - 11^T/D) for LayerNorm, identity for RMSNorm

gamma is the norm's effective weight, as each LM family reports it (`Family.final_norm_and_unembed`;
GPT-NeoX: `final_layer_norm.scale`, Gemma: 1 + `norm.scale`). The dropped
factor is positive and the same for every vocabulary entry, so the ranking of tokens is exact for the
linearised model; the values are "logits per unit of feature activation per unit 1/sigma" and compare
between features of one SAE, not with real logit differences. The norm's bias adds the same vector to
every token's logits whatever the feature and is left out; so is Gemma 2's final logit soft-cap.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxsae.models.family import family_of


class Unembedding(NamedTuple):
    gamma: np.ndarray  # f32[d_model]
    W_U: np.ndarray  # f32[d_model, vocab]
    centre: bool  # LayerNorm subtracts the mean; RMSNorm does not


def unembedding(lm) -> Unembedding:
    """The final norm's weight and the unembedding matrix of a loaded LM (any registered family)."""
    gamma, W_U, centre = family_of(lm.config).final_norm_and_unembed(lm.params, lm.config)
    return Unembedding(np.asarray(gamma, np.float32), np.asarray(W_U, np.float32), bool(centre))


class LogitEffects(NamedTuple):
    top: list[tuple[int, float]]  # (token id, effect), largest first
    bottom: list[tuple[int, float]]  # most negative first


def logit_effect(direction: np.ndarray, u: Unembedding) -> np.ndarray:
    """f32[d_model] residual direction -> f32[vocab] direct logit effect (see the module docstring)."""
    d = np.asarray(direction, np.float32)
    if u.centre:
        d = d - d.mean()
    return (u.gamma * d) @ u.W_U


def feature_logit_effects(sae, u: Unembedding, feature: int, k: int = 10) -> LogitEffects:
    """Top-k positive and negative tokens of feature `feature`'s decoder row scale * W_dec[feature]."""
    e = logit_effect(np.asarray(sae.params["W_dec"][feature], np.float32) * sae.scale, u)
    order = np.argsort(-e, kind="stable")
    return LogitEffects([(int(i), float(e[i])) for i in order[:k]],
                        [(int(i), float(e[i])) for i in order[::-1][:k]])
