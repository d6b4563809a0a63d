"""A trained policy as a Hugging Face model directory: its bf16 view, config and tokenizer,
and a manifest of sha256 digests that is written (and uploaded) last."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlsparsity.contracts.mlflow_layout import WEIGHTS_FORMAT, WEIGHTS_MANIFEST

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec


def save_bf16_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> list[Path]:
    """Write the bf16 view of ``model``'s weights (safetensors), its config with dtype
    bfloat16, and the tokenizer. Returns the files written; the manifest is not among them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bf16 copy (half the float32 model's memory) saves like any bf16 checkpoint: the
    # config says bfloat16 and tied weights are stored once.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def write_manifest(files: list[Path], root: Path, dest: Path, info: dict[str, Any]) -> Path:
    """The manifest of a weights directory: each file's size and sha256 under ``root``, plus ``info``."""
    entries = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
        entries[str(f.relative_to(root))] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    dest.write_text(json.dumps({"format": WEIGHTS_FORMAT, **info, "files": entries}, indent=1, sort_keys=True))
    return dest


def verify_weights_dir(path: Path) -> dict[str, Any]:
    """The manifest of a downloaded weights directory, after checking every file it lists;
    a directory without one was not completely written."""
    manifest_path = path / WEIGHTS_MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path}: no {WEIGHTS_MANIFEST}; the weights were not completely written")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{path}: {name} is listed in {WEIGHTS_MANIFEST} but missing")
        if hashlib.sha256(f.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{path}: {name} does not match its sha256 in {WEIGHTS_MANIFEST}")
    return manifest


# Above this many parameters a trial saves its weights only when the spec says so.
SAVE_WEIGHTS_LIMIT = 1_000_000_000


def weights_choice(t: TrainingSpec, n_params: int) -> str:
    """training.save_weights, resolved: final by default for models under 1e9 parameters."""
    if t.save_weights is not None:
        return t.save_weights
    if n_params >= SAVE_WEIGHTS_LIMIT:
        raise ValueError(
            f"training.save_weights: the model has {n_params:.3g} parameters; saving its final weights "
            f"writes {2 * n_params / 1e9:.1f} GB to the artifact store per trial, so choose 'final' or 'none' explicitly"
        )
    return "final"
