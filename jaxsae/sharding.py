"""Where arrays live: the device mesh, the logical-axis rules, and the shardings of every jit input.

Every array that crosses a jit boundary carries logical axis names: SAE params (`d_model`, `d_sae`;
`jaxsae.sae.sae_param_axes`), LM params (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`;
`jaxsae.models.param_axes`) and batches (`batch`, `sequence`). One table, `RULES`, maps those names onto
the two mesh axes:

    data    splits the batch (data parallelism); with lm_sharding='fsdp' also the LM's `embed` dim
    model   splits the SAE's latents `d_sae` (optimizer moments and dead counters follow); with
            lm_sharding='tensor' also the LM's heads / mlp / vocab

The steps in `jaxsae.train` are built by `jit_step`: given shardings from these rules, their inputs and
outputs are pinned to them (without, they follow their inputs), so the same code runs on one CPU and on
a pod by changing the mesh. They are traced with their mesh in context (`traced_in_mesh`): TopK's top-k
over a sharded `d_sae` then runs in two stages (`jaxsae.sae.selection`: a top-k per shard, then over
the shards' candidates) instead of gathering [batch, d_sae], and gives the same codes on every mesh.

Typical use:

    mesh = make_mesh(data=None, model=2)                 # all devices; model axis of 2
    state = shard(state, sae_state_shardings(state, sae_cfg, mesh))
    lm_params = shard(lm.params, lm_param_shardings(lm, mesh, "replicated"))
    x = shard(x, batch_sharding(mesh))                   # f32[batch, d_model] or int[batch, seq]
    state, metrics = step(state, x)

`shard`, `global_batch` and `batch_from_global` are the only `jax.device_put`s with a sharding in jaxsae.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")

# The one table: logical axis name -> mesh axis (None = replicated along that dim).
RULES: dict[str, str | None] = {
    "batch": "data",
    "sequence": None,
    "d_sae": "model",
    "d_model": None,
    # LM params; replicated unless an `LM_RULES` entry overrides them.
    "vocab": None,
    "embed": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "mlp": None,
    "lora_rank": None,  # adapter and LoRA factors (jaxsae.train.adapters): tiny, replicated
    # a sweep's leading SAE axis (`jaxsae.sweep`): split over `model` when its size divides the member
    # count (each device then holds whole SAEs, and d_sae gives the axis up), else replicated
    "sweep": "model",
}

# The LM switch (`lm_sharding`): entries that override RULES for the LM's params.
#   replicated  every device holds the whole LM (small models; the fastest)
#   fsdp        the `embed` dim of each weight is split over `data` (ZeRO-3 style: the weights are
#               all-gathered per use); a weight without a divisible `embed` dim splits its largest
#               divisible dim instead
#   tensor      Megatron-style: attention heads, the MLP hidden dim and the vocabulary over `model`
LM_RULES: dict[str, dict[str, str | None]] = {
    "replicated": {},
    "fsdp": {"embed": "data"},
    "tensor": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
}
LM_SHARDINGS = tuple(LM_RULES)


def rules_for(lm_sharding: str = "replicated") -> dict[str, str | None]:
    """RULES with the LM table for `lm_sharding` ('replicated' | 'fsdp' | 'tensor') applied."""
    if lm_sharding not in LM_RULES:
        raise ValueError(f"lm_sharding={lm_sharding!r} is unknown: choose one of {', '.join(LM_SHARDINGS)}")
    return {**RULES, **LM_RULES[lm_sharding]}


# ------------------------------------------------------------------------------------------ mesh

def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh over all devices of all processes (or over `devices`).

    data=None takes every device the model axis leaves over. The axes are `Auto`: jit-compiled steps
    propagate the input shardings themselves.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(model, int) or model < 1:
        raise ValueError(f"mesh model={model!r} must be a positive integer (1 = no model parallelism)")
    if data is None:
        if n % model:
            raise ValueError(f"mesh model={model} does not divide the {n} devices: choose a model axis "
                             f"size that divides {n} (one of {_divisors(n)})")
        data = n // model
    if not isinstance(data, int) or data < 1:
        raise ValueError(f"mesh data={data!r} must be a positive integer, or None for all remaining devices")
    if data * model != n:
        raise ValueError(f"mesh data={data} x model={model} = {data * model} devices, but there are {n}: "
                         f"choose data*model == {n} (e.g. data=None to fill the data axis)")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, model), AXES, axis_types=auto, devices=devices)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------- logical -> mesh

def _is_spec(x) -> bool:
    return x is None or isinstance(x, P)


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(logical: P | None, mesh: Mesh, rules: Mapping[str, Any],
                    shape: tuple[int, ...] | None = None) -> P:
    """PartitionSpec of logical names -> PartitionSpec of mesh axes.

    A logical name missing from `rules` is an error (a typo would otherwise silently replicate).
    A mesh axis is used at most once per array (first dim wins); with `shape`, a dim that the mesh
    axes' size does not divide stays replicated.
    """
    if logical is None:
        return P()
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        names = (name,) if isinstance(name, str) else tuple(name)
        axes: list[str] = []
        for nm in names:
            if nm not in rules:
                raise ValueError(f"logical axis {nm!r} has no sharding rule: add it to jaxsae.sharding.RULES")
            axes += [a for a in _mesh_axes(rules[nm]) if a not in used and a not in axes]
        for a in axes:
            if a not in mesh.shape:
                raise ValueError(f"rule maps {name!r} to mesh axis {a!r}, but the mesh has axes {tuple(mesh.shape)}")
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or size == 1 or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def logical_to_sharding(axes_tree, mesh: Mesh, rules: Mapping[str, Any] = RULES, shapes=None):
    """Pytree of logical PartitionSpecs (or None) -> same-structure pytree of `NamedSharding`.

    shapes: optional pytree of arrays / ShapeDtypeStructs with the same structure; with it, a dim that
    its mesh axis does not divide (e.g. vocab 97 over 4 devices) is replicated instead of failing.
    """
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(s, mesh, rules)), axes_tree,
                            is_leaf=_is_spec)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, logical_to_spec(s, mesh, rules, tuple(x.shape))),
                        axes_tree, shapes, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def probe_sharding(mesh: Mesh, rules: Mapping[str, Any] = RULES) -> NamedSharding:
    """Sharding of the L1 controller's probe f32[n, batch, d_model] (`finetune.probe_l0`): its tokens over
    `data` as a batch's, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(P(None, "batch"), mesh, rules))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any] = RULES) -> NamedSharding:
    """Sharding of a batch: dim 0 (`batch`) over `data`, the rest replicated.

    Serves x: f32[batch, d_model] and tokens: int[batch, seq]; batch must be a multiple of the data
    axis size (`shard` says so if it is not).
    """
    return NamedSharding(mesh, logical_to_spec(P("batch"), mesh, rules))


