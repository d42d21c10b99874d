"""MSE-phase throughput in stream mode vs disk mode, and the LM's share of it.

    python bench/bench_stream.py                 # shipped model and a random Pythia-70m-shaped one
    python bench/bench_stream.py --model shipped --rows 262144

Both modes train the same TopK SAE (8 x d_model latents, k 32, batch 1024 rows, sparse default) on the same
number of rows of the same text (the standard library's train split), in one process, after a warm-up
that compiles everything:
* disk: `collect` the rows into a store on local disk, then the MSE steps over a `ShuffledReader` of it;
  its time is collection + training (what a run that does not reuse its store pays).
* stream: the MSE steps over a `StreamReader`, the LM making each block of `--buffer-rows` rows as the
  steps reach it (`jaxsae/data/stream.py`).
Printed: tokens/s of each, stream ÷ disk, and the share of the stream's time that is the LM forward
(the same blocks' forwards timed alone) and the SAE steps (the same steps on ready batches).

Models: `jaxsae/assets/pythia-stdlib` (shipped) and a random-weight GPT-NeoX of Pythia-70m's shape
(hidden 512, 6 layers, 8 heads, intermediate 2048, vocab 50304; the shipped tokenizer), hook layer 3.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OtherLoad, machine_line, table, wait_until_idle  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "jaxsae" / "assets" / "pythia-stdlib"


def random_70m(out: Path) -> Path:
    from bench_collect import write_random_neox

    write_random_neox(out, hidden=512, layers=6, heads=8, inter=2048, vocab=50304)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / f, out / f)
    return out


def bench_model(name: str, path: Path, layer: int, rows: int, buffer_rows: int, tmp: Path) -> list[tuple]:
    import jax
    import numpy as np

    from jaxsae import config as C
    from jaxsae.data.collect import _np_dtype, _residual_rows, collect
    from jaxsae.data.reader import ShuffledReader
    from jaxsae.data.stream import Stream, StreamReader, blocks_for, stream_spec
    from jaxsae.data.text import make_source
    from jaxsae.models import load_lm
    from jaxsae.sae import init_sae
    from jaxsae.train.mse import init_state, make_mse_step
    from jaxsae.train.optim import optimizer
    from jaxsae.validate import sae_config

    lm = load_lm(str(path))
    B, ctx = 1024, 128
    cfg = C.load_config(None, [f"hook.layer={layer}", f"data.context={ctx}", "data.include_first_position=true",
                               f"store.buffer_rows={buffer_rows}", "store.batch_contexts=32", f"mse.tokens={rows}",
                               f"mse.batch_size={B}", "mse.warmup_steps=2", "sae.kind=topk", f"sae.d_sae={8 * lm.d_model}", "sae.k=32"])
    sae_cfg = sae_config(cfg, lm.d_model)
    steps = rows // B
    tx, sched = optimizer(cfg.mse, steps, sae_cfg)
    step = make_mse_step(sae_cfg, tx, sched)
    fresh = lambda: init_state(init_sae(sae_cfg, jax.random.PRNGKey(0)), tx, sae_cfg, 0)  # noqa: E731
    spec = stream_spec(cfg)
    src = cfg.data.source

    def new_stream():
        rows_of = _residual_rows(lm, layer, spec.drop, _np_dtype("float32"), spec.batch_contexts)
        return Stream(spec, src, lm.tokenizer, None, rows_of)

    def train(batches) -> float:
        state = fresh()
        t = time.perf_counter()
        for s in range(steps):
            state, m = step(state, next(batches) if not callable(batches) else batches(s))
        jax.block_until_ready(state)
        return time.perf_counter() - t

    def disk() -> float:
        where = tmp / f"store-{time.monotonic_ns()}"
        t = time.perf_counter()
        collect(lm, layer, make_source(src), lm.tokenizer, str(where), n_tokens=rows, context=ctx,
                batch_contexts=spec.batch_contexts, drop_first=False, bos_id=None, progress=False)
        with ShuffledReader(str(where), B, seed=0) as reader:
            elapsed = time.perf_counter() - t + train(reader)
        shutil.rmtree(where)
        return elapsed

    def stream() -> float:
        reader = StreamReader(new_stream(), B, seed=0, scale=1.0)
        return train(reader.batch)

    def lm_alone() -> float:  # the stream's block forwards (and tokenizing), nothing else
        s = new_stream()
        t = time.perf_counter()
        for b in range(blocks_for(spec, rows)):
            jax.block_until_ready(s.block(b, 0))
        return time.perf_counter() - t

    ready = [jax.device_put(np.random.default_rng(i).standard_normal((B, lm.d_model), np.float32))
             for i in range(8)]

    def sae_alone() -> float:
        return train(lambda s: ready[s % len(ready)])

    fns = {"disk (collect + train)": disk, "stream": stream, "LM blocks alone": lm_alone, "SAE steps alone": sae_alone}
    for f in fns.values():  # warm-up: compile every program once
        f()
    with OtherLoad() as load:
        sec = {k: min(f() for _ in range(2)) for k, f in fns.items()}
    n_blocks = blocks_for(spec, rows)
    print(f"\n{name}: d_model {lm.d_model}, hook layer {layer}; {rows:,} rows in batches of {B}; stream buffer "
          f"{spec.block_rows:,} rows ({n_blocks} blocks, {n_blocks * spec.block_rows:,} rows made); "
          + load.report())
    s = sec["stream"]
    out = [(f"{name}: {k}", f"{v:.1f}", f"{rows / v:,.0f}", f"{v / s:.2f}") for k, v in sec.items()]
    print(table(out, ("what", "seconds", "tokens/s", "÷ stream")))
    print(f"stream ÷ disk tokens/s: {sec['disk (collect + train)'] / s:.2f}x; LM share of the stream's time "
          f"{sec['LM blocks alone'] / s:.0%}, SAE steps {sec['SAE steps alone'] / s:.0%}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["both", "shipped", "70m"], default="both")
    ap.add_argument("--rows", type=int, default=None, help="rows trained on (default 262144 shipped, 65536 70m)")
    ap.add_argument("--buffer-rows", type=int, default=None, help="default rows / 4")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    a = ap.parse_args()
    wait_until_idle(force=a.no_wait)
    print(machine_line())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.model in ("both", "shipped"):
            rows = a.rows or 262144
            bench_model("shipped", SHIPPED, 2, rows, a.buffer_rows or rows // 4, tmp)
        if a.model in ("both", "70m"):
            rows = a.rows or 65536
            bench_model("pythia-70m shape", random_70m(tmp / "70m"), 3, rows, a.buffer_rows or rows // 4, tmp)


if __name__ == "__main__":
    main()
