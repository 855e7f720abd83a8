"""Shared by the kernel tests (test_kernels_causal.py, test_kernels_noncausal.py): inputs, the
float64 reference, the forward+backward check of a launcher pair (kernels/NOTES.md "Launcher
contract") against it, the cases both attention modes run, and launch recording on meta tensors."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from performer_triton import reference as R
from performer_triton.feature_maps import KERNEL_MAPS, half_sq_norm, project
from performer_triton.kernels import GIVEN, SOFTMAX, launchers
from performer_triton.projection import gaussian_orthogonal_random_matrix

# fp32: a GPU runs the kernels' fp32 dots in TF32 (kernels/feature_map.PRECISION), ~1e-3
# relative; the interpreter emulates it (conftest._tf32), so the budget is the same on both
BUDGET = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# fp32 dq and dk pass through two chained TF32 dots (dN @ H^T, then the features' chain rule
# through P), each truncating its operands to 10 bits: ~2.2e-3 measured, where out and dv
# (one TF32 dot after the 3xTF32 dash) stay under 1.5e-3
FP32_GRAD_BUDGET = 3e-3
# the reference's feature_map name of each map the kernels compute
FEATURE_MAP = {code: fmap.name for code, fmap in KERNEL_MAPS.items() if fmap.fused}


def ids(x) -> str:
    return str(x).replace("torch.", "")


def dtype_cases(**shapes_by_dtype):
    """parametrize("dtype,shape") over {dtype name: shape names}."""
    cases = [(getattr(torch, name), shape) for name, shapes in shapes_by_dtype.items() for shape in shapes]
    return pytest.mark.parametrize("dtype,shape", cases, ids=ids)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x against a float64 reference."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


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


def check(q, k, v, proj, g, *, causal, feature, budget, prefix=False, limits=None):
    """Run the launchers of the mode (kernels.launchers) and compare out, dq, dk, dv with the
    reference: dtypes kept, everything finite, relative errors below budget (or limits[name]).
    Returns (errors, out, stats)."""
    fwd, bwd, _ = launchers(causal)
    out, *stats = fwd(q, k, v, proj, feature=feature, prefix=prefix)
    dq, dk, dv = bwd(g, q, k, v, proj, out, *stats, feature=feature, prefix=prefix)
    ref = reference(q, k, v, proj, g, causal=causal, feature=feature, prefix=prefix)
    rden = stats[-2]
    assert out.dtype == q.dtype and rden.dtype == torch.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(torch.isfinite(t).all() for t in (out, rden, dq, dk, dv))
    errs = dict(out=rel_err(out, ref[0]), dq=rel_err(dq, ref[1]), dk=rel_err(dk, ref[2]), dv=rel_err(dv, ref[3]))
    limits = {name: budget for name in errs} | (limits or {})
    if q.dtype == torch.float32 and budget == BUDGET[torch.float32]:
        limits |= {name: max(limits[name], FP32_GRAD_BUDGET) for name in ("dq", "dk")}
    assert all(errs[name] < limits[name] for name in errs), errs
    return errs, out, stats


# ----------------------------------------------------------------------------- cases of both modes

GIVEN_CASES = pytest.mark.parametrize(
    "dtype,feature_map,e",
    [(torch.float32, "none", 40), (torch.bfloat16, "none", 96), (torch.float16, "elu", 32)],
    ids=ids,
)


def given_case(dtype, feature_map, e, *, causal, s):
    """Precomputed features: 1.1.4's no_projection features (m = d) or a custom kernel_fn
    (m = 100, not a multiple of BM); gradients are w.r.t. the features.  e = 40 (fp32), 96
    (16-bit) run the backward in value slices."""
    q, k, v, proj, g = inputs(1, 2, 70, 48, e, 100, torch.float64, s=s)
    kernel_fn = (lambda x: F.elu(x) + 1.0) if feature_map == "elu" else "none"
    qf, kf = R.feature_maps(q, k, proj, causal=causal, feature_map=kernel_fn)
    qf, kf, v, g = (t.to(dtype) for t in (qf, kf, v, g))
    check(qf, kf, v, None, g, causal=causal, feature=GIVEN, budget=BUDGET[dtype])


def strided_case(*, causal, prefix=False):
    """Transposed-view q, k, v, grad_out ((b, n, h, d) storage) need no copies."""
    b, h, n, d, e, m = 2, 2, 70, 32, 24, 64
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(b, n, h, d, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(2))
    v, g = (torch.randn(b, n, h, e, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    proj = gaussian_orthogonal_random_matrix(m, d, generator=gen).to(DEVICE)
    check(q, k, v, proj, g, causal=causal, feature=SOFTMAX, prefix=prefix, budget=BUDGET[torch.float32])


def unaligned_case(dtype, *, causal, prefix=False):
    """q, k, v, grad_out as column windows of wider rows: odd row strides (alignment 1 while the
    head dims d = 24, e = 40 alone would declare 8) and base pointers one element off 16 bytes."""
    b, h, n, d, e, m = 1, 2, 70, 24, 40, 50
    q, k, v, proj, g = inputs(b, h, n, d, e, m, dtype, seed=4)

    def window(x):
        wide = torch.full((*x.shape[:-1], x.shape[-1] + 3), float("nan"), dtype=x.dtype, device=x.device)
        wide[..., 1:-2] = x
        return wide[..., 1:-2]

    q, k, v, g = (window(t) for t in (q, k, v, g))
    assert q.stride(2) % 2 == 1 and v.stride(2) % 2 == 1
    check(q, k, v, proj, g, causal=causal, feature=SOFTMAX, prefix=prefix, budget=BUDGET[dtype])


def large_inputs_case(dtype, *, causal, prefix=False):
    """q, k ~ 3 N(0, 1), where 1.1.4 overflows in fp16: finite, out within 1e-2 (fp16) / 3e-2
    (bf16). dq is the ill-conditioned residue of a cancellation and dk (~1e-14) underflows fp16,
    so those are checked for finiteness only (dk: in fp16)."""
    q, k, v, proj, g = inputs(1, 2, 100, 64, 64, 266, dtype, scale=3.0, seed=5)
    fp16 = dtype == torch.float16
    limits = dict(dq=math.inf, dk=math.inf if fp16 else BUDGET[dtype])
    check(q, k, v, proj, g, causal=causal, feature=SOFTMAX, prefix=prefix,
          budget=1e-2 if fp16 else BUDGET[dtype], limits=limits)


# packed sequences (cu_seqlens, the kernels' VARLEN): lengths around a block (64) and an empty one
PACKED_LENGTHS = (1, 63, 64, 65, 0, 37)


def packed_inputs(dtype, lengths=PACKED_LENGTHS, h=2, d=16, e=24, m=44):
    """q, k, v, proj, g, cu: (1, h, total, .) views of (1, total, h, .) tensors (the layout a
    model's rearrange gives), int32 offsets."""
    gen = torch.Generator().manual_seed(3)
    total = sum(lengths)
    q, k, v, g = (torch.randn(1, total, h, x, generator=gen).to(DEVICE, dtype).transpose(1, 2) for x in (d, d, e, e))
    proj = gaussian_orthogonal_random_matrix(m, d, generator=gen).to(DEVICE, dtype)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    return q, k, v, proj, g, cu


def packed_run(q, k, v, proj, g, cu, *, causal, feature, prefix=False):
    """out, dq, dk, dv of one pack through the launchers of the mode."""
    fwd, bwd, _ = launchers(causal)
    out, *stats = fwd(q, k, v, proj, feature=feature, prefix=prefix, cu_seqlens=cu)
    return (out, *bwd(g, q, k, v, proj, out, *stats, feature=feature, prefix=prefix, cu_seqlens=cu))


def packed_case(dtype, *, causal, feature, prefix=False):
    """One launch set over a pack: every sequence within budget of its own float64 reference
    (its own blocks, stabilizers and states: nothing crosses a boundary; an empty sequence owns
    a block slot and writes nothing)."""
    q, k, v, proj, g, cu = packed_inputs(dtype)
    packed = packed_run(q, k, v, proj, g, cu, causal=causal, feature=feature, prefix=prefix)
    assert all(torch.isfinite(t).all() for t in packed)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        part = [t[:, :, a:b] for t in (q, k, v, g)]
        refs = reference(*part[:3], proj, part[3], causal=causal, feature=feature, prefix=prefix)
        for name, x, ref in zip(("out", "dq", "dk", "dv"), packed, refs):
            if b - a == 1 and name in ("dq", "dk"):  # one key: the residue of g.v - g.out, ill-conditioned
                continue
            limit = FP32_GRAD_BUDGET if dtype == torch.float32 and name in ("dq", "dk") else BUDGET[dtype]
            assert rel_err(x[:, :, a:b], ref) < limit, (name, a, b)


def check_row_stats(q, k, proj, q_max, k_max, k_scale, tol=1e-5):
    """The saved per-row stats: q_max, k_max = max_f dash, k_scale = k_max - |dn k|^2 / 2."""
    dash_q, dash_k = project(q.double(), proj.double()), project(k.double(), proj.double())
    assert rel_err(q_max, dash_q.amax(-1)) < tol
    assert rel_err(k_max, dash_k.amax(-1)) < tol
    assert rel_err(k_scale, dash_k.amax(-1) - half_sq_norm(k.double())) < tol


# ----------------------------------------------------------------------------- launches on meta tensors


def meta_launches(causal, dtype, *, b=2, h=3, n=200, d=64, e=64, m=266, feature=SOFTMAX, prefix=False):
    """Run the mode's forward and backward launchers on meta tensors with every kernel launch
    recorded instead of run (as the compile report does): [(kernel name, grid, keywords)]."""
    from performer_triton.kernels import feature_map

    kernel_type = type(feature_map._row_stats_kernel)  # JITFunction, or the interpreter's
    launched = []

    def record(self, *args, grid, **kw):
        launched.append((self.fn.__name__, grid, kw))

    meta = dict(device="meta", dtype=dtype)
    q, k = torch.empty(b, h, n, d, **meta), torch.empty(b, h, n, d, **meta)
    v, g = torch.empty(b, h, n, e, **meta), torch.empty(b, h, n, e, **meta)
    proj = torch.empty(m, d, **meta)
    fwd, bwd, _ = launchers(causal)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_type, "run", record)
        out, *stats = fwd(q, k, v, proj, feature=feature, prefix=prefix)
        bwd(g, q, k, v, proj, out, *stats, feature=feature, prefix=prefix)
    return launched
