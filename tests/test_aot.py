"""`python -m jaxsae.aot`: the steps compile ahead of time from abstract inputs for the run's mesh."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from jaxsae.aot import AOTError, compile_steps, model_config, topology_name
from jaxsae.aot.__main__ import main
from jaxsae.aot.budget import PEAK_TFLOPS, project
from jaxsae.config import load_config

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.multidevice


def _cfg(*extra):
    return load_config(ROOT / "configs" / "demo.yaml", ["sae.d_sae=256", "data.context=32", *extra])


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def compiled():
    """mesh.model -> (steps, mesh) of _cfg's steps on the 8 local devices, compiled once for the module."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return {model: compile_steps(_cfg(f"mesh.model={model}"), jax.devices()) for model in (1, 4)}


def test_compiles_both_steps_on_the_local_mesh_and_the_sae_share_drops_with_the_model_axis(compiled):
    by_model = {}
    for model in (1, 4):
        steps, mesh = compiled[model]
        # every listed phase's own step: demo.yaml runs mse, the MSE-only control and the fine-tune
        assert [s.name for s in steps] == ["mse step", "control step (fused KL+MSE)", "finetune step (fused KL+MSE)"]
        assert dict(mesh.shape) == {"data": 8 // model, "model": model}
        assert all(s.flops and s.flops > 0 and s.argument_bytes > 0 for s in steps)
        by_model[model] = steps[0]
    # the MSE step's arguments are the SAE state and this device's rows of the batch (f32[1024, 128]
    # over data = 8 / model): take the batch out, and the state's share shrinks by the model axis
    state = {m: s.argument_bytes - 1024 * 128 * 4 // (8 // m) for m, s in by_model.items()}
    assert state[4] == pytest.approx(state[1] / 4, rel=0.05)


def test_projection_of_the_whole_budget_is_the_stated_arithmetic(compiled):
    """hours = steps x compiled FLOPs per device per step / (peak x MFU) / 3600; the store's bytes exact."""
    cfg = _cfg()
    (steps, mesh), mcfg = compiled[1], model_config(cfg)
    rows = {r.name: r for r in project(cfg, mcfg, steps, mesh, 197.0, 0.4)}
    assert list(rows) == ["collect (LM to block 2)", "mse", "control", "finetune", "total", "disk store",
                          "stream buffer"]
    flops = {s.phase: s.flops for s in steps}
    # demo.yaml: 4.5M MSE tokens in batches of 1024 rows; 500k fine-tune tokens in 16 x 32-token batches
    for phase, n in (("mse", 4_500_000 // 1024), ("control", 500_000 // 512), ("finetune", 500_000 // 512)):
        r = rows[phase]
        assert r.steps == n and r.step_flops == flops[phase]
        assert r.hours == pytest.approx(n * flops[phase] / (197e12 * 0.4) / 3600, rel=1e-12)
    # the collection: Kaplan's 2N + 2·L·ctx·d_attn over blocks 0..2 of the shipped GPT-NeoX (d 128, MLP 512;
    # per block: QKV and output projections with biases, the MLP with biases, two LayerNorms), every
    # position stored (4.5M tokens = 140,625 contexts of 32), the batch split over data = 8
    block = (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128) + 2 * 2 * 128
    per_token = 2 * 3 * block + 2 * 3 * 32 * 128
    assert rows["collect (LM to block 2)"].flops == pytest.approx(4_500_000 * per_token / 8, rel=1e-12)
    assert rows["total"].hours == pytest.approx(sum(r.hours for n, r in rows.items() if n not in
                                                    ("total", "disk store", "stream buffer")), rel=1e-12)
    assert rows["disk store"].bytes == 4_500_000 * 128 * 4  # float32 rows of d_model 128
    # stream mode's buffer: a window of store.buffer_rows and a carried half, split over data: 8 on (8, 1),
    # 2 on (2, 4)
    assert rows["stream buffer"].bytes == 655_360 * 3 // 2 // 8 * 128 * 4
    steps4, mesh4 = compiled[4]
    r4 = {r.name: r for r in project(_cfg("mesh.model=4"), mcfg, steps4, mesh4, None, 0.4, stream_rows=1001)}
    assert r4["stream buffer"].bytes == 751 * 128 * 4  # ceil(1.5 x 1001 / 2) rows per device
    # in stream mode no disk store; the LM runs over every block the MSE phase's rows come from: 4.5M rows
    # in blocks of 20,480 contexts (655,360 rows), windows of half a block first -> 8 blocks
    st = {r.name: r for r in project(_cfg("store.mode=stream"), mcfg, steps, mesh, None, 0.4)}
    assert "disk store" not in st
    assert st["stream (LM to block 2)"].flops == pytest.approx(8 * 20_480 * 32 * per_token / 8, rel=1e-12)
    assert all(r.hours is None for r in r4.values()) and r4["mse"].flops == r4["mse"].steps * steps4[0].flops
    # mesh (2, 4): a replicated LM repeats the collection's forward along model, a tensor-sharded one splits it
    collect = rows["collect (LM to block 2)"].flops * 8
    assert r4["collect (LM to block 2)"].flops == pytest.approx(collect / 2, rel=1e-12)
    tensor = project(_cfg("mesh.model=4", "model.lm_sharding=tensor"), mcfg, steps4, mesh4, None, 0.4)
    assert tensor[0].flops == pytest.approx(collect / 8, rel=1e-12)
    assert PEAK_TFLOPS == {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


def test_cli_reports_and_fails_when_a_step_does_not_fit(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "mesh.model=2"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=4 model=2" in out and "finetune step" in out and "GFLOP" in out
    assert "LM replicated in float32, store float32" in out  # auto on the CPU
    assert "FLOPs only (give --peak-tflops for hours)" in out and "disk store" in out  # local: no peak known
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--hbm-gib", "0.000001", "--peak-tflops", "100",
                 "--mfu", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "at 100 TFLOP/s per chip x MFU 0.5" in out
    assert any(ln.split()[:1] == ["finetune"] and "steps x" in ln and "~" in ln for ln in out.splitlines())


def test_bad_mesh_or_topology_fails_before_compiling(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "mesh.model=3"]) == 2
    assert "mesh.model=3 does not divide the 8 devices" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--mfu", "0"]) == 2
    assert "--mfu 0 must be in (0, 1]" in capsys.readouterr().err
    assert topology_name("v5e-8") == "v5e:2x4" and topology_name("v5litepod-16") == "v5e:4x4"
    assert topology_name("v4-32") == "v4:2x2x4" and topology_name("v6e:4x4") == "v6e:4x4"
    with pytest.raises(AOTError, match="unknown TPU topology 'v9-8'"):
        topology_name("v9-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'jax[tpu]')")
def test_compiles_for_a_tpu_topology_without_a_tpu(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--topology", "v5e-8"]) == 0
    out = capsys.readouterr().out
    assert "8 x TPU v5 lite on 1 host(s)" in out and "fits in 16 GiB" in out
    assert "LM replicated in bfloat16, store bfloat16" in out  # auto resolved for the TPU, not this host


def test_compiles_a_sweeps_stacked_steps_with_the_sae_axis_over_model():
    """configs/demo-sweep.yaml's 4 SAEs on mesh (2, 4): the sweep's steps compile from abstract inputs, and
    with the SAE axis over `model` each device's share of the state is one SAE's."""
    cfg = load_config(ROOT / "configs" / "demo-sweep.yaml", ["sae.d_sae=256", "data.context=32", "mesh.model=4",
                                                             "phases=[mse, finetune]"])
    steps, _ = compile_steps(cfg, jax.devices())
    single, _ = compile_steps(_cfg("mesh.model=4", "sae.k=64", "phases=[mse]"), jax.devices())
    assert [s.name for s in steps] == ["mse step", "finetune step (fused KL+MSE)"] and steps[1].flops > 0
    # MSE step arguments: the state plus this device's batch rows (f32[1024, 128] over data = 2)
    batch = {"sweep": 1024 * 128 * 4 // 2, "single": 1024 * 128 * 4 // 2}
    # one SAE's whole state per device (sweep) vs a quarter of one SAE's (single, d_sae over model=4)
    assert steps[0].argument_bytes - batch["sweep"] == pytest.approx(4 * (single[0].argument_bytes - batch["single"]),
                                                                     rel=0.05)


def test_a_sweep_over_widths_compiles_one_program_per_width(capsys):
    """sae.d_sae in the sweep: each width's members compile as their own stacked program."""
    sweep = "sweep={members: [{sae.k: 8}, {sae.k: 16}, {sae.d_sae: 512, sae.k: 16}]}"
    assert main(["--config", str(ROOT / "configs" / "demo-sweep.yaml"), "--set", "sae.d_sae=256",
                 "--set", "data.context=32", "--set", "phases=[mse]", "--set", sweep]) == 0
    out = capsys.readouterr().out
    assert "width group d_sae 256 (2 SAEs" in out and "width group d_sae 512 (1 SAE," in out
    assert out.count("  mse step ") == 2


def test_a_hub_model_fetches_its_config_json_alone(tmp_path, monkeypatch):
    """The ahead-of-time check reads only config.json: a hub id does not download the weights."""
    import shutil

    import huggingface_hub

    from jaxsae.models.shipped import SHIPPED

    asked = []

    def fake_download(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, allow_patterns))
        shutil.copy(Path(SHIPPED) / "config.json", tmp_path / "config.json")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    mcfg = model_config(_cfg("model.path=org/some-model"))
    assert asked == [("org/some-model", ["config.json"])] and mcfg.d_model == 128
