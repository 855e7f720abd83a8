"""Causal FAVOR+ Triton kernels (kernels/causal.py) against the float64 reference.

Under the interpreter (no GPU) every program runs on CPU: shapes are small, blocks large.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import BUDGET, inputs, rel_err
from kernel_cases import check as kernel_check

from performer_triton import reference as R
from performer_triton.kernels import GIVEN, RELU, SOFTMAX
from performer_triton.kernels import causal as C
from performer_triton.projection import gaussian_orthogonal_random_matrix



def check(q, k, v, proj, g, *, feature, prefix, budget, limits=None):
    """Causal forward and backward against the float64 reference (see kernel_cases.check)."""
    _, out, stats = kernel_check(
        C.causal_fwd, C.causal_bwd, q, k, v, proj, g, causal=True, feature=feature, prefix=prefix,
        budget=budget, limits=limits,
    )
    return out, stats[-1]


# (b, h, n, d, e, m): n = 1 / 37 / 100 / 257 (partial last chunk), m not a multiple of BM
SHAPES = {
    "n37_d48_m100": (1, 2, 37, 48, 48, 100),
    "n1_d16_m44": (2, 1, 1, 16, 16, 44),
    "n257_d64_m266": (1, 1, 257, 64, 64, 266),
    "n100_d8_e40_m44": (1, 1, 100, 8, 40, 44),
    "n130_d56_e24_m70": (1, 1, 130, 56, 24, 70),
    "n37_d24_e32_m100": (1, 2, 37, 24, 32, 100),
    "n130_d32_e24_m70": (1, 1, 130, 32, 24, 70),
    # wide heads: d in BK-wide chunks (2 for 16-bit, 3 for fp32), e in EV-wide backward slices
    "n70_d80_e96_m50": (1, 1, 70, 80, 96, 50),
    "n37_d128_e72_m60": (1, 1, 37, 128, 72, 60),
    "n70_d64_e40_m50": (1, 1, 70, 64, 40, 50),
}


@pytest.mark.parametrize("prefix", [False, True], ids=["global", "prefix"])
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, "n37_d24_e32_m100"),
        (torch.float32, "n1_d16_m44"),
        (torch.float32, "n130_d32_e24_m70"),
        (torch.float32, "n70_d64_e40_m50"),
        (torch.float32, "n70_d80_e96_m50"),  # the forward reads q, k in chunks (BK_fwd < BD)
        (torch.float16, "n257_d64_m266"),
        (torch.float16, "n130_d56_e24_m70"),
        (torch.float16, "n70_d80_e96_m50"),
        (torch.bfloat16, "n37_d48_m100"),
        (torch.bfloat16, "n100_d8_e40_m44"),
        (torch.bfloat16, "n37_d128_e72_m60"),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_softmax(dtype, shape, prefix):
    q, k, v, proj, g = inputs(*SHAPES[shape], dtype)
    check(q, k, v, proj, g, feature=SOFTMAX, prefix=prefix, budget=BUDGET[dtype], limits=single_position(shape))


def single_position(shape):
    """At n = 1, out_0 = v_0 D'/(D' + c) with c the causal eps term: dq, dk are the residue of
    g.v - g.out, ill-conditioned in out (the float32 reference itself is 1.4e-5 off for SOFTMAX;
    for RELU c/D ~ 1e-6 is below fp32 resolution, so only finiteness is checked)."""
    if SHAPES[shape][2] != 1:
        return None
    return dict(dq=5e-5, dk=5e-5)


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, "n130_d32_e24_m70"),
        (torch.float32, "n1_d16_m44"),
        (torch.float16, "n37_d48_m100"),
        (torch.bfloat16, "n130_d56_e24_m70"),
        (torch.bfloat16, "n100_d8_e40_m44"),
        (torch.float16, "n70_d80_e96_m50"),
        (torch.float32, "n37_d128_e72_m60"),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_relu(dtype, shape):
    q, k, v, proj, g = inputs(*SHAPES[shape], dtype)
    limits = single_position(shape) and dict(dq=math.inf, dk=math.inf)
    check(q, k, v, proj, g, feature=RELU, prefix=True, budget=BUDGET[dtype], limits=limits)


@pytest.mark.parametrize(
    "dtype,feature_map,e",
    [(torch.float32, "none", 40), (torch.bfloat16, "none", 96), (torch.float16, "elu", 32)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_given(dtype, feature_map, e):
    """Precomputed features: 1.1.4's no_projection features (m = d) or a custom kernel_fn
    (m = 100, not a multiple of BM); gradients are w.r.t. the features.  e = 40 (fp32), 96
    (16-bit) run the backward in value slices."""
    q, k, v, proj, g = inputs(1, 2, 70, 48, e, 100, torch.float64)
    kernel_fn = (lambda x: F.elu(x) + 1.0) if feature_map == "elu" else "none"
    qf, kf = R.feature_maps(q, k, proj, causal=True, feature_map=kernel_fn)
    qf, kf, v, g = (t.to(dtype) for t in (qf, kf, v, g))
    check(qf, kf, v, None, g, feature=GIVEN, prefix=False, budget=BUDGET[dtype])


def test_strided_inputs():
    """Transposed-view q, k, v, grad_out ((b, n, h, d) storage) need no copies."""
    b, h, n, d, e, m = 2, 2, 70, 32, 24, 64
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(b, n, h, d, generator=gen).transpose(1, 2) for _ in range(2))
    v, g = (torch.randn(b, n, h, e, generator=gen).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    proj = gaussian_orthogonal_random_matrix(m, d, generator=gen)
    check(q, k, v, proj, g, feature=SOFTMAX, prefix=True, budget=BUDGET[torch.float32])


@pytest.mark.parametrize("prefix", [False, True], ids=["global", "prefix"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_large_inputs(dtype, prefix):
    """q, k ~ 3 N(0, 1), where 1.1.4 overflows in fp16: finite, out within 1e-2 (fp16) / 3e-2.
    Features are ~ 1e-4 + exp(-|x|^2 dn^2 / 2) ~ 1e-4 + 1e-16, attention is nearly uniform, and
    the true dq (~1e-22) is the residue of a cancellation of terms 1e8 larger: ill-conditioned in
    any precision (the float32 reference is 2.5e9 off), so only finiteness is checked. dk (~1e-14)
    underflows fp16 but must be accurate in bf16."""
    q, k, v, proj, g = inputs(1, 2, 100, 64, 64, 266, dtype, scale=3.0, seed=5)
    fp16 = dtype == torch.float16
    limits = dict(dq=math.inf, dk=math.inf if fp16 else BUDGET[dtype])
    check(q, k, v, proj, g, feature=SOFTMAX, prefix=prefix, budget=1e-2 if fp16 else BUDGET[dtype], limits=limits)


def test_rden_and_stats():
    """rden = ratio^2 / (q' . (sum_{j<=i} k'_j + 1e-6)) and the saved per-row stats."""
    q, k, v, proj, _ = inputs(1, 2, 70, 32, 32, 100, torch.float32, seed=7)
    out, q_max, k_max, k_scale, rden = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=False)
    qf, kf = R.feature_maps(q.double(), k.double(), proj.double(), causal=True)
    den = torch.einsum("bhnm,bhnm->bhn", qf, kf.cumsum(dim=2) + R.CAUSAL_EPS) / 100**-1.0
    assert rel_err(rden, 1.0 / den) < 1e-5
    dash_q, dash_k = R._project(q.double(), proj.double()), R._project(k.double(), proj.double())
    assert rel_err(q_max, dash_q.amax(-1)) < 1e-5
    assert rel_err(k_max, dash_k.amax(-1)) < 1e-5
    assert rel_err(k_scale, dash_k.amax(-1) - R._half_sq_norm(k.double())[..., 0]) < 1e-5
    for feature in (RELU, GIVEN):
        x = q if feature == RELU else q.abs()
        stats = C.causal_fwd(x, x, v, proj if feature == RELU else None, feature=feature, prefix=True)[1:4]
        assert all(s.shape == (1, 2, 0) and s.dtype == torch.float32 for s in stats)


def test_prefix_does_not_leak():
    """prefix: tripling the keys after position i leaves outputs <= i unchanged (to rounding);
    global (1.1.4) changes them, since the key max moves."""
    i = 40
    q, k, v, proj, _ = inputs(1, 2, 100, 32, 32, 64, torch.float32, seed=11)
    k2 = k.clone()
    k2[:, :, i + 1:] *= 3.0
    for prefix in (True, False):
        out = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=prefix)[0]
        out2 = C.causal_fwd(q, k2, v, proj, feature=SOFTMAX, prefix=prefix)[0]
        change = ((out2 - out)[:, :, : i + 1].norm() / out[:, :, : i + 1].norm()).item()
        assert (change < 1e-6) if prefix else (change > 1e-3), (prefix, change)
        assert (out2[:, :, i + 1:] - out[:, :, i + 1:]).abs().max() > 1e-3


def test_meta_launches(monkeypatch):
    """Launchers run on meta tensors (the compile report intercepts every launch): no host reads
    of tensor values; every kernel is reached, with the expected constexprs."""
    launched = []
    kernels = (C._state_kernel, C._fwd_kernel, C._dstate_kernel, C._bwd_q_kernel, C._bwd_k_kernel, C._bwd_v_kernel)
    run = type(C._fwd_kernel).run

    def record(self, *args, grid, **kw):
        if self in kernels:
            launched.append((self.fn.__name__, grid, kw["FEATURE"], kw["PRECISION"]))
        return None

    monkeypatch.setattr(type(C._fwd_kernel), "run", record)
    b, h, n, d, e, m = 2, 3, 200, 64, 64, 266
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k = torch.empty(b, h, n, d, **meta), torch.empty(b, h, n, d, **meta)
    v, g = torch.empty(b, h, n, e, **meta), torch.empty(b, h, n, e, **meta)
    proj = torch.empty(m, d, **meta)
    out, *stats = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=True)
    C.causal_bwd(g, q, k, v, proj, out, *stats, feature=SOFTMAX, prefix=True)
    monkeypatch.setattr(type(C._fwd_kernel), "run", run)
    assert [name for name, *_ in launched] == [
        "_state_kernel", "_fwd_kernel", "_state_kernel", "_dstate_kernel", "_bwd_q_kernel", "_bwd_k_kernel", "_bwd_v_kernel",
    ]
    bm = C._config(SOFTMAX, d, e, m, torch.bfloat16)["BM"]
    assert launched[1][1] == (4, b * h) and launched[0][1] == (-(-m // bm), b * h)
    assert all(f == SOFTMAX and p == "tf32" for *_, f, p in launched)


def test_launchers_reject_head_dims_above_the_limit():
    """Beyond max_head_dim(dtype) the compile report has not checked the kernels spill-free: the
    launchers refuse, and favor_attention(backend="triton") names the limit (auto uses the
    PyTorch path there)."""
    from performer_triton import favor_attention
    from performer_triton.kernels import max_head_dim
    from performer_triton.kernels import noncausal as NC

    assert {max_head_dim(t) for t in (torch.float32, torch.bfloat16, torch.float16)} == {128}
    assert max_head_dim(torch.float64) == 0
    q, k, v, proj, _ = inputs(1, 1, 8, 160, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="d = 160: the Triton kernels take torch.float32 head dims up to 128"):
        C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=False)
    with pytest.raises(ValueError, match="e = 136"):
        NC.noncausal_fwd(*(t.half() for t in (q[..., :80], k[..., :80], torch.zeros(1, 1, 8, 136), proj[:, :80])),
                         feature=SOFTMAX)
    with pytest.raises(ValueError, match="head dims up to 128"):
        favor_attention(q, k, v, proj, backend="triton")
    favor_attention(q[..., :128], k[..., :128], v, proj[:, :128], backend="triton")  # 128 is the widest
