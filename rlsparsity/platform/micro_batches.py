"""Gradient accumulation: a minibatch's forward and backward in row blocks that fit the
device (`training.micro_batch_size`), their gradients summed into the minibatch's.

Each micro-batch's loss is weighted by its share of the minibatch in the unit its
algorithm's loss averages over (`Algorithm.mean_over`: rows, completion tokens, every
rank's tokens, ...), so the accumulated gradient is the whole minibatch's, up to float
summation order; a loss with ``mean_over="whole"`` scales its terms itself. Without a
micro-batch size, or when the minibatch fits in one, the loss runs once on the whole
minibatch, exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlsparsity.platform.algorithms import Algorithm, Models, StepBatch
from rlsparsity.platform.algorithms.common import world_size
from rlsparsity.platform.config import TrainingSpec


def micro_batch_count(rows: int, micro_batch_size: int | None, device: torch.device) -> int:
    """Micro-batches per minibatch: the same on every rank (the most any rank needs), since
    FSDP's reduce-scatters and a loss's all-ranks counts are collectives per micro-batch.
    `device` is the batch's: NCCL reduces CUDA tensors only."""
    if micro_batch_size is None:
        return 1
    count = torch.tensor(-(-rows // micro_batch_size), device=device)
    if world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def size_in(batch: StepBatch, algo: Algorithm, cfg: Any) -> torch.Tensor:
    """A batch's size in the unit its algorithm's loss averages over."""
    unit = algo.mean_over
    if unit == "rows":
        return torch.tensor(float(len(batch)))
    if unit == "completion_tokens":
        return batch.tokens.completion_mask.sum().float()
    if unit == "whole":
        return torch.tensor(1.0)  # the loss scales itself: every real micro-batch weighs 1
    return torch.as_tensor(unit(batch, cfg)).float().cpu()


@dataclass
class MicroBatch:
    batch: StepBatch
    weight: float  # what its loss is multiplied by before the backward
    share: float  # its weight in the average of the loss's metrics


def split(batch: StepBatch, algo: Algorithm, cfg: Any, micro_batch_size: int | None) -> list[MicroBatch] | None:
    """The minibatch's micro-batches, or None when it runs whole. A rank with fewer rows than
    the count needs pads with zero-weight copies of its first row, so that every rank runs
    the same forwards and backwards."""
    tokens = batch.tokens if batch.tokens is not None else batch.pairs.chosen
    count = micro_batch_count(len(batch), micro_batch_size, tokens.input_ids.device)
    if count == 1:
        return None
    parts, sizes, rows_of = [], [], []
    for rows in torch.arange(len(batch)).tensor_split(count):
        part = batch.select(rows if len(rows) else torch.zeros(1, dtype=torch.long))
        part.whole = batch
        parts.append(part)
        rows_of.append(float(len(rows)))
        size = float(size_in(part, algo, cfg))  # on every part, in order: it may be a collective
        sizes.append(size if len(rows) else 0.0)
    total, rows = sum(sizes), sum(rows_of)
    weights = [size / total if total > 0 else 0.0 for size in sizes]
    if algo.mean_over == "whole":  # the loss scales itself; its metrics average by rows
        return [MicroBatch(p, 1.0 if n else 0.0, n / rows) for p, n in zip(parts, rows_of, strict=True)]
    return [MicroBatch(p, w, w) for p, w in zip(parts, weights, strict=True)]


def accumulate_gradients(
    algo: Algorithm,
    models: Models,
    batch: StepBatch,
    cfg: Any,
    train: TrainingSpec,
    *,
    scale: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Backward the minibatch's loss, times `scale`, into the trained models' `.grad` (which
    the caller zeroes), micro-batch by micro-batch. Returns the minibatch's loss (detached)
    and the loss's metrics, averaged over the micro-batches.

    Under DDP every micro-batch but the last runs in `no_sync`, so gradients are all-reduced
    once a minibatch; FSDP reduce-scatters each (its gradients stay sharded)."""
    parts = split(batch, algo, cfg, train.micro_batch_size)
    if parts is None:
        with autocast():
            loss, metrics = algo.loss(models, batch, cfg, train)
        (loss * scale if scale != 1.0 else loss).backward()
        return loss.detach(), metrics
    trained = [models.policy, *models.aux.values()]
    total, metrics = torch.zeros((), dtype=torch.float64), {}
    for i, part in enumerate(parts):
        with contextlib.ExitStack() as stack:
            if i < len(parts) - 1:
                for module in trained:
                    if hasattr(module, "no_sync"):  # DDP
                        stack.enter_context(module.no_sync())
            with autocast():
                loss, part_metrics = algo.loss(models, part.batch, cfg, train)
            (loss * (part.weight * scale)).backward()
        total += loss.detach().double().cpu() * part.weight
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value * part.share
    return total, metrics
