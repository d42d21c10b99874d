"""A sweep's report (`jaxsae.report` calls it when eval.json maps each phase to its members): a table of every
member's CE gap per phase, the share of the MSE SAE's gap each later phase closes, and the paper's main
figure: CE-gap change against k for the fine-tune, its MSE-only control and e2e, with seed error bars and
the paper's points beside them.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from jaxsae import phases as P

# PAPER.md "Results to compare against": CE-gap change vs the MSE SAE, Gemma-2-2B TopK 16k, by k.
PAPER_GEMMA = {"finetune": {20: -47, 40: -28, 80: -25, 160: -3}, "e2e": {20: -54, 40: -28, 80: -15, 160: 9}}
PAPER_PYTHIA = {"finetune": {80: -31}, "e2e": {80: -28}}  # Pythia-160M TopK (k=80)


def is_sweep(ev: dict) -> bool:
    """Whether eval.json is a sweep's (phase -> member name -> metrics)."""
    return bool(ev) and all(isinstance(m, dict) and m and all(isinstance(v, dict) for v in m.values())
                            for m in ev.values())


def member_values(run_dir: Path) -> dict[str, dict]:
    """Member name -> the config values it sets ({"sae.k": 16, "mse.seed": 0}), from config.yaml."""
    from jaxsae.config import load_config
    from jaxsae.sweep import member_config, members

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return {}
    cfg = load_config(base=yaml.safe_load(cfg_path.read_text()))
    ms = members(cfg)
    wide = any(k == "sae.d_sae" for m in ms for k, _ in m.values)  # then every member names its width
    return {m.name: {**dict(m.values), **({"sae.d_sae": member_config(cfg, m).sae.d_sae} if wide else {})}
            for m in ms}


def change(ev: dict, phase: str, name: str) -> float | None:
    """% change of member `name`'s CE gap after `phase` against its MSE SAE's (negative: closed)."""
    if "mse" not in ev or phase not in ev or name not in ev[phase] or ev["mse"][name]["ce_gap"] <= 0:
        return None
    return 100.0 * (ev[phase][name]["ce_gap"] / ev["mse"][name]["ce_gap"] - 1.0)


def _k_groups(ev: dict, values: dict[str, dict]) -> dict[tuple[int, int], list[str]]:
    """(width, k) -> the members of that width at that k (several when seeds or other keys are swept too);
    width is 0 unless the sweep varies sae.d_sae."""
    names = list(next(iter(ev.values())))
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n in names:
        v = values.get(n, {})
        groups[(int(v.get("sae.d_sae", 0)), int(v.get("sae.k", ev[next(iter(ev))][n]["l0"])))].append(n)
    return dict(sorted(groups.items()))


def _widths(rows: list[dict]) -> list[int]:
    return sorted({r["width"] for r in rows})


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(ev: dict, values: dict[str, dict]) -> list[dict]:
    """One row per k: per later phase, the mean ± sd (over the members at that k) of its CE-gap change."""
    rows = []
    for (width, k), names in _k_groups(ev, values).items():
        row = {"width": width, "k": k, "n": len(names), "mse_gap": _mean_sd([ev["mse"][n]["ce_gap"] for n in names])}
        for phase in [p.name for p in P.PHASES if p.name in ev and p.name != "mse"]:
            ch = [change(ev, phase, n) for n in names]
            if all(c is not None for c in ch):
                row[phase] = _mean_sd(ch)
        if "finetune" in row and "control" in row:
            row["net"] = _mean_sd([change(ev, "finetune", n) - change(ev, "control", n) for n in names])
        rows.append(row)
    return rows


