"""Byte-level BPE tokenizer trained locally (GPT-NeoX-style special tokens).

Lets the project build a tokenizer offline from the stdlib corpus and save it
in the standard Hugging Face layout, so ``AutoTokenizer.from_pretrained(dir)``
loads it like any hub tokenizer. `jaxsae.tools.demo_lm` trains the shipped model's with it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable

EOT = "<|endoftext|>"  # id 0: BOS, EOS and UNK, as in GPT-NeoX
PAD = "<|padding|>"    # id 1
SPECIAL_TOKENS = (EOT, PAD)
_N_BYTES = 256


def _build_untrained():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    # GPT-2 regex split; no prefix space so encode/decode is an exact round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets only; adds no BOS/EOS (the packer inserts those itself).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def wrap_tokenizer(tok):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
        # The default cleanup rewrites " ." etc. and would break exact round trips of code.
        clean_up_tokenization_spaces=False)


def train_bpe_tokenizer(docs: Iterable[str], vocab_size: int = 4096,
                        out_dir: str | os.PathLike | None = None, *, min_frequency: int = 2,
                        show_progress: bool = False):
    """Train a byte-level BPE on ``docs``; returns a ``transformers.PreTrainedTokenizerFast``.

    ids: 0 = ``<|endoftext|>`` (bos/eos/unk), 1 = ``<|padding|>``, then the 256
    byte symbols, then merges. The result can be smaller than ``vocab_size`` if the
    corpus runs out of pairs seen ``min_frequency`` times. Same docs -> same tokenizer.
    If ``out_dir`` is given it is written with ``save_pretrained``.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS) + _N_BYTES:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + _N_BYTES} (specials + bytes)")
    tok = _build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front so any input is encodable without UNK.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(iter(docs), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1], "special token ids moved"
    fast = wrap_tokenizer(tok)
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(fast, out_dir: str | os.PathLike) -> pathlib.Path:
    """``save_pretrained`` into ``out_dir`` (created); returns the directory."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 records its internal class name ("TokenizersBackend"), which
    # 4.x cannot resolve; the public alias loads on both.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
