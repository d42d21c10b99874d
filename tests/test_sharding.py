"""Sharding: the same steps give the same numbers on every mesh, d_sae really is split, errors name the fix.

Run in their own process with 8 fake CPU devices (tests/run.sh does):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q -m multidevice
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices
from jax.sharding import PartitionSpec as P

from jaxsae import sharding as shd
from jaxsae.config import FinetuneCfg, MSECfg
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, dead_mask, init_sae, make_sae
from jaxsae.splice import Splice
from jaxsae.train.finetune import KLLoss, init_ft_state, make_finetune_step
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer

pytestmark = eight_devices()

D_MODEL, D_SAE, K = 32, 256, 4
BATCH, STEPS = 64, 5
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
RTOL, ATOL = 1e-5, 1e-6
MSE_LR, FT_LR = 3e-3, 1e-3


def _host(tree):
    """A numpy copy: the steps donate their state, so every run starts from fresh device buffers."""
    return jax.tree.map(lambda a: np.array(a), jax.device_get(tree))


def _sae_cfg(kind: str) -> SAEConfig:
    # A dead threshold of one batch makes latents dead within the run, so AuxK is exercised.
    return SAEConfig(kind=kind, d_model=D_MODEL, d_sae=D_SAE, k=K, k_aux=8, dead_tokens_threshold=BATCH,
                     l1_coeff=0.05 if kind == "relu" else 0.0).validate()


def _close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        # beta = MSE / KL is the quotient of two sums reduced over the mesh: its float32 rounding is both's
        rtol = 2 * RTOL if "train/beta" in jax.tree_util.keystr(path) else RTOL
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=ATOL,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _close_trained(got, want, what, lr):
    """Trained params / moments: float32-close everywhere but a handful of elements.

    Sharding changes the order of the reductions over batch and d_sae, i.e. the last bits. Adam
    divides by sqrt(v) + 1e-8, so a gradient that is itself rounding noise (|g| ~ 1e-10, e.g. an AuxK
    term that cancels) becomes an update of up to ~lr/100 whose sign is noise: the same happens
    between two single-device runs with a different reduction order. So: at most 0.1% of the
    elements of a leaf (and at least 1) may miss rtol 1e-5 / atol 1e-6, and those by at most lr/100.
    """
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        name = f"{what}{jax.tree_util.keystr(path)}"
        off = ~np.isclose(g, w, rtol=RTOL, atol=ATOL)
        assert off.sum() <= max(1, off.size // 1000), f"{name}: {off.sum()} of {off.size} elements differ"
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=lr / 100, err_msg=name)


def _assert_layout_kept(state, placed, mesh, exact=True):
    """The step's outputs keep d_sae on 'model'; with `exact`, every leaf keeps its input sharding
    (a stable layout: no recompile on the next step, and the donated buffers are reused)."""
    for name, dim in [("W_enc", 1), ("W_dec", 0), ("b_enc", 0)]:
        spec = tuple(state["params"][name].sharding.spec) + (None,) * 2
        assert spec[dim] == ("model" if mesh.shape["model"] > 1 else None) or \
            (mesh.shape["model"] == 1 and spec[dim] is None), (name, spec)
    if exact:
        for (path, a), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(placed)):
            assert a.sharding.is_equivalent_to(s, a.ndim), (jax.tree_util.keystr(path), a.sharding, s)


# ------------------------------------------------------------------------------------------ MSE

@functools.lru_cache(maxsize=None)
def _mse_setup(kind):
    cfg = _sae_cfg(kind)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((STEPS, BATCH, D_MODEL)).astype(np.float32)
    params = init_sae(cfg, jax.random.PRNGKey(1), sample=xs[0])
    tx, sched = optimizer(MSECfg(lr=MSE_LR, warmup_steps=0, decay_fraction=0.0), STEPS, cfg)
    state = init_state(params, tx, cfg, seed=0)
    # Half the latents start dead so AuxK's masked top-k runs from step 0.
    state["dead"] = jnp.where(jnp.arange(D_SAE) % 2 == 0, BATCH, 0).astype(jnp.int32)
    step = make_mse_step(cfg, tx, sched)
    return cfg, _host(state), xs, step


def _run_mse(kind, mesh_shape):
    cfg, state0, xs, step = _mse_setup(kind)
    placed = None
    if mesh_shape is None:
        state, place_x = jax.device_put(state0), jax.device_put
    else:
        mesh = shd.make_mesh(*mesh_shape)
        placed = shd.sae_state_shardings(state0, cfg, mesh)
        state = shd.shard(state0, placed)
        place_x = functools.partial(shd.shard, shardings=shd.batch_sharding(mesh))
    metrics = []
    for x in xs:
        state, m = step(state, place_x(x))
        metrics.append(m)
    return state, _host(metrics), placed


@functools.lru_cache(maxsize=None)
def _mse_reference(kind):
    state, metrics, _ = _run_mse(kind, None)
    return _host(state), metrics


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_mse_step_same_on_every_mesh(kind, mesh_shape):
    ref_state, ref_metrics = _mse_reference(kind)
    state, metrics, placed = _run_mse(kind, mesh_shape)
    _close(metrics, ref_metrics, "metrics")
    got = _host(state)
    _close_trained(got["params"], ref_state["params"], "params", MSE_LR)
    _close_trained(got["opt_state"], ref_state["opt_state"], "opt_state", MSE_LR)
    np.testing.assert_array_equal(got["dead"], ref_state["dead"])
    assert int(got["step"]) == STEPS
    _assert_layout_kept(state, placed, shd.make_mesh(*mesh_shape))
    if kind == "topk":
        assert all(float(m["train/l0"]) == K for m in metrics)
        assert max(float(m["train/auxk"]) for m in metrics) > 0  # AuxK ran on dead latents


# ----------------------------------------------------------------------------- TopK and AuxK

@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_topk_and_auxk_are_global_with_d_sae_sharded(mesh_shape):
    cfg, state0, xs, _ = _mse_setup("topk")
    module = make_sae(cfg)
    dead = dead_mask(jnp.asarray(state0["dead"]), cfg)

    def fwd(params, x):
        def loss(p):
            x_hat, out = module.apply({"params": p}, x, dead=dead, train=True)
            return out.penalties["auxk"], out
        (auxk, out), g = jax.value_and_grad(loss, has_aux=True)(params)
        return out.f, auxk, g

    fwd = jax.jit(fwd)
    f_ref, aux_ref, g_ref = _host(fwd(jax.device_put(state0["params"]), jnp.asarray(xs[0])))
    mesh = shd.make_mesh(*mesh_shape)
    params = shd.shard(state0["params"], shd.sae_state_shardings(state0, cfg, mesh)["params"])
    f, aux, g = _host(fwd(params, shd.shard(xs[0], shd.batch_sharding(mesh))))
    np.testing.assert_array_equal((f > 0).sum(-1), K)  # exactly k per token: a global top-k
    np.testing.assert_array_equal(f > 0, f_ref > 0)  # the same latents
    np.testing.assert_allclose(f, f_ref, rtol=RTOL, atol=ATOL)
    assert aux_ref > 0
    np.testing.assert_allclose(aux, aux_ref, rtol=RTOL)
    _close(g, g_ref, "auxk grad")


# ----------------------------------------------------------------------------------- fine-tune

LAYER, FT_BATCH, FT_SEQ, FT_STEPS = 1, 8, 8, 3


@functools.lru_cache(maxsize=None)
def _ft_setup(kind="topk"):
    lm_cfg = GPTNeoXConfig(vocab_size=97, d_model=D_MODEL, n_layers=3, n_heads=4, d_mlp=64)
    lm = LM(lm_cfg, init_params(lm_cfg, jax.random.PRNGKey(0)))
    extra = dict(k=K, k_aux=8) if kind == "topk" else dict(l1_coeff=1.0, l1_warmup_steps=0)
    cfg = SAEConfig(kind=kind, d_model=D_MODEL, d_sae=128, dead_tokens_threshold=FT_BATCH * FT_SEQ,
                    **extra).validate()
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 97, (FT_STEPS, FT_BATCH, FT_SEQ)).astype(np.int32)
    params = init_sae(cfg, jax.random.PRNGKey(2))
    tx, sched = optimizer(FinetuneCfg(lr=FT_LR), FT_STEPS, cfg)
    dead = np.where(np.arange(cfg.d_sae) % 3 == 0, FT_BATCH * FT_SEQ, 0)
    state = init_ft_state(params, tx, cfg, dead, l1_coeff=cfg.l1_coeff, l0_target=K, seed=0)
    step = functools.partial(make_finetune_step, Splice(lm, LAYER, 1.0), cfg, tx, sched,
                             KLLoss(l1_controller=kind == "relu"))
    return lm, cfg, _host(state), _host(lm.params), tokens, step


def _run_ft(mesh_shape, lm_mode="replicated", kind="topk"):
    lm, cfg, state0, lm_params0, tokens, make_step = _ft_setup(kind)
    placed = None
    if mesh_shape is None:
        state, lm_params, place = jax.device_put(state0), jax.device_put(lm_params0), jax.device_put
        step = make_step()
    else:
        mesh = shd.make_mesh(*mesh_shape)
        placed = shd.sae_state_shardings(state0, cfg, mesh)
        state = shd.shard(state0, placed)
        lm_sh = shd.lm_param_shardings(lm, mesh, lm_mode)
        lm_params = shd.shard(lm_params0, lm_sh)
        place = functools.partial(shd.shard, shardings=shd.batch_sharding(mesh))
        # pinned in/out shardings, as the trainer builds it
        step = make_step(shardings=(placed, lm_sh, shd.batch_sharding(mesh)))
    metrics = []
    for t in tokens:
        state, m = step(state, lm_params, place(t))
        metrics.append(m)
    return state, _host(metrics), placed


@functools.lru_cache(maxsize=None)
def _ft_reference(kind="topk"):
    state, metrics, _ = _run_ft(None, kind=kind)
    return _host(state), metrics


@pytest.mark.parametrize("kind,mesh_shape,lm_mode", [
    ("topk", (8, 1), "replicated"), ("topk", (4, 2), "replicated"), ("topk", (1, 8), "replicated"),
    ("topk", (2, 4), "tensor"), ("topk", (4, 2), "fsdp"),
    ("relu", (8, 1), "replicated"), ("relu", (2, 4), "replicated"), ("relu", (4, 2), "fsdp")],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v)
def test_finetune_step_same_on_every_mesh(kind, mesh_shape, lm_mode):
    ref_state, ref_metrics = _ft_reference(kind)
    state, metrics, placed = _run_ft(mesh_shape, lm_mode, kind)
    _close(metrics, ref_metrics, "metrics")
    got = _host(state)
    _close_trained(got["params"], ref_state["params"], "params", FT_LR)
    _close_trained(got["opt_state"], ref_state["opt_state"], "opt_state", FT_LR)
    np.testing.assert_array_equal(got["dead"], ref_state["dead"])
    if kind == "topk":
        assert all(float(m["train/l0"]) == K for m in metrics)
    else:  # the L1 controller moved the coefficient identically on every mesh
        np.testing.assert_allclose(got["l1"], ref_state["l1"], rtol=1e-6)
        assert float(got["l1"]) != 1.0
    assert all(float(m["train/kl"]) > 0 for m in metrics)
    # the step's out_shardings pin the new state to the old one's layout, whatever the LM's sharding
    _assert_layout_kept(state, placed, shd.make_mesh(*mesh_shape), exact=True)


def test_lm_sharding_modes_place_the_named_dims():
    lm = _ft_setup()[0]
    mesh = shd.make_mesh(2, 4)
    tensor = shd.lm_param_shardings(lm, mesh, "tensor")
    attn, mlp = tensor["layers_0"]["attention"], tensor["layers_0"]["mlp"]
    assert attn["q_kernel"].spec == P(None, "model", None)  # heads 4 over model 4
    assert mlp["up_kernel"].spec == P(None, "model")  # mlp 64 over model 4
    assert tensor["embed_in"].spec == P(None, None)  # vocab 97 is not divisible by 4: replicated
    fsdp = shd.lm_param_shardings(lm, shd.make_mesh(4, 2), "fsdp")
    assert fsdp["embed_in"].spec == P(None, "data")  # embed 32 over data 4
    assert fsdp["layers_0"]["mlp"]["up_bias"].spec == P("data")  # no embed dim: largest dim instead
    rep = shd.lm_param_shardings(lm, mesh, "replicated")
    assert all(s.is_fully_replicated for s in jax.tree.leaves(rep))


# -------------------------------------------------------------------------------------- memory

def test_sae_state_bytes_per_device_drop_with_the_model_axis():
    cfg, state0, _, _ = _mse_setup("topk")
    train = {"params": state0["params"], "opt_state": state0["opt_state"]}
    per = {}
    for mesh_shape in [(8, 1), (2, 4), (1, 8)]:
        mesh = shd.make_mesh(*mesh_shape)
        sh = shd.sae_state_shardings(state0, cfg, mesh)
        # shardings from shapes alone (jax.eval_shape of the init) are the same: initialise sharded
        assert shd.sae_state_shardings(jax.eval_shape(lambda: state0), cfg, mesh) == sh
        placed = shd.shard(train, {"params": sh["params"], "opt_state": sh["opt_state"]})
        per[mesh_shape] = shd.per_device_bytes(placed)
        # the same number from shapes alone, before anything is allocated
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                train, {"params": sh["params"], "opt_state": sh["opt_state"]})
        assert shd.per_device_bytes(abstract) == per[mesh_shape]
    full = sum(np.asarray(a).nbytes for a in jax.tree.leaves(train))
    assert per[(8, 1)] == full  # pure data parallelism: every device holds everything
    for mesh_shape in [(2, 4), (1, 8)]:
        model = mesh_shape[1]
        ratio = per[(8, 1)] / per[mesh_shape]
        # only b_dec (d_model) and scalar counts stay replicated
        assert 0.95 * model <= ratio <= model, (mesh_shape, ratio)


# -------------------------------------------------------------------------------------- errors

def test_mesh_and_placement_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"data=3 x model=2 = 6 devices, but there are 8"):
        shd.make_mesh(3, 2)
    with pytest.raises(ValueError, match=r"model=3 does not divide the 8 devices.*1, 2, 4, 8"):
        shd.make_mesh(None, 3)
    with pytest.raises(ValueError, match=r"positive integer"):
        shd.make_mesh(0, 8)
    with pytest.raises(ValueError, match=r"lm_sharding='zero' is unknown: choose one of replicated, fsdp, tensor"):
        shd.rules_for("zero")
    with pytest.raises(ValueError, match=r"multiple of 8"):
        shd.shard(np.zeros((6, D_MODEL), np.float32), shd.batch_sharding(shd.make_mesh(8, 1)))
    with pytest.raises(ValueError, match=r"'widgets' has no sharding rule"):
        shd.logical_to_sharding({"w": P("widgets")}, shd.make_mesh(8, 1), shd.RULES)
    assert shd.make_mesh(None, 2).shape == {"data": 4, "model": 2}
