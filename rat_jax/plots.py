"""Diagnostic figures as PNG files (matplotlib, Agg backend; no display needed).

Each function takes plain numbers/arrays and an output path, draws one figure with a title, axis
labels and a legend, writes it and returns the path.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_interpolation", "plot_soup_vs_members", "plot_member_scatter",
           "plot_diversity_heatmap"]


def _figure(figsize):
    """A standalone Agg-backed Figure: no pyplot state, so a notebook's backend is left alone."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    return path


def plot_interpolation(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       path: str | os.PathLike, *, metric: str = "accuracy",
                       title: str = "Linear interpolation between members",
                       barriers: Mapping[str, float] | None = None) -> pathlib.Path:
    """One curve per pair: ``curves = {'0 - 1': (alphas, values), ...}`` of `metric` vs α (α=0 is
    the first model of the pair). `barriers` (same keys) are added to the legend entries."""
    if not curves:
        raise ValueError("plot_interpolation: no curve to draw")
    fig, ax = _figure((6.4, 4.4))
    for name, (alphas, values) in curves.items():
        label = str(name)
        if barriers and name in barriers and np.isfinite(barriers[name]):
            label += f" (barrier {barriers[name]:.3f})"
        ax.plot(np.asarray(alphas, float), np.asarray(values, float), marker="o", ms=3,
                label=label)
    ax.set_xlabel("interpolation coefficient α  ((1-α)·θ_a + α·θ_b)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="pair (a - b)")
    return _save(fig, path)


def plot_soup_vs_members(uniform: Sequence[float], greedy: Sequence[float],
                         path: str | os.PathLike, *, metric: str = "accuracy",
                         title: str = "Soup accuracy vs number of averaged members",
                         greedy_counts: Sequence[int] | None = None,
                         best_member: float | None = None) -> pathlib.Path:
    """`uniform[k-1]` / `greedy[k-1]`: `metric` of the soup of the first k members in uniform
    order (by ID-val score) / greedy order. `greedy_counts` overrides the x values of the greedy
    curve (e.g. the number of members kept after each greedy candidate); `best_member` draws the
    best single member as a horizontal line."""
    fig, ax = _figure((6.4, 4.4))
    if len(uniform):
        ax.plot(np.arange(1, len(uniform) + 1), np.asarray(uniform, float), marker="o",
                label="uniform soup (members in score order)")
    if len(greedy):
        xs = (np.asarray(greedy_counts, float) if greedy_counts is not None
              else np.arange(1, len(greedy) + 1))
        ax.plot(xs, np.asarray(greedy, float), marker="s", label="greedy soup")
    if best_member is not None:
        ax.axhline(float(best_member), color="gray", ls="--", label="best single member")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of averaged members")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_member_scatter(id_val: Sequence[float], ood_test: Sequence[float],
                        path: str | os.PathLike, *,
                        soups: Mapping[str, tuple[float, float]] | None = None,
                        groups: Mapping[str, Sequence[int]] | None = None,
                        title: str = "Members: ID validation vs OOD test accuracy") -> pathlib.Path:
    """One point per member (colored by init-source group when `groups` is given) and one marked
    point per soup: ``soups = {'uniform': (id_val, ood_test), 'greedy': (...)}``."""
    id_val, ood_test = np.asarray(id_val, float), np.asarray(ood_test, float)
    fig, ax = _figure((6.0, 5.0))
    if groups:
        for g, idx in groups.items():
            idx = np.asarray(list(idx), int)
            ax.scatter(id_val[idx], ood_test[idx], s=28, alpha=0.8, label=f"members: {g}")
    else:
        ax.scatter(id_val, ood_test, s=28, alpha=0.8, label="members")
    markers = ["*", "P", "X", "D", "^", "v"]
    for k, (name, (x, y)) in enumerate((soups or {}).items()):
        ax.scatter([x], [y], s=180, marker=markers[k % len(markers)], edgecolor="black",
                   zorder=3, label=f"soup: {name}")
    ax.set_xlabel("ID validation accuracy")
    ax.set_ylabel("OOD test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_diversity_heatmap(matrix, path: str | os.PathLike, *,
                           labels: Sequence[str] | None = None,
                           metric: str = "prediction disagreement",
                           title: str = "Pairwise diversity between members") -> pathlib.Path:
    """[M, M] heat-map of a pairwise measure (non-finite cells blank, marked inf/nan), member
    labels on both axes (e.g. 'm3 aux:textures'); the color bar is labelled with `metric`."""
    mat = np.asarray(matrix, float)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"plot_diversity_heatmap: need a square matrix, got {mat.shape}")
    m = mat.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(m)]
    size = max(4.5, 0.45 * m + 2.5)
    fig, ax = _figure((size + 1.2, size))
    shown = np.ma.masked_invalid(mat)
    im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(metric)
    ax.set_xticks(range(m))
    ax.set_yticks(range(m))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticklabels(labels, fontsize="small")
    if m <= 12:
        finite = mat[np.isfinite(mat)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(m):
            for j in range(m):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] < mid else "black")
                else:
                    ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("member")
    ax.set_ylabel("member")
    ax.set_title(title)
    # the color bar (labelled with `metric`) is this figure's legend
    return _save(fig, path)