# ------------------------------------------------------------------------------------ SAE state

def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _key_name(entry) -> str | None:
    for attr in ("key", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def sae_state_shardings(state: Mapping[str, Any], sae_cfg, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> dict:
    """Shardings for a whole MSE / fine-tune train state (arrays or ShapeDtypeStructs).

    params      from `sae_param_axes` (W_enc/W_dec/b_enc split along d_sae over `model`)
    opt_state   each param-shaped leaf (Adam's mu and nu, ...) takes the sharding of the param with the
                same key path suffix and shape, else of the param with the same shape when that is
                unambiguous; counts and other scalars are replicated
    dead        i32[d_sae], like b_enc
    the rest    (step, rng, l1, l0_target, ...) replicated
    """
    from jaxsae.sae import sae_param_axes  # local: keep `import jaxsae.sharding` light

    if "frozen" in state:
        # an adapter phase: the frozen SAE is laid out like an SAE's params; the adapter's params and
        # moments (low-rank or d_model-square: small) are replicated
        rep = replicated(mesh)
        base = sae_state_shardings({"params": state["frozen"], "dead": state["dead"]}, sae_cfg, mesh, rules)
        out = {k: jax.tree.map(lambda _: rep, v) for k, v in state.items()}
        out.update(frozen=base["params"], dead=base["dead"])
        return out
    params = state["params"]
    axes = sae_param_axes(sae_cfg)
    if set(axes) != set(params):
        raise ValueError(f"state params {sorted(params)} do not match the {sae_cfg.kind} SAE's "
                         f"{sorted(axes)}: build the state from init_sae(sae_cfg, ...)")
    axes = {k: axes[k] for k in params}
    param_sh = logical_to_sharding(axes, mesh, rules, shapes=params)
    by_name = {k: (tuple(params[k].shape), param_sh[k]) for k in params}
    by_shape: dict[tuple, list] = defaultdict(list)
    for k in params:
        by_shape[tuple(params[k].shape)].append(param_sh[k])
    rep = replicated(mesh)

    def opt_leaf(path, leaf):
        shape = _shape(leaf)
        if not shape:
            return rep
        names = [_key_name(e) for e in path]
        for name in reversed(names):  # the param this leaf mirrors: the deepest key that names one
            if name in by_name and by_name[name][0] == shape:
                return by_name[name][1]
        same = {s.spec for s in by_shape.get(shape, [])}
        if len(same) == 1:
            return by_shape[shape][0]
        return rep

    out = {}
    for key, value in state.items():
        if key == "params":
            out[key] = param_sh
        elif key == "opt_state":
            out[key] = jax.tree_util.tree_map_with_path(opt_leaf, value)
        elif key == "dead":
            out[key] = NamedSharding(mesh, logical_to_spec(P("d_sae"), mesh, rules, _shape(value)))
        else:
            out[key] = jax.tree.map(lambda _: rep, value)
    return out


def stack_shardings(tree, n: int, rules: Mapping[str, Any] = RULES):
    """Shardings of a sweep's stacked state ([n, ...] leaves) from one member's: the leading logical axis
    `sweep` takes its rule's mesh axes when they divide n (a member's dims then give those axes up),
    else it is replicated and each member keeps its own layout."""

    def one(sh: NamedSharding) -> NamedSharding:
        mesh = sh.mesh
        axes = [a for a in _mesh_axes(rules["sweep"]) if a in mesh.shape]
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or size == 1 or n % size:
            return NamedSharding(mesh, P(None, *sh.spec))
        inner = [None if set(_mesh_axes(a)) & set(axes) else a for a in sh.spec]
        return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else tuple(axes), *inner))

    return jax.tree.map(one, tree)


