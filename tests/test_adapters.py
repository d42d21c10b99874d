"""Adapters around a frozen SAE on the fused step: zero-init starts at the base model, only the adapter
trains, gradients through `compose` are the fine-tune's by the chain rule, LoRA merges equal the
explicit low-rank forward, and evaluation with an adapter equals a hand-written spliced forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import config as C
from jaxsae.eval import evaluate, next_token_ce
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, init_sae, make_sae
from jaxsae.train.adapters import identity_composition, lora_merge, make_adapter
from jaxsae.config import FinetuneCfg
from jaxsae.splice import Splice, position_mask
from jaxsae.train.finetune import KLLoss, init_ft_state, kl_mse_loss, make_finetune_step
from jaxsae.train.optim import optimizer
from jaxsae.validate import check_against_model

LAYER, SCALE, D = 1, 1.7, 32
KINDS = [("lm_lora", 4, "all"), ("lm_lora", 4, "after"), ("sae_lora", 2, "all"), ("output", 4, "all"),
         ("output", 0, "all"), ("output_mlp", 4, "all")]


@pytest.fixture(scope="module")
def lm():
    cfg = GPTNeoXConfig(vocab_size=97, d_model=D, n_layers=3, n_heads=4, d_mlp=64, rotary_pct=0.5)
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, init_params(cfg, jax.random.PRNGKey(0)))
    return LM(cfg, params)


@pytest.fixture(scope="module")
def sae():
    cfg = SAEConfig(kind="topk", d_model=D, d_sae=64, k=6).validate()
    return cfg, make_sae(cfg), init_sae(cfg, jax.random.PRNGKey(1))


def _tokens(seed=0, b=3, t=12):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 97, (b, t)), jnp.int32)


def _adapter(lm, kind, rank, lm_layers="all"):
    return make_adapter(kind, rank, D, LAYER, lm.n_layers, lm_layers)


def _loss(lm, sae, trainable, tokens, compose=None, frozen=None, kl_only=False):
    sae_cfg, module, _ = sae
    return kl_mse_loss(Splice(lm, LAYER, SCALE), lm.params, sae_cfg, trainable, tokens, KLLoss(kl_only=kl_only),
                       dead=None, l1_coeff=None, compose=compose, frozen=frozen)


def _nonzero(trainable, seed=7):
    """Fills the zero-initialised factors (B, U) with random values, so the adapter does something."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape) if not jnp.any(x) else x
                                     for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("kind,rank,lm_layers", KINDS)
def test_zero_init_starts_at_the_base_model(lm, sae, kind, rank, lm_layers):
    _, _, params = sae
    ad = _adapter(lm, kind, rank, lm_layers)
    trainable, axes = ad.init(jax.random.PRNGKey(3), params, lm.params, lm.param_axes())
    assert jax.tree.structure(trainable) == jax.tree.structure(axes, is_leaf=lambda a: isinstance(a, tuple))
    tokens = _tokens()
    base_loss, base = _loss(lm, sae, params, tokens)
    loss, got = _loss(lm, sae, trainable, tokens, compose=ad, frozen=params, kl_only=ad.kl_only)
    np.testing.assert_allclose(got["kl"], base["kl"], rtol=1e-6)
    np.testing.assert_allclose(got["mse"], base["mse"], rtol=1e-6)
    np.testing.assert_allclose(loss, base["kl"] if ad.kl_only else base_loss, rtol=1e-6)
    # the gradient reaches the zero-initialised factor (it is not a dead end)
    g = jax.grad(lambda t: _loss(lm, sae, t, tokens, compose=ad, frozen=params, kl_only=ad.kl_only)[0])(trainable)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 0


@pytest.mark.parametrize("kind,rank,lm_layers", KINDS)
def test_step_trains_only_the_adapter(lm, sae, kind, rank, lm_layers):
    sae_cfg, module, params = sae
    ad = _adapter(lm, kind, rank, lm_layers)
    trainable, _ = ad.init(jax.random.PRNGKey(3), params, lm.params, lm.param_axes())
    tx, sched = optimizer(FinetuneCfg(lr=1e-2), 10, None)
    state = init_ft_state(trainable, tx, sae_cfg, np.zeros(64, np.int32), 0.0, 6.0, 0,
                          frozen=jax.tree.map(jnp.copy, params))
    before = jax.tree.map(np.array, trainable)
    lm_before = jax.tree.map(np.array, lm.params)
    step = make_finetune_step(Splice(lm, LAYER, SCALE), sae_cfg, tx, sched, compose=ad)
    for i in range(2):
        state, m = step(state, lm.params, _tokens(i))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), jax.tree.map(np.array, state["frozen"]))
    jax.tree.map(np.testing.assert_array_equal, lm_before, jax.tree.map(np.array, lm.params))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state["params"])
    assert all(jax.tree.leaves(changed))
    assert np.isfinite(float(m["train/kl"]))
    if ad.kl_only:
        np.testing.assert_allclose(float(m["train/loss"]), float(m["train/kl"]), rtol=1e-6)


