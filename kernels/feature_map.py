"""FAVOR+ feature-map tile math shared by the attention kernels, and the per-row stats kernel.

Feature maps (the FEATURE constexpr of every attention kernel):
  SOFTMAX  positive random features, 1.1.4's softmax_kernel (ratio kept out of the tiles)
  RELU     generalized attention with ReLU: relu((dn x) @ P^T) + 1e-3
  GIVEN    features precomputed by the caller, read as (rows, m) tiles

See kernels/NOTES.md for the factorisation the helpers implement.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FEATURE_NAMES, GIVEN, RELU, SOFTMAX, max_head_dim  # noqa: F401  (re-exported for the kernels)

# the feature codes as constexpr globals, the only kind of global a @triton.jit body may read
# (compiled Triton rejects plain ints; the interpreter does not notice)
FM_SOFTMAX = tl.constexpr(SOFTMAX)
FM_RELU = tl.constexpr(RELU)
FM_GIVEN = tl.constexpr(GIVEN)

SOFTMAX_EPS: tl.constexpr = tl.constexpr(1e-4)
GENERALIZED_EPS: tl.constexpr = tl.constexpr(1e-3)
CAUSAL_EPS: tl.constexpr = tl.constexpr(1e-6)


@triton.jit
def load_rows(p_base, o_t, m_t, stride_t, o_c, m_c):
    """Load a (rows, cols) tile with unit column stride; masked entries are 0."""
    p = p_base + o_t[:, None].to(tl.int64) * stride_t + o_c[None, :]
    return tl.load(p, mask=m_t[:, None] & m_c[None, :], other=0.0)


@triton.jit
def dash_tile(b_x, b_p, dn, PRECISION: tl.constexpr):
    """(dn x) @ P^T with an fp32 accumulator.  b_x (BT, BD), b_p (BM, BD) -> (BT, BM) fp32.
    PRECISION matters for fp32 tiles only (16-bit tiles multiply exactly on tensor cores)."""
    return tl.dot(b_x, tl.trans(b_p), input_precision=PRECISION) * dn


@triton.jit
def _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK: tl.constexpr, PRECISION: tl.constexpr):
    """b_dash (BT, BM) += x[:, chunk i_k] @ P[:, chunk i_k]^T."""
    o_k = i_k * BK + tl.arange(0, BK)  # (BK,)
    m_k = o_k < D
    b_x = load_rows(p_x, o_t, m_t, stride_t, o_k, m_k)  # (BT, BK)
    b_p = load_rows(p, o_m, m_m, D, o_k, m_k)  # (BM, BK)
    return b_dash + tl.dot(b_x, tl.trans(b_p), input_precision=PRECISION)


@triton.jit
def dash_rows(p_x, o_t, m_t, stride_t, p, o_m, m_m, D, dn,
              BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, PRECISION: tl.constexpr):
    """(dn x) @ P^T for rows o_t of x and features o_m, loading x and P in NK = cdiv(D, BK)
    column chunks: no (rows, d) tile stays live, which is what lets the backward kernels take
    d = 128 (kernels/NOTES.md, "Wide heads").  -> (BT, BM) fp32.

    Up to two chunks are unrolled (a loop there cost sm_80 registers); more stay a loop
    (unrolling four fp32 chunks spilled on sm_90)."""
    b_dash = tl.zeros([BT, BM], dtype=tl.float32)  # (BT, BM)
    if NK <= 2:
        for i_k in tl.static_range(NK):
            b_dash = _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK, PRECISION)
    else:
        for i_k in range(NK):
            b_dash = _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK, PRECISION)
    return b_dash * dn


@triton.jit
def _sq_chunk(b_s, p_x, o_t, m_t, stride_t, D, i_k, BK: tl.constexpr):
    """b_s (BT,) += row sums of x[:, chunk i_k]^2 in fp32."""
    o_k = i_k * BK + tl.arange(0, BK)  # (BK,)
    b_x = load_rows(p_x, o_t, m_t, stride_t, o_k, o_k < D).to(tl.float32)  # (BT, BK)
    return b_s + tl.sum(b_x * b_x, axis=1)


@triton.jit
def half_sq_norm_rows(p_x, o_t, m_t, stride_t, D, dn, BT: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr):
    """|dn x|^2 / 2 for rows o_t of x, in NK BK-wide column chunks (unrolled as in dash_rows).
    -> (BT,) fp32."""
    b_s = tl.zeros([BT], dtype=tl.float32)  # (BT,)
    if NK <= 2:
        for i_k in tl.static_range(NK):
            b_s = _sq_chunk(b_s, p_x, o_t, m_t, stride_t, D, i_k, BK)
    else:
        for i_k in range(NK):
            b_s = _sq_chunk(b_s, p_x, o_t, m_t, stride_t, D, i_k, BK)
    return b_s * (dn * dn * 0.5)


@triton.jit
def half_sq_norm(b_x, dn):
    """|dn x|^2 / 2 per row in fp32.  b_x (BT, BD) -> (BT,)."""
    b_xf = b_x.to(tl.float32)
    return tl.sum(b_xf * b_xf, axis=1) * (dn * dn * 0.5)


@triton.jit
def query_features(b_dash, b_diag, b_max, m_f):
    """q~ = exp(dash - diag - row_max) + 1e-4, 0 on padded features.
    b_dash (BT, BM) fp32, b_diag (BT,), b_max (BT,), m_f (BM,) -> (BT, BM) fp32."""
    b_q = tl.exp(b_dash - b_max[:, None] - b_diag[:, None]) + SOFTMAX_EPS
    return tl.where(m_f[None, :], b_q, 0.0)


@triton.jit
def key_units(b_dash, b_max, m_f):
    """U = exp(dash - row_max) in (0, 1], 0 on padded features.
    b_dash (BT, BM) fp32, b_max (BT,), m_f (BM,) -> (BT, BM) fp32."""
    return tl.where(m_f[None, :], tl.exp(b_dash - b_max[:, None]), 0.0)


@triton.jit
def relu_features(b_dash, m_f):
    """relu(dash) + 1e-3, 0 on padded features.  (BT, BM) fp32 -> (BT, BM) fp32."""
    return tl.where(m_f[None, :], tl.maximum(b_dash, 0.0) + GENERALIZED_EPS, 0.0)


@triton.jit
def _row_stats_kernel(
    x, p, row_max, row_scale,
    H, N, M, D,
    stride_xb, stride_xh, stride_xn,
    dn,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)  # (BT,)
    m_t = o_t < N
    o_d = tl.arange(0, BD)  # (BD,)
    m_d = o_d < D
    p_x = x + i_b.to(tl.int64) * stride_xb + i_h.to(tl.int64) * stride_xh
    b_x = load_rows(p_x, o_t, m_t, stride_xn, o_d, m_d)  # (BT, BD)
    b_max = tl.full([BT], float("-inf"), dtype=tl.float32)  # (BT,)
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)  # (BM,)
        m_m = o_m < M
        b_p = load_rows(p, o_m, m_m, D, o_d, m_d)  # (BM, BD)
        b_dash = dash_tile(b_x, b_p, dn, PRECISION)  # (BT, BM)
        b_dash = tl.where(m_m[None, :], b_dash, float("-inf"))
        b_max = tl.maximum(b_max, tl.max(b_dash, axis=1))
    b_scale = b_max - half_sq_norm(b_x, dn)  # (BT,)
    o_out = i_bh.to(tl.int64) * N + o_t
    tl.store(row_max + o_out, b_max, mask=m_t)
    tl.store(row_scale + o_out, b_scale, mask=m_t)


def check_head_dims(dtype: torch.dtype, **dims: int) -> None:
    """Launchers' guard: head dims above max_head_dim(dtype) would compile to spilling kernels."""
    limit = max_head_dim(dtype)
    for name, value in dims.items():
        if value > limit:
            raise ValueError(f"{name} = {value}: the Triton kernels take {dtype} head dims up to {limit}")


