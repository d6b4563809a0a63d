"""Real datasets as tasks: GSM8K, MATH, and any `datasets`-loadable JSON, Parquet or hub dataset.

A trial's ``dataset`` is a registered name (the synthetic ``add``/``mul``, or ``gsm8k`` and
``math`` from here) or a mapping, a `DatasetSpec`:

    dataset: {path: data/word_problems.jsonl, question: q, answer: a, answer_format: gsm8k,
              train_split: "train[:90%]", test_split: "train[90%:]"}
    dataset: {preset: gsm8k, path: /data/gsm8k}       # GSM8K's fields, from a local copy

``path`` is a local file (``.json``/``.jsonl``/``.parquet``), a local directory (splits from
the file names, as `datasets` reads them, or from ``<path>/<config>/``), or a hub dataset id;
``files`` maps split names to local files instead. The splits take `datasets`' slice syntax.
Each row's reference answer is extracted from the ``answer`` column by ``answer_format``
(`rlsparsity.platform.answers`), and a row without one is an error, as are unknown fields,
missing columns, empty splits and files that are not JSON or Parquet: each `DatasetError`
names the dataset, the file and the field. The sweep checks every dataset this way before
anything runs (`check_dataset`).

Problems are drawn from the loaded rows by seed (`DatasetTask.problems`); prompts are the
question plus an instruction on where to put the answer, as a user turn of the chat template
(``training.prompt_format: chat``, the default for these datasets, as is the reward that
matches ``answer_format``). Data loads through `datasets` and its cache (``HF_DATASETS_CACHE``,
``HF_HUB_OFFLINE``); dataset scripts are never run (`datasets` 4 removed them).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from rlsparsity.platform import answers
from rlsparsity.platform.config import Strict
from rlsparsity.platform.tasks import SPLITS, TASKS, Problem, Split, Style

AnswerFormat = Literal["gsm8k", "boxed", "last_number", "exact"]

# How the reference answer comes out of the answer column; None when it is not there.
REFERENCE: dict[str, Callable[[str], str | None]] = {
    "gsm8k": answers.gsm8k_reference,
    "boxed": answers.last_boxed,
    "last_number": answers.last_number,
    "exact": lambda text: text.strip() or None,
}
MISSING = {"gsm8k": "no '#### <number>'", "boxed": "no \\boxed{...}", "last_number": "no number", "exact": "nothing"}
# Each answer format's reward (a name in tasks.REWARDS), the trial's default.
REWARD_OF = {"gsm8k": "gsm8k", "boxed": "boxed", "last_number": "last_number", "exact": "exact"}
# Appended to the question: where the reward looks for the answer.
INSTRUCTIONS = {
    "gsm8k": 'Think step by step, then give the final answer as a number after "####".',
    "boxed": "Think step by step, then put the final answer within \\boxed{}.",
    "last_number": "Give the final answer as a number at the end.",
    "exact": "Reply with the answer only.",
}
PRESETS: dict[str, dict[str, str]] = {
    "gsm8k": {"path": "openai/gsm8k", "config": "main", "question": "question", "answer": "answer",
              "answer_format": "gsm8k"},
    # MATH (Hendrycks et al.): the original hub copy was taken down; this mirror keeps its
    # 7,500 train / 5,000 test problems, all subjects, with the original columns.
    "math": {"path": "DigitalLearningGmbH/MATH-lighteval", "config": "default", "question": "problem",
             "answer": "solution", "answer_format": "boxed"},
}
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Suffixes that mark a path as a local file even when it does not exist (for the error).
_LOCAL_SUFFIXES = {*FORMATS, ".csv", ".tsv", ".txt", ".arrow"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


class DatasetError(ValueError):
    """A dataset cannot be used; the message names the dataset, the file and the field."""


class DatasetSpec(Strict):
    """A dataset as a trial's ``dataset`` mapping (see the module docstring)."""

    name: str | None = None
    preset: Literal["gsm8k", "math"] | None = None
    path: str | None = None
    files: dict[str, str] | None = None
    format: Literal["json", "parquet"] | None = None
    config: str | None = None
    revision: str | None = None
    question: str = "question"
    answer: str = "answer"
    answer_format: AnswerFormat | None = None
    train_split: str = "train"
    test_split: str = "test"
    instruction: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_first(cls, data: Any) -> Any:
        # A preset fills what the mapping leaves out: {preset: gsm8k, path: DIR} is GSM8K
        # read from a local copy.
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            preset = {k: v for k, v in PRESETS[data["preset"]].items() if not (k == "path" and "files" in data)}
            return {**preset, **data}
        return data

    @model_validator(mode="after")
    def _complete(self) -> DatasetSpec:
        if (self.path is None) == (self.files is None):
            raise ValueError("give one of path (a local file or directory, or a hub dataset id) and files ({split: file})")
        if self.answer_format is None:
            raise ValueError(f"answer_format: required, one of {', '.join(REFERENCE)}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name: {self.name!r} enters trial labels and file names; use letters, digits, _ . -")
        return self

    @property
    def label(self) -> str:
        """The dataset's part of a trial label: name, else preset, else the file's or hub id's stem."""
        if self.name:
            return self.name
        if self.preset:
            return self.preset
        files = self.files or {}
        source = self.path if self.path is not None else files.get("train") or sorted(files.items())[0][1]
        stem = re.sub(r"(\.(jsonl?|parquet))?(\.(gz|bz2|xz|zst))?$", "", Path(source.rstrip("/")).name)
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "dataset"

    def as_task(self) -> DatasetTask:
        """The task `tasks.get_task` returns for this mapping; its rows load on first use."""
        return DatasetTask(self.label, self)


