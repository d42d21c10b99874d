"""The registry of LM families: everything that differs between GPT-NeoX, Gemma, Llama, ... has one home.

A `Family` bundles what jaxsae needs to know about one architecture: the Hugging Face `model_type`s it
reads, its config dataclass and Flax module, how a config.json becomes that config (with the family's
attribute whitelist), its weight-conversion table, and its final norm and unembedding (for the direct
logit effects of `jaxsae.analysis`). Each family module builds its `Family` and calls `register`;
`jaxsae.models` imports every family module once. Everything else looks families up here:

    family_for_model_type(raw["model_type"]).parse_config(raw, "float32")   # config.json -> config
    family_of(cfg).module_cls(cfg)                                          # config -> Flax module

so adding a family touches its own module and the import line in `jaxsae/models/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import numpy as np

from jaxsae.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the fix."""


class ModelConfig(Protocol):
    """What the rest of jaxsae reads from any family's (frozen dataclass) config."""

    vocab_size: int
    d_model: int
    n_layers: int
    max_position_embeddings: int
    dtype: str

    @property
    def arch(self) -> str: ...

    @property
    def jnp_dtype(self) -> Any: ...


# (our param path "a/b/c", HF tensor name, transform); the transform is `jaxsae.models.hf.Transform`.
Rule = tuple[str, str, Any]
Params = Any


@dataclasses.dataclass(frozen=True)
class Family:
    """One LM architecture family.

    parse_config(raw config.json dict, dtype name) -> config; raises CheckpointError on attributes
        or values the port does not handle.
    conversion_table(config) -> [Rule]: every HF tensor and the transform into our layout.
    final_norm_and_unembed(params, config) -> (gamma f32[d_model], W_U f32[d_model, vocab], centre):
        the final norm's effective weight, the unembedding, and whether the norm subtracts the mean
        (LayerNorm) or not (RMSNorm).
    """

    name: str
    model_types: tuple[str, ...]
    config_cls: type
    module_cls: type[nn.Module]
    parse_config: Callable[[dict, str], ModelConfig]
    conversion_table: Callable[[Any], list[Rule]]
    final_norm_and_unembed: Callable[[Params, Any], tuple[np.ndarray, np.ndarray, bool]]


_BY_MODEL_TYPE: dict[str, Family] = {}
_BY_CONFIG: dict[type, Family] = {}


def register(family: Family) -> Family:
    """Adds `family` to the registry (once per model_type and config class); returns it."""
    taken = [mt for mt in family.model_types if _BY_MODEL_TYPE.get(mt, family) is not family]
    assert not taken, f"model_type {taken} is already registered to another family"
    assert _BY_CONFIG.get(family.config_cls, family) is family, family.config_cls
    for mt in family.model_types:
        _BY_MODEL_TYPE[mt] = family
    _BY_CONFIG[family.config_cls] = family
    return family


def families() -> tuple[Family, ...]:
    return tuple(dict.fromkeys(_BY_MODEL_TYPE.values()))


def family_for_model_type(model_type: str | None) -> Family:
    """The family that reads config.json's `model_type`; CheckpointError if none does."""
    if model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(f"model_type={model_type!r} is not supported; jaxsae ports {sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def family_of(cfg: ModelConfig) -> Family:
    """The family whose config class `cfg` is an instance of (exactly: subclasses register themselves)."""
    family = _BY_CONFIG.get(type(cfg))
    if family is None:
        raise TypeError(f"{type(cfg).__name__} is not the config of a registered LM family; "
                        f"known: {[f.config_cls.__name__ for f in families()]}")
    return family
