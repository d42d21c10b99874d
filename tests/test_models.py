"""Parity of the Flax ports with transformers (PyTorch, CPU) on small random checkpoints.

Random inits are tiny, so a missing (1 + w), a wrong soft-cap or a wrong window could hide behind
them: every checkpoint here gets perturbed norm weights and enlarged projections (bigger attention
logits), and the `*_matters` tests show each quirk moves the logits far beyond the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers as tf

from jaxsae.models import CheckpointError, LM, load_lm

VOCAB, T = 128, 16

CASES = {
    # name: (config class, model class, kwargs)
    "neox_parallel_partial_rotary": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, rotary_pct=0.25)),
    "neox_serial_full_rotary": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96, rotary_pct=1.0,
        use_parallel_residual=False, hidden_act="gelu_new", rotary_emb_base=500.0, layer_norm_eps=1e-3)),
    "neox_tied_nobias": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64, rotary_pct=0.5,
        attention_bias=False, tie_word_embeddings=True)),
    "gemma_mqa": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        intermediate_size=128)),
    "gemma_mha": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, rms_norm_eps=1e-5)),
    "gemma2_gqa_window": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma2_mqa": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=96, sliding_window=7, query_pre_attn_scalar=8, attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0)),
}


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.mul_(4.0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (directory, torch model in float32). Saved once per session."""
    out = {}
    root = tmp_path_factory.mktemp("hf")
    for i, (name, (cfg_cls, model_cls, kw)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = model_cls(cfg_cls(vocab_size=VOCAB, **kw)).eval()
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
    tokens = _tokens()
    ref_logits, ref_hidden = _reference(model, tokens)
    assert _rel(lm.logits(tokens), ref_logits) < 1e-5
    # transformers' last hidden state is taken after the final norm, so it is not a residual
    for layer in range(lm.n_layers - 1):
        assert _rel(lm.residual(tokens, layer), ref_hidden[layer + 1]) < 1e-5, layer


@pytest.mark.parametrize("name", ["neox_parallel_partial_rotary", "gemma2_gqa_window"])
def test_prefix_suffix_split_equals_full_forward(checkpoints, name):
    lm = load_lm(checkpoints[name][0])
    tokens = _tokens(3)
    full = lm.logits(tokens)
    for layer in range(lm.n_layers):
        h = lm.prefix(tokens, layer)
        np.testing.assert_allclose(lm.suffix(h, layer), full, rtol=1e-5, atol=1e-5)
    # the unembedding alone on the last residual
    np.testing.assert_allclose(lm.unembed(lm.residual(tokens, lm.n_layers - 1)), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["neox_serial_full_rotary", "gemma_mqa", "gemma2_gqa_window"])
def test_bfloat16_within_torch_bfloat16_error(checkpoints, name):
    """bf16 rounds each op, so bit parity with torch is not expected. Tolerance: our bf16 logits are no
    further from the float32 reference than twice transformers' own bf16 logits are (plus 1% of scale)."""
    path, model = checkpoints[name]
    tokens = _tokens(5)
    ref32, _ = _reference(model, tokens)
    ref16, _ = _reference(type(model).from_pretrained(path, dtype=torch.bfloat16).eval(), tokens)
    lm = load_lm(path, dtype="bfloat16")
    ours = np.asarray(lm.logits(tokens).astype(jnp.float32))
    torch_err, our_err = _rel(ref16, ref32), _rel(ours, ref32)
    assert our_err <= 2 * torch_err + 0.01, (our_err, torch_err)
    assert jax.tree.leaves(lm.params)[0].dtype == jnp.bfloat16


def _with_config(lm: LM, **changes) -> LM:
    return LM(dataclasses.replace(lm.config, **changes), lm.params, lm.path)


@pytest.mark.parametrize("name,changes", [
    ("gemma2_gqa_window", dict(sliding_window=None)),
    ("gemma2_gqa_window", dict(attn_logit_softcapping=None)),
    ("gemma2_gqa_window", dict(final_logit_softcapping=None)),
    ("gemma2_gqa_window", dict(query_pre_attn_scalar=None)),
    ("neox_parallel_partial_rotary", dict(use_parallel_residual=False)),
    ("neox_parallel_partial_rotary", dict(rotary_pct=1.0)),
])
def test_each_quirk_matters(checkpoints, name, changes):
    """Switching one quirk off moves the logits far past the parity tolerance: the tests can see it."""
    path, model = checkpoints[name]
    tokens = _tokens(7)
    ref, _ = _reference(model, tokens)
    assert _rel(_with_config(load_lm(path), **changes).logits(tokens), ref) > 1e-3


def test_gemma_norm_one_plus_w_matters(checkpoints):
    path, model = checkpoints["gemma_mqa"]
    lm = load_lm(path)
    tokens = _tokens(8)
    ref, _ = _reference(model, tokens)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "norm" in jax.tree_util.keystr(p) else x, lm.params)
    assert _rel(LM(lm.config, params).logits(tokens), ref) > 1e-3


