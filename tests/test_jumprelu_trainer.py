"""JumpReLU trained as dictionary_learning's JumpReluTrainer (`sae.l0_target`): the MSE phase's update
against an independent PyTorch step written from that trainer's formulas, the L0 loss and its threshold
gradient at a point checkable by hand, the config's errors, the unit-norm decoder switch, and the trainer
keys the dictionary_learning export writes and reads back. Tiny shapes: a few seconds on 2 CPU cores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsae.config import ConfigError, MSECfg, load_config
from jaxsae.sae import SAEConfig, init_sae, l0_coeff_at, make_sae, maybe_unit_norm_decoder
from jaxsae.sae.load import LoadedSAE
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo-jumprelu.yaml"


# ---------------------------------------------------------------- the MSE step against a PyTorch reference

D, S, N, STEPS = 8, 16, 32, 3
LR, COEFF, TARGET, WARMUP = 1e-2, 1.0, 4.0, 2
# a wide kernel and thresholds inside the pre-activations' range, so that the STE reaches many thresholds
EPS, THETA0 = 0.2, 0.5


def _trainer_cfg() -> SAEConfig:
    return SAEConfig(kind="jumprelu", d_model=D, d_sae=S, l0_coeff=COEFF, l0_target=TARGET, l0_warmup_steps=WARMUP,
                     decoder_unit_norm=True, jumprelu_bandwidth=EPS, jumprelu_init_threshold=THETA0).validate()


def _batches() -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(3), STEPS)
    # an offset, so that b_dec (the geometric median) is not ~0 and its gradient matters
    return [1.5 * jax.random.normal(k, (N, D)) + 0.3 for k in keys]


def _start_params(cfg: SAEConfig, sample: jax.Array) -> dict:
    """init_sae's params with per-latent biases and thresholds (a fresh init has them all equal)."""
    k1, k2 = jax.random.split(jax.random.key(4))
    p = dict(init_sae(cfg, jax.random.key(1), sample=sample))
    p["b_enc"] = 0.1 * jax.random.normal(k1, (S,))
    p["log_threshold"] = jnp.log(jax.random.uniform(k2, (S,), minval=0.3, maxval=0.7))
    return p


def _torch_trainer(torch, params: dict, batches: list[np.ndarray]):
    """dictionary_learning's JumpReluTrainer update, written from its formulas, on jaxsae's
    parameterisation: log_threshold, and b_dec subtracted before encoding (the two documented differences
    in `jaxsae.sae.jumprelu`); the step function of pre, the paper's. Returns (params, losses, grad norms)."""

    def kernel(u):  # the rectangle K(u) = 1 on (-1/2, 1/2)
        return ((u > -0.5) & (u < 0.5)).to(u.dtype)

    class JumpReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pre, theta):
            ctx.save_for_backward(pre, theta)
            return pre * (pre > theta).to(pre.dtype)

        @staticmethod
        def backward(ctx, g):
            pre, theta = ctx.saved_tensors
            # pass-through below the gate; the threshold's STE: -(theta / eps) K((pre - theta) / eps)
            return g * (pre > theta).to(g.dtype), (-(theta / EPS) * kernel((pre - theta) / EPS) * g).sum(0)

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pre, theta):
            ctx.save_for_backward(pre, theta)
            return (pre > theta).to(pre.dtype)

        @staticmethod
        def backward(ctx, g):
            pre, theta = ctx.saved_tensors
            # no gradient to pre; the threshold's STE: -(1 / eps) K((pre - theta) / eps)
            return torch.zeros_like(pre), (-(1.0 / EPS) * kernel((pre - theta) / EPS) * g).sum(0)

    p = {k: torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=LR, betas=(0.0, 0.999), eps=1e-8)
    losses, norms = [], []
    for step, x in enumerate(batches):
        x = torch.tensor(x)
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        theta = p["log_threshold"].exp()
        x_hat = JumpReLU.apply(pre, theta) @ p["W_dec"] + p["b_dec"]
        recon = (x - x_hat).pow(2).sum(-1).mean()
        l0 = Step.apply(pre, theta).sum(-1).mean()
        sparsity_scale = min(step / WARMUP, 1.0)
        loss = recon + COEFF * (l0 / TARGET - 1.0) ** 2 * sparsity_scale
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            w, g = p["W_dec"], p["W_dec"].grad
            u = w / w.norm(dim=-1, keepdim=True)
            g -= (g * u).sum(-1, keepdim=True) * u  # no step along a decoder row
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)))
        opt.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)
        losses.append(loss.item())
    return {k: v.detach().numpy() for k, v in p.items()}, losses, norms