def test_generic_gradient_with_trainable_sae_equals_the_finetune(lm, sae):
    """trainable = SAE params through an explicit identity compose gives the fine-tune's gradient; and for a
    zero-B SAE LoRA the chain rule holds: dL/dB = (α/r)·Aᵀ·dL/dW for encoder and decoder (α = 32, the
    reference's PEFT setting)."""
    _, _, params = sae
    tokens = _tokens(2)
    ref = jax.grad(lambda p: _loss(lm, sae, p, tokens)[0])(params)
    generic = jax.grad(lambda p: _loss(lm, sae, p, tokens, compose=lambda t, f, lp, rng=None: identity_composition(t, lp))[0])(
        params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), ref, generic)
    ad = _adapter(lm, "sae_lora", 3)
    assert ad.alpha == 32.0
    trainable, _ = ad.init(jax.random.PRNGKey(4), params)
    g = jax.grad(lambda t: _loss(lm, sae, t, tokens, compose=ad, frozen=params)[0])(trainable)
    for w in ("W_enc", "W_dec"):
        want = (ad.alpha / ad.rank) * (trainable[w]["A"].T @ ref[w])
        np.testing.assert_allclose(g[w]["B"], want, rtol=2e-4, atol=1e-6 * float(jnp.abs(want).max()), err_msg=w)


def test_sae_lora_dropout(lm, sae):
    """PEFT's lora_dropout: in a training step the LoRA branches see their inputs (x - b_dec for W_enc, the
    codes f for W_dec) with entries dropped and rescaled, a fresh mask per token; without an rng (evaluation)
    the factors merge, so rate 0 and evaluation equal the merged SAE; the mean over masks is the merged
    branch (the rescaling keeps it unbiased)."""
    from jaxsae.sae.base import lora_delta

    sae_cfg, module, params = sae
    ad = make_adapter("sae_lora", 3, D, LAYER, lm.n_layers, dropout=0.5)
    trainable = _nonzero(ad.init(jax.random.PRNGKey(4), params)[0])
    x = jax.random.normal(jax.random.PRNGKey(8), (40, D))
    rng = jax.random.PRNGKey(9)
    merged = ad(trainable, params, lm.params)  # no rng: merged weights
    assert merged.sae_lora is None
    want_eval, _ = module.apply({"params": merged.sae_params}, x)
    comp = ad(trainable, params, lm.params, rng=rng)
    got, out = module.apply({"params": comp.sae_params}, x, lora=comp.sae_lora)
    # by hand: the same masks, drawn per weight from the step's key
    scale = ad.alpha / ad.rank

    def dropped(name, inp):
        keep = jax.random.bernoulli(jax.random.fold_in(rng, 0 if name == "W_enc" else 1), 0.5, inp.shape)
        return jnp.where(keep, 2.0 * inp, 0.0)

    xc = x - params["b_dec"]
    pre = xc @ params["W_enc"] + scale * (dropped("W_enc", xc) @ trainable["W_enc"]["A"]) @ trainable["W_enc"]["B"]
    np.testing.assert_allclose(out.pre, pre + params["b_enc"], rtol=2e-5, atol=2e-5)
    f = out.f
    x_hat = f @ params["W_dec"] + scale * (dropped("W_dec", f) @ trainable["W_dec"]["A"]) @ trainable["W_dec"]["B"]
    np.testing.assert_allclose(got, x_hat + params["b_dec"], rtol=2e-5, atol=2e-5)
    assert not np.allclose(got, want_eval, atol=1e-3)  # the dropout did something
    # unbiased: over many masks the branch averages to the merged one
    lora = {"factors": trainable, "scale": scale, "dropout": 0.5}
    mean = jnp.mean(jax.vmap(lambda k: lora_delta({**lora, "rng": k}, "W_enc", xc))(
        jax.random.split(jax.random.PRNGKey(10), 4000)), axis=0)
    full = scale * (xc @ trainable["W_enc"]["A"]) @ trainable["W_enc"]["B"]
    np.testing.assert_allclose(mean, full, atol=0.1 * float(jnp.abs(full).max()))
    # rate 0 takes the merged path even in a training step
    assert make_adapter("sae_lora", 3, D, LAYER, lm.n_layers)(trainable, params, lm.params, rng=rng).sae_lora is None
    # a training step with dropout runs and moves only the adapter
    tx, sched = optimizer(FinetuneCfg(lr=1e-2), 10, None)
    state = init_ft_state(trainable, tx, sae_cfg, np.zeros(64, np.int32), 0.0, 6.0, 0,
                          frozen=jax.tree.map(jnp.copy, params))  # the step donates its state
    state, m = make_finetune_step(Splice(lm, LAYER, SCALE), sae_cfg, tx, sched, compose=ad)(
        state, lm.params, _tokens(3))
    assert np.isfinite(float(m["train/loss"]))


