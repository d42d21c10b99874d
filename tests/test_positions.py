"""Positions in the packed stream (`jaxsae.data.packing.Position`) and the streamed KL windows
(`jaxsae.data.windows`): resuming at a position is continuing, a window reads nothing before its start,
and a window of one block is the materialised window of before, in the same order."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from jaxsae import config as C
from jaxsae.data.packing import START, Position, iter_contexts, iter_positioned, pack_positioned, pack_tokens
from jaxsae.data.text import FilesSource, StdlibSource, stdlib_files
from jaxsae.data.windows import Window, block_order, open_window, store_end, take_contexts, window_spec

CTX = 32


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def _docs(n: int = 120, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 500, size=rng.integers(0, 30)).tolist() for _ in range(n)]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bos_id,eos_id,context", [(None, 0, 7), (1000, 0, 8), (1000, None, 5), (None, 0, 1)])
def test_packing_from_every_recorded_position_continues_the_stream(bos_id, eos_id, context):
    docs = _docs()
    docs[0] = []  # an empty first document: the stream's start is not (0, 0) of a non-empty one
    out = list(pack_positioned(enumerate(docs), context, bos_id, eos_id))
    assert _equal([r for r, _ in out], list(pack_tokens(docs, context, bos_id, eos_id)))
    kinds = {p.token == -1 for _, p in out} | {p.token > 0 for _, p in out}
    assert kinds == {True, False} or eos_id is None  # positions inside documents and at an EOS both occur
    for k in range(0, len(out), max(1, len(out) // 60)):
        p = out[k][1]
        rest = [r for r, _ in pack_positioned(enumerate(docs[p.doc:], start=p.doc), context, bos_id, eos_id, p)]
        assert _equal(rest, [r for r, _ in out[k + 1:]]), (k, p)


def _check_resumes(source, tok, n: int = 40):
    full = list(itertools.islice(iter_positioned(source, tok, CTX, bos_id=None), n))
    inside = [k for k, (_, p) in enumerate(full[:-5]) if p.token > 0]
    assert inside, "no position inside a document to resume from"
    for k in (0, inside[len(inside) // 2], n - 6):
        p = full[k][1]
        rest = list(itertools.islice(iter_contexts(source, tok, CTX, bos_id=None, start=p), n - k - 1))
        assert _equal(rest, [r for r, _ in full[k + 1:]]), (k, p)


def test_stdlib_source_resumes_from_a_position(tok):
    _check_resumes(StdlibSource("val"), tok)


def test_files_source_resumes_from_a_position_in_text_and_jsonl(tok, tmp_path):
    texts = [p.read_text() for p in stdlib_files("val")[:12]]
    for i, t in enumerate(texts[:4]):
        (tmp_path / f"a{i}.py").write_text(t)
    with open(tmp_path / "b.jsonl", "w") as f:  # its rows are documents 4.., a blank line among them
        for t in texts[4:]:
            f.write(json.dumps({"text": t[:3000]}) + "\n\n")
    src = FilesSource([str(tmp_path / "*.py"), str(tmp_path / "b.jsonl")])
    assert list(src.docs_from(6)) == list(src)[6:] and list(src.docs_from(2)) == list(src)[2:]
    _check_resumes(src, tok)


class CountingSource:
    """Documents from a list, counting which it hands out (the position of the first, the number)."""

    def __init__(self, docs: list[str]):
        self.docs, self.first, self.read = docs, None, 0

    def __iter__(self):
        return self.docs_from(0)

    def docs_from(self, doc: int):
        for i in range(doc, len(self.docs)):
            self.first = i if self.first is None else min(self.first, i)
            self.read += 1
            yield self.docs[i]


@pytest.fixture(scope="module")
def val_docs():
    return [p.read_text()[:2000] for p in stdlib_files("val")[:80]]


def _cfg(block: int = 65_536) -> C.RunConfig:
    cfg = C.RunConfig()
    data = dataclasses.replace(cfg.data, source={"kind": "counting"}, context=CTX, window_shuffle_sequences=block)
    return dataclasses.replace(cfg, data=data)


@pytest.fixture
def counting(monkeypatch, val_docs):
    """data.source {kind: counting} builds a fresh CountingSource over val_docs; returns the ones built."""
    from jaxsae.data import text

    made = []

    def make(spec):
        made.append(CountingSource(val_docs))
        return made[-1]

    monkeypatch.setattr(text, "make_source", make)
    return made


def _old_window(cfg, tok, n: int, skip: int, seed: int) -> np.ndarray:
    """The window as the KL phases materialised it before: every context after `skip`, permuted whole."""
    seqs = take_contexts(cfg, cfg.data.source, tok, n, skip, "data.source", "finetune.tokens")
    return seqs[np.random.default_rng(seed).permutation(len(seqs))]


def test_one_block_window_from_the_store_position_is_the_old_window(tok, counting):
    cfg, skip, n, seed = _cfg(), 37, 50, 3
    meta = {"contexts_consumed": skip}  # a store from before positions were recorded: found by reading
    start = store_end(cfg, tok, meta)
    old = _old_window(cfg, tok, n, skip, seed)
    counting.clear()
    w = open_window(cfg, tok, n, start, seed, "finetune.tokens")
    new = np.concatenate([w.rows(i, i + 5) for i in range(0, n, 5)])  # batch by batch, as the phase feeds
    assert new.dtype == np.int32 and np.array_equal(new, old)
    assert counting[0].first == start.doc  # nothing before the window's start was read
    recorded = {"contexts_consumed": skip, "stream_position": start.to_json()}
    assert store_end(cfg, tok, recorded) == start


def test_blocks_shuffle_within_themselves_and_a_resume_reads_only_its_block(tok, counting):
    cfg, n, block, seed = _cfg(block=16), 70, 16, 1
    start = store_end(cfg, tok, {"contexts_consumed": 9})
    ordered = take_contexts(cfg, cfg.data.source, tok, n, 9, "data.source", "finetune.tokens")
    w = open_window(cfg, tok, n, start, seed, "finetune.tokens")
    rows = np.concatenate([w.rows(i, min(i + 6, n)) for i in range(0, n, 6)])  # batches straddle blocks
    for b in range(5):
        size = min(block, n - b * block)
        want = ordered[b * block:b * block + size][block_order(seed, b, size)]
        assert np.array_equal(rows[b * block:b * block + size], want), b
    assert len(w.starts) == 5 and w.starts[0] == start and w.starts == sorted(w.starts)
    # a resume at block 3 from the starts a checkpoint recorded reads nothing before block 3's start
    counting.clear()
    again = open_window(cfg, tok, n, start, seed, "finetune.tokens", w.starts_json())
    assert np.array_equal(again.rows(50, 56), rows[50:56])
    assert counting[0].first == w.starts[3].doc and len(counting) == 1
    # without recorded starts the same rows come by reading from the window's start
    counting.clear()
    assert np.array_equal(Window(window_spec(cfg, n, seed, "finetune.tokens"), tok, [start]).rows(50, 56),
                          rows[50:56])
    assert counting[0].first == start.doc and len(counting) == 4


def test_a_window_past_the_text_names_its_budget(tok, counting):
    w = open_window(_cfg(), tok, 10**6, START, 0, "finetune.tokens")
    with pytest.raises(C.ConfigError, match="finetune.tokens needs 1000000: lower finetune.tokens"):
        w.rows(0, 8)


def test_window_block_size_is_validated():
    from jaxsae.validate import check_static

    cfg = C.RunConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, window_shuffle_sequences=0))
    with pytest.raises(C.ConfigError, match="data.window_shuffle_sequences=0 must be positive"):
        check_static(cfg)


def test_position_json_round_trip():
    p = Position(12, -1)
    assert Position.from_json(json.loads(json.dumps(p.to_json()))) == p and START == Position(0, 0)


def test_hf_source_resumes_from_a_document_on_a_local_stream(tmp_path, monkeypatch):
    """IterableDataset.skip on a local dataset streamed like a hub one (needs the optional `datasets`)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    from jaxsae.data.text import HFDatasetSource

    with open(tmp_path / "rows.jsonl", "w") as f:
        for i in range(25):
            f.write(json.dumps({"text": f"document {i} " * (i % 4 + 1)}) + "\n")
    src = HFDatasetSource(str(tmp_path))
    docs = list(src)
    assert len(docs) == 25
    for k in (1, 7, 24, 25):
        assert list(src.docs_from(k)) == docs[k:], k


