"""The sections of a trial's spec: pydantic models, every field a scalar.

Plain data with no registry lookups, so that algorithms and sources can import
`TrainingSpec` without a cycle; `rlsparsity.platform.trial_spec.TrialSpec` assembles
them and checks names against the registries.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rlsparsity.analysis.criteria import BITWISE, Criterion, CriterionError, parse_criteria
from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI, criterion_slug


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        # YAML 1.1 reads yes/no/on/off as booleans, and pydantic would take them as 1 and 0:
        # `lr: yes` must not become 1.0. Strict mode would also refuse YAML's `1e-4`, a string.
        if isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            types = typing.get_args(ann) or (ann,)
            numbers = [t for t in (float, int) if t in types]
            if numbers and bool not in types:
                raise ValueError(f"expected {numbers[0].__name__}, got the boolean {str(v).lower()}")
        return v


@dataclass(frozen=True)
class TrainingCriterion:
    """One criterion of the training masks: `criterion` on the bf16 view, or bitwise on the
    master weights (`view` masters). `slug` names its metrics and artifact folder."""

    view: Literal["bf16", "masters"]
    criterion: Criterion

    @property
    def spec(self) -> str:
        return "masters" if self.view == "masters" else str(self.criterion)

    @property
    def slug(self) -> str:
        return criterion_slug(self.spec)


def parse_training_criteria(text: str) -> list[TrainingCriterion]:
    """``"bitwise masters abs:1e-5,1e-6 rel:1e-3"`` -> criteria; a bare number continues the
    tolerances of the mode before it. bitwise must come first: its mask is the trial's mask."""
    words, specs = [w for w in re.split(r"[\s,]+", text.strip()) if w], []
    for w in words:
        if specs and ":" not in w and w.lower() not in ("bitwise", "masters") and specs[-1] not in ("bitwise", "masters"):
            specs[-1] += "," + w  # abs:1e-5,1e-6 split at its comma
        else:
            specs.append(w)
    out: list[TrainingCriterion] = []
    for spec in specs:
        try:
            found = [TrainingCriterion("masters", BITWISE)] if spec.lower() == "masters" else [
                TrainingCriterion("bf16", c) for c in parse_criteria(spec)]
        except CriterionError as e:
            raise ValueError(f"{e}; expected bitwise, masters, abs:TOL, rel:TOL or paper:TOL") from None
        out.extend(c for c in found if c not in out)
    if not out or out[0] != TrainingCriterion("bf16", BITWISE):
        raise ValueError(f"{text!r}: the first criterion must be bitwise (the bf16 view's mask, which overlap and subnetworks read)")
    return out


# What training masks record by default: the bf16 view bitwise (the released checkpoint's
# "changed"), the float32 masters bitwise, the paper's abs:1e-5 and Path Not Taken's rel:1e-3.
DEFAULT_MASK_CRITERIA = "bitwise masters abs:1e-5 rel:1e-3"


class MaskSpec(Strict):
    every: int = Field(10, ge=1, description="write the masks every k optimizer steps (and at the end)")
    criteria: str = Field(
        DEFAULT_MASK_CRITERIA,
        description="update criteria, each its own cumulative mask against θ0 and its own sparsity metric: "
        "bitwise | abs:TOL | rel:TOL | paper:TOL on the bf16 view (as `rlsparsity diff` on the saved weights "
        "counts them), and masters (bitwise on the master weights); separated by spaces or commas, "
        "bitwise first (the mask the overlap job and subnetworks read)",
    )
    dynamics: bool = Field(
        True, description="also write, at every mask step, the bf16 mask against the previous mask step and "
        "the ever-changed mask (an entry whose bf16 view changed at any optimizer step)",
    )
    drift: bool = Field(
        True, description="at every mask step, the distribution of |θ_t − θ0| and of the last step's update "
        "in units of θ0's bf16 half-ulp (a table and a PNG)",
    )

    @field_validator("criteria")
    @classmethod
    def _parse_criteria(cls, v: str) -> str:
        return " ".join(c.spec for c in parse_training_criteria(v))

    def parsed_criteria(self) -> list[TrainingCriterion]:
        return parse_training_criteria(self.criteria)


