"""A sweep of N SAEs as one program against N single-SAE programs of the same work, measured in one run.

    python bench/bench_sweep.py [--n 4] [--d-sae 1024] [--batch-seqs 16] [--seq 128] [--mse-batch 1024]

Rows (shipped model, hook after block 2, TopK SAEs with k = 8, 16, 32, 64 as configs/demo-sweep.yaml):
- fused KL+MSE step: one sweep step (prefix and clean suffix once, N spliced suffixes) vs N single steps
  (goal ≤ 0.7x);
- MSE step: one sweep step over a shared batch vs N single steps (goal ≤ 0.9x);
- evaluation batch: `sweep_sums` (clean and zero-ablated branches once) vs N `batch_sums` (goal ≤ 0.6x).
Each row also prints XLA's FLOP count of both sides (from the compiled programs' cost analysis).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OtherLoad, interleaved, wait_until_idle, xla_flops as flops  # noqa: E402

from jaxsae.config import FinetuneCfg, MSECfg  # noqa: E402
from jaxsae.eval import batch_sums, sweep_sums  # noqa: E402
from jaxsae.models import load_lm  # noqa: E402
from jaxsae.models.shipped import SHIPPED  # noqa: E402
from jaxsae.sae import SAEConfig, init_sae  # noqa: E402
from jaxsae.splice import Splice  # noqa: E402
from jaxsae.train.finetune import KLLoss, init_ft_state, make_finetune_step  # noqa: E402
from jaxsae.train.mse import init_state, make_mse_step  # noqa: E402
from jaxsae.train.optim import optimizer  # noqa: E402


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--batch-seqs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mse-batch", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-wait", action="store_true")
    a = ap.parse_args()

    lm = load_lm(str(SHIPPED), "float32")
    layer, d = 2, lm.d_model
    sp = Splice(lm, layer, 1.0, include_first=True)
    ks = [8 * 2 ** i for i in range(a.n)]
    base = SAEConfig(kind="topk", d_model=d, d_sae=a.d_sae, k=max(ks)).validate()
    cfgs = [dataclasses.replace(base, k=k) for k in ks]
    hp = {"k": np.array(ks, np.int32), "l1_coeff": np.zeros(a.n, np.float32),
          "lr": np.full(a.n, 1e-3, np.float32), "kl_share": np.full(a.n, 0.5, np.float32)}
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, lm.config.vocab_size, (a.batch_seqs, a.seq)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(a.mse_batch, d)), jnp.float32)

    rows = []

    # fused KL+MSE step
    fc = FinetuneCfg(lr=1e-3)
    singles, states = [], []
    for i, c in enumerate(cfgs):
        tx, sched = optimizer(fc, 1000, c)
        states.append(init_ft_state(init_sae(c, jax.random.PRNGKey(i)), tx, c, np.zeros(a.d_sae, np.int32), 0.0, 0.0, 0))
        singles.append(make_finetune_step(sp, c, tx, sched, KLLoss(auxk=False)))
    tx, sched = optimizer(fc, 1000, base)
    swept = make_finetune_step(sp, base, tx, sched, KLLoss(auxk=False),
                               sweep=(hp, lambda lr: optimizer(dataclasses.replace(fc, lr=lr), 1000, base)))
    rows.append(("fused KL+MSE step", singles, states, swept, stack(states), (lm.params, tokens)))

    # MSE step
    mc = MSECfg(lr=1e-3, warmup_steps=0)
    singles, states = [], []
    for i, c in enumerate(cfgs):
        tx, sched = optimizer(mc, 1000, c)
        states.append(init_state(init_sae(c, jax.random.PRNGKey(i)), tx, c, i))
        singles.append(make_mse_step(c, tx, sched))
    tx, sched = optimizer(mc, 1000, base)
    swept = make_mse_step(base, tx, sched, sweep=(hp, lambda lr: optimizer(dataclasses.replace(mc, lr=lr), 1000, base)))
    rows.append(("MSE step", singles, states, swept, stack(states), (x,)))

    # evaluation batch
    params = [init_sae(c, jax.random.PRNGKey(i)) for i, c in enumerate(cfgs)]
    single_eval = [jax.jit(lambda p, t, c=c: batch_sums(sp, lm.params, c, p, t)) for c in cfgs]
    sweep_eval = jax.jit(lambda p, t: sweep_sums(sp, lm.params, base, p, t, jnp.asarray(hp["k"])))

    quiet = a.no_wait or wait_until_idle()
    table = []
    with OtherLoad() as load:
        for name, singles, states, swept, stacked, args in rows:
            # steps donate their state: each call gets the state it returned last time
            cur = {"s": list(states), "w": stacked}

            def run_singles(singles=singles, args=args, cur=cur):
                outs = [s(st, *args) for s, st in zip(singles, cur["s"])]
                cur["s"] = [o[0] for o in outs]
                jax.block_until_ready(outs)

            def run_sweep(swept=swept, args=args, cur=cur):
                cur["w"], m = swept(cur["w"], *args)
                jax.block_until_ready(m)

            t = interleaved({"singles": run_singles, "sweep": run_sweep}, a.iters, a.rounds)
            f1 = sum(flops(s.lower(st, *args).compile()) for s, st in zip(singles, cur["s"]))
            fn = flops(swept.lower(cur["w"], *args).compile())
            table.append((name, t["singles"], t["sweep"], f1, fn))
        stacked_params = stack(params)

        def ev_singles():
            jax.block_until_ready([f(p, tokens) for f, p in zip(single_eval, params)])

        def ev_sweep():
            jax.block_until_ready(sweep_eval(stacked_params, tokens))

        t = interleaved({"singles": ev_singles, "sweep": ev_sweep}, a.iters, a.rounds)
        f1 = sum(flops(f.lower(p, tokens).compile()) for f, p in zip(single_eval, params))
        table.append(("evaluation batch", t["singles"], t["sweep"], f1, flops(sweep_eval.lower(stacked_params, tokens).compile())))

    print(f"\n{a.n} TopK SAEs (k = {ks}), d_sae {a.d_sae}, shipped model (d_model {d}), layer {layer}; "
          f"fused/eval batch {a.batch_seqs} x {a.seq} tokens, MSE batch {a.mse_batch} rows; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}\n")
    print(f"| what | {a.n} single programs (ms) | one sweep program (ms) | time ratio | FLOPs ratio | goal |")
    print("|---|---|---|---|---|---|")
    goals = {"fused KL+MSE step": "≤ 0.7x", "MSE step": "≤ 0.9x", "evaluation batch": "≤ 0.6x"}
    for name, ts, tw, f1, fn in table:
        print(f"| {name} | {1e3 * ts:.1f} | {1e3 * tw:.1f} | {tw / ts:.2f}x | {fn / f1:.2f}x | {goals[name]} |")
    print(f"\n{load.report()}" + ("" if quiet else " (did not wait for a quiet machine)"))


if __name__ == "__main__":
    main()
