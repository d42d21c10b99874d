"""Sweeps: many SAEs trained as one program, with a leading SAE axis, sharing the LM and the data.

A config's `sweep:` names the keys that vary and their values; the members are their cartesian product
(or an explicit list under `members:`):

    sweep:
      sae.k: [8, 16, 32, 64]
      mse.seed: [0, 1]

Each member has a readable name (`k16-s0`) and is exactly the single run `member_config(cfg, m)` would
train: the trainer vmaps one member's step over the stacked state (params, optimiser moments, dead
counters: a leading axis of N), with the member's hyperparameters as traced arrays (`hparams`). What is
shared is computed once per step: the MSE phase's batch of store rows; the KL phases' prefix (the LM up
to the hook) and clean suffix; evaluation's clean and zero-ablated branches.

What may vary (`SWEEPABLE`), and how it enters the one compiled program:
    sae.k              members that share a k run vmapped at that static k, one group after another in
                       the same program (`k_groups`); where the mesh splits the SAE axis, and in
                       evaluation, every member takes the top-k at the largest k, then masks the tail past
                       its own k (lax.top_k is sorted, so the first k of the top-kmax are the top-k)
    sae.l1_coeff       a traced coefficient (ReLU); the fine-tune's controller starts from it
    mse.lr, finetune.lr, e2e.lr   a traced learning rate (the schedule's shape is the section's)
    mse.seed           the SAE's initialisation; the data order is the run's `mse.data_seed` (default: the
                       base config's mse.seed) for every member, so members see the same batches
    finetune.kl_share  a traced KL share (> 0: the control's 0 is a phase of its own)
    sae.d_sae          a shape, not a traced value: the members of each width are a sweep of their own
                       (`width_groups`), run one after another over the run's one store, each in its own
                       run directory `<run>/widths/d<d_sae>/` (its checkpoints, metrics, eval.json); the
                       run's eval.json and report gather every member

Everything else (the kind, the data, the windows) is shared. A sweep of one member is the
single run with its outputs under the member's name.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from jaxsae.config import ConfigError, RunConfig

# key -> (hyperparameter it sets, the prefix of its part of a member's name)
SWEEPABLE: dict[str, tuple[str, str]] = {
    "sae.k": ("k", "k"),
    "sae.l1_coeff": ("l1_coeff", "l1_"),
    "mse.lr": ("lr.mse", "lr"),
    "finetune.lr": ("lr.finetune", "ftlr"),
    "e2e.lr": ("lr.e2e", "e2elr"),
    "mse.seed": ("seed", "s"),
    "finetune.kl_share": ("kl_share", "kl"),
    "sae.d_sae": ("d_sae", "d"),
}


@dataclasses.dataclass(frozen=True)
class Member:
    """One SAE of a sweep: its name and the config keys it sets (dotted key, value), in sweep order."""

    name: str
    values: tuple[tuple[str, Any], ...]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.values).get(key, default)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def member_name(values: tuple[tuple[str, Any], ...]) -> str:
    return "-".join(f"{SWEEPABLE[k][1]}{_fmt(v)}" for k, v in values) or "sae"


def members(cfg: RunConfig) -> tuple[Member, ...]:
    """The sweep's members in order; () for a run without `sweep:`. ConfigError for a key that cannot vary."""
    spec = dict(cfg.sweep)
    if not spec:
        return ()
    explicit = spec.pop("members", None)
    if explicit is not None and spec:
        raise ConfigError(f"sweep: give either axes ({', '.join(_flat(spec))}) or members:, not both")
    if explicit is not None:
        if not isinstance(explicit, (list, tuple)) or not explicit or not all(isinstance(m, dict) for m in explicit):
            raise ConfigError("sweep.members must be a non-empty list of mappings, e.g. [{sae.k: 16}, {sae.k: 32}]")
        rows = [tuple(_flat(m).items()) for m in explicit]
    else:
        axes = _flat(spec)
        for key, values in axes.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep.{key}={values!r} must be a non-empty list of values")
        rows = [tuple(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    for row in rows:
        for key, _ in row:
            if key not in SWEEPABLE:
                raise ConfigError(f"sweep key {key} cannot vary within one program: choose among "
                                  f"{', '.join(SWEEPABLE)} (other settings: one run each)")
    out = tuple(Member(member_name(row), row) for row in rows)
    names = [m.name for m in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"sweep: two members are both {dup}: list each combination once")
    return out


def _replace(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """cfg with the section key `a.b` set to value, checked against its annotation as the loader does."""
    import typing

    from jaxsae.config import _coerce

    sec, name = key.split(".")
    section = getattr(cfg, sec)
    typ = typing.get_type_hints(type(section))[name]
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(section, **{name: _coerce(key, value, typ)})})


def data_seed(cfg: RunConfig) -> int:
    """The MSE phase's shuffle seed: mse.data_seed, else mse.seed."""
    return cfg.mse.seed if cfg.mse.data_seed is None else cfg.mse.data_seed


def member_config(cfg: RunConfig, m: Member) -> RunConfig:
    """The single run that member `m` of `cfg`'s sweep equals: the base config with m's values set, the
    shared data order pinned, and no sweep."""
    out = dataclasses.replace(cfg, sweep={}, mse=dataclasses.replace(cfg.mse, data_seed=data_seed(cfg)))
    for key, value in m.values:
        out = _replace(out, key, value)
    return out


def check(cfg: RunConfig) -> None:
    """Static checks of a sweep (called from `jaxsae.validate.check_static`)."""
    from jaxsae.sae.kinds import kind_of
    from jaxsae.validate import check_static

    ms = members(cfg)
    if not ms:
        return
    keys = {k for m in ms for k, _ in m.values}
    kind = kind_of(cfg.sae)
    if "sae.k" in keys and cfg.sae.kind not in ("topk", "batchtopk"):
        raise ConfigError(f"sweep over sae.k needs sae.kind topk or batchtopk (not {cfg.sae.kind}): sweep "
                          "sae.l1_coeff for an L1 kind, or run one config per k")
    if "sae.l1_coeff" in keys and not kind.l1_controlled:
        raise ConfigError(f"sweep over sae.l1_coeff needs an L1 kind (relu), not sae.kind={cfg.sae.kind}")
    if "adapter" in cfg.phases:
        raise ConfigError("a sweep trains SAEs: drop the adapter phase (run adapters one config at a time)")
    if cfg.finetune.init_from:
        raise ConfigError("a sweep starts from its own MSE phase: drop finetune.init_from")
    if any(k == "finetune.kl_share" for k in keys) and any(float(m.get("finetune.kl_share", 1)) <= 0 for m in ms):
        raise ConfigError("sweep finetune.kl_share values must be > 0 (the MSE-only control is phases: [control])")
    for m in ms:
        try:
            check_static(member_config(cfg, m))
        except ConfigError as e:
            raise ConfigError(f"sweep member {m.name}: {e}") from None


def width_groups(cfg: RunConfig) -> list[tuple[int, RunConfig]]:
    """[(d_sae, the config of that width's sweep)] when the sweep varies `sae.d_sae`, else []. A group's
    config is `cfg` with that width, its members listed explicitly (their names keep the width: `d4096-k16`)
    and its own name (`<name>-d<d_sae>`); it trains as any sweep."""
    ms = members(cfg)
    widths = list(dict.fromkeys(int(m.get("sae.d_sae", cfg.sae.d_sae)) for m in ms))
    if widths in ([], [cfg.sae.d_sae]):  # one width, the config's own: one program (a width group's own config)
        return []
    out = []
    for w in widths:
        group = [dict(m.values) for m in ms if int(m.get("sae.d_sae", cfg.sae.d_sae)) == w]
        ckpt = cfg.checkpoint
        if ckpt.dir:  # each group's checkpoints beside the others', as its run directory is
            ckpt = dataclasses.replace(ckpt, dir=f"{ckpt.dir.rstrip('/')}/widths/d{w}")
        out.append((w, dataclasses.replace(cfg, name=f"{cfg.name}-d{w}", sweep={"members": group},
                                           sae=dataclasses.replace(cfg.sae, d_sae=w), checkpoint=ckpt)))
    return out


def group_sae(sae_cfg, ms: tuple[Member, ...]):
    """The SAE config the stacked program is built with: the largest k of the members (each masks its tail)."""
    ks = [int(m.get("sae.k", sae_cfg.k)) for m in ms]
    return dataclasses.replace(sae_cfg, k=max(ks)) if ks else sae_cfg


def member_sae(sae_cfg, m: Member):
    """Member m's own SAE config (what `load_sae` returns for it)."""
    out = sae_cfg
    if m.get("sae.k") is not None:
        out = dataclasses.replace(out, k=int(m.get("sae.k")))
    if m.get("sae.l1_coeff") is not None:
        out = dataclasses.replace(out, l1_coeff=float(m.get("sae.l1_coeff")))
    if m.get("sae.d_sae") is not None:
        out = dataclasses.replace(out, d_sae=int(m.get("sae.d_sae")))
    return out


def hparams(cfg: RunConfig, ms: tuple[Member, ...], section: str) -> dict[str, np.ndarray]:
    """What varies, as arrays over the members ([N] each) for a phase reading config `section`:
    k (i32), l1_coeff, lr, kl_share (f32), seed (i32). Keys that do not vary are still given (the base
    config's values), so one step function reads them all."""
    sec = getattr(cfg, section)
    rows = [member_config(cfg, m) for m in ms]
    out = {"k": np.array([r.sae.k for r in rows], np.int32),
           "l1_coeff": np.array([r.sae.l1_coeff for r in rows], np.float32),
           "lr": np.array([getattr(r, section).lr for r in rows], np.float32),
           "seed": np.array([getattr(r, section).seed for r in rows], np.int32)}
    if hasattr(sec, "kl_share"):
        out["kl_share"] = np.array([getattr(r, section).kl_share for r in rows], np.float32)
    return out


def k_groups(uses_k: bool, ks, sae_axis_split: bool) -> tuple[tuple[int | None, tuple[int, ...]], ...]:
    """The members that run together: ((k, member indices), ...) in order of first appearance.

    ks: i32[N] the members' k. Members that share a k run as one vmapped program at that static k (the
    top-k, gathers and decode of their own size: a k=8 member costs a k=8 step, not the largest k's);
    groups run one after another inside the same jit. One group with k None (each member's traced k
    under the largest, `group_sae`) when the kind has no k, when all members share one, or when the mesh
    splits the SAE axis (each device then holds whole members, which regrouping would move between
    devices)."""
    ks = [int(k) for k in ks]
    if not uses_k or sae_axis_split or len(set(ks)) == 1:
        return ((None, tuple(range(len(ks)))),)
    return tuple((k, tuple(i for i, kk in enumerate(ks) if kk == k)) for k in dict.fromkeys(ks))


def _take(tree, idx: tuple[int, ...]):
    """Leaves' rows idx along the leading (SAE) axis: a static slice when idx is a contiguous run."""
    import jax
    import jax.numpy as jnp

    if idx == tuple(range(idx[0], idx[-1] + 1)):
        return jax.tree.map(lambda a: a[idx[0]:idx[-1] + 1], tree)
    return jax.tree.map(lambda a: jnp.take(a, np.asarray(idx), axis=0), tree)


def run_by_k(groups, state, h: dict, run):
    """run(sub_state, sub_h, k) -> (state, metrics) per group of `k_groups`, stacked back over all members
    in member order. k is the group's static k, or None for one group under traced per-member k."""
    import jax
    import jax.numpy as jnp

    if len(groups) == 1:
        return run(state, h, groups[0][0])
    outs = [run(_take(state, idx), _take(h, idx), k) for k, idx in groups]
    order = [i for _, idx in groups for i in idx]
    inverse = tuple(int(i) for i in np.argsort(order))
    merged = jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
    return merged if inverse == tuple(range(len(order))) else _take(merged, inverse)


def sae_axis_split(state_shardings) -> bool:
    """Whether a stacked state's leading (SAE) axis is split over the mesh (`jaxsae.sharding.stack_shardings`);
    False without shardings."""
    import jax

    if state_shardings is None:
        return False
    specs = [getattr(s, "spec", None) for s in jax.tree.leaves(state_shardings)]
    return any(spec is not None and len(spec) > 0 and spec[0] is not None for spec in specs)
