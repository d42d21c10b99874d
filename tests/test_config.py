"""Config loading: every shipped config parses; bad keys, types and values fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxsae.config import ConfigError, RunConfig, load_config
from jaxsae.validate import check_against_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == path.stem or cfg.name


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.mse.lr, cfg.mse.b1, cfg.mse.b2, cfg.mse.batch_size) == (3e-4, 0.9, 0.999, 2048)
    assert cfg.mse.decay_fraction == 0.2 and cfg.mse.warmup_steps == 1000
    assert cfg.sae.auxk_coeff == 1 / 32


def test_overrides_and_yaml_scientific_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mse:\n  lr: 1e-3\nsae:\n  k: 8\n")  # PyYAML reads 1e-3 as a string
    cfg = load_config(p, ["sae.d_sae=512", "hook.layer=2", "data.source={kind: files, paths: [a.txt]}"])
    assert cfg.mse.lr == 1e-3 and cfg.sae.k == 8 and cfg.sae.d_sae == 512 and cfg.hook.layer == 2
    assert cfg.data.source == {"kind": "files", "paths": ["a.txt"]}


@pytest.mark.parametrize("overrides,match", [
    (["sae.kk=3"], r"unknown config key sae\.kk: valid keys here are .*k,"),
    (["bogus=1"], r"unknown config key bogus"),
    (["sae.k=many"], r"sae\.k='many' must be an integer"),
    (["data.prepend_bos=3"], r"data\.prepend_bos=3 must be true or false"),
    (["sae.k=5000"], r"sae\.k=5000 exceeds sae\.d_sae=4096: choose k <= d_sae"),
    (["sae.kind=topq"], r"sae\.kind='topq' is unknown"),
    (["phases=[finetune, mse]"], r"out of order; phases run as mse, control, finetune"),
    (["phases=[mse, mse]"], r"phases lists mse twice"),
    (["phases=[mse, control, finetune]", "checkpoint.keep=0"], r"checkpoint\.keep=0 must be positive"),
    (["adapter.kind=prefix"], r"adapter\.kind='prefix': choose one of 'lm_lora'"),
    (["mse.batch_size=0"], r"mse\.batch_size=0 must be positive"),
    (["model.dtype=int8"], r"model\.dtype='int8': choose one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (["store.dtype=float16"], r"store\.dtype='float16': choose one of 'auto', 'float32', 'bfloat16'"),
    (["sae=3"], r"sae must be a mapping"),
    (["mse.lr"], r"must look like key\.path=value"),
    (["tracker.kind=mlflow"], r"tracker\.kind='mlflow': choose one of 'none', 'tensorboard', 'wandb'"),
    (["tracker.logdir=x"], r"unknown config key tracker\.logdir: valid keys here are dir, kind, name, project"),
    (["tracker.kind=wandb", "tracker.project="], r"tracker\.project must not be empty"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_set_inside_a_mapping_updates_that_key_only():
    cfg = load_config(None, ["data.source.split=val"])
    assert cfg.data.source == {"kind": "stdlib", "split": "val"}


def test_every_phase_has_its_own_optimiser():
    cfg = RunConfig()
    assert (cfg.mse.schedule, cfg.mse.weight_decay, cfg.mse.clip) == ("warmup_decay", 0.0, 1.0)
    assert (cfg.finetune.schedule, cfg.finetune.weight_decay, cfg.finetune.clip) == ("linear", 0.01, 1.0)
    assert cfg.e2e.schedule == "constant" and cfg.adapter.schedule_name() == "constant"  # the default adapter is an output adapter
    e2e_only = load_config(None, ["phases=[mse, finetune, e2e]", "finetune.weight_decay=0.1"])
    assert e2e_only.e2e.weight_decay == 0.01  # no borrowing


def test_layer_checked_against_model():
    cfg = load_config(None, ["hook.layer=6"])
    with pytest.raises(ConfigError, match=r"hook\.layer=6 is out of range for a 6-layer model: choose 0\.\.5"):
        check_against_model(cfg, n_layers=6, d_model=64)
    check_against_model(load_config(None, ["hook.layer=5"]), n_layers=6, d_model=64)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_sizes_its_run(path):
    load_config(path, require_size=True)


def test_a_config_file_must_size_its_run(tmp_path):
    """An empty file would otherwise start the defaults' 500M-token run; the trainer's CLI asks a config
    file to set store.tokens and each listed phase's tokens (e2e's 0 means mse + finetune tokens)."""
    p = tmp_path / "c.yaml"
    p.write_text("")
    with pytest.raises(ConfigError, match=r"does not set store\.tokens, mse\.tokens, finetune\.tokens: .*--set "
                                          r"store\.tokens=N"):
        load_config(p, require_size=True)
    p.write_text("phases: [e2e]\nstore:\n  tokens: 100000\n")
    with pytest.raises(ConfigError, match=r"does not set mse\.tokens, finetune\.tokens"):
        load_config(p, require_size=True)
    assert load_config(p, ["e2e.tokens=4096"], require_size=True).e2e.tokens == 4096
    assert load_config(p).store.tokens == 100000  # the library's load_config does not ask


@pytest.mark.parametrize("text,match", [
    ("- mse\n- finetune\n", "holds a YAML list, not a mapping"),
    ("3\n", "holds a YAML int, not a mapping"),
    (b"name: d\xe9mo\n", "is not UTF-8 text"),
])
def test_a_config_file_that_is_not_a_utf8_mapping(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_auto_dtype_is_bfloat16_on_accelerators_float32_on_the_cpu():
    from jaxsae.config import resolve_dtype, resolve_dtypes

    assert [resolve_dtype("auto", p) for p in ("cpu", "gpu", "tpu", "cuda")] == \
        ["float32", "bfloat16", "bfloat16", "bfloat16"]
    assert [resolve_dtype(v, "tpu") for v in ("float32", "float16")] == ["float32", "float16"]
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    cfg = load_config(None)
    assert (cfg.model.dtype, cfg.store.dtype) == ("auto", "auto")  # the default
    on = lambda c, platform, meta=None: (lambda r: (r.model.dtype, r.store.dtype))(resolve_dtypes(c, platform, meta))  # noqa: E731
    assert on(cfg, "cpu") == ("float32", "float32") and on(cfg, "tpu") == ("bfloat16", "bfloat16")
    # an existing store decides auto: its own dtype, and the LM's it was collected with
    f32_store = {"dtype": "float32", "model": {"d_model": 128, "config": {"dtype": "float32"}}, "layer": 1}
    assert on(cfg, "gpu", f32_store) == ("float32", "float32")
    explicit = load_config(None, ["model.dtype=bfloat16", "store.dtype=bfloat16"])
    assert on(explicit, "cpu", f32_store) == ("bfloat16", "bfloat16")  # kept; the plan refuses the store


def test_plan_resolves_auto_once_and_refuses_a_store_of_another_dtype(tmp_path):
    """The plan's config and the trajectory its checkpoints record hold the concrete dtype, so a resume where
    auto resolves the same way matches; a store whose dtypes differ from explicit ones stops the plan."""
    import json

    from jaxsae.train.context import plan, trajectory

    p = plan(load_config(None, ["hook.layer=1"]), tmp_path / "run")
    assert (p.cfg.model.dtype, p.cfg.store.dtype, p.mcfg.dtype) == ("float32",) * 3  # the CPU
    assert trajectory(p, "mse", None)["model"]["dtype"] == "float32"
    store = tmp_path / "store"
    store.mkdir()
    meta = {"format_version": 1, "dtype": "bfloat16", "model": {"d_model": 128, "config": {"dtype": "bfloat16"}},
            "layer": 1, "chunk_rows": 1, "shard_rows": 1, "tokens_target": 1, "tokens_written": 0, "scale": None,
            "complete": False}
    (store / "meta.json").write_text(json.dumps(meta))
    p = plan(load_config(None, ["hook.layer=1", f"store.path={store}"]), tmp_path / "run2")
    assert (p.cfg.model.dtype, p.cfg.store.dtype) == ("bfloat16", "bfloat16")  # the store's, not the CPU's
    with pytest.raises(ConfigError, match=r"holds bfloat16 activations, not store\.dtype=float32: set "
                                          r"store\.dtype=bfloat16 \(or auto\)"):
        plan(load_config(None, ["hook.layer=1", f"store.path={store}", "store.dtype=float32"]), tmp_path / "run3")
    with pytest.raises(ConfigError, match=r"collected with the LM in bfloat16, not model\.dtype=float32"):
        plan(load_config(None, ["hook.layer=1", f"store.path={store}", "model.dtype=float32"]), tmp_path / "run4")
