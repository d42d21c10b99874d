"""The language-model interface every later stage uses: embed → blocks[a:b] → unembed.

`LM` bundles a Flax module, its params (a plain pytree) and its tokenizer. Every method that computes
takes `params=None` (the loaded ones) so that jit-compiled callers can pass params as arguments: the
fused fine-tune closes over them as constants, the sharded trainer passes them with shardings.

Layer numbering follows transformers' `hidden_states`: `residual(tokens, layer)` is the residual
stream after block `layer` (0-indexed), i.e. `hidden_states[layer + 1]` (for every layer but the last,
whose `hidden_states` entry transformers takes after the final norm).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsae.models import hf
from jaxsae.models.family import ModelConfig, family_of

Params = Any


def make_module(cfg: ModelConfig) -> nn.Module:
    """The Flax module of `cfg`'s family (`jaxsae.models.family`)."""
    return family_of(cfg).module_cls(cfg)


class LM:
    """A loaded language model. Shapes: tokens int[b, t]; residual [b, t, d_model]; logits f32[b, t, vocab]
    (float32 whatever the LM's dtype, so that the CE and the KL never read bfloat16 logits)."""

    def __init__(self, config: ModelConfig, params: Params, path: Path | None = None):
        self.config = config
        self.module = make_module(config)
        self.params = params
        self.path = path
        self._tokenizer = None

    # -- facts ----------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tokenizer(self):
        """`transformers.AutoTokenizer` from the model directory (loaded on first use)."""
        if self._tokenizer is None:
            if self.path is None:
                raise ValueError("this LM was built in memory and has no tokenizer; pass one explicitly")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for this {self.n_layers}-layer {self.config.arch} "
                             f"model; choose 0..{self.n_layers - 1} (the residual after that block)")
        return layer

    # -- the split forward pass (pure in params; jit at the call site) ----------------------------
    def _apply(self, params, method: str, *args, **kw):
        return self.module.apply({"params": self.params if params is None else params}, *args,
                                 method=getattr(type(self.module), method), **kw)

    def embed(self, tokens: jax.Array, params: Params = None) -> jax.Array:
        """int[b, t] -> [b, t, d_model]."""
        return self._apply(params, "embed", tokens)

    def blocks(self, h: jax.Array, start: int, stop: int, key_valid: jax.Array | None = None,
               params: Params = None) -> jax.Array:
        """Blocks start..stop-1: [b, t, d_model] -> [b, t, d_model]. key_valid: bool[b, t] (padding False)."""
        if not 0 <= start <= stop <= self.n_layers:
            raise ValueError(f"blocks[{start}:{stop}] is outside 0..{self.n_layers}")
        return self._apply(params, "blocks", h, start, stop, key_valid)

    def unembed(self, h: jax.Array, params: Params = None) -> jax.Array:
        """Final norm + unembedding: [b, t, d_model] -> f32[b, t, vocab]."""
        return self._apply(params, "unembed", h)

    def prefix(self, tokens: jax.Array, layer: int, key_valid=None, params: Params = None) -> jax.Array:
        """Embedding and blocks 0..layer: the residual after block `layer`, [b, t, d_model]."""
        return self.blocks(self.embed(tokens, params), 0, self.check_layer(layer) + 1, key_valid, params)

    def suffix(self, h: jax.Array, layer: int, key_valid=None, params: Params = None) -> jax.Array:
        """Blocks after `layer`, final norm and unembedding: residual after block `layer` -> logits."""
        h = self.blocks(h, self.check_layer(layer) + 1, self.n_layers, key_valid, params)
        return self.unembed(h, params)

    def forward(self, tokens: jax.Array, key_valid=None, params: Params = None) -> jax.Array:
        return self.unembed(self.blocks(self.embed(tokens, params), 0, self.n_layers, key_valid, params), params)

    # -- jit-compiled conveniences on the loaded params -------------------------------------------
    @functools.cached_property
    def _jit_logits(self):
        return jax.jit(lambda p, tokens, kv: self.forward(tokens, kv, p))

    @functools.cached_property
    def _jit_residual(self):
        return jax.jit(lambda p, tokens, layer, kv: self.prefix(tokens, layer, kv, p), static_argnums=2)

    def logits(self, tokens, key_valid=None) -> jax.Array:
        """int[b, t] -> logits [b, t, vocab] (jit-compiled)."""
        return self._jit_logits(self.params, jnp.asarray(tokens), key_valid)

    def residual(self, tokens, layer: int, key_valid=None) -> jax.Array:
        """int[b, t] -> residual after block `layer` [b, t, d_model]; only blocks 0..layer run."""
        return self._jit_residual(self.params, jnp.asarray(tokens), self.check_layer(layer), key_valid)

    # -- structure --------------------------------------------------------------------------------
    def abstract_params(self):
        return abstract_params(self.config)

    def param_axes(self):
        """Pytree of logical axis-name tuples, same structure as params (for `jaxsae.sharding`)."""
        return param_axes(self.config)


