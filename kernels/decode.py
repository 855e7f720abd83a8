"""Fused decode step: one new position of every sequence and head in one launch (issue 13).

The state is the cached decoder's (performer_triton.decoding.FavorState; kernels/NOTES.md
"Decode step"), per (b, h), in the state's dtype:
    hz (m, e + 1)  = [H | z] = sum_j exp(row_scale_j - R) u_j [v_j, 1]^T, relative to R
    v_sum (e + 1,) = [value sum | key count]
    ref R, stab M  = running maxima of row_scale and of row_max (SOFTMAX; RELU keeps R = 0, M = -inf)
  _step_kernel  grid (b*h,): the state with the key's features added (FavorState.extend), written
                to new buffers (the cache keeps the old ones until the call succeeds), then the
                query's output against it (FavorState.read): two passes over m tiles, the first for
                the row maxima of the key and query projections.
No tl.dot: one row per program, (BM, BD) projection tiles times a row, fp32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM, RELU, SOFTMAX, feature_eps
from .feature_map import (
    FM_SOFTMAX, aligned, alignment, block_range, check_unit_stride, head_scale, launch, merged_reference,
    next_power_of_2, reciprocal_or_zero
)

__all__ = ["decode_step"]


@triton.jit
def _row_dashes(p, b_k, b_q, o_m, m_m, o_d, m_d, D, dn):
    """(dn x) @ P[o_m]^T for the rows b_k and b_q (BD,) fp32 from one load of the projection
    tile -> two (BM,) fp32 (0 on padded features)."""
    b_p = tl.load(p + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)  # (BM, BD)
    b_p = b_p.to(tl.float32)
    return tl.sum(b_p * b_k[None, :], axis=1) * dn, tl.sum(b_p * b_q[None, :], axis=1) * dn


@triton.jit
def _step_kernel(
    q, k, v, p, keep, hz, v_sum, ref, stab, hz_out, v_sum_out, ref_out, stab_out, out,
    H, M, D, E,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    dn, f_eps, causal_coef,
    FEATURE: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    AL: tl.constexpr, AV: tl.constexpr,
):
    """One position of (b, h) = program i_bh: q, k (BD,), v (E,) rows; keep (b,) bool (HAS_KEEP):
    a dropped key leaves the state unchanged. hz (b*h, M, E + 1), v_sum (b*h, E + 1), ref, stab
    (b*h,) -> the updated state in hz_out, v_sum_out, ref_out, stab_out (the same shapes; the
    inputs themselves for an update in place); out (E,) = N / D of the query against it."""
    i_bh = tl.program_id(0)
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_kb, stride_kh = aligned(stride_qh, AL), aligned(stride_kb, AL), aligned(stride_kh, AL)
    stride_vb, stride_vh, stride_ob = aligned(stride_vb, AV), aligned(stride_vh, AV), aligned(stride_ob, AV)
    stride_oh = aligned(stride_oh, AV)
    i_b, i_h = i_bh // H, i_bh % H
    o_d, m_d = block_range(0, BD, D)  # (BD,)
    o_v, m_v = block_range(0, BV, E + 1)  # (BV,) value columns, then the z / count column E
    # the position's rows: q, k (BD,) fp32, v (BV,)
    b_q = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh + o_v, mask=o_v < E, other=0.0)
    b_vo = tl.where(o_v == E, 1.0, b_v.to(tl.float32))  # (BV,) [v, 1]
    if HAS_KEEP:
        kept = tl.load(keep + i_b) != 0  # ()
    else:
        kept = i_bh >= 0
    # a dropped key's [v, 1] and units are selected away (a factor 0 would keep a NaN there: 0 x NaN)
    b_vo = tl.where(kept, b_vo, 0.0)  # (BV,)
    # row maxima of the projections (SOFTMAX): the key's units and the query's features need them
    k_max = tl.full([], 0.0, dtype=tl.float32)
    q_max = tl.full([], 0.0, dtype=tl.float32)
    k_diag = tl.full([], 0.0, dtype=tl.float32)
    q_diag = tl.full([], 0.0, dtype=tl.float32)
    if FEATURE == FM_SOFTMAX:
        k_max = tl.full([], float("-inf"), dtype=tl.float32)
        q_max = tl.full([], float("-inf"), dtype=tl.float32)
        for i_m in range(0, tl.cdiv(M, BM)):
            o_m, m_m = block_range(i_m, BM, M)  # (BM,)
            b_dk, b_dq = _row_dashes(p, b_k, b_q, o_m, m_m, o_d, m_d, D, dn)  # (BM,) x2
            k_max = tl.maximum(k_max, tl.max(tl.where(m_m, b_dk, float("-inf"))))
            q_max = tl.maximum(q_max, tl.max(tl.where(m_m, b_dq, float("-inf"))))
        k_diag = tl.sum(b_k * b_k) * (dn * dn * 0.5)
        q_diag = tl.sum(b_q * b_q) * (dn * dn * 0.5)
    row_scale = tl.where(kept, k_max - k_diag, float("-inf"))  # RELU: 0, as FavorState
    r_old = tl.load(ref + i_bh).to(tl.float32)  # () R before the key
    r_new, alpha, beta = merged_reference(r_old, row_scale)  # beta: 0 for a dropped key
    o_hz = i_bh.to(tl.int64) * M * (E + 1)  # this (b, h)'s state rows
    b_nd = tl.zeros([BV], dtype=tl.float32)  # (BV,) sum_f q~_f hz_f = [N, D] before the eps parts
    q_sum = tl.full([], 0.0, dtype=tl.float32)
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_dk, b_dq = _row_dashes(p, b_k, b_q, o_m, m_m, o_d, m_d, D, dn)  # (BM,) x2
        if FEATURE == FM_SOFTMAX:
            b_u = tl.exp(b_dk - k_max)  # (BM,) units in (0, 1]
            b_qf = tl.exp(b_dq - q_diag - q_max) + f_eps  # (BM,) q~
        else:
            b_u = tl.maximum(b_dk, 0.0, propagate_nan=tl.PropagateNan.ALL)  # (BM,) NaN stays NaN, as torch's relu
            b_qf = tl.maximum(b_dq, 0.0, propagate_nan=tl.PropagateNan.ALL) + f_eps  # (BM,)
        b_u = tl.where(m_m & kept, b_u, 0.0)
        b_qf = tl.where(m_m, b_qf, 0.0)
        m_hz = m_m[:, None] & m_v[None, :]  # (BM, BV)
        o_t = o_hz + o_m[:, None] * (E + 1) + o_v[None, :]  # (BM, BV)
        b_hz = tl.load(hz + o_t, mask=m_hz, other=0.0).to(tl.float32) * alpha + (beta * b_u)[:, None] * b_vo[None, :]
        b_hz = b_hz.to(hz.dtype.element_ty)  # (BM, BV) as stored: the output reads the state it leaves
        tl.store(hz_out + o_t, b_hz, mask=m_hz)
        b_nd += tl.sum(b_qf[:, None] * b_hz.to(tl.float32), axis=0)
        q_sum += tl.sum(b_qf)
    o_vs = i_bh.to(tl.int64) * (E + 1) + o_v  # (BV,)
    b_vs = tl.load(v_sum + o_vs, mask=m_v, other=0.0).to(tl.float32) + b_vo  # (BV,)
    b_vs = b_vs.to(v_sum.dtype.element_ty)
    tl.store(v_sum_out + o_vs, b_vs, mask=m_v)
    r_new = r_new.to(ref.dtype.element_ty)
    tl.store(ref_out + i_bh, r_new)
    s_new = tl.load(stab + i_bh)  # () M (RELU: as it was, the decoder's -inf)
    if FEATURE == FM_SOFTMAX:
        s_new = tl.maximum(s_new.to(tl.float32), tl.where(kept, k_max, float("-inf"))).to(stab.dtype.element_ty)
    tl.store(stab_out + i_bh, s_new)
    if FEATURE == FM_SOFTMAX:
        # exp(R - M) <= 1; 0 while no key has been kept
        scale = tl.where(s_new == float("-inf"), 0.0, tl.exp(r_new.to(tl.float32) - s_new.to(tl.float32)))
        coef = causal_coef
    else:
        scale = 1.0
        coef = causal_coef * tl.exp(-tl.where(r_new == float("-inf"), 0.0, r_new.to(tl.float32)))
    b_nd = scale * b_nd + f_eps * q_sum * b_vs.to(tl.float32)  # (BV,) [N, D]
    den = tl.sum(tl.where(o_v == E, b_nd, 0.0)) + coef * q_sum
    p_o = out + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + o_v
    tl.store(p_o, (b_nd * reciprocal_or_zero(den)).to(out.dtype.element_ty), mask=o_v < E)


def decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, keep: torch.Tensor | None,
    hz: torch.Tensor, v_sum: torch.Tensor, ref: torch.Tensor, stab: torch.Tensor, *, feature: int,
    causal_coef: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One decode step.  q, k (b, h, 1, d), v (b, h, 1, e) (any strides of b and h, unit last
    stride), projection (m, d), keep (b,) bool or None; the state (contiguous, one dtype):
    hz (b, h, m, e + 1), v_sum (b, h, e + 1), ref, stab (b, h), left as they are.  feature: SOFTMAX
    or RELU; causal_coef: the causal eps over ratio (FavorState's).  -> out (b, h, 1, e) in q's
    dtype and the updated state [hz, v_sum, ref, stab] (new tensors, one allocation)."""
    b, h, t, d = q.shape
    e = v.shape[-1]
    m = projection.shape[0]
    if feature not in (SOFTMAX, RELU) or t != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"decode_step takes one position of fused features, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}, feature {feature}")
    if max(d, e) > MAX_HEAD_DIM:
        raise ValueError(f"decode_step takes head dims up to {MAX_HEAD_DIM}, got d = {d}, e = {e}")
    for name, x, shape in (("hz", hz, (b, h, m, e + 1)), ("v_sum", v_sum, (b, h, e + 1)), ("ref", ref, (b, h)),
                           ("stab", stab, (b, h))):
        if tuple(x.shape) != shape or not x.is_contiguous():
            raise ValueError(f"decode_step: {name} must be contiguous of shape {shape}, got {tuple(x.shape)}")
    check_unit_stride(q=q, k=k, v=v)
    if not projection.is_contiguous():
        raise ValueError(f"decode_step: the projection must be contiguous, got strides {tuple(projection.stride())}")
    out = torch.empty((b, h, 1, e), device=q.device, dtype=q.dtype)
    sizes = [x.numel() for x in (hz, v_sum, ref, stab)]
    new = [t.view(x.shape) for t, x in zip(hz.new_empty(sum(sizes)).split(sizes), (hz, v_sum, ref, stab))]
    launch(
        _step_kernel, (b * h,), q, k, v, projection, keep if keep is not None else q, hz, v_sum, ref, stab, *new,
        out,
        h, m, d, e,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        head_scale(d), feature_eps(feature), causal_coef,
        # m tiles of 16: at 32 the (BM, BD) projection and (BM, BV) state tiles spilled 4-24 B
        # (full sweep, heads of 64 and more, and d = 24)
        FEATURE=feature, HAS_KEEP=keep is not None, BM=16, BD=max(16, next_power_of_2(d)),
        BV=max(16, next_power_of_2(e + 1)), AL=alignment(d, q, k),
        AV=alignment(e, v, out), num_warps=4,
    )
    return out, new
