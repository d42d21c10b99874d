"""Throughput of ShuffledReader on a store of realistic size, to compare with the SAE step's token rate.

    python bench/bench_reader.py --rows 1000000 --d-model 768 --path /tmp/bench_store
    python bench/bench_reader.py --path /tmp/bench_store --reuse --step-ms 20

Builds (or reuses) a store of random f32/bf16 rows on local disk, then reports
  * sequential: rows/s of plain chunk-aligned ``store.read`` of 64 MB blocks (the I/O ceiling),
  * reader: rows/s of ``ShuffledReader`` batches with a consumer that does nothing,
  * with --step-ms: how long a consumer that "trains" for that long per step waits on ``next()``.
A store just written sits in the OS page cache, so these are warm-cache numbers unless you drop
the cache first (``sync; echo 3 > /proc/sys/vm/drop_caches`` as root).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jaxsae.data.reader import ShuffledReader
from jaxsae.data.store import open_store, write_array_store


class RandomRows:
    """f32[rows, d_model] of N(0, 1) generated per slice, so building the store needs no big array."""

    def __init__(self, rows: int, d_model: int):
        self.shape = (rows, d_model)

    def __getitem__(self, sl: slice) -> np.ndarray:
        rng = np.random.default_rng(sl.start)
        return rng.standard_normal((sl.stop - sl.start, self.shape[1]), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="/tmp/jaxsae_bench_store")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shard-chunks", type=int, default=16)
    ap.add_argument("--reuse", action="store_true", help="use the store already at --path")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--window-mb", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch")
    args = ap.parse_args()

    if args.reuse:
        store = open_store(args.path)
    else:
        t = time.perf_counter()
        store = write_array_store(args.path, RandomRows(args.rows, args.d_model), dtype=args.dtype,
                                  shard_chunks=args.shard_chunks, scale=1.0)
        dt = time.perf_counter() - t
        print(f"wrote {store.n_tokens:,} x {store.d_model} {store.dtype} in {dt:.1f}s "
              f"({store.n_tokens / dt:,.0f} rows/s)")
    row_mb = store.d_model * (2 if store.dtype == "bfloat16" else 4) / 2**20
    print(f"store: {store!r}; chunk_rows={store.chunk_rows}, shard_rows={store.shard_rows}")

    block = max(store.chunk_rows, int(64 / row_mb) // store.chunk_rows * store.chunk_rows)
    n = min(store.n_tokens, args.batches * args.batch_size)
    t = time.perf_counter()
    for a in range(0, n, block):
        store.read(a, min(n, a + block))
    dt = time.perf_counter() - t
    print(f"sequential read: {n / dt:,.0f} rows/s ({n * row_mb / dt:,.0f} MB/s)")

    with ShuffledReader(store, args.batch_size, seed=0, window_bytes=args.window_mb << 20) as reader:
        t0 = time.perf_counter()
        next(reader)
        first = time.perf_counter() - t0
        waited, t = 0.0, time.perf_counter()
        for _ in range(args.batches - 1):
            w = time.perf_counter()
            next(reader)
            waited += time.perf_counter() - w
            if args.step_ms:
                time.sleep(args.step_ms / 1e3)
        dt = time.perf_counter() - t
    rows = (args.batches - 1) * args.batch_size
    print(f"reader: first batch after {first:.2f}s; then {rows / dt:,.0f} rows/s "
          f"({rows * row_mb / dt:,.0f} MB/s) with batch {args.batch_size}, window {args.window_mb} MB")
    if args.step_ms:
        print(f"consumer waited {waited:.2f}s of {dt:.2f}s ({100 * waited / dt:.1f}%) "
              f"at {args.step_ms} ms/step "
              f"= {args.batch_size / args.step_ms * 1e3:,.0f} tokens/s demanded")


if __name__ == "__main__":
    main()
