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


def test_fused_diff_kernel_matches_torch_cast_bit_for_bit():
    """The numba kernel's cast is checked against torch's on every float32 class: NaNs of
    both signs and payloads, infinities, ±0, subnormals, ties, and values that round to inf."""
    from rlsparsity.numba_jit import compiled
    from rlsparsity.platform.weight_sync import _build_kernel

    kern = compiled("bf16 sync diff", _build_kernel)
    assert kern is not None, "numba is a dependency; the fused kernel must compile here"
    special = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0, 0x80000000,
                        1, 0x807FFFFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF], dtype=np.uint32)
    rng = np.random.default_rng(0)
    src = np.concatenate([special, rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)])
    want = bf16_bits(torch.from_numpy(src.view(np.float32))).numpy()
    last = np.zeros(src.size, np.int16)
    last[::2] = want[::2]  # half of them "already sent"
    idx, bits = np.empty(src.size, np.int32), np.empty(src.size, np.int16)
    n = kern(src, last, idx, bits)
    expect_idx = np.flatnonzero(np.zeros(src.size, np.int16) != want)
    expect_idx = expect_idx[expect_idx % 2 == 1]
    np.testing.assert_array_equal(idx[:n], expect_idx)
    np.testing.assert_array_equal(bits[:n], want[expect_idx])
    np.testing.assert_array_equal(last, want)  # updated in place


@pytest.mark.parametrize("dense_above", [1 / 3, 1e-4])
def test_fused_and_torch_diffs_give_the_same_patches(dense_above):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200), torch.nn.Linear(200, 50))
    fused, plain = Bf16SyncState(model.named_parameters(), dense_above), Bf16SyncState(model.named_parameters(), dense_above)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 10.0 ** -(step + 1) * (torch.rand_like(p) < 0.3))
        a, b = fused.diff(model.named_parameters()), plain.diff(model.named_parameters(), fused=False)
        assert (a.changed, a.dense_bytes, a.tensors.keys()) == (b.changed, b.dense_bytes, b.tensors.keys())
        assert a.changed > 0
        for name, (ia, va) in a.tensors.items():
            ib, vb = b.tensors[name]
            assert (ia is None) == (ib is None), name
            if ia is not None:
                np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(va, vb)
        for name in fused.last:
            assert torch.equal(fused.last[name], plain.last[name]), name
