"""Trainable additions around a frozen SAE (Karvonen 2025, "Adapters"; PAPER.md "Results to compare against").

Each method is a small hashable object that the fused KL+MSE step (`jaxsae.train.finetune`) takes as
`compose`: the step differentiates a `trainable` pytree, and `compose(trainable, sae_params, lm_params)`
says what the spliced branch runs. The clean branch always runs the original LM: its logits are the target.

    lm_lora     W' = W + (α/r)·A@B on every attention and MLP kernel of the chosen blocks; SAE frozen; KL only
    sae_lora    W_enc' = W_enc + (α/r)·A@B and the same for W_dec; base SAE frozen; the fine-tune's KL+MSE;
                optional dropout on each factor pair's input, as PEFT's lora_dropout (training steps only)
    output      x̂' = x̂ + U·D·x̂ on the SAE's (normalised) output; SAE frozen; KL+MSE on x̂'
    output_mlp  x̂' = x̂ + U·relu(D·x̂)
The config's adapter.loss (kl | kl_mse) overrides these losses; kl drops the MSE and sparsity terms.

α = r (scale 1). A and D start random, B and U at zero, so every method starts exactly at the base model.
Merging A@B into the weight inside the step leaves the LM's and the SAE's forward code untouched.

Shapes: D = d_model, S = d_sae, r = rank. A LoRA factor pair for a kernel W[*in, *out] is
A[*in, r], B[r, *out]; their logical axes are W's with "lora_rank" appended / prepended.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

KINDS = ("lm_lora", "sae_lora", "output", "output_mlp")
LM_LAYERS = ("all", "after")
LOSSES = ("auto", "kl", "kl_mse")  # auto: KL for lm_lora, the fine-tune's KL+MSE for the SAE-side methods


class Composition(NamedTuple):
    """What the spliced branch runs.

    sae_params:   the SAE params it encodes/decodes with
    lm_params:    the LM params of its forward (the same object as the originals when untouched)
    out_map:      f32[..., D] -> f32[..., D] on the normalised reconstruction, or None
    rerun_prefix: the LM changes before the hook, so the spliced branch runs its own prefix
    sae_lora:     unmerged LoRA factors the SAE applies itself ({"factors": {"W_enc"|"W_dec": {"A", "B"}},
                  "scale", "dropout", "rng"}), when dropout makes merging impossible; None otherwise
                  (`jaxsae.sae.base.lora_delta`)
    """

    sae_params: Any
    lm_params: Any
    out_map: Callable | None
    rerun_prefix: bool
    sae_lora: Any = None


def identity_composition(sae_params, lm_params) -> Composition:
    """The plain fine-tune: the trainable pytree is the SAE, the LM is the original."""
    return Composition(sae_params, lm_params, None, False)


def lora_factors(key, shape: tuple, axes: tuple, n_in: int, rank: int) -> tuple[dict, dict]:
    """A[*in, r] ~ N(0, 1/fan_in), B[r, *out] = 0 for a kernel W[*in, *out]; returns (params, axes)."""
    fan_in = math.prod(shape[:n_in])
    a = jax.random.normal(key, (*shape[:n_in], rank), jnp.float32) / math.sqrt(fan_in)
    b = jnp.zeros((rank, *shape[n_in:]), jnp.float32)
    return {"A": a, "B": b}, {"A": (*axes[:n_in], "lora_rank"), "B": ("lora_rank", *axes[n_in:])}


def lora_merge(w: jax.Array, ab: dict, scale: float) -> jax.Array:
    """W + scale·A@B, contracting the rank axis: W[*in, *out] -> same shape and dtype."""
    delta = jnp.tensordot(ab["A"], ab["B"], axes=1)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class LMLoRA:
    """LoRA on the attention and MLP kernels of blocks `layers` (Chen et al. 2025); loss = KL only."""

    layers: tuple[int, ...]
    hook_layer: int
    rank: int
    alpha: float
    kl_only: bool = True  # the SAE is frozen and the MSE target moves with the LM: the KL is what counts
    kind = "lm_lora"
    sae_trains = False

    def _targets(self, lm_params, lm_axes):
        """(path, shape, logical axes, n_in) of every kernel to adapt."""
        flat = traverse_util.flatten_dict(lm_params)
        flat_axes = traverse_util.flatten_dict(lm_axes)
        wanted = {f"layers_{i}" for i in self.layers}
        out = []
        for path, w in sorted(flat.items()):
            if path[0] in wanted and w.ndim >= 2 and path[-1].endswith("kernel"):
                axes = tuple(flat_axes[path])
                # "embed" first: D -> (heads, head_dim) or mlp; otherwise everything but the last axis is input
                n_in = 1 if axes[0] == "embed" else w.ndim - 1
                out.append((path, w.shape, axes, n_in))
        return out

    def init(self, key, sae_params, lm_params, lm_axes) -> tuple[dict, dict]:
        """(trainable params, their logical axes), nested like the LM's params."""
        params, axes = {}, {}
        targets = self._targets(lm_params, lm_axes)
        for k, (path, shape, ax, n_in) in zip(jax.random.split(key, len(targets)), targets):
            params[path], axes[path] = lora_factors(k, shape, ax, n_in, self.rank)
        return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(axes)

    def __call__(self, trainable, sae_params, lm_params, rng=None) -> Composition:
        flat = traverse_util.flatten_dict(lm_params)
        factors = traverse_util.flatten_dict(trainable)
        scale = self.alpha / self.rank
        for path in {p[:-1] for p in factors}:
            flat[path] = lora_merge(flat[path], {"A": factors[path + ("A",)], "B": factors[path + ("B",)]}, scale)
        return Composition(sae_params, traverse_util.unflatten_dict(flat), None,
                           min(self.layers) <= self.hook_layer)


