"""How a trial's subnetwork forms over training (the paper's Figs 5–7), from its masks.

A trial with `training.masks.dynamics` writes, at every mask step, three bf16 masks: the
cumulative one against θ0 (`masks/`), the one against the previous mask step
(`masks/since_prev/`) and the ever-changed one (`masks/ever/`: the entries whose bf16
view changed at any optimizer step so far). From them:

- sparsity over steps (the cumulative mask);
- the share of entries that differ between consecutive mask steps (paper: about 7 %);
- the share of ever-updated entries that end outside the final subnetwork, i.e. back at
  θ0's bf16 value (paper: 8.5 %);
- the three-way split at the end: never updated / updated but back to θ0 / in the final
  subnetwork (paper, PRIME: 72 / 8 / 20 %);
- per-layer sparsity over steps (a layers × steps heatmap).
Counts come from the masks' per-chunk counts; the split is computed from the bits of the
final ever and cumulative masks (and checks that the second lies inside the first).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlsparsity.contracts.layers import group_sort_key, layer_of
from rlsparsity.contracts.mask import Mask, MaskError, check_compatible, read_mask
from rlsparsity.contracts.mlflow_layout import BF16_SLUG, EVER, MASK_DIR, SINCE_PREV, mask_dir

_STEP = re.compile(r"^step_(\d+)\.arrow$")


@dataclass
class Dynamics:
    label: str
    steps: list[int] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)  # cumulative bf16 mask against θ0
    consecutive_changed: list[float] = field(default_factory=list)  # against the previous mask step
    ever_changed: list[float] = field(default_factory=list)
    per_layer: dict[str, list[float]] = field(default_factory=dict)  # layer -> sparsity per step
    never: float = float("nan")  # at the last step: never updated,
    reverted: float = float("nan")  # updated but back at θ0's bf16 value,
    in_final: float = float("nan")  # in the final subnetwork
    total: int = 0

    @property
    def reverted_of_ever(self) -> float:
        """The share of ever-updated entries that end outside the final subnetwork."""
        ever = self.reverted + self.in_final
        return self.reverted / ever if ever else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reverted_of_ever": self.reverted_of_ever}


def _series(root: Path, series: str) -> list[tuple[int, Path]]:
    """(step, file) of a mask series in step order; the final mask's step is in its metadata."""
    folder = root if series == BF16_SLUG else root / series  # as mask_dir lays them out under masks/
    out = [(int(m.group(1)), p) for p in folder.glob("step_*.arrow") if (m := _STEP.match(p.name))]
    final = folder / "final.arrow"
    if final.is_file():
        out.append((int(read_mask(final, verify=False).meta["target"]["step"]), final))
    return sorted(out)


def _per_layer(mask: Mask) -> dict[str, float]:
    acc: dict[str, list[int]] = {}
    for name, (c, n) in mask.per_tensor_counts().items():
        a = acc.setdefault(layer_of(name), [0, 0])
        a[0] += c
        a[1] += n
    return {k: 1 - c / n for k, (c, n) in acc.items()}


def dynamics_from_dir(masks: str | os.PathLike, label: str = "") -> Dynamics:
    """The dynamics of a trial's `masks/` folder (as a trial logs it, or `LocalSink` writes it)."""
    root = Path(masks)
    cum, prev, ever = (_series(root, s) for s in (BF16_SLUG, SINCE_PREV, EVER))
    if not cum:
        raise MaskError(f"{root}: no masks (expected step_NNNNNN.arrow and final.arrow)")
    if not prev or not ever:
        raise MaskError(f"{root}: no {SINCE_PREV}/ or {EVER}/ masks; the trial ran without training.masks.dynamics")
    if [s for s, _ in cum] != [s for s, _ in prev] or [s for s, _ in cum] != [s for s, _ in ever]:
        raise MaskError(f"{root}: the mask series were written at different steps: {[s for s, _ in cum]}, "
                        f"{SINCE_PREV} {[s for s, _ in prev]}, {EVER} {[s for s, _ in ever]}")
    dyn = Dynamics(label or root.parent.name)
    for (step, c), (_, p), (_, e) in zip(cum, prev, ever, strict=True):
        mc, mp, me = read_mask(c), read_mask(p), read_mask(e)
        check_compatible([mc, mp, me], [str(c), str(p), str(e)])
        dyn.steps.append(step)
        dyn.sparsity.append(mc.sparsity)
        dyn.consecutive_changed.append(1 - mp.sparsity)
        dyn.ever_changed.append(1 - me.sparsity)
        for layer, s in _per_layer(mc).items():
            dyn.per_layer.setdefault(layer, []).append(s)
    final, ever_final = read_mask(cum[-1][1]), read_mask(ever[-1][1])
    never = reverted = in_final = 0
    for (name, _, f), (name_e, _, e) in zip(final.iter_tensors(), ever_final.iter_tensors(), strict=True):
        if name != name_e:
            raise MaskError(f"{root}: tensor order differs between {cum[-1][1].name} and {EVER}/{ever[-1][1].name}")
        outside = int(np.count_nonzero(f & ~e))
        if outside:
            raise MaskError(f"{root}: {outside} entries of {name} differ from θ0 but never changed at a step; "
                            "the ever-changed mask is incomplete")
        in_final += int(np.count_nonzero(f))
        reverted += int(np.count_nonzero(e & ~f))
        never += int(np.count_nonzero(~e))
    dyn.total = never + reverted + in_final
    dyn.never, dyn.reverted, dyn.in_final = (x / dyn.total for x in (never, reverted, in_final))
    dyn.per_layer = dict(sorted(dyn.per_layer.items(), key=lambda kv: group_sort_key(kv[0])))
    return dyn


def dynamics_of_run(run_id: str, tracking_uri: str, dest: str | os.PathLike) -> Dynamics:
    """Download a trial run's bf16, since_prev and ever masks into `dest` and analyse them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    dest = Path(dest)
    for series in (BF16_SLUG, SINCE_PREV, EVER):
        folder = mask_dir(series)
        entries = [f.path for f in client.list_artifacts(run_id, folder) if f.path.endswith(".arrow")]
        if not entries:
            raise MaskError(f"run {run_id}: no masks under {folder}/")
        for path in entries:
            client.download_artifacts(run_id, path, str(dest))
    return dynamics_from_dir(dest / MASK_DIR, run.data.tags.get("rlsparsity.label", run_id))


def write_outputs(dyn: Dynamics, out: str | os.PathLike) -> dict[str, Path]:
    """dynamics.json, the layers × steps heatmap and the curves over steps into `out`."""
    from rlsparsity.analysis.trial_plots import layers_by_steps_png, over_steps_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"dynamics.json": out / "dynamics.json"}
    files["dynamics.json"].write_text(json.dumps(dyn.to_json(), indent=1))
    files["curves.png"] = over_steps_png(
        dyn.steps, {"sparsity (cumulative, vs θ0)": dyn.sparsity,
                    "changed since the previous mask step": dyn.consecutive_changed,
                    "ever changed": dyn.ever_changed},
        out / "curves.png", ylabel="% of entries", title=f"{dyn.label}: dynamics of the bf16 view")
    files["layers.png"] = layers_by_steps_png(dyn.steps, dyn.per_layer, out / "layers.png",
                                              title=f"{dyn.label}: sparsity per layer over steps")
    return files
