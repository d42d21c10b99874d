"""Hugging Face checkpoints: the generic machinery every LM family shares.

Each family (`jaxsae.models.family`) declares one table of (our param path, HF tensor name, transform);
the transforms are built from the helpers here. A transform turns one HF tensor (numpy, any dtype) into
our layout; conversion happens tensor by tensor straight into the requested dtype, so a large model
never needs a second full float32 copy.

Config attributes are whitelisted per family (`check_keys`, on top of the generic attributes below
that never change the forward pass): an attribute a port does not handle (or a value it does not
support, such as an unknown RoPE scaling) fails loudly rather than silently computing something else.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

# CheckpointError lives with the registry (an unknown model_type raises it); callers catch hf.CheckpointError.
from jaxsae.models.family import CheckpointError, ModelConfig, Rule, family_for_model_type, family_of
from jaxsae.models.layers import ACTIVATIONS

# ----------------------------------------------------------------------------------------- config

# Attributes every transformers config may carry that do not change the forward pass.
_GENERIC = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "id2label",
    "label2id", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "is_decoder", "attention_dropout", "hidden_dropout",
    "classifier_dropout", "tokenizer_class", "cache_implementation", "max_position_embeddings",
    "use_bidirectional_attention", "_attn_implementation_autoset", "name_or_path", "task_specific_params",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "torchscript", "finetuning_task",
    "prefix", "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "layer_norm_epsilon",
}


def check_keys(raw: dict, allowed: set[str], family: str) -> None:
    """Fails on any config.json attribute outside `allowed` and the generic ones."""
    unknown = sorted(set(raw) - allowed - _GENERIC)
    if unknown:
        raise CheckpointError(
            f"config.json for {raw.get('model_type', family)} has attributes jaxsae does not handle: {unknown}; "
            f"a port would silently compute something else, so add support in jaxsae/models/{family}.py first")


_ROPE_ALWAYS = {"rope_type", "type", "rope_theta"}


def rope_parameters(raw: dict, supported: Mapping[str, set[str]]) -> dict:
    """RoPE settings from the old flat keys (`rope_scaling`) or transformers 5's `rope_parameters`.

    supported: rope_type -> the keys (besides rope_type and rope_theta) that type may carry. Returns the
    merged dict with `rope_type` set; an unsupported type or an unknown key fails loudly.
    """
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling")
    if scaling:
        rope.update(scaling)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in supported:
        raise CheckpointError(f"rope_type={kind!r} is not supported for {raw.get('model_type')} (only "
                              f"{sorted(supported)}); use a checkpoint without that RoPE scaling")
    unknown = sorted(set(rope) - _ROPE_ALWAYS - supported[kind])
    if unknown:
        raise CheckpointError(f"RoPE parameters {unknown} are not handled for rope_type={kind!r}; "
                              f"known: {sorted(supported[kind])}")
    return {**rope, "rope_type": kind}


def activation(name: str) -> str:
    """`name` if jaxsae implements that `hidden_act`, else CheckpointError."""
    if name not in ACTIVATIONS:
        raise CheckpointError(f"hidden activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return name


def parse_config(raw: dict, dtype: str) -> ModelConfig:
    """config.json (as a dict) -> the config of the family that reads its `model_type`."""
    return family_for_model_type(raw.get("model_type")).parse_config(raw, dtype)


# ------------------------------------------------------------------------------------ conversion

class Transform:
    """One HF tensor -> our layout (`__call__`), and back (`inverse`, for export).

    `part`/`parts`: for HF tensors that hold several of our params (GPT-NeoX's fused QKV), which
    slice this is and how many there are; `inverse` then takes the list of all parts in order.
    """

    def __init__(self, fwd: Callable[[np.ndarray], np.ndarray], inv: Callable, part: int = 0, parts: int = 1):
        self.fwd, self.inv, self.part, self.parts = fwd, inv, part, parts

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.fwd(w)

    def inverse(self, ours):
        return self.inv(ours)


identity = Transform(lambda w: w, lambda w: w)
transpose = Transform(lambda w: w.T, lambda w: w.T)


def heads_in(n_heads: int) -> Transform:
    """torch Linear weight [h*d, D] <-> our kernel [D, h, d]."""
    return Transform(lambda w: w.reshape(n_heads, -1, w.shape[-1]).transpose(2, 0, 1),
                     lambda k: k.transpose(1, 2, 0).reshape(-1, k.shape[0]))


def heads_out(n_heads: int) -> Transform:
    """torch Linear weight [D, h*d] <-> our kernel [h, d, D]."""
    return Transform(lambda w: w.T.reshape(n_heads, -1, w.shape[0]),
                     lambda k: k.reshape(-1, k.shape[-1]).T)


def conversion_table(c: ModelConfig) -> list[Rule]:
    """The conversion table of `c`'s family: [(our path, HF tensor name, Transform)]."""
    return family_of(c).conversion_table(c)


# ---------------------------------------------------------------------------------- weight files

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Zero-copy reader of one .safetensors file into numpy (bfloat16 included, via ml_dtypes).

    safetensors' own numpy loader rejects bfloat16 and its flax loader puts every tensor on a device;
    the format is a length-prefixed JSON header over raw little-endian data, so we map it directly.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (n,) = struct.unpack("<Q", self._mm[:8])
            self.header = json.loads(self._mm[8:8 + n])
        except Exception as e:  # noqa: BLE001 -- any parse failure means a corrupt file
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download it") from e
        self.header.pop("__metadata__", None)
        self._base = 8 + n
        ends = [v.get("data_offsets", (0, 0))[1] for v in self.header.values() if isinstance(v, dict)]
        if self._base + max(ends, default=0) > len(self._mm):
            raise CheckpointError(f"{path} is truncated ({len(self._mm)} bytes, its header needs "
                                  f"{self._base + max(ends)}): copy or download it again")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return np.frombuffer(self._mm, dtype=_ST_DTYPES[info["dtype"]], count=int(np.prod(info["shape"], dtype=np.int64)),
                             offset=self._base + start).reshape(info["shape"])


class TorchBinFile:
    """pytorch_model.bin read through torch (memory-mapped); each tensor leaves torch as numpy."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a PyTorch pickle and torch is not installed; `pip install torch==2.13.0` "
                "(CPU build), or convert the checkpoint to model.safetensors") from e
        self._torch = torch
        self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> np.ndarray:
        t = self._sd[key]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


WEIGHT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
                   "special_tokens_map.json", "*.model"]


def open_weights(path: Path) -> dict[str, SafetensorsFile | TorchBinFile]:
    """Maps every tensor name to the open file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_bytes())["weight_map"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}): copy or "
                                  "download it again") from None
        files = {name: SafetensorsFile(path / name) for name in sorted(set(weight_map.values()))}
        return {k: files[v] for k, v in weight_map.items()}
    if (path / "model.safetensors").exists():
        f = SafetensorsFile(path / "model.safetensors")
        return {k: f for k in f.keys()}
    if (path / "pytorch_model.bin").exists():
        f = TorchBinFile(path / "pytorch_model.bin")
        return {k: f for k in f.keys()}
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def resolve(path_or_hub_id: str | os.PathLike, patterns: list[str] | None = None) -> Path:
    """A local directory as is; anything else is a hub id fetched through huggingface_hub's cache (the
    files matching `patterns`; default: config, weights and tokenizer)."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_hub_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_hub_id} is not a model directory (expected a folder with config.json)")
    from huggingface_hub import snapshot_download

    try:
        patterns = WEIGHT_PATTERNS + ["pytorch_model.bin"] if patterns is None else patterns
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- network, auth and missing repos all end the same way
        raise CheckpointError(
            f"could not fetch {path_or_hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the network / HF_TOKEN, or pass a local directory saved with save_pretrained") from e


def check_weights(c, weights: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Fails before any compute if a tensor is missing or has the wrong shape.

    expected: our param path -> shape. The transforms are reshapes/transposes of memory-mapped views,
    so this pass reads no tensor data.
    """
    table = conversion_table(c)
    missing = sorted({hf for _, hf, _ in table if hf not in weights})
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors that config.json implies, e.g. {missing[:3]}; "
                              "the weights do not belong to this config.json")
    for ours, hf, fn in table:
        got = fn(weights[hf].get(hf)).shape
        if tuple(got) != tuple(expected[ours]):
            raise CheckpointError(
                f"tensor {hf} has shape {weights[hf].shape(hf)} (-> {tuple(got)} as {ours}) but config.json implies "
                f"{tuple(expected[ours])}; the weights and config.json come from different models")


def iter_converted(c, weights: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (our param path, array in `dtype`) one tensor at a time."""
    for ours, hf, fn in conversion_table(c):
        yield ours, np.ascontiguousarray(fn(weights[hf].get(hf))).astype(dtype, copy=False)


def to_hf_state_dict(c, params, dtype=None) -> dict[str, np.ndarray]:
    """Our params -> HF tensor names and layouts (the inverse of the conversion table)."""
    from flax import traverse_util

    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list] = {}
    for ours, hf_name, fn in conversion_table(c):
        if fn.parts == 1:
            out[hf_name] = fn.inverse(flat[ours])
            continue
        got = parts.setdefault(hf_name, [None] * fn.parts)
        got[fn.part] = flat[ours]
        if all(p is not None for p in got):
            out[hf_name] = fn.inverse(got)
    return {k: np.ascontiguousarray(v if dtype is None else v.astype(dtype)) for k, v in out.items()}
