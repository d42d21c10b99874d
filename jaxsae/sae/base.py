"""Shared pieces of every SAE kind: parameters, encoder/decoder, output type.

Shape notation: N = number of tokens after flattening leading dims,
D = d_model, S = d_sae. Every kind computes

    pre   = (x - b_dec) @ W_enc + b_enc          f32[N, S]
    f     = activation(pre)                      f32[N, S]   (kind-specific)
    x_hat = f @ W_dec + b_dec                    f32[N, D]

Subtracting b_dec before encoding (Gao et al.) lets b_dec, initialised at the
geometric median of the data, centre the inputs for every kind; for ReLU and
JumpReLU it is only a reparametrisation of b_enc.

Parameter logical axes ('d_model', 'd_sae') are attached with
`nn.with_logical_partitioning`; sharding maps 'd_sae' to a mesh axis later.
"""

from __future__ import annotations

import functools
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsae.sae.config import SAEConfig, resolve_decode
from jaxsae.sae.selection import top_k
from jaxsae.sae.sparse_grad import with_dense_grad
from jaxsae.sharding import context_spec


class SAEOutput(NamedTuple):
    """Auxiliary outputs of `SAE.__call__`.

    Loss terms are already multiplied by their coefficients, so a trainer's
    loss is `reconstruction_loss(x, x_hat) + out.aux_loss`.

    Attributes:
      f: f32[..., d_sae] latent activations (same leading dims as x).
      pre: f32[..., d_sae] pre-activations (x - b_dec) @ W_enc + b_enc (values only, without a
        gradient, on the sparse path: there the encoder's gradient flows through the k selected entries).
      l0: f32[] mean number of active latents per token (metric, no grad).
      fired: bool[d_sae] latents active on at least one token of the batch;
        feed to `update_dead_counter`.
      penalties: {name: f32[]} the kind's scaled loss terms beside the
        reconstruction; the names are fixed per kind (trainers log them as
        `train/<name>`):
          l1          relu: l1_coeff * mean_tokens sum_i f_i ||W_dec,i||
          l0_loss     jumprelu: l0_coeff * L0, or l0_coeff * (L0 / l0_target - 1)^2 with
                      sae.l0_target; L0 = mean_tokens sum_i H(pre_i - theta_i), STE gradients
          auxk        topk, batchtopk kinds: auxk_coeff * AuxK (0 without dead latents)
          matryoshka  matryoshka_batchtopk: the inner prefixes' reconstruction losses
    """

    f: jax.Array
    pre: jax.Array
    l0: jax.Array
    fired: jax.Array
    penalties: dict[str, jax.Array]

    @property
    def aux_loss(self) -> jax.Array:
        """f32[]: sum of all sparsity / auxiliary loss terms."""
        return sum(self.penalties.values(), jnp.zeros((), jnp.float32))