def _boxed_shapes(cfg: ModelConfig):
    module = make_module(cfg)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]


def abstract_params(cfg: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct matching the params."""
    return nn.unbox(_boxed_shapes(cfg))


def param_axes(cfg: ModelConfig):
    return nn.get_partition_spec(_boxed_shapes(cfg))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Fresh random params (for training a model from scratch)."""
    module = make_module(cfg)
    return nn.unbox(module.init(rng, jnp.zeros((1, 2), jnp.int32))["params"])


def read_config(path: Path, dtype: str | None = None) -> ModelConfig:
    """The model config in `path`/config.json, parsed by the family that reads its `model_type`.
    dtype "auto": as `jaxsae.config.resolve_dtype` on this process's default backend."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise hf.CheckpointError(f"{path} has no config.json; point at a directory saved with save_pretrained")
    try:
        raw = json.loads(cfg_file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise hf.CheckpointError(f"{cfg_file} is not valid JSON ({e}): the model directory is damaged or was "
                                 "copied in part; copy or download it again") from None
    if not isinstance(raw, dict):
        raise hf.CheckpointError(f"{cfg_file} holds a JSON {type(raw).__name__}, not a config object: copy or "
                                 "download it again")
    try:
        if dtype == "auto":
            from jaxsae.config import resolve_dtype

            dtype = resolve_dtype(dtype, jax.default_backend())
        return hf.parse_config(raw, str(jnp.dtype(dtype or "float32")))
    except hf.CheckpointError:
        raise
    except KeyError as e:
        raise hf.CheckpointError(f"{cfg_file} lacks {e.args[0]!r}, which a {raw.get('model_type')} config needs: "
                                 "the file is incomplete; copy or download it again") from None
    except (TypeError, ValueError) as e:
        raise hf.CheckpointError(f"{cfg_file} has a value jaxsae cannot use ({type(e).__name__}: {e}): copy or "
                                 "download it again") from None


def load_lm(path_or_hub_id: str | os.PathLike, dtype: str | None = None, shardings=None) -> LM:
    """Loads a Hugging Face checkpoint (local directory or hub id) into a jaxsae `LM`.

    dtype: parameter/activation dtype ("float32" by default, "bfloat16" for large models, "auto": bfloat16 on
    a GPU or TPU, float32 on the CPU). The logits are float32 in every dtype (the families' `unembed`).
    shardings: optional pytree of `jax.sharding.Sharding` matching the params; each tensor is placed
    straight into its sharding as it is converted, so no host or device ever holds a full extra copy.
    Errors (unknown model_type, missing files, wrong shapes) are raised before any tensor is converted.
    """
    path = hf.resolve(path_or_hub_id)
    cfg = read_config(path, dtype)
    weights = hf.open_weights(path)
    expected = traverse_util.flatten_dict(abstract_params(cfg), sep="/")
    hf.check_weights(cfg, weights, {k: v.shape for k, v in expected.items()})
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    flat = {}
    for ours, arr in hf.iter_converted(cfg, weights, cfg.jnp_dtype):
        flat[ours] = jax.device_put(arr, flat_shardings.get(ours))
    return LM(cfg, traverse_util.unflatten_dict(flat, sep="/"), path)