def test_sharded_safetensors_and_torch_bin(checkpoints, tmp_path):
    path, model = checkpoints["neox_serial_full_rotary"]
    tokens = _tokens(9)
    ref, _ = _reference(model, tokens)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert _rel(load_lm(tmp_path / "sharded").logits(tokens), ref) < 1e-5
    # the pre-safetensors layout: a pickled state dict beside config.json
    (tmp_path / "bin").mkdir()
    shutil.copy(path / "config.json", tmp_path / "bin" / "config.json")
    # (tensor names as transformers serialises them, which its in-memory state_dict may rename)
    torch.save(safetensors.torch.load_file(path / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    assert _rel(load_lm(tmp_path / "bin").logits(tokens), ref) < 1e-5


def test_bad_inputs_fail_clearly(checkpoints, tmp_path):
    path, _ = checkpoints["gemma_mqa"]
    lm = load_lm(path)
    with pytest.raises(ValueError, match=r"layer 3 is out of range .* choose 0\.\.2"):
        lm.residual(_tokens(), 3)
    with pytest.raises(ValueError, match="out of range"):
        lm.prefix(_tokens(), -1)

    bad = tmp_path / "unknown"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model_type='mistral' is not supported"):
        load_lm(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match="rope_type='linear'"):
        load_lm(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "mystery_switch": 3}))
    with pytest.raises(CheckpointError, match="mystery_switch"):
        load_lm(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(128, 64\).*implies \(64, 100\)"):
        load_lm(bad)

    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_lm(bad)

    with pytest.raises(CheckpointError, match="not a model directory"):
        load_lm(tmp_path / "does-not-exist")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("block", [128, 5, 4])
def test_attention_keeps_the_causal_window_and_key_masks(window, softcap, block):
    """`attend` in blocks of queries (one block, blocks that divide t, a last partial block): the same
    output as the dense masked softmax at every query that sees a valid key, with padding, a sliding
    window and Gemma 2's soft-capped logits."""
    from jaxsae.models.layers import AttentionMask, attend

    b, t, h, kv, d = 2, 12, 4, 2, 8
    q, k, v = (np.random.default_rng(i).standard_normal((b, t, n, d)).astype(np.float32)
               for i, n in enumerate((h, kv, kv)))
    key_valid = np.ones((b, t), bool)
    key_valid[0, :3] = False  # left padding
    key_valid[1, 7] = False  # a hole
    mask = AttentionMask(t, window, jnp.asarray(key_valid))
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, scale=d**-0.5,
                            softcap=softcap, block=block))
    dense = np.asarray(mask.dense())[:, 0, 0]  # [b, t, s]
    logits = np.einsum("bthd,bshd->bhts", q, np.repeat(k, h // kv, axis=2)) * d**-0.5
    if softcap is not None:
        logits = np.tanh(logits / softcap) * softcap
    logits = np.where(dense[:, None], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), np.repeat(v, h // kv, axis=2))
    seen = dense.any(-1)  # a query with no visible key (padding itself) has no defined output
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5, atol=1e-6)
