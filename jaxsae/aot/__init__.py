"""`python -m jaxsae.aot --config CONFIG [--topology v4-32] [--set key=value ...]`

Compiles the MSE step and the fused KL+MSE step ahead of time, from abstract inputs, for the run's
mesh on a named TPU topology (or on this machine's devices), and prints each step's per-device memory
and FLOPs, then what the config's whole budget projects to (`jaxsae.aot.budget`: hours per phase at
a peak and an assumed MFU, the disk store, a stream buffer). A mesh that does not divide the slice, a
batch that does not split, or a model that does not fit shows up here, on a laptop, before the pod is
paid for.

TPU topologies need `libtpu` installed (`pip install "jax[tpu]"`); no TPU is needed to compile. Names
are slice names (`v5e-8`, `v4-32`, `v5p-64`, `v6e-16`: cores for v4/v5p, chips for v5e/v6e) or
`jax.experimental.topologies` names (`v5e:2x4`, `v4:2x2x4`).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

from jaxsae.errors import UserError

# Slice name -> chip topology. v4 and v5p slice names count TensorCores (2 per chip).
_TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v4-256": "v4:4x4x8", "v4-512": "v4:4x8x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
# High-bandwidth memory per chip (one device per chip), for the "does it fit" line (public spec sheets).
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}


class AOTError(UserError, ValueError):
    """A topology that cannot be used; the message names the fix."""


def topology_name(name: str) -> str:
    """`v5e-8` / `v5litepod-8` / `v5e:2x4` -> the topologies module's name (`v5e:2x4`)."""
    gen, _, rest = name.partition("-")
    name = f"{_ALIASES.get(gen, gen)}-{rest}" if rest else name
    if ":" in name:
        return name
    if name not in _TOPOLOGIES:
        raise AOTError(f"unknown TPU topology {name!r}: use one of {', '.join(_TOPOLOGIES)} or a chip "
                       f"topology such as v5e:2x4")
    return _TOPOLOGIES[name]


def topology_devices(name: str) -> list:
    """The devices of a TPU slice, described without the hardware (needs libtpu)."""
    from jax.experimental import topologies

    topo = topology_name(name)
    # v5e-8 / v6e-8 are one host with 8 chips; libtpu's default is 4 chips per host
    kw = {"chips_per_host_bounds": (2, 4, 1)} if topo in ("v5e:2x4", "v6e:2x4") else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw)
    except Exception as e:  # no libtpu, or a topology it does not know
        raise AOTError(f"cannot describe TPU topology {topo!r} ({type(e).__name__}: {str(e)[:300]}); "
                       f"install libtpu with `pip install \"jax[tpu]\"` (no TPU needed to compile)") from e
    # v4 / v5p run in megacore mode (one device per chip, as jax.make_mesh requires) but are described
    # per TensorCore: keep one device per chip
    return [d for d in desc.devices if getattr(d, "core_on_chip", 0) == 0]


