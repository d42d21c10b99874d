"""`python -m jaxsae.aot`: the steps compile ahead of time from abstract inputs for the run's mesh."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from jaxsae.aot import AOTError, compile_steps, topology_name
from jaxsae.aot.__main__ import main
from jaxsae.config import load_config

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.multidevice


def _cfg(*extra):
    return load_config(ROOT / "configs" / "demo.yaml", ["sae.d_sae=256", "data.context=32", *extra])


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_compiles_both_steps_on_the_local_mesh_and_the_sae_share_drops_with_the_model_axis():
    by_model = {}
    for model in (1, 4):
        steps, mesh = compile_steps(_cfg(f"mesh.model={model}"), jax.devices())
        # every listed phase's own step: demo.yaml runs mse, the MSE-only control and the fine-tune
        assert [s.name for s in steps] == ["mse step", "control step (fused KL+MSE)", "finetune step (fused KL+MSE)"]
        assert dict(mesh.shape) == {"data": 8 // model, "model": model}
        assert all(s.flops and s.flops > 0 and s.argument_bytes > 0 for s in steps)
        by_model[model] = steps[0]
    # the MSE step's arguments are the SAE state and this device's rows of the batch (f32[1024, 128]
    # over data = 8 / model): take the batch out, and the state's share shrinks by the model axis
    state = {m: s.argument_bytes - 1024 * 128 * 4 // (8 // m) for m, s in by_model.items()}
    assert state[4] == pytest.approx(state[1] / 4, rel=0.05)


def test_cli_reports_and_fails_when_a_step_does_not_fit(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "mesh.model=2"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=4 model=2" in out and "finetune step" in out and "GFLOP" in out
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--hbm-gib", "0.000001"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_bad_mesh_or_topology_fails_before_compiling(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "mesh.model=3"]) == 2
    assert "mesh.model=3 does not divide the 8 devices" in capsys.readouterr().err
    assert topology_name("v5e-8") == "v5e:2x4" and topology_name("v5litepod-16") == "v5e:4x4"
    assert topology_name("v4-32") == "v4:2x2x4" and topology_name("v6e:4x4") == "v6e:4x4"
    with pytest.raises(AOTError, match="unknown TPU topology 'v9-8'"):
        topology_name("v9-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'jax[tpu]')")
def test_compiles_for_a_tpu_topology_without_a_tpu(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--topology", "v5e-8"]) == 0
    out = capsys.readouterr().out
    assert "8 x TPU v5 lite on 1 host(s)" in out and "fits in 16 GiB" in out


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
