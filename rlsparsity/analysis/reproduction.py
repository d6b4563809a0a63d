"""`rlsparsity report`: one reproduction report from the runs of some experiments.

For every claim of `analysis.claims`: the published number, the measured one per setting
(mean and spread over seeds), the rule and the verdict; claims whose experiments were not
run are listed as not run. Figures: sparsity by arm and learning rate, the precision ×
optimizer × learning-rate grid, sparsity over mask steps, overlap against chance. The
RQ2/RQ3 closeness table joins when a subnetwork study ran. Written as markdown plus PNGs
into a folder, and logged as an MLflow run (kind `report`).
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlsparsity.analysis.claims import (
    SPARSITY,
    Verdict,
    by_setting,
    evaluate,
    model_name,
    setting_text,
    standard,
)
from rlsparsity.analysis.evidence import Evidence, Trial, gather
from rlsparsity.analysis.plotting import pyplot

REPORT_FILE = "REPRODUCTION.md"


@dataclass
class Report:
    path: Path  # the markdown file
    verdicts: list[Verdict]
    figures: list[Path]


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------- figures


def fig_arms(trials: list[Trial], path: Path) -> Path | None:
    """Sparsity at abs:1e-5 per arm (variant, else algorithm), one bar group per learning rate."""
    trials = [t for t in standard(trials) if not t.subnetwork]
    if not trials:
        return None
    arms = sorted({t.variant if t.variant != "None" else t.algorithm for t in trials})
    lrs = sorted({(t.param("training.lr"), t.param("training.steps")) for t in trials}, key=lambda x: (float(x[0]), int(x[1] or 0)))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms) + 2), 4.2), constrained_layout=True)
    width = 0.8 / len(lrs)
    for i, lr in enumerate(lrs):
        means, lo, hi = [], [], []
        for arm in arms:
            vals = [t.get(SPARSITY) for t in trials if (t.param("training.lr"), t.param("training.steps")) == lr
                    and (t.variant if t.variant != "None" else t.algorithm) == arm]
            vals = [v for v in vals if not math.isnan(v)]
            m = statistics.fmean(vals) if vals else math.nan
            means.append(100 * m)
            lo.append(100 * (m - min(vals)) if vals else 0)
            hi.append(100 * (max(vals) - m) if vals else 0)
        ax.bar(np.arange(len(arms)) + (i - (len(lrs) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=2,
               label=f"lr {float(lr[0]):g}, {lr[1]} steps")
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel("sparsity at abs:1e-5 (% unchanged)")
    ax.set_ylim(0, 100)
    ax.axhspan(68.5, 96.0, color="grey", alpha=0.15, label="paper, Table 1 (RL)")
    ax.legend(fontsize=8)
    ax.set_title("Sparsity of the final bf16 weights by arm (bars: min–max over seeds)", fontsize=10)
    return _save(fig, path)


def precision_trials(ev: Evidence) -> list[Trial]:
    """The GRPO trials of the experiments that vary precision or optimizer (precision.yaml and
    its runs on other models): the precision figure and table read these alone, so that
    other presets' GRPO arms (variants, 200 steps) do not blend into their cells."""
    varied = {e for e in ev.experiments
              if len({(t.param("training.precision"), t.param("training.optimizer")) for t in ev.trials if t.experiment == e}) > 1}
    return [t for t in ev.trials if t.experiment in varied and t.algorithm == "grpo" and not t.subnetwork]


def _precision_row_label(row: tuple, several: list[bool]) -> str:
    model, steps, precision, optimizer = row
    named = [model_name(str(model)) if several[0] else None,
             f"{steps} steps" if several[1] else None, precision, optimizer]
    return ", ".join(x for x in named if x)


