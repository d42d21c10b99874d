"""Tests for jaxsae.data.text (corpus, sources, packing) and jaxsae.tools.tokenizer."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from jaxsae.data import text as T
from jaxsae.data.packing import batch_contexts, iter_contexts, pack_tokens
from jaxsae.data.text import FilesSource, HFDatasetSource, StdlibSource, make_source, stdlib_files


# --------------------------------------------------------------------------- stdlib split

def test_split_disjoint_deterministic_and_about_3_percent():
    train, val, all_ = stdlib_files("train"), stdlib_files("val"), stdlib_files("all")
    assert train == stdlib_files("train") and val == stdlib_files("val")  # deterministic
    assert set(train).isdisjoint(val)
    assert sorted(train + val, key=str) == sorted(all_, key=str)
    root = T.stdlib_root()
    rels = [p.relative_to(root).as_posix() for p in all_]
    assert rels == sorted(rels)
    assert not any("site-packages" in r or "__pycache__" in r for r in rels)
    assert len(all_) > 200 and 0.015 < len(val) / len(all_) < 0.06


def test_split_hash_is_stable_and_include_tests_filters():
    # Pinned values guard against accidental changes to the hold-out rule.
    assert T.is_val_path("collections/__init__.py") is True
    assert T.is_val_path("os.py") is False
    no_tests = stdlib_files("all", include_tests=False)
    assert 0 < len(no_tests) < len(stdlib_files("all"))
    assert not any(T._is_test_path(p.relative_to(T.stdlib_root())) for p in no_tests)
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")


def test_stdlib_files_custom_root_prunes(tmp_path):
    for rel in ["a.py", "pkg/b.py", "site-packages/x.py", "pkg/__pycache__/c.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    got = [p.relative_to(tmp_path).as_posix() for p in stdlib_files("all", root=tmp_path)]
    assert got == ["a.py", "pkg/b.py"]


def test_stdlib_source_reads_and_describes():
    src = StdlibSource("val")
    docs = list(src)
    assert len(docs) == len(src.files()) and all(isinstance(d, str) for d in docs)
    meta = src.describe()
    assert meta["kind"] == "stdlib" and meta["n_files"] == len(docs) and meta["fingerprint"]
    assert meta == StdlibSource("val").describe()


# --------------------------------------------------------------------------- packing

def test_pack_tokens_exact_example():
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    out = list(pack_tokens(docs, 4, bos_id=None, eos_id=0))
    assert [c.tolist() for c in out] == [[1, 2, 3, 0], [4, 5, 0, 6]]  # tail [7, 8, 9] dropped
    out = list(pack_tokens(docs, 4, bos_id=99, eos_id=0))
    assert [c.tolist() for c in out] == [[99, 1, 2, 3], [99, 0, 4, 5], [99, 0, 6, 7]]
    assert all(c.dtype == np.int32 and c.shape == (4,) for c in out)
    with pytest.raises(ValueError):
        list(pack_tokens(docs, 1, bos_id=99, eos_id=0))


@pytest.mark.parametrize("bos_id", [None, 1000])
def test_pack_tokens_covers_stream(bos_id):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 500, size=rng.integers(0, 40)).tolist() for _ in range(200)]
    stream = []
    for d in (d for d in docs if d):
        stream += ([0] if stream else []) + d  # EOS (0) only between non-empty docs
    context = 16
    body = context - (bos_id is not None)
    out = list(pack_tokens(docs, context, bos_id=bos_id, eos_id=0))
    assert len(out) == len(stream) // body
    assert all(c.shape == (context,) for c in out)
    if bos_id is not None:
        assert all(c[0] == bos_id for c in out)
    body_tokens = np.concatenate([c[context - body:] for c in out]).tolist()
    assert body_tokens == stream[:len(body_tokens)]


# --------------------------------------------------------------------------- tokenizer-backed streams

class WhitespaceTokenizer:
    """Stand-in with the ``transformers`` call convention (exercises the non-Rust path)."""

    bos_token_id, eos_token_id = 0, 0

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[len(w) + 1 for w in d.split()] for d in docs]}


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    from jaxsae.tools.tokenizer import train_bpe_tokenizer

    files = stdlib_files("train")[::43][:40]
    out = tmp_path_factory.mktemp("tok")
    tok = train_bpe_tokenizer((T.read_text(p) for p in files), vocab_size=512, out_dir=out)
    return tok, out


def test_skip_contexts_skips_exactly(small_tok):
    tok, _ = small_tok
    src = FilesSource([str(p) for p in stdlib_files("val")[:12]])
    full = list(iter_contexts(src, tok, 64, doc_batch_size=5))
    assert len(full) > 20 and all(c[0] == tok.bos_token_id for c in full)
    for k in (0, 1, 7, len(full)):
        rest = list(iter_contexts(src, tok, 64, skip_contexts=k, doc_batch_size=3))
        assert len(rest) == len(full) - k
        assert all(np.array_equal(a, b) for a, b in zip(rest, full[k:]))
    batches = list(batch_contexts(iter_contexts(src, tok, 64, skip_contexts=2), 4))
    assert len(batches) == (len(full) - 2) // 4 and batches[0].shape == (4, 64)
    assert batches[0].dtype == np.int32 and np.array_equal(batches[0][0], full[2])


def test_batched_contexts_with_callable_tokenizer():
    docs = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii"]
    rows = list(iter_contexts(docs, WhitespaceTokenizer(), 3, bos_id=None))
    assert [r.tolist() for r in rows] == [[2, 3, 4], [0, 5, 0], [2, 3, 4]]
    batches = list(batch_contexts(iter_contexts(docs, WhitespaceTokenizer(), 3, bos_id=None), 2))
    assert len(batches) == 1 and batches[0].shape == (2, 3)
    assert len(list(batch_contexts(iter_contexts(docs, WhitespaceTokenizer(), 3, bos_id=None), 2,
                                   drop_last=False))) == 2


# --------------------------------------------------------------------------- files / hf / factory

def test_files_source_text_jsonl_globs(tmp_path):
    (tmp_path / "b.txt").write_text("beta\n")
    (tmp_path / "a.py").write_text("def a():\n    pass\n")
    (tmp_path / "sub").mkdir()
    rows = [{"body": "one"}, {"body": "two", "x": 1}]
    (tmp_path / "sub" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = FilesSource([str(tmp_path / "*.*"), tmp_path / "sub" / "c.jsonl"], text_field="body")
    assert list(src) == ["def a():\n    pass\n", "beta\n", "one", "two"]
    assert list(src) == list(src)
    assert list(FilesSource(str(tmp_path / "sub"), text_field="body")) == ["one", "two"]
    assert src.describe()["n_files"] == 3
    with pytest.raises(KeyError, match="c.jsonl:1"):
        list(FilesSource(tmp_path / "sub" / "c.jsonl"))
    with pytest.raises(FileNotFoundError):
        FilesSource(str(tmp_path / "*.nothing")).files()
    (tmp_path / "d.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported"):
        FilesSource(tmp_path / "d.bin").files()


def test_make_source_builds_and_rejects():
    assert make_source({"kind": "stdlib", "split": "val"}) == StdlibSource("val")
    assert isinstance(make_source({"kind": "files", "paths": ["x.txt"]}), FilesSource)
    hf = make_source({"kind": "hf", "name": "monology/pile-uncopyrighted"})
    assert hf.describe()["name"] == "monology/pile-uncopyrighted"  # no network touched
    with pytest.raises(ValueError, match="'kind'.*stdlib"):
        make_source({"split": "train"})
    with pytest.raises(ValueError, match="'nope'.*files.*hf.*stdlib"):
        make_source({"kind": "nope"})
    with pytest.raises(ValueError, match="'splitt'.*valid keys.*'split'"):
        make_source({"kind": "stdlib", "splitt": "train"})
    with pytest.raises(ValueError, match="'name'"):
        make_source({"kind": "hf"})


def test_hf_source_streams_and_explains_failures(monkeypatch):
    calls = {}

    def fake_load(name, config, split, streaming, revision):
        calls.update(name=name, streaming=streaming)
        return iter([{"text": "doc one"}, {"text": "doc two"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    assert list(HFDatasetSource("org/ds")) == ["doc one", "doc two"]
    assert calls == {"name": "org/ds", "streaming": True}
    with pytest.raises(KeyError, match="content"):
        list(HFDatasetSource("org/ds", text_field="content"))

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="network access to the Hugging Face Hub"):
        list(HFDatasetSource("org/ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # simulates "not installed"
    with pytest.raises(ImportError, match="datasets"):
        list(HFDatasetSource("org/ds"))


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_special_ids(small_tok):
    from transformers import AutoTokenizer

    tok, out = small_tok
    assert len(tok) == 512
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = AutoTokenizer.from_pretrained(str(out))
    for t in (tok, loaded):
        assert (t.bos_token_id, t.eos_token_id, t.unk_token_id, t.pad_token_id) == (0, 0, 0, 1)
        assert t.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    tricky = "class A:\n\tdef f(self):\n        return  x ,  y .\r\n\n  # é ☃ \ufffd\n"
    texts = [tricky] + [T.read_text(p) for p in stdlib_files("val")[:5]]
    for text in texts:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
        assert loaded.encode(text) == ids  # no BOS/EOS added implicitly (GPT-NeoX behaviour)


def test_tokenizer_training_is_deterministic(small_tok):
    from jaxsae.tools.tokenizer import train_bpe_tokenizer

    docs = [T.read_text(p) for p in stdlib_files("val")[:8]]
    a = train_bpe_tokenizer(docs, vocab_size=300)
    b = train_bpe_tokenizer(iter(docs), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(docs, vocab_size=200)
