from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from rlsparsity.platform import models
from rlsparsity.platform.generation import decode_completion, generate, greedy_accuracy
from rlsparsity.platform.tasks import get_task


@pytest.fixture(scope="module")
def random_model() -> tuple[LlamaForCausalLM, object]:
    """An untrained tiny model: sampling from it is near-uniform, ideal for RNG checks."""
    tok = models.build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(models.llama_config(models.get_recipe("tiny-arith"), tok))
    model.eval()
    return model, tok


PROMPTS = ["1+2=", "123+456=", "7*8=", "Q: what is 3 plus 4?\nA:"]


def test_same_seed_same_samples(random_model) -> None:
    model, tok = random_model
    a = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=11)
    b = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=11)
    c = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=12)
    assert a == b
    assert a != c
    assert len(a) == len(PROMPTS) and all(len(x) == 3 for x in a)
    # The n samples of one prompt differ from each other (near-uniform model).
    assert len({tuple(s) for s in a[0]}) > 1


def test_seed_does_not_touch_global_rng(random_model) -> None:
    model, tok = random_model
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, tok, PROMPTS, n=2, max_new_tokens=4, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_completion_shapes_and_eos_cut(random_model) -> None:
    model, tok = random_model
    eos = tok.eos_token_id
    outs = generate(model, tok, PROMPTS * 3, n=3, max_new_tokens=8, seed=0, batch_size=4)
    assert len(outs) == len(PROMPTS) * 3
    for per_prompt in outs:
        for ids in per_prompt:
            assert 1 <= len(ids) <= 8
            assert eos not in ids[:-1]  # cut right after the first EOS
            if len(ids) < 8:
                assert ids[-1] == eos


def test_greedy_is_deterministic_and_replicated(random_model) -> None:
    model, tok = random_model
    g1 = generate(model, tok, PROMPTS, n=3, temperature=0.0, max_new_tokens=5)
    g2 = generate(model, tok, PROMPTS, n=1, temperature=0.0, max_new_tokens=5, seed=99)
    assert all(len(x) == 3 and x[0] == x[1] == x[2] for x in g1)
    assert [x[0] for x in g1] == [x[0] for x in g2]


def test_generate_argument_validation(random_model) -> None:
    model, tok = random_model
    assert generate(model, tok, [], max_new_tokens=3) == []
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, n=0, max_new_tokens=3)
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, temperature=-1.0, max_new_tokens=3)


def test_decode_completion_drops_specials() -> None:
    tok = models.build_tokenizer()
    ids = tok("357", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_completion(tok, ids) == "357"


@pytest.mark.slow
def test_greedy_accuracy_matches_eval_json(embedded_model_dir: Path) -> None:
    model = models.load_model(embedded_model_dir)
    tok = models.load_tokenizer(embedded_model_dir)
    ev = json.loads((embedded_model_dir / "eval.json").read_text())
    for name, acc in ev["accuracy"].items():
        task = get_task(name)
        problems = task.problems(ev["split"], ev["n"], seed=ev["seed"])
        got = greedy_accuracy(model, tok, task, problems)
        # Same weights and batches as at build time; allow one flipped near-tie.
        assert abs(got - acc) <= 1.0 / ev["n"] + 1e-9, (name, got, acc)


@pytest.mark.slow
def test_left_padding_matches_unbatched(embedded_model_dir: Path) -> None:
    model = models.load_model(embedded_model_dir)
    tok = models.load_tokenizer(embedded_model_dir)
    task = get_task("add")
    prompts = [p.prompt for p in task.problems("test", 12, seed=0)]
    batched = generate(model, tok, prompts, temperature=0.0, max_new_tokens=6)
    single = [generate(model, tok, [p], temperature=0.0, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    # Completions start with a digit string in this in-distribution format. (θ0 was trained
    # on documents of 1-4 problems, so after an answer it usually writes a newline.)
    first_lines = [decode_completion(tok, x[0]).split("\n")[0] for x in batched]
    assert sum(line.isdigit() for line in first_lines) >= 10, first_lines
