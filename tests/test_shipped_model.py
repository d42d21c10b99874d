"""The shipped pythia-stdlib: transformers loads it unchanged, and jaxsae's port agrees with it."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import torch
import transformers as tf

from jaxsae.data.packing import iter_contexts
from jaxsae.data.text import StdlibSource
from jaxsae.models.shipped import SHIPPED
from jaxsae.models import load_lm


def test_transformers_loads_it_and_port_matches():
    model = tf.GPTNeoXForCausalLM.from_pretrained(SHIPPED).eval()
    tok = tf.AutoTokenizer.from_pretrained(SHIPPED)
    assert tok.eos_token_id == 0 and len(tok) == 4096
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    contexts = iter_contexts(StdlibSource("val"), tok, 128, bos_id=None)
    tokens = np.stack([next(contexts) for _ in range(2)])
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    lm = load_lm(SHIPPED)
    ref = out.logits.numpy()
    assert np.abs(np.asarray(lm.logits(tokens)) - ref).max() / np.abs(ref).max() < 1e-5
    h = out.hidden_states[2].numpy()
    assert np.abs(np.asarray(lm.residual(tokens, 1)) - h).max() / np.abs(h).max() < 1e-5


def test_model_card_records_a_trained_model():
    stats = json.loads((SHIPPED / "training_stats.json").read_text())
    assert stats["val_ce_nats"] <= 3.0  # the target; uniform over 4096 tokens is 8.3
    assert stats["tokens_seen"] > 1_000_000
    card = (SHIPPED / "README.md").read_text()
    assert str(stats["val_ce_nats"]) in card and "held-out" in card


def test_bfloat16_lm_gives_float32_logits_and_the_float32_ce():
    """Mixed precision: the LM in bfloat16 (the default on accelerators) scores held-out text within 0.01
    nats of float32 (measured: 6e-4 over 16 contexts of 128, 3e-4 over these 4), with float32 logits for the CE and the KL."""
    from jaxsae.eval import next_token_ce

    contexts = iter_contexts(StdlibSource("val"), load_lm(SHIPPED).tokenizer, 128, bos_id=None)
    tokens = jnp.asarray(np.stack([next(contexts) for _ in range(4)]))
    mask = jnp.ones(tokens.shape, bool)
    ce = {}
    for dtype in ("float32", "bfloat16"):
        logits = load_lm(SHIPPED, dtype).logits(tokens)
        assert logits.dtype == jnp.float32
        total, n = next_token_ce(logits, tokens, mask)
        ce[dtype] = float(total / n)
    assert abs(ce["bfloat16"] - ce["float32"]) < 0.01, ce
