"""Sweep spec: YAML validated by pydantic, where any field may be a list (a grid axis).

A sweep is a `TrialSpec` template in which some leaves are lists. `SweepSpec.trials()`
expands the cartesian product; every combination is validated as a `TrialSpec`, so an
error names the dotted field and, for registries, the allowed values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlsparsity.platform.datasets import DatasetError, absolute_paths, check_dataset, hub_dataset
from rlsparsity.platform.models.hub import parse_hub_id
from rlsparsity.platform.models.resolve import resolve_model
from rlsparsity.platform.plugins import PluginError, check_names, import_plugins
from rlsparsity.platform.trial_spec import TrialSpec, fields_at


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class SpecError(ValueError):
    """The sweep spec is invalid; the message names the field and what was expected."""


# One sweep = one experiment and one θ0: these fields cannot be grid axes.
SWEEP_WIDE = ("name", "model", "tracking.uri", "tracking.artifact_location", "analysis")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not the last one wins."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark,
            )  # fmt: skip
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    """YAML as the specs read it: safe, and duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"{key}: {p!r} is a value, not a section")
        node[leaf] = v
    return out


def _format_error(e: ValidationError, axis_values: Mapping[str, Any]) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; allowed here: {', '.join(fields_at(TrialSpec, err['loc'][:-1]))}"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {field}: {msg}" if field else f"  {msg}")
    where = f" (grid point {json.dumps(dict(axis_values))})" if axis_values else ""
    return "invalid sweep spec" + where + ":\n" + "\n".join(lines)


STAGE_KINDS = ("learned", "complement", "random_global", "random_per_tensor")


class StagesSpec(BaseModel):
    """`subnetwork_stages`: after the full trials, one masked stage per kind, each over the
    same grid, each trial masked by its own grid point's full trial (RQ2/RQ3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kinds: tuple[Literal["learned", "complement", "random_global", "random_per_tensor"], ...] = (
        "learned", "random_global", "random_per_tensor",
    )
    random_seed: int = Field(0, description="the seed of the random masks' draws")
    step: int | None = Field(None, ge=1, description="the full trials' mask at this step; default final")

    def subnetwork(self, kind: str, experiment: str) -> dict[str, Any]:
        """The `training.subnetwork` section of stage ``kind``."""
        sub: dict[str, Any] = {"experiment": experiment, "trial": "{label}"}
        if self.step is not None:
            sub["step"] = self.step
        if kind == "complement":
            sub["complement"] = True
        elif kind.startswith("random_"):
            sub["random"] = {"seed": self.random_seed, "draw": kind.removeprefix("random_")}
        return sub


class SweepSpec:
    """A validated sweep: a template plus grid axes (dotted field -> list of values)."""

    def __init__(self, raw: Mapping[str, Any], *, offline_ok: bool = False) -> None:
        """``offline_ok`` (a dry run's check): with the hub offline (``HF_HUB_OFFLINE``), a hub
        model or dataset missing from the cache is listed in `unchecked` instead of refused.
        A run resolves it before anything starts, and fails there."""
        raw = dict(raw)
        self.unchecked: list[str] = []
        # `plugins` is a list that is not a grid axis: the modules every trial imports. They
        # register custom algorithms and tasks, so they are imported before validation.
        try:
            self.plugins = check_names(raw.pop("plugins", None))
            import_plugins(self.plugins)
        except PluginError as e:
            raise SpecError(f"invalid sweep spec:\n  {e}") from None
        # `subnetwork_stages` is not a trial field either: it makes the sweep a staged study.
        stages = raw.pop("subnetwork_stages", None)
        try:
            self.stages = None if stages is None else StagesSpec.model_validate(stages)
        except ValidationError as e:
            raise SpecError(_format_error(e, {}).replace("\n  ", "\n  subnetwork_stages.", 1)) from None
        if "dataset" in raw:  # trials run in other directories: a dataset's local paths become absolute
            raw["dataset"] = absolute_paths(raw["dataset"])
        # `variants` too: named sets of overrides, one grid axis (`variant`) whose values are
        # the names, for comparisons that are not a product of axes (GRPO with and without
        # KL beside DPO on two kinds of pairs).
        self.variants = _variants(raw.pop("variants", None))
        flat = flatten(raw)
        self.axes: dict[str, list[Any]] = {k: list(v) for k, v in flat.items() if isinstance(v, list)}
        for name, overrides in self.variants.items():
            clash = sorted(set(overrides) & (set(self.axes) | set(SWEEP_WIDE) | {"variant"}))
            if clash:
                raise SpecError(f"invalid sweep spec:\n  variants.{name}.{clash[0]}: a variant cannot set a grid axis "
                                "or a sweep-wide field")
        if self.variants:
            if "variant" in flat:
                raise SpecError("invalid sweep spec:\n  variant: is set by `variants`; name the variants there")
            self.axes = {"variant": list(self.variants), **self.axes}
        for k, v in self.axes.items():
            if not v:
                raise SpecError(f"invalid sweep spec:\n  {k}: an empty list gives an empty grid")
            dup = [x for i, x in enumerate(v) if x in v[:i]]
            if dup:
                raise SpecError(f"invalid sweep spec:\n  {k}: {dup[0]!r} is listed twice; each grid value once")
            if k in SWEEP_WIDE:
                raise SpecError(f"invalid sweep spec:\n  {k}: is sweep-wide and cannot be a list (one sweep = one experiment, one θ0)")
        self.template = {k: v for k, v in flat.items() if k not in self.axes}
        if self.plugins:
            self.template["plugins"] = tuple(self.plugins)
        self._trials = [self._validate(point) for point in self.grid()]
        self.name = self._trials[0].name
        labels: dict[str, dict[str, Any]] = {}
        for point, trial in zip(self.grid(), self._trials, strict=True):
            if trial.label in labels:
                other = labels[trial.label]
                differ = sorted(k for k in point if point[k] != other[k])
                hint = ("; give each dataset mapping its own name (dataset.name)" if any(k.startswith("dataset") for k in differ)
                        else "; give each grid value once")
                raise SpecError(
                    f"invalid sweep spec:\n  {', '.join(differ)}: grid points {json.dumps(other)} and "
                    f"{json.dumps(point)} get the same trial label {trial.label!r}{hint}"
                )
            labels[trial.label] = point
        offline = offline_ok and _hub_offline()
        model = self._trials[0].model
        try:
            resolve_model(model, build=False)
        except ValueError as e:
            if not (offline and parse_hub_id(model) is not None):
                raise SpecError(f"invalid sweep spec:\n  model: {e}") from None
            self.unchecked.append(f"model {model!r}: a hub id, not in the Hugging Face cache; HF_HUB_OFFLINE is set")
        # A real dataset's files and columns are checked here, before anything runs (it loads
        # them once per process; `datasets` caches what it downloaded).
        for dataset in {trial.dataset_label: trial.dataset for trial in self._trials}.values():
            try:
                check_dataset(dataset)
            except DatasetError as e:
                hub = hub_dataset(dataset)
                if not (offline and hub):
                    raise SpecError(f"invalid sweep spec:\n  dataset: {e}") from None
                self.unchecked.append(f"dataset {hub!r}: a hub dataset, not in the datasets cache; HF_HUB_OFFLINE is set "
                                      f"(its field mapping is checked, its files and columns are not)")

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = (), *, offline_ok: bool = False) -> SweepSpec:
        path = Path(path)
        try:
            raw = load_yaml(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"{path}: cannot read the sweep spec ({e})") from e
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: a sweep spec is a mapping of fields, got {type(raw).__name__}")
        return cls(apply_overrides(raw, overrides), offline_ok=offline_ok)

    def grid(self) -> list[dict[str, Any]]:
        keys = list(self.axes)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.axes.values())]

    def _validate(self, point: Mapping[str, Any]) -> TrialSpec:
        variant = self.variants.get(point.get("variant"), {})
        try:
            trial = TrialSpec.model_validate(unflatten({**self.template, **variant, **point}))
        except ValidationError as e:
            raise SpecError(_format_error(e, point)) from None
        trial._axis_label = axis_label(point)
        return trial

    def trials(self) -> list[TrialSpec]:
        return list(self._trials)

    def trial(self, point: Mapping[str, Any]) -> TrialSpec:
        return self._validate(point)

    def to_dict(self) -> dict[str, Any]:
        out = unflatten({**self.template, **self.axes})
        if self.plugins:
            out["plugins"] = list(self.plugins)
        if self.stages is not None:
            out["subnetwork_stages"] = self.stages.model_dump(mode="json")
        if self.variants:
            out.pop("variant")
            out["variants"] = {k: unflatten(v) for k, v in self.variants.items()}
        return out

    def fingerprint(self) -> str:
        """A short hash of the whole spec: equal for equal sweeps, whatever the key order."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]*$")


