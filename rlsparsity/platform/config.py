"""What one trial runs: pydantic models, every field a scalar.

The sweep layer (`rlsparsity.sweeps.spec`) makes grids of these; the platform only ever
sees one validated `TrialSpec`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlsparsity import DEFAULT_TRACKING_URI


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskSpec(_Strict):
    criterion: Literal["bitwise"] = "bitwise"
    every: int = Field(10, ge=1, description="write a mask every k optimizer steps (and at the end)")


class TrainingSpec(_Strict):
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
    reward: Literal["exact", "last_number"] = Field(
        "exact", description="exact: the completion is the answer and stops; last_number: the last number in it is the answer"
    )
    prompt_format: Literal["native", "chat"] = Field(
        "native", description="rollout and test prompts: the terse native format, or a user turn of the model's chat template"
    )
    eval_problems: int = Field(200, ge=1, description="test problems for greedy accuracy")
    masks: MaskSpec = MaskSpec()


class VLLMSpec(_Strict):
    """Options of the vllm rollout engine (`rlsparsity.platform.vllm_engine.VLLMEngine`)."""

    max_model_len: int | None = Field(None, ge=1, description="default: the model's context length")
    gpu_memory_utilization: float = Field(0.15, gt=0, le=1, description="on CPU: the share of host memory for the KV cache")
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="float32 holding bf16 values (CPU: bf16 math is ~5x slower); weights always equal the bf16 view"
    )


class SyncSpec(_Strict):
    """Learner -> rollout weight sync."""

    mode: Literal["sparse", "dense"] = "sparse"
    dense_above: float = Field(
        0.5, gt=0, le=1, description="sparse mode sends the whole model when the patch exceeds this share of the dense bytes"
    )


class RolloutSpec(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, gt=0)
    vllm: VLLMSpec = VLLMSpec()
    sync: SyncSpec = SyncSpec()


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
    # Per-algorithm knobs, keyed by algorithm name, so one sweep spec can carry the settings
    # of every algorithm on its grid; each trial validates and uses its own entry.
    algorithm_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0
    data_seed: int | None = Field(
        None, description="seeds which training problems (and offline pairs) the trial draws; default: seed. "
        "Vary it apart from seed, which keeps the learner's init and the sampling, to separate data from the rest"
    )
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

    @model_validator(mode="after")
    def _valid_algorithm_config(self) -> TrialSpec:
        from rlsparsity.platform.algorithms import ALGORITHMS

        for name, raw in self.algorithm_config.items():
            if name not in ALGORITHMS:
                raise ValueError(f"algorithm_config.{name}: unknown algorithm; allowed: {', '.join(sorted(ALGORITHMS))}")
            if name == self.algorithm or raw:
                _validate_algorithm_config(name, raw)
        if self.algorithm not in self.algorithm_config:
            _validate_algorithm_config(self.algorithm, {})
        if self.training.kl_coef > 0 and not ALGORITHMS[self.algorithm].kl_penalty:
            with_kl = ", ".join(sorted(n for n, a in ALGORITHMS.items() if a.kl_penalty))
            raise ValueError(f"training.kl_coef: {self.algorithm} applies no KL penalty; set 0, or use one of: {with_kl}")
        return self

    @property
    def algo_config(self) -> Any:
        """This trial's algorithm config, validated by the algorithm's config class."""
        return _validate_algorithm_config(self.algorithm, self.algorithm_config.get(self.algorithm, {}))

    @property
    def label(self) -> str:
        return f"{self.algorithm}/{self.dataset}/s{self.seed}" + ("" if self.data_seed is None else f"/d{self.data_seed}")

    @property
    def problem_seed(self) -> int:
        """The seed of the trial's training problems: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def cpus(self) -> float:
        return self.rollout.replicas * self.rollout.cpus + self.resources.learners * self.resources.cpus_per_learner


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed at `loc` (a pydantic error location) inside `model`."""
    import typing

    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def _validate_algorithm_config(name: str, raw: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from rlsparsity.platform.algorithms import get_algorithm

    config = get_algorithm(name).config
    try:
        return config.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = f"algorithm_config.{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            if err["type"] == "extra_forbidden":
                msg += f" (allowed here: {', '.join(fields_at(config, err['loc'][:-1]))})"
            elif err["type"] == "literal_error":
                msg += f" (got {err['input']!r})"
            problems.append(msg)
        # One line per problem; the sweep spec's error report indents each.
        raise ValueError("\n  ".join(problems)) from None
