from __future__ import annotations

import pytest

from rlsparsity.platform import tasks
from rlsparsity.platform.tasks import REWARDS, TASKS, chat_prompts, get_task, reward


def test_registry_has_arithmetic_tasks() -> None:
    assert {"add", "mul"} <= set(TASKS)
    assert get_task("add") is TASKS["add"]
    assert get_task(TASKS["mul"]) is TASKS["mul"]


def test_unknown_task_error_lists_allowed_names() -> None:
    with pytest.raises(ValueError) as e:
        get_task("division")
    msg = str(e.value)
    assert "division" in msg
    for name in TASKS:
        assert name in msg


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("add")(lambda: TASKS["add"])


@pytest.mark.parametrize("name", ["add", "mul"])
def test_problems_deterministic_from_seed(name: str) -> None:
    t = get_task(name)
    a = t.problems("train", 200, seed=7)
    assert a == t.problems("train", 200, seed=7)
    assert a != t.problems("train", 200, seed=8)
    assert len(a) == 200
    for p in a[:50]:
        x, y = p.operands
        assert p.answer == str(t.fn(x, y))
        assert p.prompt == f"{x}{t.symbol}{y}="


@pytest.mark.parametrize("name", ["add", "mul"])
def test_train_test_disjoint(name: str) -> None:
    t = get_task(name)
    train = {p.operands for s in range(3) for p in t.problems("train", 5000, seed=s)}
    test = {p.operands for s in range(3) for p in t.problems("test", 2000, seed=s)}
    assert train and test
    assert not train & test
    # The split is a property of the operands, not of the sample.
    assert all(t.split_of(t.make(*ops)) == "test" for ops in list(test)[:100])


def test_split_validation() -> None:
    with pytest.raises(ValueError, match="split"):
        get_task("add").problems("dev", 1, seed=0)  # type: ignore[arg-type]


def test_add_covers_one_to_three_digits() -> None:
    ps = get_task("add").problems("train", 3000, seed=0)
    lengths = {len(str(x)) for p in ps for x in p.operands}
    assert lengths == {1, 2, 3}


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("357", "357", 1.0),
        ("  357\n", "357", 1.0),
        ("357<eos>", "357", 1.0),
        ("357<eos>garbage", "357", 1.0),
        (" 357<eos><pad><pad>", "357", 1.0),
        ("3570", "357", 0.0),
        ("35", "357", 0.0),
        ("", "357", 0.0),
        ("<eos>357", "357", 0.0),
        ("357 is the answer", "357", 0.0),
        ("0357", "357", 0.0),
    ],
)
def test_reward_exact_match(text: str, answer: str, expected: float) -> None:
    assert reward(text, answer) == expected


def test_render_styles() -> None:
    t = get_task("add")
    p = t.make(12, 345)
    assert t.render(p) == ("12+345=", "357")
    assert t.render(p, "native") == (p.prompt, p.answer)
    ood_prompt, ood_completion = t.render(p, "ood")
    assert ood_prompt != p.prompt and "plus" in ood_prompt and "+" not in ood_prompt
    assert reward(ood_completion, p.answer) == 1.0
    with pytest.raises(ValueError, match="style"):
        t.render(p, "fancy")  # type: ignore[arg-type]


def test_render_ood_mul() -> None:
    t = get_task("mul")
    for p in t.problems("train", 50, seed=3):
        prompt, completion = t.render(p, "ood")
        assert prompt.startswith("Q: what is") and "times" in prompt and "*" not in prompt
        assert completion == f" {p.answer}" and reward(completion, p.answer) == 1.0


def test_task_spec_is_json_ready() -> None:
    import json

    for t in TASKS.values():  # the real datasets' specs: tests/test_datasets.py
        if not isinstance(t, tasks.Task):
            continue
        json.dumps(t.spec())
        assert t.max_new_tokens >= t.max_answer_len + 1


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("141", "141", 1.0),
        ("47 times 3 is 141.", "141", 1.0),
        ("2 x 7 = 14\n\nThe answer is 14", "14", 1.0),
        ("1,062", "1062", 1.0),
        ("141<eos>then 7", "141", 1.0),
        ("47 times 3 is 144.", "141", 0.0),
        ("141 or maybe 142", "141", 0.0),
        ("the answer", "141", 0.0),
        ("1410", "141", 0.0),
    ],
)
def test_last_number_reward(text: str, answer: str, expected: float) -> None:
    assert REWARDS["last_number"](text, answer) == expected
    assert REWARDS["exact"] is reward


def test_chat_prompts_use_the_tokenizer_template() -> None:
    from rlsparsity.platform.models import build_tokenizer

    tok = build_tokenizer()
    t = get_task("add")
    problems = [t.make(12, 345), t.make(7, 8)]
    with pytest.raises(ValueError, match="chat template"):
        chat_prompts(t, problems, tok)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    chat = chat_prompts(t, problems, tok)
    assert [p.prompt for p in chat] == [
        "[user] What is 12 plus 345? Reply with the number only.\n[assistant] ",
        "[user] What is 7 plus 8? Reply with the number only.\n[assistant] ",
    ]
    assert [(p.operands, p.answer) for p in chat] == [(p.operands, p.answer) for p in problems]
