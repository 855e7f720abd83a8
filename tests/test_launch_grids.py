"""Launch grids within CUDA's limits: axis 0 up to 2^31 - 1, axes 1 and 2 up to 65535. The
launchers run on meta tensors with every kernel's launch recorded instead of run, so shapes far
beyond this machine's memory (b * h = 70000) are checked in milliseconds."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from performer_triton.kernels import GIVEN, RELU, SOFTMAX, launchers  # noqa: E402
from performer_triton.kernels import causal, noncausal  # noqa: E402

AXIS_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.fixture
def grids(monkeypatch):
    """Every kernel[grid](...) of the launchers, recorded as (kernel name, grid) and not run."""
    seen = []
    kernel_types = {type(causal._chunk_state_kernel), type(noncausal._state_kernel)}

    def record(self, *args, grid, warmup, **kwargs):
        seen.append((self.__name__ if hasattr(self, "__name__") else self.fn.__name__, tuple(grid)))

    for kind in kernel_types:
        monkeypatch.setattr(kind, "run", record)
    return seen


@pytest.mark.parametrize("causal_mode", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("feature", [SOFTMAX, RELU, GIVEN])
def test_grids_fit_cuda_limits_at_70000_heads(grids, causal_mode, feature):
    b, h, n, d, e, m = 70, 1000, 8192, 64, 64, 256
    meta = dict(device="meta", dtype=torch.bfloat16)
    width = m if feature == GIVEN else d
    q, k = torch.empty(b, h, n, width, **meta), torch.empty(b, h, n, width, **meta)
    v = torch.empty(b, h, n, e, **meta)
    projection = None if feature == GIVEN else torch.empty(m, d, **meta)
    fwd, bwd, _ = launchers(causal_mode)
    out, *saved = fwd(q, k, v, projection, feature=feature)
    bwd(torch.empty_like(out), q, k, v, projection, out, *saved, feature=feature)
    assert len(grids) >= 4  # forward and backward kernels were reached
    # causal bf16 heads up to 64 with fused maps and the global stabilizer: chunks of 128 rows
    # (_dd_kernel's blocks too); the per-row _row_stats_kernel and the rest: 64
    bt = 128 if causal_mode and feature != GIVEN else 64
    for name, grid in grids:
        blocks = triton.cdiv(n, 64 if name == "_row_stats_kernel" else bt)
        assert grid[0] in (b * h, b * h * blocks), (name, grid)  # the (b, h) rows (per-row kernels: x blocks) on axis 0
        if causal_mode and name not in ("_row_stats_kernel", "_dd_kernel", "_state_scan_kernel", "_dstate_scan_kernel"):
            assert grid[1] == blocks, (name, grid)  # a program per chunk (d = 64: one d chunk)
        assert all(1 <= size <= limit for size, limit in zip(grid, AXIS_LIMITS)), (name, grid)


@pytest.mark.parametrize("causal_mode", [False, True], ids=["noncausal", "causal"])
def test_pack_grids_fit_cuda_limits_at_70000_sequences(grids, causal_mode):
    """A pack of 70000 sequences (4.5M rows): its 140000 block slots go on grid axis 0, its
    sequences' walks on axis 0 as NS h rows."""
    ns, h, length, d, m = 70000, 8, 64, 64, 256
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = (torch.empty(1, h, ns * length, d, **meta) for _ in range(3))
    cu = torch.empty(ns + 1, device="meta", dtype=torch.int32)
    fwd, bwd, _ = launchers(causal_mode)
    out, *saved = fwd(q, k, v, torch.empty(m, d, **meta), feature=SOFTMAX, cu_seqlens=cu)
    bwd(torch.empty_like(out), q, k, v, torch.empty(m, d, **meta), out, *saved, feature=SOFTMAX, cu_seqlens=cu)
    assert len(grids) >= 4
    for name, grid in grids:
        assert all(1 <= size <= limit for size, limit in zip(grid, AXIS_LIMITS)), (name, grid)
    assert max(grid[0] for _, grid in grids) >= ns  # the slots (or the NS h walks) on axis 0


def test_too_many_blocks_for_a_grid_axis_is_a_clear_error(grids):
    """An unpacked sequence of 65536 chunks (bf16 heads up to 64: of 128 rows, 8.4M) puts 65536
    blocks on axis 1: a ValueError naming the way out (a pack of one sequence, whose blocks go on
    axis 0), not a failed launch."""
    d = 64
    assert causal._long_chunks(d, d, torch.bfloat16, prefix=False, state=False)
    n = 65536 * 128
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = (torch.empty(1, 1, n, d, **meta) for _ in range(3))
    fwd = launchers(True)[0]
    with pytest.raises(ValueError, match="a pack of one sequence"):
        fwd(q, k, v, torch.empty(256, d, **meta), feature=SOFTMAX)
    cu = torch.empty(2, device="meta", dtype=torch.int32)
    fwd(q, k, v, torch.empty(256, d, **meta), feature=SOFTMAX, cu_seqlens=cu)  # the same rows as a pack