class RandomMaskSpec(Strict):
    """A random subnetwork: ``density`` of the policy's entries, drawn with ``seed``."""

    seed: int = 0
    density: float | None = Field(
        None, gt=0, le=1, description="share of entries in the mask; default: the source mask's (mask or run)"
    )
    draw: Literal["global", "per_tensor"] = Field(
        "global", description="global: one draw over all parameters (the paper's notebook); "
        "per_tensor: the same share in every tensor (Multiple Ticket)"
    )


class SubnetworkSpec(Strict):
    """Train only the entries of a mask; every other entry of the policy stays at θ0, bit for bit.

    The mask comes from a mask file, from a finished trial (``run`` id, or ``experiment`` plus
    ``trial`` label, at checkpoint ``step``, default final) or, with ``random``, is drawn at
    random (with the density of the file's or run's mask when ``random.density`` is unset).
    """

    mask: str | None = Field(None, description="a local rlsparsity.mask/1 file")
    run: str | None = Field(None, description="the MLflow run id of a finished trial")
    experiment: str | None = Field(None, description="with trial: the sweep's MLflow experiment")
    trial: str | None = Field(
        None, description="with experiment: the trial's label, e.g. grpo/add/s0; '{label}' stands for "
        "this trial's own label without its subnetwork kind (the full trial of the same grid point)"
    )
    step: int | None = Field(None, ge=1, description="the trial's mask at this step; default: its final mask")
    random: RandomMaskSpec | None = None
    complement: bool = Field(False, description="train the entries outside the mask instead (a control)")

    @model_validator(mode="after")
    def _one_source(self) -> SubnetworkSpec:
        named = [k for k in ("mask", "run") if getattr(self, k) is not None]
        if (self.experiment is None) != (self.trial is None):
            raise ValueError("experiment and trial name a finished trial together; give both or neither")
        if self.experiment is not None:
            named.append("experiment/trial")
        if len(named) > 1:
            raise ValueError(f"give one mask source, not {' and '.join(named)}")
        if not named and (self.random is None or self.random.density is None):
            raise ValueError("no mask source: give mask, run or experiment/trial, or random with a density")
        if self.complement and self.random is not None:
            raise ValueError("complement applies to a learned mask; a random mask's complement is another random mask")
        if self.step is not None and not (self.run or self.experiment):
            raise ValueError("step selects a finished trial's mask; it needs run or experiment/trial")
        return self

    @property
    def kind(self) -> str:
        """learned, random_global, random_per_tensor, or complement (of the learned mask)."""
        if self.random is not None:
            return f"random_{self.random.draw}"
        return "complement" if self.complement else "learned"


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
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables it")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw: torch's AdamW (betas 0.9/0.999, eps 1e-8); sgd: torch's SGD with momentum"
    )
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd's momentum; default 0.9 (adamw: leave unset)")
    precision: Literal["fp32", "amp", "bf16"] = Field(
        "fp32", description="fp32: float32 master weights and optimizer state, float32 compute, masks on the bf16 "
        "view; amp: the same masters with bf16 autocast for forward and backward (what RL frameworks run on GPUs; "
        "slow on a CPU); bf16: weights, gradients and optimizer state held in bfloat16, as a pure-bf16 trainer"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="rows (sequences, or preference pairs) per forward and backward on each learner: "
        "a larger minibatch runs in micro-batches whose gradients accumulate, each loss weighted by its share "
        "of the minibatch (what the algorithm's loss averages over), so the step is the same up to float "
        "summation order. null: the whole minibatch at once"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in the backward (transformers' "
        "gradient checkpointing): far less activation memory for about a third more compute, the same "
        "gradients. It puts the policy in train mode, so dropout applies where the model's config sets it "
        "(Qwen2.5, Llama and SmolLM2 set none)"
    )
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
    save_weights: Literal["final", "none"] | None = Field(
        None, description="final: log the final bf16 weights as a Hugging Face model directory "
        "(2 bytes per parameter); default final below 1e9 parameters, an explicit choice above"
    )
    subnetwork: SubnetworkSpec | None = Field(None, description="train only a mask's entries of the policy")
    checkpoint_every: int | None = Field(
        None, ge=1, description="save the learner's state (masters, optimizer, schedule, RNG) every k steps as a "
        "Ray Train checkpoint; a learner restarted after a failure continues from the last one. null: no "
        "checkpoints, a restarted learner starts again from step 0"
    )

    @model_validator(mode="after")
    def _optimizer_knobs(self) -> TrainingSpec:
        if self.momentum is not None and self.optimizer != "sgd":
            raise ValueError(f"momentum: applies to optimizer sgd, not {self.optimizer}; leave it unset")
        if self.optimizer == "sgd" and self.subnetwork is not None and self.weight_decay > 0:
            raise ValueError("weight_decay: sgd's weight decay is coupled to the gradient, which a subnetwork masks; "
                             "use weight_decay 0 or optimizer adamw")
        return self

    @property
    def sgd_momentum(self) -> float:
        return 0.9 if self.momentum is None else self.momentum


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
    gpus: float = Field(
        0.0, ge=0, description="GPUs per replica, reserved in the trial's placement group; above 0 the engine runs on "
        "CUDA. vllm: vllm.tensor_parallel_size GPUs (a fraction below 1 shares a GPU, e.g. with a learner)"
    )
    vllm: VLLMSpec = VLLMSpec()
    sync: SyncSpec = SyncSpec()

    @model_validator(mode="after")
    def _gpus_fit_engine(self) -> RolloutSpec:
        tp = self.vllm.tensor_parallel_size
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus: {self.gpus:g} per replica; above 1 a replica takes whole GPUs")
        if tp > 1:
            if self.backend != "vllm":
                raise ValueError(f"vllm.tensor_parallel_size: {tp} applies to backend vllm, not {self.backend}")
            if self.gpus != tp:
                raise ValueError(f"gpus: {self.gpus:g} per replica, but vllm.tensor_parallel_size {tp} shards the "
                                 f"engine over {tp} GPUs; set gpus: {tp}")
        return self


class ResourcesSpec(Strict):
    learners: int = Field(1, ge=1)
    cpus_per_learner: float = Field(0.5, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every learner holds the whole model; fsdp: FSDP2 shards the policy, the "
        "reference, their optimizer state, the sync state and the mask recorder along dim 0 over the learners"
    )
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as fit")
    max_failures: int = Field(
        1, ge=0, description="restarts of a trial's learners after a worker dies (Ray Train's FailureConfig), "
        "from training.checkpoint_every's last checkpoint"
    )


# MLflow's tracking stores: a local path, file:, a database (SQLAlchemy URIs, with an
# optional +driver) or a tracking server.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def _default_tracking_uri() -> str:
    # As MLflow's own clients do, and as `diff` and `overlap` do: a cluster (a RayJob pod, a
    # CI runner) names its tracking server once in the environment, not in every spec.
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingSpec(Strict):
    uri: str = Field(default_factory=_default_tracking_uri, validate_default=True,
                     description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")
    artifact_location: str | None = None

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        scheme = urlparse(v).scheme.partition("+")[0]
        if len(scheme) == 1:  # a Windows drive letter
            scheme = ""
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"unknown tracking store scheme {scheme!r} in {v!r}; expected a path or one of "
                + ", ".join(f"{s}://" for s in TRACKING_SCHEMES if s)
            )
        return v
