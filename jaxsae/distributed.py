"""Multi-process JAX: start it when the environment asks, and the few host-side collectives we need.

One process per host (TPU pods) or per GPU. Every process runs the same program; arrays span the
devices of all processes (`jaxsae.sharding.make_mesh`), each process feeds its own slice of every
batch, and only process 0 writes logs, metrics and reports. Orbax and tensorstore write from every
process, so on more than one host the checkpoint directory and the store must be shared (`gs://`).

Environment (read by `maybe_initialize`):

    JAXSAE_DISTRIBUTED=auto     jax.distributed.initialize() detects the cluster (TPU pods, SLURM,
                                Open MPI, ...)
    JAXSAE_COORDINATOR=host:port, JAXSAE_NUM_PROCESSES=N, JAXSAE_PROCESS_ID=i
                                explicit form (GPU hosts without a scheduler; tests on localhost)
"""

from __future__ import annotations

import os

import jax

ENV_AUTO = "JAXSAE_DISTRIBUTED"
ENV_COORDINATOR = "JAXSAE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSAE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSAE_PROCESS_ID"

_started = False


def maybe_initialize(environ=os.environ) -> bool:
    """Initialises jax.distributed if the environment says so; returns whether it did.

    Must run before anything touches a device. Raises ValueError naming the missing variable when the
    explicit form is incomplete.
    """
    global _started
    if _started:
        return True
    coordinator = environ.get(ENV_COORDINATOR)
    if coordinator:
        missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not environ.get(k)]
        if missing:
            raise ValueError(f"{ENV_COORDINATOR} is set but {', '.join(missing)} is not: set "
                             f"{ENV_NUM_PROCESSES} (how many processes) and {ENV_PROCESS_ID} (0-based) too")
        _enable_cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(environ[ENV_NUM_PROCESSES]),
                                   process_id=int(environ[ENV_PROCESS_ID]))
    elif environ.get(ENV_AUTO, "").lower() in ("1", "auto", "true", "yes"):
        jax.distributed.initialize()
    else:
        return False
    _started = True
    return True


def _enable_cpu_collectives() -> None:
    # CPU devices of different processes talk through gloo; without it a cross-process computation on
    # CPU fails at run time. Accelerators ignore the flag.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # an older jax without the option: CPU multi-process is then unsupported anyway
        pass


def is_main() -> bool:
    """True on the process that writes logs, metrics and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
