"""PNG pictures of analysis results, returned as bytes.

Figures are made with matplotlib's object API, not pyplot: no global figure state, so jobs in
threads cannot trip over each other, and no GUI backend. matplotlib is imported on the first plot,
which keeps its import off the server's start-up.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    """A figure and a row of `ncols` axes (an array of shape (1, ncols))."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols, squeeze=False)


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def line_plot(curves: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> bytes:
    fig, axes = new_figure(6.4, 4)
    ax = axes[0, 0]
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return to_png(fig)


def loyalty_plot(loyalty: dict[str, dict[str, dict[str, dict[str, float]]]], title: str) -> bytes:
    """loyalty[metric][first|last][label|random][k] → one panel per metric, a line per (where, what)."""
    fig, axes = new_figure(5.2 * len(loyalty), 4, len(loyalty))
    for ax, (metric, by_where) in zip(axes[0], loyalty.items(), strict=True):
        for where, by_what in by_where.items():
            for what, by_k in by_what.items():
                ks = sorted(by_k, key=int)
                ax.plot([int(k) for k in ks], [by_k[k] for k in ks], marker="o",
                        linestyle="-" if where == "first" else "--", label=f"{what} words, {where} layers")
            ax.set_xticks([int(k) for k in ks])
        ax.set(xlabel="isolated layers (k)", ylabel=f"{metric.replace('_', ' ')} (%)", ylim=(0, 102), title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    return to_png(fig)


def auc_plot(auc: Sequence[float], r: Sequence[float], title: str, note: str | None = None) -> bytes:
    """AUCROC_l (dashed, left axis) and R_l (solid, right axis) against the layer, as in the paper;
    `note` is written across the axes (why there is nothing to draw, say)."""
    fig, axes = new_figure(6.4, 4)
    ax = axes[0, 0]
    layers = range(len(auc))
    ax.plot(layers, auc, "--", color="tab:blue", label="AUCROC_l")
    ax.set(xlabel="layer", ylabel="AUCROC_l", title=title)
    if note:
        ax.set_xlim(0, max(len(auc) - 1, 1))
        ax.text(0.5, 0.5, textwrap.fill(note, 48), transform=ax.transAxes, ha="center", va="center",
                bbox={"facecolor": "white", "edgecolor": "grey"})
    ax.axhline(0.5, color="grey", linewidth=0.5)
    twin = ax.twinx()
    twin.plot(layers, r, "-", color="tab:red", label="R_l")
    twin.set_ylabel("R_l")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    return to_png(fig)


def heatmaps(matrices: dict[str, np.ndarray], labels: Sequence[str], title: str) -> bytes:
    fig, axes = new_figure(5 * len(matrices), 4.4, len(matrices))
    for ax, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        finite = matrix[np.isfinite(matrix)]
        image = ax.imshow(matrix, cmap="viridis", vmin=finite.min() if finite.size else 0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(name)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return to_png(fig)
