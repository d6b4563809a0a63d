"""A trial's figures for its MLflow run (matplotlib, Agg): where its masks are sparse, how
sparsity moves over steps, and how far weights drifted in units of a bf16 rounding step.

Inputs are plain data (lists and dicts), so the learner and the offline analyses draw the
same pictures from what they hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlsparsity.analysis.plotting import pyplot
from rlsparsity.contracts.layers import group_sort_key


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_matrix_png(
    sparsity: Mapping[str, Mapping[tuple[str, str], float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """One heatmap per series: layers (rows) × matrix types (columns), sparsity in %
    (the share of entries unchanged). ``sparsity[series][(layer, matrix)]`` in [0, 1]."""
    plt = pyplot()
    series = list(sparsity)
    first = sparsity[series[0]]
    layers = sorted({lm[0] for lm in first}, key=group_sort_key)
    matrices = sorted({lm[1] for lm in first})
    h = max(3.0, 0.32 * len(layers) + 1.8)
    cols = min(2, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.5, 0.55 * len(matrices) + 2.5) * cols, h * rows),
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, series, strict=False):
        grid = np.full((len(layers), len(matrices)), np.nan)
        for (layer, matrix), s in sparsity[name].items():
            grid[layers.index(layer), matrices.index(matrix)] = 100 * s
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(matrices)), matrices, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_title(f"{name}: % unchanged", fontsize=10)
        if grid.size <= 240:
            for i in range(len(layers)):
                for j in range(len(matrices)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                                color="w" if grid[i, j] < 60 else "k")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def over_steps_png(
    steps: Sequence[int], curves: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
    ylabel: str = "sparsity (% unchanged)", title: str = "",
) -> Path:
    """Curves over mask steps, one line per series (values in [0, 1], drawn in %)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    for name, ys in curves.items():
        ax.plot(list(steps), [100 * y for y in ys], "o-", ms=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def drift_png(labels: Sequence[str], since_theta0: Sequence[int], last_step: Sequence[int],
              path: str | os.PathLike, *, title: str = "") -> Path:
    """The two drift histograms as % of entries per bin, with the bf16 rounding threshold."""
    plt = pyplot()
    a, b = np.asarray(since_theta0, float), np.asarray(last_step, float)
    a, b = 100 * a / max(a.sum(), 1), 100 * b / max(b.sum(), 1)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 4.2), constrained_layout=True)
    ax.bar(x - 0.2, a, 0.4, label="|θ_t − θ0| (since θ0)")
    ax.bar(x + 0.2, b, 0.4, label="|θ_t − θ_t−1| (the last step's update)")
    threshold = labels.index("[1, 2^1)") - 0.5
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.text(threshold + 0.1, ax.get_ylim()[1] * 0.92, "½ ulp of θ0: the bf16 view changes to the right",
            fontsize=8)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("|Δ| in units of half a bf16 ulp of θ0")
    ax.set_ylabel("% of entries")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def layers_by_steps_png(steps: Sequence[int], per_layer: Mapping[str, Sequence[float]], path: str | os.PathLike,
                        *, title: str = "") -> Path:
    """A layers × steps heatmap of sparsity (% of entries unchanged), layers top to bottom."""
    plt = pyplot()
    layers = sorted(per_layer, key=group_sort_key)
    grid = np.array([[100 * v for v in per_layer[layer]] for layer in layers])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(steps) + 3), max(3.0, 0.3 * len(layers) + 1.5)),
                           constrained_layout=True)
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90 if len(steps) > 12 else 0, fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% unchanged")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
