"""How low-rank is the fine-tune's change to the SAE? (PAPER.md "Adapters": LoRA of rank 2-64 on a
frozen SAE recovers ~69-77% of the fine-tune's gain.)

    python -m jaxsae.analysis delta RUN [--ranks 0 1 2 4 8 16 32 64 full] [--from mse] [--to finetune]

With W(from) the SAE before the fine-tune and W(to) after it, for each matrix M in (W_enc, W_dec):

    ΔM   = M(to) − M(from)                     W_enc: f32[D, S], W_dec: f32[S, D]
    ΔM   = U diag(σ) Vᵀ                        σ: f32[min(D, S)], descending (jnp.linalg.svd, float32)
    M_r  = M(from) + U[:, :r] diag(σ[:r]) V[:, :r]ᵀ
    energy share at r = Σ_{i<r} σ_i² / Σ_i σ_i²

Every variant keeps the fine-tuned biases (b_enc, b_dec) and any other parameter (a JumpReLU threshold)
of `to`; only the two matrices change, so rank 0 is the MSE matrices with the fine-tuned biases, not
the MSE SAE. Decoder rows are used as they come: M_r is not renormalised to unit norm. "full" is the
fine-tuned SAE itself. Each variant is evaluated with the run's own evaluation (`jaxsae.eval.evaluate`:
the same held-out text, splice and scale), and

    recovered share = (gap(from) − gap(variant)) / (gap(from) − gap(to))

is 0 for the SAE of `from` and 1 for the fine-tuned SAE. Two ablations apply one full Δ alone.
Writes delta.md (the table), delta.json (all numbers) and delta.png into --out (default RUN/analysis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxsae.analysis.runinfo import AnalysisError, RunInfo

MATRICES = ("W_enc", "W_dec")
DEFAULT_RANKS = ("0", "1", "2", "4", "8", "16", "32", "64", "full")
FULL = None  # a rank of None: the whole Δ, i.e. the fine-tuned matrix itself


class Factors(NamedTuple):
    """The thin SVD of one Δ f32[m, n]: u f32[m, q], s f32[q] (descending), vt f32[q, n], q = min(m, n)."""

    u: jnp.ndarray
    s: jnp.ndarray
    vt: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Variant:
    """One SAE to evaluate: the rank of each Δ applied (0 = none, FULL = all of it)."""

    label: str
    enc: int | None
    dec: int | None


# ---------------------------------------------------------------- the linear algebra (pure)

def factorize(delta: jnp.ndarray) -> Factors:
    """delta f32[m, n] -> its thin SVD in float32."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(delta, jnp.float32), full_matrices=False)
    return Factors(u, s, vt)


def low_rank(f: Factors, r: int) -> jnp.ndarray:
    """SVD_r(Δ) f32[m, n]: the best rank-r approximation (Eckart-Young); r = 0 gives zeros."""
    return (f.u[:, :r] * f.s[:r]) @ f.vt[:r]


def energy_shares(s: jnp.ndarray) -> np.ndarray:
    """σ f32[q] -> f64[q]: the share of ||Δ||_F² in the top 1..q singular values (ends at 1)."""
    e = np.cumsum(np.asarray(s, np.float64) ** 2)
    return e / e[-1] if e[-1] > 0 else np.ones_like(e)


def energy_at(shares: np.ndarray, r: int | None) -> float:
    """The energy share kept by rank r (0 -> 0, FULL or r >= q -> 1)."""
    return 1.0 if r is None or r >= len(shares) else (0.0 if r == 0 else float(shares[r - 1]))


def variant_params(src: Mapping, dst: Mapping, factors: Mapping[str, Factors], v: Variant) -> dict:
    """The params of `v`: every array of `dst` (the fine-tuned SAE), with W_enc and W_dec replaced by
    W(src) + SVD_r(ΔW) for a rank r, or kept as dst's for FULL."""
    out = dict(dst)
    for name, r in zip(MATRICES, (v.enc, v.dec)):
        if r is not None:
            out[name] = jnp.asarray(src[name], jnp.float32) + low_rank(factors[name], r)
    return out


def recovered(gap_src: float, gap_dst: float, gap: float) -> float | None:
    """(gap_src − gap) / (gap_src − gap_dst); None when the fine-tune did not lower the gap."""
    gain = gap_src - gap_dst
    return (gap_src - gap) / gain if gain > 0 else None


def variants(ranks: tuple[int | None, ...]) -> list[Variant]:
    """One variant per rank (both matrices truncated alike), then the two single-matrix ablations."""
    rows = [Variant("full" if r is None else str(r), r, r) for r in ranks]
    return rows + [Variant("only ΔW_enc (full)", FULL, 0), Variant("only ΔW_dec (full)", 0, FULL)]


# ---------------------------------------------------------------- the request, checked before any compute

@dataclasses.dataclass(frozen=True)
class Request:
    run_dir: Path
    ranks: tuple[int | None, ...]
    out: Path | None = None
    src: str = "mse"
    dst: str = "finetune"