def backward_in_value_slices(bwd_slice, grad_out, v, out, ev: int, q_dtype, k_dtype):
    """Run a backward on value columns: bwd_slice(grad_out, v, out, grad_dtype) -> (dq, dk, dv).

    e up to ev runs once (dq, dk in q's / k's dtype). Wider e runs on cdiv(e, ev) even slices
    (one tile width, BV = ev): dq and dk are linear in (dN, dD) and dD = -rden (g . out) splits
    over value columns, so the slices' fp32 dq, dk add up exactly and their dv are its columns
    (NOTES "Wide heads")."""
    e = v.shape[-1]
    width = triton.cdiv(e, triton.cdiv(e, ev))
    if width == e:
        dq, dk, dv = bwd_slice(grad_out, v, out, q_dtype)
        return dq.to(q_dtype), dk.to(k_dtype), dv
    dq = dk = None
    dv = []
    for e0 in range(0, e, width):
        cols = slice(e0, e0 + width)
        dq_s, dk_s, dv_s = bwd_slice(grad_out[..., cols], v[..., cols], out[..., cols], torch.float32)
        dq = dq_s if dq is None else dq.add_(dq_s)
        dk = dk_s if dk is None else dk.add_(dk_s)
        dv.append(dv_s)
    return dq.to(q_dtype), dk.to(k_dtype), torch.cat(dv, dim=-1)


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of every tl.dot with fp32 operands: TF32 on tensor cores.

    16-bit inputs meet fp32 operands only in unbounded states and gradients, where TF32's
    precision matches the inputs' own. fp32 inputs get TF32 throughout (~1e-3 relative, what
    torch.set_float32_matmul_precision("high") gives cuBLAS): fp32-exact "ieee" dots and 3xTF32
    need two to three times the registers and spill in every configuration (kernels/NOTES.md),
    so performer_triton.functional keeps fp32 on the PyTorch path unless TF32 is allowed.
    """
    return "tf32"


def row_stats(x: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row max of dash = (dn x) @ P^T over features, and that max minus |dn x|^2 / 2.

    x (b, h, n, d) with unit last stride; projection (m, d) contiguous in x's dtype.
    Returns two fp32 (b, h, n) tensors.
    """
    b, h, n, d = x.shape
    m = projection.shape[0]
    row_max = torch.empty((b, h, n), device=x.device, dtype=torch.float32)
    row_scale = torch.empty_like(row_max)
    if n == 0 or b * h == 0:
        return row_max, row_scale
    BT, BM, BD = 64, 64, max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(n, BT), b * h)
    _row_stats_kernel[grid](
        x, projection, row_max, row_scale,
        h, n, m, d,
        x.stride(0), x.stride(1), x.stride(2),
        d**-0.25,
        BT=BT, BM=BM, BD=BD, PRECISION=dot_precision(x.dtype),
        num_warps=4,
    )
    return row_max, row_scale
