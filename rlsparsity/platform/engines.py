"""Rollout engines behind one interface, and the in-process rollout that the Ray-free
learner uses. Nothing here imports Ray.

An engine generates n completions per prompt (token ids) and applies sparse bf16 weight
patches. The `hf` engine runs `transformers.generate` in float32 on weights that always
equal a bf16 view (θ0's, then the learner's after each patch): on CPU bf16 arithmetic is
about 5x slower, and float32 holds every bf16 value exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from rlsparsity.platform.weight_sync import SparsePatch, apply_patch, bf16_bits, full_patch


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]: ...

    def apply_patch(self, patch: SparsePatch) -> None: ...


class Rollout(Protocol):
    """What the learner samples from and syncs: `RolloutPool` (Ray actors) or `LocalRollout`."""

    restarts: int

    def generate(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]: ...

    def sync(self, patch: SparsePatch, version: int) -> None: ...

    def reset(self, version: int) -> None:
        """Make every engine hold the learner's current weights, those of step `version`,
        sending them in full where an engine holds others (a learner restarted mid-trial)."""
        ...


def replica_seed(seed: int, replica: int) -> int:
    """The sampling seed of one replica for a call's `seed` (both rollout kinds fold it alike)."""
    return seed * 1009 + replica


class HFEngine:
    """`transformers.generate` on `device` (a rollout actor given GPUs runs on its CUDA device)."""

    def __init__(self, model_path: str | Path, *, threads: int = 1, device: str | torch.device = "cpu") -> None:
        from rlsparsity.platform.models import load_model, load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype=torch.float32).eval().to(device)
        with torch.no_grad():  # start from θ0's bf16 view, like the learner's first sync
            for p in self.model.parameters():
                p.copy_(p.to(torch.bfloat16))

    def generate(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]:
        from rlsparsity.platform.generation import generate

        return generate(
            self.model, self.tokenizer, prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
        )

    def apply_patch(self, patch: SparsePatch) -> None:
        apply_patch(self.model, patch)

    def weights_bf16(self) -> dict[str, torch.Tensor]:
        return {n: bf16_bits(p).cpu() for n, p in self.model.named_parameters()}


def _vllm_engine(model_path: str | Path, **kwargs: Any) -> RolloutEngine:
    # Imported on first use: the hf path never imports vllm (an optional extra).
    from rlsparsity.platform.vllm.engine import VLLMEngine

    return VLLMEngine(model_path, **kwargs)


ENGINES = {"hf": HFEngine, "vllm": _vllm_engine}


def make_engine(backend: str, model_path: str | Path, replica: int = 0, threads: int = 1, options: dict | None = None) -> RolloutEngine:
    """One engine of `backend`; `options` are its keyword arguments (the vllm engine's seed and
    `rollout.vllm` fields; the hf engine's device)."""
    kwargs = dict(options or {})
    if backend != "hf":
        kwargs.setdefault("replica", replica)
    return ENGINES[backend](model_path, threads=threads, **kwargs)


class LocalRollout:
    """One engine in the learner's own process: the learner without Ray (tests, `make gpu-check`).

    It behaves as a one-replica `RolloutPool` (the same seed folding), so a trial gives the
    same samples whichever runs it.
    """

    def __init__(self, engine: RolloutEngine, named_params: list[tuple[str, torch.Tensor]] | None = None) -> None:
        self.engine = engine
        self.named = named_params  # the learner's masters, for `reset`
        self.version = 0
        self.restarts = 0

    def generate(self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        return self.engine.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=replica_seed(seed, 0))

    def sync(self, patch: SparsePatch, version: int) -> None:
        self.engine.apply_patch(patch)
        self.version = version

    def reset(self, version: int) -> None:
        if version != self.version:  # the engine starts at θ0, version 0
            if self.named is None:
                raise ValueError(f"LocalRollout.reset to step {version} needs the learner's named parameters")
            self.engine.apply_patch(full_patch(self.named))
            self.version = version