@dataclasses.dataclass(frozen=True)
class Checked:
    """A request whose two checkpoints exist and hold SAEs of the same architecture."""

    req: Request
    info: RunInfo
    src_dir: Path
    dst_dir: Path


def parse_ranks(words) -> tuple[int | None, ...]:
    """["0", "4", "full"] -> (0, 4, None); AnalysisError for anything else or a negative."""
    out = []
    for w in words:
        if w == "full":
            out.append(FULL)
            continue
        try:
            r = int(w)
        except ValueError:
            raise AnalysisError(f"--ranks: {w!r} is not a rank; give integers >= 0 or 'full'") from None
        if r < 0:
            raise AnalysisError(f"--ranks: {r} is negative; give integers >= 0 or 'full'")
        out.append(r)
    if not out:
        raise AnalysisError("--ranks is empty: give integers >= 0 or 'full'")
    return tuple(dict.fromkeys(out))


def _phase_dir(run_dir: Path, phase: str, flag: str) -> Path:
    from jaxsae.checkpoint import Checkpointer
    from jaxsae.phases import sae_phases

    names = [p.name for p in sae_phases()]
    if phase not in names:
        raise AnalysisError(f"{flag} {phase}: not a phase that holds an SAE; choose from {', '.join(names)}")
    d = run_dir / "checkpoints" / phase
    if not d.is_dir() or Checkpointer(d).latest_step() is None:
        raise AnalysisError(f"{run_dir} has no finished checkpoint in checkpoints/{phase}: train a run with "
                            f"phases [{phase}, ...] or pick another phase with {flag}")
    return d


def check(req: Request) -> Checked:
    """Reads config.yaml and both checkpoints' meta only; AnalysisError naming the fix."""
    from jaxsae.analysis.runinfo import inspect_run
    from jaxsae.checkpoint import Checkpointer
    from jaxsae.sae.config import ARCHITECTURE_FIELDS

    if req.src == req.dst:
        raise AnalysisError(f"--from and --to are both {req.src}: compare two different phases")
    info = inspect_run(req.run_dir)
    src, dst = _phase_dir(req.run_dir, req.src, "--from"), _phase_dir(req.run_dir, req.dst, "--to")
    a, b = Checkpointer(src).restore_meta(), Checkpointer(dst).restore_meta()
    for key in ARCHITECTURE_FIELDS:
        if a["sae"].get(key) != b["sae"].get(key):
            raise AnalysisError(f"checkpoints/{req.src} and checkpoints/{req.dst} hold different SAEs (sae.{key}: "
                                f"{a['sae'].get(key)} vs {b['sae'].get(key)}): compare two phases of one SAE")
    for key in ("scale", "hook_layer"):
        if a.get(key) != b.get(key):
            raise AnalysisError(f"checkpoints/{req.src} and checkpoints/{req.dst} differ in {key} ({a.get(key)} vs "
                                f"{b.get(key)}): compare two phases of one run")
    return Checked(req, info, src, dst)


# ---------------------------------------------------------------- the analysis

