"""The whole trainer on a Gemma 2 checkpoint, the way the paper's Gemma runs are configured: a tiny
random `Gemma2ForCausalLM` saved by transformers (GQA, sliding window shorter than the context, both
soft-caps), bfloat16 weights, BOS prepended to every context and dropped from the store."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsae.data.store import open_store

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> Path:
    import torch
    import transformers

    from jaxsae.models.shipped import SHIPPED

    d = tmp_path_factory.mktemp("gemma2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real BPE; its BOS is id 0
        shutil.copy(SHIPPED / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                    query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(d)
    return d


def _run(gemma2_dir: Path, run_dir: Path, *extra: str, env: dict | None = None) -> dict:
    args = [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / "gemma-2-2b-topk-k40.yaml"),
            "--run-dir", str(run_dir), "--set", f"model.path={gemma2_dir}", "--set", "hook.layer=1",
            "--set", "data.source={kind: stdlib, split: train}", "--set", "data.eval_source={kind: stdlib, split: val}",
            "--set", "data.context=24", "--set", "store.tokens=6000", "--set", "store.batch_contexts=8",
            "--set", "store.norm_sample_tokens=2000", "--set", "sae.d_sae=128", "--set", "sae.k=8",
            "--set", "mse.tokens=12000", "--set", "mse.batch_size=240", "--set", "mse.warmup_steps=5",
            "--set", "finetune.tokens=960", "--set", "finetune.batch_sequences=4", "--set", "finetune.lr=1e-3",
            "--set", "checkpoint.every_steps=20", "--set", "eval.sequences=8",
            "--set", "data.include_first_position=false", "--set", "phases=[mse, finetune]", *extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((run_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def one_device_run(gemma2_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The run on one device: checked on its own, and the reference of the mesh run."""
    run_dir = tmp_path_factory.mktemp("gemma2_run") / "run"
    return run_dir, _run(gemma2_dir, run_dir)


def test_gemma2_bf16_bos_run_collects_trains_and_fine_tunes(one_device_run):
    run_dir, ev = one_device_run
    store = open_store(run_dir / "store")
    meta = store.meta
    assert meta["dtype"] == "bfloat16" and meta["model"]["arch"] == "gemma2" and meta["layer"] == 1
    assert meta["positions"]["bos_prepended"] and meta["positions"]["dropped"] == [0]
    assert meta["positions"]["rows_per_context"] == 23
    assert list(ev) == ["mse", "finetune"]
    for m in ev.values():  # (a random LM: zero-ablation need not hurt it, so no CE ordering is asserted)
        assert all(map(math.isfinite, (m["ce_clean"], m["ce_spliced"], m["kl"])))
        assert m["l0"] == pytest.approx(8.0) and 0 < m["fve"] <= 1
    assert ev["finetune"]["kl"] < ev["mse"]["kl"]  # the KL fine-tune moved the SAE towards the LM's logits
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ft = [x for x in lines if x["phase"] == "finetune"]
    assert ft and all(x["train/kl"] >= 0 and x["train/beta"] > 0 for x in ft)


def test_gemma2_run_on_a_4x2_mesh_with_a_tensor_parallel_lm(gemma2_dir, one_device_run, tmp_path):
    """The same run on 8 devices: batches over data=4, latents and the LM's heads / MLP / vocabulary
    over model=2 (kv_heads 2). The SAE trains on other rows per step, so results are close, not equal."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    _, one = one_device_run
    mesh = _run(gemma2_dir, tmp_path / "mesh", "--set", "mesh.model=2", "--set", "model.lm_sharding=tensor", env=env)
    assert mesh["mse"]["ce_clean"] == pytest.approx(one["mse"]["ce_clean"], abs=2e-2)  # bf16 LM, other reductions
    for phase in ("mse", "finetune"):
        assert mesh[phase]["fve"] == pytest.approx(one[phase]["fve"], abs=0.05)
        assert mesh[phase]["kl"] == pytest.approx(one[phase]["kl"], rel=0.2, abs=2e-3)
