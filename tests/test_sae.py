"""Tests for jaxsae.sae: the kinds' registry, per-kind behaviour, decoder-norm helpers, init, and a
planted-dictionary recovery test. Small sizes: runs on 2 CPU cores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsae.sae import (
    KINDS,
    SAEConfig,
    dead_mask,
    geometric_median,
    heaviside_step,
    init_sae,
    jumprelu,
    kind_of,
    l1_coeff_at,
    make_sae,
    maybe_unit_norm_decoder,
    post_update,
    project_out_parallel_grad,
    reconstruction_loss,
    renormalize_decoder,
    sae_param_axes,
    unit_norm_decoder,
    update_dead_counter,
    update_threshold,
)
from jaxsae.sae.matryoshka import group_sizes

D, S = 32, 256
GROUPS = (0.125, 0.25, 0.625)  # Matryoshka groups of 32, 64 and 160 latents at S = 256


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _setup(kind, **kw):
    if kind == "matryoshka_batchtopk":
        kw = {"group_fractions": GROUPS, **kw}
    cfg = SAEConfig(kind=kind, d_model=D, d_sae=S, **kw).validate()
    return cfg, make_sae(cfg), init_sae(cfg, jax.random.key(1))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(kind="topk", d_model=32, d_sae=64, k=65), "sae.k=65 exceeds sae.d_sae=64"),
        (dict(kind="nope", d_model=32, d_sae=64), "sae.kind"),
        (dict(kind="relu", d_model=0, d_sae=64), "sae.d_model"),
        (dict(kind="relu", d_model=32, d_sae=-1), "sae.d_sae"),
        (dict(kind="topk", d_model=32, d_sae=64, k=0), "sae.k"),
        (dict(kind="topk", d_model=32, d_sae=64, k_aux=100), "sae.k_aux"),
        (dict(kind="relu", d_model=32, d_sae=64, l1_coeff=-1.0), "sae.l1_coeff"),
        (dict(kind="jumprelu", d_model=32, d_sae=64, jumprelu_bandwidth=0.0), "sae.jumprelu_bandwidth"),
        (dict(kind="relu", d_model=32, d_sae=64, dtype="int8"), "sae.dtype"),
        (dict(kind="relu", d_model=32, d_sae=64, decode="sparse"), "sae.decode=sparse needs a fixed k"),
        (dict(kind="topk", d_model=32, d_sae=64, decode="gather"), "sae.decode='gather'"),
        (dict(kind="batchtopk", d_model=32, d_sae=64, decode="sparse"), "sae.decode=sparse needs a fixed k"),
        (dict(kind="batchtopk", d_model=32, d_sae=64, k=65), "sae.k=65 exceeds"),
        (dict(kind="batchtopk", d_model=32, d_sae=64, threshold_decay=1.0), "sae.threshold_decay"),
        (dict(kind="batchtopk", d_model=32, d_sae=64, threshold_start_step=-1), "sae.threshold_start_step"),
        (dict(kind="matryoshka_batchtopk", d_model=32, d_sae=64), "needs sae.group_fractions"),
        (dict(kind="matryoshka_batchtopk", d_model=32, d_sae=64, group_fractions=(0.5, 0.4)), "sum to 1"),
        (dict(kind="matryoshka_batchtopk", d_model=32, d_sae=64, group_fractions=(0.001, 0.999)), "empty group"),
        (dict(kind="matryoshka_batchtopk", d_model=32, d_sae=64, group_fractions=(0.5, 0.5), group_weights=(1.0,)),
         "sae.group_weights"),
    ],
)
def test_config_validation_errors(kw, needle):
    with pytest.raises(ValueError) as e:
        SAEConfig(**kw).validate()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    with pytest.raises(ValueError):
        make_sae(SAEConfig(**kw))  # make_sae validates too


def test_config_defaults():
    cfg = SAEConfig(kind="topk", d_model=64, d_sae=512).validate()
    assert cfg.effective_k_aux == 32 and cfg.unit_norm_decoder
    assert SAEConfig(kind="topk", d_model=64, d_sae=8, k=4).effective_k_aux == 8
    assert not SAEConfig(kind="relu", d_model=64, d_sae=512).unit_norm_decoder
    hash(cfg)  # usable as a jit static arg
    # the run config's `sae:` section: every field has a default; d_model comes from the model later
    run = SAEConfig()
    assert (run.kind, run.d_model, run.d_sae, run.k) == ("topk", 0, 4096, 32)
    assert (run.threshold_decay, run.threshold_start_step) == (0.999, 1000)
    assert run.validate(require_d_model=False) is run
    with pytest.raises(ValueError, match="sae.d_model=0"):
        run.validate()
    # lists (from JSON or YAML) become tuples, so the config stays hashable
    m = SAEConfig(kind="matryoshka_batchtopk", d_model=8, d_sae=64, group_fractions=[0.25, 0.75]).validate()
    assert m.group_fractions == (0.25, 0.75)
    hash(m)


def test_registry():
    assert KINDS == ("topk", "batchtopk", "relu", "jumprelu", "matryoshka_batchtopk")
    flags = {k: (kind_of(k).unit_norm_decoder, kind_of(k).l1_controlled, kind_of(k).fixed_k, kind_of(k).uses_k)
             for k in KINDS}
    assert flags == {"topk": (True, False, True, True), "batchtopk": (True, False, False, True),
                     "relu": (False, True, False, False), "jumprelu": (False, False, False, False),
                     "matryoshka_batchtopk": (True, False, False, True)}
    cfg = SAEConfig(kind="relu", d_model=D, d_sae=S)
    assert kind_of(cfg) is kind_of("relu") and kind_of(cfg).module is type(make_sae(cfg))
    with pytest.raises(ValueError, match="sae.kind='gated' is unknown: choose one of topk, batchtopk"):
        kind_of("gated")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_through_one_interface(kind):
    """Forward, loss, gradient and post_update look the same for every registered kind."""
    cfg, model, params = _setup(kind, k=8, l1_coeff=0.1, l0_coeff=0.1)
    x = _x((2, 6, D))
    dead = jnp.arange(S) < 16

    def loss(p):
        x_hat, out = model.apply({"params": p}, x, dead=dead)
        return reconstruction_loss(x, x_hat) + out.aux_loss, (x_hat, out)

    (value, (x_hat, out)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert x_hat.shape == x.shape and out.f.shape == (2, 6, S) and out.pre.shape == (2, 6, S)
    assert out.fired.shape == (S,) and set(g) == set(params) and np.isfinite(float(value))
    np.testing.assert_allclose(out.aux_loss, sum(float(v) for v in out.penalties.values()), rtol=1e-6)
    new = jax.jit(post_update, static_argnums=0)(cfg, params, out, jnp.int32(5000))
    assert set(new) == set(params)
    for name in params:  # only the batchtopk kinds' threshold moves
        same = np.array_equal(np.asarray(new[name]), np.asarray(params[name]))
        assert same != (name == "threshold"), name


# ---------------------------------------------------------------- init / axes


@pytest.mark.parametrize("kind", KINDS)
def test_init_and_axes(kind):
    cfg, _, _ = _setup(kind)
    sample = _x((200, D)) + 3.0
    params = init_sae(cfg, jax.random.key(0), sample)
    axes = sae_param_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda a: isinstance(a, P))
    assert params["W_enc"].shape == (D, S) and params["W_dec"].shape == (S, D)
    assert axes["W_enc"] == P("d_model", "d_sae") and axes["W_dec"] == P("d_sae", "d_model")
    assert axes["b_enc"] == P("d_sae") and axes["b_dec"] == P("d_model")
    np.testing.assert_allclose(params["W_enc"], params["W_dec"].T)
    np.testing.assert_allclose(params["b_dec"], geometric_median(sample), rtol=1e-6)
    norms = jnp.linalg.norm(params["W_dec"], axis=1)
    np.testing.assert_allclose(norms, 0.1 if kind == "relu" else 1.0, rtol=1e-5)
    if kind == "jumprelu":
        assert axes["log_threshold"] == P("d_sae")
        np.testing.assert_allclose(jnp.exp(params["log_threshold"]), cfg.jumprelu_init_threshold, rtol=1e-5)
    if kind in ("batchtopk", "matryoshka_batchtopk"):
        assert axes["threshold"] == P() and params["threshold"].shape == ()
        assert float(params["threshold"]) == -1.0  # uncalibrated, as dictionary_learning starts
    assert float(jnp.abs(init_sae(cfg, jax.random.key(0))["b_dec"]).max()) == 0.0


def test_geometric_median_is_robust():
    # Three collinear points: the median is the middle one; the mean is not.
    x = jnp.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    np.testing.assert_allclose(geometric_median(x), [1.0, 0.0], atol=1e-2)
    # A far outlier barely moves the median.
    cluster = _x((99, 8)) * 0.1 + 1.0
    x = jnp.concatenate([cluster, jnp.full((1, 8), 1e4)])
    assert float(jnp.abs(geometric_median(x) - 1.0).max()) < 0.1
    assert float(jnp.abs(x.mean(0) - 1.0).max()) > 50


# ---------------------------------------------------------------- topk


def test_topk_shapes_and_exact_l0():
    cfg, model, params = _setup("topk", k=8)
    x = _x((2, 5, D))
    v = {"params": params}
    x_hat, out = model.apply(v, x)
    assert x_hat.shape == (2, 5, D) and out.f.shape == (2, 5, S) and out.pre.shape == (2, 5, S)
    np.testing.assert_array_equal(jnp.sum(out.f > 0, axis=-1), 8)
    assert float(out.l0) == 8.0
    assert out.fired.shape == (S,) and out.fired.dtype == jnp.bool_
    np.testing.assert_array_equal(out.fired, jnp.any(out.f.reshape(-1, S) > 0, axis=0))
    # The kept entries are the largest pre-activations.
    kth = jax.lax.top_k(out.pre, 8)[0][..., -1:]
    assert bool(jnp.all(jnp.where(out.f > 0, out.pre >= kth, True)))
    f = model.apply(v, x, method=model.encode)
    np.testing.assert_allclose(f, out.f, atol=1e-6)
    np.testing.assert_allclose(model.apply(v, f, method=model.decode), x_hat, atol=1e-5)
    assert float(out.aux_loss) == 0.0  # no dead mask -> no AuxK


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_decoder_equals_dense_with_its_gradients(dtype):
    """sae.decode=sparse (gather the k decoder rows; encoder gradient at the k selected latents) computes
    the dense path's x_hat, losses and gradients, AuxK included (more in test_sparse_grad.py)."""
    x = _x((64, D), seed=3)
    dead = jnp.arange(S) % 5 == 0
    results = {}
    for decode in ("dense", "sparse"):
        cfg, model, params = _setup("topk", k=8, auxk_coeff=0.5, decode=decode, dtype=dtype)

        def loss(p):
            x_hat, out = model.apply({"params": p}, x, dead=dead)
            return reconstruction_loss(x, x_hat) + out.aux_loss, (x_hat, out)

        (value, (x_hat, out)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[decode] = value, x_hat, out, grads
    (v0, xh0, o0, g0), (v1, xh1, o1, g1) = results["dense"], results["sparse"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(xh1, xh0, **tol)
    np.testing.assert_allclose(v1, v0, **tol)
    np.testing.assert_array_equal(o1.f, o0.f)
    assert float(o1.penalties["auxk"]) > 0 and float(o1.l0) == 8.0
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], err_msg=k, **tol)


