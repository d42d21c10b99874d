"""`jaxsae.analysis.delta` and `python -m jaxsae.analysis delta`: the truncations against explicit
constructions, and the CLI on a tiny trained run (MSE, then the KL+MSE fine-tune) against its eval.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsae
from jaxsae.analysis import AnalysisError
from jaxsae.analysis.delta import (
    FULL,
    MATRICES,
    Variant,
    energy_at,
    energy_shares,
    factorize,
    low_rank,
    parse_ranks,
    recovered,
    variant_params,
)

ROOT = Path(__file__).parent.parent


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def tiny_run(mse_finetune_run) -> Path:
    """A tiny run of the demo recipe on the shipped model: checkpoints/mse and checkpoints/finetune (shared
    with tests/test_multiprocess.py; read-only)."""
    return mse_finetune_run


@pytest.fixture(scope="module")
def saes(tiny_run):
    src, dst = (jaxsae.load_sae(tiny_run / "checkpoints" / p) for p in ("mse", "finetune"))
    factors = {m: factorize(dst.params[m] - src.params[m]) for m in MATRICES}
    return src, dst, factors


@pytest.fixture(scope="module")
def cli(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("delta_out")
    r = _run(["-m", "jaxsae.analysis", "delta", str(tiny_run), "--ranks", "0", "2", "full", "--out", str(out)])
    return r, out


def test_full_rank_is_the_finetuned_sae(saes):
    src, dst, factors = saes
    full = variant_params(src.params, dst.params, factors, Variant("full", FULL, FULL))
    for k in dst.params:
        np.testing.assert_array_equal(full[k], dst.params[k])
    # the SVD at its whole rank is Δ again: W(mse) + SVD_q(ΔW) is the fine-tuned matrix to float tolerance
    q = min(dst.params["W_enc"].shape)
    svd_full = variant_params(src.params, dst.params, factors, Variant(str(q), q, q))
    for k in dst.params:
        np.testing.assert_allclose(svd_full[k], dst.params[k], rtol=0, atol=1e-5)


def test_rank_zero_is_the_mse_matrices_with_finetuned_biases(saes):
    src, dst, factors = saes
    got = variant_params(src.params, dst.params, factors, Variant("0", 0, 0))
    want = {k: (src.params[k] if k in ("W_enc", "W_dec") else dst.params[k]) for k in dst.params}
    assert set(got) == set(want) and set(want) >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    for k, w in want.items():
        np.testing.assert_array_equal(got[k], w)
    assert not np.allclose(src.params["b_enc"], dst.params["b_enc"])  # the fine-tune did move the biases
    only_enc = variant_params(src.params, dst.params, factors, Variant("enc", FULL, 0))
    np.testing.assert_array_equal(only_enc["W_enc"], dst.params["W_enc"])
    np.testing.assert_array_equal(only_enc["W_dec"], src.params["W_dec"])


def test_a_rank_two_delta_is_recovered_exactly_from_rank_two():
    ka, kb, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(ka, (16, 40))
    delta = jax.random.normal(kb, (16, 2)) @ jax.random.normal(kc, (2, 40))
    f = factorize(delta)
    assert float(f.s[2]) < 1e-5 * float(f.s[0])
    for r in (2, 3, 16):
        np.testing.assert_allclose(low_rank(f, r), delta, atol=1e-5)
        got = variant_params({"W_enc": w, "W_dec": w.T}, {"W_enc": w + delta, "W_dec": w.T + delta.T},
                             {"W_enc": f, "W_dec": factorize(delta.T)}, Variant(str(r), r, r))
        np.testing.assert_allclose(got["W_enc"], w + delta, atol=1e-5)
        np.testing.assert_allclose(got["W_dec"], w.T + delta.T, atol=1e-5)
    assert np.abs(np.asarray(low_rank(f, 1) - delta)).max() > 1e-2
    np.testing.assert_array_equal(low_rank(f, 0), jnp.zeros_like(delta))
    np.testing.assert_allclose(energy_at(energy_shares(f.s), 2), 1.0, atol=1e-6)


def test_energy_shares_rise_to_one(saes):
    for f in saes[2].values():
        e = energy_shares(f.s)
        assert len(e) == min(f.u.shape[0], f.vt.shape[1]) and np.all(np.diff(e) >= 0) and e[-1] == 1.0
        assert 0 < e[0] < 1 and energy_at(e, 0) == 0.0 and energy_at(e, FULL) == 1.0 and energy_at(e, 10**6) == 1.0
        np.testing.assert_allclose(e[-1] * np.sum(np.asarray(f.s, np.float64) ** 2), np.sum(np.asarray(f.s) ** 2),
                                   rtol=1e-6)


def test_recovered_share_and_ranks():
    assert recovered(0.2, 0.1, 0.2) == 0.0 and recovered(0.2, 0.1, 0.1) == 1.0
    assert abs(recovered(0.2, 0.1, 0.15) - 0.5) < 1e-12 and recovered(0.1, 0.2, 0.15) is None
    assert parse_ranks(["0", "4", "full", "4"]) == (0, 4, FULL)
    for bad in (["-1"], ["two"], []):
        with pytest.raises(AnalysisError):
            parse_ranks(bad)


def test_cli_end_to_end(cli, tiny_run):
    r, out = cli
    assert r.returncode == 0, r.stderr[-3000:]
    evals = json.loads((tiny_run / "eval.json").read_text())
    res = json.loads((out / "delta.json").read_text())
    rows = {row["label"]: row for row in res["rows"]}
    assert list(rows) == ["0", "2", "full", "only ΔW_enc (full)", "only ΔW_dec (full)"]
    # the same evaluation as the run's: the two ends reproduce eval.json
    assert abs(res["evals"]["mse"]["ce_gap"] - evals["mse"]["ce_gap"]) < 1e-5
    assert abs(rows["full"]["ce_gap"] - evals["finetune"]["ce_gap"]) < 1e-5
    assert rows["full"]["recovered"] == 1.0 and rows["full"]["energy_enc"] == 1.0
    assert rows["0"]["energy_enc"] == 0.0 and 0 < rows["2"]["energy_dec"] < 1
    assert (rows["only ΔW_enc (full)"]["energy_enc"], rows["only ΔW_enc (full)"]["energy_dec"]) == (1.0, 0.0)
    q = 128  # min(d_model, d_sae) of the tiny run
    assert len(res["singular_values"]["W_enc"]) == q and res["energy_shares"]["W_dec"][-1] == 1.0
    md = (out / "delta.md").read_text()
    assert md in r.stdout and "| full | 1.000 | 1.000 |" in md and "| mse SAE |" in md and "100%" in md
    assert (out / "delta.png").stat().st_size > 10_000


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors(tiny_run, tmp_path):
    no_ft = tmp_path / "mse_only"
    no_ft.mkdir()
    shutil.copy(tiny_run / "config.yaml", no_ft / "config.yaml")
    shutil.copytree(tiny_run / "checkpoints" / "mse", no_ft / "checkpoints" / "mse")
    _assert_one_line_error(_run(["-m", "jaxsae.analysis", "delta", str(no_ft)]), "checkpoints/finetune", "--to")
    _assert_one_line_error(_run(["-m", "jaxsae.analysis", "delta", str(tiny_run), "--ranks", "4", "-1"]),
                           "-1", "negative")
