"""SAE hyper-parameters.

`SAEConfig` is a frozen (hashable) dataclass so it can be a static field of a
Flax module and a static argument of `jax.jit`. It is also the run config's
`sae:` section: every field has a default (d_model=0 means "the model's width",
filled in by the trainer with `dataclasses.replace`).

What each kind does with these fields lives in `jaxsae.sae.kinds`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax.numpy as jnp

DType = Literal["float32", "bfloat16", "float16"]
Decode = Literal["auto", "dense", "sparse"]
DTYPES: tuple[str, ...] = typing.get_args(DType)
DECODES: tuple[str, ...] = typing.get_args(Decode)
# The fields that describe an SAE's architecture (what a saved SAE brings with it when a run starts
# from it); every other field is a training setting the run decides.
ARCHITECTURE_FIELDS = ("kind", "d_model", "d_sae", "k", "group_fractions", "group_weights")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture and loss settings of one sparse autoencoder.

    Attributes:
      kind: a name in `jaxsae.sae.KINDS`: topk | batchtopk | relu | jumprelu | matryoshka_batchtopk.
      d_model: width of the activations being reconstructed; 0 = not known yet (the run fills in
        the model's width; `validate(require_d_model=False)` accepts it until then).
      d_sae: number of latents (dictionary size).
      k: active latents per token (topk) or on average per token (batchtopk kinds).
      l1_coeff: ReLU only; weight of sum_i f_i * ||W_dec,i||.
      l1_warmup_steps: ReLU only; linear warm-up of l1_coeff from 0.
      jumprelu_init_threshold: JumpReLU initial theta (stored as log).
      jumprelu_bandwidth: JumpReLU straight-through rectangle kernel width eps.
      l0_coeff: JumpReLU only; weight of the L0 loss (dictionary_learning's `sparsity_penalty`).
      l0_target: JumpReLU only; None: the L0 loss is l0_coeff * L0 (the "Jumping Ahead" paper); a
        number T > 0: l0_coeff * (L0 / T - 1)^2 (dictionary_learning's JumpReluTrainer `target_l0`),
        which pulls the mean L0 towards T from either side.
      l0_warmup_steps: JumpReLU only; linear warm-up of l0_coeff from 0 over the first steps of the
        MSE phase (dictionary_learning's `sparsity_warmup_steps`); 0 = none.
      decoder_unit_norm: hold decoder rows at unit norm (gradient projection + renormalisation);
        None = the kind's default (on for topk and the batchtopk kinds, off for relu and jumprelu).
        Read the result as the `unit_norm_decoder` property.
      auxk_coeff: topk and batchtopk kinds; weight of the AuxK dead-latent loss.
      k_aux: latents used by AuxK; None -> d_model // 2 (clamped to d_sae).
      dead_tokens_threshold: a latent that has not fired for this many
        tokens counts as dead (for AuxK).
      threshold_decay: batchtopk kinds; EMA decay of the inference threshold
        (dictionary_learning's `threshold_beta`).
      threshold_start_step: batchtopk kinds; the threshold is first calibrated
        on the update after this optimizer step (dictionary_learning's rule).
      group_fractions: matryoshka_batchtopk only; the share of d_sae in each
        nested group, in order, summing to 1 (dictionary_learning's name and
        rounding: floor(f * d_sae) latents per group, the last takes the rest).
      group_weights: matryoshka_batchtopk only; weight of each prefix's
        reconstruction loss (None = equal weights).
      dtype: compute dtype of the encoder/decoder matmuls (params stay f32).
      decode: how a training step computes x_hat and the encoder's gradient; a compute choice only
        (the same numbers within float rounding; checkpoints and exports do not depend on it, and
        under auto evaluation keeps the dense decoder).
        dense: f @ W_dec and autodiff's dense backward (matmuls over all of d_sae; any sharding; best
        on TPU). sparse (fixed-k kinds only): gather the k decoder rows of each token,
        sum_j a_j W_dec[idx_j], and give the encoder a gradient that touches only each token's k
        latents (`jaxsae.sae.sparse_grad`); k/d_sae of the decoder's and the backward's FLOPs, faster
        on CPU/GPU, but f32[tokens, k, d_model] intermediates and gathers along d_sae, which a mesh
        with model > 1 has to all-gather. auto (the default): `resolve_decode` picks one per forward
        (sparse for topk when training off TPU with d_sae whole on each device and d_sae >= 64 k;
        else dense).
    """

    kind: str = "topk"
    d_model: int = 0
    d_sae: int = 4096
    k: int = 32
    l1_coeff: float = 0.0
    l1_warmup_steps: int = 0
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    l0_coeff: float = 0.0
    l0_target: float | None = None
    l0_warmup_steps: int = 0
    decoder_unit_norm: bool | None = None
    auxk_coeff: float = 1 / 32
    k_aux: int | None = None
    dead_tokens_threshold: int = 10_000_000
    threshold_decay: float = 0.999
    threshold_start_step: int = 1000
    # None rather than (): a checkpoint's metadata stores this config as JSON, where () would come back as []
    group_fractions: tuple[float, ...] | None = None
    group_weights: tuple[float, ...] | None = None
    dtype: DType = "float32"
    decode: Decode = "auto"

    def __post_init__(self):
        # configs read back from JSON or YAML carry lists; a jit static argument must be hashable
        for name in ("group_fractions", "group_weights"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))

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
        """Decoder rows are held at unit norm: `decoder_unit_norm`, or the kind's default when None.
        Everything that treats the decoder differently for unit-norm SAEs reads this, not the kind."""
        from jaxsae.sae.kinds import kind_of  # local: the kinds import the modules, which import this

        if self.decoder_unit_norm is not None:
            return self.decoder_unit_norm
        return kind_of(self).unit_norm_decoder

    def validate(self, *, require_d_model: bool = True) -> "SAEConfig":
        """Raise ValueError (one line naming the field and the fix); return self.

        require_d_model=False accepts d_model=0 (a run's `sae:` section before the model is known).
        """
        from jaxsae.sae.kinds import REGISTRY

        def fail(msg: str):
            raise ValueError(msg)

        kind = REGISTRY.get(self.kind)
        if kind is None:
            fail(f"sae.kind={self.kind!r} is unknown: choose one of {', '.join(REGISTRY)}")
        for name in ("d_model", "d_sae", "k"):
            v = getattr(self, name)
            if name == "d_model" and not require_d_model and v == 0:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"sae.{name}={v!r} must be a positive integer: set sae.{name} >= 1")
        if kind.uses_k and self.k > self.d_sae:
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
        if self.l0_target is not None:
            if not kind.l0_penalty:
                l0_kinds = " or ".join(n for n, kd in REGISTRY.items() if kd.l0_penalty)
                fail(f"sae.l0_target is for sae.kind={l0_kinds}, not {self.kind}: remove sae.l0_target")
            if isinstance(self.l0_target, bool) or not self.l0_target > 0:  # also catches NaN
                fail(f"sae.l0_target={self.l0_target!r} must be > 0: set the mean L0 to aim for (e.g. 16), "
                     "or remove it for the l0_coeff * L0 penalty")
        if not (self.decoder_unit_norm is None or isinstance(self.decoder_unit_norm, bool)):
            fail(f"sae.decoder_unit_norm={self.decoder_unit_norm!r}: choose true, false or leave it out "
                 "(the kind's default)")
        for name in ("l1_warmup_steps", "l0_warmup_steps", "threshold_start_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"sae.{name}={v!r} must be an integer >= 0")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            v = getattr(self, name)
            if not v > 0:
                fail(f"sae.{name}={v!r} must be > 0: choose a small positive value such as 1e-3")
        if not 0 <= self.threshold_decay < 1:  # also catches NaN
            fail(f"sae.threshold_decay={self.threshold_decay!r} must be in [0, 1): e.g. 0.999")
        if self.dead_tokens_threshold <= 0:
            fail(f"sae.dead_tokens_threshold={self.dead_tokens_threshold!r} must be > 0")
        if self.decode not in DECODES:
            fail(f"sae.decode={self.decode!r}: choose {', '.join(DECODES)}")
        if self.decode == "sparse" and not kind.fixed_k:  # auto quietly resolves to dense for these
            fixed = ", ".join(n for n, kd in REGISTRY.items() if kd.fixed_k)
            fail(f"sae.decode=sparse needs a fixed k per token (kind {fixed}), not {self.kind}: "
                 "use sae.decode=dense")
        if self.dtype not in DTYPES:
            fail(f"sae.dtype={self.dtype!r} is unsupported: choose one of {', '.join(DTYPES)}")
        kind.validate(self)
        return self


# auto's sparse path needs at least this many latents per active one (d_sae / k). Measured on a 2-core CPU
# (bench/README.md "Where sparse wins"): MSE step sparse/dense time 0.39-0.71 at d_sae/k of 85-256, 0.87-1.26
# (parity within the noise) at 64, 1.21-1.36 at 16-42; the fused step's 0.89 at 64. The gathers and the
# [tokens, k, d_model] rows cost more per FLOP than the dense matmuls, so the FLOPs saved must be large.
SPARSE_MIN_LATENTS_PER_ACTIVE = 64


def resolve_decode(decode: str, fixed_k: bool, platform: str, d_sae_split: bool,
                   training: bool = True, latents_per_active: float = float("inf")) -> Literal["dense", "sparse"]:
    """The decode a forward uses: `decode` itself unless it is auto.

    decode: the `sae.decode` setting; fixed_k: this forward has each token's k active latents (a fixed-k
    kind, no LoRA on the SAE); platform: the backend the step compiles for (`jax.default_backend()`);
    d_sae_split: the step's mesh splits d_sae over a model axis of size > 1; training: a training
    forward (one that will be differentiated), not evaluation or inference; latents_per_active: d_sae / k
    of this forward.

    auto is sparse only where it wins: in training (most of the saving is in the backward; evaluation
    keeps the dense decoder and so reports the numbers it always did), with a fixed k (otherwise there
    are no per-token rows to gather), off TPU (the MXU runs the dense matmuls at full rate, while
    gathers and scatter-adds along d_sae are slow there), and with d_sae whole on each device (split,
    every gather would all-gather W_enc / W_dec along it, where the dense matmuls stay local), and with
    at least `SPARSE_MIN_LATENTS_PER_ACTIVE` latents per active one (below it the dense step is faster).
    """
    if decode != "auto":
        return "sparse" if decode == "sparse" and fixed_k else "dense"
    wins = latents_per_active >= SPARSE_MIN_LATENTS_PER_ACTIVE
    return "sparse" if training and fixed_k and platform != "tpu" and not d_sae_split and wins else "dense"
