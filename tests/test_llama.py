"""Parity of the Flax Llama port with `transformers.LlamaForCausalLM` on small random checkpoints.

Both checkpoints use grouped-query attention (8 query heads over 2 key/value heads). One has Llama 3.1's
RoPE scaling with a short `original_max_position_embeddings`, so that within 32 positions every band of
the scaling (kept, blended, slowed) is exercised, and an untied `lm_head`; the other has default RoPE,
tied embeddings, `head_dim` unequal to d_model / n_heads, and attention and MLP biases. Norm weights are
perturbed and projections enlarged, as in test_models.py, so that no quirk hides behind a tiny init.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers as tf
from jax.sharding import PartitionSpec as P

from jaxsae import sharding as shd
from jaxsae.analysis import logit_effect, unembedding
from jaxsae.models import LM, CheckpointError, LlamaConfig, load_lm, read_config
from jaxsae.models.hf import to_hf_state_dict
from jaxsae.models.llama import llama3_inv_freq

VOCAB, T = 128, 32
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

CASES = {
    "llama3_rope_untied": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                               intermediate_size=96, rms_norm_eps=1e-5, rope_parameters=LLAMA3),
    "default_rope_tied_bias": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=80, rope_parameters={"rope_theta": 500.0},
                                   tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.mul_(4.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, torch model in float32)."""
    out = {}
    root = tmp_path_factory.mktemp("llama")
    for i, (name, kw) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, **kw)).eval()
        _perturb(model)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def _tokens(seed=0, b=2):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, T)).astype(np.int32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _reference(model, tokens):
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", list(CASES))
def test_float32_parity(checkpoints, name):
    path, model = checkpoints[name]
    lm = load_lm(path)
    assert lm.config.n_kv_heads * 4 == lm.config.n_heads
    tokens = _tokens()
    ref_logits, ref_hidden = _reference(model, tokens)
    assert _rel(lm.logits(tokens), ref_logits) < 1e-5
    for layer in range(lm.n_layers - 1):  # the last hidden state is taken after the final norm
        assert _rel(lm.residual(tokens, layer), ref_hidden[layer + 1]) < 1e-5, layer
    np.testing.assert_allclose(lm.suffix(lm.prefix(tokens, 1), 1), lm.logits(tokens), rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_is_exercised_and_matters(checkpoints):
    path, model = checkpoints["llama3_rope_untied"]
    lm = load_lm(path)
    c = lm.config
    assert c.rope_scaling is not None and c.rope_scaling.original_max_position_embeddings == 256
    ours = llama3_inv_freq(c.head_dim, c.rope_base, c.rope_scaling)
    np.testing.assert_allclose(ours, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    plain = llama3_inv_freq(c.head_dim, c.rope_base, None)
    ratio = plain / ours  # 1 (short wavelengths), factor (long ones) and strictly between (the blend)
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()
    tokens = _tokens(7)
    ref, _ = _reference(model, tokens)
    unscaled = LM(dataclasses.replace(c, rope_scaling=None), lm.params)
    assert _rel(unscaled.logits(tokens), ref) > 1e-3


def test_bfloat16_within_torch_bfloat16_error(checkpoints):
    path, model = checkpoints["llama3_rope_untied"]
    tokens = _tokens(5)
    ref32, _ = _reference(model, tokens)
    ref16, _ = _reference(tf.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), tokens)
    ours = np.asarray(load_lm(path, dtype="bfloat16").logits(tokens).astype(jnp.float32))
    assert _rel(ours, ref32) <= 2 * _rel(ref16, ref32) + 0.01


@pytest.mark.parametrize("name", list(CASES))
def test_hf_round_trip(checkpoints, name):
    """to_hf_state_dict gives back exactly the tensors transformers saved (tied: no lm_head)."""
    path, _ = checkpoints[name]
    lm = load_lm(path)
    saved = safetensors.numpy.load_file(path / "model.safetensors")
    back = to_hf_state_dict(lm.config, lm.params)
    assert set(back) == set(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_unembedding_is_the_final_norm_and_head(checkpoints):
    """The direct logit effect of a direction is the unembedding of that direction up to its 1/rms."""
    for name in CASES:
        lm = load_lm(checkpoints[name][0])
        d = np.random.default_rng(3).normal(size=lm.d_model).astype(np.float32)
        u = unembedding(lm)
        assert not u.centre and u.W_U.shape == (lm.d_model, VOCAB)
        rms = math.sqrt(float(np.mean(d**2)) + lm.config.rms_norm_eps)
        np.testing.assert_allclose(logit_effect(d, u) / rms, np.asarray(lm.unembed(jnp.asarray(d)[None, None]))[0, 0],
                                   rtol=1e-4, atol=1e-4)


def test_lm_rules_shard_the_llama_params():
    cfg = LlamaConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, d_mlp=96,
                      attention_bias=True, mlp_bias=True)
    mesh = jax.sharding.AbstractMesh((2, 2), shd.AXES)
    tensor = shd.lm_param_shardings(cfg, mesh, "tensor")
    attn, mlp = tensor["layers_0"]["self_attn"], tensor["layers_0"]["mlp"]
    assert attn["q_kernel"].spec == P(None, "model", None) and attn["k_kernel"].spec == P(None, "model", None)
    assert attn["k_bias"].spec == P("model", None) and attn["o_kernel"].spec == P("model", None, None)
    assert mlp["gate_kernel"].spec == P(None, "model") and mlp["down_kernel"].spec == P("model", None)
    assert tensor["embed_tokens"].spec == P("model", None) and tensor["lm_head"].spec == P(None, "model")
    fsdp = shd.lm_param_shardings(cfg, mesh, "fsdp")
    assert fsdp["layers_0"]["self_attn"]["k_kernel"].spec == P("data", None, None)
    assert fsdp["layers_0"]["mlp"]["up_bias"].spec == P("data")  # no embed dim: its largest divisible one


def _write(path, cfg: dict) -> None:
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_keys_old_and_new_style_and_unknown_ones_fail(checkpoints, tmp_path):
    path, _ = checkpoints["llama3_rope_untied"]
    new = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in new  # transformers 5 writes rope_theta inside rope_parameters
    want = read_config(path)
    # Llama 3.1 checkpoints on the hub: a flat rope_theta and `rope_scaling`, plus pretraining_tp
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, pretraining_tp=1)
    _write(tmp_path, old)
    assert read_config(tmp_path) == want
    _write(tmp_path, {**old, "rope_scaling": {k: v for k, v in rope.items() if k != "original_max_position_embeddings"},
                      "max_position_embeddings": 256})
    # the original length falls back to max_position_embeddings, as in transformers
    assert read_config(tmp_path).rope_scaling == want.rope_scaling

    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    bad = {
        "mystery_switch": {**new, "mystery_switch": 3},
        "rope_type='yarn'": {**new, "rope_parameters": {**new["rope_parameters"], "rope_type": "yarn"}},
        r"\['attention_factor'\]": {**new, "rope_parameters": {**new["rope_parameters"], "attention_factor": 2.0}},
        r"needs \['factor'\]": {**new, "rope_parameters": {k: v for k, v in new["rope_parameters"].items()
                                                           if k != "factor"}},
        "not a multiple": {**new, "num_key_value_heads": 3},
        "hidden activation 'tanhh'": {**new, "hidden_act": "tanhh"},
        "lacks 9 tensors": {**new, "mlp_bias": True},  # 3 biases in each of 3 layers that were never saved
    }
    for match, cfg in bad.items():
        _write(tmp_path, cfg)
        with pytest.raises(CheckpointError, match=match):
            load_lm(tmp_path)
