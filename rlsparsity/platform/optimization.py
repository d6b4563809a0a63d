"""The learner's optimizers: `training.optimizer` for the policy, AdamW for side models,
transformers' learning-rate schedules, and the shuffled minibatches of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from rlsparsity.platform.config import TrainingSpec


def lr_schedule(opt: torch.optim.Optimizer, t: TrainingSpec) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule, evaluated one step ahead: optimizer step i (from 0) uses the
    factor at i + 1, so warmup ramps (i + 1) / (warmup + 1) and no step runs at lr 0 (on
    noisy policy gradients Adam's first steps move every weight by about lr whatever the
    gradient's size, so the warmup matters, and a step at lr 0 would be wasted)."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler needs to start at last_epoch=0
    warmup, total = t.warmup_steps + 1, t.steps + 1
    if t.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(opt, warmup, last_epoch=0)
    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[t.lr_schedule]
    return make(opt, warmup, total, last_epoch=0)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, t: TrainingSpec,
                   kind: str | None = None) -> torch.optim.Optimizer:
    """`training.optimizer` for the policy (side models pass kind="adamw"). Under precision
    bf16 the parameters are bf16, and torch keeps the optimizer's state in their dtype."""
    if (kind or t.optimizer) == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.sgd_momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def minibatch_rows(n_rows: int, n_minibatches: int, group: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled row indices per minibatch; a prompt's group of samples stays together."""
    n_groups = n_rows // group
    if n_minibatches > n_groups:
        raise ValueError(f"minibatches={n_minibatches} but the step has only {n_groups} groups of rows")
    order = torch.randperm(n_groups, generator=gen)
    return [(g[:, None] * group + torch.arange(group)).view(-1) for g in order.tensor_split(n_minibatches)]


@dataclass
class Optimized:
    """One trained model's parameters with its optimizer, schedule and clipping."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None