def test_topk_bfloat16_compute():
    cfg, model, params = _setup("topk", k=8, dtype="bfloat16")
    x_hat, out = model.apply({"params": params}, _x((4, D)))
    assert x_hat.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x_hat)))
    np.testing.assert_array_equal(jnp.sum(out.f > 0, axis=-1), 8)


def test_auxk_only_with_dead_latents():
    cfg, model, params = _setup("topk", k=4, auxk_coeff=0.5)
    x = _x((16, D))
    dead = jnp.arange(S) < 64

    @jax.jit
    def auxk(p, d):
        return model.apply({"params": p}, x, dead=d)[1].penalties["auxk"]

    assert float(auxk(params, None)) == 0.0
    assert float(auxk(params, jnp.zeros(S, bool))) == 0.0
    val = auxk(params, dead)
    assert 0.0 < float(val) < 0.5 * 10
    g = jax.grad(auxk)(params, dead)["W_dec"]
    row_norm = jnp.linalg.norm(g, axis=1)
    assert float(row_norm[:64].max()) > 0.0  # dead rows learn from the residual
    assert float(row_norm[64:].max()) == 0.0  # live rows are untouched by AuxK


def test_dead_counter():
    c = jnp.zeros(4, jnp.int32)
    c = update_dead_counter(c, jnp.array([True, False, False, True]), 100)
    c = update_dead_counter(c, jnp.array([False, False, True, True]), 100)
    np.testing.assert_array_equal(c, [100, 200, 0, 0])
    cfg = SAEConfig(kind="topk", d_model=4, d_sae=4, k=1, dead_tokens_threshold=150)
    np.testing.assert_array_equal(dead_mask(c, cfg), [False, True, False, False])
    big = update_dead_counter(jnp.full(1, 2**30, jnp.int32), jnp.zeros(1, bool), 2**30)
    assert int(big[0]) > 0  # saturates instead of wrapping negative


