"""`performer-triton check`: every available attention path against the float64 reference.

The Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before the process started (Triton's interpreter).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from . import reference
from .functional import _triton_unsupported, favor_attention
from .projection import gaussian_orthogonal_random_matrix

BUDGETS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TF32_BUDGET = 2e-3
MODES = [
    ("non-causal", dict(causal=False, key_stabilizer="global")),
    ("causal global", dict(causal=True, key_stabilizer="global")),
    ("causal prefix", dict(causal=True, key_stabilizer="prefix")),
]
FEATURES = ["softmax", "relu", "none"]


@dataclass
class Row:
    device: str
    backend: str
    dtype: str
    mode: str
    feature: str
    out_err: float | None
    grad_err: float | None
    budget: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.out_err is not None and max(self.out_err, self.grad_err) <= self.budget


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _one(device, backend, dtype, mode_kwargs, feature, n, d, m) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    # inputs rounded to dtype first: the reference sees exactly what the path sees, so the error is
    # the computation's, not the input rounding's (which flips ReLU masks in 16 bits)
    q, k, v, grad = (torch.randn(2, 2, n, d, generator=g).to(dtype).double() for _ in range(4))
    P = gaussian_orthogonal_random_matrix(m, d, generator=g).to(dtype).double()
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.favor_attention(*ref_in, P, feature_map=feature, **mode_kwargs)
    ref.backward(grad)
    ours_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    out = favor_attention(*ours_in, P.to(device), feature_map=feature, backend=backend, **mode_kwargs)
    out.backward(grad.to(device=device, dtype=dtype))
    grad_err = max(_rel(a.grad, b.grad) for a, b in zip(ours_in, ref_in))
    return _rel(out, ref), grad_err


def run_checks(n: int = 37, d: int = 16, m: int = 44) -> list[Row]:
    """Run every path available on this machine; returns one Row per (device, backend, dtype,
    mode, feature map)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device, backend in itertools.product(devices, ["torch", "triton"]):
        dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
        if backend == "triton":
            dtypes = dtypes[1:]
        for dtype, (mode, kwargs), feature in itertools.product(dtypes, MODES, FEATURES):
            # the kernels' fp32 dots are TF32 on a GPU (kernels/feature_map.dot_precision)
            budget = TF32_BUDGET if (backend, device, dtype) == ("triton", "cuda", torch.float32) else BUDGETS[dtype]
            row = Row(device, backend, str(dtype).replace("torch.", ""), mode, feature, None, None, budget)
            probe = torch.empty(1, 1, 1, d, device=device, dtype=dtype)
            reason = _triton_unsupported(probe, probe, True) if backend == "triton" else None
            if backend == "triton" and device == "cpu" and dtype == torch.bfloat16 and reason is None:
                reason = "Triton's interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584)"
            if reason is not None:
                row.note = f"skipped: {reason}"
            else:
                row.out_err, row.grad_err = _one(device, backend, dtype, kwargs, feature, n, d, m)
            rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'device':6} {'backend':7} {'dtype':8} {'mode':13} {'features':8} {'out err':>9} {'grad err':>9} {'budget':>7}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.out_err is None:
            lines.append(f"{r.device:6} {r.backend:7} {r.dtype:8} {r.mode:13} {r.feature:8} {'':>9} {'':>9} {'':>7}  {r.note}")
        else:
            verdict = "ok" if r.ok else "FAIL"
            lines.append(
                f"{r.device:6} {r.backend:7} {r.dtype:8} {r.mode:13} {r.feature:8} "
                f"{r.out_err:9.1e} {r.grad_err:9.1e} {r.budget:7.0e}  {verdict}"
            )
    return "\n".join(lines)


def main(args) -> int:
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"performer-triton check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"Triton interpreter: {interp}")
    rows = run_checks(n=args.n, d=args.d, m=args.m)
    print(format_table(rows))
    failed = [r for r in rows if r.out_err is not None and not r.ok]
    ran = sum(r.out_err is not None for r in rows)
    print(f"{ran} paths checked, {len(failed)} over budget, {len(rows) - ran} skipped (reasons above)")
    return 1 if failed else 0