def test_lora_merge_equals_explicit_low_rank_forward(lm):
    ad = _adapter(lm, "lm_lora", 4)
    trainable, axes = ad.init(jax.random.PRNGKey(5), None, lm.params, lm.param_axes())
    trainable = _nonzero(trainable)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 5, D))
    att = lm.params["layers_1"]["attention"]
    ab = trainable["layers_1"]["attention"]
    # q: [D] -> [heads, head_dim]
    got = jnp.einsum("btD,Dhd->bthd", x, lora_merge(att["q_kernel"], ab["q_kernel"], 1.0))
    want = (jnp.einsum("btD,Dhd->bthd", x, att["q_kernel"])
            + jnp.einsum("btr,rhd->bthd", x @ ab["q_kernel"]["A"], ab["q_kernel"]["B"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # o: [heads, head_dim] -> [D]
    o = jax.random.normal(jax.random.PRNGKey(8), (2, 5, 4, 8))
    got = jnp.einsum("bthd,hdD->btD", o, lora_merge(att["o_kernel"], ab["o_kernel"], 1.0))
    want = (jnp.einsum("bthd,hdD->btD", o, att["o_kernel"])
            + jnp.einsum("bthd,hdr,rD->btD", o, ab["o_kernel"]["A"], ab["o_kernel"]["B"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert axes["layers_1"]["mlp"]["down_kernel"] == {"A": ("mlp", "lora_rank"), "B": ("lora_rank", "embed")}
    # every attention and MLP kernel of every block is adapted; nothing else changes
    comp = ad(trainable, None, lm.params)
    assert comp.rerun_prefix
    flat0 = jax.tree_util.tree_flatten_with_path(lm.params)[0]
    flat1 = jax.tree.leaves(comp.lm_params)
    n_changed = sum(not np.array_equal(a, b) for (_, a), b in zip(flat0, flat1))
    assert n_changed == 3 * 6  # q, k, v, o, up, down in 3 blocks
    after = _adapter(lm, "lm_lora", 4, "after")
    t_after, _ = after.init(jax.random.PRNGKey(5), None, lm.params, lm.param_axes())
    assert set(t_after) == {"layers_2"} and not after(t_after, None, lm.params).rerun_prefix


@pytest.mark.parametrize("kind,rank,lm_layers", [("output_mlp", 4, "all"), ("lm_lora", 4, "all"), ("sae_lora", 2, "all")])
def test_evaluate_with_adapter_equals_manual(lm, sae, kind, rank, lm_layers):
    _, module, params = sae
    ad = _adapter(lm, kind, rank, lm_layers)
    trainable = _nonzero(ad.init(jax.random.PRNGKey(3), params, lm.params, lm.param_axes())[0])
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(9), (4, 10), 0, 97), np.int32)
    m = evaluate(Splice(lm, LAYER, SCALE), sae[0], params, tokens, batch=2, compose=ad, trainable=trainable)
    # by hand: adapted LM, adapted SAE, output map, then the original LM for the clean CE
    mask = position_mask(tokens.shape, False)
    lm_p, sae_p = lm.params, params
    if kind == "lm_lora":
        lm_p = jax.tree.map(lambda w: w, lm.params)
        for lname, mods in trainable.items():
            for mod, ws in mods.items():
                for w, ab in ws.items():
                    lm_p[lname] = {**lm_p[lname], mod: {**lm_p[lname][mod], w: lm_p[lname][mod][w] + jnp.tensordot(
                        ab["A"], ab["B"], axes=1)}}
    if kind == "sae_lora":
        sae_p = {**params, **{w: params[w] + ad.alpha / ad.rank * trainable[w]["A"] @ trainable[w]["B"]
                              for w in trainable}}
    x = lm.prefix(tokens, LAYER, params=lm_p)
    x_hat = module.apply({"params": sae_p}, x / SCALE)[0]
    if kind == "output_mlp":
        x_hat = x_hat + jax.nn.relu(x_hat @ trainable["D"]) @ trainable["U"]
    spliced = jnp.where(mask[..., None], x_hat * SCALE, x)
    ce_s, n = next_token_ce(lm.suffix(spliced, LAYER, params=lm_p), tokens, mask)
    ce_c, _ = next_token_ce(lm.forward(tokens), tokens, mask)
    np.testing.assert_allclose(m["ce_spliced"], float(ce_s / n), rtol=1e-5)
    np.testing.assert_allclose(m["ce_clean"], float(ce_c / n), rtol=1e-5)
    base = evaluate(Splice(lm, LAYER, SCALE), sae[0], params, tokens, batch=2)
    assert m["ce_clean"] == pytest.approx(base["ce_clean"]) and m["ce_zero"] == pytest.approx(base["ce_zero"])
    assert m["ce_spliced"] != pytest.approx(base["ce_spliced"], rel=1e-6)


@pytest.mark.parametrize("override,needle", [
    (["adapter.kind=prefix"], "adapter.kind='prefix': choose one of"),
    (["adapter.lm_layers=some"], "adapter.lm_layers='some'"),
    (["adapter.loss=ce"], "adapter.loss='ce'"),
    (["adapter.rank=-1"], "adapter.rank=-1"),
    (["adapter.tokens=10"], "adapter.tokens=10 is less than one batch"),
    (["phases=[adapter]"], "list it before adapter"),
    (["adapter.rank_x=2"], "unknown config key adapter.rank_x"),
    (["adapter.kind=sae_lora", "adapter.dropout=1.0"], "adapter.dropout=1.0 must be in [0, 1)"),
    (["adapter.kind=output", "adapter.dropout=0.1"], "applies to adapter.kind=sae_lora only"),
    (["adapter.schedule=cosine"], "adapter.schedule='cosine'"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(C.ConfigError, match=None) as e:
        C.load_config(None, ["phases=[mse, adapter]", *override])
    assert needle in str(e.value)


def test_rank_over_d_model_is_a_config_error():
    cfg = C.load_config(None, ["phases=[mse, adapter]", "adapter.rank=200"])
    with pytest.raises(C.ConfigError, match="adapter.rank=200 is over d_model=128"):
        check_against_model(cfg, 4, 128)
    check_against_model(C.load_config(None, ["phases=[mse, adapter]", "adapter.rank=0"]), 4, 128)


@pytest.mark.slow
def test_adapter_phase_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-way through the adapter phase resumes from its checkpoint to the same adapter and
    evaluation as an uninterrupted run (tiny shipped-model run: store, MSE SAE, 8 adapter steps)."""
    from jaxsae.checkpoint import Checkpointer
    from jaxsae.train import loop as L
    from jaxsae.train.pipeline import run

    cfg = C.load_config(None, [
        "phases=[mse, adapter]", "hook.layer=2", "data.context=32", "store.tokens=8192", "store.batch_contexts=16",
        "sae.d_sae=256", "sae.k=8", "mse.tokens=8192", "mse.batch_size=512", "mse.warmup_steps=2",
        "adapter.kind=output_mlp", "adapter.rank=8", "adapter.tokens=2048", "adapter.lr=1e-2",
        "checkpoint.every_steps=4", "eval.sequences=8"])
    whole = run(cfg, tmp_path / "whole")

    after_step = L.PhaseLoop.after_step

    def killed_at_6(self, step, *a):
        after_step(self, step, *a)
        if self.phase == "adapter" and step == 6:
            self.ckpt.wait()
            raise KeyboardInterrupt

    monkeypatch.setattr(L.PhaseLoop, "after_step", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(L.PhaseLoop, "after_step", after_step)
    resumed = run(cfg, tmp_path / "resumed")
    assert resumed["adapter"]["ce_spliced"] == whole["adapter"]["ce_spliced"]
    a, _ = Checkpointer(tmp_path / "whole" / "checkpoints" / "adapter").restore_raw(8)
    b, _ = Checkpointer(tmp_path / "resumed" / "checkpoints" / "adapter").restore_raw(8)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.any(np.asarray(a["params"]["U"]) == 0) and "frozen" in a


@pytest.mark.parametrize("kind,constant", [("output", True), ("output_mlp", True), ("sae_lora", False),
                                           ("lm_lora", False)])
def test_adapter_lr_schedule_default(kind, constant):
    """The reference trains its output adapters at a constant lr and the LoRAs with the fine-tune's linear
    decay; `adapter.schedule` overrides either."""
    from jaxsae.train.optim import schedule

    cfg = C.load_config(None, ["phases=[mse, adapter]", f"adapter.kind={kind}", "adapter.lr=1e-3"])
    assert float(schedule(cfg.adapter, 100)(75)) == pytest.approx(1e-3 if constant else 0.25e-3)
    other = "linear" if constant else "constant"
    cfg = C.load_config(None, ["phases=[mse, adapter]", f"adapter.kind={kind}", "adapter.lr=1e-3",
                               f"adapter.schedule={other}"])
    assert float(schedule(cfg.adapter, 100)(75)) == pytest.approx(0.25e-3 if constant else 1e-3)