# ---------------------------------------------------------------- batchtopk


def test_batchtopk_trains_with_a_batch_wide_budget():
    cfg, model, params = _setup("batchtopk", k=8)
    B = 16
    x = _x((B, D))
    _, out = jax.jit(lambda p: model.apply({"params": p}, x, train=True))(params)
    assert int(jnp.sum(out.f > 0)) == 8 * B  # k * B entries over the whole batch ...
    per_token = np.asarray(jnp.sum(out.f > 0, axis=-1))
    assert float(out.l0) == 8.0 and len(set(per_token.tolist())) > 1  # ... not k per token
    # they are the batch's k * B largest ReLU'd pre-activations
    kept = np.sort(np.asarray(out.f).reshape(-1))[::-1][: 8 * B]
    np.testing.assert_allclose(kept, np.sort(np.asarray(jax.nn.relu(out.pre)).reshape(-1))[::-1][: 8 * B])
    # TopK with the same params keeps k per token: a different code
    tk_cfg = SAEConfig(kind="topk", d_model=D, d_sae=S, k=8)
    _, tk = make_sae(tk_cfg).apply({"params": {k: v for k, v in params.items() if k != "threshold"}}, x)
    np.testing.assert_array_equal(jnp.sum(tk.f > 0, axis=-1), 8)
    assert not np.array_equal(np.asarray(tk.f), np.asarray(out.f))


