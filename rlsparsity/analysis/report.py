"""Terminal tables and plots for overlap results (rich + matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from rlsparsity.analysis.overlap import OverlapResult, pair_metrics, rows_to_table
from rlsparsity.analysis.plotting import pyplot
from rlsparsity.analysis.tables import write_csv


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _obs_chance(obs: float | None, chance: float | None) -> str:
    return f"{_pct(obs)} ({_pct(chance)})"


def pairs_table(result: OverlapResult, *, max_rows: int | None = 200) -> Table:
    """Pairs: A, B, |I_A|, |I_B|, ∩, o_A (chance), o_B (chance), Jaccard (chance)."""
    t = Table(
        title=f"Pairwise overlap of {len(result.labels)} runs, n = {result.n:,} parameters",
        title_justify="left",
    )
    for col in (
        "A",
        "B",
        "|I_A|",
        "|I_B|",
        "∩",
        "o_A (chance)",
        "o_B (chance)",
        "Jaccard (chance)",
    ):
        t.add_column(col, justify="left" if col in ("A", "B") else "right")
    rows = result.pairs()
    for r in rows[:max_rows] if max_rows else rows:
        t.add_row(
            r["a"],
            r["b"],
            f"{r['size_a']:,}",
            f"{r['size_b']:,}",
            f"{r['intersection']:,}",
            _obs_chance(r["o_a"], r["o_a_random"]),
            _obs_chance(r["o_b"], r["o_b_random"]),
            _obs_chance(r["jaccard"], r["jaccard_random"]),
        )
    if max_rows and len(rows) > max_rows:
        t.caption = f"{len(rows) - max_rows} more pairs in the JSON / Arrow output"
    return t


def summary_table(result: OverlapResult) -> Table | None:
    """Table 4: pairs grouped by which factor differs, mean observed vs mean chance."""
    rows = result.summary()
    if not rows:
        return None
    t = Table(
        title="Overlap by what differs (means over pairs; chance in parentheses)",
        title_justify="left",
    )
    for col in (
        "differs",
        "pairs",
        "o_A (chance)",
        "o_B (chance)",
        "Jaccard (chance)",
        "sparsity A / B",
    ):
        t.add_column(col, justify="left" if col == "differs" else "right")
    for r in rows:
        t.add_row(
            r["differs"],
            str(r["pairs"]),
            _obs_chance(r["mean_o_a"], r["mean_o_a_random"]),
            _obs_chance(r["mean_o_b"], r["mean_o_b_random"]),
            _obs_chance(r["mean_jaccard"], r["mean_jaccard_random"]),
            f"{_pct(r['mean_sparsity_a'])} / {_pct(r['mean_sparsity_b'])}",
        )
    return t


def groups_table(result: OverlapResult, level: str) -> Table:
    """Per layer or matrix type: sparsity and mean overlap over all pairs."""
    t = Table(
        title=f"Overlap per {level} (means over runs and pairs; chance in parentheses)",
        title_justify="left",
    )
    for col in (level, "params", "sparsity", "o_A (chance)", "o_B (chance)", "Jaccard (chance)"):
        t.add_column(col, justify="left" if col == level else "right")
    for r in result.group_means(level):
        t.add_row(
            r[level],
            f"{r['numel']:,}",
            _pct(r["sparsity"]),
            _obs_chance(r["mean_o_a"], r["mean_o_a_random"]),
            _obs_chance(r["mean_o_b"], r["mean_o_b_random"]),
            _obs_chance(r["mean_jaccard"], r["mean_jaccard_random"]),
        )
    return t


def print_report(
    result: OverlapResult, console: Console | None = None, *, layers: bool = True
) -> None:
    """Print the pair table, the grouped summary, per-matrix (and per-layer) means and stats."""
    console = console or Console()
    console.print(pairs_table(result))
    summ = summary_table(result)
    if summ is not None:
        console.print(summ)
    if result.tensor_names:
        console.print(groups_table(result, "matrix"))
        if layers:
            console.print(groups_table(result, "layer"))
    s = result.stats
    if s:
        from rich.filesize import decimal

        console.print(
            f"[dim]{s.get('pairs_computed', 0)} pairs computed, {s.get('pairs_cached', 0)} from cache; "
            f"{decimal(int(s.get('bytes_read', 0)))} of masks read in {s.get('seconds', 0):.2f} s "
            f"({decimal(int(s.get('bytes_per_s', 0)))}/s) by {s.get('tasks', 0)} tasks on {s.get('workers', 0)} workers[/dim]"
        )


def heatmap_png(result: OverlapResult, path: str | os.PathLike) -> Path:
    """Pairwise heatmaps: observed Jaccard, and Jaccard relative to its random baseline."""
    plt = pyplot()
    n = len(result.labels)
    counts = result.counts.tolist()
    jac = np.full((n, n), np.nan)
    lift = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            m = pair_metrics(counts[i], counts[j], int(result.inter[i, j]), result.n)
            if m["jaccard"] is not None:
                jac[i, j] = m["jaccard"]
            if m["jaccard"] is not None and m["jaccard_random"] and i != j:
                # The diagonal (a run against itself) is left out: its ratio, 1 / J_random,
                # would set the colour scale and flatten every real pair.
                lift[i, j] = m["jaccard"] / m["jaccard_random"]
    size = max(6.0, min(24.0, 0.35 * n + 4))
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
    panels = (
        (jac, "Jaccard |A∩B| / |A∪B|", "viridis"),
        (lift, "Jaccard / random-set Jaccard (pairs only)", "magma"),
    )
    for ax, (mat, title, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(mat, cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(range(n), result.labels, rotation=90, fontsize=max(4, 10 - n // 8))
        ax.set_yticks(range(n), result.labels, fontsize=max(4, 10 - n // 8))
        fig.colorbar(im, ax=ax, shrink=0.8)
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    if not np.isnan(mat[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{mat[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="w",
                        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layers_png(result: OverlapResult, path: str | os.PathLike) -> Path:
    """Per-layer and per-matrix-type overlap (mean Jaccard over pairs) against chance."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    for ax, level in zip(axes, ("layer", "matrix"), strict=True):
        rows = result.group_means(level)
        names = [r[level] for r in rows]
        obs = [np.nan if r["mean_jaccard"] is None else r["mean_jaccard"] for r in rows]
        chance = [
            np.nan if r["mean_jaccard_random"] is None else r["mean_jaccard_random"] for r in rows
        ]
        x = np.arange(len(names))
        if level == "layer":
            ax.plot(x, obs, "o-", label="observed")
            ax.plot(x, chance, "s--", label="random sets of the same sizes")
        else:
            ax.bar(x - 0.2, obs, 0.4, label="observed")
            ax.bar(x + 0.2, chance, 0.4, label="random sets of the same sizes")
        ax.set_xticks(x, names, rotation=90 if len(names) > 12 else 0, fontsize=8)
        ax.set_ylabel("mean Jaccard over pairs")
        ax.set_title(f"Overlap per {level}")
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: OverlapResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every table (Arrow IPC), result.json and the two plots into ``out_dir``."""
    import json

    import pyarrow as pa

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def arrow(name: str, table: pa.Table) -> None:
        p = out / name
        with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        files[name] = p

    arrow("pairs.arrow", result.to_arrow("pair"))
    if result.tensor_names:
        arrow("layers.arrow", result.to_arrow("layer"))
        arrow("matrices.arrow", result.to_arrow("matrix"))
        arrow("tensors.arrow", result.to_arrow("tensor"))
    summ = result.summary()
    if summ:
        arrow("summary.arrow", rows_to_table(summ))
        files["summary.csv"] = write_csv(_summary_rows(summ), out / "summary.csv")
    files["pairs.csv"] = write_csv(_pair_rows(result.pairs()), out / "pairs.csv")
    p = out / "result.json"
    p.write_text(json.dumps(result.to_json(), indent=1, default=json_default))
    files["result.json"] = p
    files["heatmap.png"] = heatmap_png(result, out / "heatmap.png")
    if result.tensor_names:
        files["layers.png"] = layers_png(result, out / "layers.png")
    return files


def json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _summary_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 4 as the MLflow UI previews it: each observed mean beside its chance value, in %."""
    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 3)

    rows = []
    for r in summary:
        row: dict[str, Any] = {"what differs": r["differs"], "pairs": r["pairs"]}
        for key, name in (("o_a", "o_A"), ("o_b", "o_B"), ("jaccard", "Jaccard")):
            row[f"{name} %"], row[f"{name} chance %"] = pct(r[f"mean_{key}"]), pct(r[f"mean_{key}_random"])
        row["sparsity A %"], row["sparsity B %"] = pct(r["mean_sparsity_a"]), pct(r["mean_sparsity_b"])
        rows.append(row)
    return rows


def _pair_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("a", "b", "size_a", "size_b", "intersection", "o_a", "o_a_random", "o_b", "o_b_random",
            "jaccard", "jaccard_random")
    return [{k: p[k] for k in keys} for p in pairs]
