"""The adapter comparison table from finished `bench/adapters.sh` runs (see bench/adapters.md).

    python bench/adapters_table.py [--runs runs/adapters] [--base runs/demo]

Run directories are named <method>_lr<lr> (e.g. sae_lora_r2_lr1e-2). For every method the table shows the
learning rate with the lowest held-out CE gap, the gap, the reduction of the MSE SAE's gap, and the share of
the SAE fine-tune's gain it recovers, beside the paper's figure; a second table lists every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# method -> (label, paper's figure; PAPER.md "Adapters", Gemma-2-2B 16k TopK, ~30M tokens)
METHODS = {
    "sae_lora_r2": ("LoRA on the SAE, rank 2", "~69% of the fine-tune's gain"),
    "sae_lora_r64": ("LoRA on the SAE, rank 64", "~77% of the fine-tune's gain"),
    "output_r16": ("output adapter, rank 16", "-24% (60% of the fine-tune's -40%)"),
    "output_r16_kl": ("output adapter, rank 16, KL-only loss", "not reported"),
    "output_full": ("output adapter, full rank", "-30% (75% of the fine-tune's -40%)"),
    "output_full_kl": ("output adapter, full rank, KL-only loss", "not reported"),
    "output_mlp_r16": ("output MLP adapter, rank 16", "not reported"),
    "lm_lora_all_r16": ("LoRA on all LM blocks, rank 16 (KL only)", "about the fine-tune's"),
    "lm_lora_after_r16": ("LoRA on the LM blocks after the hook, rank 16", "not reported"),
    "after_ft_output_full": ("fine-tune, then full-rank output adapter", "adds only ~0.0015 nats"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, default=Path("runs/adapters"))
    ap.add_argument("--base", type=Path, default=Path("runs/demo"))
    a = ap.parse_args()
    base = json.loads((a.base / "eval.json").read_text())
    g_mse, g_ft = base["mse"]["ce_gap"], base["finetune"]["ce_gap"]
    runs = {}
    for d in sorted(a.runs.glob("*_lr*")):
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else {}
        if "adapter" in ev:
            method, lr = d.name.rsplit("_lr", 1)
            runs.setdefault(method, []).append((float(lr), ev["adapter"]))

    def row(label, gap, fve, paper, lr=""):
        red = 100 * (gap / g_mse - 1)
        share = 100 * (g_mse - gap) / (g_mse - g_ft)
        return f"| {label} | {lr} | {gap:.4f} | {red:+.1f}% | {share:.0f}% | {fve:.3f} | {paper} |"

    head = ["| method | lr | CE gap | gap change vs MSE SAE | share of fine-tune gain | FVE | paper |",
            "|---|---|---|---|---|---|---|"]
    lines = head + [row("MSE SAE (base)", g_mse, base["mse"]["fve"], "", ""),
                    row("SAE fine-tune (KL+MSE)", g_ft, base["finetune"]["fve"], "-40% (Pythia-160M: -31%)", "3e-3")]
    for method, (label, paper) in METHODS.items():
        if method in runs:
            lr, m = min(runs[method], key=lambda r: r[1]["ce_gap"])
            lines.append(row(label, m["ce_gap"], m["fve"], paper, f"{lr:g}"))
    if "after_ft_output_full" in runs:
        lr, m = min(runs["after_ft_output_full"], key=lambda r: r[1]["ce_gap"])
        lines.append(f"\nAdapter after the fine-tune: CE gap {m['ce_gap']:.4f} vs {g_ft:.4f}, a gain of "
                     f"{g_ft - m['ce_gap']:+.4f} nats beyond the fine-tune "
                     f"(paper: ~0.0015).")
    lines += ["", "Every run:", "", "| run | lr | CE gap | KL | FVE |", "|---|---|---|---|---|"]
    for method, rs in runs.items():
        for lr, m in sorted(rs, key=lambda r: r[0]):
            lines.append(f"| {method} | {lr:g} | {m['ce_gap']:.4f} | {m['kl']:.4f} | {m['fve']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
