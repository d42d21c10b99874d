"""A run's report: a markdown table of each phase's metrics beside the paper's ranges, and a plot.

    python -m jaxsae.report runs/demo      (also written at the end of every training run)
    python -m jaxsae.report runs/s0 runs/s1 runs/s2     (runs that differ only in their seeds)

Writes `report.md` and `report.png` into the run directory; with several runs, prints every metric's
mean ± sd over them (sample sd, n - 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxsae import phases as P

# The paper's reported effects (PAPER.md "Results to compare against", derived from its figure data).
PAPER = {
    "gap_reduction_finetune": "Pythia-160M TopK: 31%; Gemma-2-2B TopK 16k: 47% (k=20), 28% (k=40), 25% (k=80), 3% (k=160)",
    "gap_reduction_e2e": "Pythia-160M TopK: 28%; Gemma-2-2B TopK 16k: 54% (k=20), 28% (k=40), 15% (k=80), -9% (k=160)",
    "finetune_share": "0.5-10% of the training tokens",
}

COLUMNS = [("ce_clean", "CE clean", 4), ("ce_spliced", "CE spliced", 4), ("ce_zero", "CE zero-abl.", 3),
           ("ce_gap", "CE gap", 4), ("loss_recovered", "loss recovered", 4), ("kl", "KL", 4),
           ("fve", "FVE", 4), ("explained_variance", "EV (SAEBench)", 4), ("l0", "L0", 1),
           ("dead_fraction", "dead", 3), ("phase_tokens", "tokens", 0), ("phase_unique_tokens", "unique tokens", 0),
           ("phase_seconds", "seconds", 1)]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def baseline(ev: dict) -> str | None:
    """The SAE every other row is compared with: the MSE SAE, or an imported one (`init`)."""
    return next((p for p in ("mse", "init") if p in ev), None)


def gap_closed(ev: dict, phase: str) -> float | None:
    """Fraction of the baseline SAE's (MSE-trained or imported) CE gap that `phase` removes."""
    base = baseline(ev)
    if base is None or phase not in ev or phase == base or ev[base]["ce_gap"] <= 0:
        return None
    return 1.0 - ev[phase]["ce_gap"] / ev[base]["ce_gap"]


def token_offset(ev: dict, phase: str) -> int:
    """Where `phase`'s tokens start on the plot's axis: after the tokens of the SAE it continues."""
    start = ev.get(phase, {}).get("start")
    return 0 if start not in ev else token_offset(ev, start) + ev[start].get("phase_tokens", 0)


