"""Every real config rehearsed end to end at its real shapes, before anyone pays for a slice.

configs/pythia-160m-*.yaml and gemma-2-2b-*.yaml name hub models and hub text; here each runs through
`python -m jaxsae.train` on a random-weight model of the published architecture (built by transformers
and saved with `save_pretrained`, the shipped BPE tokenizer beside it) and the local stdlib text, with
tiny token budgets: collect (one config streams instead), MSE, the fine-tune (and the control on one
config), evaluation after each phase, the report. Kept real: d_model, d_sae, k, the SAE kind, the hook
layer, store.dtype and model.dtype (bfloat16 for Gemma), the heads, MLP widths, soft-caps, sliding
window and every block up to the hook.

The CI test (`test_real_config_rehearses`) shrinks what two CPU cores cannot afford in its time:
  - data.context 1024 -> CONTEXT (32): a Gemma-2 forward over one 1024-token context on two CPU cores
    takes minutes, and every phase runs several;
  - Gemma's vocabulary 256,000 -> 4,096 (the shipped tokenizer's, so every id fits): the tied 256k x
    2304 embedding is 590M of the random model's parameters, seconds to draw and save and a 256k-wide
    logits matmul in every KL step and evaluation;
  - Gemma's 26 blocks -> 13, ending at the hook (block 12): the blocks above run only in the KL phases
    and evaluation, and the Pythia runs already splice through blocks above their hook;
  - batches (mse.batch_size, finetune.batch_sequences, eval.*) and token budgets, to one or two steps.
Even so it is the suite's longest file: about 3 minutes on two idle cores for the four configs CI runs,
most of it XLA compiling each config's programs (the README, "Real runs", has the timings).
`test_real_context_rehearses` (marked real_context, which tests/run.sh deselects) runs the same five at
context 1024 with both real vocabularies and one Gemma block above the hook (14 layers)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CONTEXT = 32  # the CI rehearsal's context (the configs': 1024)

# The published architectures (the hub's config.json of EleutherAI/pythia-160m-deduped, google/gemma-2-2b).
PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                   max_position_embeddings=2048, layer_norm_eps=1e-5, tie_word_embeddings=False,
                   bos_token_id=0, eos_token_id=0)
GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, intermediate_size=9216, hidden_activation="gelu_pytorch_tanh",
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                  query_pre_attn_scalar=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)  # the shipped tokenizer's BOS/EOS and PAD
# Blocks kept of Gemma's 26: the CI test's model ends at the hook (block 12, so the splice feeds the final
# norm and the logits; Pythia's runs splice through blocks above theirs), the slow test's keeps one above it.
GEMMA_LAYERS_CI, GEMMA_LAYERS = 13, 14

# config -> (model, d_model, hook layer, SAE kind, k); k is None for ReLU
CONFIGS = {
    "pythia-160m-topk-k80": ("pythia", 768, 8, "topk", 80),
    "pythia-160m-topk-k20": ("pythia", 768, 8, "topk", 20),
    "pythia-160m-relu": ("pythia", 768, 8, "relu", None),
    "gemma-2-2b-topk-k40": ("gemma", 2304, 12, "topk", 40),
    "gemma-2-2b-topk-k80": ("gemma", 2304, 12, "topk", 80),
}
D_SAE = 16384  # every real config's
# One config streams its MSE rows (store.mode=stream), the rest collect a disk store.
STREAMED = "pythia-160m-topk-k20"
# The configs list no `phases:` (the default mse, finetune: what their README command runs); the control
# is what a user adds to measure the fine-tune net of extra tokens. It is the fine-tune's runner with the
# KL share 0 (same shapes), so one config adds it: on a Gemma config it would cost CI ~40 s more.
WITH_CONTROL = ("pythia-160m-topk-k80",)


def save_random_model(d: Path, arch: str, **overrides) -> Path:
    """A random-weight `arch` ("pythia" | "gemma") saved by transformers into `d` with the shipped tokenizer.
    The weights are allocated without transformers' initialisation (tens of seconds for Gemma's 1B+
    parameters on two cores) and drawn as bfloat16 bit patterns: a random sign and mantissa under a fixed
    exponent, |w| in [1/128, 1/64) (about init_range's 0.02), norms at their identity."""
    import numpy as np
    import torch
    import transformers

    from jaxsae.models.shipped import SHIPPED

    if arch == "pythia":
        cls, cfg = transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**{**PYTHIA_160M, **overrides})
        dtype = torch.float32  # the configs run Pythia in float32 (model.dtype's default)
    else:
        cls, cfg = transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**{**GEMMA_2_2B, **overrides})
        dtype = torch.bfloat16
    d.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real BPE; its BOS is id 0
        shutil.copy(SHIPPED / name, d / name)
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    model = model.to_empty(device="cpu")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # LayerNorm scales 1 and biases 0; Gemma's RMSNorm weights 0 (it scales by 1 + w)
                p.fill_(1.0 if arch == "pythia" and "norm" in name and name.endswith("weight") else 0.0)
                continue
            bits = rng.integers(0, 1 << 63, size=(p.numel() + 3) // 4, dtype=np.uint64).view(np.uint16)[:p.numel()]
            bits = (bits & np.uint16(0x807F)) | np.uint16(120 << 7)  # sign, 7 mantissa bits, exponent 2^-7
            p.copy_(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).view(p.shape))
    model.tie_weights()
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def pythia_160m(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("pythia-160m"), "pythia")