def test_mse_step_is_dictionary_learnings_jumprelu_step():
    torch = pytest.importorskip("torch")
    cfg = _trainer_cfg()
    batches = _batches()
    params = _start_params(cfg, batches[0])
    start = {k: np.asarray(v) for k, v in params.items()}
    np.testing.assert_allclose(np.linalg.norm(start["W_dec"], axis=-1), 1.0, rtol=1e-6)

    tx, sched = optimizer(MSECfg(lr=LR, b1=0.0, b2=0.999, clip=1.0, schedule="constant", weight_decay=0.0),
                          STEPS, cfg)
    state = init_state(params, tx, cfg, seed=0)
    step = make_mse_step(cfg, tx, sched)
    metrics = []
    for x in batches:
        state, m = step(state, x)
        metrics.append({k: float(v) for k, v in m.items()})
    ours = {k: np.asarray(v) for k, v in state["params"].items()}

    ref, ref_losses, grad_norms = _torch_trainer(torch, start, [np.asarray(x) for x in batches])

    # the pieces under test are all in play: the clip cuts every step, the L0 loss is warmed up from 0 and
    # is the quadratic one, the thresholds and decoder rows move, the rows stay at unit norm
    assert min(grad_norms) > 1.0
    for i, m in enumerate(metrics):
        scale = min(i / WARMUP, 1.0)
        np.testing.assert_allclose(m["train/l0_loss"], COEFF * scale * (m["train/l0"] / TARGET - 1) ** 2, rtol=1e-6)
    assert metrics[0]["train/l0_loss"] == 0.0 and metrics[-1]["train/l0_loss"] > 0.0
    assert np.abs(ours["log_threshold"] - start["log_threshold"]).max() > LR / 2
    assert np.abs(ours["W_dec"] - start["W_dec"]).max() > LR / 2
    np.testing.assert_allclose(np.linalg.norm(ours["W_dec"], axis=-1), 1.0, rtol=1e-6)

    # float32 on both sides, summed in different orders. The params are O(1) (unit decoder rows, log
    # thresholds near -0.7), where a float32 ulp is ~1e-7, and the two sides end a few ulps apart (3e-7
    # at most with these seeds): atol 1e-6. A relative tolerance alone would not do: entries that end
    # near 0 differ by up to 1e-3 relative. Each step moves params by ~lr = 1e-2, and leaving out any one
    # piece of the reference (the clip, b1 = 0, the warm-up, the quadratic L0, the projection, the
    # renormalisation, or taking the step of f) moves some param by 3e-3 or more.
    # the losses, sums of N * D = 256 squared errors, agree to ~2e-6 relative
    np.testing.assert_allclose([m["train/loss"] for m in metrics], ref_losses, rtol=1e-5)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"):
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- the L0 loss by hand

# identity encoder and decoder, zero biases: pre = x. Threshold 0.55 everywhere, kernel width 0.1, so the
# STE sees exactly the pre-activations in (0.5, 0.6).
HAND_X = [[0.3, 0.52, 0.58, 1.0],  # latents 2 and 3 on; latents 1 and 2 within eps/2 of theta
          [0.9, 0.9, 0.9, 0.9]]  # all four on, none near theta
# L0 = (2 + 4) / 2 = 3. dL0/dtheta_i = -(1/eps) * (tokens in the window of latent i) / N = -10 * 1/2 = -5
# for latents 1 and 2, else 0.