def _variants(raw: Any) -> dict[str, dict[str, Any]]:
    """`variants: {name: {field: value, ...}}` -> name -> flat overrides (scalars only)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError("invalid sweep spec:\n  variants: a mapping of names to field overrides, e.g. "
                        "{grpo_kl: {algorithm: grpo, training.kl_coef: 0.05}}")
    out = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not _VARIANT_NAME.match(name):
            raise SpecError(f"invalid sweep spec:\n  variants.{name}: a variant's name is lower-case letters, digits "
                            "and _ . + - (it becomes part of trial labels)")
        if not isinstance(overrides, Mapping):
            raise SpecError(f"invalid sweep spec:\n  variants.{name}: expected a mapping of fields, got {overrides!r}")
        flat = flatten(overrides)
        for k, v in flat.items():
            if isinstance(v, list):
                raise SpecError(f"invalid sweep spec:\n  variants.{name}.{k}: a variant sets one value; make a grid "
                                "axis outside the variants, or one variant per value")
        out[name] = flat
    return out


# Grid axes a trial's label always shows (grpo/add/s0/d1); any other axis is appended.
LABELLED_AXES = ("algorithm", "dataset", "seed", "data_seed")


def axis_label(point: Mapping[str, Any]) -> str:
    """The label part of a grid point's other axes: ``/lr=1e-05/optimizer=sgd`` (the last
    part of the dotted name, or all of it where two axes share that part)."""
    # A dataset mapping's path, files and name are in its own label already.
    extra = [k for k in point if k not in LABELLED_AXES and not k.startswith(("training.subnetwork.", "dataset.path", "dataset.files.", "dataset.name"))]
    if "variant" in extra:  # its name alone: grpo/add/s0/grpo_kl
        extra.remove("variant")
        head = f"/{point['variant']}"
    else:
        head = ""
    last = [k.rsplit(".", 1)[-1] for k in extra]
    out = []
    for k, short in zip(extra, last, strict=True):
        v = point[k]
        text = f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
        out.append(f"/{short if last.count(short) == 1 else k}={text}")
    return head + "".join(out)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides; values are parsed as YAML (`[0,1]` makes an axis)."""
    flat = flatten(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key=value, e.g. training.steps=10")
        flat = {k: v for k, v in flat.items() if k != key and not k.startswith(key + ".")}
        try:
            flat[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise SpecError(f"--set {item!r}: the value is not valid YAML ({first}); e.g. seed=[0,1,2]") from None
    return unflatten(flat)
