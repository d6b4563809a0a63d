"""Model ids to local Hugging Face directories: the embedded model (built into the cache on
first use) or a local directory."""

from __future__ import annotations

from pathlib import Path

from rlsparsity.platform.models.cache import ensure_embedded_model
from rlsparsity.platform.models.recipe import EMBEDDED_RECIPES


def resolve_model(model_id: str) -> Path:
    """Map a model id to a local HF directory.

    - ``"embedded"`` or ``"embedded:NAME"``: the embedded model (built on first use);
    - an existing local directory containing ``config.json``: that directory.
    """
    if model_id == "embedded" or model_id.startswith("embedded:"):
        name = model_id.partition(":")[2] or "tiny-arith"
        return ensure_embedded_model(name)
    p = Path(model_id).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    why = f"directory {str(p)!r} has no config.json" if p.is_dir() else "no such local directory"
    raise ValueError(
        f"cannot resolve model {model_id!r} ({why}); expected a local Hugging Face model "
        f"directory containing config.json, or 'embedded:NAME' with NAME one of "
        f"{', '.join(sorted(EMBEDDED_RECIPES))}"
    )


def check_model_id(model_id: str) -> None:
    """Raise ValueError for a model id that ``resolve_model`` cannot resolve, without
    building anything (a dry run checks the model this way)."""
    if model_id == "embedded" or model_id.startswith("embedded:"):
        name = model_id.partition(":")[2] or "tiny-arith"
        if name not in EMBEDDED_RECIPES:
            raise ValueError(f"unknown embedded model {name!r}; allowed: {', '.join(sorted(EMBEDDED_RECIPES))}")
        return
    p = Path(model_id).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        resolve_model(model_id)  # raises, naming what is missing