@pytest.mark.parametrize("target, loss, dtheta", [
    (None, 3.0 * 3, 3.0 * -5),  # the paper's coeff * L0: always towards fewer latents
    (4.0, 3.0 * (3 / 4 - 1) ** 2, 2 * 3.0 * (3 / 4 - 1) / 4 * -5),  # = 0.1875, 1.875: L0 below T, theta falls
    (2.0, 3.0 * (3 / 2 - 1) ** 2, 2 * 3.0 * (3 / 2 - 1) / 2 * -5),  # = 0.75, -7.5: L0 above T, theta rises
])
def test_l0_loss_and_threshold_gradient_by_hand(target, loss, dtheta):
    theta, eps, coeff = 0.55, 0.1, 3.0
    cfg = SAEConfig(kind="jumprelu", d_model=4, d_sae=4, l0_coeff=coeff, l0_target=target,
                    jumprelu_bandwidth=eps, jumprelu_init_threshold=theta, l0_warmup_steps=4).validate()
    model = make_sae(cfg)
    params = {"W_enc": jnp.eye(4), "b_enc": jnp.zeros(4), "W_dec": jnp.eye(4), "b_dec": jnp.zeros(4),
              "log_threshold": jnp.full((4,), math.log(theta))}
    x = jnp.asarray(HAND_X)

    def l0_loss(p, coeff=None):
        _, out = model.apply({"params": p}, x, l0_coeff=coeff)
        return out.penalties["l0_loss"], out.l0

    (value, l0), grads = jax.value_and_grad(l0_loss, has_aux=True)(params)
    assert float(l0) == 3.0
    np.testing.assert_allclose(value, loss, rtol=1e-6)
    # the parameter is log theta: its gradient is theta * dLoss/dtheta
    np.testing.assert_allclose(grads["log_threshold"], [0.0, theta * dtheta, theta * dtheta, 0.0], rtol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the L0 loss moves thresholds only
        assert not np.any(np.asarray(grads[name])), name
    # the warm-up: 0 at step 0, a quarter after one of four steps, all of it from step 4 on
    assert [float(l0_coeff_at(s, cfg)) for s in (0, 1, 2, 4, 9)] == [0.0, coeff / 4, coeff / 2, coeff, coeff]
    np.testing.assert_allclose(l0_loss(params, l0_coeff_at(1, cfg))[0], loss / 4, rtol=1e-6)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kw, needle", [
    (dict(kind="jumprelu", l0_target=0.0), "sae.l0_target=0.0 must be > 0"),
    (dict(kind="jumprelu", l0_target=-16.0), "sae.l0_target=-16.0 must be > 0"),
    (dict(kind="jumprelu", l0_target=float("nan")), "sae.l0_target=nan must be > 0"),
    (dict(kind="topk", k=4, l0_target=16.0), "sae.l0_target is for sae.kind=jumprelu, not topk"),
    (dict(kind="relu", l0_target=16.0), "sae.l0_target is for sae.kind=jumprelu, not relu"),
    (dict(kind="jumprelu", l0_warmup_steps=-1), "sae.l0_warmup_steps=-1 must be an integer >= 0"),
    (dict(kind="jumprelu", decoder_unit_norm="yes"), "sae.decoder_unit_norm='yes'"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ValueError) as e:
        SAEConfig(d_model=8, d_sae=16, **kw).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("sae.l0_target=0", "sae.l0_target=0.0 must be > 0"),
    ("sae.kind=relu", "sae.l0_target is for sae.kind=jumprelu, not relu: remove sae.l0_target"),
])
def test_train_cli_exits_with_one_line(override, needle, tmp_path, capfd):
    from jaxsae.train.__main__ import main

    with pytest.raises(ConfigError, match="sae.l0_target"):
        load_config(DEMO, [override])
    run = tmp_path / "run"
    assert main(["--config", str(DEMO), "--set", override, "--run-dir", str(run)]) == 2
    err = capfd.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not run.exists()


def test_shipped_config_is_the_trainer():
    cfg = load_config(DEMO)
    assert (cfg.sae.kind, cfg.sae.l0_target, cfg.sae.l0_coeff, cfg.mse.b1, cfg.mse.clip) == ("jumprelu", 16, 1.0, 0, 1)
    assert cfg.sae.unit_norm_decoder and cfg.sae.l0_warmup_steps > 0 and "finetune" in cfg.phases


# ---------------------------------------------------------------- the unit-norm decoder switch


