"""Throughput of jaxsae's MSE-phase TopK training step vs a plain PyTorch TopK SAE step, same run.

    python bench/bench_mse_step.py                        # d_model 768, d_sae 8192, k 32, batch 1024
    python bench/bench_mse_step.py --d-sae 4096 --steps 10
    python bench/bench_mse_step.py --breakdown            # also time variants of the jaxsae step
    python bench/bench_mse_step.py --profile              # and the pieces of a step, each alone

Both sides train a TopK SAE on the same random N(0, 1) batches (a pool of --pool batches, cycled):

* jaxsae: the real step, `make_mse_step(cfg, *optimizer(...))`, jit-compiled with
  the state donated (Adam + the unit-norm decoder wrapper, AuxK bookkeeping, metrics), with the
  default `sae.decode: auto` (sparse decoder and encoder gradients off TPU); the row
  "sae.decode=dense" is the same step with the dense decoder and autodiff's dense backward.
* PyTorch reference (eager, `torch.set_num_threads(cores)`; on `--torch-device`, by default cuda when
  JAX runs on a GPU and torch sees one, else cpu; each step synchronised), the sparsify / SAELens-style TopK SAE:
  pre = relu(Linear(x - b_dec)); vals, idx = topk(pre, k); decoder = the top-k codes scattered into a
  dense [batch, d_sae] matrix times W_dec (`--torch-decode dense`, default: the same algorithm as
  jaxsae) or `F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")` (sparsify's
  decoder when Triton is unavailable, `--torch-decode embedding_bag`); loss = mean_tokens
  sum_d (x_hat - x)^2; the W_dec grad's component parallel to each row is removed, Adam steps, then
  the rows are renormalised. Like sparsify, it skips AuxK when no latent is dead (none is in a
  benchmark this short at the default dead_tokens_threshold).

FLOPs counted for the step ("useful" FLOPs, the same for both): encoder fwd 2·B·D·S + decoder fwd
with the top-k codes as a dense matmul 2·B·S·D, backward = 2x forward, i.e. 12·B·D·S in all.
The % of peak divides the jaxsae step's rate at that count by the rate of a 2048^3 float32 jnp.dot
measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (OtherLoad, interleaved, jax_matmul_gflops, machine_line, n_cores, table,  # noqa: E402
                    torch_device_like_jax, torch_device_note, wait_until_idle)


# ----------------------------------------------------------------------------------------- jaxsae
def make_jax_runner(d_model: int, d_sae: int, k: int, batch: int, pool, variant: str = "real"):
    """A zero-arg callable running one blocking training step (cycling through `pool`).

    variant: "real" is jaxsae's step as shipped (`sae.decode: auto`: on CPU/GPU the sparse decoder
    and encoder gradients), "dense" and "sparse" the same step with `sae.decode` forced. The others
    are diagnostics assembled from the same library pieces, with the default decode (only with
    --breakdown): "no_auxk" passes dead=None (skips the AuxK top-k and matmul), "plain_adam"
    additionally drops the unit-norm decoder wrapper, "sparse_dec" is "no_auxk" with a hand-written
    loss whose decoder gathers each token's k W_dec rows (autodiff's backward, so a dense encoder
    gradient; same optimizer), "sparse_grads" also replaces autodiff by hand-written gradients that
    touch only each token's k latents (scatter-adds into W_dec, W_enc^T and b_enc; b_dec's
    encoder-side grad as W_enc @ db_enc), so only the encoder forward stays a dense [B, D] @ [D, S]
    matmul (the prototype of what `sae.decode: sparse` does in the library), "auxk_active" is the
    real step with dead_tokens_threshold=1, so latents that did not fire in the last batch count as
    dead and AuxK does real work (late in training some latents are dead; at the default threshold
    none are in a benchmark this short, and AuxK then runs on an all-masked input).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jaxsae.config import MSECfg
    from jaxsae.sae import SAEConfig, init_sae, make_sae, reconstruction_loss
    from jaxsae.train.mse import init_state, make_mse_step
    from jaxsae.train.optim import optimizer

    sae_cfg = SAEConfig(kind="topk", d_model=d_model, d_sae=d_sae, k=k,
                        dead_tokens_threshold=1 if variant == "auxk_active" else 10_000_000,
                        decode=variant if variant in ("dense", "sparse") else "auto").validate()
    module = make_sae(sae_cfg)
    mse_cfg = MSECfg(batch_size=batch, warmup_steps=1)  # constant lr 3e-4 after step 0, as torch
    tx, schedule = optimizer(mse_cfg, 1_000_000, sae_cfg)
    params = init_sae(sae_cfg, jax.random.PRNGKey(0))
    if variant in ("real", "auxk_active", "dense", "sparse"):
        step = make_mse_step(sae_cfg, tx, schedule)
    else:
        if variant == "plain_adam":
            tx = optax.adam(schedule, b1=mse_cfg.b1, b2=mse_cfg.b2)

        def sparse_grads(p, x):
            """Loss and exact grads of the no-AuxK TopK loss, computed at the top-k entries only."""
            B = x.shape[0]
            xc = x - p["b_dec"]
            vals, idx = jax.lax.top_k(xc @ p["W_enc"] + p["b_enc"], k)
            a = jax.nn.relu(vals)
            W_k = p["W_dec"][idx]                                  # [B, k, D]
            err = jnp.einsum("bk,bkd->bd", a, W_k) + p["b_dec"] - x
            g = 2.0 * err / B                                      # dloss/dx_hat
            dv = jnp.where(vals > 0, jnp.einsum("bd,bkd->bk", g, W_k), 0.0)
            flat = idx.reshape(-1)
            rows = lambda w, v: jnp.zeros((d_sae, d_model), v.dtype).at[flat].add(
                (w[..., None] * v[:, None, :]).reshape(-1, d_model))
            db_enc = jnp.zeros((d_sae,), dv.dtype).at[flat].add(dv.reshape(-1))
            grads = {"W_dec": rows(a, g), "W_enc": rows(dv, xc).T, "b_enc": db_enc,
                     "b_dec": g.sum(0) - p["W_enc"] @ db_enc}
            return (jnp.mean(jnp.sum(err**2, -1)), jnp.mean(jnp.sum(vals > 0, -1))), grads

        def _step(state, x):
            def loss_fn(p):
                if variant == "sparse_dec":
                    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
                    vals, idx = jax.lax.top_k(pre, k)
                    x_hat = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), p["W_dec"][idx]) + p["b_dec"]
                    return reconstruction_loss(x, x_hat), jnp.mean(jnp.sum(vals > 0, -1))
                x_hat, out = module.apply({"params": p}, x, dead=None, train=True)
                return reconstruction_loss(x, x_hat), out.l0
            if variant == "sparse_grads":
                (loss, l0), grads = sparse_grads(state["params"], x)
            else:
                (loss, l0), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                        step=state["step"] + 1), {"loss": loss, "l0": l0}

        step = jax.jit(_step, donate_argnums=0)
    box = {"state": init_state(params, tx, sae_cfg, seed=0), "i": 0}
    xs = [jax.device_put(jnp.asarray(x)) for x in pool]

    def run():
        box["state"], metrics = step(box["state"], xs[box["i"] % len(xs)])
        box["i"] += 1
        jax.block_until_ready((box["state"], metrics))

    def loss():
        x = xs[0]
        x_hat, _ = module.apply({"params": box["state"]["params"]}, x, dead=None, train=True)
        return float(reconstruction_loss(x, x_hat))

    return run, loss


