"""`python -m jaxsae.interop export RUN_DIR OUT_DIR --format saelens|dictionary_learning [--force]`
and `python -m jaxsae.interop import PATH OUT_DIR [--format ...] [--layer L] [--model PATH] [--force]`.

export: a jaxsae run, phase or checkpoint directory -> SAELens or dictionary_learning files acting on raw
activations. import: SAELens / dictionary_learning files -> a jaxsae checkpoint directory that
`jaxsae.load_sae` and `python -m jaxsae.eval` read (--model names a model jaxsae can load when the
file's model name is not one, e.g. an HF hub id or a local directory).

OUT_DIR must be new or empty: a non-empty one (say a run's checkpoints/mse) is refused unless --force,
which replaces its contents. The output is written beside OUT_DIR first and moved into place at the
end, so a failed command leaves OUT_DIR as it was. User errors (a bad or truncated input file, a
refused destination) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxsae import cli
from jaxsae.cli import UsageError


def check_destination(out: Path, force: bool) -> None:
    """OUT_DIR may be absent or an empty directory; a non-empty one only with --force; never a file."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a directory: give a directory path for the output")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty: pass --force to replace its contents, or choose a new directory")


def _json_file(p: Path) -> None:
    try:
        json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{p} is not valid JSON (truncated or half-written? {e}); copy it again") from None


def _safetensors_file(p: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated copy is shorter)."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    if header is None or 8 + n + max(ends, default=0) > size:
        raise UsageError(f"{p} is not a complete safetensors file (truncated or corrupt: {size} bytes); copy it "
                         "again")


def _torch_file(p: Path) -> None:
    """A torch.save zip archive whose members all pass their CRC (legacy non-zip files are left to torch)."""
    with p.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UsageError(f"{p} is not a complete torch file (truncated or corrupt: {e}); copy it again") from None
    if bad is not None:
        raise UsageError(f"{p} is corrupt (member {bad} fails its checksum); copy it again")


def check_inputs(path: Path, fmt: str | None) -> None:
    """Reads the files an import will use far enough to name a truncated or half-written one."""
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".pt":
            _torch_file(path)
            if (path.parent / "config.json").exists():
                _json_file(path.parent / "config.json")
        return
    if fmt in (None, "saelens") and (path / "cfg.json").exists():
        _json_file(path / "cfg.json")
        if (path / "sae_weights.safetensors").exists():
            _safetensors_file(path / "sae_weights.safetensors")
    if fmt in (None, "dictionary_learning") and (path / "ae.pt").exists():
        _torch_file(path / "ae.pt")
        if (path / "config.json").exists():
            _json_file(path / "config.json")


def replace_dir(out: Path, write) -> Path:
    """Runs ``write(tmp)`` on a fresh directory beside ``out``, then moves it to ``out`` (an existing
    ``out`` is moved away first and deleted last), so a failure leaves ``out`` untouched."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        write(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m jaxsae.interop", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="jaxsae checkpoint -> SAELens / dictionary_learning")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("out_dir", type=Path)
    ex.add_argument("--format", required=True, choices=("saelens", "dictionary_learning"))
    ex.add_argument("--sae", default=None, metavar="NAME", help="a sweep's SAE, by name (e.g. k16-s0), or 'all': "
                    "each member into OUT_DIR/NAME")
    ex.add_argument("--model-name", help="model name to record (default: the checkpoint's model path)")
    im = sub.add_parser("import", help="SAELens / dictionary_learning -> jaxsae checkpoint")
    im.add_argument("path", type=Path)
    im.add_argument("out_dir", type=Path)
    im.add_argument("--format", choices=("saelens", "dictionary_learning"), help="default: detected")
    im.add_argument("--layer", type=int, help="hook layer, if the files' hook name is not a residual hook")
    im.add_argument("--model", help="model path or hub id jaxsae should load for this SAE")
    for p in (ex, im):
        p.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")
    a = ap.parse_args(argv)

    def work() -> int:
        # before anything heavy is imported or read: refusals are instant and touch nothing
        check_destination(a.out_dir, a.force)
        if a.cmd == "import":
            check_inputs(a.path, a.format)
        else:
            check_source_run(a.run_dir)
        sae, out = _run(a)
        print(json.dumps({"out": str(out), "kind": sae.cfg.kind, "d_model": sae.cfg.d_model,
                          "d_sae": sae.cfg.d_sae, "hook_layer": sae.meta.get("hook_layer"),
                          "model": sae.meta.get("model")}))
        return 0

    return cli.guarded(work)


def check_source_run(path: Path) -> None:
    """What export reads exists: the run, phase or step directory (and a run's config.yaml)."""
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: give a jaxsae run, phase or step directory")
    cli.run_config_of(path)


def _run(a: argparse.Namespace):
    import yaml

    from jaxsae import interop

    try:
        if a.cmd == "export":
            from jaxsae import load_sae

            rc_path = cli.run_config_of(a.run_dir)
            rc = yaml.safe_load(rc_path.read_text()) if rc_path else None
            if a.sae == "all":  # every member of a sweep, each in its own directory
                from jaxsae.checkpoint import Checkpointer
                from jaxsae.sae.load import checkpoint_dir, sweep_names, width_members

                names = list(width_members(a.run_dir))  # a sweep over widths: every group's members
                if not names:
                    d, _ = checkpoint_dir(a.run_dir)
                    names = sweep_names(Checkpointer(d).restore_meta())
                if not names:
                    raise ValueError(f"{a.run_dir} is not a sweep: leave --sae out")
                saes = {n: load_sae(a.run_dir, n) for n in names}

                def write_all(out):
                    for n, one in saes.items():
                        interop.export(one, out / n, a.format, run_config=rc, model_name=a.model_name)

                replace_dir(a.out_dir, write_all)
                sae = saes[names[0]]
            else:
                sae = load_sae(a.run_dir, a.sae)
                replace_dir(a.out_dir, lambda d: interop.export(sae, d, a.format, run_config=rc,
                                                                model_name=a.model_name))
        else:
            from jaxsae.models.shipped import resolve_model_path

            model = resolve_model_path(a.model) if a.model else None  # "shipped" -> its directory
            sae = interop.load(a.path, a.format, layer=a.layer, model=model)
            replace_dir(a.out_dir, lambda d: interop.save_jaxsae(sae, d))
    except (ValueError, FileNotFoundError, ImportError) as e:  # the importers' own errors about their files
        raise UsageError(str(e)) from None
    return sae, a.out_dir


if __name__ == "__main__":
    sys.exit(main())