def test_decoder_unit_norm_overrides_the_kind():
    base = SAEConfig(kind="jumprelu", d_model=D, d_sae=S)
    assert not base.unit_norm_decoder and SAEConfig(kind="topk", d_model=D, d_sae=S).unit_norm_decoder
    on = SAEConfig(kind="jumprelu", d_model=D, d_sae=S, decoder_unit_norm=True).validate()
    off = SAEConfig(kind="topk", d_model=D, d_sae=S, k=4, decoder_unit_norm=False).validate()
    assert on.unit_norm_decoder and not off.unit_norm_decoder
    sgd = optax.sgd(0.1)
    assert maybe_unit_norm_decoder(base, sgd) is sgd and maybe_unit_norm_decoder(off, sgd) is sgd
    assert maybe_unit_norm_decoder(on, sgd) is not sgd
    # relu starts its decoder rows at norm 0.1 unless they are held at unit norm
    relu = SAEConfig(kind="relu", d_model=D, d_sae=S)
    for cfg, norm in ((relu, 0.1), (SAEConfig(kind="relu", d_model=D, d_sae=S, decoder_unit_norm=True), 1.0)):
        rows = np.linalg.norm(np.asarray(init_sae(cfg, jax.random.key(0))["W_dec"]), axis=-1)
        np.testing.assert_allclose(rows, norm, rtol=1e-5)


def test_moving_a_unit_norm_jumprelu_keeps_its_gates():
    """A unit-norm JumpReLU re-expressed for another scale (what finetune.init_from does) folds its rows'
    common norm c into the encoder, and so into theta: the same latents fire, the same reconstruction."""
    from jaxsae.interop import to_scale

    cfg = SAEConfig(kind="jumprelu", d_model=D, d_sae=S, decoder_unit_norm=True).validate()
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    p = dict(init_sae(cfg, k1))
    p["W_dec"] = 2.5 * p["W_dec"]  # rows of one common norm, as an export at scale 2.5 leaves them
    p["b_enc"] = 0.1 * jax.random.normal(k2, (S,))
    p["log_threshold"] = jnp.log(jax.random.uniform(k3, (S,), minval=0.05, maxval=0.4))
    sae = LoadedSAE(cfg, p, 1.0, {})
    moved = LoadedSAE(cfg, to_scale(sae, 3.0), 3.0, {})
    np.testing.assert_allclose(np.linalg.norm(np.asarray(moved.params["W_dec"]), axis=-1), 1.0, rtol=1e-5)
    x = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32)
    f, f_moved = np.asarray(sae.encode(x)), np.asarray(moved.encode(x))
    assert 0 < (f > 0).mean() < 1
    np.testing.assert_array_equal(f > 0, f_moved > 0)
    np.testing.assert_allclose(sae.decode(f), moved.decode(f_moved), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- dictionary_learning's trainer keys


@pytest.mark.parametrize("fields, trainer", [
    (dict(l0_target=16.0, l0_warmup_steps=500), dict(target_l0=16.0, sparsity_warmup_steps=500)),
    ({}, dict(target_l0=None, sparsity_warmup_steps=0)),  # the paper's penalty: no target
])
def test_dictionary_learning_trainer_keys_round_trip(fields, trainer, tmp_path):
    pytest.importorskip("torch")
    from jaxsae import interop

    cfg = SAEConfig(kind="jumprelu", d_model=D, d_sae=S, l0_coeff=0.7, jumprelu_bandwidth=2e-3, **fields).validate()
    out = interop.export(LoadedSAE(cfg, init_sae(cfg, jax.random.key(0)), 1.0, {"hook_layer": 1}), tmp_path / "dl",
                         "dictionary_learning")
    written = json.loads((out / "config.json").read_text())["trainer"]
    assert {k: written[k] for k in trainer} == trainer
    assert (written["trainer_class"], written["sparsity_penalty"], written["bandwidth"]) == ("JumpReluTrainer", 0.7, 2e-3)
    back = interop.load(out).cfg
    got = (back.l0_target, back.l0_warmup_steps, back.l0_coeff, back.jumprelu_bandwidth)
    assert got == (cfg.l0_target, cfg.l0_warmup_steps, 0.7, 2e-3)
