"""Peak numbers of the hardware the GPU targets name, and the roofline time of FAVOR+ attention on
it (kernels/NOTES.md, "Roofline at the benchmark shapes").  Used by bench/test_targets.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from performer_triton.cli.benchmark import Case

# H100 SXM: HBM3 bandwidth and dense bf16/fp16 tensor-core throughput (kernels/NOTES.md)
H100_BYTES_PER_S = 3.35e12
H100_FLOPS = 989e12


def favor_flops_and_bytes(case: Case) -> tuple[float, float]:
    """Minimal FLOPs and HBM bytes of non-causal FAVOR+ attention (kernels/NOTES.md, "Roofline").

    Forward: feature maps of q and k (2 n m d each), context k'^T v (2 n m e), output q' @ context
    (2 n m e); reads q, k, v and writes out.  Forward+backward: 3x the forward FLOPs; reads q, k, v,
    out, grad and writes dq, dk, dv on top of the forward's traffic."""
    rows = case.b * case.h * case.n
    flops = 2.0 * rows * case.m * (2 * case.d + 2 * case.d)
    tensors = 4  # q, k, v, out
    if case.backward:
        flops *= 3
        tensors += 8  # + q, k, v, out, grad read; dq, dk, dv written
    return flops, float(tensors * rows * case.d * case.dtype.itemsize)


def h100_roofline_seconds(case: Case) -> float:
    flops, nbytes = favor_flops_and_bytes(case)
    return max(flops / H100_FLOPS, nbytes / H100_BYTES_PER_S)
