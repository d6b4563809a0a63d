"""Token batches for the learner: prompt + completion sequences and per-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Right-padded sequences; `completion_mask[b, t]` marks tokens the loss is taken on.

    `completion_mask` is aligned with the *predicted* token: position t of the mask refers
    to input_ids[:, t + 1], matching `token_logprobs`.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T-1) float

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    """Concatenate each prompt with its completion and right-pad to the longest."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return TokenBatch(ids, attn, comp)


def token_logprobs(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """log π(x_{t+1} | x_{≤t}) for every position, shape (B, T-1)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    # bf16 logits are upcast for the softmax; float64 ones (precision tests) stay float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)
