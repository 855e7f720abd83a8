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
    kernel_types = {type(causal._state_kernel), type(noncausal._state_kernel)}

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
    for name, grid in grids:
        assert grid[0] == b * h, (name, grid)  # one program per (b, h) along axis 0
        assert all(1 <= size <= limit for size, limit in zip(grid, AXIS_LIMITS)), (name, grid)