def test_batchtopk_threshold_rule():
    """dictionary_learning's rule: -1 until the update after step threshold_start_step, which takes the
    batch's smallest kept activation; an EMA with threshold_decay after that."""
    cfg, model, params = _setup("batchtopk", k=8, threshold_start_step=3, threshold_decay=0.9)
    x = _x((16, D))
    _, out = model.apply({"params": params}, x)
    min_pos = float(jnp.min(jnp.where(out.f > 0, out.f, jnp.inf)))
    update = jax.jit(lambda p, o, s: post_update(cfg, p, o, s))
    for step in range(4):  # steps 0..3: not yet
        assert float(update(params, out, jnp.int32(step))["threshold"]) == -1.0
    p4 = update(params, out, jnp.int32(4))
    np.testing.assert_allclose(p4["threshold"], min_pos, rtol=1e-6)
    _, out2 = model.apply({"params": params}, 2.0 * x)  # a batch with other activations
    min2 = float(jnp.min(jnp.where(out2.f > 0, out2.f, jnp.inf)))
    p5 = update(p4, out2, jnp.int32(5))
    np.testing.assert_allclose(p5["threshold"], 0.9 * min_pos + 0.1 * min2, rtol=1e-5)
    # a calibrated threshold keeps moving from step 0 (a fine-tune restarts its step count)
    np.testing.assert_allclose(update(p4, out2, jnp.int32(0))["threshold"], p5["threshold"], rtol=1e-6)
    # a batch with nothing active pulls towards 0, as dictionary_learning's does
    np.testing.assert_allclose(update_threshold(p4["threshold"], jnp.zeros_like(out.f), 0.9), 0.9 * min_pos,
                               rtol=1e-6)


