"""Rollout engines behind one interface, and the Ray actor that hosts one.

An engine generates n completions per prompt (token ids) and applies sparse bf16 weight
patches. The `hf` engine runs `transformers.generate` in float32 on weights that always
equal a bf16 view (θ0's, then the learner's after each patch): on CPU bf16 arithmetic is
about 5x slower, and float32 holds every bf16 value exactly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.exceptions
import torch

from rlsparsity.platform.weight_sync import SparsePatch, apply_patch, bf16_bits, full_patch


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


def _vllm_engine(model_path: str | Path, **kwargs) -> RolloutEngine:
    # Imported on first use: the hf path never imports vllm (an optional extra).
    from rlsparsity.platform.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, **kwargs)


ENGINES = {"hf": HFEngine, "vllm": _vllm_engine}


# A restarted actor comes back holding θ0. Its `version` (the learner step it was last
# synced to) then reads 0, and `RolloutPool` sends it the full current weights before any
# further use, so it never serves stale weights or patches against the wrong base.
MAX_RESTARTS = 3
RESTART_TIMEOUT_S = 300
# A call to a dead actor fails with RayActorError; while Ray restarts it, with
# ActorUnavailableError ("the actor is restarting").
_ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)
class RolloutActor:
    """One rollout engine per actor; the replica index is folded into the sampling seed."""

    def __init__(self, backend: str, model_path: str, replica: int, threads: int = 1, options: dict | None = None) -> None:
        # options: engine keyword arguments, e.g. the vllm engine's seed and `rollout.vllm` fields.
        kwargs = dict(options or {})
        if backend != "hf":
            kwargs.setdefault("replica", replica)
        self.engine = ENGINES[backend](model_path, threads=threads, **kwargs)
        self.replica = replica
        self.version = 0  # the learner step whose weights this engine holds; 0 = θ0

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        return self.engine.generate(
            prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 1009 + self.replica
        )

    def apply_patch(self, patch: SparsePatch, version: int | None = None) -> int:
        self.engine.apply_patch(patch)
        if version is not None:
            self.version = version
        return patch.changed

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

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


class RolloutPool:
    """The learner's handle on its rollout actors: generation and weight sync that survive an
    actor restart. `named_params` are the learner's master weights; the engines hold their
    bf16 view as of the last sync, which is also the current one whenever the pool is used
    (the learner syncs right after each optimizer step, before anyone samples)."""

    def __init__(self, actors: list, named_params: list[tuple[str, torch.Tensor]]) -> None:
        self.actors = actors
        self.named = named_params
        self.version = 0
        self.restarts = 0

    def generate(self, prompts: list[str], **kwargs: Any) -> list[list[list[int]]]:
        try:
            return generate_sharded(self.actors, prompts, **kwargs)
        except _ACTOR_DOWN:
            self.resync()
            return generate_sharded(self.actors, prompts, **kwargs)

    def sync(self, patch: SparsePatch, version: int) -> None:
        try:
            ray.get([a.apply_patch.remote(patch, version) for a in self.actors])
            self.version = version
        except _ACTOR_DOWN:
            self.version = version  # the master weights are already at `version`
            self.resync()

    def resync(self) -> None:
        """Full weights to every actor that restarted (waits for Ray to bring it back)."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                versions = ray.get([a.get_version.remote() for a in self.actors])
                break
            except ray.exceptions.ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        stale = [a for a, v in zip(self.actors, versions, strict=True) if v != self.version]
        if stale:
            self.restarts += len(stale)
            full = full_patch(self.named)
            ray.get([a.apply_patch.remote(full, self.version) for a in stale])
