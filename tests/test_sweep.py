"""Sweeps (`jaxsae.sweep`): N SAEs as one vmapped program equal N independent single runs step for step
(TopK and ReLU; MSE and fused steps; k, lr, L1 coefficient and KL share varying), the shared forward is
really shared (XLA's FLOP count), a whole sweep run equals the single run of its member and resumes
bit-identically after SIGKILL, and bad sweep configs fail before any compute."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices, kill_mid_phase, run_cmd, tiny_args

import jaxsae
from jaxsae.config import ConfigError, FinetuneCfg, MSECfg, load_config
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, init_sae
from jaxsae.splice import Splice
from jaxsae.sweep import member_config, members, width_groups
from jaxsae.train.finetune import KLLoss, init_ft_state, make_finetune_step
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer

STEPS = 3


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _close(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _members(kind):
    """Each member's (k, l1_coeff, lr, kl_share): k varies for TopK, the L1 coefficient for ReLU.
    topk3: k 3, 6, 3, so that the members sharing k=3 (not adjacent) run as one vmapped group and k=6 as a
    group of one, and the program puts them back in member order."""
    if kind == "topk":
        return [(3, 0.0, 1e-3, 0.5), (6, 0.0, 3e-3, 0.3)]
    if kind == "topk3":
        return [(3, 0.0, 1e-3, 0.5), (6, 0.0, 3e-3, 0.3), (3, 0.0, 2e-3, 0.4)]
    return [(6, 0.1, 1e-3, 0.5), (6, 0.3, 3e-3, 0.3)]


def _cfgs(kind):
    base = SAEConfig(kind=kind.rstrip("3"), d_model=16, d_sae=32, k=6, l1_coeff=0.2,
                     dead_tokens_threshold=64).validate()
    return base, [dataclasses.replace(base, k=k, l1_coeff=l1) for k, l1, _, _ in _members(kind)]


def _hp(kind):
    cols = list(zip(*_members(kind)))
    return {"k": np.array(cols[0], np.int32), "l1_coeff": np.array(cols[1], np.float32),
            "lr": np.array(cols[2], np.float32), "kl_share": np.array(cols[3], np.float32)}


@pytest.mark.parametrize("kind", ["topk", "topk3", "relu"])
def test_mse_sweep_equals_independent_steps(kind):
    base, cfgs = _cfgs(kind)
    pc = MSECfg(warmup_steps=2, decay_fraction=0.5)
    xs = [jnp.asarray(np.random.default_rng(i).normal(size=(64, 16)), jnp.float32) for i in range(STEPS)]
    singles, states = [], []
    for i, (cfg, (_, _, lr, _)) in enumerate(zip(cfgs, _members(kind))):
        tx, sched = optimizer(dataclasses.replace(pc, lr=lr), STEPS, cfg)
        states.append(init_state(init_sae(cfg, jax.random.PRNGKey(i), xs[0]), tx, cfg, i))
        singles.append(make_mse_step(cfg, tx, sched))
    tx, sched = optimizer(pc, STEPS, base)
    swept = make_mse_step(base, tx, sched, sweep=(_hp(kind), lambda lr: optimizer(dataclasses.replace(pc, lr=lr),
                                                                                 STEPS, base)))
    stacked = _stack(states)
    for x in xs:
        outs = [s(st, x) for s, st in zip(singles, states)]
        states = [o[0] for o in outs]
        stacked, m = swept(stacked, x)
        _close(stacked, _stack(states), "state")
        _close(m, _stack([o[1] for o in outs]), "metrics")
    assert np.all(np.asarray(m["train/l0"]) > 0)


@pytest.fixture(scope="module")
def lm():
    cfg = GPTNeoXConfig(vocab_size=97, d_model=16, n_layers=3, n_heads=4, d_mlp=32, rotary_pct=0.5)
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, init_params(cfg, jax.random.PRNGKey(0)))
    return LM(cfg, params)


def _tokens(i):
    return jnp.asarray(np.random.default_rng(i).integers(0, 97, (3, 10)), jnp.int32)


def _fused(lm, kind):
    """(single steps, their states, the sweep's step, its stacked state) for the fused KL+MSE step."""
    sp = Splice(lm, 1, 1.7)
    base, cfgs = _cfgs(kind)
    fc = FinetuneCfg()
    controller = kind == "relu"
    singles, states = [], []
    for i, (cfg, (_, l1, lr, share)) in enumerate(zip(cfgs, _members(kind))):
        tx, sched = optimizer(dataclasses.replace(fc, lr=lr), STEPS, cfg)
        params = init_sae(cfg, jax.random.PRNGKey(i))
        states.append(init_ft_state(params, tx, cfg, np.zeros(32, np.int32), l1, 3.0, 0))
        singles.append(make_finetune_step(sp, cfg, tx, sched, KLLoss(kl_share=share, l1_controller=controller)))
    tx, sched = optimizer(fc, STEPS, base)
    swept = make_finetune_step(sp, base, tx, sched, KLLoss(l1_controller=controller),
                               sweep=(_hp(kind), lambda lr: optimizer(dataclasses.replace(fc, lr=lr), STEPS, base)))
    return singles, states, swept, _stack(states)


@pytest.mark.parametrize("kind", ["topk", "topk3", "relu"])
def test_fused_sweep_equals_independent_steps(lm, kind):
    singles, states, swept, stacked = _fused(lm, kind)
    for i in range(STEPS):
        toks = _tokens(i)
        outs = [s(st, lm.params, toks) for s, st in zip(singles, states)]
        states = [o[0] for o in outs]
        stacked, m = swept(stacked, lm.params, toks)
        _close(stacked, _stack(states), "state")
        _close(m, _stack([o[1] for o in outs]), "metrics")
    assert np.all(np.isfinite(np.asarray(m["train/kl"])))


def test_shared_forward_costs_less_than_n_runs(lm):
    """XLA's FLOP count of the fused step for 2 SAEs is under 2x one SAE's: the prefix and the clean
    suffix are not repeated per SAE (the lowered programs' cost analysis: no compile needed)."""
    singles, states, swept, stacked = _fused(lm, "topk")
    toks = _tokens(0)

    def flops(step, state):
        cost = step.lower(state, lm.params, toks).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    one, two = flops(singles[0], states[0]), flops(swept, stacked)
    assert one < two < 2 * one, (one, two)


def test_sweep_config_names_and_errors():
    cfg = load_config(base={"sweep": {"sae.k": [8, 16], "mse": {"seed": [0, 1]}}})
    assert [m.name for m in members(cfg)] == ["k8-s0", "k8-s1", "k16-s0", "k16-s1"]
    m = member_config(cfg, members(cfg)[3])
    assert (m.sae.k, m.mse.seed, m.mse.data_seed, m.sweep) == (16, 1, 0, {})
    explicit = load_config(base={"sweep": {"members": [{"sae.k": 8}, {"sae.k": 32, "finetune.lr": 1e-3}]}})
    assert [m.name for m in members(explicit)] == ["k8", "k32-ftlr0.001"]
    assert width_groups(cfg) == []
    wide = load_config(base={"name": "w", "sae": {"d_sae": 128}, "checkpoint": {"dir": "gs://b/c"},
                             "sweep": {"sae.d_sae": [64, 256], "sae.k": [8, 16]}})
    groups = width_groups(wide)
    assert [w for w, _ in groups] == [64, 256]
    for w, g in groups:  # each width is a sweep of its own, its members keeping their names
        assert (g.name, g.sae.d_sae, g.checkpoint.dir) == (f"w-d{w}", w, f"gs://b/c/widths/d{w}")
        assert [m.name for m in members(g)] == [f"d{w}-k8", f"d{w}-k16"] and width_groups(g) == []
    bad = [({"sweep": {"sae.d_sae": [64, 4]}}, "sweep member d4: sae.k=32 exceeds sae.d_sae=4"),
           ({"sweep": {"sae.dtype": [1, 2]}}, "sweep key sae.dtype cannot vary"),
           ({"sweep": {"sae.k": 8}}, "must be a non-empty list"),
           ({"sae": {"kind": "relu"}, "sweep": {"sae.k": [8, 16]}}, "needs sae.kind topk or batchtopk"),
           ({"sweep": {"sae.k": [8, 5000]}}, "sweep member k5000: sae.k=5000 exceeds"),
           ({"sweep": {"sae.k": [8, 8]}}, "two members are both k8")]
    for tree, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            load_config(base=tree)


def _sweep_args(model, run_dir, widths: bool = False):
    # widths: a third member of another width, its own program in widths/d64 (the tiny run's d_sae is 128)
    sweep = "{members: [{sae.k: 4}, {sae.k: 8}, {sae.d_sae: 64, sae.k: 8}]}" if widths else "{sae.k: [4, 8]}"
    return tiny_args(model, run_dir, "--set", f"sweep={sweep}")


@pytest.fixture(scope="module")
def sweep_run(tiny_model, tmp_path_factory):
    """A sweep over k and width: k4 and k8 at the tiny run's d_sae 128 (one program, widths/d128), and
    d64-k8 (another, widths/d64)."""
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    r = run_cmd(_sweep_args(tiny_model, run_dir, widths=True))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_sweep_run_equals_its_members_single_run(finished_run, sweep_run, tmp_path):
    """Member k8 of the sweep is the tiny run (k=8) trained alone: same evaluation after every phase,
    same final SAE; the sweep's files name their members, and the run gathers its width groups."""
    single, swept = (json.loads((d / "eval.json").read_text()) for d in (finished_run, sweep_run))
    assert set(swept) == set(single) and all(list(v) == ["k4", "k8", "d64-k8"] for v in swept.values())
    for w, names in ((128, {"k4", "k8"}), (64, {"d64-k8"})):  # each width group is a sweep run of its own
        group = json.loads((sweep_run / "widths" / f"d{w}" / "eval.json").read_text())
        assert all(set(v) == names for v in group.values())
        assert all(group[p][n] == swept[p][n] for p in group for n in names)
    d64 = jaxsae.load_sae(sweep_run, "d64-k8")
    assert (d64.cfg.d_sae, d64.cfg.k, d64.params["W_enc"].shape[1]) == (64, 8, 64)
    for phase in single:
        for key in ("ce_spliced", "ce_gap", "fve", "l0", "kl"):
            assert swept[phase]["k8"][key] == pytest.approx(single[phase][key], rel=2e-4, abs=2e-5), (phase, key)
        assert swept[phase]["k4"]["l0"] <= 4.0 < swept[phase]["k8"]["l0"]
    a, b = jaxsae.load_sae(finished_run), jaxsae.load_sae(sweep_run, "k8")
    assert b.cfg.k == 8 and b.meta["sae_name"] == "k8"
    for k in a.params:
        np.testing.assert_allclose(np.asarray(b.params[k]), np.asarray(a.params[k]), rtol=2e-3, atol=2e-4, err_msg=k)
    with pytest.raises(ValueError, match=r"holds a sweep of 3 SAEs \(k4, k8, d64-k8\)"):
        jaxsae.load_sae(sweep_run)
    rows = [json.loads(line) for line in (sweep_run / "widths" / "d128" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("sae") for r in rows if r["phase"] == "finetune"} == {"k4", "k8"}
    from jaxsae.interop.__main__ import main as interop_main

    assert interop_main(["export", str(sweep_run), str(tmp_path / "out"), "--format", "saelens", "--sae", "all"]) == 0
    for name, k, d_sae in (("k4", 4, 128), ("k8", 8, 128), ("d64-k8", 8, 64)):
        exported = json.loads((tmp_path / "out" / name / "cfg.json").read_text())
        assert (exported["k"], exported["d_sae"]) == (k, d_sae)
    report = (sweep_run / "report.md").read_text()
    assert "| k4 |" in report and "| d64-k8 |" in report and "finetune − control" in report
    assert (sweep_run / "report.png").exists() and "one program per width" in report
    assert "| 128 | 4 | 1 |" in report and "| 64 | 8 | 1 |" in report
    assert "± 0.0%" not in report  # one SAE per width and k: no spread shown


def test_sweep_resumes_bit_identically_after_kill(tiny_model, sweep_run, tmp_path):
    """SIGKILL mid-MSE, then the same command (its MSE phase alone): every member's SAE equals the
    uninterrupted sweep's, bit for bit, and metrics.jsonl has each member's step once."""
    run_dir = tmp_path / "killed"
    args = [*_sweep_args(tiny_model, run_dir), "--set", "phases=[mse]"]
    steps = kill_mid_phase(args, run_dir)
    assert steps and steps[-1] < 100, steps  # really interrupted
    r = run_cmd(args)
    assert r.returncode == 0, r.stderr[-3000:]
    group = sweep_run / "widths" / "d128"  # the same two-member program as this plain sweep
    for name in ("k4", "k8"):
        a = jaxsae.load_sae(group / "checkpoints" / "mse", name)
        b = jaxsae.load_sae(run_dir / "checkpoints" / "mse", name)
        for k in a.params:
            np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=f"{name} {k}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["sae"], r["step"]) for r in rows if r["phase"] == "mse"]
    assert len(logged) == len(set(logged)) and {n for n, _ in logged} == {"k4", "k8"}
    ev = json.loads((run_dir / "eval.json").read_text())["mse"]
    ref = json.loads((group / "eval.json").read_text())["mse"]
    for name in ev:
        assert {k: v for k, v in ev[name].items() if k != "phase_seconds"} == \
            {k: v for k, v in ref[name].items() if k != "phase_seconds"}


@pytest.mark.parametrize("n", [4, 3])
@eight_devices()[0]
@eight_devices()[1]
def test_sweep_on_a_mesh_equals_one_device(n):
    """The SAE axis over `model` (4 members on a model axis of 4: each device holds whole SAEs) or, when
    the axis does not divide the members (3), replicated with d_sae split: the same steps as one device."""
    from jaxsae.sharding import batch_sharding, make_mesh, sae_state_shardings, shard, stack_shardings

    base = SAEConfig(kind="topk", d_model=16, d_sae=32, k=6, dead_tokens_threshold=64).validate()
    hp = {"k": np.array([3, 6, 4, 5][:n], np.int32), "l1_coeff": np.zeros(n, np.float32),
          "lr": np.array([1e-3, 3e-3, 2e-3, 5e-4][:n], np.float32)}
    pc = MSECfg(warmup_steps=2)
    tx, sched = optimizer(pc, STEPS, base)
    xs = [jnp.asarray(np.random.default_rng(i).normal(size=(64, 16)), jnp.float32) for i in range(STEPS)]
    state = _stack([init_state(init_sae(base, jax.random.PRNGKey(i), xs[0]), tx, base, i) for i in range(n)])
    sweep = (hp, lambda lr: optimizer(dataclasses.replace(pc, lr=lr), STEPS, base))
    mesh = make_mesh(data=2, model=4)
    member_sh = sae_state_shardings(jax.tree.map(lambda a: a[0], state), base, mesh)
    state_sh = stack_shardings(member_sh, n)
    lead = state_sh["params"]["W_dec"].spec
    assert (lead[0], lead[1]) == (("model", None) if n == 4 else (None, "model")), lead
    one = make_mse_step(base, tx, sched, sweep=sweep)
    meshed = make_mse_step(base, tx, sched, state_sh, batch_sharding(mesh), sweep=sweep)
    a, b = state, shard(jax.tree.map(jnp.copy, state), state_sh)
    for x in xs:
        a, ma = one(a, x)
        b, mb = meshed(b, shard(x, batch_sharding(mesh)))
    _close(b, a, "state")
    _close(mb, ma, "metrics")
