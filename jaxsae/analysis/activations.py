"""Feature activations of a trained SAE on text: LM prefix up to the hook, then the SAE encoder.

    f = SAE.encode(resid_post[layer](tokens) / scale)        f32[b, t, d_sae]

`FeatureEncoder` jit-compiles that once per shape and also offers the reduced form a scan over many
tokens needs (the requested features' activations and a per-feature firing count), so the full
f32[b, t, d_sae] never leaves the device.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def feature_activations(lm, sae, layer: int, tokens) -> jax.Array:
    """tokens int[b, t] -> f32[b, t, d_sae]: the SAE's latents on the residual after block `layer`."""
    x = lm.residual(jnp.asarray(tokens), layer)
    return sae.encode(x)


def top_k_sparse(acts: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """f32[..., d_sae] -> (values f32[..., k], indices i32[..., k]), largest first (zeros where < k fire)."""
    return jax.lax.top_k(jnp.asarray(acts), k)


class TextActivations(NamedTuple):
    """One text's tokens and their feature activations."""

    tokens: np.ndarray  # i32[t]
    pieces: list[str]  # decoded text of each token
    acts: np.ndarray  # f32[t, d_sae]


class FeatureEncoder:
    """An LM, an SAE and the hook layer, with jit-compiled encoding.

    `encode_residual(x)`: raw residuals f32[..., d_model] -> f32[..., d_sae];
    `__call__(tokens)`: int[b, t] -> f32[b, t, d_sae];
    `scan_step(tokens | x, valid, features)`: the reduction a streamed analysis keeps per batch.
    """

    def __init__(self, lm, sae, layer: int, prepend_bos: bool = False):
        self.lm, self.sae, self.layer = lm, sae, lm.check_layer(layer)
        self.prepend_bos = prepend_bos
        self.module = sae.module
        self.d_sae = sae.cfg.d_sae

    def _encode(self, sae_params, x):
        return self.module.apply({"params": sae_params}, x / self.sae.scale, method="encode")

    @functools.cached_property
    def _jit_tokens(self):
        return jax.jit(lambda lp, sp, tokens: self._encode(sp, self.lm.prefix(tokens, self.layer, params=lp)))

    @functools.cached_property
    def _jit_residual(self):
        return jax.jit(self._encode)

    def __call__(self, tokens) -> jax.Array:
        return self._jit_tokens(self.lm.params, self.sae.params, jnp.asarray(tokens, jnp.int32))

    def encode_residual(self, x) -> jax.Array:
        return self._jit_residual(self.sae.params, jnp.asarray(x, jnp.float32))

    @functools.cached_property
    def _jit_scan(self):
        def reduce(f, valid, features):
            f = jnp.where(valid[..., None], f, 0.0)
            fired = jnp.sum(f > 0, axis=(0, 1), dtype=jnp.int32)  # i32[d_sae]
            return f[..., features], fired  # f32[b, t, n_features]

        def from_tokens(lp, sp, tokens, valid, features):
            return reduce(self._encode(sp, self.lm.prefix(tokens, self.layer, params=lp)), valid, features)

        def from_residual(sp, x, valid, features):
            return reduce(self._encode(sp, x), valid, features)

        return jax.jit(from_tokens), jax.jit(from_residual)

    def scan_step(self, valid, features, tokens=None, x=None) -> tuple[np.ndarray, np.ndarray]:
        """(f32[b, t, n_features] of the requested features, i32[d_sae] firing counts) over the
        valid positions (bool[b, t]; others read 0). From tokens int[b, t] via the LM, or from
        raw residuals x f32[b, t, d_model] (e.g. read from the run's store)."""
        feats = jnp.asarray(features, jnp.int32)
        valid = jnp.asarray(valid, bool)
        from_tokens, from_residual = self._jit_scan
        if x is not None:
            out = from_residual(self.sae.params, jnp.asarray(x, jnp.float32), valid, feats)
        else:
            out = from_tokens(self.lm.params, self.sae.params, jnp.asarray(tokens, jnp.int32), valid, feats)
        return jax.device_get(out)

    def tokenize(self, text: str) -> np.ndarray:
        tok = self.lm.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if self.prepend_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        return np.asarray(ids, np.int32)

    def encode_text(self, text: str) -> TextActivations:
        """Any text -> its tokens, their decoded pieces and f32[t, d_sae] activations."""
        from jaxsae.analysis.tokens import token_pieces

        ids = self.tokenize(text)
        if ids.size == 0:
            raise ValueError("encode_text: the text has no tokens")
        acts = np.asarray(self(ids[None]))[0]
        return TextActivations(ids, token_pieces(self.lm.tokenizer, ids), acts)