def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(c: Checked, log=_progress) -> dict:
    """Loads both SAEs and the LM, evaluates every variant; returns the numbers delta.json holds.
    log(line): progress, one line per evaluated variant."""
    import jaxsae
    from jaxsae.data.windows import eval_sequences
    from jaxsae.eval import evaluate
    from jaxsae.models import load_lm
    from jaxsae.splice import Splice

    src, dst = jaxsae.load_sae(c.src_dir), jaxsae.load_sae(c.dst_dir)
    factors = {m: factorize(dst.params[m] - src.params[m]) for m in MATRICES}
    shares = {m: energy_shares(f.s) for m, f in factors.items()}
    cfg = c.info.cfg
    lm = load_lm(c.info.model_path, cfg.model.dtype)
    sp = Splice(lm, c.info.layer, dst.scale, c.info.include_first)
    tokens = eval_sequences(cfg, lm.tokenizer)

    def ev(params) -> dict:
        return evaluate(sp, dst.cfg, params, tokens, batch=cfg.eval.batch_sequences)

    base = {c.req.src: ev(src.params), c.req.dst: ev(dst.params)}
    gap_src, gap_dst = base[c.req.src]["ce_gap"], base[c.req.dst]["ce_gap"]
    rows = []
    for v in variants(c.req.ranks):
        m = base[c.req.dst] if (v.enc, v.dec) == (FULL, FULL) else ev(variant_params(src.params, dst.params,
                                                                                    factors, v))
        rows.append({"label": v.label, "rank_enc": v.enc, "rank_dec": v.dec,
                     "energy_enc": energy_at(shares["W_enc"], v.enc), "energy_dec": energy_at(shares["W_dec"], v.dec),
                     "ce_gap": m["ce_gap"], "recovered": recovered(gap_src, gap_dst, m["ce_gap"]), "metrics": m})
        log(f"[delta] {v.label}: CE gap {m['ce_gap']:.4f}")
    return {"run": str(c.req.run_dir), "from": c.req.src, "to": c.req.dst,
            "from_step": int(src.meta["step"]) if "step" in src.meta else None,
            "to_step": int(dst.meta["step"]) if "step" in dst.meta else None,
            "eval_tokens": base[c.req.dst]["eval_tokens"], "evals": base,
            "singular_values": {m: np.asarray(f.s).tolist() for m, f in factors.items()},
            "energy_shares": {m: s.tolist() for m, s in shares.items()},
            "frobenius": {m: float(np.sqrt(np.sum(np.asarray(f.s, np.float64) ** 2))) for m, f in factors.items()},
            "rows": rows}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def table_md(res: dict) -> str:
    """The markdown report: a table with one line per variant and what every row keeps."""
    src, dst = res["from"], res["to"]
    gs, gd = res["evals"][src]["ce_gap"], res["evals"][dst]["ce_gap"]
    note = (f"ΔW = W({dst}) − W({src}); rank r: W({src}) + SVD_r(ΔW) for W_enc and W_dec alike, with the "
            f"{dst}'s biases (and any other parameter) in every row, so rank 0 is the {src} matrices with "
            f"the {dst}'s biases. Decoder rows are not renormalised. Energy share: Σ_{{i<r}} σ_i² / ||ΔW||_F². "
            f"Recovered: (gap_{src} − gap) / (gap_{src} − gap_{dst}). Evaluation: the run's own "
            f"({res['eval_tokens']} held-out tokens).")
    lines = [f"# Low-rank structure of the {dst} ({src} -> {dst}), {res['run']}", "", note, "",
             "| rank | energy ΔW_enc | energy ΔW_dec | CE gap | share of the fine-tune's gain recovered |",
             "|---|---|---|---|---|",
             f"| {src} SAE | | | {gs:.4f} | 0% |"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r['energy_enc']:.3f} | {r['energy_dec']:.3f} | {r['ce_gap']:.4f} | "
                     f"{_pct(r['recovered'])} |")
    if gs - gd <= 0:
        lines += ["", f"The {dst} did not lower the CE gap ({gs:.4f} -> {gd:.4f}): no gain to recover."]
    fro = res["frobenius"]
    norms = f"||ΔW_enc||_F = {fro['W_enc']:.4g}, ||ΔW_dec||_F = {fro['W_dec']:.4g}"
    lines += ["", f"{norms}; singular values and every metric in delta.json.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Left: σ_i of both Δ (log scale); right: the recovered share against the rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, color in zip(MATRICES, ("tab:blue", "tab:red")):
        s = np.asarray(res["singular_values"][m])
        a.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), color=color, label=f"Δ{m}")
    a.set(xlabel="index i", ylabel="singular value σ_i", title="spectrum of the fine-tune's change")
    a.legend()
    ranked = [r for r in res["rows"] if r["rank_enc"] == r["rank_dec"] and r["recovered"] is not None]
    xs = np.arange(len(ranked))
    b.plot(xs, [r["recovered"] for r in ranked], "o-", color="tab:purple", label=f"W({res['from']}) + SVD_r(ΔW), both")
    b.axhline(1.0, color="tab:red", ls="--", lw=1, label=f"{res['to']} (1.0)")
    b.axhline(0.0, color="tab:blue", ls="--", lw=1, label=f"{res['from']} SAE (0)")
    for r, ls in zip([r for r in res["rows"] if r["rank_enc"] != r["rank_dec"]], (":", "-.")):
        if r["recovered"] is not None:
            b.axhline(r["recovered"], color="tab:gray", ls=ls, lw=1, label=r["label"])
    b.set_xticks(xs, [r["label"] for r in ranked])
    b.set(xlabel="rank r", ylabel="share of the fine-tune's gain recovered", title="gain kept by rank r")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, out: Path) -> str:
    """Writes delta.md, delta.json and delta.png into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = table_md(res)
    (out / "delta.md").write_text(md)
    (out / "delta.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "delta.png")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxsae.analysis delta", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with checkpoints of both phases")
    ap.add_argument("--ranks", nargs="+", default=list(DEFAULT_RANKS), metavar="R",
                    help="ranks of the truncated Δ: integers >= 0 or 'full' (default 0 1 2 4 8 16 32 64 full)")
    ap.add_argument("--from", dest="src", default="mse", help="the phase before the fine-tune (default mse)")
    ap.add_argument("--to", dest="dst", default="finetune", help="the fine-tuned phase (default finetune)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default RUN/analysis)")
    a = ap.parse_args(argv)

    from jaxsae.checkpoint import CheckpointError as RunCheckpointError
    from jaxsae.config import ConfigError
    from jaxsae.models.hf import CheckpointError

    try:
        req = Request(a.run_dir, parse_ranks(a.ranks), a.out, a.src, a.dst)
        res = run(check(req))  # check reads only small files: user errors end here, before the LM loads
    except (AnalysisError, CheckpointError, RunCheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write(res, req.out or req.run_dir / "analysis"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
