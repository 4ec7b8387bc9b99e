"""PNG pictures of analysis results (matplotlib, headless Agg backend), returned as bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def line_plot(curves: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def loyalty_plot(loyalty: dict[str, dict[str, dict[str, dict[str, float]]]], title: str) -> bytes:
    """loyalty[metric][first|last][label|random][k] → one panel per metric, a line per (where, what)."""
    fig, axes = plt.subplots(1, len(loyalty), figsize=(5.2 * len(loyalty), 4), squeeze=False)
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
    return _png(fig)


def auc_plot(auc: Sequence[float], r: Sequence[float], title: str) -> bytes:
    """AUCROC_l (dashed, left axis) and R_l (solid, right axis) against the layer, as in the paper."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    layers = range(len(auc))
    ax.plot(layers, auc, "--", color="tab:blue", label="AUCROC_l")
    ax.set(xlabel="layer", ylabel="AUCROC_l", title=title)
    ax.axhline(0.5, color="grey", linewidth=0.5)
    twin = ax.twinx()
    twin.plot(layers, r, "-", color="tab:red", label="R_l")
    twin.set_ylabel("R_l")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    return _png(fig)


def heatmaps(matrices: dict[str, np.ndarray], labels: Sequence[str], title: str) -> bytes:
    fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 4.4), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(matrix, cmap="viridis", vmin=np.nanmin(matrix), vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(name)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return _png(fig)
