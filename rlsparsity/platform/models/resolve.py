"""Model ids to local Hugging Face directories: the embedded model (built into the cache on
first use) or a local directory."""

from __future__ import annotations

from pathlib import Path

from rlsparsity.platform.models.cache import embedded_model_dir, ensure_embedded_model
from rlsparsity.platform.models.recipe import EMBEDDED_RECIPES


def resolve_model(model_id: str, *, build: bool = True) -> Path:
    """Map a model id to a local HF directory.

    - ``"embedded"`` or ``"embedded:NAME"``: the embedded model (built on first use; with
      ``build=False`` only its name is checked and its cache directory returned, as a dry
      run needs);
    - an existing local directory containing ``config.json``: that directory.

    Raises ValueError naming what is wrong.
    """
    if model_id == "embedded" or model_id.startswith("embedded:"):
        name = model_id.partition(":")[2] or "tiny-arith"
        return ensure_embedded_model(name) if build else embedded_model_dir(name)
    p = Path(model_id).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    why = f"directory {str(p)!r} has no config.json" if p.is_dir() else "no such local directory"
    raise ValueError(
        f"cannot resolve model {model_id!r} ({why}); expected a local Hugging Face model "
        f"directory containing config.json, or 'embedded:NAME' with NAME one of "
        f"{', '.join(sorted(EMBEDDED_RECIPES))}"
    )

