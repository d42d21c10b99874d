"""The trainer on device meshes: a whole run on a mesh, and checkpoints that move between meshes
(8 devices -> 1 -> 4x2). Needs XLA_FLAGS=--xla_force_host_platform_device_count=8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsae
from jaxsae import sharding as shd
from jaxsae.checkpoint import Checkpointer
from jaxsae.config import ConfigError, load_config
from jaxsae.validate import check_mesh

pytestmark = pytest.mark.multidevice
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _cfg(*extra: str):
    from jaxsae.models.shipped import SHIPPED

    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.path={SHIPPED}", "hook.layer=1", "data.context=32", "store.tokens=20000",
        "store.batch_contexts=16", "store.norm_sample_tokens=4096", "sae.d_sae=128", "sae.k=8",
        "mse.tokens=25600", "mse.batch_size=256", "mse.warmup_steps=5", "finetune.tokens=3072",
        "finetune.batch_sequences=8", "checkpoint.every_steps=10", "checkpoint.keep=20", "eval.sequences=8",
        "eval.batch_sequences=8", *extra])


def _train(run_dir: Path, *extra: str) -> dict:
    from jaxsae.train.pipeline import run

    return run(_cfg(*extra), run_dir)


@pytest.fixture(scope="module")
def run_8x1(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mesh") / "8x1"
    _train(run_dir, "mesh.data=8", "mesh.model=1")
    return run_dir


def _keep_until(src: Path, dst: Path, mse_step: int) -> Path:
    """A copy of run `src` as if killed after MSE checkpoint `mse_step` (the store is kept)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints" / "mse").iterdir():
        if d.name.isdigit() and int(d.name) > mse_step:
            shutil.rmtree(d)
    shutil.rmtree(dst / "checkpoints" / "finetune")
    (dst / "eval.json").unlink()
    return dst


@pytest.mark.parametrize("mesh", [(1, 1), (4, 2)], ids=["1", "4x2"])
def test_run_killed_on_8_devices_resumes_on_another_mesh(run_8x1, tmp_path, mesh):
    resumed = _keep_until(run_8x1, tmp_path / "resumed", mse_step=90)
    _train(resumed, f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}")
    a, b = jaxsae.load_sae(run_8x1), jaxsae.load_sae(resumed)
    assert a.meta["phase"] == b.meta["phase"] == "finetune"
    for k in a.params:  # 10 MSE steps + the fine-tune on another mesh: float32 reduction-order noise only
        np.testing.assert_allclose(np.asarray(b.params[k]), np.asarray(a.params[k]), rtol=2e-3, atol=2e-4,
                                   err_msg=k)
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (run_8x1, resumed))
    assert abs(ea["finetune"]["ce_spliced"] - eb["finetune"]["ce_spliced"]) < 1e-3
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["phase"] == "mse"]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # rewound to step 90, then continued once


def test_checkpoint_restores_onto_any_mesh(tmp_path):
    from jaxsae.sae import SAEConfig, init_sae
    from jaxsae.train.mse import init_state
    from jaxsae.config import FinetuneCfg
    from jaxsae.train.optim import optimizer

    cfg = SAEConfig(kind="topk", d_model=16, d_sae=64, k=4).validate()
    tx, _ = optimizer(FinetuneCfg(lr=1e-3), 10, cfg)
    state = init_state(init_sae(cfg, jax.random.PRNGKey(0)), tx, cfg, seed=0)
    state["dead"] = state["dead"] + np.arange(64, dtype=np.int32)
    host = jax.device_get(state)
    m8 = shd.make_mesh(8, 1)
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, shd.shard(state, shd.sae_state_shardings(state, cfg, m8)), {"phase": "mse"})
    ckpt.wait()
    abstract = jax.eval_shape(lambda: state)
    for data, model in [(1, 1), (4, 2), (1, 8)]:
        mesh = shd.make_mesh(data, model, jax.devices()[:data * model])
        want = shd.sae_state_shardings(abstract, cfg, mesh)
        got, meta = ckpt.restore(shd.abstract_with(abstract, want), 1)
        assert meta == {"phase": "mse"}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), host)
        assert got["params"]["W_enc"].sharding.is_equivalent_to(want["params"]["W_enc"], 2)
        if model > 1:  # the latents really are split on the new mesh
            assert got["params"]["W_dec"].sharding.spec[0] == "model"
            assert len(got["dead"].sharding.device_set) == data * model
    ckpt.close()


