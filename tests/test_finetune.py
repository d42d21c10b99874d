"""The fused KL+MSE step: gradients equal a plain two-forward reference, β keeps the loss at the MSE,
only the SAE trains, and the ReLU L1 controller moves λ the right way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, init_sae, make_sae
from jaxsae.config import FinetuneCfg
from jaxsae.splice import Splice
from jaxsae.train.finetune import KLLoss, init_ft_state, kl_mse_loss, make_finetune_step
from jaxsae.train.optim import optimizer

LAYER, SCALE = 1, 1.7


def _ft_opt(lr, steps, sae_cfg):
    """The fine-tune's optimiser (AdamW wd 0.01, clip 1, lr -> 0) at `lr`."""
    return optimizer(FinetuneCfg(lr=lr), steps, sae_cfg)


@pytest.fixture(scope="module")
def lm():
    cfg = GPTNeoXConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_mlp=64, rotary_pct=0.5)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # larger weights than the init so the suffix is far from linear
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
    return LM(cfg, params)


def _tokens(seed=0, b=3, t=12):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 97, (b, t)), jnp.int32)


def _sae(kind="topk"):
    cfg = SAEConfig(kind=kind, d_model=32, d_sae=64, k=6, l1_coeff=0.3 if kind == "relu" else 0.0).validate()
    return cfg, make_sae(cfg), init_sae(cfg, jax.random.PRNGKey(1))


def _reference_loss(lm, sae_module, params, tokens, kl_share=0.5):
    """Written independently of the fused code: the paper's reference runs layers 0..L twice."""
    x_clean_full = lm.forward(tokens)  # full clean forward
    p = jax.nn.softmax(x_clean_full, -1)
    h = lm.blocks(lm.embed(tokens), 0, LAYER + 1)  # second prefix, for the spliced branch
    x_hat = sae_module.apply({"params": params}, h / SCALE, train=True)[0] * SCALE
    h_spliced = h.at[:, 1:].set(x_hat[:, 1:])  # position 0 is not spliced or counted
    logits = lm.unembed(lm.blocks(h_spliced, LAYER + 1, lm.n_layers))
    logq = jax.nn.log_softmax(logits, -1)
    kl = jnp.mean(jnp.sum(p * (jnp.log(p) - logq), -1)[:, 1:])
    mse = jnp.mean(jnp.sum((h / SCALE - x_hat / SCALE) ** 2, -1)[:, 1:])
    beta = jax.lax.stop_gradient(mse / kl)
    return (1 - kl_share) * mse + kl_share * beta * kl, (mse, kl)


def _fused(lm, sae_cfg, sae_module, params, tokens, kl_share=0.5):
    return kl_mse_loss(Splice(lm, LAYER, SCALE), lm.params, sae_cfg, params, tokens, KLLoss(kl_share=kl_share),
                       dead=jnp.zeros(sae_cfg.d_sae, jnp.int32), l1_coeff=None)


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_fused_gradients_equal_two_forward_reference(lm, kind):
    sae_cfg, sae_module, params = _sae(kind)
    tokens = _tokens()
    ref_grad = jax.grad(lambda p: _reference_loss(lm, sae_module, p, tokens)[0])(params)

    def fused_no_sparsity(p):
        loss, aux = _fused(lm, sae_cfg, sae_module, p, tokens)
        return loss - aux["out"].aux_loss  # the reference has no L1 / AuxK term

    got = jax.grad(fused_no_sparsity)(params)
    for k in params:
        np.testing.assert_allclose(got[k], ref_grad[k], rtol=2e-4, atol=1e-6 * float(jnp.abs(ref_grad[k]).max()),
                                   err_msg=k)
        assert float(jnp.abs(ref_grad[k]).max()) > 0 or k == "b_dec"


def test_beta_makes_loss_equal_mse_and_scales_kl_gradient(lm):
    sae_cfg, sae_module, params = _sae("topk")
    tokens = _tokens(1)
    for share in (0.5, 0.25):
        loss, aux = _fused(lm, sae_cfg, sae_module, params, tokens, kl_share=share)
        np.testing.assert_allclose(loss - aux["out"].aux_loss, aux["mse"], rtol=1e-5)
        np.testing.assert_allclose(aux["beta"], aux["mse"] / aux["kl"], rtol=1e-5)
    loss, aux = _fused(lm, sae_cfg, sae_module, params, tokens)
    beta = float(aux["beta"])
    g_total = jax.grad(lambda p: _fused(lm, sae_cfg, sae_module, p, tokens)[0] - 0)(params)
    g_mse = jax.grad(lambda p: _fused(lm, sae_cfg, sae_module, p, tokens)[1]["mse"])(params)
    g_kl = jax.grad(lambda p: _fused(lm, sae_cfg, sae_module, p, tokens)[1]["kl"])(params)
    g_aux = jax.grad(lambda p: _fused(lm, sae_cfg, sae_module, p, tokens)[1]["out"].aux_loss)(params)
    for k in params:
        want = 0.5 * g_mse[k] + 0.5 * beta * g_kl[k] + g_aux[k]
        np.testing.assert_allclose(g_total[k], want, rtol=1e-4, atol=1e-7 * float(jnp.abs(want).max() + 1), err_msg=k)
    assert beta > 1.0 or beta < 1.0  # a real rescaling, not the identity


