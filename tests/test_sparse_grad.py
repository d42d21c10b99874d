"""The sparse TopK path (`sae.decode: sparse`, and `auto` where it resolves to it) computes the dense
path's loss and gradients: the gathered decoder and the encoder gradient at the k selected latents only
(`jaxsae.sae.sparse_grad`), with and without AuxK, under a sweep's traced k, and over a few MSE steps.
`auto` resolves as designed. Tiny shapes: a few seconds on 2 CPU cores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxsae.config import MSECfg
from jaxsae.sae import SAEConfig, init_sae, make_sae, reconstruction_loss
from jaxsae.sae.base import decode_mode
from jaxsae.sae.config import resolve_decode
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer

D, S, K, N = 16, 128, 6, 48
TOL = dict(rtol=1e-5, atol=1e-6)


def _cfg(decode, kind="topk", **kw):
    return SAEConfig(kind=kind, d_model=D, d_sae=S, k=K, k_aux=8, auxk_coeff=0.5, decode=decode, **kw).validate()


def _x(seed=0, n=N):
    return jax.random.normal(jax.random.key(seed), (n, D))


def _params(cfg):
    p = init_sae(cfg, jax.random.key(1))
    # nonzero biases, so their gradients (and b_dec's path through the encoder) are exercised
    return {**p, "b_enc": 0.1 * _x(7, S)[:, 0], "b_dec": 0.1 * _x(8, 1)[0]}


def _loss_and_grads(decode, dead, k=None):
    cfg = _cfg(decode)
    model = make_sae(cfg)
    x = _x()

    def loss(p, x):
        x_hat, out = model.apply({"params": p}, x, dead=dead, k=k)
        return reconstruction_loss(x, x_hat) + out.aux_loss, out.penalties["auxk"]

    # d/dx too: a training step never asks for it, but an attribution through the SAE may
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(_params(cfg), x)


def _close(got, want):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path), **TOL)


def test_sparse_loss_and_gradients_equal_dense():
    """No dead mask: AuxK skipped. (With one, fixed k: test_sae's test_sparse_decoder_equals_dense_*.)"""
    (v0, aux0), g0 = _loss_and_grads("dense", None)
    (v1, aux1), g1 = _loss_and_grads("sparse", None)
    _close((v1, aux1), (v0, aux0))
    assert set(g1[0]) == {"W_enc", "b_enc", "W_dec", "b_dec"} and g1[1].shape == (N, D)
    _close(g1, g0)


def test_sparse_gradients_equal_dense_with_auxk_under_a_sweeps_traced_k():
    """A sweep's members: one program at the largest k, each member keeping its first k (vmapped), with
    dead latents, so AuxK's dense gradient joins the sparse one."""
    dead = jnp.arange(S) % 4 == 0
    ks = jnp.array([2, K], jnp.int32)
    got = {d: jax.vmap(lambda k, d=d: _loss_and_grads(d, dead, k))(ks) for d in ("dense", "sparse")}
    _close(got["sparse"], got["dense"])
    (loss, auxk), _ = got["dense"]
    assert float(loss[0]) != float(loss[1]) and bool(jnp.all(auxk > 0))  # two ks; AuxK ran for both


def test_sparse_backward_has_no_dense_encoder_matmul():
    """Without dead latents the only d_sae-wide matmul of the sparse path's loss+grad is the encoder's
    forward; the dense path has three (forward, dW_enc, dx) plus the decoder's."""

    def wide_dots(decode):
        cfg = _cfg(decode)
        model = make_sae(cfg)
        x = _x()
        grad = jax.grad(lambda p: reconstruction_loss(x, model.apply({"params": p}, x)[0]))
        jaxpr = jax.make_jaxpr(grad)(_params(cfg))
        eqns = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        # matrix-matrix products with a d_sae-wide operand (b_dec's W_enc @ db_enc is a matvec)
        return sum(any(S in v.aval.shape for v in e.invars) and all(v.aval.ndim >= 2 for v in e.invars)
                   for e in eqns)

    assert wide_dots("sparse") == 1
    assert wide_dots("dense") >= 4


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in _sub(e):
            yield from _all_eqns(sub)


def _sub(e):
    """The jaxprs nested in an equation's params (cond branches, pjit, custom_vjp calls)."""
    for p in e.params.values():
        for q in p if isinstance(p, (list, tuple)) else [p]:
            inner = getattr(q, "jaxpr", None)
            if inner is not None:
                yield getattr(inner, "jaxpr", inner)


def test_mse_steps_agree_dense_and_sparse():
    """Two steps of the MSE phase's real step (Adam, unit-norm decoder, AuxK with dead latents)."""
    runs = {}
    for decode in ("dense", "sparse"):
        cfg = _cfg(decode, dead_tokens_threshold=N)
        tx, sched = optimizer(MSECfg(lr=1e-3, warmup_steps=0, decay_fraction=0.0), 2, cfg)
        state = init_state(_params(cfg), tx, cfg, seed=0)
        state["dead"] = jnp.where(jnp.arange(S) % 2 == 0, N, 0).astype(jnp.int32)  # AuxK from step 0
        step = make_mse_step(cfg, tx, sched)
        metrics = []
        for i in range(2):
            state, m = step(state, _x(10 + i))
            metrics.append(m)
        runs[decode] = jax.device_get((state["params"], metrics))
    assert max(float(m["train/auxk"]) for m in runs["dense"][1]) > 0
    # Adam divides by sqrt(v): tiny gradient differences grow, so a looser bound than the gradients'
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(runs["sparse"])[0], jax.tree.leaves(runs["dense"])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("decode, fixed_k, platform, split, training, want", [
    ("auto", True, "cpu", False, True, "sparse"),
    ("auto", True, "gpu", False, True, "sparse"),
    ("auto", True, "tpu", False, True, "dense"),    # the MXU runs the dense matmuls at full rate
    ("auto", True, "cpu", True, True, "dense"),     # d_sae split over model: gathers would all-gather it
    ("auto", False, "cpu", False, True, "dense"),   # no fixed k: no per-token rows to gather
    ("auto", True, "cpu", False, False, "dense"),   # evaluation keeps the dense decoder
    ("dense", True, "cpu", False, True, "dense"),
    ("sparse", True, "tpu", True, False, "sparse"),  # an explicit choice stands
    ("sparse", False, "cpu", False, True, "dense"),  # e.g. LoRA on the SAE: no rows from this forward
])
def test_resolve_decode(decode, fixed_k, platform, split, training, want):
    assert resolve_decode(decode, fixed_k, platform, split, training) == want


@pytest.mark.parametrize("latents_per_active, want", [(256, "sparse"), (64, "sparse"), (42, "dense"), (16, "dense")])
def test_auto_is_sparse_only_with_enough_latents_per_active_one(latents_per_active, want):
    """d_sae / k below 64: the dense step measured faster (bench/README.md), so auto keeps it; an explicit
    sparse stands."""
    assert resolve_decode("auto", True, "cpu", False, True, latents_per_active) == want
    assert resolve_decode("sparse", True, "cpu", False, True, latents_per_active) == "sparse"


@pytest.mark.parametrize("kind, model_axis, want", [
    ("topk", None, "sparse"), ("relu", None, "dense"), ("batchtopk", None, "dense"),
    ("topk", 1, "sparse"), ("topk", 2, "dense"),
])
def test_auto_resolves_from_kind_and_mesh(kind, model_axis, want):
    """On this CPU backend: sparse for topk unless the step's mesh splits d_sae over model > 1."""
    assert SAEConfig().decode == "auto"
    cfg = dataclasses.replace(_cfg("auto", kind=kind), k=2)  # d_sae / k = 64: enough latents per active one
    assert decode_mode(_cfg("auto", kind=kind), N) == "dense"  # d_sae / k = 21
    assert decode_mode(cfg, N, training=False) == "dense"
    if model_axis is None:
        assert decode_mode(cfg, N) == want
        return
    with jax.sharding.use_abstract_mesh(AbstractMesh((2, model_axis), ("data", "model"))):
        assert decode_mode(cfg, N) == want
