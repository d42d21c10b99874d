"""Trains the small GPT-NeoX that jaxsae ships, on the Python standard library's own source.

    python -m jaxsae.tools.demo_lm --out jaxsae/assets/pythia-stdlib

Everything here is jaxsae's own code: a byte-level BPE tokenizer (`tokenizers`), the Flax GPT-NeoX
port, optax AdamW. The corpus is read at run time from the interpreter's stdlib directory, with a
fixed set of files held out for validation (`jaxsae.data.text.is_val_path`). The result is saved in
Hugging Face format, so `transformers.GPTNeoXForCausalLM.from_pretrained` and `AutoTokenizer` load it
unchanged, with a model card recording the recipe, tokens seen, wall-clock and held-out CE.
Deterministic given `--seed` on a given Python version and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxsae.data.packing import iter_contexts
from jaxsae.data.text import StdlibSource
from jaxsae.tools.tokenizer import train_bpe_tokenizer
from jaxsae.models.gpt_neox import GPTNeoXConfig
from jaxsae.models.lm import LM, init_params

from jaxsae.models.shipped import SHIPPED  # noqa: E402  (re-exported)


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    batch_size: int = 64
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0


def model_config(r: Recipe) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=r.vocab_size, d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads,
                         d_mlp=4 * r.d_model, rotary_pct=0.25, rotary_base=10000.0, use_parallel_residual=True,
                         hidden_act="gelu", max_position_embeddings=r.context)


def token_array(source, tokenizer, context: int) -> np.ndarray:
    """All packed contexts of a source: int32[n, context] (documents joined by EOS, no BOS, like Pythia)."""
    rows = list(iter_contexts(source, tokenizer, context, bos_id=None))
    return np.stack(rows).astype(np.int32)


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token CE in nats. logits: [b, t, V]; tokens: int[b, t]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def evaluate(lm: LM, params, data: np.ndarray, batch: int = 32) -> float:
    f = jax.jit(lambda p, x: cross_entropy(lm.forward(x, params=p), x))
    losses = [float(f(params, data[i:i + batch])) for i in range(0, len(data) - batch + 1, batch)]
    return float(np.mean(losses))


def train(r: Recipe, out: Path) -> dict:
    t0 = time.time()
    tok = train_bpe_tokenizer(StdlibSource("train", shuffle_seed=None), vocab_size=r.vocab_size)
    train_data = token_array(StdlibSource("train", shuffle_seed=None), tok, r.context)
    val_data = token_array(StdlibSource("val", shuffle_seed=None), tok, r.context)
    print(f"tokenizer + data: {time.time() - t0:.1f}s, train {train_data.size:,} tokens, val {val_data.size:,}",
          file=sys.stderr)

    cfg = model_config(r)
    lm = LM(cfg, None)
    params = init_params(cfg, jax.random.PRNGKey(r.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, r.lr, r.warmup, r.steps, end_value=r.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=r.weight_decay))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(lm.forward(x, params=p), x))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(r.seed)
    order = np.concatenate([rng.permutation(len(train_data)) for _ in range(r.steps * r.batch_size // len(train_data) + 1)])
    t_train, loss_ema = time.time(), None
    bar = tqdm(range(r.steps), desc="train", unit="step", dynamic_ncols=True)
    for i in bar:
        x = train_data[order[i * r.batch_size:(i + 1) * r.batch_size]]
        params, opt_state, loss = step(params, opt_state, x)
        if i % 20 == 0 or i == r.steps - 1:
            loss = float(loss)
            loss_ema = loss if loss_ema is None else 0.8 * loss_ema + 0.2 * loss
            tps = (i + 1) * r.batch_size * r.context / (time.time() - t_train)
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tps:,.0f}", lr=f"{float(schedule(i)):.2e}")
    train_seconds = time.time() - t_train
    val_ce = evaluate(lm, params, val_data)
    train_ce = evaluate(lm, params, train_data[:len(val_data)])
    stats = dict(recipe=dataclasses.asdict(r), tokens_seen=r.steps * r.batch_size * r.context,
                 train_tokens=int(train_data.size), val_tokens=int(val_data.size),
                 val_ce_nats=round(val_ce, 4), train_ce_nats=round(train_ce, 4),
                 train_seconds=round(train_seconds, 1), total_seconds=round(time.time() - t0, 1),
                 python=platform.python_version(), jax=jax.__version__, devices=str(jax.devices()[0].platform))
    print(json.dumps(stats, indent=1), file=sys.stderr)
    save(cfg, params, tok, out, stats)
    return stats


def save(cfg: GPTNeoXConfig, params, tokenizer, out: Path, stats: dict) -> None:
    """Writes config.json, model.safetensors, the tokenizer files, training_stats.json and a model card."""
    import safetensors.numpy
    import transformers

    from jaxsae.models.hf import to_hf_state_dict

    out.mkdir(parents=True, exist_ok=True)
    transformers.GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, hidden_act=cfg.hidden_act,
        rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base, max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps, use_parallel_residual=cfg.use_parallel_residual, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, architectures=["GPTNeoXForCausalLM"],
    ).save_pretrained(out)
    safetensors.numpy.save_file(to_hf_state_dict(cfg, params, np.float32), out / "model.safetensors",
                                metadata={"format": "pt"})
    from jaxsae.tools.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, out)
    (out / "training_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (out / "README.md").write_text(model_card(stats))


def model_card(s: dict) -> str:
    r = s["recipe"]
    return f"""# pythia-stdlib: a small GPT-NeoX trained on Python's standard library