def parse_dataset(value: Any) -> str | DatasetSpec:
    """A trial's ``dataset`` field: a registered name, or a mapping made a `DatasetSpec`.
    Raises ValueError naming the unknown name or the mapping's bad field."""
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, dict):
        try:
            return DatasetSpec.model_validate(value)
        except ValidationError as e:
            raise ValueError("; ".join(_field_error(err) for err in e.errors())) from None
    if isinstance(value, str):
        if value not in TASKS:
            raise ValueError(f"unknown dataset {value!r}; allowed: {', '.join(sorted(TASKS))}, or a mapping "
                             "{path: ..., question: ..., answer: ..., answer_format: ...}")
        return value
    raise ValueError(f"expected a dataset name or a mapping, got {type(value).__name__}")


def _field_error(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown field {where!r} in the dataset mapping; allowed: {', '.join(DatasetSpec.model_fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        msg += f" (got {err['input']!r})"
    return f"{where}: {msg}" if where else msg


def dataset_spec(value: Any) -> DatasetSpec | None:
    """The `DatasetSpec` behind a trial's ``dataset`` (a mapping, or a registered dataset's
    name); None for a synthetic task or a mapping that does not validate."""
    if isinstance(value, str):
        task = TASKS.get(value)
        return task.dataset if isinstance(task, DatasetTask) else None
    try:
        parsed = parse_dataset(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, DatasetSpec) else None


def training_defaults(value: Any) -> dict[str, str]:
    """``training`` fields a real dataset sets when the spec leaves them out: its reward and
    chat prompts."""
    spec = dataset_spec(value)
    if spec is None or spec.answer_format is None:
        return {}
    return {"reward": REWARD_OF[spec.answer_format], "prompt_format": "chat"}


@dataclass(frozen=True)
class DatasetProblem(Problem):
    """A dataset row as a problem: ``answer`` is the extracted reference, ``solution`` the
    whole answer column (the SFT target), ``operands`` the row index."""

    question: str = ""
    solution: str = ""


@dataclass(frozen=True)
class Row:
    question: str
    reference: str
    solution: str


class DatasetTask:
    """A `DatasetSpec` as a task (`tasks.TaskLike`)."""

    def __init__(self, name: str, dataset: DatasetSpec) -> None:
        self.name = name
        self.dataset = dataset

    @property
    def max_new_tokens(self) -> int:
        return 512  # a worked solution; a trial sets its own training.max_new_tokens

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.dataset.model_dump(mode="json", exclude_none=True)}

    def rows(self, split: Split) -> list[Row]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return load_rows(self.dataset, split)

    def problems(self, split: Split, n: int, seed: int) -> list[Problem]:
        """``n`` rows of ``split`` drawn by ``seed``: without replacement while the split lasts;
        beyond it, train draws go round again and test stops at the whole split."""
        rows = self.rows(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        order: list[int] = []
        while len(order) < n and not (split == "test" and order):
            order += rng.sample(range(len(rows)), min(n - len(order), len(rows)))
        return [self._problem(i, rows[i]) for i in order]

    def _problem(self, i: int, row: Row) -> DatasetProblem:
        return DatasetProblem(task=self.name, operands=(i,), prompt=f"Question: {row.question}\nAnswer:",
                              answer=row.reference, question=row.question, solution=row.solution)

    def render(self, problem: Problem, style: Style = "native") -> tuple[str, str]:
        """(prompt, completion): the question and the whole solution; a dataset has one wording."""
        assert isinstance(problem, DatasetProblem), problem
        return problem.prompt, f" {problem.solution}"

    def question(self, problem: Problem) -> str:
        """The chat user turn: the question, then the answer format's instruction."""
        assert isinstance(problem, DatasetProblem), problem
        d = self.dataset
        instruction = INSTRUCTIONS[d.answer_format or "exact"] if d.instruction is None else d.instruction
        return f"{problem.question}\n\n{instruction}" if instruction else problem.question


def register_dataset(name: str, dataset: DatasetSpec | dict[str, Any]) -> DatasetTask:
    """Register ``dataset`` as ``dataset: name`` (for a plugin's own datasets)."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    spec = dataset if isinstance(dataset, DatasetSpec) else DatasetSpec.model_validate(dataset)
    TASKS[name] = task = DatasetTask(name, spec)
    return task


for _name in PRESETS:
    register_dataset(_name, DatasetSpec(preset=_name))


def check_dataset(value: str | DatasetSpec) -> None:
    """Load both splits of a real dataset, raising `DatasetError` for anything wrong with
    them; a synthetic task passes. The sweep calls this before anything runs."""
    spec = value if isinstance(value, DatasetSpec) else dataset_spec(value)
    if spec is not None:
        for split in SPLITS:
            load_rows(spec, split)


def hub_dataset(value: str | DatasetSpec) -> str | None:
    """The hub id a real dataset loads from; None for a synthetic task or local files."""
    spec = value if isinstance(value, DatasetSpec) else dataset_spec(value)
    if spec is None or spec.files is not None:
        return None
    try:
        local = _source(spec)[3]
    except DatasetError:  # a local directory that is wrong: local
        return None
    return None if local else spec.path


def load_rows(spec: DatasetSpec, split: Split) -> list[Row]:
    """The rows of ``split`` (train or test: the spec's train_split or test_split), checked."""
    return _load_rows(spec.model_dump_json(), split)


@functools.lru_cache(maxsize=16)
def _load_rows(spec_json: str, split: Split) -> list[Row]:
    spec = DatasetSpec.model_validate_json(spec_json)
    field = f"{split}_split"
    name = getattr(spec, field)
    table, where = _load_split(spec, name, field)
    what = f"dataset {spec.label!r} ({where}, {field} {name!r})"
    if len(table) == 0:
        raise DatasetError(f"{what}: the split is empty")
    for field_name in ("question", "answer"):
        column = getattr(spec, field_name)
        if column not in table.column_names:
            raise DatasetError(f"{what}: no column {column!r} (the {field_name} field); "
                               f"its columns: {', '.join(table.column_names)}")
    fmt = spec.answer_format or "exact"
    rows, bad = [], []
    for i, (q, a) in enumerate(zip(table[spec.question], table[spec.answer], strict=True)):
        solution = a if isinstance(a, str) else "" if a is None else str(a)
        reference = REFERENCE[fmt](solution)
        if not isinstance(q, str) or not q.strip():
            bad.append((i, "question", spec.question, "an empty question", repr(q)))
        elif reference is None:
            bad.append((i, "answer", spec.answer, f"{MISSING[fmt]} (answer_format {fmt})", repr(solution[-80:])))
        else:
            rows.append(Row(q, reference, solution))
    if bad:
        i, field_name, column, why, text = bad[0]
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise DatasetError(f"{what}, row {i}{more}: {why} in column {column!r} (the {field_name} field): {text}")
    return rows


def _load_split(spec: DatasetSpec, split: str, field: str) -> tuple[Any, str]:
    """The split as a `datasets.Dataset`, and where it came from (for errors)."""
    import datasets  # about a second to import; only real datasets need it

    args, kwargs, where, local = _source(spec)
    try:
        return datasets.load_dataset(*args, split=split, **kwargs), where
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a slice of nothing, e.g. train[100%:]
            raise DatasetError(f"dataset {spec.label!r} ({where}, {field} {split!r}): the split is empty") from None
        if "Unknown split" in str(e) or "Bad split" in str(e):
            hint = (" A single file holds the split 'train': set train_split and test_split to slices such as "
                    "'train[:90%]' and 'train[90%:]', or give files: {train: FILE, test: FILE}") if local else ""
            raise DatasetError(f"dataset {spec.label!r} ({where}): {field} {split!r}: {e}{hint}") from None
        raise DatasetError(f"dataset {spec.label!r}: cannot read {where}: {_cause(e)}") from None
    except Exception as e:
        if local:
            raise DatasetError(f"dataset {spec.label!r}: cannot read {where}: {_cause(e)}") from None
        raise DatasetError(
            f"dataset {spec.label!r}: cannot load the hub dataset {where}: {_cause(e)}. Where the Hugging Face hub is "
            f"unreachable, download it elsewhere (`hf download {spec.path} --repo-type dataset --local-dir DIR`) and "
            f"give the copy: dataset: {{{'preset: ' + spec.preset + ', ' if spec.preset else ''}path: DIR}}"
        ) from None


def _cause(e: BaseException) -> str:
    # DatasetGenerationError says only "An error occurred while generating the dataset";
    # the reader's own error (pyarrow's, json's) is its cause.
    while e.__cause__ is not None:
        e = e.__cause__
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _source(spec: DatasetSpec) -> tuple[tuple[str, ...], dict[str, Any], str, bool]:
    """load_dataset's positional and keyword arguments, a description, and whether it is local."""
    if spec.files is not None:
        fmt, files = _local_files(spec, {f"files.{split}": (split, path) for split, path in spec.files.items()})
        return (fmt,), {"data_files": files}, ", ".join(files.values()), True
    assert spec.path is not None
    p = Path(spec.path).expanduser()
    if p.is_dir():
        if spec.format is not None:
            return (spec.format,), {"data_dir": str(p)}, str(p), True
        if spec.config and not (p / "README.md").is_file():
            # A copy of a hub dataset without its README (which names the configs): the
            # config is the subdirectory, as in openai/gsm8k's main/train-*.parquet.
            if not (p / spec.config).is_dir():
                raise DatasetError(f"dataset {spec.label!r} ({p}): config {spec.config!r}: no README.md naming configs "
                                   f"and no subdirectory {spec.config!r}; set config: null to read the directory itself")
            return (str(p / spec.config),), {}, str(p / spec.config), True
        return (str(p),), ({"name": spec.config} if spec.config else {}), str(p), True
    if p.exists() or _looks_local(spec.path):
        fmt, files = _local_files(spec, {"path": ("train", spec.path)})
        return (fmt,), {"data_files": files}, files["train"], True
    kwargs = {k: v for k, v in (("name", spec.config), ("revision", spec.revision)) if v}
    return (spec.path,), kwargs, repr(spec.path) + (f" config {spec.config!r}" if spec.config else ""), False


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; a path with a data file's suffix, or one that starts
    # like a path, is meant as a local file.
    return path.startswith(("/", "./", "../", "~")) or _suffix(Path(path)) in _LOCAL_SUFFIXES or path.count("/") > 1


def _suffix(p: Path) -> str:
    suffixes = [s for s in p.suffixes if s not in _COMPRESSED]
    return suffixes[-1].lower() if suffixes else ""


def _local_files(spec: DatasetSpec, files: dict[str, tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """The format and {split: absolute path} of local files given as {field: (split, path)},
    each checked to exist, hold something, and be JSON or Parquet."""
    out, formats = {}, set()
    for field, (split, path) in files.items():
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetError(f"dataset {spec.label!r}: {field}: no such file {str(p)!r}")
        if p.stat().st_size == 0:
            raise DatasetError(f"dataset {spec.label!r}: {field}: {str(p)!r} is empty")
        fmt = spec.format or FORMATS.get(_suffix(p))
        if fmt is None:
            raise DatasetError(f"dataset {spec.label!r}: {field}: {str(p)!r} is not a JSON (.json, .jsonl) or Parquet "
                               "(.parquet) file; if it is one, say which with format: json or format: parquet")
        if fmt == "parquet" and _parquet_rows(p) == 0:
            # `datasets` 5.2 fails on a Parquet file without rows ("BatchSize must be greater than 0").
            raise DatasetError(f"dataset {spec.label!r}: {field}: {str(p)!r} has no rows")
        formats.add(fmt)
        out[split] = str(p.resolve())
    if len(formats) > 1:
        raise DatasetError(f"dataset {spec.label!r}: files: mixes JSON and Parquet files; give one format")
    return formats.pop(), out


def _parquet_rows(path: Path) -> int | None:
    """Rows in a Parquet file's footer; None when it is not readable as Parquet (the load says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not Parquet: `datasets` raises the error with the file's name
        return None


def absolute_paths(value: Any, base: Path | None = None) -> Any:
    """A sweep's raw ``dataset`` value (a name, a mapping, or a list of them: a grid axis) with
    its local paths made absolute against ``base`` (the working directory): trials run in
    other directories."""
    base = base or Path.cwd()

    def fix(path: Any) -> Any:
        if isinstance(path, list):
            return [fix(p) for p in path]
        if not isinstance(path, str):
            return path
        p = Path(path).expanduser()
        return str(base / p) if not p.is_absolute() and ((base / p).exists() or _looks_local(path)) else path

    if isinstance(value, list):
        return [absolute_paths(v, base) for v in value]
    if not isinstance(value, dict):
        return value
    out = dict(value)
    if "path" in out:
        out["path"] = fix(out["path"])
    if isinstance(out.get("files"), dict):
        out["files"] = {k: fix(v) for k, v in out["files"].items()}
    return out

