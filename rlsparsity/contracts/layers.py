"""Grouping of Hugging Face state-dict keys into layers and matrix types.

Two layer rules, kept apart because their outputs are recorded (mask statistics, overlap
tables, ``rlsparsity diff``'s JSON):

- :func:`layer_of`: the block index of a known block container (``layers``, ``layer``,
  ``h``, ``blocks``, ``block``), else the matrix type; used by the mask recorder and the
  overlap tables, sorted with :func:`group_sort_key`.
- :func:`layer_prefix`: the key up to its first numeric component, for any key; used by
  ``rlsparsity diff``'s per-layer table, sorted with :func:`natural_key`. It also groups
  keys whose container :func:`layer_of` does not know (``transformer.resblocks.0...``).
"""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_TYPE_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("lm_head", re.compile(r"(^|\.)(lm_head|output)\.")),
    ("embed", re.compile(r"embed|(^|\.)(wte|wpe|tok_embeddings)\.")),
    ("norm", re.compile(r"norm|(^|\.)ln_")),
    ("qkv", re.compile(r"qkv|c_attn|query_key_value")),
    ("q", re.compile(r"(^|\.)(q_proj|wq|query)\.")),
    ("k", re.compile(r"(^|\.)(k_proj|wk|key)\.")),
    ("v", re.compile(r"(^|\.)(v_proj|wv|value)\.")),
    ("o", re.compile(r"(^|\.)(o_proj|out_proj|wo|dense)\.|attn\.c_proj\.")),
    ("gate", re.compile(r"(^|\.)(gate_proj|w1)\.")),
    ("up", re.compile(r"(^|\.)(up_proj|w3|c_fc|fc1)\.")),
    ("down", re.compile(r"(^|\.)(down_proj|w2|fc2)\.|mlp\.c_proj\.")),
]


def matrix_type(name: str) -> str:
    """Matrix type of a state-dict key: q/k/v/o/gate/up/down/embed/norm/lm_head/...

    Biases get a ``.bias`` suffix; unknown modules fall back to the module name.
    """
    kind = next((t for t, rx in _TYPE_RULES if rx.search(name)), None)
    parts = name.split(".")
    if kind is None:
        kind = parts[-2] if len(parts) >= 2 else parts[0]
    return kind + ".bias" if parts[-1] == "bias" and kind != "norm" else kind


def layer_of(name: str) -> str:
    """Layer key: the block index as a string, or the matrix type for tensors outside blocks."""
    m = _LAYER_RE.search(name)
    return m.group(1) if m else matrix_type(name)


def group_sort_key(key: str) -> tuple[int, int, str]:
    if key.isdigit():
        return (1, int(key), "")
    return (0 if key.startswith("embed") else 2, 0, key)


def natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key that orders numbers numerically (``layers.2`` before ``layers.10``)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))


def layer_prefix(name: str) -> str | None:
    """The key's prefix up to its first all-digit component (``model.layers.3``), else None."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None
