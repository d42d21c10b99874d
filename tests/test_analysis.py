"""`jaxsae.analysis` and `python -m jaxsae.analysis`: every reported number against a brute-force one.

A tiny run directory is made the way the trainer makes one (config.yaml + an Orbax checkpoint through
`Checkpointer`) around the shipped model and a random SAE, so no training is needed.
"""

from __future__ import annotations

import dataclasses
import html
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsae
from jaxsae import config as C
from jaxsae.validate import sae_config
from jaxsae.analysis import (DensityCounter, FeatureEncoder, Request, TopContexts, analyze, feature_activations,
                             feature_logit_effects, inspect_run, top_k_sparse, unembedding)
from jaxsae.analysis.stream import open_run_store, store_batches, text_batches

ROOT = Path(__file__).parent.parent
D_SAE, LAYER, CONTEXT = 64, 1, 32
TEXT = "".join(f"def f{i}(x, y={i}):\n    if x > {i}:\n        return x * y  # é→ü {i}\n    return None\n\n"
               for i in range(60))


@pytest.fixture(scope="module")
def lm():
    from jaxsae.models.shipped import SHIPPED
    from jaxsae.models import load_lm

    return load_lm(SHIPPED)


@pytest.fixture(scope="module")
def run_dir(lm, tmp_path_factory) -> Path:
    """config.yaml + checkpoints/mse/7 of a random TopK SAE whose encoder bias spreads the densities."""
    from jaxsae.checkpoint import Checkpointer
    from jaxsae.data.collect import collect
    from jaxsae.data.text import make_source
    from jaxsae.sae import init_sae

    d = tmp_path_factory.mktemp("analysis") / "tiny"
    (d / "text").mkdir(parents=True)
    (d / "text" / "code.py").write_text(TEXT)
    src = {"kind": "files", "paths": [str(d / "text" / "code.py")]}
    cfg = C.load_config(None, [f"model.path={lm.path}", f"hook.layer={LAYER}", f"data.context={CONTEXT}",
                               f"sae.d_sae={D_SAE}", "sae.k=6", "store.tokens=2000", "mse.tokens=1024",
                               "mse.batch_size=256", "mse.warmup_steps=0"],
                        base={"data": {"source": src, "eval_source": src}})
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(C.dump(cfg))
    sae_cfg = sae_config(cfg, lm.d_model)
    params = init_sae(sae_cfg, jax.random.PRNGKey(0))
    params["b_enc"] = jax.random.normal(jax.random.PRNGKey(1), (D_SAE,)) * 0.5
    info = collect(lm, LAYER, make_source(src), lm.tokenizer, d / "store", n_tokens=2000, context=CONTEXT,
                   batch_contexts=4, bos_id=None, drop_first=True, progress=False)
    ckpt = Checkpointer(d / "checkpoints" / "mse")
    ckpt.save(7, {"params": params}, {"phase": "mse", "sae": dataclasses.asdict(sae_cfg), "scale": info.scale,
                                      "hook_layer": LAYER, "model": str(lm.path), "step": 7})
    ckpt.close()
    return d


@pytest.fixture(scope="module")
def encoder(lm, run_dir):
    return FeatureEncoder(lm, jaxsae.load_sae(run_dir), LAYER)


def _contexts(run_dir, lm, n):
    """int32[n, context] tokens and bool[n, context] counted positions, as the analysis streams them."""
    info = inspect_run(run_dir)
    batches = list(text_batches(dict(info.cfg.data.eval_source), lm.tokenizer, info, n, batch=n))
    return batches[0].tokens, batches[0].valid


def test_run_is_read_from_config_and_checkpoint(run_dir, lm):
    info = inspect_run(run_dir)
    assert (info.layer, info.d_sae, info.phase, info.model_path) == (LAYER, D_SAE, "mse", str(lm.path))
    assert not info.include_first


