"""Hugging Face checkpoints: config detection, weight files, and the conversion tables.

Each architecture has one declarative table of (our param path, HF tensor name, transform). A
transform turns one HF tensor (numpy, any dtype) into our layout; conversion happens tensor by tensor
straight into the requested dtype, so a large model never needs a second full float32 copy.

Config attributes are whitelisted per architecture: an attribute we do not handle (or a value we do
not support, such as RoPE scaling) fails loudly rather than silently computing something else.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from jaxsae.models.gemma import GemmaConfig
from jaxsae.models.gpt_neox import GPTNeoXConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the fix."""


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
_NEOX_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "rotary_pct", "rotary_emb_base", "rope_parameters", "rope_scaling", "rope_theta",
    "layer_norm_eps", "use_parallel_residual", "tie_word_embeddings", "attention_bias",
}
_GEMMA_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "hidden_act", "hidden_activation", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "attention_bias", "tie_word_embeddings",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
    "layer_types", "sliding_window_pattern",
}


def _check_keys(cfg: dict, allowed: set[str], arch: str) -> None:
    unknown = sorted(set(cfg) - allowed - _GENERIC)
    if unknown:
        raise CheckpointError(
            f"config.json for {arch} has attributes jaxsae does not handle: {unknown}; "
            "a port would silently compute something else, so add support in jaxsae/models/hf.py first")


def _rope(cfg: dict) -> dict:
    """RoPE settings from either the old flat keys or transformers 5's `rope_parameters`."""
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope.update(scaling)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"rope_type={kind!r} is not supported (only 'default' RoPE); use a checkpoint without RoPE scaling")
    return rope


def neox_config(cfg: dict, dtype: str) -> GPTNeoXConfig:
    _check_keys(cfg, _NEOX_KEYS, "gpt_neox")
    rope = _rope(cfg)
    return GPTNeoXConfig(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], d_mlp=cfg["intermediate_size"],
        rotary_pct=float(rope.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25))),
        rotary_base=float(rope.get("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0)))),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        hidden_act=_act(cfg.get("hidden_act", "gelu")),
        attention_bias=bool(cfg.get("attention_bias", True)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        dtype=dtype,
    )


def gemma_config(cfg: dict, dtype: str, version: int) -> GemmaConfig:
    _check_keys(cfg, _GEMMA_KEYS, "gemma" if version == 1 else "gemma2")
    rope = _rope(cfg)
    if cfg.get("attention_bias"):
        raise CheckpointError("attention_bias=true is not supported for Gemma; official checkpoints have none")
    if not cfg.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings=false is not supported for Gemma; official checkpoints tie them")
    n_layers = cfg["num_hidden_layers"]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":  # legacy Gemma configs say "gelu" but mean the tanh approximation (as transformers does)
        act = "gelu_pytorch_tanh"
    layer_types: tuple[str, ...] = ()
    if version == 2:
        layer_types = tuple(cfg.get("layer_types") or
                            ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)])
        if len(layer_types) != n_layers:
            raise CheckpointError(f"layer_types has {len(layer_types)} entries for {n_layers} layers; fix config.json")
    d_model, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return GemmaConfig(
        vocab_size=cfg["vocab_size"], d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=cfg.get("head_dim") or d_model // n_heads, d_mlp=cfg["intermediate_size"], version=version,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        hidden_act=_act(act),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if version == 2 else None,
        attn_logit_softcapping=cfg.get("attn_logit_softcapping") if version == 2 else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if version == 2 else None,
        sliding_window=cfg.get("sliding_window") if version == 2 else None,
        layer_types=layer_types, max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        dtype=dtype,
    )


