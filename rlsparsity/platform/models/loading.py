"""Loading models and tokenizers from local directories, and resolving model ids to them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlsparsity.platform.models.recipe import EMBEDDED_RECIPES


def resolve_model(model_id: str) -> Path:
    """Map a model id to a local HF directory.

    - ``"embedded"`` or ``"embedded:NAME"``: the embedded model (built on first use);
    - an existing local directory containing ``config.json``: that directory.
    """
    if model_id == "embedded" or model_id.startswith("embedded:"):
        # Imported here: the cache builds through pretraining, which uses this module.
        from rlsparsity.platform.models.cache import ensure_embedded_model

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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Causal LM from a local directory, in eval mode; remote code is never trusted."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, local_files_only=True
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer from a local directory; a missing pad token falls back to EOS."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_content_hash(path: str | Path) -> str:
    """The checkpoint content hash that `rlsparsity diff` writes into masks.

    Computed over each tensor's name, dtype, shape and bytes, so it does not depend on
    sharding; masks from training and from `diff` against the same θ0 share it.
    """
    from rlsparsity.analysis.checkpoints import content_hash, open_checkpoint

    return content_hash(open_checkpoint(path, label="base model"))