def markdown(run_dir: Path) -> str:
    ev = json.loads((run_dir / "eval.json").read_text())
    positions = next((m["positions"] for m in ev.values() if "positions" in m), None)
    lines = [f"# Report: {run_dir.name}", "", "Held-out evaluation after each phase (CE in nats/token"
             + (f"; positions spliced and counted: {positions}" if positions else "") + ").", "",
             "| phase | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for phase, m in ev.items():
        cells = [f"{m[k]:,.{p}f}" if isinstance(m.get(k), (int, float)) else "" for k, _, p in COLUMNS]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += ["", "| effect | this run | paper |", "|---|---|---|"]
    for phase in [p.name for p in P.PHASES if p.name in ev]:
        g = gap_closed(ev, phase)
        if g is not None:
            what = "the MSE SAE" if baseline(ev) == "mse" else "the imported SAE"
            paper = PAPER.get(f"gap_reduction_{phase}", "")
            lines.append(f"| CE gap closed by {phase} (vs {what}) | {100 * g:.1f}% | {paper} |")
    if "control" in ev and "finetune" in ev and gap_closed(ev, "control") is not None:
        net = gap_closed(ev, "finetune") - gap_closed(ev, "control")
        lines.append(f"| KL effect net of the extra tokens (finetune - control) | {100 * net:.1f}% | |")
    if "finetune" in ev and "init" in ev:
        lines.append(f"| L0 before / after the fine-tune | {ev['init']['l0']:.1f} / {ev['finetune']['l0']:.1f} | "
                     "kept |")
    if "finetune" in ev and "mse" in ev:
        share = ev["finetune"]["phase_tokens"] / (ev["finetune"]["phase_tokens"] + ev["mse"]["phase_tokens"])
        lines.append(f"| fine-tune share of the tokens | {100 * share:.1f}% | {PAPER['finetune_share']} |")
        lines.append(f"| L0 before / after the fine-tune | {ev['mse']['l0']:.1f} / {ev['finetune']['l0']:.1f} | "
                     "kept (k fixed; ReLU held by the L1 controller) |")
    lines += ["", "![loss curves and CE gap](report.png)", ""]
    return "\n".join(lines)


def plot(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = json.loads((run_dir / "eval.json").read_text())
    rows = _metrics(run_dir)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    offset = {p: token_offset(ev, p) for p in P.NAMES}
    colors = {"init": "tab:purple", **{p.name: p.color for p in P.PHASES}}
    for phase in P.NAMES:
        pr = [r for r in rows if r["phase"] == phase and "train/mse" in r]
        if pr:
            ax1.plot([r["tokens"] + offset[phase] for r in pr], [r["train/mse"] for r in pr],
                     color=colors[phase], label=phase, lw=1)
        kr = [r for r in rows if r["phase"] == phase and "train/kl" in r]
        if kr:
            ax2.plot([r["tokens"] + offset[phase] for r in kr], [r["train/kl"] for r in kr],
                     color=colors[phase], label=phase, lw=1)
    ax1.set(xlabel="tokens", ylabel="MSE (normalised activations)", title="reconstruction loss", yscale="log")
    ax2.set(xlabel="tokens", ylabel="KL(clean || spliced), nats/token", title="KL during KL+MSE training",
            yscale="log")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    phases = list(ev)
    gaps = [ev[p]["ce_gap"] for p in phases]
    bars = ax3.bar(phases, gaps, color=[colors.get(p, "gray") for p in phases])
    for b, p in zip(bars, phases):
        g = gap_closed(ev, p)
        label = f"{ev[p]['ce_gap']:.3f}" + (f"\n({100 * g:.0f}% closed)" if g is not None else "")
        ax3.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    ax3.set(ylabel="CE spliced - CE clean (nats)", title="CE gap on held-out text")
    ax3.margins(y=0.25)
    fig.suptitle(f"{run_dir.name}: held-out CE clean {next(iter(ev.values()))['ce_clean']:.3f}")
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    from jaxsae import sweep_report

    if sweep_report.is_sweep(json.loads((run_dir / "eval.json").read_text())):
        return sweep_report.write(run_dir)
    (run_dir / "report.md").write_text(markdown(run_dir))
    plot(run_dir)
    return run_dir / "report.md"


def _mean_sd(values: list[float]) -> str:
    import statistics

    if len(values) < 2:
        return f"{values[0]:.4f}" if values else ""
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def seeds_markdown(run_dirs: list[Path]) -> str:
    """Mean ± sd over runs (seeds) of each phase's CE gap, FVE, EV and L0, and of the share of the MSE
    SAE's gap each phase closes (with the fine-tune's net of the control when both ran). Sweep runs
    (`jaxsae.sweep`) get one such table per member name that every run has."""
    from jaxsae import sweep_report

    evs = [json.loads((Path(d) / "eval.json").read_text()) for d in run_dirs]
    title = f"Mean ± sd over {len(evs)} runs: " + ", ".join(Path(d).name for d in run_dirs)
    if not any(sweep_report.is_sweep(ev) for ev in evs):
        return _seeds_table(evs, title)
    if not all(sweep_report.is_sweep(ev) for ev in evs):
        raise SystemExit("jaxsae.report: mix of sweep and single runs: pass runs of one kind")
    names = [n for n in next(iter(evs[0].values())) if all(n in next(iter(ev.values())) for ev in evs)]
    if not names:
        raise SystemExit("jaxsae.report: the sweep runs share no member name: pass runs of the same sweep")
    per_member = [_seeds_table([{p: ev[p][n] for p in ev if n in ev[p]} for ev in evs], f"{title} — SAE {n}")
                  for n in names]
    return "\n".join(per_member)


def _seeds_table(evs: list[dict], title: str) -> str:
    phases = [p for p in ["init", *P.NAMES] if all(p in ev for ev in evs)]
    keys = [("ce_gap", "CE gap"), ("fve", "FVE"), ("explained_variance", "EV (SAEBench)"), ("l0", "L0"),
            ("kl", "KL")]
    lines = [title, "",
             "| phase | " + " | ".join(k[1] for k in keys) + " | gap closed vs the MSE SAE |",
             "|---|" + "---|" * (len(keys) + 1)]
    for p in phases:
        cells = [_mean_sd([ev[p][k] for ev in evs if k in ev[p]]) for k, _ in keys]
        closed = [gap_closed(ev, p) for ev in evs]
        gap = _mean_sd([100 * g for g in closed]) + " %" if all(g is not None for g in closed) else ""
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {gap} |")
    if "control" in phases and "finetune" in phases:
        net = [100 * (gap_closed(ev, "finetune") - gap_closed(ev, "control")) for ev in evs]
        lines += ["", f"KL effect net of the extra tokens (finetune - control): {_mean_sd(net)} % of the MSE SAE's gap"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(seeds_markdown([Path(a) for a in sys.argv[1:]]))
    else:
        print(write_report(sys.argv[1]).read_text())
