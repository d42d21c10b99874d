"""Top-k over the latent axis that stays local when `d_sae` is split over the mesh.

`jax.lax.top_k` over a sharded axis makes XLA all-gather the whole f32[N, d_sae] onto every device
before selecting. Inside a step traced with its mesh in context (`jaxsae.sharding.jit_step`), and when
the rules (`jaxsae.sharding.RULES`) split `d_sae` over a mesh axis of size > 1, the functions here
select in two stages instead:

    1. each shard takes the top-k of its own slice of the axis (indices made global);
    2. the k x shards candidates are gathered, and a top-k over them picks the winners.

Every element of the global top-k is in its shard's top-k (fewer than k elements of its shard beat
it), so the result is exactly `lax.top_k`'s, values, indices and order, ties included: `lax.top_k`
prefers the lower index among equal values, and the second stage sees the candidates in ascending
global index among equal values. Elsewhere (one device, no mesh in context, an axis that does not
split) they are plain `lax.top_k`.

On TPU a row's top-k stays `lax.top_k`: the TPU compiler already selects per shard and gathers only
candidates (compiled for v5e-8 at d_model 2304, d_sae 131072, k 80, 4,096 rows on mesh (1, 8), the
MSE step's temp memory is 5.27 GiB with `lax.top_k` and 10.43 GiB with the shard_map version;
`bench/bench_topk_memory.py`), while the CPU compiler gathers [rows, d_sae] onto every device. The
batch-wide top-k (BatchTopK) is two-stage everywhere: there the TPU compiler gathers the whole
[rows, d_sae] too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsae.sharding import context_spec


def _axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _offset(axes: tuple[str, ...], size: int) -> jax.Array:
    """i32[]: where this shard's block of `size` starts along an axis split over `axes` (0 if none)."""
    if not axes:
        return jnp.zeros((), jnp.int32)
    return (jax.lax.axis_index(axes) * size).astype(jnp.int32)


def _gather(x: jax.Array, axes: tuple[str, ...], axis: int) -> jax.Array:
    """The shards' blocks of `x` concatenated along `axis` in shard order, the same on every shard."""
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True, to="invarying")


def _row_top_k(x: jax.Array, k: int, col_axes: tuple[str, ...]):
    """shard_map body: x f32[n, s] (this shard's rows and latents) -> vals f32[n, k], global idx i32[n, k]."""
    vals, idx = jax.lax.top_k(x, min(k, x.shape[1]))
    idx = idx + _offset(col_axes, x.shape[1])
    # Shard order is global index order, and each shard lists its ties in index order: among equal
    # values the second top-k meets the lower global index first, as one top-k over the row would.
    vals, idx = _gather(vals, col_axes, 1), _gather(idx, col_axes, 1)
    vals, pick = jax.lax.top_k(vals, k)
    return vals, jnp.take_along_axis(idx, pick, axis=1)


def _compiler_splits_row_top_k() -> bool:
    """Whether the step being traced is for TPU devices, whose compiler partitions a row top-k itself."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) == "tpu"


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x: f32[N, d_sae] -> (vals f32[N, k], idx i32[N, k]), each row's k largest: `lax.top_k(x, k)`.

    Two-stage (see the module docstring) when the step's mesh splits `d_sae`, except on TPU; the rows
    stay split as the rules split `batch`.
    """
    spec = context_spec(("batch", "d_sae"), x.shape)
    if spec is None or spec[1] is None or _compiler_splits_row_top_k():
        return jax.lax.top_k(x, k)
    body = functools.partial(_row_top_k, k=k, col_axes=_axes(spec[1]))
    return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=P(*spec),
                         out_specs=(P(spec[0], None), P(spec[0], None)))(x)


def _batch_keep(x: jax.Array, n: int, row_axes: tuple[str, ...], col_axes: tuple[str, ...], width: int):
    """shard_map body: x f32[r, s] (this shard's block of the [N, width] batch) -> the same block with
    only the batch's n largest entries kept."""
    r, s = x.shape
    r0, c0 = _offset(row_axes, r), _offset(col_axes, s)
    vals, loc = jax.lax.top_k(x.reshape(-1), min(n, r * s))
    flat = (loc // s + r0) * width + loc % s + c0  # row-major index into the whole [N, width] batch
    vals, flat = _gather(vals, row_axes + col_axes, 0), _gather(flat, row_axes + col_axes, 0)
    # Blocks interleave in the batch's row-major order: sort the candidates by global index so that
    # among equal values the top-k meets the lower index first, as one top-k over the batch would.
    flat, vals = jax.lax.sort((flat, vals), num_keys=1)
    vals, pick = jax.lax.top_k(vals, n)
    flat = flat[pick]
    # Each shard writes the winners that fall in its own block; the others' are dropped.
    rows, cols = flat // width - r0, flat % width - c0
    mine = (rows >= 0) & (rows < r) & (cols >= 0) & (cols < s)
    return jnp.zeros_like(x).at[jnp.where(mine, rows, r), cols].set(vals, mode="drop")


def keep_batch_top_k(x: jax.Array, n: int) -> jax.Array:
    """x: f32[N, d_sae] -> f32[N, d_sae] with the n largest entries of the whole batch kept, the rest 0.

    The same entries as `lax.top_k(x.reshape(-1), n)` (lower flat index first among ties). Two-stage
    when the step's mesh splits `d_sae`: a top-n per block of the batch, then over all blocks' candidates.
    """
    spec = context_spec(("batch", "d_sae"), x.shape)
    if spec is None or spec[1] is None:
        flat = x.reshape(-1)
        vals, idx = jax.lax.top_k(flat, n)
        return jnp.zeros_like(flat).at[idx].set(vals).reshape(x.shape)
    body = functools.partial(_batch_keep, n=n, row_axes=_axes(spec[0]), col_axes=_axes(spec[1]),
                             width=x.shape[1])
    return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=P(*spec),
                         out_specs=P(*spec))(x)
