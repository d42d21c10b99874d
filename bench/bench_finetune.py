"""The fused KL+MSE step against the naive step and against its floor, measured in one run.

    python bench/bench_finetune.py [--model DIR] [--layer L] [--batch B] [--seq T] [--d-sae N] [--k K]

Rows (all jit-compiled, same shapes, same SAE):
- fused:  jaxsae's step (prefix to the hook once; clean suffix under stop_gradient; spliced suffix
          differentiated w.r.t. the SAE; AdamW update);
- naive:  the reference code's structure: a separate clean forward call, then a full spliced forward
          that runs layers 0..L again, same loss and update (goal: fused faster by its FLOP-count ceiling);
- floor:  one clean LM forward + the suffix forward/backward, no SAE at all;
- mse:    the MSE-phase step on the same number of tokens, to state the fine-tune's cost per token; it
          is also the SAE's own share of the fused step (the same SAE forward/backward and update), so
          "floor + mse" is the fused step's floor with its SAE (goal for fused / (floor + mse): <= 1.10x).
Each row prints XLA's FLOP count (compiled cost analysis), so the speed-up over naive is printed beside
its FLOP-count ceiling (naive FLOPs / fused FLOPs), and every step's share of the measured matmul rate.
Timed in turns (fused, naive, floor, mse, ...), best of --rounds rounds of --steps steps.
Default model: the shipped pythia-stdlib; any HF directory works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from common import OtherLoad, interleaved, jax_matmul_gflops, machine_line, wait_until_idle, xla_flops as flops  # noqa: E402

from jaxsae.config import FinetuneCfg, MSECfg
from jaxsae.models.shipped import SHIPPED
from jaxsae.splice import Splice, kl_per_token
from jaxsae.models import load_lm
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params
from jaxsae.sae import SAEConfig, init_sae, make_sae, maybe_unit_norm_decoder
from jaxsae.train.finetune import init_ft_state, make_finetune_step
from jaxsae.train.mse import init_state, make_mse_step
from jaxsae.train.optim import optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHIPPED))
    ap.add_argument("--pythia-160m-shape", action="store_true",
                    help="a randomly initialised model of Pythia-160M's shape (12 layers, d_model 768, vocab 50304)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-wait", action="store_true", help="don't wait for a quiet machine")
    a = ap.parse_args()

    if a.pythia_160m_shape:
        cfg = GPTNeoXConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_mlp=3072)
        lm, a.model = LM(cfg, init_params(cfg, jax.random.PRNGKey(0))), "random Pythia-160M shape"
    else:
        lm = load_lm(a.model)
    L = a.layer
    sae_cfg = SAEConfig(kind="topk", d_model=lm.d_model, d_sae=a.d_sae, k=a.k).validate()
    module = make_sae(sae_cfg)
    params = init_sae(sae_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, lm.vocab_size, (a.batch, a.seq)), jnp.int32)
    scale = 1.0

    tx, sched = optimizer(FinetuneCfg(lr=5e-5), 1000, sae_cfg)
    fused_step = make_finetune_step(Splice(lm, L, scale), sae_cfg, tx, sched)
    fused_state = init_ft_state(jax.tree.map(jnp.copy, params), tx, sae_cfg, np.zeros(a.d_sae, np.int32), 0., 0., 0)

    def fused(state):
        return fused_step(state, lm.params, tokens)[0]

    # the naive step, as the reference code does it: a separate no-grad clean forward, then a full
    # spliced forward from the embedding (layers 0..L twice). Two calls: inside one jit, XLA's CSE
    # would merge the two prefixes and quietly turn it into the fused step.
    clean_forward = jax.jit(lambda lm_params: lm.forward(tokens, params=lm_params))

    def naive_loss(p, lm_params, clean):
        h = lm.blocks(lm.embed(tokens, lm_params), 0, L + 1, params=lm_params)
        x_hat = module.apply({"params": p}, h / scale)[0] * scale
        logits = lm.unembed(lm.blocks(x_hat, L + 1, lm.n_layers, params=lm_params), lm_params)
        kl = jnp.mean(kl_per_token(clean, logits))
        mse = jnp.mean(jnp.sum((h - x_hat) ** 2, -1))
        return 0.5 * mse + 0.5 * jax.lax.stop_gradient(mse / kl) * kl

    ntx = maybe_unit_norm_decoder(sae_cfg, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-5)))

    @jax.jit
    def naive_update(state, lm_params, clean):
        p, o = state
        g = jax.grad(naive_loss)(p, lm_params, clean)
        u, o = ntx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def naive(state, lm_params):
        return naive_update(state, lm_params, clean_forward(lm_params))

    naive_state = (jax.tree.map(jnp.copy, params), ntx.init(params))

    # the floor: clean forward + suffix forward/backward, no SAE
    @jax.jit
    def floor(lm_params):
        x = lm.prefix(tokens, L, params=lm_params)
        clean = jax.lax.stop_gradient(lm.suffix(x, L, params=lm_params))
        return jax.grad(lambda h: jnp.mean(kl_per_token(clean, lm.suffix(h, L, params=lm_params))))(x * 1.01)

    mtx, msched = optimizer(MSECfg(warmup_steps=10), 1000, sae_cfg)
    mse_step = make_mse_step(sae_cfg, mtx, msched)
    mse_state = init_state(jax.tree.map(jnp.copy, params), mtx, sae_cfg, 0)
    acts = jnp.asarray(np.random.default_rng(1).normal(size=(a.batch * a.seq, lm.d_model)), jnp.float32)

    def mse(state):
        return mse_step(state, acts)[0]

    # XLA's FLOP count of each program (the naive step is two programs)
    f_fused = flops(fused_step.lower(fused_state, lm.params, tokens).compile())
    f_naive = (flops(clean_forward.lower(lm.params).compile())
               + flops(naive_update.lower(naive_state, lm.params, clean_forward(lm.params)).compile()))
    f_floor = flops(floor.lower(lm.params).compile())
    f_mse = flops(mse_step.lower(mse_state, acts).compile())

    # each contestant one step per call, its state threaded through (the steps donate it)
    holders = {"fused": fused_state, "naive": naive_state, "mse": mse_state}

    def run_fused():
        holders["fused"] = fused(holders["fused"])
        jax.block_until_ready(holders["fused"])

    def run_naive():
        holders["naive"] = naive(holders["naive"], lm.params)
        jax.block_until_ready(holders["naive"])

    def run_floor():
        jax.block_until_ready(floor(lm.params))

    def run_mse():
        holders["mse"] = mse(holders["mse"])
        jax.block_until_ready(holders["mse"])

    wait_until_idle(force=a.no_wait)
    gflops = jax_matmul_gflops()
    with OtherLoad() as load:
        t = interleaved({"fused": run_fused, "naive": run_naive, "floor": run_floor, "mse": run_mse},
                        iters=a.steps, rounds=a.rounds)
    n = a.batch * a.seq
    print(machine_line())
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}  model: {a.model}  layer {L} of {lm.n_layers}  "
          f"batch {a.batch}x{a.seq} = {n} tokens  SAE topk d_sae={a.d_sae} k={a.k}")
    print(f"measured 2048^3 float32 matmul: {gflops:.0f} GFLOP/s")
    rows = (("fused", t["fused"], f_fused), ("naive", t["naive"], f_naive), ("floor", t["floor"], f_floor),
            ("mse", t["mse"], f_mse), ("floor + mse", t["floor"] + t["mse"], f_floor + f_mse))
    print(f"{'step':<12}{'ms/step':>10}{'tokens/s':>12}{'GFLOP':>10}{'% of matmul':>13}")
    for name, sec, f in rows:
        print(f"{name:<12}{1e3 * sec:>10.1f}{n / sec:>12,.0f}{f / 1e9:>10.2f}{100 * f / 1e9 / sec / gflops:>12.0f}%")
    print(load.report())
    print(f"fused speed-up over naive: {t['naive'] / t['fused']:.2f}x (goal: at its FLOP-count ceiling, "
          f"{f_naive / f_fused:.2f}x)")
    print(f"fused / floor:             {t['fused'] / t['floor']:.2f}x (FLOPs {f_fused / f_floor:.2f}x; the floor "
          f"has no SAE)")
    print(f"fused / (floor + mse):     {t['fused'] / (t['floor'] + t['mse']):.2f}x (goal <= 1.10x; FLOPs "
          f"{f_fused / (f_floor + f_mse):.2f}x)")
    print(f"SAE share of the fused step: {t['mse'] / t['fused']:.0%} (the MSE step's time at these tokens)")
    print(f"fine-tune cost per token:  {t['fused'] / t['mse']:.1f}x the MSE phase's")
    share = 0.05
    print(f"=> a 5% fine-tune window costs {100 * share * t['fused'] / t['mse'] / (1 - share + share * t['fused'] / t['mse']):.0f}% "
          f"of the SAE-training compute (collection excluded)")


if __name__ == "__main__":
    main()