def markdown(run_dir: Path, ev: dict) -> str:
    values = member_values(run_dir)
    phases = [p.name for p in P.PHASES if p.name in ev]
    names = list(ev[phases[0]])
    how = "one program per width" if any("sae.d_sae" in v for v in values.values()) else "one program"
    lines = [f"# Sweep report: {run_dir.name}", "", f"{len(names)} SAEs trained as {how}; held-out CE gap "
             "(CE spliced − CE clean, nats/token) after each phase.", "",
             "| SAE | " + " | ".join(f"{p} gap | {p} L0" for p in phases) + " |", "|---|" + "---|---|" * len(phases)]
    for n in names:
        cells = [f"{ev[p][n]['ce_gap']:.4f} | {ev[p][n]['l0']:.1f}" if n in ev[p] else " | " for p in phases]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    later = [p for p in phases if p != "mse"]
    rows = table(ev, values)
    wide = _widths(rows) != [0]  # the sweep varies the width: one row per width and k
    lines += ["", "CE-gap change against each SAE's MSE-only state, mean ± sd over the SAEs at each "
              + ("width and k" if wide else "k") + " (n of them) (negative: the gap shrank); the paper's "
              "Gemma-2-2B TopK 16k fine-tune / e2e beside it.", "",
              ("| d_sae " if wide else "") + "| k | n | MSE gap | " + " | ".join(later)
              + (" | finetune − control" if "control" in later else "") + " | paper fine-tune / e2e |",
              ("|---" if wide else "") + "|---|---|---|" + "---|" * len(later) + ("---|" if "control" in later else "")
              + "---|"]
    for row in rows:
        def pct(ms, n=row["n"]):  # one SAE at this k has no spread to show
            return f"{ms[0]:+.1f} ± {ms[1]:.1f}%" if n > 1 else f"{ms[0]:+.1f}%"

        cells = [pct(row[p]) if p in row else "" for p in later]
        if "control" in later:
            cells.append(pct(row["net"]) if "net" in row else "")
        k = row["k"]
        paper = (f"{PAPER_GEMMA['finetune'][k]:+d}% / {PAPER_GEMMA['e2e'][k]:+d}%" if k in PAPER_GEMMA["finetune"]
                 else "")
        lines.append((f"| {row['width']} " if wide else "") + f"| {k} | {row['n']} | {row['mse_gap'][0]:.4f} | "
                     + " | ".join(cells) + f" | {paper} |")
    lines += ["", "![CE-gap change against k](report.png)", ""]
    return "\n".join(lines)


def plot(run_dir: Path, ev: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = member_values(run_dir)
    rows = table(ev, values)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = {p.name: p.color for p in P.PHASES}
    widths = _widths(rows)
    styles = ["-", "-.", (0, (5, 1)), (0, (1, 1))]  # one per width (a sweep over widths)

    def tag(w):
        return "" if w == 0 else f", d_sae {w}"

    for wi, w in enumerate(widths):
        for phase in [p.name for p in P.PHASES if p.name != "mse"]:
            pts = [(r["k"], *r[phase]) for r in rows if phase in r and r["width"] == w]
            if pts:
                ks, mean, sd = zip(*pts)
                ax1.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, color=colors[phase],
                             ls=styles[wi % len(styles)], label=f"{phase}{tag(w)} (this run)")
        net = [(r["k"], *r["net"]) for r in rows if "net" in r and r["width"] == w]
        if net:  # the KL effect net of the extra tokens
            ks, mean, sd = zip(*net)
            ax1.errorbar(ks, mean, yerr=sd, marker="o", ls=":", capsize=3, color=colors["finetune"],
                         label=f"finetune − control{tag(w)} (this run)")
    for phase, marker in (("finetune", "s"), ("e2e", "^")):
        ks, vals = zip(*PAPER_GEMMA[phase].items())
        ax1.plot(ks, vals, ls="--", marker=marker, color=colors[phase], alpha=0.45, label=f"{phase}, paper Gemma-2-2B")
        ax1.scatter(list(PAPER_PYTHIA[phase]), list(PAPER_PYTHIA[phase].values()), marker="*", s=120,
                    color=colors[phase], alpha=0.45, label=f"{phase}, paper Pythia-160M")
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set(xscale="log", xlabel="k (active latents per token)", ylabel="CE-gap change vs the MSE SAE (%)",
            title="what each phase does to the MSE SAE's CE gap")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    for wi, w in enumerate(widths):
        for phase in [p.name for p in P.PHASES if p.name in ev]:
            pts = [(r["k"], statistics.mean(ev[phase][n]["ce_gap"] for n in names))
                   for r, names in zip(rows, _k_groups(ev, values).values()) if r["width"] == w]
            ax2.plot(*zip(*pts), marker="o", color=colors[phase], ls=styles[wi % len(styles)], label=phase + tag(w))
    ax2.set(xscale="log", xlabel="k", ylabel="CE spliced − CE clean (nats)", title="held-out CE gap")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}: {len(next(iter(ev.values())))} SAEs in "
                 + ("one program per width" if widths != [0] else "one program"))
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)


def write(run_dir: Path) -> Path:
    ev = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "report.md").write_text(markdown(run_dir, ev))
    plot(run_dir, ev)
    return run_dir / "report.md"
