"""What one trial runs: a `TrialSpec`, every field a scalar, names checked against the registries.

The sweep layer (`rlsparsity.sweeps.spec`) makes grids of these; the platform only ever
sees one validated `TrialSpec`. Custom algorithms and tasks register on import, so a
process must import the sweep's plugins (`rlsparsity.platform.plugins`) before it
validates a spec that names them.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlsparsity.platform.algorithms import ALGORITHMS, get_algorithm
from rlsparsity.platform.config import (
    ResourcesSpec,
    RolloutSpec,
    Strict,
    TrackingSpec,
    TrainingSpec,
)
from rlsparsity.platform.datasets import DatasetSpec, parse_dataset, training_defaults
from rlsparsity.platform.sources import SOURCES
from rlsparsity.platform.tasks import REWARDS


class TrialSpec(Strict):
    """One trial: every field is a scalar."""

    name: str = "sweep"
    model: str = "embedded:tiny-arith"
    dataset: str | DatasetSpec = Field(
        "add", description="a registered task or dataset (add, mul, gsm8k, math, ...), or a dataset mapping "
        "(rlsparsity.platform.datasets.DatasetSpec: path or files, question, answer, answer_format, splits)"
    )
    algorithm: str = "grpo"
    # Per-algorithm knobs, keyed by algorithm name, so one sweep spec can carry the settings
    # of every algorithm on its grid; each trial validates and uses its own entry.
    algorithm_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0
    data_seed: int | None = Field(
        None, description="seeds which training problems (and offline pairs) the trial draws; default: seed. "
        "Vary it apart from seed, which keeps the learner's init and the sampling, to separate data from the rest"
    )
    variant: str | None = Field(None, description="the name of the sweep's variant this trial runs (set from `variants`)")
    plugins: tuple[str, ...] = Field(
        (), description="modules imported in every process of the sweep before its spec is validated: "
        "custom algorithms, tasks, rewards and batch sources register there"
    )
    training: TrainingSpec = TrainingSpec()
    rollout: RolloutSpec = RolloutSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # reads $MLFLOW_TRACKING_URI per spec
    analysis: bool = Field(True, description="run the overlap analysis after the sweep")
    # Set by the sweep: the grid axes a label would not otherwise show ("/lr=1e-05"), so
    # that every trial of a grid has its own label.
    _axis_label: str = PrivateAttr("")

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        if v not in ALGORITHMS:
            raise ValueError(f"unknown {info.field_name} {v!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
        return v

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> str | DatasetSpec:
        return parse_dataset(v)

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        # A real dataset brings its reward and chat prompts, unless the spec names its own.
        if not isinstance(data, dict):
            return data
        defaults = training_defaults(data.get("dataset", "add"))
        training = data.get("training", {})
        if not defaults:
            return data
        if isinstance(training, TrainingSpec):
            training = training.model_copy(update={k: v for k, v in defaults.items() if k not in training.model_fields_set})
        elif isinstance(training, dict):
            training = {**defaults, **training}
        return {**data, "training": training}

    @model_validator(mode="after")
    def _valid_algorithm_config(self) -> TrialSpec:
        for name, raw in self.algorithm_config.items():
            if name not in ALGORITHMS:
                raise ValueError(f"algorithm_config.{name}: unknown algorithm; allowed: {', '.join(sorted(ALGORITHMS))}")
            if name == self.algorithm or raw:
                _validate_algorithm_config(name, raw)
        source = ALGORITHMS[self.algorithm].source
        if source not in SOURCES:
            raise ValueError(f"algorithm: {self.algorithm} reads batch source {source!r}, which is not registered; registered: {', '.join(sorted(SOURCES))}")
        if self.training.reward not in REWARDS:
            raise ValueError(f"training.reward: unknown reward {self.training.reward!r}; allowed: {', '.join(sorted(REWARDS))}")
        if self.algorithm not in self.algorithm_config:
            _validate_algorithm_config(self.algorithm, {})
        if self.resources.strategy == "fsdp" and self.training.subnetwork is not None:
            raise ValueError("resources.strategy: fsdp does not train a subnetwork (training.subnetwork masks "
                             "whole tensors on one rank); use ddp")
        if self.training.kl_coef > 0 and not ALGORITHMS[self.algorithm].kl_penalty:
            with_kl = ", ".join(sorted(n for n, a in ALGORITHMS.items() if a.kl_penalty))
            raise ValueError(f"training.kl_coef: {self.algorithm} applies no KL penalty; set 0, or use one of: {with_kl}")
        return self

    @property
    def algo_config(self) -> Any:
        """This trial's algorithm config, validated by the algorithm's config class."""
        return _validate_algorithm_config(self.algorithm, self.algorithm_config.get(self.algorithm, {}))

    @property
    def dataset_label(self) -> str:
        """The dataset's name in labels and tags: the registered name, or the mapping's label."""
        return self.dataset if isinstance(self.dataset, str) else self.dataset.label

    @property
    def base_label(self) -> str:
        """algorithm/dataset/seed[/data seed][/axis=value...]: the grid point, whatever the subnetwork."""
        return (f"{self.algorithm}/{self.dataset_label}/s{self.seed}" + ("" if self.data_seed is None else f"/d{self.data_seed}")
                + self._axis_label)

    @property
    def setting_label(self) -> str:
        """What the label adds after algorithm/dataset/seed: the other grid axes and the
        subnetwork kind (lr=1e-05/precision=bf16), for tables."""
        sub = self.training.subnetwork
        return (self._axis_label + ("" if sub is None else f"/{sub.kind}")).lstrip("/")

    @property
    def label(self) -> str:
        """The base label, plus the subnetwork's kind for a masked trial (grpo/add/s0/learned)."""
        sub = self.training.subnetwork
        return self.base_label + ("" if sub is None else f"/{sub.kind}")

    @property
    def problem_seed(self) -> int:
        """The seed of the trial's training problems: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def cpus(self) -> float:
        return self.rollout.replicas * self.rollout.cpus + self.resources.learners * self.resources.cpus_per_learner

    def gpus(self) -> float:
        return self.rollout.replicas * self.rollout.gpus + self.resources.learners * self.resources.gpus_per_learner

    def describe_resources(self) -> str:
        """What one trial reserves, for a dry run: its learners and rollout replicas."""
        r, ro = self.resources, self.rollout

        def each(cpus: float, gpus: float) -> str:
            return f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")

        engine = ro.backend + (f", tensor parallel {ro.vllm.tensor_parallel_size}, {ro.vllm.dtype}, "
                               f"gpu_memory_utilization {ro.vllm.gpu_memory_utilization:g}" if ro.backend == "vllm" else "")
        micro = self.training.micro_batch_size
        learner = f"precision {self.training.precision}, {r.strategy}" + (f", micro-batches of {micro}" if micro else "")
        return (f"{r.learners} learner(s) x ({each(r.cpus_per_learner, r.gpus_per_learner)}, {learner}); {ro.replicas} rollout replica(s) x ({each(ro.cpus, ro.gpus)}; {engine}); "
                f"per trial {self.cpus():g} CPU, {self.gpus():g} GPU")


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed at `loc` (a pydantic error location) inside `model`."""
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
