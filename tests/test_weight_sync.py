"""Sparse bf16 sync: the patch carries exactly the changed bf16 entries and reproduces the view bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsparsity.platform.weight_sync import Bf16SyncState, apply_patch, bf16_bits, full_patch


def test_patch_holds_exactly_the_changed_bf16_entries_and_applies_bitwise():
    torch.manual_seed(0)
    master = torch.nn.Linear(64, 32)
    engine = torch.nn.Linear(64, 32)
    with torch.no_grad():
        for pm, pe in zip(master.parameters(), engine.parameters(), strict=True):
            pm.copy_(pm.to(torch.bfloat16))
            pe.copy_(pm)
    state = Bf16SyncState(master.named_parameters())
    before = {n: bf16_bits(p).clone() for n, p in master.named_parameters()}
    with torch.no_grad():
        master.weight[0, :5] += 1e-7  # far below a bf16 ulp of ~1e-2 weights: invisible in bf16
        master.weight[3, 7] += 0.5  # visible
        master.bias[:] -= 1.0  # all visible
    patch = state.diff(master.named_parameters())
    expected = sum(int((bf16_bits(p) != before[n]).sum()) for n, p in master.named_parameters())
    assert patch.changed == expected == 1 + 32
    assert set(patch.tensors) == {"weight", "bias"}
    np.testing.assert_array_equal(patch.tensors["weight"][0], [3 * 64 + 7])
    assert patch.tensors["bias"][0] is None  # all of it changed: sent dense, no indices
    assert patch.nbytes == 1 * (4 + 2) + 32 * 2 and patch.dense_bytes == (64 * 32 + 32) * 2
    apply_patch(engine, patch)
    for (n, pm), pe in zip(master.named_parameters(), engine.parameters(), strict=True):
        assert torch.equal(bf16_bits(pm), bf16_bits(pe)), n
        assert torch.equal(pe, pm.to(torch.bfloat16).float()), n  # the engine holds the bf16 view exactly
    assert state.diff(master.named_parameters()).changed == 0  # nothing new since the last sync


def test_full_patch_restores_a_fresh_engine():
    src, dst = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    apply_patch(dst, full_patch(src.named_parameters()))
    for ps, pd in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(pd, ps.to(torch.bfloat16).float())


def test_choose_patch_goes_dense_by_mode_or_size():
    from rlsparsity.platform.weight_sync import choose_patch

    w = torch.nn.Parameter(torch.zeros(100))
    state = Bf16SyncState([("w", w)])
    with torch.no_grad():
        w[:10] = 1.0
    patch = state.diff([("w", w)])  # 10 entries x 6 bytes = 60 of 200 dense bytes
    assert choose_patch(patch, [("w", w)], "sparse", 0.5) is patch
    full = choose_patch(patch, [("w", w)], "sparse", 0.25)
    assert full.tensors["w"][0] is None and full.nbytes == 200 and full.changed == 10
    assert choose_patch(patch, [("w", w)], "dense", 0.9).tensors["w"][0] is None
    with pytest.raises(ValueError, match="sync mode"):
        choose_patch(patch, [("w", w)], "sideways", 0.5)