@dataclasses.dataclass
class Compiled:
    name: str
    flops: float | None  # per device (the partitioned program's), XLA's cost analysis
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int  # donated inputs reused as outputs
    phase: str = ""  # the phase (jaxsae.phases) whose step this is

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _compile(name: str, lowered, phase: str) -> Compiled:
    t0 = time.time()
    print(f"compiling {name} ...", file=sys.stderr, flush=True)  # minutes for a 2B model on a laptop
    compiled = lowered.compile()
    print(f"  compiled {name} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return dataclasses.replace(_summarise(name, compiled), phase=phase)


def _summarise(name: str, compiled) -> Compiled:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    get = lambda attr: int(getattr(mem, attr, 0) or 0)  # noqa: E731
    return Compiled(name, flops, get("argument_size_in_bytes"), get("output_size_in_bytes"),
                    get("temp_size_in_bytes"), get("generated_code_size_in_bytes"), get("alias_size_in_bytes"))


def model_config(cfg):
    """The LM's config, from model.path's config.json (a hub id fetches that file alone, not the weights)."""
    from jaxsae.models import read_config
    from jaxsae.models.hf import resolve
    from jaxsae.models.shipped import resolve_model_path

    return read_config(resolve(resolve_model_path(cfg.model.path), patterns=["config.json"]), cfg.model.dtype)


def compile_steps(cfg, devices, n_processes: int = 1) -> tuple[list[Compiled], object]:
    """Lowers and compiles the step of every listed phase for `devices` (a list, maybe of a described
    topology), from the trainer's own builders (`jaxsae.train.mse.mse_parts`, `jaxsae.train.kl_phase.kl_parts`).
    Returns the summaries and the mesh. Nothing is allocated: every input is a ShapeDtypeStruct."""
    from jaxsae import phases as P
    from jaxsae.config import resolve_dtypes
    from jaxsae.models.lm import LM, abstract_params
    from jaxsae.sharding import abstract_with, lm_param_shardings
    from jaxsae.splice import Splice
    from jaxsae.train.context import mesh_for
    from jaxsae.train.kl_phase import kl_parts
    from jaxsae.train.mse import mse_parts
    from jaxsae.validate import check_against_model, sae_config

    cfg = resolve_dtypes(cfg, devices[0].platform)  # the target's platform (a TPU topology: bfloat16), not this host's
    mcfg = model_config(cfg)
    check_against_model(cfg, mcfg.n_layers, mcfg.d_model)
    mesh = mesh_for(cfg, devices, n_processes)
    from jaxsae.sweep import group_sae, members

    ms = members(cfg)  # a sweep compiles its stacked steps, built at the largest k
    sae_cfg = group_sae(sae_config(cfg, mcfg.d_model), ms) if ms else sae_config(cfg, mcfg.d_model)
    lm_sh = lm_param_shardings(mcfg, mesh, cfg.model.lm_sharding)
    out = []
    for phase in P.ordered(cfg.phases):
        if phase.name == "mse":
            p = mse_parts(cfg, sae_cfg, mesh, ms)
            dtype = jax.numpy.bfloat16 if cfg.store.dtype == "bfloat16" else np.dtype(cfg.store.dtype)
            x = jax.ShapeDtypeStruct((cfg.mse.batch_size, mcfg.d_model), dtype, sharding=p.batch_sh)
            out.append(_compile("mse step", p.step.lower(abstract_with(p.abstract, p.state_sh), x), phase.name))
            continue
        p = kl_parts(cfg, phase, sae_cfg, mesh, Splice(LM(mcfg, None), cfg.hook.layer, 1.0,
                                                        cfg.data.include_first_position),
                     lm_sh, _abstract_first(cfg, phase, sae_cfg, mcfg), continues=bool(phase.starts), members=ms)
        tokens = jax.ShapeDtypeStruct((getattr(cfg, phase.section).batch_sequences, cfg.data.context), np.int32,
                                      sharding=p.batch_sh)
        sec = getattr(cfg, phase.section)
        probe = () if p.probe_sh is None else (jax.ShapeDtypeStruct(
            (sec.l0_probe_sequences // sec.batch_sequences, sec.batch_sequences * cfg.data.context, mcfg.d_model),
            np.float32, sharding=p.probe_sh),)
        lowered = p.step.lower(abstract_with(p.abstract, p.state_sh), abstract_with(abstract_params(mcfg), lm_sh),
                               tokens, *probe)
        out.append(_compile(f"{phase.name} step (fused KL+MSE)", lowered, phase.name))
    return out, mesh


def _abstract_first(cfg, phase, sae_cfg, mcfg):
    """fresh(tx) -> the phase's first state, from abstract SAE and LM params."""
    from jaxsae.models.lm import abstract_params, param_axes
    from jaxsae.sae import init_sae
    from jaxsae.train.finetune import init_ft_state
    from jaxsae.train.kl_phase import probe_batches
    from jaxsae.train.pipeline import adapter_of_cfg

    dead = np.zeros(sae_cfg.d_sae, np.int32)
    compose = adapter_of_cfg(cfg, mcfg.d_model, mcfg.n_layers) if phase.holds == "adapter" else None

    n_probe = probe_batches(cfg, phase, sae_cfg, compose is None, bool(phase.starts))

    def fresh(tx):
        sae = init_sae(sae_cfg, jax.random.PRNGKey(0))
        if compose is None:
            return init_ft_state(sae, tx, sae_cfg, dead, sae_cfg.l1_coeff, 0.0, 0, probe_batches=n_probe)
        trainable, _ = compose.init(jax.random.PRNGKey(0), sae, abstract_params(mcfg), param_axes(mcfg))
        return init_ft_state(trainable, tx, sae_cfg, dead, sae_cfg.l1_coeff, 0.0, 0, frozen=sae)

    return fresh


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