# -------------------------------------------------------------------------------------- LM params

def lm_param_shardings(lm, mesh: Mesh, mode: str = "replicated", rules: Mapping[str, Any] | None = None):
    """Shardings for `lm.params` (an `LM`, or its config) under the `lm_sharding` switch."""
    from jaxsae.models.lm import abstract_params, param_axes

    cfg = getattr(lm, "config", lm)
    rules = rules_for(mode) if rules is None else rules
    shapes = abstract_params(cfg)
    sh = logical_to_sharding(param_axes(cfg), mesh, rules, shapes=shapes)
    if mode != "fsdp" or mesh.shape["data"] == 1:
        return sh
    n = mesh.shape["data"]

    def fallback(s: NamedSharding, x):
        # A weight whose `embed` dim was not divisible: split its largest divisible free dim instead.
        spec = tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))
        if any("data" in _mesh_axes(a) for a in spec):
            return s
        free = [i for i, a in enumerate(spec) if a is None and x.shape[i] % n == 0]
        if not free:
            return s
        i = max(free, key=lambda j: x.shape[j])
        return NamedSharding(mesh, P(*spec[:i], "data", *spec[i + 1:]))

    return jax.tree.map(fallback, sh, shapes)


# ------------------------------------------------------------------------------------ placement

def jit_step(step, in_shardings=None, state_sharding=None):
    """jit(step) with its first argument (the train state) donated.

    With shardings, inputs are pinned to `in_shardings` and the outputs (state, metrics) to
    (`state_sharding`, replicated): XLA would otherwise choose the new state's layout itself (with an
    fsdp-sharded LM it re-lays the SAE out along d_model), and the next step would reshard it.
    """
    if in_shardings is None or all(s is None for s in in_shardings):
        return jax.jit(step, donate_argnums=0)
    mesh = next(s for s in jax.tree.leaves(in_shardings) if isinstance(s, NamedSharding)).mesh
    return jax.jit(traced_in_mesh(step, mesh), donate_argnums=0, in_shardings=tuple(in_shardings),
                   out_shardings=(state_sharding, replicated(mesh)))


