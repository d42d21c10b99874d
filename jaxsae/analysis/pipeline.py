"""An analysis of chosen features of a trained run, end to end.

`check(request)` validates everything that needs no compute (run directory, checkpoint, features
against d_sae, the source, the output format); `analyze(request)` then loads the LM and the SAE, scans
the text in batches keeping densities and each feature's top contexts, computes the decoder's direct
logit effects and writes one page per feature, an index and the density histogram.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxsae.analysis import render
from jaxsae.analysis.runinfo import AnalysisError, RunInfo, check_features, inspect_run
from jaxsae.analysis.stream import contexts_for, open_run_store, source_spec, store_batches, text_batches

FORMATS = ("md", "html")


@dataclasses.dataclass(frozen=True)
class Request:
    run_dir: Path
    features: tuple[int, ...]
    source: str = "eval"
    tokens: int = 100_000
    top: int = 20
    fmt: str = "md"
    out: Path | None = None  # default: <run_dir>/analysis
    left: int = 12  # tokens shown before the peak
    right: int = 4  # and after it
    batch: int = 8  # contexts per forward pass
    logits: int = 10  # tokens listed per sign of the logit effect
    progress: bool = True
    sae: str | None = None  # a sweep's member (its name, e.g. k16-s0)


@dataclasses.dataclass(frozen=True)
class Checked:
    info: RunInfo
    features: list[int]
    spec: dict | str
    out: Path


def check(req: Request) -> Checked:
    """Every user error that needs no compute, as AnalysisError."""
    if req.fmt not in FORMATS:
        raise AnalysisError(f"--format {req.fmt!r}: choose one of {', '.join(FORMATS)}")
    for name in ("tokens", "top", "batch"):
        if getattr(req, name) < 1:
            raise AnalysisError(f"--{name} must be at least 1, got {getattr(req, name)}")
    if req.left < 0 or req.right < 0 or req.logits < 0:
        raise AnalysisError("--left, --right and --logits must be >= 0")
    from jaxsae.sae.load import width_members

    groups = width_members(Path(req.run_dir))  # a sweep over widths: the named member's width group
    if groups and req.sae not in groups:
        raise AnalysisError(f"{req.run_dir} holds a sweep over widths: give --sae, one of {', '.join(groups)}")
    info = inspect_run(groups[req.sae] if groups else req.run_dir)
    features = check_features(list(req.features), info.d_sae)
    spec = source_spec(req.source, info)
    if isinstance(spec, dict):
        from jaxsae.data.text import check_source

        try:
            check_source(spec)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            raise AnalysisError(f"--source {req.source}: {e}") from None
    out = Path(req.out) if req.out is not None else info.run_dir / "analysis"
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} exists and is not a directory")
    return Checked(info, features, spec, out)


def _scan(ck: Checked, encoder, req: Request):
    from tqdm.auto import tqdm

    from jaxsae.analysis.density import DensityCounter
    from jaxsae.analysis.contexts import TopContexts

    info, tok = ck.info, encoder.lm.tokenizer
    n_ctx = contexts_for(req.tokens, info)
    if ck.spec == "store":
        batches = store_batches(open_run_store(info), tok, info, n_ctx, req.batch)
    else:
        batches = text_batches(ck.spec, tok, info, n_ctx, req.batch)
    top, dens = TopContexts(ck.features, req.top), DensityCounter(info.d_sae)
    seen = 0
    with tqdm(total=n_ctx * (info.cfg.data.context - (0 if info.include_first else 1)), unit="tok",
              unit_scale=True, desc="analyse", disable=not req.progress, dynamic_ncols=True) as bar:
        for b in batches:
            acts, fired = encoder.scan_step(b.valid, ck.features, tokens=b.tokens, x=b.x)
            top.update(b.tokens, acts, seen)
            n = int(b.valid.sum())
            dens.update(fired, n)
            seen += len(b.tokens)
            bar.update(n)
    if dens.tokens == 0:
        raise AnalysisError(f"--source {req.source}: the text yielded no complete {info.cfg.data.context}-token "
                            "context; use more text")
    return top, dens


def feature_pages(ck: Checked, encoder, top, dens, req: Request) -> list[render.FeaturePage]:
    from jaxsae.analysis.logits import feature_logit_effects, unembedding
    from jaxsae.analysis.tokens import token_pieces

    tok, u = encoder.lm.tokenizer, unembedding(encoder.lm)
    pages = []
    for f in ck.features:
        eff = feature_logit_effects(encoder.sae, u, f, req.logits)
        contexts = []
        for ex in top.examples(f):
            a, b = ex.window(req.left, req.right)
            contexts.append(render.to_context(ex, token_pieces(tok, ex.tokens[a:b]), req.left, req.right))
        name = lambda items: [(tok.decode([i], clean_up_tokenization_spaces=False), v) for i, v in items]  # noqa: E731
        pages.append(render.FeaturePage(f, float(dens.density[f]), int(dens.fired[f]), dens.tokens,
                                        name(eff.top), name(eff.bottom), contexts))
    return pages


def write(ck: Checked, pages, dens, req: Request) -> Path:
    from jaxsae.analysis.density import plot_density

    info, out = ck.info, ck.out
    out.mkdir(parents=True, exist_ok=True)
    run_name = info.run_dir.resolve().name
    plot_density(dens.density, dens.tokens, ck.features, out / "density.png", run_name)
    for p in pages:
        text = render.feature_markdown(p, run_name) if req.fmt == "md" else render.feature_html(p, run_name)
        (out / render.page_name(p.feature, req.fmt)).write_text(text, encoding="utf-8")
    dead = int((dens.fired == 0).sum())
    header = [f"# Features of {run_name}",
              f"SAE: {info.meta['sae']['kind']}, d_sae={info.d_sae}, {info.phase} checkpoint (step "
              f"{info.meta.get('step', '?')}), residual after block {info.layer}. Analysed {dens.tokens:,} tokens "
              f"of --source {req.source}; {dead} of {info.d_sae} features never fired on them.",
              "Logit effects: W_U^T (gamma * d) of the decoder direction through the final norm's weight "
              "(linearised norm, 1/sigma dropped), so values rank tokens within a feature and compare "
              "between features, not with real logits."]
    index = render.index_markdown(pages, header) if req.fmt == "md" else render.index_html(pages, header)
    path = out / f"index.{req.fmt}"
    path.write_text(index, encoding="utf-8")
    summary = {"run": str(info.run_dir), "checkpoint": str(info.checkpoint), "source": req.source,
               "tokens": dens.tokens, "dead": dead, "features": [dataclasses.asdict(p) for p in pages]}
    (out / "features.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


def analyze(req: Request) -> Path:
    """Runs the whole analysis; returns the index page's path."""
    from jaxsae.analysis.activations import FeatureEncoder
    from jaxsae.models import load_lm
    from jaxsae.sae.load import load_sae

    ck = check(req)
    lm = load_lm(ck.info.model_path, ck.info.cfg.model.dtype)
    try:
        sae = load_sae(ck.info.checkpoint, req.sae)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    if sae.cfg.d_model != lm.d_model:
        raise AnalysisError(f"the SAE reads d_model={sae.cfg.d_model} but the model {ck.info.model_path} has "
                            f"d_model={lm.d_model}: the run's model has changed")
    encoder = FeatureEncoder(lm, sae, ck.info.layer, ck.info.cfg.data.prepend_bos)
    top, dens = _scan(ck, encoder, req)
    return write(ck, feature_pages(ck, encoder, top, dens, req), dens, req)

