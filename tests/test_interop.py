"""SAELens and dictionary_learning export/import: file layout, parity with the libraries' own encode/decode,
round trips, and a fine-tune started from an imported SAE.

The reference encoders below are written from SAELens 6.54.12 and dictionary_learning 0.1.0 as their
classes compute them; `test_real_libraries` runs the libraries themselves when they are installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import load_file  # noqa: E402

from jaxsae import interop  # noqa: E402
from jaxsae.config import ConfigError, load_config  # noqa: E402
from jaxsae.sae import KINDS, SAEConfig, init_sae, kind_of  # noqa: E402
from jaxsae.sae.load import LoadedSAE, load_sae  # noqa: E402

ROOT = Path(__file__).parent.parent
SCALE = 7.3
D, S, K = 32, 64, 8
GROUPS = (0.25, 0.25, 0.5)  # Matryoshka groups of 16, 16 and 32 latents
# the SAELens architecture each kind is written as, and the kind it imports back as
SAELENS = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
           "matryoshka_batchtopk": "jumprelu"}
SAELENS_BACK = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def make_sae(kind: str, d_model: int = D, d_sae: int = S, scale: float = SCALE, seed: int = 0) -> LoadedSAE:
    """An SAE with non-trivial biases and thresholds (a fresh init has zeros there)."""
    extra = {"group_fractions": GROUPS} if kind == "matryoshka_batchtopk" else {}
    cfg = SAEConfig(kind=kind, d_model=d_model, d_sae=d_sae, k=K, **extra).validate()
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    p = dict(init_sae(cfg, k1))
    p["b_enc"] = 0.1 * jax.random.normal(k2, (d_sae,))
    p["b_dec"] = 0.5 * jax.random.normal(k3, (d_model,))
    if kind == "jumprelu":
        p["log_threshold"] = jnp.log(jax.random.uniform(k4, (d_sae,), minval=0.01, maxval=0.2))
    if "threshold" in p:  # the batchtopk kinds
        p["threshold"] = jnp.asarray(0.08, jnp.float32)
    return LoadedSAE(cfg, p, scale, {"hook_layer": 1, "model": "some/model"})


def inputs(n: int = 200, d: int = D, seed: int = 1) -> np.ndarray:
    return (SCALE * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# --- the references' encode/decode, as their classes compute them -------------------------------------------

def saelens_forward(path: Path, x: np.ndarray):
    cfg = json.loads((path / "cfg.json").read_text())
    w = {k: torch.from_numpy(v) for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    x = torch.from_numpy(x)
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = pre.relu()
    elif cfg["architecture"] == "topk":
        vals, idx = torch.topk(pre, k=cfg["k"], dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    else:  # jumprelu
        f = pre.relu() * (pre > w["threshold"]).to(pre.dtype)
    return f.numpy(), (f @ w["W_dec"] + w["b_dec"]).numpy()


def dl_forward(path: Path, x: np.ndarray):
    cls = json.loads((path / "config.json").read_text())["trainer"]["dict_class"]
    w = torch.load(path / "ae.pt", weights_only=True)
    x = torch.from_numpy(x)
    if cls == "AutoEncoder":
        f = (torch.nn.functional.linear(x - w["bias"], w["encoder.weight"], w["encoder.bias"])).relu()
        return f.numpy(), (torch.nn.functional.linear(f, w["decoder.weight"]) + w["bias"]).numpy()
    if cls == "JumpReluAutoEncoder":
        p = x @ w["W_enc"] + w["b_enc"]
        f = (p * (p > w["threshold"])).relu()
        return f.numpy(), (f @ w["W_dec"] + w["b_dec"]).numpy()
    if cls == "MatryoshkaBatchTopKSAE":  # at inference (use_threshold=True), every group active
        r = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
        f = r * (r > w["threshold"])
        return f.numpy(), (f @ w["W_dec"] + w["b_dec"]).numpy()
    r = torch.nn.functional.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]).relu()
    if cls == "AutoEncoderTopK":
        top = r.topk(int(w["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(r).scatter_(-1, top.indices, top.values)
    else:  # BatchTopKSAE at inference (use_threshold=True)
        f = r * (r > w["threshold"])
    return f.numpy(), (torch.nn.functional.linear(f, w["decoder.weight"]) + w["b_dec"]).numpy()


def assert_same(f_ref, xh_ref, sae: LoadedSAE, x, latents: bool = True):
    f = np.asarray(sae.encode(x))
    np.testing.assert_array_equal(f_ref > 0, f > 0)  # same active set
    if latents:
        np.testing.assert_allclose(f_ref, f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xh_ref, np.asarray(sae.decode(f)), rtol=1e-4, atol=1e-3 * SCALE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for kind in KINDS:
        sae = make_sae(kind)
        out[kind] = (sae, interop.export(sae, root / f"{kind}-saelens", "saelens"),
                     interop.export(sae, root / f"{kind}-dl", "dictionary_learning"))
    return out


# --- files --------------------------------------------------------------------------------------------------

def test_saelens_files(exported):
    for kind, (sae, sl, _) in exported.items():
        cfg = json.loads((sl / "cfg.json").read_text())
        arch = SAELENS[kind]
        assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"]) == (D, S)
        assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
        assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
        assert cfg["metadata"]["sae_lens_version"].startswith("6.")
        assert (cfg.get("k"), cfg.get("rescale_acts_by_decoder_norm")) == ((K, False) if kind == "topk" else (None, None))
        w = load_file(str(sl / "sae_weights.safetensors"))
        want = {"W_enc": (D, S), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,)}
        if arch == "jumprelu":
            want["threshold"] = (S,)
        assert {k: v.shape for k, v in w.items()} == want
        assert all(v.dtype == np.float32 for v in w.values())


def test_dictionary_learning_files(exported):
    want = {
        "relu": {"bias": (D,), "encoder.weight": (S, D), "encoder.bias": (S,), "decoder.weight": (D, S)},
        "topk": {"b_dec": (D,), "k": (), "threshold": (), "decoder.weight": (D, S), "encoder.weight": (S, D),
                 "encoder.bias": (S,)},
        "jumprelu": {"W_enc": (D, S), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,), "threshold": (S,)},
        "matryoshka_batchtopk": {"W_enc": (D, S), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,), "k": (),
                                 "threshold": (), "group_sizes": (3,)},
    }
    want["batchtopk"] = want["topk"]
    dtypes = {"k": torch.int32, "group_sizes": torch.int64}
    for kind, (sae, _, dl) in exported.items():
        sd = torch.load(dl / "ae.pt", weights_only=True)
        assert list(sd) == list(want[kind]), kind  # the order their state_dict() has
        assert {k: tuple(v.shape) for k, v in sd.items()} == want[kind]
        assert all(v.dtype == dtypes.get(k, torch.float32) for k, v in sd.items())
        tr = json.loads((dl / "config.json").read_text())["trainer"]
        cls = interop.dictionary_learning.DICT_CLASS[kind]
        assert tr["dict_class"] == cls
        assert (tr["activation_dim"], tr["dict_size"], tr["layer"], tr["lm_name"]) == (D, S, 1, "some/model")
        assert list(tr) == list(interop.dictionary_learning.CLASSES[cls].trainer_keys)
        if kind == "matryoshka_batchtopk":
            assert sd["group_sizes"].tolist() == tr["group_sizes"] == [16, 16, 32]
            assert (tr["group_fractions"], tr["group_weights"], tr["k"]) == (list(GROUPS), [1 / 3] * 3, K)
        if kind in ("batchtopk", "matryoshka_batchtopk"):
            assert (tr["threshold_beta"], tr["threshold_start_step"]) == (0.999, 1000)
            assert float(sd["threshold"]) == pytest.approx(0.08)


# --- parity -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_exports_compute_what_jaxsae_computes(exported, kind):
    sae, sl, dl = exported[kind]
    x = inputs()
    assert_same(*saelens_forward(sl, x), sae, x)
    assert_same(*dl_forward(dl, x), sae, x)
    assert 0 < (np.asarray(sae.encode(x)) > 0).sum(-1).mean() < S  # neither all off nor all on


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(exported, kind, tmp_path):
    sae, sl, dl = exported[kind]
    x = inputs(seed=2)
    f, xh = np.asarray(sae.encode(x)), np.asarray(sae.decode(sae.encode(x)))
    for path in (sl, dl):
        back = interop.load(path)
        assert back.scale == 1.0 and back.meta["hook_layer"] == 1 and back.meta["model"] == "some/model"
        # dictionary_learning has every kind's class; SAELens gives the jumprelu that batchtopk kinds infer as
        assert back.cfg.kind == (kind if path == dl else SAELENS_BACK[SAELENS[kind]])
        if path == dl:
            arch = ("k",) * kind_of(kind).uses_k + ("group_fractions", "group_weights")
            assert [getattr(back.cfg, a) for a in arch] == [getattr(sae.cfg, a) for a in arch]
        assert_same(f, xh, back, x)
        saved = load_sae(interop.save_jaxsae(back, tmp_path / path.name))
        assert_same(f, xh, saved, x)
        # re-expressed for another store scale (what finetune.init_from does): the same active latents and
        # reconstruction; latent values scale by one positive factor (the decoder keeps its row norms)
        moved = LoadedSAE(back.cfg, interop.to_scale(back, 3.1), 3.1, back.meta)
        assert_same(f, xh, moved, x, latents=False)
        if back.cfg.unit_norm_decoder:
            np.testing.assert_allclose(np.linalg.norm(moved.params["W_dec"], axis=-1), 1.0, rtol=1e-5)


def test_dictionary_learning_thresholds_and_detection(tmp_path):
    # an uncalibrated BatchTopK threshold stays -1 both ways, which dictionary_learning's trainer reads as such
    sae = make_sae("batchtopk", scale=1.0)
    sae.params["threshold"] = jnp.asarray(-1.0, jnp.float32)
    dl = interop.export(sae, tmp_path / "uncalibrated", "dictionary_learning")
    assert float(torch.load(dl / "ae.pt", weights_only=True)["threshold"]) == -1.0
    assert float(interop.load(dl).params["threshold"]) == -1.0
    # without config.json the keys tell a Matryoshka SAE (whose keys include JumpReLU's) ...
    m = interop.export(make_sae("matryoshka_batchtopk"), tmp_path / "m", "dictionary_learning")
    (m / "config.json").unlink()
    back = interop.load(m)
    assert (back.cfg.kind, back.cfg.k, back.cfg.group_fractions) == ("matryoshka_batchtopk", K, GROUPS)
    # ... but not BatchTopK from TopK, which share their keys
    (dl / "config.json").unlink()
    with pytest.raises(ValueError, match="cannot tell AutoEncoderTopK from BatchTopKSAE apart without config.json"):
        interop.load(dl)


def test_init_from_takes_the_files_architecture(exported):
    """A fine-tune from a saved Matryoshka SAE keeps its kind, k and groups; the run decides the rest."""
    _, _, dl = exported["matryoshka_batchtopk"]
    run = SAEConfig(kind="topk", d_model=D, d_sae=4096, k=32, auxk_coeff=0.5, threshold_start_step=7)
    cfg = interop.load_init(dl, None, run, layer=1).cfg
    assert (cfg.kind, cfg.d_sae, cfg.k, cfg.group_fractions) == ("matryoshka_batchtopk", S, K, GROUPS)
    assert (cfg.auxk_coeff, cfg.threshold_start_step) == (0.5, 7)


def test_saelens_variants_fold_exactly(tmp_path):
    """rescale_acts_by_decoder_norm and apply_b_dec_to_input=False files import as the same function."""
    sae = make_sae("topk", scale=1.0)
    sl = interop.export(sae, tmp_path / "v", "saelens")
    cfg = json.loads((sl / "cfg.json").read_text())
    w = load_file(str(sl / "sae_weights.safetensors"))
    n = np.linalg.norm(w["W_dec"], axis=-1) * np.linspace(0.5, 2.0, S).astype(np.float32)
    w["W_dec"] = w["W_dec"] * (n / np.linalg.norm(w["W_dec"], axis=-1))[:, None]
    w["W_enc"], w["b_enc"] = w["W_enc"] / n, w["b_enc"] / n  # SAELens then multiplies pre by n
    w["b_enc"] = w["b_enc"] - w["b_dec"] @ w["W_enc"]
    cfg.update(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    from safetensors.numpy import save_file

    save_file(w, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps(cfg))
    x = inputs(seed=3)
    assert_same(np.asarray(sae.encode(x)), np.asarray(sae.decode(sae.encode(x))), interop.load(sl), x)


def test_bad_files_fail_clearly(exported, tmp_path):
    _, sl, _ = exported["topk"]
    bad = tmp_path / "gated"
    bad.mkdir()
    (bad / "sae_weights.safetensors").write_bytes((sl / "sae_weights.safetensors").read_bytes())
    cfg = json.loads((sl / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture='gated'"):
        interop.load(bad)
    with pytest.raises(FileNotFoundError, match="SAELens"):
        interop.load(tmp_path / "nothing-here", "saelens")


# --- in a model: evaluate, and fine-tune from an imported SAE -----------------------------------------------

@pytest.fixture(scope="module")
def shipped_exports(tmp_path_factory):
    from jaxsae.models.shipped import SHIPPED

    d = json.loads((SHIPPED / "config.json").read_text())["hidden_size"]
    root = tmp_path_factory.mktemp("shipped")
    sae = make_sae("topk", d_model=d, d_sae=64, scale=1.0)
    sae.meta.update(model=str(SHIPPED))
    return SHIPPED, interop.export(sae, root / "sl", "saelens"), interop.export(sae, root / "dl", "dictionary_learning")


def test_imported_sae_evaluates(shipped_exports, tmp_path, capsys):
    from jaxsae.eval.__main__ import main as eval_main

    model, sl, _ = shipped_exports
    out = interop.save_jaxsae(interop.load(sl, model=str(model)), tmp_path / "imported")
    rc = eval_main([str(out), "--set", "data.context=32", "--set", "eval.sequences=4", "--set",
                    "eval.batch_sequences=4"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["phase"] == "imported" and abs(m["l0"] - K) < 1e-6 and m["ce_spliced"] > m["ce_clean"]


def _ft_args(model, run_dir, init, *extra):
    return [sys.executable, "-m", "jaxsae.train", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--run-dir", str(run_dir), "--set", f"model.path={model}", "--set", "hook.layer=1",
            "--set", "phases=[finetune]", "--set", f"finetune.init_from={init}",
            "--set", "data.context=32", "--set", "store.tokens=2048", "--set", "store.batch_contexts=16",
            "--set", "store.norm_sample_tokens=2048", "--set", "mse.tokens=2048", "--set", "mse.batch_size=256",
            "--set", "mse.warmup_steps=1", "--set", "finetune.tokens=512", "--set", "finetune.batch_sequences=4",
            "--set", "eval.sequences=4", "--set", "eval.batch_sequences=4", *extra]


def test_finetune_from_imported_sae(shipped_exports, tmp_path):
    model, _, dl = shipped_exports
    run_dir = tmp_path / "ft"
    r = subprocess.run(_ft_args(model, run_dir, dl), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert list(ev) == ["init", "finetune"]
    start = interop.load(dl)
    tuned = load_sae(run_dir)
    assert tuned.meta["phase"] == "finetune" and tuned.cfg.kind == "topk" and tuned.cfg.d_sae == 64
    x = inputs(d=start.cfg.d_model, seed=4)
    assert np.abs(np.asarray(tuned.decode(tuned.encode(x))) - np.asarray(start.decode(start.encode(x)))).max() > 1e-4
    # before any step, the init's eval is the imported SAE's own (same L0 as its k)
    assert abs(ev["init"]["l0"] - K) < 1e-6


def test_init_from_errors_before_compute(shipped_exports, tmp_path):
    model, sl, _ = shipped_exports
    with pytest.raises(ConfigError, match="continues the SAE of mse or finetune.init_from; list it before finetune"):
        load_config(None, ["phases=[finetune]"])
    with pytest.raises(ConfigError, match="replaces the mse phase"):
        load_config(None, [f"finetune.init_from={sl}"])
    from jaxsae.train.context import plan as prepare

    small = interop.export(make_sae("relu"), tmp_path / "small", "saelens")  # d_in 32, model d_model 128
    for path, match in ((small, "d_in=32"), (sl, "set hook.layer=1")):
        cfg = load_config(None, [f"model.path={model}", "phases=[finetune]", f"finetune.init_from={path}",
                                 "hook.layer=2" if path == sl else "hook.layer=1"])
        with pytest.raises(ConfigError, match=match):
            prepare(cfg, tmp_path / "never")
        assert not (tmp_path / "never").exists()


# --- the libraries themselves, where installed --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_real_libraries(exported, kind):
    sae, sl, dl = exported[kind]
    x = inputs(seed=5)
    xt = torch.from_numpy(x)
    try:
        from sae_lens import SAE
    except ImportError:
        SAE = None
    if SAE is not None:
        ref = SAE.load_from_disk(str(sl))
        with torch.no_grad():
            f = ref.encode(xt)
            assert_same(f.numpy(), ref.decode(f).numpy(), sae, x)
    try:
        from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
        from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
        from dictionary_learning.trainers.top_k import AutoEncoderTopK
    except ImportError:
        AutoEncoder = None
    try:
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    except ImportError:  # not in every release
        MatryoshkaBatchTopKSAE = None
    if AutoEncoder is not None and (kind != "matryoshka_batchtopk" or MatryoshkaBatchTopKSAE is not None):
        cls = {"relu": AutoEncoder, "topk": AutoEncoderTopK, "batchtopk": BatchTopKSAE,
               "jumprelu": JumpReluAutoEncoder, "matryoshka_batchtopk": MatryoshkaBatchTopKSAE}[kind]
        kw = {"normalize_decoder": False} if kind == "relu" else {}
        ref = cls.from_pretrained(str(dl / "ae.pt"), **kw)
        with torch.no_grad():
            f = ref.encode(xt)
            assert_same(f.numpy(), ref.decode(f).numpy(), sae, x)
    if SAE is None and AutoEncoder is None:
        pytest.skip("neither sae_lens nor dictionary_learning is installed")