@pytest.fixture(scope="session")
def gemma_2_2b_small_vocab(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("gemma-2-2b"), "gemma", num_hidden_layers=GEMMA_LAYERS_CI,
                             vocab_size=4096)


@pytest.fixture(scope="session")
def gemma_2_2b(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("gemma-2-2b-full"), "gemma", num_hidden_layers=GEMMA_LAYERS)


def rehearse(config: str, model: Path, run_dir: Path, context: int) -> subprocess.CompletedProcess:
    """`python -m jaxsae.train` on configs/<config>.yaml as it is, but for the model, the local text and
    budgets of one or two steps per phase (batches of one context)."""
    phases = "[mse, control, finetune]" if config in WITH_CONTROL else "[mse, finetune]"
    sets = [f"model.path={model}", "data.source={kind: stdlib, split: train}",
            "data.eval_source={kind: stdlib, split: val}", f"data.context={context}",
            f"store.tokens={2 * context}", "store.batch_contexts=2", f"store.norm_sample_tokens={context}",
            f"mse.tokens={2 * context}", f"mse.batch_size={context}", "mse.warmup_steps=1",
            f"finetune.tokens={context}", "finetune.batch_sequences=1", "checkpoint.every_steps=1000",
            "eval.sequences=1", "eval.batch_sequences=1", f"phases={phases}"]
    if config == STREAMED:
        sets += ["store.mode=stream", f"store.buffer_rows={2 * context}"]
    args = [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / f"{config}.yaml"),
            "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=3600)


def check_run(config: str, run_dir: Path, r: subprocess.CompletedProcess) -> None:
    import jaxsae

    arch, d_model, layer, kind, k = CONFIGS[config]
    assert r.returncode == 0, r.stderr[-3000:]
    phases = ["mse", "control", "finetune"] if config in WITH_CONTROL else ["mse", "finetune"]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert list(ev) == phases
    for m in ev.values():
        assert all(math.isfinite(m[key]) for key in ("ce_clean", "ce_spliced", "kl", "fve", "l0")), m
        if k is not None:
            assert m["l0"] == pytest.approx(k)
    assert (run_dir / "report.md").stat().st_size > 0
    meta = json.loads((run_dir / "store" / "meta.json").read_text())
    assert meta["mode" if config == STREAMED else "dtype"] == ("stream" if config == STREAMED else "bfloat16")
    assert (run_dir / "store" / "activations").exists() != (config == STREAMED)
    assert meta["layer"] == layer and meta["model"]["d_model"] == d_model and meta["dtype"] == "bfloat16"
    assert meta["model"]["arch"] == ("gpt_neox" if arch == "pythia" else "gemma2")
    for phase in phases:
        sae = jaxsae.load_sae(run_dir / "checkpoints" / phase)
        assert (sae.cfg.kind, sae.cfg.d_model, sae.cfg.d_sae) == (kind, d_model, D_SAE)
        assert sae.params["W_enc"].shape == (d_model, D_SAE)
        if k is not None:
            assert sae.cfg.k == k


# gemma-2-2b-topk-k80 is gemma-2-2b-topk-k40's run with another k (64 s more, the suite is at its CI time
# budget): it runs with the real-context tier, or by name (-k gemma-2-2b-topk-k80 -m real_context)
CI_CONFIGS = [c for c in CONFIGS if c != "gemma-2-2b-topk-k80"]


@pytest.mark.parametrize("config", [*CI_CONFIGS, pytest.param("gemma-2-2b-topk-k80", marks=pytest.mark.real_context)])
def test_real_config_rehearses(config, request, tmp_path):
    model = request.getfixturevalue("pythia_160m" if CONFIGS[config][0] == "pythia" else "gemma_2_2b_small_vocab")
    run_dir = tmp_path / "run"
    check_run(config, run_dir, rehearse(config, model, run_dir, CONTEXT))


@pytest.mark.real_context
@pytest.mark.parametrize("config", list(CONFIGS))
def test_real_context_rehearses(config, request, tmp_path):
    """The configs' own context (1024) and vocabularies: minutes per config on a CPU, so not in CI."""
    model = request.getfixturevalue("pythia_160m" if CONFIGS[config][0] == "pythia" else "gemma_2_2b")
    run_dir = tmp_path / "run"
    check_run(config, run_dir, rehearse(config, model, run_dir, 1024))
