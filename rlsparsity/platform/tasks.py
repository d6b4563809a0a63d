"""Synthetic tasks with verifiable answers (the embedded default data).

Every task is generated from a seed, so a sweep needs no dataset download. Each task
partitions its whole operand space into a train part and a test part by a stable hash
of the operands (not by the seed), so no test problem ever appears in a train sample,
whatever seeds the two samples were drawn with.

Two renderings exist for every problem:

- ``native``: the terse format the embedded base model is pretrained on
  (prompt ``"12+345="``, completion ``"357"``);
- ``ood``: a wording the base model never saw in pretraining
  (prompt ``"Q: what is 12 plus 345?\\nA:"``, completion ``" 357"``). It exists for the
  SFT "out-of-distribution" baseline: supervised fine-tuning on text in a style the
  model was not trained on gives a dense update to compare RL's sparse one against.

A third, ``chat``, is for instruction-tuned models (SmolLM2-Instruct, say): the question in
words as one user turn of the tokenizer's chat template (`chat_prompts`), answered by the
number alone. The base model of the embedded defaults has no chat template.

Reward rule (``reward``): the completion text is cut at the first EOS marker (if the
decoded text still contains one), surrounding whitespace is stripped, and the result
must equal the answer exactly (1.0) or it scores 0.0. A completion that stopped without
EOS (it hit ``max_new_tokens``) is judged on all of its text.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from rlsparsity.platform import answers

Split = Literal["train", "test"]
Style = Literal["native", "ood"]

EOS_TEXT = "<eos>"  # must match the tokenizer's EOS token (models.tokenizer.EOS)
STYLES: tuple[str, ...] = ("native", "ood")
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One problem instance. ``prompt``/``answer`` are the native rendering."""

    task: str
    operands: tuple[int, ...]
    prompt: str
    answer: str


def reward(completion_text: str, answer: str) -> float:
    """1.0 if the completion (cut at EOS, whitespace-stripped) equals ``answer``, else 0.0."""
    text = completion_text.split(EOS_TEXT, 1)[0].strip()
    return 1.0 if text == answer.strip() else 0.0


def last_number_reward(completion_text: str, answer: str) -> float:
    """1.0 if the last number in the completion (cut at EOS, thousands commas dropped) is the
    answer: the usual answer extraction for chat models, which wrap the number in words
    ("47 times 3 is 141.")."""
    numbers = re.findall(r"-?\d+", completion_text.split(EOS_TEXT, 1)[0].replace(",", ""))
    return 1.0 if numbers and numbers[-1] == answer.strip() else 0.0


def gsm8k_reward(completion_text: str, answer: str) -> float:
    """1.0 if the completion's GSM8K answer (after its last ``####``, else its last number) is
    the number ``answer``; see `answers`."""
    return 1.0 if answers.gsm8k_equal(completion_text.split(EOS_TEXT, 1)[0], answer) else 0.0


def boxed_reward(completion_text: str, answer: str) -> float:
    """1.0 if the completion's last ``\\boxed{}`` equals ``answer`` after MATH's normalisation."""
    return 1.0 if answers.boxed_equal(completion_text.split(EOS_TEXT, 1)[0], answer) else 0.0


# `training.reward` names one of these.
REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact": reward, "last_number": last_number_reward, "gsm8k": gsm8k_reward, "boxed": boxed_reward,
}


def register_reward(name: str) -> Callable[[Callable[[str, str], float]], Callable[[str, str], float]]:
    """Decorator: register ``fn(completion_text, answer) -> float`` as ``training.reward: name``."""

    def deco(fn: Callable[[str, str], float]) -> Callable[[str, str], float]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return deco


def answer_correct(completion_text: str, answer: str) -> float:
    """1.0 if the first line of the completion is the answer, whatever follows it.

    `reward` also asks the model to stop after the answer; this asks only whether it knows
    the answer, so the two separate learning to stop from learning arithmetic.
    """
    return reward(completion_text.split(EOS_TEXT, 1)[0].split("\n", 1)[0], answer)


def _split_of(task: str, operands: tuple[int, ...], test_fraction_pct: int) -> Split:
    # A stable hash (not Python's salted hash()) of the operands decides the split once and
    # for all, so train and test samples are disjoint for any seeds.
    key = f"{task}:{','.join(map(str, operands))}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return "test" if h % 100 < test_fraction_pct else "train"


