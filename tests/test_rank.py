"""Update rank (Table 2 method): per-matrix rank of Δ in float32 as a fraction of min(shape)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlsparsity.analysis.checkpoints import open_checkpoint
from rlsparsity.analysis.diff import diff, plan_diff
from rlsparsity.analysis.rank import delta_rank, skip_reason
from rlsparsity.analysis.rank_checkpoints import update_rank


def _save(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
    return root


@pytest.fixture()
def low_rank_pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(48, 32),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(32),
        "model.embed_tokens.weight": torch.randn(300, 32, generator=g),
        "model.layers.0.mlp.bias": torch.zeros(48),
    }
    target = dict(base)
    # Exactly rank 3 (base is zero, so Δ is the product itself).
    target["model.layers.0.mlp.up_proj.weight"] = torch.randn(48, 3, generator=g) @ torch.randn(3, 32, generator=g)
    # Dense bf16 noise: full rank.
    target["model.layers.0.self_attn.q_proj.weight"] = (base["model.layers.0.self_attn.q_proj.weight"].float() + torch.randn(32, 32, generator=g) * 0.1).bfloat16()
    target["model.layers.0.input_layernorm.weight"] = torch.ones(32) * 1.5
    target["model.layers.0.mlp.bias"] = torch.ones(48)
    return _save(tmp_path / "a", base), _save(tmp_path / "b", target)


def test_skip_rules() -> None:
    assert skip_reason("x.weight", (4,), None) == "1-D, not a matrix"
    assert skip_reason("model.layers.0.post_attention_layernorm.weight", (4, 4), None) == "normalisation weight"
    assert "rank-max-dim 100" in skip_reason("model.embed_tokens.weight", (128, 8), 100)
    assert skip_reason("model.embed_tokens.weight", (128, 8), 0) is None
    assert skip_reason("w", (3, 4, 5), None) == "3-D, not a matrix"


def test_delta_rank_matches_paper_formula() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=g).bfloat16()
    b = (a.float() + torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g) * 0.5).bfloat16()
    assert delta_rank(a, b) == int(torch.linalg.matrix_rank(b.float() - a.float()))
    assert delta_rank(a, a) == 0
    with pytest.raises(ValueError, match="non-finite"):
        delta_rank(torch.zeros(2, 2), torch.full((2, 2), float("nan")))


@pytest.mark.parametrize("workers", [1, 2])
def test_update_rank(low_rank_pair: tuple[Path, Path], workers: int) -> None:
    a, b = (open_checkpoint(p) for p in low_rank_pair)
    plan = plan_diff(a, b)
    res = update_rank([(p.name, p.base, p.target) for p in plan.pairs], max_dim=256, workers=workers)
    ranks = {m.name: (m.rank, m.max_rank) for m in res.matrices}
    assert ranks == {"model.layers.0.mlp.up_proj.weight": (3, 32), "model.layers.0.self_attn.q_proj.weight": (32, 32)}
    assert res.mean == pytest.approx((3 / 32 + 1.0) / 2)
    skipped = {s["name"]: s["reason"] for s in res.skipped}
    assert skipped == {
        "model.embed_tokens.weight": "larger side 300 > --rank-max-dim 256",
        "model.layers.0.input_layernorm.weight": "1-D, not a matrix",
        "model.layers.0.mlp.bias": "1-D, not a matrix",
    }


def test_rank_in_diff_json(low_rank_pair: tuple[Path, Path]) -> None:
    r = diff(*low_rank_pair, rank=True, rank_max_dim=0)
    d = json.loads(r.to_json())["rank"]
    assert {m["name"]: m["rank"] for m in d["matrices"]}["model.embed_tokens.weight"] == 0  # unchanged matrix
    assert d["mean"] == pytest.approx((3 / 32 + 1.0 + 0.0) / 3)
    assert all(set(m) >= {"name", "shape", "rank", "max_rank", "fraction"} for m in d["matrices"])
