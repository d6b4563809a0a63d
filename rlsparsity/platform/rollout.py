"""Rollout engines behind one interface, and the Ray actor that hosts one.

An engine generates n completions per prompt (token ids) and applies sparse bf16 weight
patches. The `hf` engine runs `transformers.generate` in float32 on weights that always
equal a bf16 view (θ0's, then the learner's after each patch): on CPU bf16 arithmetic is
about 5x slower, and float32 holds every bf16 value exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import ray
import torch

from rlsparsity.platform.weight_sync import SparsePatch, apply_patch, bf16_bits


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]: ...

    def apply_patch(self, patch: SparsePatch) -> None: ...


class HFEngine:
    def __init__(self, model_path: str | Path, *, threads: int = 1) -> None:
        from rlsparsity.platform.models import load_model, load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype=torch.float32).eval()
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
        return {n: bf16_bits(p) for n, p in self.model.named_parameters()}


ENGINES = {"hf": HFEngine}


# No automatic restarts yet: a restarted engine would come back with θ0's weights and then
# receive patches relative to the learner's last sync, silently serving neither. Until a
# restart triggers a full resync (weight_sync.full_patch), a dead actor fails the trial.
@ray.remote(max_restarts=0, max_task_retries=0)
class RolloutActor:
    """One rollout engine per actor; the replica index is folded into the sampling seed."""

    def __init__(self, backend: str, model_path: str, replica: int, threads: int = 1) -> None:
        self.engine = ENGINES[backend](model_path, threads=threads)
        self.replica = replica

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        return self.engine.generate(
            prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 1009 + self.replica
        )

    def apply_patch(self, patch: SparsePatch) -> int:
        self.engine.apply_patch(patch)
        return patch.changed

    def weights_bf16(self) -> dict[str, torch.Tensor]:
        return self.engine.weights_bf16()


def generate_sharded(actors: list, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
    """Split prompts across replicas, keep the order."""
    k = len(actors)
    shards = [prompts[i::k] for i in range(k)]
    outs = ray.get([a.generate.remote(s, n, temperature, max_new_tokens, seed) for a, s in zip(actors, shards, strict=True) if s])
    merged: list = [None] * len(prompts)
    for i, out in enumerate(outs):
        merged[i::k] = out
    return merged
