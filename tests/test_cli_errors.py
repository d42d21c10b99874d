"""Every user error of every CLI: exit status 2, one stderr line naming the culprit, no traceback, and the
run directory byte-for-byte as it was. One table of bad inputs: a few of every tool run as real
subprocesses; the rest run one after another in a single process (`cli_inprocess.py`: each tool's
main(argv), its file descriptor 2 captured), which pays for the imports once instead of per case."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import ROOT, run_cmd, tiny_args

PY = sys.executable


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[["World"], list[str]]  # the command, given the prepared inputs
    says: str  # a piece of the one stderr line
    run: str = "fresh"  # "fresh": a --run-dir that must stay absent; "copy": a copy of the finished run
    own_process: bool = False  # a real `python -m` subprocess of its own (else in the shared process)


@dataclasses.dataclass(frozen=True)
class World:
    """Inputs shared by the cases (read-only), and this case's own run directory."""

    tmp: Path
    model: Path
    run: Path  # this case's run directory
    bad: dict  # name -> a prepared bad file or directory

    def train(self, *extra: str, model: Path | None = None) -> list[str]:
        return tiny_args(model or self.model, self.run, *extra)


def _m(*args: str) -> list[str]:
    return [PY, "-m", *args]


def _bad_model(root: Path, model: Path, name: str, damage: Callable[[Path], None]) -> Path:
    d = root / name
    shutil.copytree(model, d)
    damage(d)
    return d


def _truncate(p: Path, keep: int) -> None:
    p.write_bytes(p.read_bytes()[:keep])


def _without_hidden_size(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))


def _unequal_norms_sae(finished: Path, out: Path) -> Path:
    """A TopK SAE whose decoder rows have norms 0.5..2: a fine-tune that renormalises them would change it."""
    import jaxsae
    from jaxsae import interop

    sae = jaxsae.load_sae(finished / "checkpoints" / "mse")
    w = np.asarray(sae.params["W_dec"])
    params = {**sae.params, "W_dec": w * np.linspace(0.5, 2.0, w.shape[0], dtype=np.float32)[:, None]}
    return interop.save_jaxsae(dataclasses.replace(sae, params=params), out)


