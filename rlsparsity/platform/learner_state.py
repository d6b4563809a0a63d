"""A learner's resumable state as a folder of files: safetensors for tensors, JSON for the
rest. No pickle: `torch.save` of an optimizer's state dict would be one.

The folder holds what a restarted learner needs to continue bit for bit where it stopped:
the float32 masters of the policy and of every side model, each optimizer's moments and
step counts, each schedule's position, the RNG states and, from rank 0, the trial's own
counters (curves, sync bytes, the held-out measurements taken at θ0). θ0 itself, the
reference model, the subnetwork mask and the mask recorder's base are rebuilt from the
model directory as at the start. `state.json` is written last: a folder without it is
incomplete and refused. Under FSDP every rank writes the tensors of its own rows, with its
rank in the file names (`weights.rank1-of-2.safetensors`), into the same folder (Ray Train
merges the ranks' checkpoint files), and reads its own back: a state resumes only with the
world size that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

STATE_FORMAT = "rlsparsity.learner_state/1"
STATE_JSON = "state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
BUFFERS_FILE = "buffers.safetensors"


class LearnerStateError(ValueError):
    """A learner state folder that is incomplete or does not fit the trial."""


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into tensors (keyed `prefix.param.name`) and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):  # FSDP's moments are DTensors: this rank's rows
                tensors[f"{prefix}.{idx}.{key}"] = (value.to_local() if isinstance(value, DTensor) else value).detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    keys = {str(idx): sorted(k for k, v in st.items() if torch.is_tensor(v)) for idx, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "tensor_keys": keys}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> None:
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for idx, keys in meta["tensor_keys"].items():
        state[int(idx)] = {k: _like(params[int(idx)], tensors[f"{prefix}.{idx}.{k}"]) for k in keys}
        state[int(idx)].update(meta["scalars"].get(idx, {}))
    opt.load_state_dict({"state": state, "param_groups": groups})


def _like(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A saved per-parameter moment as the optimizer holds it: sharded like an FSDP parameter."""
    if isinstance(param, DTensor) and t.dim() > 0:
        return DTensor.from_local(t.to(param.to_local().device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())
    return t


def _name(file: str, shard: tuple[int, int] | None) -> str:
    if shard is None:
        return file
    stem, ext = file.split(".", 1)
    return f"{stem}.rank{shard[0]}-of-{shard[1]}.{ext}"


@dataclass
class LearnerParts:
    """The learner's live objects that a state fills: `modules` maps a module's key (policy,
    aux.critic, ...) to its named parameters."""

    modules: dict[str, list[tuple[str, torch.Tensor]]]
    optimizers: list[torch.optim.Optimizer]
    schedules: list[torch.optim.lr_scheduler.LRScheduler]
    generators: dict[str, torch.Generator]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # rank 0's mask recorder state


def save_state(directory: Path, parts: LearnerParts, *, step: int, label: str, extra: dict[str, Any] | None,
               shard: tuple[int, int] | None = None) -> None:
    """Write the state after optimizer step `step`; `extra` is JSON (rank 0's counters).
    `shard` (rank, world): this rank's rows of a sharded learner; only rank 0 writes
    `state.json`, and a rank whose `extra` is None writes its tensors only."""
    modules, optimizers, schedules, generators = parts.modules, parts.optimizers, parts.schedules, parts.generators
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"{key}.{name}": p.detach().contiguous() for key, named in modules.items() for name, p in named}
    save_file(weights, str(directory / _name(WEIGHTS_FILE, shard)))
    save_file({k: t.detach().contiguous() for k, t in parts.buffers.items()}, str(directory / _name(BUFFERS_FILE, shard)))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_meta = []
    for i, opt in enumerate(optimizers):
        tensors, meta = optimizer_state(opt, f"opt{i}")
        opt_tensors.update(tensors)
        opt_meta.append(meta)
    save_file(opt_tensors, str(directory / _name(OPTIMIZER_FILE, shard)))
    rng = {"torch": torch.get_rng_state(), **{f"generator.{k}": g.get_state() for k, g in generators.items()}}
    save_file(rng, str(directory / _name(RNG_FILE, shard)))
    if extra is None:
        return
    state = {
        "format": STATE_FORMAT, "step": step, "label": label, "modules": sorted(modules),
        "optimizers": opt_meta, "schedules": [s.state_dict() for s in schedules], "extra": extra,
        "shards": shard[1] if shard else None,
    }
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(directory / STATE_JSON)  # last, and atomic: its presence marks the folder complete


