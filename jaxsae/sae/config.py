"""SAE hyper-parameters.

`SAEConfig` is a frozen (hashable) dataclass so it can be a static field of a
Flax module and a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

KINDS = ("topk", "batchtopk", "relu", "jumprelu")
# Kinds whose decoder rows are kept at unit norm (gradient projection +
# renormalisation, see `decoder_norm.py`). ReLU folds the decoder norm into
# its L1 penalty instead; JumpReLU's L0 penalty is scale-free.
UNIT_NORM_KINDS = ("topk", "batchtopk")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture and loss settings of one sparse autoencoder.

    Attributes:
      kind: 'topk' | 'batchtopk' | 'relu' | 'jumprelu'.
      d_model: width of the activations being reconstructed.
      d_sae: number of latents (dictionary size).
      k: active latents per token (topk) or on average per token (batchtopk).
      l1_coeff: ReLU only; weight of sum_i f_i * ||W_dec,i||.
      l1_warmup_steps: ReLU only; linear warm-up of l1_coeff from 0.
      jumprelu_init_threshold: JumpReLU initial theta (stored as log).
      jumprelu_bandwidth: JumpReLU straight-through rectangle kernel width eps.
      l0_coeff: JumpReLU only; weight of the mean L0 penalty.
      auxk_coeff: topk/batchtopk; weight of the AuxK dead-latent loss.
      k_aux: latents used by AuxK; None -> d_model // 2 (clamped to d_sae).
      dead_tokens_threshold: a latent that has not fired for this many
        tokens counts as dead (for AuxK).
      dtype: compute dtype of the encoder/decoder matmuls (params stay f32).
      decode: dense (f @ W_dec: one matmul, any sharding; the default, best on TPU) or sparse
        (topk only: gather the k decoder rows of each token, sum_j a_j W_dec[idx_j]; k/d_sae of the
        FLOPs, faster on CPU/GPU at large d_sae, but an f32[tokens, k, d_model] intermediate and a
        gather along d_sae, which a mesh with model > 1 has to all-gather).
    """

    kind: str = "topk"
    d_model: int = 0  # 0 in a run config: the trainer fills in the model's width
    d_sae: int = 4096
    k: int = 32
    l1_coeff: float = 0.0
    l1_warmup_steps: int = 0
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    l0_coeff: float = 0.0
    auxk_coeff: float = 1 / 32
    k_aux: int | None = None
    dead_tokens_threshold: int = 10_000_000
    dtype: str = "float32"
    decode: str = "dense"

    @property
    def effective_k_aux(self) -> int:
        """k_aux with its default filled in and clamped to [1, d_sae]."""
        k_aux = self.k_aux if self.k_aux is not None else self.d_model // 2
        return max(1, min(k_aux, self.d_sae))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def unit_norm_decoder(self) -> bool:
        return self.kind in UNIT_NORM_KINDS

    def validate(self, require_d_model: bool = True) -> "SAEConfig":
        """Raise ValueError (one line naming the field and the fix); return self. require_d_model=False
        checks a run config's `sae:` section, whose d_model (0) comes from the model later."""

        def fail(msg: str):
            raise ValueError(msg)

        if self.kind not in KINDS:
            fail(f"sae.kind={self.kind!r} is unknown: choose one of {', '.join(KINDS)}")
        for name in ("d_model", "d_sae", "k") if require_d_model else ("d_sae", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"sae.{name}={v!r} must be a positive integer: set sae.{name} >= 1")
        if self.kind in ("topk", "batchtopk") and self.k > self.d_sae:
            fail(f"sae.k={self.k} exceeds sae.d_sae={self.d_sae}: choose k <= d_sae")
        if self.k_aux is not None:
            if not isinstance(self.k_aux, int) or self.k_aux <= 0:
                fail(f"sae.k_aux={self.k_aux!r} must be a positive integer or None (default d_model//2)")
            if self.k_aux > self.d_sae:
                fail(f"sae.k_aux={self.k_aux} exceeds sae.d_sae={self.d_sae}: choose k_aux <= d_sae")
        for name in ("l1_coeff", "l0_coeff", "auxk_coeff"):
            v = getattr(self, name)
            if not v >= 0:  # also catches NaN
                fail(f"sae.{name}={v!r} is negative: choose {name} >= 0")
        if not isinstance(self.l1_warmup_steps, int) or self.l1_warmup_steps < 0:
            fail(f"sae.l1_warmup_steps={self.l1_warmup_steps!r} must be an integer >= 0")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            v = getattr(self, name)
            if not v > 0:
                fail(f"sae.{name}={v!r} must be > 0: choose a small positive value such as 1e-3")
        if self.dead_tokens_threshold <= 0:
            fail(f"sae.dead_tokens_threshold={self.dead_tokens_threshold!r} must be > 0")
        if self.decode not in ("dense", "sparse"):
            fail(f"sae.decode={self.decode!r}: choose dense or sparse")
        if self.decode == "sparse" and self.kind != "topk":
            fail(f"sae.decode=sparse needs a fixed k per token (kind topk), not {self.kind}: use sae.decode=dense")
        if self.dtype not in DTYPES:
            fail(f"sae.dtype={self.dtype!r} is unsupported: choose one of {', '.join(DTYPES)}")
        return self
