"""Shared by the kernel tests: inputs, the float64 reference, and the forward+backward check of a
launcher pair (kernels/NOTES.md "Launcher contract") against it."""
import torch
from conftest import DEVICE

from performer_triton import reference as R
from performer_triton.kernels import GIVEN, RELU, SOFTMAX
from performer_triton.projection import gaussian_orthogonal_random_matrix

# fp32: the interpreter multiplies in full fp32; a GPU runs the kernels' fp32 dots in TF32
# (kernels/feature_map.dot_precision), ~1e-3 relative
BUDGET = {torch.float32: 2e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FEATURE_MAP = {SOFTMAX: "softmax", RELU: "relu"}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x against a float64 reference."""
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


def inputs(b, h, n, d, e, m, dtype, *, s=None, scale=1.0, seed=0):
    """q (b, h, n, d), k (b, h, s, d), v (b, h, s, e), projection (m, d), grad_out (b, h, n, e)."""
    gen = torch.Generator().manual_seed(seed)
    s = n if s is None else s
    q, k = scale * torch.randn(b, h, n, d, generator=gen), scale * torch.randn(b, h, s, d, generator=gen)
    v, g = torch.randn(b, h, s, e, generator=gen), torch.randn(b, h, n, e, generator=gen)
    proj = gaussian_orthogonal_random_matrix(m, d, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, proj, g)]


def reference(q, k, v, proj, g, *, causal, feature, prefix):
    """float64 out and (dq, dk, dv) through performer_triton.reference (GIVEN: q, k are features)."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    if feature == GIVEN:
        out = R.linear_attention(q64, k64, v64, causal=causal)
    else:
        out = R.favor_attention(
            q64, k64, v64, proj.cpu().double(), causal=causal,
            key_stabilizer="prefix" if prefix else "global", feature_map=FEATURE_MAP[feature],
        )
    return (out.detach(), *torch.autograd.grad(out, (q64, k64, v64), g.cpu().double()))


def check(fwd, bwd, q, k, v, proj, g, *, causal, feature, budget, prefix=False, limits=None):
    """Run the launchers fwd(q, k, v, proj, feature=, **mode) and bwd(g, ..., stats) and compare
    out, dq, dk, dv with the reference: dtypes kept, everything finite, relative errors below
    budget (or limits[name]).  Returns (errors, out, stats)."""
    mode = dict(prefix=prefix) if causal else {}
    out, *stats = fwd(q, k, v, proj, feature=feature, **mode)
    dq, dk, dv = bwd(g, q, k, v, proj, out, *stats, feature=feature, **mode)
    ref = reference(q, k, v, proj, g, causal=causal, feature=feature, prefix=prefix)
    assert out.dtype == q.dtype and stats[-1].dtype == torch.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(torch.isfinite(t).all() for t in (out, stats[-1], dq, dk, dv))
    errs = dict(out=rel_err(out, ref[0]), dq=rel_err(dq, ref[1]), dk=rel_err(dk, ref[2]), dv=rel_err(dv, ref[3]))
    limits = {name: budget for name in errs} | (limits or {})
    assert all(errs[name] < limits[name] for name in errs), errs
    return errs, out, stats
