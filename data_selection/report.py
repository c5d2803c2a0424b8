"""report.png: a 2-D projection of the instruction embeddings coloured by cluster (chosen records
ringed) beside per-cluster bars of CDS and allocation; methods without clusters get a histogram of
their score, or the size of the selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_report(selection, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot, report = selection.plot, selection.report
    title = f"{report.get('method', '?')}: {len(selection.records)} of {report.get('pool_size', '?')} records"
    if plot.coords is not None and plot.labels is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
        k = int(plot.labels.max()) + 1
        cmap = plt.get_cmap("tab20" if k > 10 else "tab10")
        show = _thin(len(plot.labels), 20000)
        left.scatter(plot.coords[show, 0], plot.coords[show, 1], color=cmap(plot.labels[show] % cmap.N), s=4,
                     alpha=0.6, linewidths=0)
        if plot.selected is not None and len(plot.selected):
            sel = plot.selected[_thin(len(plot.selected), 5000)]
            left.scatter(plot.coords[sel, 0], plot.coords[sel, 1], facecolors="none", edgecolors="black", s=10,
                         linewidths=0.4, label="selected")
            left.legend(loc="best", fontsize=8)
        left.set_title("instructions (PCA of embeddings), coloured by cluster")
        x = np.arange(len(plot.cds))
        right.bar(x - 0.2, plot.cds, width=0.4, color=[cmap(i % cmap.N) for i in x], edgecolor="black",
                  label="CDS (mean JSD)")
        right.set_ylabel("cluster degradation score (nats)")
        right.set_xlabel("cluster")
        twin = right.twinx()
        twin.bar(x + 0.2, plot.allocation, width=0.4, color="white", edgecolor="black", hatch="//",
                 label="selected")
        twin.set_ylabel("records selected")
        handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        right.legend(handles, ["CDS (mean JSD), cluster colour", "records selected"], loc="upper left",
                     fontsize=8, framealpha=0.9)
        right.set_xticks(x if len(x) <= 30 else x[::max(1, len(x) // 15)])
        right.set_title("degradation and budget per cluster")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if plot.scores is not None:
            ax.hist(plot.scores, bins=50, alpha=0.6, label="pool")
            if plot.selected is not None and len(plot.selected):
                ax.hist(plot.scores[plot.selected], bins=50, alpha=0.6, label="selected")
            ax.set_xlabel(plot.score_name)
            ax.legend()
        else:
            ax.bar(["pool", "selected"], [report.get("pool_size", 0), len(selection.records)],
                   color=["tab:gray", "tab:blue"])
            ax.set_ylabel("records")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _thin(n: int, limit: int) -> np.ndarray:
    """Evenly spaced indices: a scatter of 60k points says nothing more than one of 20k."""
    return np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)
