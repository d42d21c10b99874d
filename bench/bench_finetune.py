"""The fused KL+MSE step against the naive step and against its floor, measured in one run.

    python bench/bench_finetune.py [--model DIR] [--layer L] [--batch B] [--seq T] [--d-sae N] [--k K]

Rows (all jit-compiled, same shapes, same SAE):
- fused:  jaxsae's step (prefix to the hook once; clean suffix under stop_gradient; spliced suffix
          differentiated w.r.t. the SAE; AdamW update);
- naive:  the reference code's structure: a separate clean forward call, then a full spliced forward
          that runs layers 0..L again, same loss and update (goal: fused >= 1.3x faster);
- floor:  one clean LM forward + the suffix forward/backward, no SAE at all (goal: fused <= 1.15x of it);
- mse:    the MSE-phase step on the same number of tokens, to state the fine-tune's cost per token.
Default model: the shipped pythia-stdlib; any HF directory works.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def timeit(fn, *args, steps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


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

    # run each a few times (state threaded through, donation-safe)
    def loop_time(step, state, extra=()):
        holder = [state]

        def once():
            holder[0] = step(holder[0], *extra)
            return holder[0]

        return timeit(once, steps=a.steps)

    t_fused = loop_time(fused, fused_state)
    t_naive = loop_time(lambda s: naive(s, lm.params), naive_state)
    t_floor = timeit(floor, lm.params, steps=a.steps)
    t_mse = loop_time(mse, mse_state)
    n = a.batch * a.seq
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}  model: {a.model}  layer {L} of {lm.n_layers}  "
          f"batch {a.batch}x{a.seq} = {n} tokens  SAE topk d_sae={a.d_sae} k={a.k}")
    print(f"{'step':<8}{'ms/step':>10}{'tokens/s':>12}")
    for name, t in (("fused", t_fused), ("naive", t_naive), ("floor", t_floor), ("mse", t_mse)):
        print(f"{name:<8}{1e3 * t:>10.1f}{n / t:>12,.0f}")
    print(f"fused speed-up over naive: {t_naive / t_fused:.2f}x (goal >= 1.3x)")
    print(f"fused / floor:             {t_fused / t_floor:.2f}x (goal <= 1.15x)")
    print(f"fine-tune cost per token:  {t_fused / t_mse:.1f}x the MSE phase's")
    share = 0.05
    print(f"=> a 5% fine-tune window costs {100 * share * t_fused / t_mse / (1 - share + share * t_fused / t_mse):.0f}% "
          f"of the SAE-training compute (collection excluded)")


if __name__ == "__main__":
    main()
