"""The sections of a trial's spec: pydantic models, every field a scalar.

Plain data with no registry lookups, so that algorithms and sources can import
`TrainingSpec` without a cycle; `rlsparsity.platform.trial_spec.TrialSpec` assembles
them and checks names against the registries.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskSpec(Strict):
    criterion: Literal["bitwise"] = "bitwise"
    every: int = Field(10, ge=1, description="write a mask every k optimizer steps (and at the end)")


class TrainingSpec(Strict):
    steps: int = Field(30, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup, then the schedule")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warmup, to 0")
    weight_decay: float = Field(0.0, ge=0)
    prompts_per_step: int = Field(16, ge=1, description="prompts (online) or examples (offline) per step")
    samples_per_prompt: int = Field(4, ge=1, description="the GRPO group size")
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(8, ge=1)
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the frozen θ0; 0 disables it")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="per-token KL estimator (Schulman's k1 or k3)")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null disables it")
    sft_style: Literal["ood", "native"] = "ood"
    reward: str = Field(
        "exact", description="a name in tasks.REWARDS. exact: the completion is the answer and stops; "
        "last_number: the last number in it is the answer"
    )
    prompt_format: Literal["native", "chat"] = Field(
        "native", description="rollout and test prompts: the terse native format, or a user turn of the model's chat template"
    )
    eval_problems: int = Field(200, ge=1, description="test problems for greedy accuracy")
    masks: MaskSpec = MaskSpec()


class VLLMSpec(Strict):
    """Options of the vllm rollout engine (`rlsparsity.platform.vllm.engine.VLLMEngine`)."""

    max_model_len: int | None = Field(None, ge=1, description="default: the model's context length")
    gpu_memory_utilization: float = Field(0.15, gt=0, le=1, description="on CPU: the share of host memory for the KV cache")
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="float32 holding bf16 values (CPU: bf16 math is ~5x slower); weights always equal the bf16 view"
    )


class SyncSpec(Strict):
    """Learner -> rollout weight sync."""

    mode: Literal["sparse", "dense"] = "sparse"
    dense_above: float = Field(
        0.5, gt=0, le=1, description="sparse mode sends the whole model when the patch exceeds this share of the dense bytes"
    )


class RolloutSpec(Strict):
    backend: Literal["hf", "vllm"] = "hf"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, gt=0)
    vllm: VLLMSpec = VLLMSpec()
    sync: SyncSpec = SyncSpec()


class ResourcesSpec(Strict):
    learners: int = Field(1, ge=1)
    cpus_per_learner: float = Field(0.5, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as fit")


class TrackingSpec(Strict):
    uri: str = DEFAULT_TRACKING_URI
    artifact_location: str | None = None
