"""Where jaxsae follows the paper's reference code and SAEBench: the position conventions, the metrics
SAEBench reports beside ours, the fine-tune without AuxK, the L1 controller's rate, and seed summaries."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import config as C
from jaxsae import phases as P
from jaxsae.eval import evaluate
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, init_sae
from jaxsae.splice import Splice, splice
from jaxsae.train.adapters import identity_composition
from jaxsae.train.finetune import KLLoss, init_ft_state, make_finetune_step
from jaxsae.train.kl_phase import CONTROLLER_RANGE, PI_INTEGRAL_GAIN, loss_of
from jaxsae.train.optim import optimizer

LAYER, SCALE, V = 1, 1.3, 61


@pytest.fixture(scope="module")
def lm():
    cfg = GPTNeoXConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, d_mlp=64, rotary_pct=0.5)
    return LM(cfg, init_params(cfg, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def sae():
    cfg = SAEConfig(kind="topk", d_model=32, d_sae=64, k=4, dead_tokens_threshold=1).validate()
    return cfg, init_sae(cfg, jax.random.PRNGKey(1))


def _tokens(seed=0, b=4, t=10):
    return np.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), np.int32)


def test_special_tokens_are_neither_spliced_nor_counted(lm, sae):
    cfg, params = sae
    tokens = _tokens()
    tokens[:, 3] = 7  # an "EOS" in every row
    sp = Splice(lm, LAYER, SCALE, include_first=True, exclude_ids=(7,))
    s = splice(sp, lm.params, jnp.asarray(tokens), lambda p, xn: (xn * 0.5, None), identity_composition(params, lm.params))
    assert not bool(s.mask[:, 3].any()) and bool(s.mask[:, 0].all())
    np.testing.assert_array_equal(np.asarray(s.spliced[:, 3]), np.asarray(s.x[:, 3]))  # left as it was
    ev_all = evaluate(Splice(lm, LAYER, SCALE, True), cfg, params, tokens, batch=2)
    ev_ex = evaluate(sp, cfg, params, tokens, batch=2)
    assert ev_ex["eval_tokens"] == ev_all["eval_tokens"] - len(tokens)


def test_explained_variance_and_zero_ablation_everywhere_as_saebench(lm, sae):
    cfg, params = sae
    tokens = _tokens(1)
    sp = Splice(lm, LAYER, SCALE, include_first=False)
    m = evaluate(sp, cfg, params, tokens, batch=len(tokens))  # one batch: SAELens' batch mean is this one
    from jaxsae.sae import make_sae

    x = np.asarray(lm.prefix(jnp.asarray(tokens), LAYER), np.float64)[:, 1:].reshape(-1, 32)
    x_hat = np.asarray(make_sae(cfg).apply({"params": params}, jnp.asarray(x / SCALE, jnp.float32), train=False)[0],
                       np.float64) * SCALE
    ev = np.mean(1 - ((x - x_hat) ** 2).sum(-1) / ((x - x.mean(0)) ** 2).sum(-1))
    assert m["explained_variance"] == pytest.approx(ev, rel=1e-4)
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fve"] == pytest.approx(fve, rel=1e-4) and m["fve"] != pytest.approx(ev, rel=1e-6)
    # zero-ablation at every position (position 0 too) hurts differently from the counted positions only
    logits = lm.suffix(jnp.zeros((len(tokens), tokens.shape[1], 32)), LAYER)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    ce_all = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)))
    assert m["ce_zero_all"] == pytest.approx(ce_all, rel=1e-5) and m["ce_zero_all"] != pytest.approx(m["ce_zero"])
    same = evaluate(Splice(lm, LAYER, SCALE, include_first=True), cfg, params, tokens, batch=2)
    assert same["ce_zero_all"] == pytest.approx(same["ce_zero"])


def test_the_finetune_has_no_auxk_by_default(lm, sae):
    cfg, params = sae
    assert C.RunConfig().finetune.auxk is False and C.RunConfig().e2e.auxk is True
    tx, sched = optimizer(C.FinetuneCfg(lr=1e-3), 5, cfg)
    dead = np.full(cfg.d_sae, 10, np.int32)  # every latent dead: AuxK would be on
    for auxk in (False, True):
        step = make_finetune_step(Splice(lm, LAYER, SCALE), cfg, tx, sched, KLLoss(auxk=auxk))
        state = init_ft_state(jax.tree.map(jnp.copy, params), tx, cfg, dead, 0.0, 4.0, 0)
        _, m = step(state, lm.params, jnp.asarray(_tokens(2)))
        assert (float(m["train/auxk"]) > 0) == auxk


def test_controller_rate_is_sized_to_the_window():
    cfg = C.load_config(None, ["phases=[mse, finetune]", "sae.kind=relu", "sae.l1_coeff=0.1"])
    sae_cfg = dataclasses.replace(cfg.sae, d_model=32).validate()
    phase = P.get("finetune")
    for steps in (244, 3000):
        loss = loss_of(cfg, phase, sae_cfg, True, True, steps)
        assert loss.l1_controller and (1 + loss.l1_rate) ** steps == pytest.approx(CONTROLLER_RANGE, rel=1e-6)
    assert loss.l1_rate == pytest.approx(0.001, rel=0.01)  # the reference's 0.1% at its ~3,000 steps
    fixed = C.load_config(None, ["phases=[mse, finetune]", "sae.kind=relu", "finetune.l1_rate=0.01"])
    assert loss_of(fixed, phase, sae_cfg, True, True, 244).l1_rate == 0.01
    assert not loss_of(cfg, phase, sae_cfg, True, False, 244).l1_controller  # a fresh SAE: nothing to hold
    assert loss.l1_control == "sign"  # the reference's rule by default
    pi = C.load_config(None, ["phases=[mse, finetune]", "sae.kind=relu", "finetune.l1_control=pi"])
    loss = loss_of(pi, phase, sae_cfg, True, True, 244)
    assert (loss.l1_control, loss.l1_rate, loss.l1_gain) == ("pi", PI_INTEGRAL_GAIN, 0.5)


def test_seed_summary_gives_mean_and_sd(tmp_path):
    from jaxsae.report import seeds_markdown

    runs = []
    for i, (gap_mse, gap_ctl, gap_ft) in enumerate([(0.10, 0.09, 0.07), (0.12, 0.11, 0.08)]):
        d = tmp_path / f"s{i}"
        d.mkdir()
        ev = {p: {"ce_gap": g, "fve": 0.9, "explained_variance": 0.8, "l0": 16.0, "kl": 0.1}
              for p, g in (("mse", gap_mse), ("control", gap_ctl), ("finetune", gap_ft))}
        (d / "eval.json").write_text(json.dumps(ev))
        runs.append(d)
    md = seeds_markdown(runs)
    assert "| mse | 0.1100 ± 0.0141 |" in md
    # finetune closes 30% and 33.3%; control 10% and 8.3%: net 20% and 25%
    assert "finetune | 0.0750 ± 0.0071" in md and "22.5000 ± 3.5355 %" in md
    # the same runs as sweeps of two members (phase -> name -> metrics): one table per member, the member
    # "k16" carrying these numbers and "k8" others
    for i, d in enumerate(runs):
        ev = json.loads((d / "eval.json").read_text())
        other = {p: {**m, "ce_gap": 2 * m["ce_gap"]} for p, m in ev.items()}
        (d / "eval.json").write_text(json.dumps({p: {"k8": other[p], "k16": ev[p]} for p in ev}))
    swept = seeds_markdown(runs)
    k16 = swept[swept.index("SAE k16"):]
    assert "| mse | 0.1100 ± 0.0141 |" in k16 and "22.5000 ± 3.5355 %" in k16
    assert "| mse | 0.2200 ± 0.0283 |" in swept[swept.index("SAE k8"):swept.index("SAE k16")]


def test_l0_probe_settings():
    from jaxsae.train.kl_phase import uses_probe
    from jaxsae.validate import check_static

    base = ["phases=[mse, control, finetune]", "sae.kind=relu", "finetune.batch_sequences=4"]
    cfg = C.load_config(None, base + ["finetune.l0_probe_sequences=8"])
    check_static(cfg)
    sae_cfg = dataclasses.replace(cfg.sae, d_model=32).validate()
    for name in ("control", "finetune"):
        assert uses_probe(cfg, P.get(name), loss_of(cfg, P.get(name), sae_cfg, True, True, 10))
    assert not uses_probe(cfg, P.get("finetune"), loss_of(cfg, P.get("finetune"), sae_cfg, True, False, 10))
    off = C.load_config(None, base)
    assert not uses_probe(off, P.get("finetune"), loss_of(off, P.get("finetune"), sae_cfg, True, True, 10))
    for extra, msg in ((["finetune.l0_probe_sequences=6"], "positive multiple of finetune.batch_sequences (4)"),
                       (["finetune.l0_probe_sequences=8", "sae.kind=topk"], "set it to 0"),
                       (["finetune.l0_probe_sequences=8", "finetune.l1_controller=false"], "set it to 0")):
        with pytest.raises(C.ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            check_static(C.load_config(None, base + extra))


def _relu_probe_args(model, run_dir):
    from conftest import tiny_args

    return tiny_args(model, run_dir, "--set", "phases=[mse, finetune]", "--set", "sae.kind=relu",
                     "--set", "sae.l1_coeff=0.05", "--set", "sae.l1_warmup_steps=5", "--set", "mse.tokens=5120",
                     "--set", "checkpoint.every_steps=5", "--set", "finetune.l0_probe_sequences=12",
                     "--set", "finetune.l0_probe_source=eval")


@pytest.fixture(scope="module")
def relu_probe_run(tiny_model, tmp_path_factory):
    """A tiny ReLU run whose fine-tune's L1 controller reads the probe (read-only)."""
    from conftest import run_cmd

    run_dir = tmp_path_factory.mktemp("relu") / "probe"
    r = run_cmd(_relu_probe_args(tiny_model, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_relu_run_holds_each_probe_batch_at_its_own_l0(relu_probe_run):
    """Every fine-tune step logs its probe batch's L0 against that batch's own starting L0 (cycling
    through the probe); the store records where the window's text starts, and a probe of validation text
    (l0_probe_source=eval; data.source's probe: test_positions) leaves the window there."""
    run_dir = relu_probe_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ft = [m for m in rows if m.get("phase") == "finetune" and "train/l0_probe" in m]
    assert ft, "the fine-tune logged no probe L0"
    targets = {round(m["train/l0_target"], 5) for m in ft}
    assert len(targets) > 1  # three probe batches, each with its own target
    assert all(m["train/l0_probe"] > 0 for m in ft)
    meta = json.loads((run_dir / "store" / "meta.json").read_text())
    assert "stream_position" in meta
    from jaxsae.checkpoint import Checkpointer

    window = Checkpointer(run_dir / "checkpoints" / "finetune").restore_meta()["window_starts"]
    assert window[0] == meta["stream_position"]


def test_relu_probe_run_resumes_bit_identically_after_kill(tiny_model, relu_probe_run, tmp_path):
    """SIGKILL mid-fine-tune, then the same command: the SAE, λ and the probe's targets equal the
    uninterrupted run's bit for bit."""
    import jaxsae
    from conftest import kill_mid_phase, run_cmd

    run_dir = tmp_path / "killed"
    args = _relu_probe_args(tiny_model, run_dir)
    steps = kill_mid_phase(args, run_dir, phase="finetune", after_step=10)
    assert steps and steps[-1] < 24, steps  # really interrupted
    r = run_cmd(args)
    assert r.returncode == 0, r.stderr[-3000:]
    a = jaxsae.load_sae(relu_probe_run / "checkpoints" / "finetune")
    b = jaxsae.load_sae(run_dir / "checkpoints" / "finetune")
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    rows = {p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
            for p in (relu_probe_run, run_dir)}
    last = [[m for m in rows[p] if m.get("phase") == "finetune"][-1] for p in rows]
    assert {k: v for k, v in last[0].items() if not k.startswith("perf/")} == \
        {k: v for k, v in last[1].items() if not k.startswith("perf/")}
