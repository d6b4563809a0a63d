"""The rollout actors: Ray actors that host one engine each (`rlsparsity.platform.engines`),
and `RolloutPool`, the learner's handle on them that survives an actor restart."""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import ray.exceptions
import torch

from rlsparsity.platform.engines import make_engine, replica_seed
from rlsparsity.platform.weight_sync import SparsePatch, full_patch

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
        self.engine = make_engine(backend, model_path, replica, threads, options)
        self.replica = replica
        self.version = 0  # the learner step whose weights this engine holds; 0 = θ0

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        return self.engine.generate(
            prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=replica_seed(seed, self.replica)
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
    (the learner syncs right after each optimizer step, before anyone samples). A rank
    without the weights whole (sharded, not rank 0) passes None and waits for rank 0 to
    resync a restarted actor."""

    def __init__(self, actors: list, named_params: list[tuple[str, torch.Tensor]] | None) -> None:
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

    def reset(self, version: int) -> None:
        self.version = version
        restarts = self.restarts
        self.resync()
        self.restarts = restarts  # the learner restarted, not the engines

    def resync(self) -> None:
        """Full weights to every actor that restarted (waits for Ray to bring it back); a
        rank without the weights waits for rank 0 to resync it."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                versions = ray.get([a.get_version.remote() for a in self.actors])
                stale = [a for a, v in zip(self.actors, versions, strict=True) if v != self.version]
                if not stale or self.named is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout actors at versions {versions}, not {self.version}, "
                                       f"{RESTART_TIMEOUT_S} s after rank 0 should have resynced them")
            except ray.exceptions.ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)
        if stale:
            self.restarts += len(stale)
            full = full_patch(self.named)
            ray.get([a.apply_patch.remote(full, self.version) for a in stale])
