"""What a config's whole budget costs on a topology: hours per phase, the disk of its store, the HBM of a
stream buffer. `project` is pure arithmetic over the compiled steps' FLOPs and the config; `python -m
jaxsae.aot` prints its rows after the per-step lines.

Hours of a training phase = steps × FLOPs per step per device / (peak FLOP/s per chip × MFU) / 3600,
where steps = tokens of the phase // tokens per step (as the trainer counts them) and the FLOPs are XLA's
cost analysis of the compiled step. For an SPMD program that number is per device: the cost analysis
reads the partitioned module each device runs (a matmul split 8 ways over `data` reports 1/8 of the
unsplit one), so work repeated across a mesh row (a replicated LM under mesh.model > 1) is counted as
each device does it. Every device runs its share at once, so time is per-device FLOPs over one chip's
rate. The MFU is an assumption, not a measurement.

The collection pass (the LM forward to the hook over store.tokens) is estimated, not compiled:
2 × (parameters of blocks 0..hook) + 2 × (blocks 0..hook) × context × (heads × head_dim) FLOPs per
token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1: the forward pass's
2N plus the attention scores and their weighted sum), the embedding lookup taken as free, over the
mesh's data axis (and its model axis for a tensor-sharded LM).

Every hour here is compute at the assumed MFU: reading the store (its bytes are printed), the text
pipeline and evaluation are not counted, so it is a floor for the run, not a forecast.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

# Peak dense bf16 FLOP/s per chip (one jax device per chip; v4 and v5p in megacore mode), from Google
# Cloud's TPU system-architecture pages, "Peak compute per chip (bf16)":
# https://cloud.google.com/tpu/docs/v4 (275 teraflops), .../v5e (197 TFLOPs), .../v5p (459 TFLOPs),
# .../v6e (918 TFLOPs).
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

# SAELens's default mixing buffer holds n_batches_in_buffer (20) × store_batch_size_prompts (32) contexts
# of activations (sae_lens LanguageModelSAERunnerConfig defaults; ActivationsStore fills and shuffles
# that many rows); store.buffer_rows's default is that buffer at context 1024.
SAELENS_BUFFER_CONTEXTS = 20 * 32

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the projection. Time rows (a phase, the collection, the total) carry FLOPs per device
    and hours (None without a peak); size rows (disk, stream) carry bytes."""

    name: str
    steps: int | None = None  # optimiser steps of a training phase
    step_flops: float | None = None  # per device, per step (XLA's cost analysis)
    flops: float | None = None  # per device, the whole phase
    hours: float | None = None
    bytes: int | None = None  # disk: the whole store; stream: per device
    note: str = ""