def test_batchtopk_inference_uses_the_threshold():
    cfg, model, params = _setup("batchtopk", k=8)
    x = _x((16, D))
    _, out = model.apply({"params": params}, x)
    # uncalibrated (-1): plain ReLU
    np.testing.assert_allclose(model.apply({"params": params}, x, method=model.encode), jax.nn.relu(out.pre))
    thr = 0.3
    params = dict(params, threshold=jnp.asarray(thr, jnp.float32))
    f_inf = model.apply({"params": params}, x, method=model.encode)  # train=False
    np.testing.assert_array_equal(f_inf > 0, out.pre > thr)
    np.testing.assert_allclose(f_inf, jnp.where(out.pre > thr, out.pre, 0.0))
    _, out_eval = model.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(out_eval.f, f_inf)
    # The threshold is not trained by gradients.
    g = jax.grad(lambda p: model.apply({"params": p}, x, train=False)[0].sum())(params)
    assert float(g["threshold"]) == 0.0


# ---------------------------------------------------------------- matryoshka batchtopk


def test_matryoshka_group_sizes():
    def sizes(d_sae, fr):
        return group_sizes(SAEConfig(kind="matryoshka_batchtopk", d_model=4, d_sae=d_sae, group_fractions=fr))

    assert sizes(S, GROUPS) == (32, 64, 160)
    assert sizes(100, (0.3, 0.3, 0.4)) == (30, 30, 40)  # floor, the last group takes the rest
    assert sizes(10, (0.25, 0.25, 0.5)) == (2, 2, 6)
    assert sizes(49, (1 / 49, 48 / 49)) == (1, 48)  # (1/49) * 49 is 0.999...: not floored to 0


@pytest.mark.parametrize("weights", [None, (0.5, 1.0, 2.0)])
def test_matryoshka_prefix_loss_matches_a_numpy_reference(weights):
    """Trainer loss (full reconstruction + penalties) = sum_m (w_m / w_G) L_m (+ AuxK), with
    L_m = mean_tokens ||x - b_dec - f[:, :c_m] W_dec[:c_m]||^2; and = G / w_G times dictionary_learning's
    mean_m(w_m L_m)."""
    cfg, model, params = _setup("matryoshka_batchtopk", k=8, group_weights=weights)
    x = _x((24, D), seed=4) + 0.5
    x_hat, out = model.apply({"params": params}, x)  # no dead mask: no AuxK
    assert set(out.penalties) == {"auxk", "matryoshka"} and float(out.penalties["auxk"]) == 0.0
    f, W, b = (np.asarray(a, np.float64) for a in (out.f, params["W_dec"], params["b_dec"]))
    xn = np.asarray(x, np.float64)
    ends = np.cumsum([32, 64, 160])
    L = np.array([np.mean(np.sum((xn - b - f[:, :c] @ W[:c]) ** 2, -1)) for c in ends])
    w = np.ones(3) / 3 if weights is None else np.asarray(weights)
    total = float(reconstruction_loss(x, x_hat) + out.aux_loss)
    np.testing.assert_allclose(float(reconstruction_loss(x, x_hat)), L[-1], rtol=1e-5)
    np.testing.assert_allclose(total, np.sum(w / w[-1] * L), rtol=1e-5)
    np.testing.assert_allclose(out.penalties["matryoshka"], np.sum(w[:-1] / w[-1] * L[:-1]), rtol=1e-5)
    np.testing.assert_allclose(total, len(w) / w[-1] * np.mean(w * L), rtol=1e-5)
    # the activation is BatchTopK over all latents: k * N active in the batch
    assert int(np.sum(f > 0)) == 8 * 24


def test_matryoshka_trains_with_the_mse_step():
    """The trainer's own step, unchanged: loss falls, the prefix loss is logged, the threshold calibrates."""
    from jaxsae.config import MSECfg
    from jaxsae.train.mse import init_state, make_mse_step
    from jaxsae.train.optim import optimizer

    cfg, model, params = _setup("matryoshka_batchtopk", k=8, threshold_start_step=2, dead_tokens_threshold=64)
    tx, sched = optimizer(MSECfg(lr=1e-2, warmup_steps=0, decay_fraction=0.0), 30, cfg)
    state = init_state(params, tx, cfg, seed=0)
    step = make_mse_step(cfg, tx, sched)
    x = _x((64, D), seed=5) @ jnp.diag(jnp.linspace(0.2, 2.0, D))
    losses, thresholds = [], []
    for _ in range(30):
        state, m = step(state, x)
        losses.append(float(m["train/loss"]))
        thresholds.append(float(state["params"]["threshold"]))
    assert {"train/matryoshka", "train/auxk"} <= set(m)
    np.testing.assert_allclose(m["train/loss"], m["train/mse"] + m["train/matryoshka"] + m["train/auxk"], rtol=1e-5)
    assert losses[-1] < 0.7 * losses[0]
    assert thresholds[:3] == [-1.0] * 3 and thresholds[3] > 0 and thresholds[-1] != thresholds[3]