@dataclasses.dataclass(frozen=True)
class SAELoRA:
    """LoRA on the SAE's encoder W_enc[D, S] and decoder W_dec[S, D]; loss = the fine-tune's KL+MSE.

    dropout: PEFT's lora_dropout (the reference's 0.1): in a training step each LoRA branch sees its input
    with entries dropped at this rate (and scaled by 1/(1 - rate)), per token, so the factors cannot be
    merged into the weights there; evaluation (no rng) merges them."""

    rank: int
    alpha: float
    kl_only: bool = False
    dropout: float = 0.0
    kind = "sae_lora"
    sae_trains = True  # the effective SAE changes: its sparsity / AuxK terms stay in the loss

    def init(self, key, sae_params, lm_params=None, lm_axes=None) -> tuple[dict, dict]:
        k1, k2 = jax.random.split(key)
        enc, enc_ax = lora_factors(k1, sae_params["W_enc"].shape, ("d_model", "d_sae"), 1, self.rank)
        dec, dec_ax = lora_factors(k2, sae_params["W_dec"].shape, ("d_sae", "d_model"), 1, self.rank)
        return {"W_enc": enc, "W_dec": dec}, {"W_enc": enc_ax, "W_dec": dec_ax}

    def __call__(self, trainable, sae_params, lm_params, rng=None) -> Composition:
        scale = self.alpha / self.rank
        if self.dropout > 0.0 and rng is not None:
            return Composition(sae_params, lm_params, None, False,
                               {"factors": trainable, "scale": scale, "dropout": self.dropout, "rng": rng})
        merged = {**sae_params, **{k: lora_merge(sae_params[k], trainable[k], scale) for k in trainable}}
        return Composition(merged, lm_params, None, False)


@dataclasses.dataclass(frozen=True)
class OutputAdapter:
    """x̂' = x̂ + U·D·x̂ (or U·relu(D·x̂)) on the SAE's normalised output; loss = KL+MSE on x̂'."""

    d_model: int
    rank: int
    mlp: bool = False
    kl_only: bool = False
    sae_trains = False

    @property
    def kind(self) -> str:
        return "output_mlp" if self.mlp else "output"

    def init(self, key, sae_params=None, lm_params=None, lm_axes=None) -> tuple[dict, dict]:
        down = jax.random.normal(key, (self.d_model, self.rank), jnp.float32) / math.sqrt(self.d_model)
        up = jnp.zeros((self.rank, self.d_model), jnp.float32)
        return {"D": down, "U": up}, {"D": ("d_model", "lora_rank"), "U": ("lora_rank", "d_model")}

    def apply(self, trainable, x_hat: jax.Array) -> jax.Array:
        """x_hat: f32[..., D] -> f32[..., D]."""
        h = jnp.einsum("...D,Dr->...r", x_hat, trainable["D"])
        if self.mlp:
            h = jax.nn.relu(h)
        return x_hat + jnp.einsum("...r,rD->...D", h, trainable["U"])

    def __call__(self, trainable, sae_params, lm_params, rng=None) -> Composition:
        return Composition(sae_params, lm_params, lambda x_hat: self.apply(trainable, x_hat), False)


def make_adapter(kind: str, rank: int | None, d_model: int, hook_layer: int, n_layers: int,
                 lm_layers: str = "all", loss: str = "auto", alpha: float | None = None, dropout: float = 0.0):
    """The compose object for the `adapter:` config section. rank 0 / None = full rank (d_model).
    alpha: the LoRA scale's numerator; None = 32 for sae_lora (the reference's PEFT setting), rank for lm_lora.
    dropout: sae_lora only (PEFT's lora_dropout)."""
    assert kind in KINDS and lm_layers in LM_LAYERS and loss in LOSSES, (kind, lm_layers, loss)
    r = rank or d_model
    kl_only = kind == "lm_lora" if loss == "auto" else loss == "kl"
    if kind == "lm_lora":
        layers = tuple(range(n_layers)) if lm_layers == "all" else tuple(range(hook_layer + 1, n_layers))
        assert layers, "lm_layers='after' with the hook at the last block adapts nothing"
        return LMLoRA(layers, hook_layer, r, float(r if alpha is None else alpha), kl_only)
    if kind == "sae_lora":
        return SAELoRA(r, float(32.0 if alpha is None else alpha), kl_only, float(dropout))
    return OutputAdapter(d_model, r, kind == "output_mlp", kl_only)