def collection_flops_per_token(mcfg, layer: int, context: int) -> float:
    """Forward FLOPs per token to the residual after block `layer` (Kaplan et al. 2020's 2N + 2·L·ctx·d_attn)."""
    from jaxsae.models.lm import abstract_params

    params = abstract_params(mcfg)
    n_blocks = sum(int(np.prod(a.shape)) for i in range(layer + 1)
                   for a in jax.tree.leaves(params[f"layers_{i}"]))
    d_attn = mcfg.n_heads * (getattr(mcfg, "head_dim", None) or mcfg.d_model // mcfg.n_heads)
    return 2.0 * n_blocks + 2.0 * (layer + 1) * context * d_attn


def project(cfg, mcfg, steps, mesh, peak_tflops: float | None, mfu: float,
            stream_rows: int | None = None) -> list[Row]:
    """The whole budget of `cfg` on `mesh`: one time row per listed phase (from `steps`, the compiled
    steps of `jaxsae.aot.compile_steps`), the collection (or stream), the total, then the disk store and the
    stream mode's buffer of `stream_rows` rows (default store.buffer_rows) split over the data axis. peak_tflops: one
    chip's peak (TFLOP/s); None leaves hours None."""
    from jaxsae import config as C

    rate = None if peak_tflops is None else peak_tflops * 1e12 * mfu
    # `auto` dtypes as the mesh's devices would run them (a caller may pass the config unresolved)
    cfg = C.resolve_dtypes(cfg, next(iter(mesh.devices.flat)).platform)

    def hours(f):
        return None if rate is None or f is None else f / rate / 3600

    data, width = mesh.shape["data"], _DTYPE_BYTES[cfg.store.dtype] * mcfg.d_model
    rows = []
    stream = cfg.store.mode == "stream"
    if "mse" in cfg.phases:  # the MSE phase reads the store: its rows are collected first (or streamed)
        per_context = cfg.data.context - (0 if cfg.data.include_first_position else 1)
        lm_tokens = math.ceil(cfg.store.tokens / per_context) * cfg.data.context
        if stream:  # every block the MSE phase's rows come from
            from jaxsae.data.stream import blocks_for, stream_spec

            spec = stream_spec(cfg)
            lm_tokens = blocks_for(spec, cfg.mse.tokens) * spec.block_contexts * cfg.data.context
        # the collection splits its batch over `data`; along `model` a replicated or fsdp LM repeats the
        # forward, a tensor-sharded one splits its matmuls (taken as an even split)
        split = data * (mesh.shape["model"] if cfg.model.lm_sharding == "tensor" else 1)
        f = lm_tokens * collection_flops_per_token(mcfg, cfg.hook.layer, cfg.data.context) / split
        rows.append(Row(f"{'stream' if stream else 'collect'} (LM to block {cfg.hook.layer})", flops=f, hours=hours(f),
                        note=f"{lm_tokens:,} LM tokens; estimated 2N + 2·L·ctx·d_attn, not compiled"))
    for s in steps:
        n = C.phase_tokens(cfg, s.phase) // C.phase_batch_tokens(cfg, s.phase)
        f = None if s.flops is None else n * s.flops
        rows.append(Row(s.phase, steps=n, step_flops=s.flops, flops=f, hours=hours(f)))
    known = [r.flops for r in rows]
    total = sum(known) if None not in known else None
    rows.append(Row("total", flops=total, hours=hours(total)))
    if "mse" in cfg.phases and not stream:
        rows.append(Row("disk store", bytes=cfg.store.tokens * width,
                        note=f"{cfg.store.tokens:,} rows x {mcfg.d_model} x {cfg.store.dtype}"))
    # stream mode holds a window of buffer_rows and the next window's carried half (`jaxsae.data.stream`)
    n_rows = stream_rows if stream_rows is not None else cfg.store.buffer_rows
    rows.append(Row("stream buffer", bytes=math.ceil(1.5 * n_rows / data) * width,
                    note=f"1.5 x {n_rows:,} rows x {mcfg.d_model} x {cfg.store.dtype} over data={data}"
                         + ("" if stream else "; with store.mode=stream")))
    return rows


def format_rows(rows: list[Row], peak_tflops: float | None, mfu: float, where: str) -> list[str]:
    """The printed block."""
    head = (f"projection for the whole budget: {where} at {peak_tflops:g} TFLOP/s per chip x MFU {mfu:g} "
            f"(an assumption); compute only, a floor: store reads, text and evaluation not counted"
            if peak_tflops is not None else
            "projection for the whole budget: FLOPs only (give --peak-tflops for hours)")
    out = [head]
    for r in rows:
        if r.name == "disk store":
            out.append(f"  {'disk store':<28} {r.bytes / 1e9:,.1f} GB ({r.note}; zarr metadata and shard "
                       f"indexes add ~20 B per ~1 MiB chunk: negligible)")
        elif r.name == "stream buffer":
            out.append(f"  {'stream buffer':<28} {_bytes(r.bytes)} per device ({r.note})")
        else:
            what = "n/a" if r.flops is None else _flops(r.flops)
            if r.step_flops is not None:
                what = f"{r.steps:,} steps x {_flops(r.step_flops)} = {what}"
            h = "" if r.hours is None else f"  ~{_duration(r.hours)}"
            out.append(f"  {r.name:<28} per device: {what}{h}" + (f"  ({r.note})" if r.note else ""))
    return out


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if f >= scale:
            return f"{f / scale:,.1f} {unit}"
    return f"{f / 1e6:,.1f} MFLOP"


def _duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 0.1 else f"{hours * 3600:.1f} s"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