def test_step_trains_only_the_sae(lm):
    sae_cfg, sae_module, params = _sae("topk")
    tx, sched = _ft_opt(1e-3, 10, sae_cfg)
    state = init_ft_state(params, tx, sae_cfg, np.zeros(64, np.int32), 0.0, 6.0, 0)
    lm_before = jax.tree.map(np.asarray, lm.params)
    step = make_finetune_step(Splice(lm, LAYER, SCALE), sae_cfg, tx, sched)
    w_dec_before = np.asarray(state["params"]["W_dec"])
    for i in range(3):
        state, m = step(state, lm.params, _tokens(i))
    # LM untouched; optimizer state only holds SAE-shaped moments
    jax.tree.map(np.testing.assert_array_equal, lm_before, jax.tree.map(np.asarray, lm.params))
    sae_sizes = sorted(int(np.size(v)) for v in params.values())
    opt_sizes = {int(np.size(v)) for v in jax.tree.leaves(state["opt_state"]) if np.size(v) > 1}
    assert opt_sizes <= set(sae_sizes)
    assert not np.allclose(np.asarray(state["params"]["W_dec"]), w_dec_before)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state["params"]["W_dec"]), axis=1), 1.0, rtol=1e-5)
    assert float(m["train/l0"]) == 6.0 and np.isfinite(float(m["train/kl"]))
    np.testing.assert_allclose(float(m["train/loss"]) - float(m["train/auxk"]), float(m["train/mse"]), rtol=1e-5)


def test_bfloat16_lm_keeps_the_sae_its_gradients_and_adam_in_float32(lm):
    """Mixed precision: the LM runs in bfloat16 and the SAE's params, gradients and optimiser state stay
    float32 through the fused step (the logits: tests/test_shipped_model.py)."""
    import dataclasses

    lm16 = LM(dataclasses.replace(lm.config, dtype="bfloat16"), jax.tree.map(lambda p: p.astype(jnp.bfloat16), lm.params))
    sae_cfg, sae_module, params = _sae("topk")
    grads = jax.eval_shape(jax.grad(lambda p: _fused(lm16, sae_cfg, sae_module, p, _tokens())[0]), params)
    assert {k: g.dtype for k, g in grads.items()} == {k: jnp.float32 for k in params}
    tx, sched = _ft_opt(1e-3, 10, sae_cfg)
    w_dec_before = np.asarray(params["W_dec"])  # the step donates its state
    state = init_ft_state(params, tx, sae_cfg, np.zeros(64, np.int32), 0.0, 6.0, 0)
    state, m = make_finetune_step(Splice(lm16, LAYER, SCALE), sae_cfg, tx, sched)(state, lm16.params, _tokens())
    floats = [x for x in jax.tree.leaves((state["params"], state["opt_state"])) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 and bool(jnp.isfinite(x).all()) for x in floats)
    assert np.isfinite(float(m["train/kl"])) and float(m["train/kl"]) > 0
    assert not np.allclose(np.asarray(state["params"]["W_dec"]), w_dec_before)


def test_linear_decay_to_zero_without_warmup():
    sae_cfg, _, _ = _sae("topk")
    _, sched = _ft_opt(5e-5, 100, sae_cfg)
    assert float(sched(0)) == pytest.approx(5e-5) and float(sched(50)) == pytest.approx(2.5e-5)
    assert float(sched(100)) == 0.0


def test_pi_controller_rule():
    """pi: λ = λ_I·exp(gain·e), log λ_I += rate·e with e = log(L0/target) clipped to ±0.5."""
    from jaxsae.train.finetune import control_l1

    loss = KLLoss(l1_controller=True, l1_control="pi", l1_rate=0.05, l1_gain=1.0)
    for l0, target in ((18.0, 16.0), (14.0, 16.0), (160.0, 16.0)):
        e = float(np.clip(np.log(l0 / target), -0.5, 0.5))
        l1, base = control_l1(loss, jnp.float32(0.3), jnp.float32(0.2), jnp.float32(l0), jnp.float32(target))
        assert float(base) == pytest.approx(0.2 * np.exp(0.05 * e), rel=1e-6)
        assert float(l1) == pytest.approx(0.2 * np.exp(0.05 * e) * np.exp(e), rel=1e-6)
    same, _ = control_l1(loss, jnp.float32(0.3), jnp.float32(0.2), jnp.float32(16.0), jnp.float32(16.0))
    assert float(same) == pytest.approx(0.2)  # on target: λ returns to the integral state


