"""What one trial runs: pydantic models, every field a scalar.

The sweep layer (`rlsparsity.sweeps.spec`) makes grids of these; the platform only ever
sees one validated `TrialSpec`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Local SQLite store in the working directory: the embedded default, no server needed.
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskSpec(_Strict):
    criterion: Literal["bitwise"] = "bitwise"
    every: int = Field(10, ge=1, description="write a mask every k optimizer steps (and at the end)")


class TrainingSpec(_Strict):
    steps: int = Field(30, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup, then constant")
    weight_decay: float = Field(0.0, ge=0)
    prompts_per_step: int = Field(16, ge=1, description="prompts (online) or examples (offline) per step")
    samples_per_prompt: int = Field(4, ge=1, description="the GRPO group size")
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(8, ge=1)
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the frozen θ0; 0 disables it")
    clip_eps: float = Field(0.2, gt=0)
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null disables it")
    sft_style: Literal["ood", "native"] = "ood"
    eval_problems: int = Field(200, ge=1, description="test problems for greedy accuracy")
    masks: MaskSpec = MaskSpec()


class RolloutSpec(_Strict):
    backend: Literal["hf"] = "hf"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, gt=0)


class ResourcesSpec(_Strict):
    learners: int = Field(1, ge=1)
    cpus_per_learner: float = Field(0.5, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as fit")


class TrackingSpec(_Strict):
    uri: str = DEFAULT_TRACKING_URI
    artifact_location: str | None = None


class TrialSpec(_Strict):
    """One trial: every field is a scalar."""

    name: str = "sweep"
    model: str = "embedded:tiny-arith"
    dataset: str = "add"
    algorithm: str = "grpo"
    seed: int = 0
    training: TrainingSpec = TrainingSpec()
    rollout: RolloutSpec = RolloutSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    analysis: bool = Field(True, description="run the overlap analysis after the sweep")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        from rlsparsity.platform.algorithms import ALGORITHMS

        if v not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {v!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from rlsparsity.platform.tasks import TASKS

        if v not in TASKS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(sorted(TASKS))}")
        return v

    @property
    def label(self) -> str:
        return f"{self.algorithm}/{self.dataset}/s{self.seed}"

    def cpus(self) -> float:
        return self.rollout.replicas * self.rollout.cpus + self.resources.learners * self.resources.cpus_per_learner
