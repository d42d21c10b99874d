"""`python -m jaxsae.aot --config C --topology v4-32 [--set ...]`: compile a run's steps ahead of time for a
TPU topology (or this machine's devices) and print per-device memory and FLOPs. The work is in `jaxsae.aot`."""

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
    a = ap.parse_args(argv)
    return cli.guarded(lambda: compile_and_report(a))


def compile_and_report(a) -> int:
    from jaxsae.config import load_config

    cfg = load_config(a.config, a.overrides)
    if a.hbm_gib is not None and not a.hbm_gib > 0:
        raise cli.UsageError(f"--hbm-gib {a.hbm_gib:g} must be positive (GiB of device memory)")
    import jax

    from jaxsae.aot import HBM_GIB, _gib, compile_steps, topology_devices, topology_name

    if a.topology == "local":
        devices, hosts, hbm = jax.devices(), jax.process_count(), a.hbm_gib
    else:
        devices = topology_devices(a.topology)
        hosts = len({d.process_index for d in devices})
        hbm = a.hbm_gib or HBM_GIB.get(topology_name(a.topology).split(":")[0])
    steps, mesh = compile_steps(cfg, devices, hosts)
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    print(f"{a.topology}: {len(devices)} x {kind} on {hosts} host(s); mesh data={mesh.shape['data']} "
          f"model={mesh.shape['model']}; LM {cfg.model.lm_sharding}")
    fits = True
    for s in steps:
        flops = f"{s.flops / 1e9:,.1f} GFLOP" if s.flops is not None else "n/a"
        line = (f"  {s.name:<28} per device: args {_gib(s.argument_bytes)}  temp {_gib(s.temp_bytes)}  "
                f"out {_gib(s.output_bytes)}  peak ~{_gib(s.peak_bytes)}  | {flops} per step")
        if hbm:
            ok = s.peak_bytes <= hbm * 2**30
            fits &= ok
            line += f"  | {'fits' if ok else 'DOES NOT FIT'} in {hbm:g} GiB"
        print(line)
    if not fits:
        print("error: a step does not fit in device memory: shard the LM (model.lm_sharding=fsdp or tensor), "
              "raise mesh.model for the SAE, or lower the batch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