Trained by `python -m jaxsae.tools.demo_lm` with jaxsae's own Flax GPT-NeoX port and optax, so that the
SAE pipeline and the KL fine-tune can be demonstrated without downloading a model.

| | |
|---|---|
| architecture | GPT-NeoX (Pythia layout): {r['n_layers']} layers, d_model {r['d_model']}, {r['n_heads']} heads, d_mlp {4 * r['d_model']}, parallel residual, rotary on 25% of each head, untied unembedding |
| tokenizer | byte-level BPE, {r['vocab_size']} tokens, trained on the training files; `<\\|endoftext\\|>` = id 0 separates documents |
| corpus | the `*.py` files of the CPython {s['python']} standard library (read at run time, not shipped); ~3% of files held out by a hash of their path |
| training | {s['tokens_seen']:,} tokens ({r['steps']} steps x {r['batch_size']} x {r['context']}), AdamW (0.9, 0.95), lr {r['lr']} with {r['warmup']} warm-up steps and cosine decay, weight decay {r['weight_decay']}, grad clip 1.0, seed {r['seed']} |
| corpus size | {s['train_tokens']:,} training tokens, {s['val_tokens']:,} held-out tokens |
| wall-clock | {s['train_seconds']} s training, {s['total_seconds']} s in all, on {s['devices']} (jax {s['jax']}) |
| held-out CE | **{s['val_ce_nats']} nats/token** (train {s['train_ce_nats']}; uniform over the vocabulary would be {np.log(r['vocab_size']):.2f}) |

Load it with `jaxsae.models.load_lm(jaxsae.models.shipped.SHIPPED)` or
`transformers.GPTNeoXForCausalLM.from_pretrained(...)`.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=SHIPPED)
    for f in dataclasses.fields(Recipe):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--smoke", action="store_true", help="load the shipped model and print its held-out CE")
    a = ap.parse_args(argv)
    if a.smoke:
        from jaxsae.models import load_lm

        lm = load_lm(SHIPPED)
        val = token_array(StdlibSource("val", shuffle_seed=None), lm.tokenizer, lm.config.max_position_embeddings)
        print(f"{SHIPPED.name}: {lm.n_layers} layers, d_model {lm.d_model}; held-out CE "
              f"{evaluate(lm, lm.params, val):.3f} nats/token over {val.size:,} tokens")
        return
    train(Recipe(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Recipe)}), a.out)


if __name__ == "__main__":
    main()
