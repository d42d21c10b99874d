"""Parameter initialisation: `init_sae` and the geometric median for b_dec."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsae.sae.config import SAEConfig


@functools.partial(jax.jit, static_argnames=("n_iter",))
def geometric_median(x: jax.Array, n_iter: int = 30, eps: float = 1e-6) -> jax.Array:
    """Geometric median of the rows of x: f32[n, d] -> f32[d].

    Weiszfeld iterations from the mean: m <- sum_i w_i x_i / sum_i w_i with
    w_i = 1 / max(||x_i - m||, eps). The median is robust to the outlier
    tokens (e.g. BOS / attention-sink activations with huge norms) that drag
    the mean, which is why it is the b_dec initialiser of Gao et al.
    """
    x = x.astype(jnp.float32)

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)
        return (w @ x) / jnp.sum(w)

    return jax.lax.fori_loop(0, n_iter, body, jnp.mean(x, axis=0))


def _variables(cfg: SAEConfig, rng: jax.Array):
    from jaxsae.sae import make_sae  # local: avoid an import cycle

    model = make_sae(cfg)
    return model.init(rng, jnp.zeros((1, cfg.d_model), jnp.float32))


def init_sae(cfg: SAEConfig, rng: jax.Array, sample: jax.Array | None = None) -> dict:
    """Fresh SAE params as a plain (unboxed) dict of arrays.

    Args:
      cfg: validated config.
      rng: PRNG key.
      sample: optional f32[n, d_model] activations; b_dec starts at their
        geometric median (else zero).
    Returns:
      {'W_enc': f32[d_model, d_sae], 'b_enc': f32[d_sae],
       'W_dec': f32[d_sae, d_model], 'b_dec': f32[d_model],
       + 'threshold': f32[] (batchtopk kinds) | 'log_threshold': f32[d_sae] (jumprelu)}.
      Apply with `make_sae(cfg).apply({'params': params}, x, ...)`.
    """
    variables = jax.jit(functools.partial(_variables, cfg))(rng)
    params = dict(nn.meta.unbox(variables)["params"])
    if sample is not None:
        sample = jnp.asarray(sample).reshape(-1, cfg.d_model)
        params["b_dec"] = geometric_median(sample).astype(params["b_dec"].dtype)
    return params


def sae_param_axes(cfg: SAEConfig) -> dict:
    """Logical axes of each param, same structure as `init_sae`'s output.

    Leaves are `PartitionSpec`s of logical names, e.g. W_enc ->
    P('d_model', 'd_sae'), threshold -> P(); map them to a mesh with
    `nn.logical_to_mesh_sharding(axes, mesh, rules)`.
    """
    abstract = jax.eval_shape(functools.partial(_variables, cfg), jax.random.key(0))
    return dict(nn.get_partition_spec(abstract)["params"])