def test_the_l1_probe_is_whole_documents_the_window_never_reads(tok, counting, val_docs):
    from jaxsae.data.windows import read_probe

    cfg = _cfg()
    start = store_end(cfg, tok, {"contexts_consumed": 9})
    assert start.token > 0  # the store ended inside a document: the probe starts at the next one
    probe, after = read_probe(cfg, tok, 12, start, "finetune.l0_probe_sequences")
    assert after.token == 0 and after.doc > start.doc + 1
    want = list(itertools.islice(iter_contexts(CountingSource(val_docs), tok, CTX, bos_id=None,
                                               start=Position(start.doc + 1, 0)), 12))
    assert np.array_equal(probe, np.stack(want))
    counting.clear()
    open_window(cfg, tok, 20, after, 0, "finetune.tokens").rows(0, 20)
    assert counting[0].first == after.doc  # the window reads none of the probe's documents
    with pytest.raises(C.ConfigError, match="finetune.l0_probe_sequences needs 100000"):
        read_probe(cfg, tok, 100_000, start, "finetune.l0_probe_sequences")


def test_an_eval_source_probe_is_whole_documents_after_the_evaluated_contexts(tok, counting, val_docs):
    """finetune.l0_probe_source=eval: the probe starts at the document after the eval.sequences contexts
    that evaluation reads, so no evaluated document is probed."""
    from jaxsae.data.windows import eval_end, eval_sequences, read_probe

    cfg = _cfg()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_source={"kind": "counting"}),
                              eval=dataclasses.replace(cfg.eval, sequences=9))
    end = eval_end(cfg, tok)
    seen = list(itertools.islice(iter_positioned(CountingSource(val_docs), tok, CTX, bos_id=None), 9))
    assert end == seen[-1][1] and end.token > 0  # the eval's last context ends inside a document
    assert np.array_equal(eval_sequences(cfg, tok), np.stack([r for r, _ in seen]))
    probe, after = read_probe(cfg, tok, 12, end, "finetune.l0_probe_sequences", source="eval_source")
    want = list(itertools.islice(iter_contexts(CountingSource(val_docs), tok, CTX, bos_id=None,
                                               start=Position(end.doc + 1, 0)), 12))
    assert np.array_equal(probe, np.stack(want)) and after.token == 0 and after.doc > end.doc + 1
    with pytest.raises(C.ConfigError, match="data.eval_source from .* finetune.l0_probe_sequences needs 100000"):
        read_probe(cfg, tok, 100_000, end, "finetune.l0_probe_sequences", source="eval_source")
    short = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sequences=100_000))
    with pytest.raises(C.ConfigError, match="fewer than eval.sequences=100000"):
        eval_end(short, tok)
