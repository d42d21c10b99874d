"""Two-stage top-k over a sharded d_sae (`jaxsae.sae.selection`): exactly `lax.top_k`, ties included;
the MSE step it runs in is the one-device step; no device gathers [batch, d_sae].

Run in their own process with 8 fake CPU devices (tests/run.sh does):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q -m multidevice
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import sharding as shd
from jaxsae.config import MSECfg
from jaxsae.sae import SAEConfig, init_sae
from jaxsae.sae.selection import keep_batch_top_k, top_k
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer

pytestmark = eight_devices()

N, S = 16, 256  # 32 latents per shard on model=8


def _in_mesh(fn, mesh_shape):
    """jit(fn) traced with the mesh in context and its input split as ('batch', 'd_sae') by the rules."""
    mesh = shd.make_mesh(*mesh_shape)
    return jax.jit(shd.traced_in_mesh(fn, mesh), in_shardings=NamedSharding(mesh, P("data", "model")))


def _tied(seed):
    """f32[N, S] with few distinct values (many ties across and within shards), signed zeros included."""
    x = np.random.default_rng(seed).integers(-3, 4, (N, S)).astype(np.float32)
    x[x == 0] = np.where(np.arange(S) % 2, 0.0, -0.0)[np.nonzero(x == 0)[1]]
    return jnp.asarray(x)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("k", [5, 40])  # 40 > the 32 latents of one shard
def test_two_stage_top_k_is_lax_top_k_with_ties(mesh_shape, k):
    x = _tied(k)
    vals, idx = _in_mesh(lambda a: top_k(a, k), mesh_shape)(x)
    want_vals, want_idx = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
    # the batch-wide selection: the same entries as one top-k over the flattened batch
    kept = _in_mesh(lambda a: keep_batch_top_k(a, k * N), mesh_shape)(x)
    v, i = jax.lax.top_k(x.reshape(-1), k * N)
    want = np.zeros(N * S, np.float32)
    want[np.asarray(i)] = np.asarray(v)
    np.testing.assert_array_equal(np.asarray(kept).reshape(-1), want)
    np.testing.assert_array_equal(np.signbit(np.asarray(kept)).reshape(-1), np.signbit(want))


# ------------------------------------------------------------------------------------- MSE step

B, D, K, STEPS = 32, 16, 4, 3


def _mse(kind, mesh_shape, compile_only=False):
    cfg = SAEConfig(kind=kind, d_model=D, d_sae=S, k=K, k_aux=8, dead_tokens_threshold=B).validate()
    tx, sched = optimizer(MSECfg(lr=3e-3, warmup_steps=0, decay_fraction=0.0), STEPS, cfg)
    xs = np.random.default_rng(0).standard_normal((STEPS, B, D)).astype(np.float32)
    state = init_state(init_sae(cfg, jax.random.PRNGKey(1), sample=xs[0]), tx, cfg, seed=0)
    state["dead"] = jnp.where(jnp.arange(S) % 2 == 0, B, 0).astype(jnp.int32)  # AuxK runs from step 0
    if mesh_shape is None:
        step, place, place_x = make_mse_step(cfg, tx, sched), jax.device_put, jax.device_put
    else:
        mesh = shd.make_mesh(*mesh_shape)
        sh, bsh = shd.sae_state_shardings(state, cfg, mesh), shd.batch_sharding(mesh)
        step = make_mse_step(cfg, tx, sched, sh, bsh)
        place, place_x = (lambda t: shd.shard(t, sh)), (lambda x: shd.shard(x, bsh))
        if compile_only:
            return step.lower(shd.abstract_with(state, sh), jax.ShapeDtypeStruct((B, D), jnp.float32,
                                                                                 sharding=bsh)).compile()
    state, metrics = place(state), []
    for x in xs:
        state, m = step(state, place_x(x))
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_mse_step_with_two_stage_top_k_is_the_one_device_step(kind):
    ref_state, ref_metrics = _mse(kind, None)
    state, metrics = _mse(kind, (1, 8))
    assert max(float(m["train/auxk"]) for m in ref_metrics) > 0  # AuxK's top-k ran
    for got, want in [(metrics, ref_metrics), (state, ref_state)]:
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
            # the same latents win; only reductions over the split d_sae round differently. Adam divides by
            # the root of a latent's squared gradients, so a rarely active latent's ~1e-8 rounding becomes up to
            # ~4e-5 in its column on some CPUs; a latent chosen wrongly moves by ~lr (3e-3) per step
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4,
                                       err_msg=jax.tree_util.keystr(path))


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)]


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_mse_step_gathers_no_batch_by_d_sae_array(kind):
    shapes = _all_gather_shapes(_mse(kind, (1, 8), compile_only=True).as_text())
    assert shapes, "the candidates' all-gathers are missing: is the two-stage top-k running?"
    assert (B, S) not in shapes, shapes
    assert all(np.prod(s) < B * S // 2 for s in shapes), shapes  # only the k x shards candidates move


def _tpu_mse(kind, two_stage=True):
    """The MSE step compiled for a v5e-8 (TPU compiler, no TPU) on mesh (1, 8); two_stage False: every
    selection as one lax.top_k over the split axis."""
    from jaxsae.aot import topology_devices
    from jaxsae.sae import selection

    b, s = 512, 8192
    cfg = SAEConfig(kind=kind, d_model=256, d_sae=s, k=32, decode="dense").validate()
    tx, sched = optimizer(MSECfg(lr=3e-3, warmup_steps=0, decay_fraction=0.0), 10, cfg)
    state = jax.eval_shape(lambda: init_state(init_sae(cfg, jax.random.PRNGKey(1)), tx, cfg, seed=0))
    mesh = shd.make_mesh(1, 8, topology_devices("v5e-8")[:8])
    sh, bsh = shd.sae_state_shardings(state, cfg, mesh), shd.batch_sharding(mesh)
    spec = selection.context_spec
    if not two_stage:
        selection.context_spec = lambda *_: None
    try:
        step = make_mse_step(cfg, tx, sched, sh, bsh)
        compiled = step.lower(shd.abstract_with(state, sh), jax.ShapeDtypeStruct((b, 256), jnp.float32,
                                                                                  sharding=bsh)).compile()
    finally:
        selection.context_spec = spec
    return compiled, (b, s)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'jax[tpu]')")
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_on_tpu_no_device_gathers_batch_by_d_sae_and_temp_memory_does_not_grow(kind):
    """With the TPU compiler a row top-k over the split axis is partitioned by XLA itself (lax.top_k); the
    batch-wide top-k is two-stage. Neither gathers [batch, d_sae], and the step's temp memory is at most
    that of lax.top_k everywhere (bench/bench_topk_memory.py measures the paper's shape)."""
    ours, (b, s) = _tpu_mse(kind)
    plain, _ = _tpu_mse(kind, two_stage=False)
    assert (b, s) not in _all_gather_shapes(ours.as_text())
    assert (b, s) in _all_gather_shapes(plain.as_text()) or kind == "topk"
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(ours) <= temp(plain)