# ---------------------------------------------------------------- decoder norm


def test_unit_norm_decoder_update():
    cfg, model, params = _setup("topk", k=8)
    x = _x((32, D))

    def loss(p):
        x_hat, out = model.apply({"params": p}, x)
        return reconstruction_loss(x, x_hat)

    grad_fn = jax.jit(jax.grad(loss))
    grads = grad_fn(params)
    pg = project_out_parallel_grad(grads, params)
    par = jnp.sum(pg["W_dec"] * params["W_dec"], axis=1)
    assert float(jnp.abs(par).max()) < 1e-5
    assert float(jnp.abs(jnp.sum(grads["W_dec"] * params["W_dec"], axis=1)).max()) > 1e-3
    np.testing.assert_array_equal(pg["W_enc"], grads["W_enc"])

    tx = maybe_unit_norm_decoder(cfg, optax.adam(1e-2))
    state = tx.init(params)
    new = params
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(grad_fn(new), state, new)
        new = optax.apply_updates(new, u)
    np.testing.assert_allclose(jnp.linalg.norm(new["W_dec"], axis=1), 1.0, atol=1e-5)
    assert float(jnp.abs(new["W_dec"] - params["W_dec"]).max()) > 1e-3
    # Non-decoder leaves get exactly the inner optimizer's update.
    inner = optax.adam(1e-2)
    u_ref, _ = inner.update(grads, inner.init(params), params)
    u_wrapped, _ = unit_norm_decoder(inner).update(grads, tx.init(params), params)
    np.testing.assert_allclose(u_wrapped["b_enc"], u_ref["b_enc"])

    rn = renormalize_decoder({"params": {"W_dec": 3.0 * params["W_dec"], "b": jnp.ones(2)}})
    np.testing.assert_allclose(jnp.linalg.norm(rn["params"]["W_dec"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(rn["params"]["b"], 1.0)
    relu_cfg = SAEConfig(kind="relu", d_model=D, d_sae=S)
    base = optax.sgd(0.1)
    assert maybe_unit_norm_decoder(relu_cfg, base) is base


# ---------------------------------------------------------------- relu


def test_relu_l1_and_warmup():
    cfg, model, params = _setup("relu", l1_coeff=2.0, l1_warmup_steps=100)
    assert float(l1_coeff_at(0, cfg)) == 0.0
    assert float(l1_coeff_at(50, cfg)) == pytest.approx(1.0)
    assert float(l1_coeff_at(jnp.int32(500), cfg)) == pytest.approx(2.0)
    assert float(l1_coeff_at(7, SAEConfig("relu", 4, 4, l1_coeff=0.5))) == 0.5
    x = _x((8, D))
    _, out = model.apply({"params": params}, x)
    np.testing.assert_allclose(out.f, jax.nn.relu(out.pre))
    norms = jnp.linalg.norm(params["W_dec"], axis=1)
    expected = 2.0 * jnp.mean(jnp.sum(out.f * norms, axis=-1))
    np.testing.assert_allclose(out.penalties["l1"], expected, rtol=1e-5)
    _, out_half = model.apply({"params": params}, x, l1_coeff=l1_coeff_at(50, cfg))
    np.testing.assert_allclose(out_half.penalties["l1"], expected / 2, rtol=1e-5)


# ---------------------------------------------------------------- jumprelu


def test_jumprelu_ste_gradients():
    eps = 0.1
    x = jnp.array([[0.3, 0.52, 0.58, 1.0]])
    theta = jnp.full((4,), 0.55)
    np.testing.assert_allclose(jumprelu(x, theta, eps), [[0.0, 0.0, 0.58, 1.0]])
    gx, gt = jax.grad(lambda x, t: jumprelu(x, t, eps).sum(), argnums=(0, 1))(x, theta)
    np.testing.assert_allclose(gx, [[0, 0, 1, 1]])
    # Only the two entries within eps/2 of theta feel the rectangle kernel.
    np.testing.assert_allclose(gt, [0, -0.55 / eps, -0.55 / eps, 0], rtol=1e-6)
    gt0 = jax.grad(lambda t: heaviside_step(x, t, eps).sum())(theta)
    np.testing.assert_allclose(gt0, [0, -1 / eps, -1 / eps, 0], rtol=1e-6)


def test_jumprelu_threshold_gets_gradient():
    cfg, model, params = _setup(
        "jumprelu", l0_coeff=1.0, jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.1
    )
    x = _x((64, D))

    def parts(p):
        x_hat, out = model.apply({"params": p}, x)
        return reconstruction_loss(x, x_hat), out.penalties["l0_loss"]

    _, out = model.apply({"params": params}, x)
    np.testing.assert_allclose(out.f, jnp.where(out.pre > 0.5, out.pre, 0.0), rtol=1e-5)
    assert float(out.penalties["l0_loss"]) == pytest.approx(float(out.l0), rel=1e-5)
    g_mse = jax.grad(lambda p: parts(p)[0])(params)["log_threshold"]
    g_l0 = jax.grad(lambda p: parts(p)[1])(params)["log_threshold"]
    assert float(jnp.abs(g_mse).max()) > 0.0
    assert float(jnp.abs(g_l0).max()) > 0.0
    assert float(g_l0.max()) <= 0.0  # raising theta lowers L0
    assert bool(jnp.all(jnp.isfinite(g_mse)))


# ---------------------------------------------------------------- planted dictionary


def _planted_recovery(kind, *, seed=0, steps=2000, d_model=32, n_atoms=128, sparsity=4, batch=256, **kw):
    """Train on x = sum of `sparsity` random unit atoms; return the fraction of
    atoms whose best-matching decoder row has cosine > 0.9."""
    key = jax.random.key(seed)
    atoms = jax.random.normal(jax.random.fold_in(key, 1), (n_atoms, d_model))
    atoms = atoms / jnp.linalg.norm(atoms, axis=1, keepdims=True)

    def sample(k):
        k1, k2, k3 = jax.random.split(k, 3)
        idx = jax.lax.top_k(jax.random.uniform(k1, (batch, n_atoms)), sparsity)[1]
        coef = jax.random.uniform(k2, (batch, sparsity), minval=0.5, maxval=1.5)
        x = jnp.einsum("bs,bsd->bd", coef, atoms[idx])
        return x + 0.01 * jax.random.normal(k3, x.shape)

    cfg = SAEConfig(kind=kind, d_model=d_model, d_sae=2 * n_atoms, k=sparsity,
                    dead_tokens_threshold=50 * batch, **kw).validate()
    model = make_sae(cfg)
    params = init_sae(cfg, jax.random.fold_in(key, 2), sample(jax.random.fold_in(key, 3)))
    tx = maybe_unit_norm_decoder(cfg, optax.adam(3e-3))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, counter, i):
        x = sample(jax.random.fold_in(key, 100 + i))

        def loss_fn(p):
            x_hat, out = model.apply({"params": p}, x, dead=dead_mask(counter, cfg),
                                     l1_coeff=l1_coeff_at(i, cfg))
            return reconstruction_loss(x, x_hat) + out.aux_loss, out

        (_, out), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, update_dead_counter(counter, out.fired, batch)

    counter = jnp.zeros((cfg.d_sae,), jnp.int32)
    for i in range(steps):
        params, opt, counter = step(params, opt, counter, i)
    W = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    return float(jnp.mean(jnp.max(atoms @ W.T, axis=1) > 0.9))


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("topk", {}),
        ("relu", dict(l1_coeff=1.0, l1_warmup_steps=400)),
    ],
)
def test_planted_dictionary_recovery(kind, kw):
    assert _planted_recovery(kind, **kw) >= 0.9