def read_state_json(directory: Path) -> dict[str, Any]:
    path = directory / STATE_JSON
    if not path.is_file():
        raise LearnerStateError(f"{directory}: no {STATE_JSON}; the learner state was not completely written")
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise LearnerStateError(f"{path}: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    return state


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LearnerStateError(f"{path}: missing from the learner state")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def _checked(path: Path, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors, once each name, shape and dtype matches the live tensor's."""
    saved = _tensors(path)
    if set(saved) != set(live):
        missing, unknown = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise LearnerStateError(f"{path}: missing tensors {missing[:5]}, unknown {unknown[:5]}")
    for name, p in live.items():
        t = saved[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise LearnerStateError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected {p.dtype} {tuple(p.shape)}")
    return saved


@torch.no_grad()
def load_state(directory: Path, parts: LearnerParts, *, label: str, steps: int,
               shard: tuple[int, int] | None = None) -> tuple[int, dict[str, Any]]:
    """Load what `save_state` wrote into the learner's live objects, in place; (step, extra).
    Every tensor is checked against the live one's name, shape and dtype first."""
    modules, optimizers, schedules, generators = parts.modules, parts.optimizers, parts.schedules, parts.generators
    state = read_state_json(directory)
    if state.get("shards") != (shard[1] if shard else None):
        raise LearnerStateError(f"{directory}: written by {state.get('shards') or 'an unsharded learner'} sharded ranks, "
                                f"read by {shard[1] if shard else 'an unsharded learner'}")
    if state["label"] != label:
        raise LearnerStateError(f"{directory}: the state of trial {state['label']!r}, not of {label!r}")
    if not 1 <= state["step"] < steps:
        raise LearnerStateError(f"{directory}: step {state['step']} is outside 1..{steps - 1}")
    if state["modules"] != sorted(modules) or len(state["optimizers"]) != len(optimizers):
        raise LearnerStateError(
            f"{directory}: modules {state['modules']} with {len(state['optimizers'])} optimizers, "
            f"expected {sorted(modules)} with {len(optimizers)}"
        )
    live = {f"{key}.{name}": p for key, named in modules.items() for name, p in named}
    weights = _checked(directory / _name(WEIGHTS_FILE, shard), live)
    buffers = _checked(directory / _name(BUFFERS_FILE, shard), parts.buffers) if parts.buffers else {}  # rank 0's only
    for name, p in live.items():
        p.copy_(weights[name])
    for name, b in parts.buffers.items():
        b.copy_(buffers[name])
    opt_tensors = _tensors(directory / _name(OPTIMIZER_FILE, shard))
    for i, (opt, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        try:
            load_optimizer_state(opt, opt_tensors, meta, f"opt{i}")
        except (KeyError, ValueError) as e:
            raise LearnerStateError(f"{directory / _name(OPTIMIZER_FILE, shard)}: optimizer {i} does not fit: {e}") from e
    for schedule, sd in zip(schedules, state["schedules"], strict=True):
        schedule.load_state_dict(sd)
    rng = _tensors(directory / _name(RNG_FILE, shard))
    torch.set_rng_state(rng["torch"])
    for key, g in generators.items():
        g.set_state(rng[f"generator.{key}"])
    return state["step"], state["extra"]