def test_pi_controller_follows_a_fast_push_where_sign_overshoots():
    """A plant whose L0 falls with a lagged λ (L0 = d_t·(λ0/λ_eff)^0.7, λ_eff an EMA 0.9 of λ) while the
    fine-tune pushes L0 up 2% a step for 60 of 244 steps (×3.3): the sign rule at the window-sized rate
    (1.2%/step) cannot keep up and overshoots; the PI rule's speed grows with the error, so it stays
    closer and settles within 2% by mid-window."""
    from jaxsae.train.finetune import control_l1
    from jaxsae.train.kl_phase import CONTROLLER_RANGE, PI_INTEGRAL_GAIN

    steps, target, lam0 = 244, 16.0, 0.2
    rules = {"sign": KLLoss(l1_controller=True, l1_control="sign", l1_rate=CONTROLLER_RANGE ** (1 / steps) - 1),
             "pi": KLLoss(l1_controller=True, l1_control="pi", l1_rate=PI_INTEGRAL_GAIN,
                          l1_gain=FinetuneCfg().l1_gain)}
    errs = {}
    for name, loss in rules.items():
        lam, base, eff, errs[name] = jnp.float32(lam0), jnp.float32(lam0), lam0, []
        for t in range(steps):
            eff = 0.9 * eff + 0.1 * float(lam)
            l0 = target * 1.02 ** min(t, 60) * (lam0 / eff) ** 0.7
            errs[name].append(abs(l0 / target - 1))
            lam, base = control_l1(loss, lam, base, jnp.float32(l0), jnp.float32(target))
    assert max(errs["sign"]) > 2 * max(errs["pi"])
    assert max(errs["pi"][122:]) < 0.02


def test_relu_l1_controller_holds_l0(lm):
    sae_cfg, sae_module, params = _sae("relu")
    tx, sched = _ft_opt(1e-4, 10, sae_cfg)
    step = make_finetune_step(Splice(lm, LAYER, SCALE), sae_cfg, tx, sched, KLLoss(l1_controller=True))
    for target, direction in ((0.0, 1.001), (1e9, 0.999)):  # L0 above target -> raise λ; below -> lower it
        state = init_ft_state(jax.tree.map(jnp.copy, params), tx, sae_cfg, np.zeros(64, np.int32), 0.3, target, 0)
        state, m = step(state, lm.params, _tokens(4))
        assert float(state["l1"]) == pytest.approx(0.3 * direction, rel=1e-6)
        assert float(m["train/l1_coeff"]) == pytest.approx(0.3)


def test_l1_controller_reads_the_probe_not_the_batch(lm):
    from jaxsae.train.finetune import probe_l0

    sae_cfg, sae_module, params = _sae("relu")
    tx, sched = _ft_opt(1e-4, 10, sae_cfg)
    step = make_finetune_step(Splice(lm, LAYER, SCALE), sae_cfg, tx, sched, KLLoss(l1_controller=True), probe=True)
    # batch 0 of the probe fires nothing (x = b_dec = 0, b_enc = 0 at init), batch 1 fires many latents
    rng = np.random.default_rng(3)
    probe = jnp.asarray(np.stack([np.zeros((36, 32)), 5.0 * rng.standard_normal((36, 32))]), jnp.float32)
    loud = float(probe_l0(sae_cfg, params, probe, jnp.int32(1)))
    assert float(probe_l0(sae_cfg, params, probe, jnp.int32(0))) == 0.0 and loud > 5.0
    targets = np.float32([0.5, 2 * loud])  # each probe batch is held at its own starting L0
    state = init_ft_state(jax.tree.map(jnp.copy, params), tx, sae_cfg, np.zeros(64, np.int32), 0.3, targets, 0,
                          probe_batches=2)
    rate, lam, sides = KLLoss().l1_rate, 0.3, set()
    for s in range(4):  # the probe's batches in turn
        before = jax.tree.map(jnp.copy, state["params"])
        state, m = step(state, lm.params, _tokens(4), probe)
        want, target = float(probe_l0(sae_cfg, before, probe, jnp.int32(s))), float(targets[s % 2])
        assert float(m["train/l0_probe"]) == pytest.approx(want, rel=1e-6)
        assert float(m["train/l0_target"]) == pytest.approx(target)
        lam *= (1 + rate) if want > target else (1 - rate)  # λ follows the probe batch against its own L0 ...
        assert float(state["l1"]) == pytest.approx(lam, rel=1e-5)
        sides.add((want > target, float(m["train/l0"]) > target))
    assert any(p != b for p, b in sides)  # ... where the batch's own L0 would have moved it the other way
