"""The model cache: where the embedded models live, when a cached one counts, and the build.

Each embedded model is built once per recipe and cached by its recipe hash:

    <cache>/models/<name>-<recipe_hash[:12]>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json
        recipe.json   the recipe, its hash, library versions
        eval.json     greedy test accuracy per task, training time and loss

``<cache>`` is ``$RLSPARSITY_CACHE`` or ``~/.cache/rlsparsity``. A build writes into a
temporary directory next to the final one and renames it into place, under a file lock
(``<cache>/models/.<name>-<hash12>.lock``), so a crash never leaves a half model that
looks complete and concurrent builders (Ray workers on one node) train it only once.

Everything is stored without pickle (safetensors + JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from rlsparsity.platform.models.pretraining import build_embedded_model
from rlsparsity.platform.models.recipe import Recipe, get_recipe, recipe_hash

# What a finished build holds (eval.json is written last).
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.json",
    "eval.json",
)


def cache_root() -> Path:
    """``$RLSPARSITY_CACHE`` or ``~/.cache/rlsparsity``."""
    env = os.environ.get("RLSPARSITY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlsparsity"


def embedded_model_dir(name: str = "tiny-arith", cache_dir: str | Path | None = None) -> Path:
    """Where ``ensure_embedded_model`` keeps ``name`` (whether built or not)."""
    recipe = get_recipe(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / f"{name}-{recipe_hash(recipe)[:12]}"


def is_complete(model_dir: Path, recipe: Recipe | None = None) -> bool:
    """All required files exist and recipe.json carries the expected recipe hash."""
    model_dir = Path(model_dir)
    if not all((model_dir / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        meta = json.loads((model_dir / "recipe.json").read_text())
        json.loads((model_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False
    return recipe is None or meta.get("hash") == recipe_hash(recipe)


def ensure_embedded_model(
    name: str = "tiny-arith", cache_dir: str | Path | None = None, *, log_every: int | None = None
) -> Path:
    """Local HF directory of the embedded model ``name``; pretrains it on first use.

    ``cache_dir`` is the cache root (default: ``cache_root()``); the model lives in
    ``<cache_dir>/models/<name>-<hash12>``. A complete cached copy is returned as is.
    A build prints its progress every ``log_every`` steps (default: ten lines; 0: silent),
    so that a first run (or a `ray job` log) does not sit a minute without a word.
    """
    recipe = get_recipe(name)
    steps = recipe.train.steps
    if log_every is None:
        log_every = max(1, steps // 10)
    return build_once(
        embedded_model_dir(name, cache_dir),
        lambda tmp: build_embedded_model(recipe, tmp, log_every=log_every),
        lambda path: is_complete(path, recipe),
        f"building the embedded model {name} (θ0) once into {{final}}: {steps} pretraining steps" if log_every else None,
    )


def build_once(final: Path, build: Callable[[Path], object], complete: Callable[[Path], bool],
               announce: str | None = None) -> Path:
    """``final`` once ``complete(final)``; otherwise ``build(tmp)`` writes it into a fresh
    temporary directory beside it, renamed into place, under the cache's lock, so a crash
    never leaves a half model that looks complete and concurrent builders build it once.
    ``announce`` (``{final}`` stands for the directory) is printed before a build."""
    if complete(final):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    # An flock (released by the kernel if the holder dies, so a crashed builder never
    # blocks the next one); the lock file stays in place.
    with FileLock(parent / f".{final.name}.lock"):
        if complete(final):  # another process built it while we waited
            return final
        # Only lock holders create temp dirs, so any left over are from crashed builds.
        for stale in parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete: never reuse, never merge into it
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        if announce:
            print(announce.format(final=final), flush=True)
        try:
            build(tmp)
            _publishable_modes(tmp)
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _publishable_modes(path: Path) -> None:
    # mkdtemp makes a 0700 directory (and some writers use 0600 files); a shared cache is
    # read by other processes and users, so give the usual umask-based modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    # Data must be on disk before the rename publishes the directory.
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)