def fig_precision(trials: list[Trial], path: Path) -> Path | None:
    """Heatmaps over (precision, optimizer) × learning rate: bf16 sparsity and test accuracy gain
    (`precision_trials`; one row per model and step count as well when those vary)."""
    def row(t: Trial) -> tuple:
        return (t.param("model"), t.param("training.steps"), t.param("training.precision"), t.param("training.optimizer"))

    rows = sorted({row(t) for t in trials})
    lrs = sorted({t.param("training.lr") for t in trials}, key=float)
    if len({r[2:] for r in rows}) < 2:
        return None
    several = [len({r[i] for r in rows}) > 1 for i in range(2)]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13 if any(several) else 11, 0.6 * len(rows) + 2.2), constrained_layout=True)
    for ax, (key, title, cmap, lim) in zip(axes, (
        ("final/sparsity_bf16", "bf16 sparsity (% unchanged)", "viridis", (0, 100)),
        ("gain", "test accuracy gain, points", "RdBu", (-10, 10)),
    ), strict=True):
        grid = np.full((len(rows), len(lrs)), np.nan)
        for i, key_row in enumerate(rows):
            for j, lr in enumerate(lrs):
                group = [t for t in trials if row(t) == key_row and t.param("training.lr") == lr]
                if key == "gain":
                    vals = [t.get("test_accuracy_after") - t.get("test_accuracy_before") for t in group]
                else:
                    vals = [t.get(key) for t in group]
                vals = [v for v in vals if not math.isnan(v)]
                if vals:
                    grid[i, j] = 100 * statistics.fmean(vals)
        im = ax.imshow(grid, cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto")
        for i in range(len(rows)):
            for j in range(len(lrs)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="w" if (abs(grid[i, j]) > 6 if key == "gain" else grid[i, j] < 60) else "k")
        ax.set_xticks(range(len(lrs)), [f"lr {float(x):g}" for x in lrs])
        ax.set_yticks(range(len(rows)), [_precision_row_label(r, several) for r in rows])
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("GRPO: precision × optimizer × learning rate (mean over seeds)", fontsize=10)
    return _save(fig, path)


def fig_dynamics(trials: list[Trial], path: Path) -> Path | None:
    trials = [t for t in standard(trials) if len(t.history.get("sparsity_bf16", [])) >= 6]
    if not trials:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for setting, group in by_setting(trials, ["algorithm"]).items():
        s = dict(setting)
        name = f"{s['algorithm']}, lr {s['training.lr']}"
        for ax, key in zip(axes, ("sparsity_bf16", "changed_frac_since_prev"), strict=True):
            curves = [t.history.get(key, []) for t in group]
            steps = [x for x, _ in curves[0]]
            if all([x for x, _ in c] == steps for c in curves):
                ax.plot(steps, [100 * statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))], "o-", ms=2,
                        label=name)
    axes[0].set_ylabel("bf16 sparsity (% unchanged vs θ0)")
    axes[1].set_ylabel("% changed since the previous mask step")
    axes[1].axhline(7, color="grey", ls="--", lw=1, label="paper: about 7 %")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dynamics over mask steps (mean over seeds)", fontsize=10)
    return _save(fig, path)


def fig_overlap(verdicts: list[Verdict], path: Path) -> Path | None:
    rows = [(v.claim.id, m) for v in verdicts if v.claim.id.startswith("T4-") for m in v.measurements]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.2), constrained_layout=True)
    x = np.arange(len(rows))
    ax.bar(x - 0.3, [100 * m.numbers["o_a"] for _, m in rows], 0.2, label="o_A")
    ax.bar(x - 0.1, [100 * m.numbers["o_a_chance"] for _, m in rows], 0.2, label="o_A chance")
    ax.bar(x + 0.1, [100 * m.numbers["o_b"] for _, m in rows], 0.2, label="o_B")
    ax.bar(x + 0.3, [100 * m.numbers["o_b_chance"] for _, m in rows], 0.2, label="o_B chance")
    ax.set_xticks(x, [f"{cid.removeprefix('T4-')}\nlr {m.setting.get('training.lr')}" for cid, m in rows], fontsize=8)
    ax.set_ylabel("% of the update set")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Overlap of runs differing in one factor, against chance", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def _closeness_table(ev: Evidence) -> list[str]:
    rows = [r for c in ev.closeness for r in c.rows]
    if not rows:
        return []
    crits = list(rows[0]["identical"])
    out = ["## RQ2/RQ3: subnetwork-only training (the closeness table)", "",
           "Per full trial and mask: test accuracy (θ0 → full run, masked run), bf16 sparsity of both, the share of "
           "θ_sub's parameters identical to θ_full's per criterion, and the share of the masked run's update set "
           "inside the full run's.", "",
           "| setting | trial | mask | test acc θ0 → full | masked | sparsity full / masked | "
           + " | ".join(f"identical {c}" for c in crits) + " | I_sub ∩ I_full / I_sub |",
           "|---|---|---|---|---|---|" + "---:|" * (len(crits) + 1)]
    for r in sorted(rows, key=lambda r: (str(r["setting"]), r["label"], r["kind"])):
        out.append(f"| {setting_text(r['setting'])} | {r['label']} | {r['kind']} | {r['test_accuracy_theta0']:.3f} → "
                   f"{r['test_accuracy_full']:.3f} | {r['test_accuracy']:.3f} | {_pct(r['sparsity_full'])} / "
                   f"{_pct(r['sparsity'])} % | " + " | ".join(f"{_pct(r['identical'][c])} %" for c in crits)
                   + f" | {_pct(r['overlap_of_sub'])} % |")
    return [*out, ""]


