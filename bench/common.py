"""Shared helpers for the bench scripts: waiting for a quiet machine, timing, the matmul peak, tables.

Benchmarks here report *ratios against a reference measured in the same run*, so that numbers from
different machines (or a busy machine) stay comparable; absolute tokens/s are printed for context only.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Callable

# Other jobs that would make timings meaningless (pgrep -f regexes): the LM demo, training runs, tests.
BUSY_PATTERNS = (r"python.* -m jaxsae\.", r"python.* -m pytest", r"bin/pytest")


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def busy_jobs() -> list[str]:
    """Command lines of running processes matching BUSY_PATTERNS (excluding this process)."""
    found = []
    for pat in BUSY_PATTERNS:
        r = subprocess.run(["pgrep", "-af", pat], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            pid, _, cmd = line.partition(" ")
            if int(pid) != os.getpid() and "pgrep" not in cmd:
                found.append(line)
    return found


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine incl. steal, CPU-seconds of this process) since boot/start."""
    import resource

    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime


class OtherLoad:
    """Context manager measuring the CPU time *other* processes used while it was open.

    `fraction` is that time over (wall x cores): 0 on a quiet machine; above ~0.05 the timings taken
    inside are suspect (on a 2-core machine one busy neighbour is 0.5).
    """

    def __enter__(self):
        self.t, (self.busy, self.own) = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        busy, own = _cpu_seconds()
        wall = time.perf_counter() - self.t
        self.other_s = max(0.0, (busy - self.busy) - (own - self.own))
        self.fraction = self.other_s / max(wall * n_cores(), 1e-9)
        return False

    def report(self) -> str:
        msg = f"other processes used {100 * self.fraction:.0f}% of the machine during the timing"
        return msg + ("" if self.fraction < 0.05 else "  <-- NOT QUIET: numbers unreliable, rerun")


def other_load(seconds: float = 3.0) -> float:
    """Fraction of the machine used by other processes over a `seconds` sample."""
    with OtherLoad() as o:
        time.sleep(seconds)
    return o.fraction


def wait_until_idle(max_wait_s: float = 900.0, poll_s: float = 30.0, force: bool = False,
                    max_other: float = 0.1) -> bool:
    """Block while a known heavy job runs or others load the CPU (poll every poll_s, at most
    max_wait_s). Returns True if the machine was quiet."""
    waited = 0.0
    while True:
        jobs = busy_jobs()
        if not jobs:
            load = other_load()
            if load <= max_other:
                return True
            jobs = [f"unnamed load: {100 * load:.0f}% of the machine"]
        if force or waited >= max_wait_s:
            print(f"WARNING: timing while other jobs run; numbers are unreliable: {jobs}", file=sys.stderr)
            return False
        print(f"waiting for {jobs} to finish ({waited:.0f}s so far)", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        waited += poll_s


def time_fn(fn: Callable[[], None], iters: int, warmup: int = 2) -> float:
    """Seconds per call of fn (which must block until its work is done), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def interleaved(fns: dict[str, Callable[[], None]], iters: int, rounds: int = 3,
                warmup: int = 2) -> dict[str, float]:
    """Best over `rounds` of the mean seconds/call of `iters` calls, the fns taking turns each round.

    Taking turns (A B A B ...) spreads slow drifts of the machine (thermal, other load) over all
    contestants instead of penalising whichever ran last; the best round is the least disturbed one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(time_fn(fn, iters, warmup=0))
    return {k: min(v) for k, v in samples.items()}


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (`jit(f).lower(...).compile()`); nan where the backend
    gives none."""
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))


def jax_matmul_gflops(n: int = 2048, iters: int = 5, dtype: str = "float32") -> float:
    """Measured GFLOP/s of an n^3 jit-compiled jnp.dot on the default JAX device (2 n^3 FLOPs)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    best = min(time_fn(lambda: jax.block_until_ready(f(a, b)), 1, warmup=0) for _ in range(iters))
    return 2 * n**3 / best / 1e9


def torch_device_like_jax() -> str:
    """The torch device matching JAX's default device: "cuda" when JAX runs on a GPU and torch sees one,
    else "cpu" (the PyTorch references must run where jaxsae does, or the ratio compares two devices)."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_device_note(device: str) -> str:
    """'' when `device` is where JAX runs, else a warning to print beside the table."""
    import jax

    on = "gpu" if device.startswith("cuda") else device.split(":")[0]
    jax_on = jax.default_backend()
    return "" if on == jax_on else (f"  <-- WARNING: the torch reference runs on {device}, jaxsae on {jax_on}; "
                                    "the ratio compares two devices")


def machine_line() -> str:
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d')}  jax {jax.__version__} on {dev.platform} ({dev.device_kind}); "
            f"host: {cpu}, {n_cores()} cores")


def table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
