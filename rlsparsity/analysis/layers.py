"""Grouping of Hugging Face state-dict keys into layers and matrix types."""

from __future__ import annotations

import re

_LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `layer.03`; non-layer tensors keep a short role name."""
    m = _LAYER.search(name)
    if m:
        return f"layer.{int(m.group(1)):02d}"
    if "embed" in name or name.endswith("wte.weight"):
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "final_norm"
    return "other"