@dataclass(frozen=True)
class Task:
    """A binary arithmetic task: ``a OP b`` with operands drawn by ``sample_operands``.

    Subclasses (or instances) define the operand distribution and the answer function.
    ``spec()`` lists everything that defines the data; it goes into the embedded model's
    recipe hash so changing a task retrains the cached model.
    """

    name: str
    symbol: str  # native operator, e.g. "+"
    word: str  # OOD operator wording, e.g. "plus"
    fn: Callable[[int, int], int] = field(repr=False)
    sample_operands: Callable[[random.Random], tuple[int, int]] = field(repr=False)
    max_answer_len: int = 4
    test_fraction_pct: int = 20
    version: int = 1
    params: tuple[tuple[str, Any], ...] = ()

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "test_fraction_pct": self.test_fraction_pct,
            **dict(self.params),
        }

    @property
    def max_new_tokens(self) -> int:
        """Enough tokens for the longest answer in either style, plus EOS."""
        return self.max_answer_len + 2

    def make(self, a: int, b: int) -> Problem:
        return Problem(
            task=self.name,
            operands=(a, b),
            prompt=f"{a}{self.symbol}{b}=",
            answer=str(self.fn(a, b)),
        )

    def split_of(self, problem: Problem) -> Split:
        return _split_of(self.name, problem.operands, self.test_fraction_pct)

    def problems(self, split: Split, n: int, seed: int) -> list[Problem]:
        """``n`` problems of ``split``, drawn with replacement; deterministic in ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        # Seed a private RNG from (task, split, seed) so different tasks/splits do not
        # share streams; rejection-sample operands that fall into the wanted split.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < n:
            a, b = self.sample_operands(rng)
            if _split_of(self.name, (a, b), self.test_fraction_pct) == split:
                out.append(self.make(a, b))
        return out

    def render(self, problem: Problem, style: Style = "native") -> tuple[str, str]:
        """(prompt, completion) of ``problem`` in ``style``."""
        if style == "native":
            return problem.prompt, problem.answer
        if style == "ood":
            a, b = problem.operands
            return f"Q: what is {a} {self.word} {b}?\nA:", f" {problem.answer}"
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")

    def question(self, problem: Problem) -> str:
        """The problem in words, for a chat model's user turn."""
        a, b = problem.operands
        return f"What is {a} {self.word} {b}? Reply with the number only."


class TaskLike(Protocol):
    """What trials use of a task: the synthetic `Task`s and the real datasets
    (`rlsparsity.platform.datasets.DatasetTask`) both provide it."""

    name: str

    @property
    def max_new_tokens(self) -> int: ...

    def spec(self) -> dict[str, Any]: ...

    def problems(self, split: Split, n: int, seed: int) -> list[Problem]: ...

    def render(self, problem: Problem, style: Style = "native") -> tuple[str, str]: ...

    def question(self, problem: Problem) -> str: ...


def chat_prompts(task: TaskLike, problems: list[Problem], tokenizer: Any) -> list[Problem]:
    """``problems`` with each prompt rendered as a user turn of ``tokenizer``'s chat template,
    ending where the assistant's answer begins. Answers are unchanged."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat prompts need a tokenizer with a chat template; {getattr(tokenizer, 'name_or_path', '?')} has none")
    return [
        replace(p, prompt=tokenizer.apply_chat_template(
            [{"role": "user", "content": task.question(p)}], add_generation_prompt=True, tokenize=False
        ))
        for p in problems
    ]


# `dataset` names one of these: the synthetic tasks, and the datasets of
# `rlsparsity.platform.datasets` (gsm8k, math, and any a plugin registers).
TASKS: dict[str, TaskLike] = {}


def register_task(name: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator: register the Task returned by a zero-argument factory under ``name``."""

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        task = factory()
        if task.name != name:
            raise ValueError(f"factory for {name!r} built a task named {task.name!r}")
        TASKS[name] = task
        return factory

    return deco


def get_task(name: str | TaskLike | Any) -> TaskLike:
    """The task a trial's ``dataset`` names: a registered name, a dataset mapping (anything
    with ``as_task()``: `rlsparsity.platform.datasets.DatasetSpec`), or a task itself."""
    if not isinstance(name, str):
        as_task = getattr(name, "as_task", None)
        return as_task() if callable(as_task) else name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; allowed tasks: {', '.join(sorted(TASKS))}"
        ) from None


def _digits_uniform(rng: random.Random, min_digits: int, max_digits: int) -> int:
    # Pick the digit count first, then a number with that many digits: short operands
    # are as common as long ones (uniform over 0..999 would be 90 % three-digit).
    d = rng.randint(min_digits, max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10**d - 1)


ADD_MAX_DIGITS = 3
MUL_A_DIGITS = (1, 2)
MUL_B_MAX = 9


@register_task("add")
def _add() -> Task:
    return Task(
        name="add",
        symbol="+",
        word="plus",
        fn=lambda a, b: a + b,
        sample_operands=lambda rng: (
            _digits_uniform(rng, 1, ADD_MAX_DIGITS),
            _digits_uniform(rng, 1, ADD_MAX_DIGITS),
        ),
        max_answer_len=ADD_MAX_DIGITS + 1,
        params=(("digits", [1, ADD_MAX_DIGITS]),),
    )


@register_task("mul")
def _mul() -> Task:
    return Task(
        name="mul",
        symbol="*",
        word="times",
        fn=lambda a, b: a * b,
        sample_operands=lambda rng: (
            _digits_uniform(rng, *MUL_A_DIGITS),
            rng.randint(0, MUL_B_MAX),
        ),
        max_answer_len=MUL_A_DIGITS[1] + 1,
        params=(("a_digits", list(MUL_A_DIGITS)), ("b_max", MUL_B_MAX)),
    )

