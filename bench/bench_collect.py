"""Activation-collection throughput: jaxsae's `lm.residual(tokens, layer)` vs transformers' PyTorch forward.

    python bench/bench_collect.py                          # batch 8 x 256 tokens, hook layer 3
    python bench/bench_collect.py --batch 16 --seq 512 --layer 5
    python bench/bench_collect.py --model path/to/save_pretrained_dir   # only that model

Models (by default both, when present):
* `jaxsae/assets/pythia-stdlib`, the model shipped with the package (skipped if it is not there);
* a random-weight GPT-NeoX of Pythia-70m's shape (hidden 512, 6 layers, 8 heads, intermediate 2048,
  vocab 50304, rotary_pct 0.25, parallel residual), written with `save_pretrained` to a temp dir.
Both sides load the same directory: jaxsae with `jaxsae.models.load_lm`, PyTorch with
`transformers.AutoModelForCausalLM.from_pretrained` (float32, eval, `torch.inference_mode`,
`torch.set_num_threads(cores)`, transformers' default attention implementation; on `--torch-device`,
by default cuda when JAX runs on a GPU and torch sees one, else cpu; each forward synchronised).

Contestants, on the same random token batch:
* jaxsae: `lm.residual(tokens, layer)`, jit-compiled, runs embed + blocks 0..layer only.
* torch full (usual): `model(input_ids, output_hidden_states=True).hidden_states[layer + 1]` — the
  common way to collect; runs every block *and* the unembedding.
* torch base model: `model.gpt_neox(input_ids, output_hidden_states=True)` — every block, no unembedding.
* torch truncated: a forward hook on block `layer` stores its output and raises, so torch also runs
  only embed + blocks 0..layer (the fair comparison of the forward pass itself).
The script also checks that jaxsae's activations match transformers' (max |a - b| / max |b|).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (OtherLoad, interleaved, jax_matmul_gflops, machine_line, n_cores, table, torch_device_like_jax,  # noqa: E402
                    torch_device_note, wait_until_idle, xla_flops)

SHIPPED = Path(__file__).resolve().parent.parent / "jaxsae" / "assets" / "pythia-stdlib"


class _Stop(Exception):
    pass


def write_random_neox(out: Path, hidden: int, layers: int, heads: int, inter: int, vocab: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=inter, rotary_pct=0.25,
                                     use_parallel_residual=True, max_position_embeddings=2048,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def bench_model(name: str, path: Path, batch: int, seq: int, layer: int, iters: int, rounds: int,
                torch_device: str = "cpu", matmul_gflops: float | None = None) -> list[tuple]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxsae.models import load_lm

    lm = load_lm(path)
    layer = lm.check_layer(layer)
    dev = torch.device(torch_device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # eager CUDA is async
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(dev)
    body = hf.base_model  # GPTNeoXModel

    rng = np.random.default_rng(0)
    tok_np = rng.integers(0, lm.vocab_size, (batch, seq), dtype=np.int32)
    tok_jax = jnp.asarray(tok_np)
    tok_pt = torch.from_numpy(tok_np.astype(np.int64)).to(dev)

    out: dict[str, object] = {}

    def run_jax():
        out["jax"] = jax.block_until_ready(lm.residual(tok_jax, layer))

    def run_full():
        with torch.inference_mode():
            out["full"] = hf(tok_pt, output_hidden_states=True).hidden_states[layer + 1]
        sync()

    def run_base():
        with torch.inference_mode():
            out["base"] = body(tok_pt, output_hidden_states=True).hidden_states[layer + 1]
        sync()

    def grab(_module, _inputs, output):
        out["trunc"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    block = body.layers[layer]

    def run_trunc():
        handle = block.register_forward_hook(grab)
        try:
            with torch.inference_mode():
                body(tok_pt)
        except _Stop:
            pass
        else:  # pragma: no cover
            raise RuntimeError("the truncating hook did not fire")
        finally:
            handle.remove()
        sync()

    fns = {"jaxsae residual": run_jax, "torch full (usual)": run_full, "torch base model": run_base,
           "torch truncated": run_trunc}
    t = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t
    with OtherLoad() as load:
        sec = interleaved(fns, iters=iters, rounds=rounds, warmup=1)

    # Reference: the hooked block's output (the residual after block `layer`). transformers'
    # hidden_states[layer + 1] is the same tensor except for the last block, where it is taken after
    # the final norm.
    ref = out["trunc"].cpu().numpy()
    a = np.asarray(out["jax"])
    rel = float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))
    last = layer == lm.n_layers - 1
    rel_hs = float(np.max(np.abs(out["full"].cpu().numpy() - ref)) / np.max(np.abs(ref)))
    n = batch * seq
    j = sec["jaxsae residual"]
    rows = []
    for k, s in sec.items():
        rows.append((f"{name}: {k}", f"{s * 1e3:.1f}", f"{n / s:,.0f}", f"{s / j:.2f}x"))
    print(f"\n{name}: {lm.config.arch}, d_model {lm.d_model}, {lm.n_layers} layers, vocab {lm.vocab_size}; "
          f"hook layer {layer}; {batch} x {seq} tokens; jaxsae compile {compile_s:.1f}s")
    print(f"activations: jaxsae vs transformers' block-{layer} output: max rel err {rel:.2e}"
          + (" (last block: hidden_states[-1] is after the final norm, not compared)" if last else
             f"; transformers hidden_states[{layer + 1}] vs the same: {rel_hs:.1e}"))
    print(table(rows, ("contestant", "ms/batch", "tokens/s", "jaxsae speed-up")))
    print(load.report())
    # The work of a forward to the hook: XLA's FLOP count of jaxsae's program (torch's matmuls are the
    # same; its fused causal attention skips the masked half, jaxsae's blocked one most of it). At the
    # measured matmul rate this is the fastest any forward can be on this device.
    gf = xla_flops(lm._jit_residual.lower(lm.params, tok_jax, layer, None).compile()) / 1e9
    if matmul_gflops:
        tt = sec["torch truncated"]
        print(f"work: {gf:.1f} GFLOP per batch; jaxsae runs it at {gf / j:.0f} GFLOP/s "
              f"({100 * gf / j / matmul_gflops:.0f}% of the measured {matmul_gflops:.0f} GFLOP/s matmul), torch "
              f"truncated at {gf / tt:.0f} GFLOP/s ({100 * gf / tt / matmul_gflops:.0f}%); 1.3x of torch truncated "
              f"needs {1.3 * gf / tt:.0f} GFLOP/s ({100 * 1.3 * gf / tt / matmul_gflops:.0f}% of the matmul rate)")
    return [(name, {k: n / s for k, s in sec.items()}, rel)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a save_pretrained directory (default: shipped + random 70m-like)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layer", type=int, default=3, help="hook layer (residual after this block)")
    ap.add_argument("--iters", type=int, default=3, help="timed batches per round (best of --rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512, help="random model: hidden size")
    ap.add_argument("--layers", type=int, default=6, help="random model: number of blocks")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--no-shipped", action="store_true", help="skip jaxsae/assets/pythia-stdlib")
    ap.add_argument("--no-wait", action="store_true", help="don't wait for other heavy jobs to finish")
    ap.add_argument("--torch-device", default=None,
                    help="device of the PyTorch forward (default: cuda when JAX runs on a GPU and torch sees "
                         "one, else cpu: the device jaxsae runs on)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(n_cores())
    torch_device = args.torch_device or torch_device_like_jax()
    wait_until_idle(force=args.no_wait)
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {torch_device}"
          + torch_device_note(torch_device))
    gflops = jax_matmul_gflops()
    print(f"measured 2048^3 float32 jnp.dot: {gflops:.0f} GFLOP/s")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            models = [(Path(args.model).name, Path(args.model))]
        else:
            models = []
            if SHIPPED.is_dir() and not args.no_shipped:
                models.append(("pythia-stdlib", SHIPPED))
            elif not args.no_shipped:
                print(f"(no shipped model at {SHIPPED}; benchmarking the random model only)")
            rand = write_random_neox(Path(tmp) / "neox", args.hidden, args.layers, args.heads,
                                     args.intermediate, args.vocab)
            models.append((f"random neox {args.hidden}x{args.layers}", rand))
        for name, path in models:
            layer = args.layer
            results += bench_model(name, path, args.batch, args.seq, layer, args.iters, args.rounds,
                                   torch_device, gflops)

    print("\nsummary (jaxsae tokens/s over each torch contestant; goal >= 1.3x of truncated):")
    for name, tps, rel in results:
        j = tps["jaxsae residual"]
        parts = [f"{k.replace('torch ', '')} {j / v:.2f}x" for k, v in tps.items() if k.startswith("torch")]
        fair = j / tps["torch truncated"]
        print(f"  {name}: " + ", ".join(parts) + f"; vs truncated (fair) {'met' if fair >= 1.3 else 'NOT met'}; "
              f"max rel err {rel:.1e}")


if __name__ == "__main__":
    main()