def _precision_table(ev: Evidence) -> list[str]:
    """GRPO by model, precision, optimizer and learning rate: the follow-ups' axes side by side."""
    trials = precision_trials(ev)
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        key = (t.param("model"), t.param("training.precision"), t.param("training.optimizer"), float(t.param("training.lr")),
               t.param("training.steps"))
        groups.setdefault(key, []).append(t)
    if len({k[1:3] for k in groups}) < 2:
        return []
    out = ["## Precision, optimizer and learning rate (GRPO)", "",
           "Means over seeds. bf16 sparsity is the share of the bf16 view unchanged against θ0; \"masters changed\" "
           "the share of master weights that moved at all (bf16 masters under precision bf16); \"vanished\" the share of "
           "the master entries a step moved whose bf16 view stayed put (mean over mask steps; 0 under precision bf16, "
           "where an update too small for the bf16 grid is lost at the step itself).", "",
           "| model | precision | optimizer | lr | steps | seeds | bf16 sparsity | masters changed | vanished per step | test acc θ0 → final |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def mean(vals: list[float]) -> float:
        vals = [v for v in vals if not math.isnan(v)]
        return statistics.fmean(vals) if vals else math.nan

    for (model, prec, opt, lr, steps), ts in sorted(groups.items()):
        vanished = mean([statistics.fmean(v for _, v in t.history["drift/step_update_vanished_frac"])
                         for t in ts if t.history.get("drift/step_update_vanished_frac")])
        out.append(f"| {model_name(model)} | {prec} | {opt} | {lr:g} | {steps} | {len(ts)} | "
                   f"{_pct(mean([t.get('final/sparsity_bf16') for t in ts]))} % | "
                   f"{_pct(mean([t.get('final/changed_frac_masters') for t in ts]))} % | {_pct(vanished)} % | "
                   f"{mean([t.get('test_accuracy_before') for t in ts]):.3f} → {mean([t.get('test_accuracy_after') for t in ts]):.3f} |")
    return [*out, ""]


def _trials_table(ev: Evidence) -> list[str]:
    out = ["## The runs", "", "| experiment | trials | settings |", "|---|---:|---|"]
    for name in ev.experiments:
        ts = [t for t in ev.trials if t.experiment == name]
        settings = sorted({setting_text(dict(t.setting)) for t in ts})
        out.append(f"| {name} | {len(ts)} | {'; '.join(settings) if len(settings) <= 6 else f'{len(settings)} settings'} |")
    models = sorted({t.param("model") for t in ev.trials})
    return [*out, "", f"Models: {', '.join(models) or '—'}.", ""]


def markdown(ev: Evidence, verdicts: list[Verdict], figures: dict[str, Path], *, command: str, tracking_uri: str,
             commit: str) -> str:
    lines = ["# Reproduction report", "",
             f"Generated by `{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC from `{tracking_uri}`"
             f" (code at {commit or 'an unknown commit'}). Built only from runs that exist: a claim whose runs are "
             "absent is *not run*. Each measurement is the mean over seeds with its range; the rule of each verdict "
             "was fixed before the runs. Nothing was tuned to reproduce the paper.", ""]
    if ev.missing:
        lines += [f"Experiments asked for but absent: {', '.join(ev.missing)}.", ""]
    # One row per measurement (a claim's cells on its first): plain rows read the same on
    # GitHub and in MLflow's markdown preview, which shows a cell's <br> as text.
    lines += ["## Claims", "", "| claim | source | published | verdict | setting | measured | passes |",
              "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        claim = [f"**{v.claim.id}** {v.claim.statement}", v.claim.source, v.claim.published, f"**{v.verdict}**"]
        if not v.measurements:
            lines.append("| " + " | ".join([*claim, f"run `{v.claim.presets}`", "—", ""]) + " |")
        for i, m in enumerate(v.measurements):
            passes = "" if m.ok is None else ("yes" if m.ok else "no")
            cells = [*(claim if i == 0 else [""] * 4), setting_text(m.setting) or "—", m.text, passes]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rules (a measurement passes when):", ""]
    lines += [f"- **{v.claim.id}**: {v.claim.rule}." for v in verdicts]
    not_run = [v for v in verdicts if v.verdict == "not run"]
    if not_run:
        lines += ["", "## Not run", ""]
        lines += [f"- **{v.claim.id}** ({v.claim.source}): run `sweeps/paper/{v.claim.presets}.yaml`"
                  if v.claim.presets not in ("all",) else f"- **{v.claim.id}** ({v.claim.source}): no trial measures it"
                  for v in not_run]
    hinge = [v for v in verdicts if v.verdict.startswith("depends on")]
    if hinge:
        lines += ["", "## What the results hinge on", ""]
        lines += [f"- **{v.claim.id}** {v.verdict}: " + "; ".join(
            f"{setting_text(m.setting)}: {'passes' if m.ok else 'fails'}" for m in v.measurements if m.ok is not None)
            for v in hinge]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({p.name})" for name, p in figures.items()]
    lines += ["", *_precision_table(ev), *_closeness_table(ev), *_trials_table(ev)]
    return "\n".join(lines) + "\n"


def write_report(ev: Evidence, out: str | Path, *, command: str, tracking_uri: str, commit: str = "") -> Report:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = evaluate(ev)
    figs = {
        "sparsity by arm": fig_arms(ev.trials, out / "sparsity_by_arm.png"),
        "precision, optimizer and learning rate": fig_precision(precision_trials(ev), out / "precision.png"),
        "dynamics": fig_dynamics(ev.trials, out / "dynamics.png"),
        "overlap against chance": fig_overlap(verdicts, out / "overlap.png"),
    }
    figures = {k: p for k, p in figs.items() if p is not None}
    path = out / REPORT_FILE
    path.write_text(markdown(ev, verdicts, figures, command=command, tracking_uri=tracking_uri, commit=commit))
    return Report(path, verdicts, list(figures.values()))


def report(experiments: Sequence[str], out: str | Path, *, tracking_uri: str, command: str = "",
           log: bool = True, commit: str = "") -> Report:
    """Gather the runs of `experiments`, write the report into `out` and (with `log`) log it
    as an MLflow run of kind `report` in an experiment named `reproduction`."""
    ev = gather(tracking_uri, experiments)
    command = command or "rlsparsity report " + " ".join(experiments)
    result = write_report(ev, out, command=command, tracking_uri=tracking_uri, commit=commit)
    if log:
        _log(result, ev, tracking_uri)
    return result


def _log(result: Report, ev: Evidence, tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from rlsparsity.contracts.mlflow_layout import (
        EXPERIMENT_KIND_TAGS,
        KIND_REPORT,
        KIND_TAG,
        REPORT_DIR,
    )

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("reproduction")
    exp_id = exp.experiment_id if exp else client.create_experiment("reproduction", tags=EXPERIMENT_KIND_TAGS)
    run = client.create_run(exp_id, run_name="report " + " ".join(ev.experiments),
                            tags={KIND_TAG: KIND_REPORT, "rlsparsity.experiments": ",".join(ev.experiments)})
    ok = False
    try:
        for v in result.verdicts:
            client.set_tag(run.info.run_id, f"verdict.{v.claim.id}", v.verdict)
        client.log_artifacts(run.info.run_id, str(result.path.parent), artifact_path=REPORT_DIR)
        ok = True
    finally:
        client.set_terminated(run.info.run_id, "FINISHED" if ok else "FAILED")
