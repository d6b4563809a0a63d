"""FSDP (resources.strategy: fsdp): two ranks on gloo shard the embedded model with FSDP2;
what their sharded sync state, mask recorder and learner state produce is checked against
the same computations on the whole tensors in one process (the unsharded path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from rlsparsity.contracts.mask import read_mask
from rlsparsity.platform.config import parse_training_criteria
from rlsparsity.platform.learner_state import (
    LearnerParts,
    LearnerStateError,
    load_state,
    save_state,
)
from rlsparsity.platform.mask_recorder import MaskRecorder
from rlsparsity.platform.models import load_model
from rlsparsity.platform.sharding import Layout, rows_of
from rlsparsity.platform.weight_sync import Bf16SyncState, choose_patch

pytestmark = pytest.mark.slow

CRITERIA = "bitwise masters abs:1e-4"
WORLD = 2


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(100 * step + rank))


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    ids = _batch(rank, step)
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def _rank_main(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from rlsparsity.platform.sharding import Ranks, local, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = shard_model(load_model(model_dir, dtype=torch.float32), cpu)
    named = list(model.named_parameters())
    loc = [(n, local(p)) for n, p in named]
    layout, ranks = Layout.of(named, rank, WORLD, True), Ranks(rank, WORLD, cpu, True)
    sync = Bf16SyncState(loc)
    recorder = MaskRecorder(loc, base={}, tied=[], criteria=parse_training_criteria(CRITERIA))
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    whole = lambda: {n: ranks.full(p, local(p).detach()) for n, p in named}  # noqa: E731
    theta0 = whole()
    _train_step(model, opt, rank, 1)
    sparse = ranks.gather_patch(sync.diff(loc, on_changed=recorder.mark_changed), loc, layout, "sparse", 1 / 3)
    gather = lambda bits, names: ranks.gather_bits(bits, names, layout)  # noqa: E731
    recorder.record(loc, Path(out) / "sharded", 1, final=False, target={}, shapes=layout.shapes, gather=gather)
    after1 = whole()
    # A state after step 1, then step 2 twice: straight on, and again after loading that state.
    parts = LearnerParts({"policy": loc}, [opt], [], {}, recorder.state_tensors())
    save_state(Path(out) / "state", parts, step=1, label="t", extra={} if rank == 0 else None, shard=(rank, WORLD))
    _train_step(model, opt, rank, 2)
    dense = ranks.gather_patch(sync.diff(loc), loc, layout, "dense", 1 / 3)
    after2 = whole()
    dist.barrier()
    load_state(Path(out) / "state", parts, label="t", steps=3, shard=(rank, WORLD))
    restored = whole()
    _train_step(model, opt, rank, 2)
    after2_again = whole()
    if rank == 0:
        save_file({f"theta0.{n}": t for n, t in theta0.items()} | {f"after1.{n}": t for n, t in after1.items()}
                  | {f"after2.{n}": t for n, t in after2.items()} | {f"restored.{n}": t for n, t in restored.items()}
                  | {f"again.{n}": t for n, t in after2_again.items()}, str(Path(out) / "whole.safetensors"))
        patches = {}
        for kind, patch in (("sparse", sparse), ("dense", dense)):
            for n, (idx, bits) in patch.tensors.items():
                patches[f"{kind}.bits.{n}"] = torch.from_numpy(np.asarray(bits).copy())
                if idx is not None:
                    patches[f"{kind}.idx.{n}"] = torch.from_numpy(np.asarray(idx).copy())
            patches[f"{kind}.changed"] = torch.tensor([patch.changed, patch.dense_bytes])
        save_file(patches, str(Path(out) / "patches.safetensors"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(embedded_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(embedded_model_dir), str(out)), nprocs=WORLD)
    return out


def _group(tensors: dict[str, torch.Tensor], prefix: str, order: list[str] | None = None) -> dict[str, torch.Tensor]:
    """One group of saved tensors by parameter name (in the model's `order`: a mask's rows follow it)."""
    group = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return {n: group[n] for n in order} if order else group


def test_layout_matches_fsdp_and_torch_chunk():
    for dim0 in (0, 1, 5, 64, 101):
        for world in (1, 2, 3, 8):
            spans = [rows_of(dim0, r, world) for r in range(world)]
            sizes = [t.shape[0] for t in torch.arange(dim0).chunk(world)] if dim0 else []
            assert [b - a for a, b in spans] == sizes + [0] * (world - len(sizes))
            assert spans[0][0] == 0 and spans[-1][1] == dim0
    layout = Layout.of([("w", torch.zeros(5, 3)), ("b", torch.zeros(5))], 0, 1, False)
    assert layout.parts == {"w": [(0, 15)], "b": [(0, 5)]} and layout.shapes["w"] == (5, 3)


def test_sharded_patches_equal_the_whole_models(sharded_run, embedded_model_dir):
    """The sparse patch gathered from the ranks' rows is the patch the whole model's diff
    gives (same global indices and bits, in order); the dense one is the whole bf16 view."""
    whole, patches = load_file(str(sharded_run / "whole.safetensors")), load_file(str(sharded_run / "patches.safetensors"))
    theta0, after1, after2 = (_group(whole, k) for k in ("theta0", "after1", "after2"))
    state = Bf16SyncState(theta0.items())
    reference = choose_patch(state.diff(after1.items()), after1.items(), "sparse", 1 / 3)
    assert patches["sparse.changed"].tolist() == [reference.changed, reference.dense_bytes]
    assert 0 < reference.changed < reference.dense_bytes / 2
    for name, (idx, bits) in reference.tensors.items():
        assert np.array_equal(patches[f"sparse.bits.{name}"].numpy(), bits), name
        if idx is None:
            assert f"sparse.idx.{name}" not in patches
        else:
            assert np.array_equal(patches[f"sparse.idx.{name}"].numpy(), idx), name
    assert {k.split(".", 2)[2] for k in patches if k.startswith("sparse.bits.")} == set(reference.tensors)
    dense_changed = state.diff(after2.items()).changed
    assert patches["dense.changed"].tolist() == [dense_changed, reference.dense_bytes]
    for name, t in after2.items():
        assert f"dense.idx.{name}" not in patches
        assert np.array_equal(patches[f"dense.bits.{name}"].numpy(), t.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy())


def test_sharded_masks_equal_the_whole_models(sharded_run, embedded_model_dir, tmp_path):
    """Every mask series written from gathered bits equals the one recorded on whole tensors."""
    whole = load_file(str(sharded_run / "whole.safetensors"))
    order = [n for n, _ in load_model(embedded_model_dir).named_parameters()]
    theta0, after1 = _group(whole, "theta0", order), _group(whole, "after1", order)
    recorder = MaskRecorder(theta0.items(), base={}, tied=[], criteria=parse_training_criteria(CRITERIA))
    state = Bf16SyncState(theta0.items())
    state.diff(after1.items(), on_changed=recorder.mark_changed)
    recorder.record(after1.items(), tmp_path, 1, final=False, target={})
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.arrow"))
    assert len(files) == 5  # bitwise, masters, abs, since_prev, ever
    for rel in files:
        ours, ref = read_mask(sharded_run / "sharded" / rel), read_mask(tmp_path / rel)
        assert ours.meta["checksum"] == ref.meta["checksum"], rel
        assert ours.total_changed == ref.total_changed > 0, rel


def test_sharded_learner_state_resumes_bit_for_bit(sharded_run):
    """Each rank saves its rows (weights, AdamW moments as DTensors, recorder buffers) under
    its own file names; loading them restores the weights and the next step is the same."""
    whole = load_file(str(sharded_run / "whole.safetensors"))
    after1, after2 = _group(whole, "after1"), _group(whole, "after2")
    restored, again = _group(whole, "restored"), _group(whole, "again")
    assert all(torch.equal(restored[n], after1[n]) for n in after1)
    assert any(not torch.equal(after2[n], after1[n]) for n in after1)
    assert all(torch.equal(again[n], after2[n]) for n in after2)
    names = sorted(p.name for p in (sharded_run / "state").iterdir())
    assert "weights.rank1-of-2.safetensors" in names and "optimizer.rank0-of-2.safetensors" in names
    with pytest.raises(LearnerStateError, match="written by 2 sharded ranks, read by an unsharded learner"):
        load_state(sharded_run / "state", LearnerParts({}, [], [], {}), label="t", steps=3)
