"""Batched generation with transformers (the ``hf`` rollout engine) and greedy accuracy.

Prompts are left-padded so that every row of a batch ends at the same position and
``model.generate`` appends new tokens directly after each prompt. Completions come back
as token ids, cut after the first EOS (the EOS is kept when the model produced it, so a
learner can train on "stop here" too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlsparsity.platform.tasks import Problem, Style, Task, get_task, reward


def _cut_after_eos(ids: Sequence[int], eos_ids: set[int]) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return sorted(ids)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int,
    seed: int | None = None,
    batch_size: int = 64,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[list[list[int]]]:
    """For each prompt, ``n`` completions as token-id lists (completion tokens only).

    - ``temperature == 0`` is greedy decoding; the ``n`` completions are then identical.
    - ``temperature > 0`` samples from the full softmax (``top_k=0``, ``top_p=1.0``
      unless given), which is what on-policy RL losses assume.
    - ``seed`` makes sampling reproducible: the torch RNG is forked (the caller's RNG state
      is left untouched) and seeded once, so the same seed, prompts and batch size give
      the same samples. ``seed=None`` draws from the global RNG.
    - ``batch_size`` counts sequences (prompts × ``n``) per ``model.generate`` call.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompts:
        return []
    greedy = temperature == 0
    n_gen = 1 if greedy else n
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # An explicit GenerationConfig overrides whatever the checkpoint ships in
    # generation_config.json (e.g. top_k=50 or a default temperature), so the sampling
    # distribution is exactly the one asked for.
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else float(temperature),
        top_k=None if greedy else int(top_k),
        top_p=None if greedy else float(top_p),
        num_return_sequences=n_gen,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    device = model.device
    per_batch = max(1, batch_size // n_gen)
    results: list[list[list[int]]] = []
    forked = (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        if seed is not None
        else nullcontext()
    )
    with forked, torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
            input_ids = enc["input_ids"].to(device)
            attention_mask = enc["attention_mask"].to(device)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg
            )
            new = out[:, input_ids.shape[1] :].tolist()
            eos_set = set(eos_ids)
            for i in range(len(chunk)):
                rows = [_cut_after_eos(r, eos_set) for r in new[i * n_gen : (i + 1) * n_gen]]
                results.append(rows * n if greedy else rows)
    return results


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Completion text without special tokens (EOS, pad)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    problems: list[Problem],
    *,
    style: Style = "native",
    batch_size: int = 64,
    score: Callable[[str, str], float] = reward,
) -> float:
    """Mean ``score`` (default: the task reward) of the greedy completions of ``problems``."""
    if not problems:
        raise ValueError("greedy_accuracy needs at least one problem")
    t = get_task(task)
    prompts = [t.render(p, style)[0] for p in problems]
    outs = generate(
        model,
        tokenizer,
        prompts,
        n=1,
        temperature=0.0,
        max_new_tokens=t.max_new_tokens,
        batch_size=batch_size,
    )
    total = sum(
        score(decode_completion(tokenizer, o[0]), p.answer)
        for o, p in zip(outs, problems, strict=True)
    )
    return total / len(problems)