def traced_in_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the abstract mesh in context, so code inside it (TopK's two-stage
    top-k, `jaxsae.sae.selection`) can ask `context_spec` how its arrays are split."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def context_spec(logical: tuple[str | None, ...], shape: tuple[int, ...],
                 rules: Mapping[str, Any] = RULES) -> P | None:
    """The mesh axes an array with these logical axes and shape is split over by `rules`, on the mesh of
    the step being traced (`traced_in_mesh`, which `jit_step` applies); None outside one, or on a mesh
    that is not a ('data', 'model') one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return None
    return logical_to_spec(P(*logical), mesh, rules, tuple(shape))


def check_splits(shape: tuple[int, ...], sharding) -> None:
    """Raises ValueError naming the fix when a dim of `shape` does not split over its mesh axes
    (instead of XLA's message)."""
    if not isinstance(sharding, NamedSharding):
        return
    for dim, axes in zip(shape, sharding.spec):
        size = math.prod(sharding.mesh.shape[a] for a in _mesh_axes(axes))
        if dim % size:
            raise ValueError(f"an array of shape {tuple(shape)} cannot be split {size} ways along {axes!r} "
                             f"(spec {sharding.spec}): make that dim a multiple of {size}, e.g. the batch a "
                             f"multiple of the mesh's data axis")


def shard(tree, shardings):
    """Places `tree` (arrays or numpy) onto `shardings` (a matching pytree, or one sharding for all).

    With `global_batch` and `batch_from_global`, the only `jax.device_put` with a sharding in jaxsae.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    jax.tree.map(lambda x, s: check_splits(_shape(x), s), tree, shardings)
    return jax.device_put(tree, shardings)


def global_batch(local, sharding: NamedSharding):
    """The global batch array from this process's rows (`local`: its contiguous slice of dim 0).

    With one process `local` is the whole batch. With P processes each passes batch/P rows, in process
    order: the global batch is their concatenation, split over the `data` axis.
    """
    local = np.asarray(local)
    n = local.shape[0] * jax.process_count()
    check_splits((n, *local.shape[1:]), sharding)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (n, *local.shape[1:]))


def batch_from_global(full, sharding: NamedSharding):
    """The global batch array from the whole batch, which every process holds (the fine-tune window):
    each process places just the rows its devices hold, whatever the mesh's layout over hosts."""
    full = np.asarray(full)
    check_splits(full.shape, sharding)
    if jax.process_count() == 1:
        return jax.device_put(full, sharding)
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def abstract_with(tree, shardings):
    """Pytree of ShapeDtypeStructs carrying `shardings` (the target of an Orbax restore or an AOT lower)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes the largest-loaded device holds for `tree` (arrays, or ShapeDtypeStructs with shardings).

    Counts each addressable shard once per device it lives on, so replicated arrays count in full on
    every device and a d_sae-sharded one by its slice.
    """
    per_device: dict[Any, int] = defaultdict(int)
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        itemsize = np.dtype(x.dtype).itemsize
        if sharding is None:
            raise ValueError("per_device_bytes needs placed arrays or ShapeDtypeStructs with a sharding")
        for device, index in sharding.addressable_devices_indices_map(tuple(x.shape)).items():
            n = 1
            for sl, dim in zip(index, x.shape):
                n *= len(range(*sl.indices(dim)))
            per_device[device] += n * itemsize
    return max(per_device.values(), default=0)