def _act(name: str) -> str:
    from jaxsae.models.layers import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise CheckpointError(f"hidden activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return name


ARCHITECTURES = {
    "gpt_neox": lambda cfg, dtype: neox_config(cfg, dtype),
    "gemma": lambda cfg, dtype: gemma_config(cfg, dtype, 1),
    "gemma2": lambda cfg, dtype: gemma_config(cfg, dtype, 2),
}


def parse_config(cfg: dict, dtype: str) -> GPTNeoXConfig | GemmaConfig:
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"model_type={model_type!r} is not supported; jaxsae ports {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type](cfg, dtype)


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


def neox_qkv(n_heads: int, which: int, bias: bool) -> Transform:
    """GPT-NeoX's fused query_key_value is interleaved per head: rows are [h, (q|k|v), d].

    weight [3*h*d, D] <-> kernel [D, h, d]; bias [3*h*d] <-> [h, d]. `which`: 0 q, 1 k, 2 v.
    """
    if bias:
        return Transform(lambda b: b.reshape(n_heads, 3, -1)[:, which],
                         lambda parts: np.stack(parts, axis=1).reshape(-1), which, 3)
    return Transform(lambda w: w.reshape(n_heads, 3, -1, w.shape[-1])[:, which].transpose(2, 0, 1),
                     lambda parts: np.stack([k.transpose(1, 2, 0) for k in parts], axis=1).reshape(-1, parts[0].shape[0]),
                     which, 3)


Rule = tuple[str, str, Transform]  # (our path "a/b/c", HF tensor name, transform)


def neox_table(c: GPTNeoXConfig) -> list[Rule]:
    h = c.n_heads
    rules: list[Rule] = [("embed_in", "gpt_neox.embed_in.weight", identity),
                         ("final_layer_norm/scale", "gpt_neox.final_layer_norm.weight", identity),
                         ("final_layer_norm/bias", "gpt_neox.final_layer_norm.bias", identity)]
    if not c.tie_word_embeddings:
        rules.append(("embed_out", "embed_out.weight", transpose))
    for i in range(c.n_layers):
        ours, hf = f"layers_{i}", f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            rules += [(f"{ours}/{ln}/scale", f"{hf}.{ln}.weight", identity),
                      (f"{ours}/{ln}/bias", f"{hf}.{ln}.bias", identity)]
        for j, name in enumerate("qkv"):
            rules.append((f"{ours}/attention/{name}_kernel", f"{hf}.attention.query_key_value.weight",
                          neox_qkv(h, j, bias=False)))
            if c.attention_bias:
                rules.append((f"{ours}/attention/{name}_bias", f"{hf}.attention.query_key_value.bias",
                              neox_qkv(h, j, bias=True)))
        rules.append((f"{ours}/attention/o_kernel", f"{hf}.attention.dense.weight", heads_out(h)))
        if c.attention_bias:
            rules.append((f"{ours}/attention/o_bias", f"{hf}.attention.dense.bias", identity))
        rules += [(f"{ours}/mlp/up_kernel", f"{hf}.mlp.dense_h_to_4h.weight", transpose),
                  (f"{ours}/mlp/up_bias", f"{hf}.mlp.dense_h_to_4h.bias", identity),
                  (f"{ours}/mlp/down_kernel", f"{hf}.mlp.dense_4h_to_h.weight", transpose),
                  (f"{ours}/mlp/down_bias", f"{hf}.mlp.dense_4h_to_h.bias", identity)]
    return rules


def gemma_table(c: GemmaConfig) -> list[Rule]:
    rules: list[Rule] = [("embed_tokens", "model.embed_tokens.weight", identity),
                         ("norm/scale", "model.norm.weight", identity)]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c.version == 2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(c.n_layers):
        ours, hf = f"layers_{i}", f"model.layers.{i}"
        rules += [(f"{ours}/{n}/scale", f"{hf}.{n}.weight", identity) for n in norms]
        rules += [(f"{ours}/self_attn/q_kernel", f"{hf}.self_attn.q_proj.weight", heads_in(c.n_heads)),
                  (f"{ours}/self_attn/k_kernel", f"{hf}.self_attn.k_proj.weight", heads_in(c.n_kv_heads)),
                  (f"{ours}/self_attn/v_kernel", f"{hf}.self_attn.v_proj.weight", heads_in(c.n_kv_heads)),
                  (f"{ours}/self_attn/o_kernel", f"{hf}.self_attn.o_proj.weight", heads_out(c.n_heads)),
                  (f"{ours}/mlp/gate_kernel", f"{hf}.mlp.gate_proj.weight", transpose),
                  (f"{ours}/mlp/up_kernel", f"{hf}.mlp.up_proj.weight", transpose),
                  (f"{ours}/mlp/down_kernel", f"{hf}.mlp.down_proj.weight", transpose)]
    return rules


def conversion_table(c: GPTNeoXConfig | GemmaConfig) -> list[Rule]:
    return neox_table(c) if isinstance(c, GPTNeoXConfig) else gemma_table(c)


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
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
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


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a hub id fetched through huggingface_hub's cache."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_hub_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_hub_id} is not a model directory (expected a folder with config.json)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=WEIGHT_PATTERNS + ["pytorch_model.bin"]))
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
