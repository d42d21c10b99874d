"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders").

The latents are split into nested groups g_1, ..., g_G (`SAEConfig.group_fractions`, sized as
dictionary_learning sizes them). The activation is BatchTopK over all latents, with its inference
threshold (`jaxsae.sae.batchtopk`). Every prefix of groups must reconstruct x on its own:

    x_hat_m = b_dec + sum_{i <= m} f[:, g_i] @ W_dec[g_i]        (b_dec in every prefix)
    L_m     = mean_tokens ||x - x_hat_m||^2                       (`reconstruction_loss`)
    loss    = sum_m (w_m / w_G) L_m + auxk_coeff * AuxK

with w = `group_weights` (default equal). x_hat_G is the SAE's output, so the trainer's own
reconstruction loss is the m = G term, and penalties['matryoshka'] holds the others:
sum_{m < G} (w_m / w_G) L_m. With equal weights the loss is the paper's sum over prefixes
(Sec. 3), which is also SAELens' MatryoshkaBatchTopKTrainingSAE loss (full loss + each inner level's MSE).

dictionary_learning's MatryoshkaBatchTopKTrainer uses mean_m(w_m L_m) + auxk_alpha * AuxK instead, i.e.
its reconstruction part is (w_G / G) times ours: ours equals its loss times G / w_G when auxk_coeff =
auxk_alpha * G / w_G (G^2 * auxk_alpha for its default equal weights 1 / G). Its AuxK also normalises by the
residual's variance, jaxsae's by its mean square (as for TopK).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxsae.sae.base import reconstruction_loss
from jaxsae.sae.batchtopk import BatchTopKSAE
from jaxsae.sae.config import SAEConfig


def group_sizes(cfg: SAEConfig) -> tuple[int, ...]:
    """Latents per group: floor(f * d_sae) for each group but the last, which takes the rest
    (dictionary_learning's rule; the 1e-6 keeps fractions such as 1/49 from flooring one short)."""
    head = [math.floor(f * cfg.d_sae + 1e-6) for f in cfg.group_fractions[:-1]]
    return (*head, cfg.d_sae - sum(head))


def prefix_weights(cfg: SAEConfig) -> tuple[float, ...]:
    """w_m / w_G: each prefix's loss weight relative to the full reconstruction's."""
    w = cfg.group_weights or (1.0,) * len(cfg.group_fractions)
    return tuple(float(x) / float(w[-1]) for x in w)


def validate(cfg: SAEConfig) -> None:
    """ValueError naming the fix for group settings the kind cannot use."""
    fr, hint = cfg.group_fractions, "e.g. sae.group_fractions=[0.0625, 0.125, 0.25, 0.5625]"
    if not fr:
        raise ValueError(f"sae.kind=matryoshka_batchtopk needs sae.group_fractions (each group's share of "
                         f"d_sae, summing to 1): {hint}")
    if any(not f > 0 for f in fr) or not math.isclose(sum(fr), 1.0, rel_tol=1e-6):
        raise ValueError(f"sae.group_fractions={list(fr)} must be positive and sum to 1: {hint}")
    sizes = group_sizes(cfg)
    if min(sizes) <= 0:
        raise ValueError(f"sae.group_fractions={list(fr)} leaves an empty group at d_sae={cfg.d_sae} (sizes "
                         f"{list(sizes)}): use fewer or larger groups")
    w = cfg.group_weights
    if w is not None and (len(w) != len(fr) or any(not x >= 0 for x in w) or not w[-1] > 0):
        raise ValueError(f"sae.group_weights={list(w)} needs one weight >= 0 per group ({len(fr)}), the last > 0; "
                         "or leave it unset for equal weights")


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: BatchTopK's params (threshold included), activation, AuxK and
    inference; penalties['matryoshka'] adds the inner prefixes' reconstruction losses."""

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc=None):
        terms = dict(super().loss_terms(x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc))
        dt = self.cfg.compute_dtype
        partial = jnp.broadcast_to(self.b_dec, x.shape)
        inner = jnp.zeros((), jnp.float32)
        start = 0
        # the outer prefix is x_hat itself; each inner one adds its group's decode to the last
        for size, w in zip(group_sizes(self.cfg)[:-1], prefix_weights(self.cfg)[:-1]):
            rows = slice(start, start + size)
            partial = partial + jnp.dot(f[:, rows].astype(dt), self.W_dec[rows].astype(dt),
                                        preferred_element_type=jnp.float32)
            inner = inner + w * reconstruction_loss(x, partial)
            start += size
        terms["matryoshka"] = inner
        return terms
