"""The whole trainer on a Llama checkpoint through the CLI: a tiny random `LlamaForCausalLM` saved by
transformers (GQA 4:1, Llama 3.1's RoPE scaling, untied head) with the shipped BPE tokenizer, BOS
prepended to every context as Llama 3 does and dropped from the store."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsae.data.store import open_store

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    import torch
    import transformers

    from jaxsae.models.shipped import SHIPPED

    d = tmp_path_factory.mktemp("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real BPE; its BOS is id 0
        shutil.copy(SHIPPED / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_llama_run_collects_trains_and_fine_tunes(llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--run-dir", str(run_dir), "--set", f"model.path={llama_dir}", "--set", "hook.layer=1",
            "--set", "data.source={kind: stdlib, split: train}", "--set", "data.eval_source={kind: stdlib, split: val}",
            "--set", "data.context=24", "--set", "data.prepend_bos=true", "--set", "store.tokens=6000",
            "--set", "store.batch_contexts=8", "--set", "store.norm_sample_tokens=2000", "--set", "sae.d_sae=128",
            "--set", "sae.k=8", "--set", "mse.tokens=12000", "--set", "mse.batch_size=240",
            "--set", "mse.warmup_steps=5", "--set", "finetune.tokens=960", "--set", "finetune.batch_sequences=4",
            "--set", "finetune.lr=1e-3", "--set", "checkpoint.every_steps=20", "--set", "eval.sequences=8",
            "--set", "data.include_first_position=false", "--set", "phases=[mse, finetune]"]  # BOS dropped
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = open_store(run_dir / "store").meta
    assert meta["model"]["arch"] == "llama" and meta["layer"] == 1 and meta["model"]["d_model"] == 64
    assert meta["model"]["config"]["rope_scaling"]["original_max_position_embeddings"] == 32
    assert meta["positions"]["bos_prepended"] and meta["positions"]["rows_per_context"] == 23
    ev = json.loads((run_dir / "eval.json").read_text())
    assert list(ev) == ["mse", "finetune"]
    for m in ev.values():  # (a random LM: zero-ablation need not hurt it, so no CE ordering is asserted)
        assert all(map(math.isfinite, (m["ce_clean"], m["ce_spliced"], m["kl"])))
        assert m["l0"] == pytest.approx(8.0) and 0 < m["fve"] <= 1
    assert ev["finetune"]["kl"] < ev["mse"]["kl"]  # the KL fine-tune moved the SAE towards the LM's logits
