"""Per-device memory of the MSE step with d_sae split over `model`: jaxsae's selection
(`jaxsae.sae.selection`) against `lax.top_k` over the sharded latent axis everywhere, compiled ahead of
time in one run (nothing is allocated).

    python bench/bench_topk_memory.py [--topology v5e-8] [--d-model 2304] [--d-sae 131072] [--k 80]
                                      [--batch 4096] [--kinds topk batchtopk]

`--topology v5e-8` (the default) compiles with the TPU compiler and needs libtpu (`pip install -e ".[tpu]"`),
not a TPU; `--topology local` compiles for this machine's devices (8 fake CPU devices:
XLA_FLAGS=--xla_force_host_platform_device_count=8). The mesh is (data 1, model 8): every device holds
the whole batch and 1/8 of the latents. For each SAE kind it prints the step's per-device temp memory
with both selections and their ratio (issue goal: ≤ 1/4), the largest all-gather in each compiled
program, and whether one gathers [batch, d_sae]. jaxsae's selection is two-stage for a row top-k off
TPU and for BatchTopK's batch-wide top-k everywhere; on TPU a row top-k is `lax.top_k`, which the TPU
compiler partitions itself.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """The result shapes of the all-gathers in a compiled program's HLO text."""
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)]


def compile_mse_step(kind: str, a, devices, two_stage: bool):
    """(summary, hlo text) of the MSE step for `devices` on mesh (1, 8); with two_stage False every
    selection runs as one lax.top_k over the split axis (what the step did before the two-stage top-k)."""
    import jaxsae.sae.selection as selection
    from jaxsae.aot import _summarise
    from jaxsae.config import load_config
    from jaxsae.sharding import abstract_with
    from jaxsae.train.context import mesh_for
    from jaxsae.train.mse import mse_parts
    from jaxsae.validate import sae_config

    import jax
    import jax.numpy as jnp

    cfg = load_config(ROOT / "configs" / "gemma-2-2b-topk-k80.yaml",
                      [f"sae.kind={kind}", f"sae.d_sae={a.d_sae}", f"sae.k={a.k}", f"mse.batch_size={a.batch}",
                       "mesh.data=1", "mesh.model=8", "phases=[mse]", "sae.decode=dense"])
    sae_cfg = sae_config(cfg, a.d_model)
    mesh = mesh_for(cfg, devices, len({d.process_index for d in devices}))
    spec = selection.context_spec
    if not two_stage:  # as if the rules did not split d_sae: plain lax.top_k, XLA gathers what it needs
        selection.context_spec = lambda *_: None
    try:
        p = mse_parts(cfg, sae_cfg, mesh)
        x = jax.ShapeDtypeStruct((a.batch, a.d_model), jnp.bfloat16, sharding=p.batch_sh)
        compiled = p.step.lower(abstract_with(p.abstract, p.state_sh), x).compile()
    finally:
        selection.context_spec = spec
    return _summarise("mse step", compiled), compiled.as_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e-8")
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--k", type=int, default=80)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--kinds", nargs="+", default=["topk", "batchtopk"])
    a = ap.parse_args()

    import jax

    from jaxsae.aot import topology_devices

    devices = jax.devices() if a.topology == "local" else topology_devices(a.topology)
    if len(devices) < 8:
        print(f"{a.topology} has {len(devices)} devices; the mesh (1, 8) needs 8", file=sys.stderr)
        return 2
    devices = devices[:8]
    kind_name = getattr(devices[0], "device_kind", devices[0].platform)
    gib = 2.0 ** 30
    print(f"# MSE step per-device memory, d_sae split over model ({a.topology}: {kind_name}, jax {jax.__version__})")
    print(f"mesh (data 1, model 8); d_model {a.d_model}, d_sae {a.d_sae}, k {a.k}, batch {a.batch} rows (bfloat16)\n")
    print("| kind | selection | temp GiB | args GiB | largest all-gather | gathers [batch, d_sae] |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for kind in a.kinds:
        temps = {}
        for two_stage in (False, True):
            s, hlo = compile_mse_step(kind, a, devices, two_stage)
            gathers = all_gathers(hlo)
            big = max(gathers, key=math.prod, default=())
            full = any(g == (a.batch, a.d_sae) for g in gathers)
            name = "jaxsae's selection" if two_stage else "lax.top_k everywhere"
            temps[two_stage] = s.temp_bytes
            print(f"| {kind} | {name} | {s.temp_bytes / gib:.2f} | {s.argument_bytes / gib:.2f} | "
                  f"{list(big) if big else '-'} | {'yes' if full else 'no'} |", flush=True)
        ratios[kind] = temps[True] / temps[False]
    print()
    for kind, r in ratios.items():
        print(f"{kind}: temp with jaxsae's selection / with lax.top_k everywhere = {r:.2f}x (goal ≤ 0.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