def test_top_contexts_are_the_brute_force_top(run_dir, lm, encoder):
    tokens, valid = _contexts(run_dir, lm, 20)
    assert not valid[:, 0].any() and valid[:, 1:].all()  # position 0 does not count, as in training
    full = np.where(valid[..., None], np.asarray(feature_activations(lm, encoder.sae, LAYER, tokens)), 0.0)
    features, n = [0, 5, 17, 63], 6
    top = TopContexts(features, n)
    for a in range(0, 20, 7):  # uneven batches: the result must not depend on the cut
        acts, _ = encoder.scan_step(valid[a:a + 7], features, tokens=tokens[a:a + 7])
        np.testing.assert_allclose(acts, full[a:a + 7][..., features], rtol=1e-5, atol=1e-5)
        top.update(tokens[a:a + 7], acts, a)
    for f in features:
        score = full[..., f].max(1)
        order = [int(i) for i in np.lexsort((np.arange(20), -score)) if score[i] > 0][:n]
        got = top.examples(f)
        assert [e.context for e in got] == order, f
        for e in got:
            np.testing.assert_allclose(e.value, score[e.context], rtol=1e-5)
            assert e.peak == int(np.argmax(full[e.context, :, f]))  # the highlighted token is the argmax
            np.testing.assert_array_equal(e.tokens, tokens[e.context])
            a, b = e.window(12, 4)
            assert (a, b) == (max(0, e.peak - 12), min(CONTEXT, e.peak + 5))


def test_densities_are_a_brute_force_count(run_dir, lm, encoder):
    tokens, valid = _contexts(run_dir, lm, 12)
    full = np.asarray(feature_activations(lm, encoder.sae, LAYER, tokens))
    dens = DensityCounter(D_SAE)
    for a in range(0, 12, 5):
        _, fired = encoder.scan_step(valid[a:a + 5], [0], tokens=tokens[a:a + 5])
        dens.update(fired, valid[a:a + 5].sum())
    want = ((full > 0) & valid[..., None]).sum((0, 1))
    np.testing.assert_array_equal(dens.fired, want)
    assert dens.tokens == valid.sum() == 12 * (CONTEXT - 1)
    np.testing.assert_allclose(dens.density, want / valid.sum())
    assert 0 < (want > 0).sum() <= D_SAE and want.sum() <= 6 * valid.sum()  # k = 6 per token


