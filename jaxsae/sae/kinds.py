"""The registry of SAE kinds: what differs between kinds, in one table.

Code outside a kind's module asks its `SAEKind` instead of testing names:

    kind_of(cfg).unit_norm_decoder      the kind's default for holding decoder rows at unit norm (read
                                        `cfg.unit_norm_decoder`, which `sae.decoder_unit_norm` overrides)
    kind_of(cfg).l1_controlled          the fine-tune nudges the L1 coefficient to hold L0
    post_update(cfg, params, out, step) after each optimizer step (BatchTopK's threshold)

Adding a kind: its module (an `SAEBase` subclass and any hooks), one `SAEKind` entry below, and its
dictionary_learning layout in `jaxsae.interop.dictionary_learning` if it has one (SAELens export needs
only the `saelens` architecture name here); a kind with hyper-parameters of its own also adds them to
`SAEConfig`, which is the run config's flat `sae:` section.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from jaxsae.sae import batchtopk, matryoshka
from jaxsae.sae.base import SAEBase, SAEOutput
from jaxsae.sae.config import SAEConfig
from jaxsae.sae.jumprelu import JumpReLUSAE
from jaxsae.sae.jumprelu import inference_threshold as jumprelu_threshold
from jaxsae.sae.relu import ReLUSAE
from jaxsae.sae.topk import TopKSAE


def _same_params(cfg: SAEConfig, params: dict, out: SAEOutput, step) -> dict:
    return params


def _no_checks(cfg: SAEConfig) -> None:
    return None


def _no_threshold(cfg: SAEConfig, params: dict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class SAEKind:
    """One SAE kind.

    Attributes:
      name: the `sae.kind` value.
      module: the Flax module class (an `SAEBase` subclass) built from an SAEConfig.
      unit_norm_decoder: by default decoder rows are held at unit norm (gradient projection +
        renormalisation); `SAEConfig.decoder_unit_norm` overrides it, so code reads `cfg.unit_norm_decoder`.
      l1_controlled: sparsity comes from an L1 coefficient, which the fine-tune's controller nudges to
        hold L0 (the `train/l1_coeff` metric).
      l0_penalty: sparsity comes from an L0 loss on learned thresholds (l0_coeff, l0_target,
        l0_warmup_steps apply).
      fixed_k: exactly k latents per token, known per token: `decode: sparse` can gather them.
      uses_k: `k` sets the sparsity (so k <= d_sae is checked).
      post_update: (cfg, params, out, step) -> params, applied after each optimizer step of training
        (step: i32[] the step just taken, 0 first). Default: params unchanged.
      validate: (cfg) -> None, raising ValueError for kind-specific settings it cannot use.
      inference_threshold: (cfg, params) -> f32[d_sae] theta with f = pre * (pre > theta) at inference,
        for kinds exported as a JumpReLU; else None.
      saelens: the SAELens architecture an export writes (standard | topk | jumprelu).
      dictionary_learning: the dictionary_learning class it is exported as, or None.
    """

    name: str
    module: type[SAEBase]
    unit_norm_decoder: bool = False
    l1_controlled: bool = False
    l0_penalty: bool = False
    fixed_k: bool = False
    uses_k: bool = False
    post_update: Callable[[SAEConfig, dict, SAEOutput, jax.Array], dict] = _same_params
    validate: Callable[[SAEConfig], None] = _no_checks
    inference_threshold: Callable[[SAEConfig, dict], np.ndarray | None] = _no_threshold
    saelens: str = ""
    dictionary_learning: str | None = None


REGISTRY: dict[str, SAEKind] = {k.name: k for k in (
    SAEKind("topk", TopKSAE, unit_norm_decoder=True, fixed_k=True, uses_k=True,
            saelens="topk", dictionary_learning="AutoEncoderTopK"),
    SAEKind("batchtopk", batchtopk.BatchTopKSAE, unit_norm_decoder=True, uses_k=True,
            post_update=batchtopk.post_update, inference_threshold=batchtopk.inference_threshold,
            saelens="jumprelu", dictionary_learning="BatchTopKSAE"),
    SAEKind("relu", ReLUSAE, l1_controlled=True, saelens="standard", dictionary_learning="AutoEncoder"),
    SAEKind("jumprelu", JumpReLUSAE, l0_penalty=True, inference_threshold=jumprelu_threshold,
            saelens="jumprelu", dictionary_learning="JumpReluAutoEncoder"),
    SAEKind("matryoshka_batchtopk", matryoshka.MatryoshkaBatchTopKSAE, unit_norm_decoder=True, uses_k=True,
            post_update=batchtopk.post_update, validate=matryoshka.validate,
            inference_threshold=batchtopk.inference_threshold,
            saelens="jumprelu", dictionary_learning="MatryoshkaBatchTopKSAE"),
)}
KINDS: tuple[str, ...] = tuple(REGISTRY)


def kind_of(cfg_or_name: SAEConfig | str) -> SAEKind:
    """The registered kind of an SAEConfig (or a kind name); ValueError naming the choices."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.kind
    kind = REGISTRY.get(name)
    if kind is None:
        raise ValueError(f"sae.kind={name!r} is unknown: choose one of {', '.join(KINDS)}")
    return kind


def post_update(cfg: SAEConfig, params: dict, out: SAEOutput, step) -> dict:
    """params after the kind's post-step bookkeeping (BatchTopK kinds: the inference threshold).

    step: i32[] (traced) the optimizer step just taken, 0 for the first."""
    return kind_of(cfg).post_update(cfg, params, out, step)
