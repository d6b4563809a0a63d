"""Loading models and tokenizers from local directories, and their content hash."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
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
    from rlsparsity.analysis.checkpoint_hash import content_hash
    from rlsparsity.analysis.checkpoints import open_checkpoint

    return content_hash(open_checkpoint(path, label="base model"))


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict keys that share storage (e.g. lm_head tied to the embeddings); counted once."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    return [names for names in by_ptr.values() if len(names) > 1]