def test_logit_effects_are_the_direct_numpy_computation(lm, encoder):
    p = jax.device_get(lm.params)
    gamma, W_U = np.asarray(p["final_layer_norm"]["scale"]), np.asarray(p["embed_out"])
    sae = encoder.sae
    for f in (0, 9, 63):
        d = np.asarray(sae.params["W_dec"][f]) * sae.scale
        want = ((d - d.mean()) * gamma) @ W_U
        eff = feature_logit_effects(sae, unembedding(lm), f, k=7)
        top, bottom = np.argsort(-want)[:7], np.argsort(want)[:7]
        assert [i for i, _ in eff.top] == list(top) and [i for i, _ in eff.bottom] == list(bottom)
        np.testing.assert_allclose([v for _, v in eff.top], want[top], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([v for _, v in eff.bottom], want[bottom], rtol=1e-4, atol=1e-5)


def test_encode_text_and_sparse_form(lm, encoder):
    text = "def f(x):\n    return x  # é→ü\n"
    out = encoder.encode_text(text)
    assert "".join(out.pieces) == text and len(out.pieces) == len(out.tokens)
    np.testing.assert_allclose(out.acts, np.asarray(feature_activations(lm, encoder.sae, LAYER, out.tokens[None]))[0],
                               rtol=1e-5, atol=1e-5)
    vals, idx = top_k_sparse(out.acts, 6)
    assert ((out.acts > 0).sum(-1) <= 6).all()
    np.testing.assert_allclose(np.take_along_axis(out.acts, np.asarray(idx), -1), vals)
    np.testing.assert_allclose(np.sort(out.acts, -1)[:, ::-1][:, :6], vals)


def test_store_tokens_are_rederived_exactly(run_dir, lm, encoder):
    """Store rows with re-derived tokens give the same activations as running the LM on those tokens."""
    info = inspect_run(run_dir)
    store = open_run_store(info)
    got = list(store_batches(store, lm.tokenizer, info, 10, batch=4))
    tokens, valid = _contexts(run_dir, lm, 10)
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in got]), tokens)
    np.testing.assert_array_equal(np.concatenate([b.valid for b in got]), valid)
    for i, b in enumerate(got):
        from_store, _ = encoder.scan_step(b.valid, list(range(D_SAE)), x=b.x)
        from_lm, _ = encoder.scan_step(b.valid, list(range(D_SAE)), tokens=b.tokens)
        np.testing.assert_allclose(from_store, from_lm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_pages_are_written(run_dir, tmp_path, lm, fmt):
    from jaxsae.analysis.render import _code, _md_token

    features = [3, 17, 42]
    index = analyze(Request(run_dir, tuple(features), source="eval", tokens=400, top=5, fmt=fmt, out=tmp_path,
                            progress=False))
    assert index == tmp_path / f"index.{fmt}"
    assert (tmp_path / "density.png").stat().st_size > 5_000
    text = index.read_text()
    records = {r["feature"]: r for r in json.loads((tmp_path / "features.json").read_text())["features"]}
    assert sorted(records) == features and any(r["contexts"] for r in records.values())
    for f in features:
        page, rec = (tmp_path / f"feature_{f:05d}.{fmt}").read_text(), records[f]
        assert f"Feature {f}" in page and f"feature_{f:05d}.{fmt}" in text
        assert rec["n_tokens"] == 13 * (CONTEXT - 1)  # ceil(400 / 31) contexts
        for c in rec["contexts"]:
            assert c["acts"][c["peak"]] == max(c["acts"]) == c["value"]  # the highlighted token is the max
            peak = c["pieces"][c["peak"]]
            if fmt == "md":
                assert f"**{_code(_md_token(peak))}**" in page
        if fmt == "html":
            assert page.count("class='tok peak'") == len(rec["contexts"])
        tok0 = rec["top_logits"][0][0]
        assert tok0.replace("\n", "↵").strip() in html.unescape(page)


def test_store_source_gives_the_same_pages_as_the_text(run_dir, tmp_path):
    """--source store (rows read back, tokens re-derived) finds what --source train computes afresh."""
    out = {}
    for src in ("store", "train"):
        analyze(Request(run_dir, (3, 17), source=src, tokens=300, top=4, out=tmp_path / src, progress=False))
        out[src] = json.loads((tmp_path / src / "features.json").read_text())
    assert out["store"]["tokens"] == out["train"]["tokens"]
    for a, b in zip(out["store"]["features"], out["train"]["features"]):
        assert a["fired"] == b["fired"] and len(a["contexts"]) == len(b["contexts"])
        for ca, cb in zip(a["contexts"], b["contexts"]):
            assert (ca["context"], ca["peak"], ca["pieces"]) == (cb["context"], cb["peak"], cb["pieces"])
            np.testing.assert_allclose(ca["value"], cb["value"], rtol=1e-4)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxsae.analysis", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_out_of_range_feature_exits_2_naming_d_sae(run_dir, tmp_path):
    r = _cli(run_dir, "--features", 3, D_SAE, "--out", tmp_path / "x")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"d_sae={D_SAE}" in lines[0] and f"feature {D_SAE}" in lines[0]
    assert not (tmp_path / "x").exists()


def test_bad_requests_exit_2_before_compute(run_dir, tmp_path, capsys):
    from jaxsae.analysis.__main__ import main

    assert main([str(tmp_path), "--features", "1"]) == 2  # no checkpoints/
    (tmp_path / "checkpoints").mkdir()
    assert main([str(tmp_path), "--features", "1"]) == 2  # no finished checkpoint
    assert main([str(run_dir), "--features", "1", "--source", "nope"]) == 2
    assert main([str(run_dir), "--features", "1", "--format", "pdf"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors)
    assert "no checkpoints/" in errors[0] and "no finished checkpoint" in errors[1]
    assert "--source 'nope'" in errors[2] and "--format 'pdf'" in errors[3]