def test_mesh_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="mesh.model=3 does not divide the 8 devices"):
        check_mesh(_cfg("mesh.model=3"), 8)
    with pytest.raises(ConfigError, match="mesh.data=4 x mesh.model=4 = 16 devices"):
        check_mesh(_cfg("mesh.data=4", "mesh.model=4"), 8)
    with pytest.raises(ConfigError, match="mse.batch_size=100 does not split over mesh.data=8"):
        check_mesh(_cfg("mse.batch_size=100"), 8)
    with pytest.raises(ConfigError, match="sae.d_sae=100 does not split over mesh.model=8"):
        check_mesh(_cfg("sae.d_sae=100", "mesh.model=8"), 8)
    with pytest.raises(ConfigError, match="lm_sharding"):
        _cfg("model.lm_sharding=zero3")
    assert check_mesh(_cfg("mesh.data=2", "mesh.model=4"), 8) == (2, 4)
    assert check_mesh(_cfg(), 8) == (8, 1)


@pytest.mark.parametrize("kind", ["lm_lora", "sae_lora"])
def test_adapter_phase_same_on_a_mesh_as_on_one_device(run_8x1, tmp_path, kind):
    """An adapter after the fine-tune (frozen SAE split over `model`, adapter replicated, LoRA'd LM):
    the same evaluation on a 4x2 mesh as on one device."""
    extra = ["phases=[mse, finetune, adapter]", f"adapter.kind={kind}", "adapter.rank=4", "adapter.tokens=2048",
             "adapter.lr=1e-2", "model.lm_sharding=tensor"]
    evals = {}
    for mesh in [(1, 1), (4, 2)]:
        d = tmp_path / f"{mesh[0]}x{mesh[1]}"
        shutil.copytree(run_8x1, d)  # mse and finetune are done: only the adapter phase runs
        _train(d, f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}", *extra)
        evals[mesh] = json.loads((d / "eval.json").read_text())
    one, two = evals[(1, 1)], evals[(4, 2)]
    assert two["adapter"]["ce_spliced"] == pytest.approx(one["adapter"]["ce_spliced"], abs=1e-3)
    assert two["adapter"]["ce_spliced"] != pytest.approx(one["finetune"]["ce_spliced"], abs=1e-6)  # it trained
    # the finished fine-tune is restored (and re-evaluated) on each mesh, not retrained
    assert two["finetune"]["ce_spliced"] == pytest.approx(one["finetune"]["ce_spliced"], abs=1e-5)


def test_collection_split_over_the_mesh_writes_the_same_rows(tmp_path):
    from jaxsae.data.collect import collect
    from jaxsae.data.store import open_store
    from jaxsae.data.text import StdlibSource
    from jaxsae.models.shipped import SHIPPED
    from jaxsae.models.lm import load_lm

    lm = load_lm(SHIPPED)
    kw = dict(n_tokens=2000, context=32, batch_contexts=8, chunk_rows=64, shard_chunks=2, progress=False)
    collect(lm, 1, StdlibSource("val"), lm.tokenizer, tmp_path / "one", **kw)
    mesh = shd.make_mesh(4, 2)  # batch over data, the LM's heads / mlp / vocab over model
    placed = jaxsae.models.lm.LM(lm.config, shd.shard(lm.params, shd.lm_param_shardings(lm, mesh, "tensor")))
    collect(placed, 1, StdlibSource("val"), lm.tokenizer, tmp_path / "mesh", mesh=mesh, **kw)
    a, b = open_store(tmp_path / "one"), open_store(tmp_path / "mesh")
    np.testing.assert_allclose(b.read(0, 2000), a.read(0, 2000), rtol=1e-5, atol=1e-5)