# ---------------------------------------------------------------------------------------- PyTorch
def make_torch_runner(d_model: int, d_sae: int, k: int, batch: int, pool, decode: str = "dense",
                      device: str = "cpu"):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # eager CUDA is async

    class TopKSAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(d_model, d_sae)
            self.encoder.bias.data.zero_()
            w = torch.randn(d_sae, d_model)
            w /= w.norm(dim=1, keepdim=True)
            self.encoder.weight.data = w.clone()          # W_enc = W_dec.T at init (Gao et al.)
            self.W_dec = torch.nn.Parameter(w.clone())    # [S, D], unit rows
            self.b_dec = torch.nn.Parameter(torch.zeros(d_model))

        def forward(self, x):
            pre = F.relu(self.encoder(x - self.b_dec))
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            if decode == "dense":
                f = torch.zeros_like(pre).scatter(-1, idx, vals)
                x_hat = f @ self.W_dec + self.b_dec
            else:
                x_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
            return x_hat

    sae = TopKSAE().to(dev)  # initialised on the CPU (same weights on every device), then moved
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    xs = [torch.from_numpy(x).to(dev) for x in pool]
    box = {"i": 0}

    def run():
        x = xs[box["i"] % len(xs)]
        box["i"] += 1
        x_hat = sae(x)
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # remove the grad component parallel to each decoder row
            W, g = sae.W_dec.data, sae.W_dec.grad
            g -= (g * W).sum(-1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sync()

    def loss():
        with torch.no_grad():
            return float((sae(xs[0]) - xs[0]).pow(2).sum(-1).mean())

    return run, loss


# ---------------------------------------------------------------------------------------- profile
def profile_pieces(B: int, D: int, S: int, k: int, k_aux: int, iters: int = 5) -> None:
    """Times the pieces of a TopK step in isolation (jit each, block, median of 3 rounds).

    Diagnostic only (--profile): says where the step's time goes on this backend, and how much a
    sparse decoder (gather the k decoder rows per token instead of a dense [B, S] @ [S, D]) would save.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jaxsae.sae.decoder_norm import unit_norm_decoder

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (B, D))
    W = jax.random.normal(kw, (D, S)) / jnp.sqrt(D)
    Wd = W.T
    pre = x @ W
    rows = jnp.arange(B)[:, None]

    def topk_dense(p, kk):
        v, i = jax.lax.top_k(p, kk)
        return jnp.zeros_like(p).at[rows, i].set(jax.nn.relu(v))

    def loss_dense(W, Wd, x):
        return jnp.mean(jnp.sum((topk_dense(x @ W, k) @ Wd - x) ** 2, -1))

    def loss_sparse(W, Wd, x):
        v, i = jax.lax.top_k(x @ W, k)
        x_hat = jnp.einsum("bk,bkd->bd", jax.nn.relu(v), Wd[i])
        return jnp.mean(jnp.sum((x_hat - x) ** 2, -1))

    params = {"W_enc": W, "W_dec": Wd, "b_enc": jnp.zeros(S), "b_dec": jnp.zeros(D)}
    pieces = [
        (f"encoder matmul [{B},{D}]x[{D},{S}]", lambda x, W: x @ W, (x, W)),
        (f"top_k k={k} of [{B},{S}]", lambda p: jax.lax.top_k(p, k), (pre,)),
        (f"top_k k={k} + scatter to dense [{B},{S}]", lambda p: topk_dense(p, k), (pre,)),
        (f"top_k k={k_aux} of [{B},{S}] (AuxK's)", lambda p: jax.lax.top_k(p, k_aux), (pre,)),
        ("top_k + dense decode f @ W_dec", lambda p, Wd: topk_dense(p, k) @ Wd, (pre, Wd)),
        ("top_k + sparse decode (gather k rows)",
         lambda p, Wd: (lambda v, i: jnp.einsum("bk,bkd->bd", v, Wd[i]))(*jax.lax.top_k(p, k)), (pre, Wd)),
        ("loss fwd+bwd, dense decoder", jax.grad(loss_dense, argnums=(0, 1)), (W, Wd, x)),
        ("loss fwd+bwd, sparse decoder", jax.grad(loss_sparse, argnums=(0, 1)), (W, Wd, x)),
    ]
    for name, tx in (("optax.adam", optax.adam(3e-4)), ("unit_norm_decoder(adam)", unit_norm_decoder(optax.adam(3e-4)))):
        def upd(p, g, st, tx=tx):
            u, st = tx.update(g, st, p)
            return optax.apply_updates(p, u), st
        pieces.append((f"optimizer update, {name}", upd, (params, params, tx.init(params))))
    fns = {}
    for name, f, a in pieces:
        jf = jax.jit(f)
        jax.block_until_ready(jf(*a))
        fns[name] = (lambda jf=jf, a=a: jax.block_until_ready(jf(*a)))
    with OtherLoad() as load:
        sec = interleaved(fns, iters=iters, rounds=3, warmup=1)
    print("\npieces of the step, timed alone (diagnostic; " + load.report() + "):")
    print(table([(n, f"{s * 1e3:.1f}") for n, s in sec.items()], ("piece", "ms")))


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round (best of --rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=4, help="distinct input batches cycled through")
    ap.add_argument("--torch-decode", choices=["dense", "embedding_bag"], default="dense")
    ap.add_argument("--torch-device", default=None,
                    help="device of the PyTorch reference (default: cuda when JAX runs on a GPU and torch sees "
                         "one, else cpu: the device jaxsae runs on)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-rate matmul")
    ap.add_argument("--breakdown", action="store_true", help="also time jaxsae step variants (diagnostic)")
    ap.add_argument("--profile", action="store_true", help="also time the pieces of the step alone (diagnostic)")
    ap.add_argument("--no-wait", action="store_true", help="don't wait for other heavy jobs to finish")
    args = ap.parse_args()

    import numpy as np
    import torch

    cores = n_cores()
    torch.set_num_threads(cores)
    torch_device = args.torch_device or torch_device_like_jax()
    wait_until_idle(force=args.no_wait)

    B, D, S, k = args.batch, args.d_model, args.d_sae, args.k
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((B, D), dtype=np.float32) for _ in range(args.pool)]

    print(machine_line())
    print(f"shapes: batch {B} tokens, d_model {D}, d_sae {S}, k {k}; torch threads {torch.get_num_threads()}, "
          f"torch decoder: {args.torch_decode}, torch device: {torch_device}{torch_device_note(torch_device)}")
    t0 = time.perf_counter()
    runners = {"jaxsae": make_jax_runner(D, S, k, B, pool),
               "jaxsae, sae.decode=dense": make_jax_runner(D, S, k, B, pool, "dense"),
               f"torch ({args.torch_decode})": make_torch_runner(D, S, k, B, pool, args.torch_decode,
                                                                 torch_device)}
    if args.breakdown:
        runners["jaxsae, sae.decode=sparse"] = make_jax_runner(D, S, k, B, pool, "sparse")
        runners["jaxsae, AuxK active"] = make_jax_runner(D, S, k, B, pool, "auxk_active")
        runners["jaxsae, no AuxK"] = make_jax_runner(D, S, k, B, pool, "no_auxk")
        runners["jaxsae, no AuxK, plain Adam"] = make_jax_runner(D, S, k, B, pool, "plain_adam")
        runners["prototype: no AuxK, sparse decoder"] = make_jax_runner(D, S, k, B, pool, "sparse_dec")
        runners["prototype: no AuxK, sparse grads"] = make_jax_runner(D, S, k, B, pool, "sparse_grads")
    loss0 = {name: loss() for name, (_, loss) in runners.items()}
    with OtherLoad() as load:
        sec = interleaved({name: run for name, (run, _) in runners.items()}, iters=args.steps,
                          rounds=args.rounds, warmup=2)
        peak = jax_matmul_gflops(args.matmul_n)
    loss1 = {name: loss() for name, (_, loss) in runners.items()}
    wall = time.perf_counter() - t0

    flops = 12 * B * D * S
    ref = sec[f"torch ({args.torch_decode})"]
    rows = []
    for name, s in sec.items():
        gf = flops / s / 1e9
        rows.append((name, f"{s * 1e3:.1f}", f"{B / s:,.0f}", f"{ref / s:.2f}x", f"{gf:.1f}",
                     f"{100 * gf / peak:.0f}%", f"{loss0[name]:.1f} -> {loss1[name]:.1f}"))
    print(f"step FLOPs counted: 12*B*D*S = {flops / 1e9:.2f} GFLOP (enc fwd 2BDS + dense dec fwd 2BSD, "
          f"bwd = 2x fwd)")
    print(f"measured float32 matmul rate ({args.matmul_n}^3 jnp.dot): {peak:.1f} GFLOP/s")
    print(table(rows, ("step", "ms/step", "tokens/s", "vs torch", "GFLOP/s", "% of matmul", "loss (batch 0)")))
    print("(GFLOP/s = the 12*B*D*S count / time for every row; rows with a sparse decoder do fewer FLOPs than "
          "that, so can exceed 100%. loss = reconstruction MSE of batch 0 before -> after the timed steps, "
          "a sanity check that every contestant trains)")
    j = sec["jaxsae"]
    speedup, frac = ref / j, flops / j / 1e9 / peak
    print(f"\njaxsae / torch = {speedup:.2f}x (goal >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'}); "
          f"jaxsae at {100 * frac:.0f}% of measured matmul rate (goal >= 50%: "
          f"{'met' if frac >= 0.5 else 'NOT met'})  [bench wall time {wall:.0f}s]")
    print(load.report())
    if args.profile:
        from jaxsae.sae import SAEConfig

        profile_pieces(B, D, S, k, SAEConfig(kind="topk", d_model=D, d_sae=S, k=k).effective_k_aux)


if __name__ == "__main__":
    main()
