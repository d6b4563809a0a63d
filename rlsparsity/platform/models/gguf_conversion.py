"""A GGUF file to a plain safetensors Hugging Face model directory, checked after writing.

Why convert: the learners and vLLM want safetensors, and dequantizing the GGUF on every load
costs about 15 s. transformers reads GGUF itself (with the ``gguf`` package).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def convert_gguf(src: Path, dst: Path) -> None:
    """Dequantize ``src`` (GGUF) and save it, in bfloat16, into the empty directory ``dst``."""
    # float32 first, then one explicit round-to-nearest cast: the bf16 values then do not
    # depend on which dtype the GGUF loader dequantizes in.
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                 trust_remote_code=False, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False,
                                              local_files_only=True)
    # Newer transformers may keep GGUF blocks packed when a matmul kernel is available;
    # a saved checkpoint must hold plain dense tensors.
    packed = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear]
    if packed:
        raise RuntimeError(f"{src.name}: GGUF weights were not dequantized (e.g. {packed[0]})")
    # With the quantizer attached, save_pretrained would write GGUF metadata into config.json
    # and loaders (vLLM included) would then look for a GGUF file that is not there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    # SmolLM2's GGUF has no output.weight: lm_head shares the embedding matrix.
    tied = model.config.tie_word_embeddings
    if tied != (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()):
        raise RuntimeError(f"{src.name}: tie_word_embeddings disagrees with the loaded weights")

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    _check_written(model.state_dict(), tied, tokenizer, dst)


def _check_written(expected_state: dict[str, torch.Tensor], tied: bool, tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """Check what was written, not what is in memory: this is what every consumer reads."""
    expected = {k: v for k, v in expected_state.items() if not (tied and k == "lm_head.weight")}
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(expected):
            raise RuntimeError(f"{dst}: saved keys differ: {sorted(keys ^ set(expected))[:5]}")
        for k in keys:
            t = f.get_tensor(k)
            if t.dtype != torch.bfloat16 or not torch.equal(t, expected[k]):
                raise RuntimeError(f"{dst}: saved tensor {k} differs from the converted one")
    config = json.loads((dst / "config.json").read_text())
    if "quantization_config" in config or config.get("tie_word_embeddings") != tied:
        raise RuntimeError(f"{dst}: config.json still carries GGUF settings or the wrong tying")
    reloaded = AutoTokenizer.from_pretrained(dst, local_files_only=True)
    if reloaded.pad_token is None or reloaded.encode("12+34=") != tokenizer.encode("12+34="):
        raise RuntimeError(f"{dst}: the saved tokenizer does not round-trip")
    if tokenizer.chat_template and reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{dst}: the chat template from the GGUF was not saved")
