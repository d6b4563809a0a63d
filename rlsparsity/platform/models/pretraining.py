"""Pretraining the embedded model θ0 from its recipe, its evaluation, and the model directory.

The data stream, initialisation and learning-rate schedule are fixed by the recipe, so a
recipe (and its hash) defines the weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlsparsity.platform import tasks as tasks_mod
from rlsparsity.platform.models.loading import model_content_hash
from rlsparsity.platform.models.recipe import (
    Recipe,
    TrainRecipe,
    hash_payload,
    llama_config,
    recipe_hash,
)
from rlsparsity.platform.models.tokenizer import build_tokenizer


def _encode_documents(
    tokenizer: PreTrainedTokenizerBase, docs: list[list[tuple[str, str]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels for documents of problems.

    A document is ``<bos>p1c1\np2c2\n…pkck<eos>``. The labels are each answer and the
    separator after it (newline, or EOS at the end), -100 elsewhere: the model learns to
    answer and where a document goes on, not to predict the random operands of prompts.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    bos = tokenizer("")["input_ids"]  # what the tokenizer prepends to a prompt
    seqs, labels_ = [], []
    for doc in docs:
        ids, labels = list(bos), [-100] * len(bos)
        for i, (prompt, completion) in enumerate(doc):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos if i == len(doc) - 1 else newline]
            ids += p + c
            labels += [-100] * len(p) + c
        seqs.append(ids)
        labels_.append(labels)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels_, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
    return ids, labels


def _lr_at(step: int, t: TrainRecipe) -> float:
    # Linear warmup reaching t.lr at the end of step warmup_steps - 1, then cosine to
    # min_lr_ratio * t.lr. Not transformers' schedule: its warmup starts at 0 at step 0,
    # one step behind this one, and θ0 (content-addressed by the recipe hash) was trained
    # with this one.
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cos)


def pretrain(
    recipe: Recipe, *, log_every: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train the embedded model from scratch; returns (model, tokenizer, stats)."""
    t = recipe.train
    tokenizer = build_tokenizer(model_max_length=recipe.arch.max_position_embeddings)
    torch.manual_seed(t.seed)
    model = LlamaForCausalLM(llama_config(recipe, tokenizer))
    model.train()
    # Fixed data stream: per step, choose each document's task by the mixture weights and
    # its length uniformly in doc_problems, then draw that many native-style train problems.
    # All from seeded RNGs, so a recipe fully defines the data.
    mix_rng = random.Random(f"pretrain-mix/{t.seed}")
    names = [n for n, _ in t.tasks]
    weights = [w for _, w in t.tasks]
    counts = {n: 0 for n in names}
    per_step = [
        [(n, mix_rng.randint(*t.doc_problems)) for n in mix_rng.choices(names, weights, k=t.batch_size)]
        for _ in range(t.steps)
    ]
    for step_docs in per_step:
        for n, k in step_docs:
            counts[n] += k
    pools = {
        n: iter(tasks_mod.get_task(n).problems("train", counts[n], seed=t.seed)) for n in names
    }
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(0.9, 0.98), weight_decay=t.weight_decay
    )
    start = time.perf_counter()
    cpu_start = time.process_time()
    losses: list[float] = []
    for step in range(t.steps):
        docs = []
        for n, k in per_step[step]:
            task = tasks_mod.get_task(n)
            docs.append([task.render(next(pools[n]), "native") for _ in range(k)])
        ids, labels = _encode_documents(tokenizer, docs)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, t)
        # No attention mask: padding is on the right, so causal attention already keeps
        # every real token from seeing pads (and SDPA runs its fast unmasked path).
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {recipe.name}: pretraining step {step + 1}/{t.steps}, loss "
                  f"{sum(losses[-log_every:]) / log_every:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    stats = {
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 2),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
    }
    return model, tokenizer, stats


def evaluate_embedded(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe
) -> dict[str, Any]:
    """Greedy test accuracy per task, in the layout of eval.json."""
    from rlsparsity.platform.generation import greedy_accuracy

    t = recipe.train
    acc, answer_acc = {}, {}
    for name, _ in t.tasks:
        task = tasks_mod.get_task(name)
        probs = task.problems("test", t.eval_n, seed=t.eval_seed)
        acc[name] = greedy_accuracy(model, tokenizer, task, probs)
        answer_acc[name] = greedy_accuracy(model, tokenizer, task, probs, score=tasks_mod.answer_correct)
    # accuracy: the reward's (answer, then stop); answer_accuracy: the first line only.
    return {"split": "test", "n": t.eval_n, "seed": t.eval_seed, "accuracy": acc, "answer_accuracy": answer_acc}


def build_embedded_model(recipe: Recipe, out_dir: Path, *, log_every: int = 0) -> dict:
    """Pretrain ``recipe`` and write a complete HF model directory into ``out_dir``."""
    model, tokenizer, stats = pretrain(recipe, log_every=log_every)
    evaluation = evaluate_embedded(model, tokenizer, recipe)
    evaluation.update(stats)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)  # safetensors in transformers 5
    tokenizer.save_pretrained(out_dir)
    import tokenizers
    import transformers

    _write_json(
        out_dir / "recipe.json",
        {
            "hash": recipe_hash(recipe),
            **hash_payload(recipe),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
        },
    )
    model_content_hash(out_dir)  # writes the sidecar while the directory is private
    # eval.json last: its presence (with the rest) marks a finished build.
    _write_json(out_dir / "eval.json", evaluation)
    return evaluation


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