def _saelens(root: Path) -> Path:
    """A SAELens directory whose weights file is shorter than its header says."""
    d = root / "saelens-truncated"
    d.mkdir()
    header = json.dumps({"W_dec": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}).encode()
    (d / "sae_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 40)  # short
    (d / "cfg.json").write_text('{"d_in": 8, "d_sae": 4}')
    return d


@pytest.fixture(scope="module")
def world(finished_run, tiny_model, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("bad")
    files = {"list.yaml": "- mse\n- finetune\n", "scalar.yaml": "42\n", "syntax.yaml": "mse: [1, 2\n",
             "empty.yaml": "", "unsized.yaml": "phases: [mse]\nstore:\n  tokens: 1000\n"}
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.yaml").write_bytes("name: d\xe9mo\n".encode("latin-1"))
    (tmp / "a-file").write_text("not a directory\n")
    (tmp / "not-empty").mkdir()
    (tmp / "not-empty" / "keep.txt").write_text("mine\n")
    (tmp / "empty-dir").mkdir()
    no_cfg = tmp / "run-without-config"
    shutil.copytree(finished_run / "checkpoints", no_cfg / "checkpoints")
    bad = {
        "truncated-config": _bad_model(tmp, tiny_model, "m-truncated-config",
                                       lambda d: _truncate(d / "config.json", 60)),
        "no-hidden-size": _bad_model(tmp, tiny_model, "m-no-hidden-size", _without_hidden_size),
        "truncated-weights": _bad_model(tmp, tiny_model, "m-truncated-weights",
                                        lambda d: _truncate(d / "model.safetensors", 1 << 20)),
        "unequal-norms": _unequal_norms_sae(finished_run, tmp / "unequal-norms"),
        "saelens-weights": _saelens(tmp),
        "no-config": no_cfg,
        "store": finished_run / "store",  # read-only: a store of layer 1
    }
    return World(tmp, tiny_model, tmp / "unused", bad)


def _copy_damaged(finished: Path, dst: Path, case: str) -> None:
    """A copy of the finished run, damaged as `case` needs."""
    shutil.copytree(finished, dst)
    if case == "train-truncated-store-shard":
        _truncate(dst / "store" / "activations" / "c" / "0" / "0", 4096)
    elif case == "train-corrupt-metrics-line":
        lines = (dst / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines[1] = lines[1][:20] + "\n"  # a damaged line that is not the last: corruption, not a torn write
        (dst / "metrics.jsonl").write_text("".join(lines))
    elif case == "train-read-only-run-dir":
        for p in [dst, *dst.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    elif case == "analysis-corrupt-run-config":
        (dst / "config.yaml").write_text("- not\n- a mapping\n")


CONFIG = str(ROOT / "configs" / "demo.yaml")
ROOTLESS = os.geteuid() != 0  # root writes through any permission bits


def _cases() -> list[Case]:
    c = Case
    cases = [
        # --- python -m jaxsae.train: the config file and --set
        c("train-missing-config", lambda w: _m("jaxsae.train", "--config", str(w.tmp / "nope.yaml"),
                                               "--run-dir", str(w.run)), "nope.yaml does not exist", own_process=True),
        c("train-yaml-list", lambda w: _m("jaxsae.train", "--config", str(w.tmp / "list.yaml"), "--run-dir",
                                          str(w.run)), "holds a YAML list, not a mapping"),
        c("train-yaml-scalar", lambda w: _m("jaxsae.train", "--config", str(w.tmp / "scalar.yaml"), "--run-dir",
                                            str(w.run)), "holds a YAML int, not a mapping"),
        c("train-not-utf8", lambda w: _m("jaxsae.train", "--config", str(w.tmp / "latin1.yaml"), "--run-dir",
                                         str(w.run)), "is not UTF-8 text"),
        c("train-empty-config", lambda w: _m("jaxsae.train", "--config", str(w.tmp / "empty.yaml"), "--run-dir",
                                             str(w.run)), "does not set store.tokens, mse.tokens, finetune.tokens"),
        c("train-no-config-argument", lambda w: _m("jaxsae.train", "--run-dir", str(w.run)),
          "the following arguments are required: --config", own_process=True),
        c("train-set-bad-yaml", lambda w: w.train("--set", "phases=[mse,"), "the value is not valid YAML"),
        c("train-guard-ratio", lambda w: w.train("--set", "guard.loss_ratio=0.5"), "guard.loss_ratio=0.5 must be"),
        c("train-hook-layer-out-of-range", lambda w: w.train("--set", "hook.layer=7"),
          "hook.layer=7 is out of range for a 4-layer model: choose 0..3"),
        c("train-unknown-key", lambda w: w.train("--set", "sae.kay=3"), "unknown config key sae.kay"),
        c("train-k-over-d-sae", lambda w: w.train("--set", "sae.k=500"), "sae.k=500 exceeds sae.d_sae=128"),
        c("train-store-of-another-layer", lambda w: w.train("--set", f"store.path={w.bad['store']}", "--set",
                                                            "hook.layer=2"), "collected at layer 1, not hook.layer=2"),
        c("train-stream-buffer-below-two-batches", lambda w: w.train("--set", "store.mode=stream", "--set",
                                                                     "store.buffer_rows=300"),
          "store.buffer_rows=300 must be at least 2 x mse.batch_size (256)"),
        c("train-stream-over-a-disk-store", lambda w: w.train("--set", f"store.path={w.bad['store']}", "--set",
                                                              "store.mode=stream"),
          "holds a disk-mode store, but store.mode=stream: set store.mode=disk or use a new store.path"),
        c("train-bad-model-dtype", lambda w: w.train("--set", "model.dtype=fp8"),
          "model.dtype='fp8': choose one of 'auto', 'float32', 'bfloat16', 'float16'"),
        c("train-store-of-another-dtype", lambda w: w.train("--set", f"store.path={w.bad['store']}", "--set",
                                                            "store.dtype=bfloat16"),
          "holds float32 activations, not store.dtype=bfloat16: set store.dtype=float32 (or auto)"),
        c("train-store-of-another-lm-dtype", lambda w: w.train("--set", f"store.path={w.bad['store']}", "--set",
                                                               "model.dtype=bfloat16"),
          "was collected with the LM in float32, not model.dtype=bfloat16"),
        c("train-checkpoint-of-another-sae", lambda w: w.train("--set", "sae.d_sae=256"),
          "holds a mse checkpoint trained with sae.d_sae=128, but the config says sae.d_sae=256", "copy"),
        # --- the model
        c("train-truncated-model-config", lambda w: w.train(model=w.bad["truncated-config"]),
          "config.json is not valid JSON"),
        c("train-incomplete-model-config", lambda w: w.train(model=w.bad["no-hidden-size"]),
          "config.json lacks 'hidden_size'"),
        c("train-truncated-weights", lambda w: w.train(model=w.bad["truncated-weights"]),
          "model.safetensors is truncated", own_process=True),
        # --- the text sources, the SAE to start from, the run directory
        c("train-source-missing-file", lambda w: w.train("--set", "data.source={kind: files, paths: [/no/such]}"),
          "data.source: FilesSource: nothing matches '/no/such'"),
        c("train-eval-source-missing-file", lambda w: w.train("--set", "data.eval_source={kind: files, paths: [x.txt]}"),
          "data.eval_source: FilesSource: nothing matches 'x.txt'"),
        c("train-init-unequal-decoder-norms", lambda w: w.train("--set", "phases=[finetune]", "--set",
                                                                f"finetune.init_from={w.bad['unequal-norms']}"),
          "finetune.init_from: the topk SAE's decoder rows have norms"),
        c("train-run-dir-is-a-file", lambda w: tiny_args(w.model, w.tmp / "a-file"), "is a file, not a directory"),
        c("train-run-dir-changed-lr", lambda w: w.train("--set", "mse.lr=0.002"),
          "trained with mse.lr=0.001, but the config says mse.lr=0.002", "copy"),
        c("train-truncated-store-shard", lambda w: w.train(), "file activations/c/0/0 has 4096 bytes", "copy"),
        c("train-corrupt-metrics-line", lambda w: w.train(), "metrics.jsonl: line 2 is not valid JSON", "copy"),
        # --- python -m jaxsae.eval
        c("eval-missing-path", lambda w: _m("jaxsae.eval", str(w.tmp / "nope")), "does not exist", own_process=True),
        c("eval-run-without-config", lambda w: _m("jaxsae.eval", str(w.bad["no-config"])), "has no config.yaml"),
        c("eval-no-checkpoint", lambda w: _m("jaxsae.eval", str(w.tmp / "empty-dir")), "no checkpoint in"),
        c("eval-missing-eval-file", lambda w: _m("jaxsae.eval", str(w.run), "--set",
                                                 "data.eval_source={kind: files, paths: [/no/eval.txt]}"),
          "data.eval_source: FilesSource: nothing matches", "copy"),
        # --- python -m jaxsae.analysis
        c("analysis-missing-source-file", lambda w: _m("jaxsae.analysis", str(w.run), "--features", "1",
                                                       "--source", "files:/no/such.txt"), "nothing matches", "copy"),
        c("analysis-run-without-config", lambda w: _m("jaxsae.analysis", str(w.bad["no-config"]), "--features", "1"),
          "has no config.yaml", own_process=True),
        c("analysis-corrupt-run-config", lambda w: _m("jaxsae.analysis", str(w.run), "--features", "1"),
          "holds a YAML list", "copy"),
        # --- python -m jaxsae.interop
        c("export-to-a-file", lambda w: _m("jaxsae.interop", "export", str(w.run), str(w.tmp / "a-file"),
                                           "--format", "saelens"), "is a file, not a directory", "copy"),
        c("export-to-non-empty", lambda w: _m("jaxsae.interop", "export", str(w.run), str(w.tmp / "not-empty"),
                                              "--format", "saelens"), "is not empty: pass --force", "copy", own_process=True),
        c("export-from-nothing", lambda w: _m("jaxsae.interop", "export", str(w.tmp / "nope"), str(w.run),
                                              "--format", "saelens"), "is not a directory"),
        c("export-run-without-config", lambda w: _m("jaxsae.interop", "export", str(w.bad["no-config"]),
                                                    str(w.run), "--format", "saelens"), "has no config.yaml"),
        c("import-truncated-weights", lambda w: _m("jaxsae.interop", "import", str(w.bad["saelens-weights"]),
                                                   str(w.run)), "not a complete safetensors file"),
        # --- python -m jaxsae.aot
        c("aot-yaml-scalar", lambda w: _m("jaxsae.aot", "--config", str(w.tmp / "scalar.yaml")), "not a mapping"),
        c("aot-unknown-topology", lambda w: _m("jaxsae.aot", "--config", CONFIG, "--topology", "v9-1"),
          "unknown TPU topology 'v9-1'", own_process=True),
        c("aot-bad-hbm", lambda w: _m("jaxsae.aot", "--config", CONFIG, "--hbm-gib", "-1"), "--hbm-gib -1 must be"),
    ]
    if importlib.util.find_spec("datasets") is None:
        cases.append(c("train-hf-source-without-datasets",
                       lambda w: w.train("--set", "data.source={kind: hf, name: wikitext}"),
                       "data.source: kind 'hf' needs the optional 'datasets' package"))
    if ROOTLESS:
        cases.append(c("train-read-only-run-dir", lambda w: w.train(), "is not writable", "copy"))
    else:  # as root, a run directory that cannot be created stands in for one that cannot be written
        cases.append(c("train-run-dir-under-a-file", lambda w: tiny_args(w.model, w.tmp / "a-file" / "run"),
                       "which is a file"))
    return cases


def snapshot(root: Path) -> dict[str, str] | None:
    """Every file and directory under root: relative path -> sha256 of the bytes ('dir' for a directory);
    None if root does not exist."""
    if not root.exists():
        return None
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _prepare(case: Case, world: World, finished: Path) -> tuple[list[str], list[Path]]:
    """The case's command and the paths it must leave as they were (its own run directory prepared)."""
    run = world.tmp / "cases" / case.name
    if case.run == "copy":
        _copy_damaged(finished, run, case.name)
    argv = case.argv(dataclasses.replace(world, run=run))
    return argv, [run, world.tmp / "a-file", world.tmp / "not-empty", world.tmp / "empty-dir", *world.bad.values()]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run_own(case: Case, world: World, finished: Path) -> list[tuple]:
    argv, watched = _prepare(case, world, finished)
    before = {str(p): snapshot(p) for p in watched}
    r = run_cmd(argv, env=ENV)
    return [(case, r.returncode, r.stderr, before, {str(p): snapshot(p) for p in watched})]


def _run_shared(cases: list[Case], world: World, finished: Path) -> list[tuple]:
    """The cases one after another in one process (cli_inprocess.py); each case's run directory, and the
    shared inputs, are compared before and after the whole batch."""
    prepared = [_prepare(c, world, finished) for c in cases]
    before = [{str(p): snapshot(p) for p in watched} for _, watched in prepared]
    todo, done = world.tmp / "shared-cases.json", world.tmp / "shared-results.json"
    todo.write_text(json.dumps([argv for argv, _ in prepared]))
    r = run_cmd([PY, str(Path(__file__).parent / "cli_inprocess.py"), str(todo), str(done)], env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(done.read_text())
    return [(c, rc, err, b, {str(p): snapshot(p) for p in watched})
            for c, (rc, err), b, (_, watched) in zip(cases, results, before, prepared)]


CASES = _cases()


def test_every_cli_user_error_is_one_line_exit_2_and_changes_nothing(world, finished_run):
    assert len(CASES) >= 30
    own = [c for c in CASES if c.own_process]
    assert {c.name.split("-")[0] for c in own} >= {"train", "eval", "analysis", "export", "aot"}
    (world.tmp / "cases").mkdir()
    shared = [c for c in CASES if not c.own_process]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(_run_shared, shared, world, finished_run)]
        jobs += [pool.submit(_run_own, c, world, finished_run) for c in own]
        results = [row for job in jobs for row in job.result()]
    assert sorted(c.name for c, *_ in results) == sorted(c.name for c in CASES)
    problems = []
    for case, returncode, stderr, before, after in results:
        lines = [line for line in stderr.splitlines() if line.strip()]
        why = []
        if returncode != 2:
            why.append(f"exit status {returncode}")
        if len(lines) != 1:
            why.append(f"{len(lines)} stderr lines")
        if "Traceback" in stderr:
            why.append("a traceback")
        if case.says not in stderr:
            why.append(f"no {case.says!r}")
        if lines and not lines[0].startswith("error: "):
            why.append("the line does not start with 'error: '")
        if before != after:
            changed = [p for p in before if before[p] != after[p]]
            why.append(f"changed {changed}")
        if why:
            problems.append(f"{case.name}: {', '.join(why)}; stderr: {stderr[-600:]!r}")
    assert not problems, "\n".join(problems)
