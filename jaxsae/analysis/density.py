"""Feature density: the fraction of analysed tokens on which each feature fires (activation > 0).

The histogram is over log10(density) of the features that fired at least once; the ones that never
fired over the analysed tokens cannot sit on a log axis and are counted in the title instead. The
requested features are marked with their indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DensityCounter:
    """Accumulates per-feature firing counts i32[d_sae] over batches of counted positions."""

    def __init__(self, d_sae: int):
        self.fired = np.zeros(d_sae, np.int64)
        self.tokens = 0

    def update(self, fired: np.ndarray, n_tokens: int) -> None:
        self.fired += np.asarray(fired, np.int64)
        self.tokens += int(n_tokens)

    @property
    def density(self) -> np.ndarray:
        """f64[d_sae]: fired / tokens."""
        return self.fired / max(self.tokens, 1)


def plot_density(density: np.ndarray, n_tokens: int, marked: list[int], path: Path, title: str = "") -> Path:
    """Writes a log10-density histogram png with the `marked` features drawn as labelled lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = density > 0
    fig, ax = plt.subplots(figsize=(8, 4.2))
    logd = np.log10(density[live])
    if logd.size:
        lo = min(logd.min(), -0.01)
        ax.hist(logd, bins=np.linspace(np.floor(lo * 4) / 4, 0, 41), color="tab:blue", alpha=0.8)
    for i, f in enumerate(marked):
        if density[f] > 0:
            x = np.log10(density[f])
            ax.axvline(x, color="tab:red", lw=1, ls="--")
            ax.annotate(str(f), (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=8, color="tab:red", xytext=(0, -2 - 10 * (i % 3)),
                        textcoords="offset points")
    dead = int((~live).sum())
    ax.set(xlabel="log10(fraction of tokens on which the feature fires)", ylabel="features",
           title=(f"{title}: " if title else "") + f"{live.sum()} live, {dead} never fired in {n_tokens:,} tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