def reconstruction_loss(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """f32[]: mean over tokens of ||x - x_hat||^2 (summed over d_model).

    Summing over d_model (not averaging) keeps l1/l0 coefficients on the
    scale used by the Anthropic April update and Gemma Scope.
    """
    err = (x.astype(jnp.float32) - x_hat.astype(jnp.float32)) ** 2
    return jnp.mean(jnp.sum(err, axis=-1))


def linear_warmup(step, steps: int) -> jax.Array:
    """f32[]: min(step / steps, 1), the share of a sparsity coefficient in force at optimizer step `step`
    (0 first; may be traced); 1 throughout when steps <= 0."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)


def unit_rows(key: jax.Array, shape, dtype=jnp.float32, norm: float = 1.0) -> jax.Array:
    """Random directions with rows of L2 norm `norm`: f32[shape]."""
    w = jax.random.normal(key, shape, jnp.float32)
    w = norm * w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return w.astype(dtype)


def keep_first(vals: jax.Array, k) -> jax.Array:
    """vals [..., K] (sorted descending, as lax.top_k returns them) with entries past the first k zeroed:
    the top-k of a top-K, for a traced k <= K. k=None keeps all."""
    if k is None:
        return vals
    return jnp.where(jnp.arange(vals.shape[-1]) < k, vals, jnp.zeros((), vals.dtype))


def scatter_rows(shape, idx: jax.Array, vals: jax.Array) -> jax.Array:
    """Dense f32[N, S] with vals[n, j] written at column idx[n, j] of row n.

    Scatter (rather than a `pre >= kth_value` mask) keeps exactly k entries
    even when activations tie, which bf16 makes likely.
    """
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, vals.dtype).at[rows, idx].set(vals)


def auxk_loss(
    pre: jax.Array, dead: jax.Array, residual: jax.Array, W_dec: jax.Array, k_aux: int, enc=None
) -> jax.Array:
    """AuxK loss of Gao et al. (2024), unscaled: f32[].

    The top-k_aux *dead* latents (by pre-activation) try to reconstruct the
    main model's residual; this gives dead latents a gradient that pulls them
    towards what the live ones miss.

    Args:
      pre: f32[N, S] pre-activations.
      dead: bool[S] dead-latent mask.
      residual: f32[N, D] e = x - x_hat, already stop-gradient'ed.
      W_dec: f32[S, D].
      k_aux: static number of latents used per token.
      enc: None, or (x, b_dec, W_enc, b_enc, dtype) when `pre` carries no gradient (the sparse path,
        `SAEBase.activate_sparse`): the dead latents' gradient is then re-attached here, inside the
        branch, so its dense backward runs only on steps with a dead latent.
    Returns:
      sum ||e - e_hat||^2 / sum ||e||^2, or exactly 0 when nothing is dead.
    """
    def compute(_):
        # k_aux is large (d_model / 2): a dense backward beats gathering k_aux encoder columns per token
        p = pre if enc is None else with_dense_grad(pre, *enc)
        # Live latents get the most negative float so top_k never prefers them;
        # if fewer than k_aux latents are dead the extra picks relu to 0.
        masked = jnp.where(dead[None, :], p, jnp.finfo(p.dtype).min)
        vals, idx = top_k(masked, k_aux)  # two-stage when d_sae is split over the mesh
        f_aux = scatter_rows(p.shape, idx, jax.nn.relu(vals))
        e_hat = f_aux @ W_dec.astype(f_aux.dtype)
        num = jnp.sum((residual - e_hat) ** 2)
        den = jnp.maximum(jnp.sum(residual**2), jnp.finfo(jnp.float32).tiny)
        return (num / den).astype(jnp.float32)

    # Most steps have no dead latent: skip the second top-k and the extra decoder matmul entirely.
    return jax.lax.cond(jnp.any(dead), compute, lambda _: jnp.zeros((), jnp.float32), None)


def decode_mode(cfg: SAEConfig, n_tokens: int, training: bool = True) -> str:
    """'dense' | 'sparse': the decode a forward over n_tokens uses, cfg.decode with auto resolved by
    `resolve_decode` from the kind, the backend, whether the mesh of the step being traced (if any)
    splits d_sae, `training` and d_sae / k (cfg.k: a sweep's largest, which its members select at)."""
    from jaxsae.sae.kinds import kind_of  # local: the kinds import this module

    spec = context_spec(("batch", "d_sae"), (n_tokens, cfg.d_sae))
    return resolve_decode(cfg.decode, kind_of(cfg).fixed_k, jax.default_backend(),
                          spec is not None and spec[1] is not None, training, cfg.d_sae / max(cfg.k, 1))


def lora_delta(lora: dict, name: str, inp: jax.Array) -> jax.Array:
    """scale · dropout(inp) @ A @ B for the LoRA pair on weight `name` (PEFT's lora_dropout: each entry of
    the branch's input kept with probability 1 - rate and scaled by 1/(1 - rate), a fresh mask per token).

    lora: {"factors": {name: {"A" [in, r], "B" [r, out]}}, "scale": float, "dropout": float, "rng": key};
    inp: f32[N, in] -> f32[N, out]."""
    ab, rate = lora["factors"][name], lora["dropout"]
    key = jax.random.fold_in(lora["rng"], 0 if name == "W_enc" else 1)
    keep = jax.random.bernoulli(key, 1.0 - rate, inp.shape)
    dropped = jnp.where(keep, inp / (1.0 - rate), 0.0)
    return lora["scale"] * ((dropped @ ab["A"]) @ ab["B"])


def update_dead_counter(tokens_since_fired: jax.Array, fired: jax.Array, n_tokens) -> jax.Array:
    """i32[d_sae]: reset latents that fired, add n_tokens to the others.

    Saturates instead of overflowing int32 on long runs.
    """
    cap = jnp.iinfo(jnp.int32).max
    c = tokens_since_fired.astype(jnp.int32)
    n = jnp.asarray(n_tokens, jnp.int32)
    grown = jnp.where(c >= cap - n, cap, c + n)  # compare first: c + n may wrap
    return jnp.where(fired, 0, grown)


def dead_mask(tokens_since_fired: jax.Array, cfg: SAEConfig) -> jax.Array:
    """bool[d_sae]: latents silent for >= cfg.dead_tokens_threshold tokens."""
    return tokens_since_fired >= cfg.dead_tokens_threshold


class SAEBase(nn.Module):
    """Parameters, encoder and decoder shared by every kind.

    Subclasses implement `activate(pre, train)` and may override
    `activate_sparse`, `loss_terms(...)` and `setup()` (calling `super().setup()` first).

    Params: W_enc f32[d_model, d_sae], b_enc f32[d_sae],
            W_dec f32[d_sae, d_model], b_dec f32[d_model].
    """

    cfg: SAEConfig
    # Norm of the initial decoder rows (1 whenever cfg.unit_norm_decoder); W_enc starts as W_dec.T.
    decoder_init_norm: ClassVar[float] = 1.0

    def setup(self):
        cfg = self.cfg
        S, D = cfg.d_sae, cfg.d_model
        part = nn.with_logical_partitioning
        # a unit-norm decoder starts at unit norm (the optimizer would renormalise it after one step anyway)
        norm = 1.0 if cfg.unit_norm_decoder else self.decoder_init_norm
        init_dec = functools.partial(unit_rows, norm=norm)
        W_dec = self.param("W_dec", part(init_dec, ("d_sae", "d_model")), (S, D))
        # Encoder starts as the decoder transpose (Gao et al.): each latent
        # initially reads the direction it writes, which cuts dead latents.
        self.W_enc = self.param(
            "W_enc", part(lambda _key, _shape: W_dec.T, ("d_model", "d_sae")), (D, S)
        )
        self.W_dec = W_dec
        self.b_enc = self.param("b_enc", part(nn.initializers.zeros_init(), ("d_sae",)), (S,))
        self.b_dec = self.param("b_dec", part(nn.initializers.zeros_init(), ("d_model",)), (D,))

    # -- kind-specific hooks -------------------------------------------------
    def activate(self, pre: jax.Array, train: bool) -> jax.Array:
        """f32[N, S] -> f32[N, S] latent activations."""
        raise NotImplementedError

    def activate_sparse(self, pre: jax.Array, train: bool, k=None, enc=None):
        """(f f32[N, S], (idx i32[N, k], vals f32[N, k]) or None): the activations and, for kinds with
        a fixed k per token, the active latents, which the sparse decode reads.
        k: a (traced) k <= cfg.k for the fixed-k kinds (a sweep's member); None: cfg.k.
        enc: None, or (x f32[N, D], b_dec, W_enc, b_enc, compute dtype) when `pre` is a value without
        gradient (the sparse path): the kind then reads its selected entries with
        `gathered_pre(pre, *enc[:4], idx, enc[4])`. Only kinds that return active rows are given it."""
        return self.activate(pre, train), None

    def loss_terms(self, x, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc=None) -> dict[str, jax.Array]:
        """The kind's scaled loss terms {name: f32[]} (`SAEOutput.penalties`); default none.

        x: f32[N, D], pre/f: f32[N, S], x_hat: f32[N, D], dead: bool[S]|None; l1_coeff / l0_coeff: f32[]
        overrides of cfg's coefficients (a warm-up, a sweep member's) or None; enc: as `activate_sparse`'s
        (a term that needs d/dpre uses `with_dense_grad(pre, *enc)`).
        """
        return {}

    # -- shared interface ----------------------------------------------------
    def pre_acts(self, x: jax.Array, lora=None) -> jax.Array:
        """f32[N, D] -> f32[N, S]; matmul in cfg.dtype, accumulate in f32. lora: see `lora_delta`."""
        dt = self.cfg.compute_dtype
        xc = (x.astype(jnp.float32) - self.b_dec).astype(dt)
        pre = jnp.dot(xc, self.W_enc.astype(dt), preferred_element_type=jnp.float32)
        if lora is not None:
            pre = pre + lora_delta(lora, "W_enc", xc.astype(jnp.float32))
        return pre + self.b_enc

    def _flat(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"input last dim {x.shape[-1]} != sae.d_model={self.cfg.d_model}: "
                "pass activations shaped [..., d_model]"
            )
        return x.reshape(-1, self.cfg.d_model)

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: f32[..., d_model] -> f: f32[..., d_sae].

        train=False is inference mode (matters for the batchtopk kinds, which then
        uses its calibrated threshold instead of a batch-wide top-k).
        """
        f = self.activate(self.pre_acts(self._flat(x)), train)
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: jax.Array, lora=None) -> jax.Array:
        """f: f32[..., d_sae] -> x_hat: f32[..., d_model]. lora: see `lora_delta`."""
        dt = self.cfg.compute_dtype
        out = jnp.dot(f.astype(dt), self.W_dec.astype(dt), preferred_element_type=jnp.float32)
        if lora is not None:
            out = out + lora_delta(lora, "W_dec", f.astype(jnp.float32))
        return out + self.b_dec

    def decode_rows(self, idx: jax.Array, vals: jax.Array) -> jax.Array:
        """idx: i32[N, k], vals: f32[N, k] -> x_hat f32[N, D] = sum_j vals_j W_dec[idx_j] + b_dec.

        Equal to `decode` of the dense codes; its backward is a scatter-add into k rows of W_dec per
        token instead of a dense [S, N] @ [N, D] matmul."""
        dt = self.cfg.compute_dtype
        rows = self.W_dec.astype(dt)[idx]  # [N, k, D]
        out = jnp.einsum("nk,nkd->nd", vals.astype(dt), rows, preferred_element_type=jnp.float32)
        return out + self.b_dec

    def __call__(self, x: jax.Array, dead: jax.Array | None = None, train: bool = True,
                 l1_coeff=None, k=None, lora=None, l0_coeff=None):
        """Full forward pass for training.

        Args:
          x: f32[..., d_model] activations.
          dead: optional bool[d_sae] dead-latent mask for AuxK (None: none dead).
          train: training mode (batchtopk kinds: batch-wide top-k).
          l1_coeff: optional (traced) override of cfg.l1_coeff, e.g. from
            `l1_coeff_at(step, cfg)`; only relu uses it.
          k: optional (traced) i32[] <= cfg.k: the topk kinds keep only their top k (a sweep's
            members share one program built at the largest k; `jaxsae.sweep`).
          lora: unmerged LoRA factors with dropout on their inputs (`lora_delta`; SAE-LoRA's training step).
          l0_coeff: optional (traced) override of cfg.l0_coeff, e.g. from `l0_coeff_at(step, cfg)`;
            only jumprelu uses it.
        Returns:
          x_hat: f32[..., d_model], SAEOutput.
        """
        lead = x.shape[:-1]
        x2 = self._flat(x).astype(jnp.float32)
        pre = self.pre_acts(x2, lora)
        enc = None
        if lora is None and decode_mode(self.cfg, x2.shape[0], train) == "sparse":
            # Only each token's k selected pre-activations reach the loss: select on the values, then
            # let `gathered_pre` give the encoder a gradient at those k latents only (the kinds' k path
            # reads it through `enc`); AuxK re-attaches a dense gradient in its own branch.
            enc = (x2, self.b_dec, self.W_enc, self.b_enc, self.cfg.compute_dtype)
            pre = jax.lax.stop_gradient(pre)
        f, active_rows = self.activate_sparse(pre, train, k, enc)
        x_hat = self.decode_rows(*active_rows) if enc is not None else self.decode(f, lora)
        penalties = self.loss_terms(x2, pre, f, x_hat, dead, l1_coeff, l0_coeff, enc)
        if active_rows is not None:
            # from the k active entries: the dense codes then need not exist in a training step
            idx, vals = active_rows
            on = vals > 0
            l0 = jnp.mean(jnp.sum(on, axis=-1, dtype=jnp.float32))
            fired = jnp.zeros((self.cfg.d_sae,), bool).at[idx.reshape(-1)].max(on.reshape(-1))
        else:
            active = f > 0
            l0 = jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.float32))
            fired = jnp.any(active, axis=0)
        out = SAEOutput(
            f=f.reshape(*lead, -1),
            pre=pre.reshape(*lead, -1),
            l0=jax.lax.stop_gradient(l0),
            fired=fired,
            penalties=penalties,
        )
        return x_hat.reshape(*lead, self.cfg.d_model), out
