"""The algorithm registry: adding an algorithm is one decorated loss function plus a config.

    class MyConfig(AlgorithmConfig):
        beta: float = 0.1

    @register_algorithm("my_algo", source="rollouts", config=MyConfig)
    def my_loss(models: Models, batch: StepBatch, cfg: MyConfig, train: TrainingSpec):
        ...
        return loss, {"some_metric": value}

`source` says where the learner gets a step's batch:

- ``rollouts``: completions sampled from the rollout actors, scored by the task's reward
  (`StepBatch.tokens`, `.rewards`, `.group_size`);
- ``pairs``: preference pairs (`StepBatch.pairs`), from the algorithm config's ``pairs``
  source: an offline preference dataset or on-policy samples ranked by reward;
- ``dataset``: supervised examples (`StepBatch.tokens`).

A trial's `algorithm_config.<name>` section is validated against the algorithm's config
class, so a sweep spec error names the field. Side models that train with the policy
(PPO's critic, PRIME's reward model) come from ``aux``: a factory returning `AuxModel`s,
each with its own optimizer settings; their losses are part of the returned loss.
``kl_penalty=True`` declares that the loss applies `training.kl_coef`; a trial asking an
algorithm without it for a KL penalty is refused rather than silently run without one.
``prepare`` runs once per step before the update passes, on the whole batch and without
gradients: it computes what must stay fixed across PPO-style epochs (behaviour log-probs,
values, advantages, PRIME's token rewards) into `StepBatch.old_logps` / `.extras`.

With `training.micro_batch_size` the learner runs a minibatch's forward and backward in
row blocks and accumulates their gradients (`rlsparsity.platform.micro_batches`). A loss
then sees a micro-batch, so what needs the whole step's rows (group baselines, whitening,
batch statistics) belongs in ``prepare``. ``mean_over`` says what the loss averages over,
so that each micro-batch's loss is weighted by its share of the minibatch and the
accumulated gradient is the minibatch's: ``"rows"`` (the default: sequences, or pairs),
``"completion_tokens"``, a function ``(batch, cfg) -> size`` (a loss normalised over every
rank's tokens returns the all-ranks count), or ``"whole"`` for a loss whose terms average
over different units: it divides each by the minibatch's count itself (`whole_share`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from rlsparsity.platform.batches import TokenBatch
from rlsparsity.platform.config import Strict

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec

# A batch source registered in `rlsparsity.platform.sources` (rollouts, pairs, dataset, ...).
Source = str
PairSource = Literal["offline", "best_vs_worst", "random_negative"]


class AlgorithmConfig(Strict):
    """An algorithm's own knobs: the trial's `algorithm_config.<name>` section (strict like
    the spec: unknown keys and YAML's yes/no for numbers are refused)."""

    epochs: int = Field(1, ge=1, description="passes over each step's batch (PPO's epochs)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass; rows split evenly")


@dataclass
class PairBatch:
    """Preference pairs: row i of `chosen` and row i of `rejected` answer the same prompt."""

    chosen: TokenBatch
    rejected: TokenBatch


@dataclass
class StepBatch:
    tokens: TokenBatch | None = None
    rewards: torch.Tensor | None = None  # (B,), rollouts only
    group_size: int = 1  # samples per prompt; rows of one group are contiguous
    old_logps: torch.Tensor | None = None  # (B, T-1) behaviour log-probs; None = on-policy
    pairs: PairBatch | None = None  # `pairs` source only
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row tensors from `prepare`
    # A micro-batch's minibatch (None: this batch is the minibatch), for losses that
    # normalise by the minibatch's counts themselves (mean_over="whole").
    whole: StepBatch | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pairs.chosen.input_ids) if self.pairs is not None else len(self.tokens.input_ids)

    def to(self, device: torch.device) -> StepBatch:
        """The batch on the learner's device (sources build it on the CPU)."""
        def tb(b: TokenBatch | None) -> TokenBatch | None:
            return None if b is None else b.to(device)

        return StepBatch(
            tokens=tb(self.tokens),
            rewards=None if self.rewards is None else self.rewards.to(device),
            group_size=self.group_size,
            old_logps=None if self.old_logps is None else self.old_logps.to(device),
            pairs=None if self.pairs is None else PairBatch(tb(self.pairs.chosen), tb(self.pairs.rejected)),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )

    def select(self, rows: torch.Tensor) -> StepBatch:
        """The sub-batch of `rows` (a minibatch); every per-row tensor is indexed alike."""
        def tb(b: TokenBatch | None) -> TokenBatch | None:
            return None if b is None else TokenBatch(b.input_ids[rows], b.attention_mask[rows], b.completion_mask[rows])

        return StepBatch(
            tokens=tb(self.tokens),
            rewards=None if self.rewards is None else self.rewards[rows],
            group_size=self.group_size,
            old_logps=None if self.old_logps is None else self.old_logps[rows],
            pairs=None if self.pairs is None else PairBatch(tb(self.pairs.chosen), tb(self.pairs.rejected)),
            extras={k: v[rows] for k, v in self.extras.items()},
        )


@dataclass
class Models:
    """What a loss sees. `reference` is the frozen θ0 (one per learner, shared by every use)."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None = None
    aux: dict[str, torch.nn.Module] = field(default_factory=dict)


@dataclass
class AuxModel:
    """A side model trained alongside the policy, with its own AdamW settings."""

    module: torch.nn.Module
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


LossFn = Callable[[Models, StepBatch, Any, "TrainingSpec"], tuple[torch.Tensor, dict[str, float]]]
AuxFactory = Callable[[torch.nn.Module, Any, "TrainingSpec"], dict[str, AuxModel]]
PrepareFn = Callable[[Models, StepBatch, Any, "TrainingSpec"], StepBatch]
# What a loss averages over: a unit's name, or a function giving a batch's size in it.
MeanOver = Literal["rows", "completion_tokens", "whole"] | Callable[[StepBatch, Any], torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    name: str
    source: Source
    loss: LossFn
    config: type[AlgorithmConfig] = AlgorithmConfig
    uses_reference: bool = False  # True when it needs θ0 even without a KL penalty
    aux: AuxFactory | None = None
    prepare: PrepareFn | None = None
    kl_penalty: bool = False  # True when its loss applies `training.kl_coef`
    mean_over: MeanOver = "rows"  # how micro-batches of a minibatch are weighted


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(
    name: str,
    *,
    source: Source,
    config: type[AlgorithmConfig] = AlgorithmConfig,
    uses_reference: bool = False,
    aux: AuxFactory | None = None,
    prepare: PrepareFn | None = None,
    kl_penalty: bool = False,
    mean_over: MeanOver = "rows",
) -> Callable[[LossFn], LossFn]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        # The name becomes MLflow param keys, run labels and paths: keep it plain.
        raise ValueError(f"algorithm name {name!r}: use lowercase letters, digits and _ (e.g. 'raftpp')")
    if source == "pairs" and "pairs" not in config.model_fields:
        raise ValueError(f"algorithm {name!r} reads preference pairs: its config needs a `pairs` field")
    if isinstance(mean_over, str) and mean_over not in ("rows", "completion_tokens", "whole"):
        raise ValueError(f"algorithm {name!r}: mean_over={mean_over!r}; use rows, completion_tokens, whole or a function")

    def deco(fn: LossFn) -> LossFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        ALGORITHMS[name] = Algorithm(name, source, fn, config, uses_reference, aux, prepare, kl_penalty, mean_over)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
