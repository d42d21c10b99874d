"""`python -m jaxsae.aot --config C --topology v4-32 [--set ...]`: compile a run's steps ahead of time for a
TPU topology (or this machine's devices) and print per-device memory and FLOPs, then the projected hours,
disk and stream buffer of the config's whole budget (`jaxsae.aot.budget`). The work is in `jaxsae.aot`."""

from __future__ import annotations

import sys

from jaxsae import cli


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m jaxsae.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--topology", default="local",
                    help="TPU slice (v5e-8, v4-32, v5e:2x4, ...) or 'local' for this machine's devices")
    ap.add_argument("--hbm-gib", type=float, default=None, help="device memory to check against "
                    "(default: the TPU generation's HBM; none for local)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="one chip's peak FLOP/s in TFLOP/s for the "
                    "projected hours (default: the TPU generation's bf16 peak; none for local: FLOPs only)")
    ap.add_argument("--mfu", type=float, default=0.4, help="the model FLOPs utilisation assumed for the projected "
                    "hours (default 0.4)")
    ap.add_argument("--stream-rows", type=int, default=None, help="rows of the projected stream-mode shuffle "
                    "buffer (default: SAELens's buffer, 20 x 32 contexts of data.context)")
    a = ap.parse_args(argv)
    return cli.guarded(lambda: compile_and_report(a))


def compile_and_report(a) -> int:
    from jaxsae.config import load_config, resolve_dtypes

    cfg = load_config(a.config, a.overrides)
    if a.hbm_gib is not None and not a.hbm_gib > 0:
        raise cli.UsageError(f"--hbm-gib {a.hbm_gib:g} must be positive (GiB of device memory)")
    if a.peak_tflops is not None and not a.peak_tflops > 0:
        raise cli.UsageError(f"--peak-tflops {a.peak_tflops:g} must be positive (TFLOP/s per chip)")
    if not 0 < a.mfu <= 1:
        raise cli.UsageError(f"--mfu {a.mfu:g} must be in (0, 1]: the share of peak the steps reach")
    if a.stream_rows is not None and a.stream_rows < 1:
        raise cli.UsageError(f"--stream-rows {a.stream_rows} must be at least 1")
    import jax

    from jaxsae.aot import HBM_GIB, _gib, compile_steps, model_config, topology_devices, topology_name
    from jaxsae.aot.budget import PEAK_TFLOPS, format_rows, project

    if a.topology == "local":
        devices, hosts, hbm, peak = jax.devices(), jax.process_count(), a.hbm_gib, a.peak_tflops
    else:
        devices = topology_devices(a.topology)
        hosts = len({d.process_index for d in devices})
        gen = topology_name(a.topology).split(":")[0]
        hbm, peak = a.hbm_gib or HBM_GIB.get(gen), a.peak_tflops or PEAK_TFLOPS.get(gen)
    # `auto` dtypes as a run on these devices would resolve them (a TPU topology: bfloat16), for the steps and
    # the store's bytes alike; there is no store to follow here
    cfg = resolve_dtypes(cfg, devices[0].platform)
    from jaxsae.sweep import members, width_groups

    kind = getattr(devices[0], "device_kind", devices[0].platform)
    fits, groups = True, width_groups(cfg)
    for w, gcfg in groups or [(None, cfg)]:  # a sweep over widths: one program per width
        steps, mesh = compile_steps(gcfg, devices, hosts)
        if w is not None:
            n = len(members(gcfg))
            print(f"width group d_sae {w} ({n} SAE{'s' if n > 1 else ''}, its own program; the collection and the "
                  "disk store below are the run's, once):")
        print(f"{a.topology}: {len(devices)} x {kind} on {hosts} host(s); mesh data={mesh.shape['data']} "
              f"model={mesh.shape['model']}; LM {cfg.model.lm_sharding} in {cfg.model.dtype}, store {cfg.store.dtype}")
        for s in steps:
            flops = f"{s.flops / 1e9:,.1f} GFLOP" if s.flops is not None else "n/a"
            line = (f"  {s.name:<28} per device: args {_gib(s.argument_bytes)}  temp {_gib(s.temp_bytes)}  "
                    f"out {_gib(s.output_bytes)}  peak ~{_gib(s.peak_bytes)}  | {flops} per step")
            if hbm:
                ok = s.peak_bytes <= hbm * 2**30
                fits &= ok
                line += f"  | {'fits' if ok else 'DOES NOT FIT'} in {hbm:g} GiB"
            print(line)
        rows = project(gcfg, model_config(gcfg), steps, mesh, peak, a.mfu, a.stream_rows)
        print("\n".join(format_rows(rows, peak, a.mfu, f"{a.topology} ({len(devices)} devices)")))
    if not fits:
        print("error: a step does not fit in device memory: shard the LM (model.lm_sharding=fsdp or tensor), "
              "raise mesh.model for the SAE, or lower the batch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
