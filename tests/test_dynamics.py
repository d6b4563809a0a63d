"""`rlsparsity dynamics` against brute force on a hand-made sequence of masks."""

from __future__ import annotations

import numpy as np
import pytest

from rlsparsity.analysis.dynamics import dynamics_from_dir, write_outputs
from rlsparsity.cli import main
from rlsparsity.contracts.mask import MaskError, MaskWriter

SHAPES = {"model.layers.0.mlp.up_proj.weight": (6, 5), "model.layers.1.self_attn.q_proj.weight": (4, 4),
          "model.norm.weight": (7,)}
BASE = {"id": "hand", "hash": "h0"}


def _write(folder, step, masks, final=False):
    path = folder / ("final.arrow" if final else f"step_{step:06d}.arrow")
    with MaskWriter(path, criterion={"mode": "bitwise"}, dtype="bfloat16", base=BASE, target={"step": step}) as w:
        for name, m in masks.items():
            w.add(name, SHAPES[name], m)


def _views(seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    """bf16 'views' (small ints) after each optimizer step: θ0, then random moves, some back."""
    rng = np.random.default_rng(seed)
    views = [{n: rng.integers(0, 4, size=s) for n, s in SHAPES.items()}]
    for _ in range(steps):
        views.append({n: np.where(rng.random(s) < 0.3, rng.integers(0, 4, size=s), v) for (n, s), v in
                      zip(SHAPES.items(), views[-1].values(), strict=True)})
    return views


def test_dynamics_equal_brute_force(tmp_path):
    views, every = _views(0, 9), 3  # mask steps 3, 6, 9 (the last is final.arrow)
    root = tmp_path / "masks"
    ever = {n: np.zeros(s, bool) for n, s in SHAPES.items()}
    prev = views[0]
    for step in range(1, 10):
        for n in ever:
            ever[n] |= views[step][n] != views[step - 1][n]
        if step % every == 0:
            final = step == 9
            _write(root, step, {n: views[step][n] != views[0][n] for n in SHAPES}, final)
            _write(root / "since_prev", step, {n: views[step][n] != prev[n] for n in SHAPES}, final)
            _write(root / "ever", step, {n: ever[n].copy() for n in SHAPES}, final)
            prev = views[step]
    dyn = dynamics_from_dir(root, "hand")

    total = sum(int(np.prod(s)) for s in SHAPES.values())
    assert dyn.steps == [3, 6, 9] and dyn.total == total
    cum = [sum(int((views[s][n] != views[0][n]).sum()) for n in SHAPES) for s in (3, 6, 9)]
    assert dyn.sparsity == pytest.approx([1 - c / total for c in cum], rel=1e-14)
    consec = [sum(int((views[b][n] != views[a][n]).sum()) for n in SHAPES) for a, b in ((0, 3), (3, 6), (6, 9))]
    assert dyn.consecutive_changed == pytest.approx([c / total for c in consec], rel=1e-14)
    fin = {n: views[9][n] != views[0][n] for n in SHAPES}
    n_ever = sum(int(e.sum()) for e in ever.values())
    n_fin = sum(int(f.sum()) for f in fin.values())
    assert dyn.ever_changed[-1] == pytest.approx(n_ever / total, rel=1e-14)
    assert (dyn.never, dyn.reverted, dyn.in_final) == ((total - n_ever) / total, (n_ever - n_fin) / total, n_fin / total)
    assert dyn.reverted_of_ever == pytest.approx((n_ever - n_fin) / n_ever, rel=1e-15)
    assert 0 < dyn.reverted < dyn.in_final  # the sequence exercises all three parts
    up = "model.layers.0.mlp.up_proj.weight"
    assert dyn.per_layer["0"] == pytest.approx([1 - (views[s][up] != views[0][up]).sum() / 30 for s in (3, 6, 9)], rel=1e-14)
    assert list(dyn.per_layer) == ["0", "1", "norm"]
    files = write_outputs(dyn, tmp_path / "out")
    assert all(f.stat().st_size > 0 for f in files.values())

    # The CLI reads the same folder and writes the same files.
    assert main(["dynamics", str(root), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "layers.png").is_file()


def test_an_ever_mask_missing_a_final_change_is_refused(tmp_path):
    root = tmp_path / "masks"
    on = {n: np.ones(s, bool) for n, s in SHAPES.items()}
    off = {n: np.zeros(s, bool) for n, s in SHAPES.items()}
    _write(root, 2, on, final=True)
    _write(root / "since_prev", 2, on, final=True)
    _write(root / "ever", 2, off, final=True)
    with pytest.raises(MaskError, match="never changed at a step"):
        dynamics_from_dir(root)
    (root / "ever" / "final.arrow").unlink()
    with pytest.raises(MaskError, match="without training.masks.dynamics"):
        dynamics_from_dir(root)
