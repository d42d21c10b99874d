"""Text corpora and token packing for activation collection.

The default corpus is the Python standard library's own source, read at run
time from the running interpreter (no third-party text ships with the repo).
Every source yields documents (``str``) in a fixed order, so a token stream
built on top of it (``packing.py``) is reproducible, and ``docs_from(i)`` starts
at document ``i`` without reading the ones before: iteration resumes at a
recorded position of the stream.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import platform
import sysconfig
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

Split = Literal["train", "val", "all"]
SPLITS = ("train", "val", "all")
VAL_PER_MILLE = 30  # ~3% of files go to 'val'
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
TEXT_SUFFIXES = frozenset({".txt", ".py", ".md", ".rst"})


# --------------------------------------------------------------------------- stdlib corpus

def stdlib_root() -> pathlib.Path:
    """Directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_val_path(rel_posix: str) -> bool:
    """Stable hold-out membership of a relative POSIX path.

    blake2b rather than ``hash()`` because the latter is salted per process;
    this way the split is identical on every machine with the same Python.
    """
    digest = hashlib.blake2b(rel_posix.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000 < VAL_PER_MILLE


def _is_test_path(rel: pathlib.PurePosixPath) -> bool:
    return bool(_TEST_DIRS.intersection(rel.parts[:-1])) or rel.name.startswith("test_")


def stdlib_files(split: Split = "train", include_tests: bool = True,
                 root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """All ``*.py`` files of the stdlib (minus site-packages/__pycache__) in ``split``.

    Ordered by relative POSIX path. ``root`` overrides the stdlib dir (tests).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = pathlib.Path(root) if root is not None else stdlib_root()
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so we never descend into (possibly huge) site-packages.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel = pathlib.PurePosixPath(pathlib.Path(dirpath, name).relative_to(root).as_posix())
                if include_tests or not _is_test_path(rel):
                    rels.append(str(rel))
    rels.sort()
    if split != "all":
        want_val = split == "val"
        rels = [r for r in rels if is_val_path(r) == want_val]
    return [root / r for r in rels]


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 with replacement; bytes-level read so no newline translation happens."""
    return pathlib.Path(path).read_bytes().decode("utf-8", errors="replace")


def _fingerprint(paths: Sequence[pathlib.Path], root: pathlib.Path | None = None) -> tuple[str, int]:
    """Cheap identity of a file list: blake2b over (path, size). Returns (hex, total bytes)."""
    h, total = hashlib.blake2b(digest_size=8), 0
    for p in paths:
        size = p.stat().st_size
        name = p.relative_to(root).as_posix() if root is not None else str(p)
        h.update(f"{name}\0{size}\n".encode())
        total += size
    return h.hexdigest(), total


# --------------------------------------------------------------------------- sources

@runtime_checkable
class TextSource(Protocol):
    """Anything that yields documents deterministically and describes itself."""

    def __iter__(self) -> Iterator[str]: ...

    def docs_from(self, doc: int) -> Iterator[str]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StdlibSource:
    """The running interpreter's stdlib ``*.py`` files, one document per file.

    ``shuffle_seed``: files come in a fixed pseudo-random order (a hash of seed and path) rather than
    sorted by path, because sorted order puts whole packages together: any contiguous window of the
    stream (the store's tokens, then the fine-tune's) would be a narrow slice (all of ``email/``, say)
    instead of a sample of the corpus. ``None`` keeps the sorted order.
    """

    split: Split = "train"
    include_tests: bool = True
    shuffle_seed: int | None = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def files(self) -> list[pathlib.Path]:
        files = stdlib_files(self.split, self.include_tests)
        if self.shuffle_seed is None:
            return files
        root = stdlib_root()

        def key(p: pathlib.Path) -> bytes:
            rel = f"{self.shuffle_seed}:{p.relative_to(root).as_posix()}".encode()
            return hashlib.blake2b(rel, digest_size=8).digest()

        return sorted(files, key=key)

    def __iter__(self) -> Iterator[str]:
        return self.docs_from(0)

    def docs_from(self, doc: int) -> Iterator[str]:
        """The documents from index `doc` on (one per file: the earlier files are not opened)."""
        return (read_text(p) for p in self.files()[doc:])

    def describe(self) -> dict[str, Any]:
        files, root = self.files(), stdlib_root()
        fp, n_bytes = _fingerprint(files, root)
        return {"kind": "stdlib", "split": self.split, "include_tests": self.include_tests,
                "shuffle_seed": self.shuffle_seed,
                "python": platform.python_version(), "root": str(root),
                "n_files": len(files), "n_bytes": n_bytes, "fingerprint": fp}


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class FilesSource:
    """Local files: ``.txt/.py/.md/.rst`` are one document each; ``.jsonl`` is one per line.

    ``paths`` entries may be files, directories (recursed, sorted) or globs
    (``**`` allowed, matches sorted). Order of entries is preserved.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text"):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("FilesSource needs at least one path or glob")
        self.text_field = text_field

    def files(self) -> list[pathlib.Path]:
        out: list[pathlib.Path] = []
        for entry in self.paths:
            if _has_glob(entry):
                import glob
                matches = [pathlib.Path(m) for m in sorted(glob.glob(entry, recursive=True))]
                matches = [m for m in matches if m.is_file()]
            elif pathlib.Path(entry).is_dir():
                matches = sorted(p for p in pathlib.Path(entry).rglob("*")
                                 if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
            else:
                matches = [pathlib.Path(entry)] if pathlib.Path(entry).is_file() else []
            if not matches:
                raise FileNotFoundError(f"FilesSource: nothing matches {entry!r}")
            for m in matches:
                if m.suffix != ".jsonl" and m.suffix not in TEXT_SUFFIXES:
                    raise ValueError(f"FilesSource: unsupported file type {m} "
                                     f"(use .jsonl or one of {sorted(TEXT_SUFFIXES)})")
            out.extend(matches)
        return out

    def _iter_jsonl(self, path: pathlib.Path, skip: int = 0) -> Iterator[str]:
        """The rows of `path` after its first `skip` non-blank lines (those are not parsed)."""
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or self.text_field not in row:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise KeyError(f"{path}:{lineno}: no field {self.text_field!r} (has {fields})")
                yield str(row[self.text_field])

    def __iter__(self) -> Iterator[str]:
        return self.docs_from(0)

    def docs_from(self, doc: int) -> Iterator[str]:
        """The documents from index `doc` on. Earlier text files are not opened; an earlier ``.jsonl``
        file is only scanned for its number of rows (not parsed), since its rows are documents."""
        for path in self.files():
            if path.suffix != ".jsonl":
                if doc > 0:
                    doc -= 1
                    continue
                yield read_text(path)
                continue
            if doc > 0:  # counted as _iter_jsonl reads (same newlines, same blank lines), not parsed
                with open(path, encoding="utf-8", errors="replace") as f:
                    rows = sum(1 for line in f if line.strip())
                if doc >= rows:
                    doc -= rows
                    continue
            rows_left = self._iter_jsonl(path, skip=doc)
            doc = 0
            yield from rows_left

    def describe(self) -> dict[str, Any]:
        files = self.files()
        fp, n_bytes = _fingerprint(files)
        return {"kind": "files", "paths": list(self.paths), "text_field": self.text_field,
                "n_files": len(files), "n_bytes": n_bytes, "fingerprint": fp}


@dataclass(frozen=True)
class HFDatasetSource:
    """A Hugging Face dataset streamed with ``datasets.load_dataset(..., streaming=True)``.

    Unshuffled, so the order is the dataset's shard order (deterministic). Needs
    network access to the Hub (or a warm local cache); ``datasets`` is imported lazily.
    """

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    revision: str | None = None

    def _hub_error(self, err: BaseException) -> str:
        return (f"could not stream HF dataset {self.name!r} (config={self.config!r}, split={self.split!r}): "
                f"{type(err).__name__}: {err}. Streaming needs network access to the Hugging Face Hub "
                "(or a local cache with HF_DATASETS_OFFLINE=1); offline, use {'kind': 'stdlib'} "
                "or {'kind': 'files', 'paths': [...]} instead.")

    def _open(self) -> Iterable[Mapping[str, Any]]:
        try:
            import datasets
        except ImportError as e:
            raise ImportError("HFDatasetSource needs the optional 'datasets' package "
                              "(pip install 'jaxsae[hub]')") from e
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split,
                                         streaming=True, revision=self.revision)
        except Exception as e:  # network/auth/not-found errors come in many types
            raise RuntimeError(self._hub_error(e)) from e

    def __iter__(self) -> Iterator[str]:
        return self.docs_from(0)

    def docs_from(self, doc: int) -> Iterator[str]:
        """The rows from index `doc` on, through ``IterableDataset.skip``: the rows before are still
        streamed past (a stream has no index to seek in) but not decoded into documents nor tokenized."""
        rows = self._open()
        rows = iter(rows.skip(doc) if doc else rows)
        while True:
            try:  # streaming fetches shards lazily, so errors can surface mid-iteration
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:
                raise RuntimeError(self._hub_error(e)) from e
            if self.text_field not in row:
                raise KeyError(f"HF dataset {self.name!r} rows have no field {self.text_field!r} "
                               f"(has {sorted(row)})")
            yield row[self.text_field]

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field, "revision": self.revision}


SOURCE_KINDS: dict[str, type] = {"stdlib": StdlibSource, "files": FilesSource, "hf": HFDatasetSource}


def make_source(spec: Mapping[str, Any]) -> TextSource:
    """Build a source from a config dict such as ``{'kind': 'stdlib', 'split': 'train'}``."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"source spec must be a dict, got {type(spec).__name__}")
    kinds = sorted(SOURCE_KINDS)
    if "kind" not in spec:
        raise ValueError(f"source spec is missing key 'kind' (valid kinds: {kinds}); got keys {sorted(spec)}")
    cls = SOURCE_KINDS.get(spec["kind"])
    if cls is None:
        raise ValueError(f"source spec has invalid 'kind': {spec['kind']!r}; valid kinds: {kinds}")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    params = inspect.signature(cls).parameters
    valid = ["kind", *params]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise ValueError(f"source spec for kind {spec['kind']!r} has unknown key(s) {bad}; valid keys: {valid}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ValueError(f"source spec for kind {spec['kind']!r} is missing required key(s) {missing}")
    return cls(**kwargs)


def check_source(spec: Mapping[str, Any]) -> None:
    """Checks a source spec without reading any text: the kind and keys (``make_source``), that a
    ``files`` source matches files and that an ``hf`` source has ``datasets`` installed. Raises
    ValueError, TypeError, FileNotFoundError or ImportError naming the problem."""
    import importlib.util

    src = make_source(spec)
    if isinstance(src, FilesSource):
        src.files()
    elif isinstance(src, HFDatasetSource) and importlib.util.find_spec("datasets") is None:
        raise ImportError("kind 'hf' needs the optional 'datasets' package (pip install 'jaxsae[hub]'); offline, "
                          "use {kind: stdlib} or {kind: files, paths: [...]}")
