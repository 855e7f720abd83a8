"""Fused non-causal FAVOR+ attention: Triton kernels and launchers, forward and backward.

Math and notation: kernels/NOTES.md ("Non-causal forward", "Backward"). Per (batch, head):
q (n, d), k (s, d), v (s, e), P (m, d). Feature tiles (rows, BM) are computed from q / k and P
inside every kernel (loaded as tiles for GIVEN); q' and k' never reach global memory.

Launches, forward:   row_stats(k) -> context (key splits x m tiles) -> output (query blocks).
Launches, backward:  context again -> dq (query splits; also partial dH, dz) -> dk, dv (key blocks).
Partial sums over splits go to small fp32 buffers summed by the launcher (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .feature_map import (
    backward_in_value_slices,
    FM_GIVEN,
    FM_SOFTMAX,
    GIVEN,
    RELU,
    SOFTMAX,
    SOFTMAX_EPS,
    check_head_dims,
    dash_rows,
    dash_tile,
    dot_precision,
    half_sq_norm,
    half_sq_norm_rows,
    key_units,
    load_rows,
    query_features,
    relu_features,
    row_stats,
)

__all__ = ["noncausal_fwd", "noncausal_bwd"]


@triton.jit
def _context_kernel(
    k, v, p, k_max, k_scale, k_ref, h_part, z_part, vs_part,
    H, S, M, D, E, BH, NTS,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """Key state of one split of NTS key blocks for one m tile:
    h_part[i_s, i_bh] = sum_j F_j^T v_j (M, E), z_part = sum_j F_j (M,), vs_part = sum_j v_j (E,)
    with F = U * exp(k_scale - R) (SOFTMAX, R = k_ref), relu features (RELU), k' itself (GIVEN)."""
    i_m, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)  # (BM,)
    m_m = o_m < M
    o_d = tl.arange(0, BD)  # (BD,)
    m_d = o_d < D
    o_e = tl.arange(0, BV)  # (BV,)
    m_e = o_e < E
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    o_row = i_bh.to(tl.int64) * S
    if FEATURE != FM_GIVEN:
        b_p = load_rows(p, o_m, m_m, D, o_d, m_d)  # (BM, BD)
    if FEATURE == FM_SOFTMAX:
        b_ref = tl.load(k_ref + i_bh)  # max_j k_scale_j, so every factor below is <= 1
    b_h = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
    b_z = tl.zeros([BM], dtype=tl.float32)  # (BM,)
    b_vs = tl.zeros([BV], dtype=tl.float32)  # (BV,)
    i_t0 = i_s * NTS
    for i_t in range(i_t0, tl.minimum(i_t0 + NTS, tl.cdiv(S, BT))):
        o_t = i_t * BT + tl.arange(0, BT)  # (BT,)
        m_t = o_t < S
        b_v = load_rows(p_v, o_t, m_t, stride_vn, o_e, m_e)  # (BT, BV)
        if FEATURE == FM_GIVEN:
            b_f = load_rows(p_k, o_t, m_t, stride_kn, o_m, m_m)  # (BT, BM)
        else:
            b_k = load_rows(p_k, o_t, m_t, stride_kn, o_d, m_d)  # (BT, BD)
            b_dash = dash_tile(b_k, b_p, dn, PREC)  # (BT, BM)
            if FEATURE == FM_SOFTMAX:
                b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
                # padded rows get factor exp(-inf) = 0
                b_ksc = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
                b_f = key_units(b_dash, b_kmax, m_m) * tl.exp(b_ksc - b_ref)[:, None]  # (BT, BM)
            else:
                b_f = tl.where(m_t[:, None], relu_features(b_dash, m_m), 0.0)  # (BT, BM)
        # F is bounded (SOFTMAX) or as large as the dtype's own dash (RELU, GIVEN): cast for tl.dot
        b_h += tl.dot(tl.trans(b_f.to(b_v.dtype)), b_v, input_precision=PREC)
        b_z += tl.sum(b_f.to(tl.float32), axis=0)
        if FEATURE == FM_SOFTMAX:
            b_vs += tl.sum(b_v.to(tl.float32), axis=0)
    o_part = i_s * BH + i_bh  # (split, b*h) slot of this program
    p_h = h_part + o_part.to(tl.int64) * M * E + o_m[:, None] * E + o_e[None, :]
    tl.store(p_h, b_h, mask=m_m[:, None] & m_e[None, :])
    tl.store(z_part + o_part.to(tl.int64) * M + o_m, b_z, mask=m_m)
    if FEATURE == FM_SOFTMAX:
        if i_m == 0:
            tl.store(vs_part + o_part.to(tl.int64) * E + o_e, b_vs, mask=m_e)


@triton.jit
def _output_kernel(
    q, p, h, z, vs, out, q_max, rden,
    H, N, S, M, D, E,
    stride_qb, stride_qh, stride_qn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """out = N / D for BT queries, h (BH, M, E) and z (BH, M) relative to the stabilizer M.

    SOFTMAX finds the query row max online over the m tiles (flash-style rescaling of the
    exp part; the eps part of q~ is separated), so q needs no stats pass, and writes q_max."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)  # (BT,)
    m_t = o_t < N
    o_d = tl.arange(0, BD)  # (BD,)
    m_d = o_d < D
    o_e = tl.arange(0, BV)  # (BV,)
    m_e = o_e < E
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_hb = h + i_bh.to(tl.int64) * M * E
    p_zb = z + i_bh.to(tl.int64) * M
    if FEATURE != FM_GIVEN:
        b_q = load_rows(p_q, o_t, m_t, stride_qn, o_d, m_d)  # (BT, BD)
    b_acc = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV) sum_f F_f H_f
    b_den = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f F_f z_f
    b_r = tl.full([BT], float("-inf"), dtype=tl.float32)  # (BT,) running max of dash
    b_xs = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f exp(dash_f - b_r)
    b_hs = tl.zeros([BV], dtype=tl.float32)  # (BV,) sum_f H_f
    b_zs = tl.zeros([BM], dtype=tl.float32)  # (BM,) sum over tiles of z
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)  # (BM,)
        m_m = o_m < M
        b_h = load_rows(p_hb, o_m, m_m, E, o_e, m_e)  # (BM, BV) fp32
        b_z = tl.load(p_zb + o_m, mask=m_m, other=0.0)  # (BM,)
        if FEATURE == FM_GIVEN:
            b_f = load_rows(p_q, o_t, m_t, stride_qn, o_m, m_m).to(tl.float32)  # (BT, BM)
        else:
            b_p = load_rows(p, o_m, m_m, D, o_d, m_d)  # (BM, BD)
            b_dash = dash_tile(b_q, b_p, dn, PREC)  # (BT, BM)
            if FEATURE == FM_SOFTMAX:
                b_dash = tl.where(m_m[None, :], b_dash, float("-inf"))
                b_rn = tl.maximum(b_r, tl.max(b_dash, axis=1))  # (BT,)
                b_alpha = tl.exp(b_r - b_rn)  # (BT,) 0 on the first tile
                b_f = tl.exp(b_dash - b_rn[:, None])  # (BT, BM) in [0, 1]
                b_acc *= b_alpha[:, None]
                b_den *= b_alpha
                b_xs = b_xs * b_alpha + tl.sum(b_f, axis=1)
                b_r = b_rn
                b_hs += tl.sum(b_h, axis=0)
                b_zs += b_z
            else:
                b_f = relu_features(b_dash, m_m)  # (BT, BM)
        # h is an unbounded fp32 state: fp32 operands (tf32 / ieee by PREC)
        b_acc += tl.dot(b_f, b_h, input_precision=PREC)
        b_den += tl.sum(b_f * b_z[None, :], axis=1)
    o_row = i_bh.to(tl.int64) * N + o_t  # (BT,)
    if FEATURE == FM_SOFTMAX:
        # q~_f = exp(dash_f - b_r) * exp(-diag) + eps on the M real features
        b_ed = tl.exp(-half_sq_norm(b_q, dn))  # (BT,)
        b_vsum = tl.load(vs + i_bh.to(tl.int64) * E + o_e, mask=m_e, other=0.0)  # (BV,)
        b_qs = b_ed * b_xs + SOFTMAX_EPS * M  # (BT,) sum_f q~_f
        b_num = (b_ed[:, None] * b_acc + SOFTMAX_EPS * b_hs[None, :]
                 + SOFTMAX_EPS * b_qs[:, None] * b_vsum[None, :])  # (BT, BV)
        b_den = b_ed * b_den + SOFTMAX_EPS * tl.sum(b_zs, axis=0) + SOFTMAX_EPS * S * b_qs
        tl.store(q_max + o_row, b_r, mask=m_t)
    else:
        b_num = b_acc
    b_rden = 1.0 / tl.where(m_t, b_den, 1.0)  # (BT,) fp32; padded GIVEN rows have D = 0
    tl.store(rden + o_row, b_rden, mask=m_t)
    p_o = out + i_bh.to(tl.int64) * N * E + o_t[:, None].to(tl.int64) * E + o_e[None, :]
    tl.store(p_o, (b_num * b_rden[:, None]).to(out.dtype.element_ty), mask=m_t[:, None] & m_e[None, :])


@triton.jit
def _dq_kernel(
    q, g, out, p, q_max, rden, h, z, vs, dq, dh_part, dz_part,
    H, N, S, M, D, E, BH, NTS,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
    stride_ob, stride_oh, stride_on,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq for a split of NTS query blocks, columns [i_k BK, i_k BK + BK) of dq (program
    i_s NK + i_k), and (i_k = 0) the split's partial key-side states
    dh_part[i_s, i_bh] = sum_i q~_i dN_i^T (M, E), dz_part = sum_i q~_i dD_i (M,).
    q and P are read in BK-wide chunks (dash_rows): no (BT, d) tile stays live."""
    i_sk, i_bh = tl.program_id(0), tl.program_id(1)
    i_s, i_k = i_sk // NK, i_sk % NK
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)  # (BK,) this program's columns of dq
    m_k = o_k < D
    o_e = tl.arange(0, BV)  # (BV,)
    m_e = o_e < E
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_g = g + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    p_o = out + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_hb = h + i_bh.to(tl.int64) * M * E
    p_zb = z + i_bh.to(tl.int64) * M
    o_part = i_s * BH + i_bh
    p_dhb = dh_part + o_part.to(tl.int64) * M * E
    p_dzb = dz_part + o_part.to(tl.int64) * M
    if FEATURE == FM_SOFTMAX:
        b_vs = tl.load(vs + i_bh.to(tl.int64) * E + o_e, mask=m_e, other=0.0)  # (BV,)
    i_t0 = i_s * NTS
    for i_t in range(i_t0, tl.minimum(i_t0 + NTS, tl.cdiv(N, BT))):
        o_t = i_t * BT + tl.arange(0, BT)  # (BT,)
        m_t = o_t < N
        o_row = i_bh.to(tl.int64) * N + o_t  # (BT,)
        b_g = load_rows(p_g, o_t, m_t, stride_gn, o_e, m_e).to(tl.float32)  # (BT, BV)
        b_o = load_rows(p_o, o_t, m_t, stride_on, o_e, m_e).to(tl.float32)  # (BT, BV)
        b_rden = tl.load(rden + o_row, mask=m_t, other=0.0)  # (BT,) 0 kills padded rows
        b_dn = b_g * b_rden[:, None]  # (BT, BV) dL/dN
        b_dd = -tl.sum(b_g * b_o, axis=1) * b_rden  # (BT,) dL/dD
        if FEATURE != FM_GIVEN:
            b_dx = tl.zeros([BT, BK], dtype=tl.float32)  # (BT, BK) sum_f du_f P_f[o_k]
            b_rs = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f du_f
        if FEATURE == FM_SOFTMAX:
            b_qmax = tl.load(q_max + o_row, mask=m_t, other=0.0)  # (BT,)
            b_diag = half_sq_norm_rows(p_q, o_t, m_t, stride_qn, D, dn, BT, BK, NK)  # (BT,)
            # the eps part of the key features: d/dq~_f of eps * sum_f q~_f (vsum . dN + s dD)
            b_deps = SOFTMAX_EPS * (tl.sum(b_dn * b_vs[None, :], axis=1) + S * b_dd)  # (BT,)
        for i_m in range(0, tl.cdiv(M, BM)):
            o_m = i_m * BM + tl.arange(0, BM)  # (BM,)
            m_m = o_m < M
            # H^T loaded transposed rather than permuted in registers (an fp32 operand)
            b_ht = load_rows(p_hb, o_e, m_e, 1, o_m * E, m_m)  # (BV, BM) fp32
            b_z = tl.load(p_zb + o_m, mask=m_m, other=0.0)  # (BM,)
            # dL/dq~ = H dN + z dD (dN, H unbounded: fp32 operands)
            b_dfq = tl.dot(b_dn, b_ht, input_precision=PREC) + b_dd[:, None] * b_z[None, :]  # (BT, BM)
            if FEATURE == FM_GIVEN:
                b_f = load_rows(p_q, o_t, m_t, stride_qn, o_m, m_m).to(tl.float32)  # (BT, BM)
                p_dqt = dq + i_bh.to(tl.int64) * N * M + o_t[:, None].to(tl.int64) * M + o_m[None, :]
                tl.store(p_dqt, b_dfq.to(dq.dtype.element_ty), mask=m_t[:, None] & m_m[None, :])
            else:
                b_dash = dash_rows(p_q, o_t, m_t, stride_qn, p, o_m, m_m, D, dn, BT, BM, BK, NK, PREC)  # (BT, BM)
                if FEATURE == FM_SOFTMAX:
                    b_f = query_features(b_dash, b_diag, b_qmax, m_m)  # (BT, BM) q~
                    # chain through exp: d q~ / d u = q~ - eps (the stabilizer is detached)
                    b_du = tl.where(m_m[None, :], (b_dfq + b_deps[:, None]) * (b_f - SOFTMAX_EPS), 0.0)
                else:
                    b_f = relu_features(b_dash, m_m)  # (BT, BM)
                    b_du = tl.where(m_m[None, :] & (b_dash > 0), b_dfq, 0.0)  # (BT, BM)
                b_pk = load_rows(p, o_m, m_m, D, o_k, m_k)  # (BM, BK)
                b_dx += tl.dot(b_du, b_pk.to(tl.float32), input_precision=PREC)
                b_rs += tl.sum(b_du, axis=1)
            if i_k == 0:
                # this program's own partial tiles: read-modify-write after the split's first block
                m_hm = m_m[:, None] & m_e[None, :]
                p_dh = p_dhb + o_m[:, None] * E + o_e[None, :]
                b_dh = tl.dot(tl.trans(b_f), b_dn, input_precision=PREC)  # (BM, BV)
                b_dz = tl.sum(b_f * b_dd[:, None], axis=0)  # (BM,)
                if i_t > i_t0:
                    b_dh += tl.load(p_dh, mask=m_hm, other=0.0)
                    b_dz += tl.load(p_dzb + o_m, mask=m_m, other=0.0)
                tl.store(p_dh, b_dh, mask=m_hm)
                tl.store(p_dzb + o_m, b_dz, mask=m_m)
                # the next query block re-reads these tiles, maybe from other threads: make the
                # stores visible to the whole program first
                tl.debug_barrier()
        if FEATURE != FM_GIVEN:
            b_dq = dn * b_dx  # (BT, BK)
            if FEATURE == FM_SOFTMAX:
                # through diag = |dn q|^2 / 2
                b_dq -= (dn * dn) * b_rs[:, None] * load_rows(p_q, o_t, m_t, stride_qn, o_k, m_k).to(tl.float32)
            p_dqt = dq + i_bh.to(tl.int64) * N * D + o_t[:, None].to(tl.int64) * D + o_k[None, :]
            tl.store(p_dqt, b_dq.to(dq.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])


@triton.jit
def _dkv_kernel(
    k, v, p, k_max, k_scale, k_stab, dh, dz, dk, dv,
    H, S, M, D, E,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """dk columns [i_k BK, i_k BK + BK) and (i_k = 0) dv for BT keys (program i_t NK + i_k),
    from dh = sum_i q~_i dN_i^T (BH, M, E) and dz = sum_i q~_i dD_i (BH, M)."""
    i_tk, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_k = i_tk // NK, i_tk % NK
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)  # (BT,)
    m_t = o_t < S
    o_k = i_k * BK + tl.arange(0, BK)  # (BK,) this program's columns of dk
    m_k = o_k < D
    o_e = tl.arange(0, BV)  # (BV,)
    m_e = o_e < E
    o_row = i_bh.to(tl.int64) * S + o_t  # (BT,)
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_dhb = dh + i_bh.to(tl.int64) * M * E
    p_dzb = dz + i_bh.to(tl.int64) * M
    # dh is unbounded: v enters its tl.dot as fp32
    b_v = load_rows(p_v, o_t, m_t, stride_vn, o_e, m_e).to(tl.float32)  # (BT, BV)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV)
    if FEATURE != FM_GIVEN:
        b_dx = tl.zeros([BT, BK], dtype=tl.float32)  # (BT, BK) sum_f du_f P_f[o_k]
        b_rs = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f du_f
    if FEATURE == FM_SOFTMAX:
        b_kmax = tl.load(k_max + o_row, mask=m_t, other=0.0)  # (BT,)
        b_ksc = tl.load(k_scale + o_row, mask=m_t, other=float("-inf"))  # (BT,)
        b_fac = tl.exp(b_ksc - tl.load(k_stab + i_bh))  # (BT,) exp(row_scale - M) <= 1
        b_hs = tl.zeros([BV], dtype=tl.float32)  # (BV,) sum_f dh_f = sum_i sum(q~_i) dN_i
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)  # (BM,)
        m_m = o_m < M
        b_dh = load_rows(p_dhb, o_m, m_m, E, o_e, m_e)  # (BM, BV) fp32
        b_dz = tl.load(p_dzb + o_m, mask=m_m, other=0.0)  # (BM,)
        # dL/dF_jf = dh_f . v_j + dz_f for the (exp part of the) key features
        b_dht = load_rows(p_dhb, o_e, m_e, 1, o_m * E, m_m)  # (BV, BM) fp32, dh^T loaded transposed
        b_dfk = tl.dot(b_v, b_dht, input_precision=PREC) + b_dz[None, :]  # (BT, BM)
        if FEATURE == FM_GIVEN:
            b_f = load_rows(p_k, o_t, m_t, stride_kn, o_m, m_m).to(tl.float32)  # (BT, BM)
            p_dkt = dk + i_bh.to(tl.int64) * S * M + o_t[:, None].to(tl.int64) * M + o_m[None, :]
            tl.store(p_dkt, b_dfk.to(dk.dtype.element_ty), mask=m_t[:, None] & m_m[None, :])
        else:
            b_dash = dash_rows(p_k, o_t, m_t, stride_kn, p, o_m, m_m, D, dn, BT, BM, BK, NK, PREC)  # (BT, BM)
            if FEATURE == FM_SOFTMAX:
                b_f = key_units(b_dash, b_kmax, m_m) * b_fac[:, None]  # (BT, BM) exp part
                b_du = b_f * b_dfk  # (BT, BM)
                b_hs += tl.sum(b_dh, axis=0)
            else:
                b_f = relu_features(b_dash, m_m)  # (BT, BM)
                b_du = tl.where(m_m[None, :] & (b_dash > 0), b_dfk, 0.0)  # (BT, BM)
            b_pk = load_rows(p, o_m, m_m, D, o_k, m_k)  # (BM, BK)
            b_dx += tl.dot(b_du, b_pk.to(tl.float32), input_precision=PREC)
            b_rs += tl.sum(b_du, axis=1)
        b_dv += tl.dot(b_f, b_dh, input_precision=PREC)
    if FEATURE == FM_SOFTMAX:
        b_dv += SOFTMAX_EPS * b_hs[None, :]
    if i_k == 0:
        p_dvt = dv + i_bh.to(tl.int64) * S * E + o_t[:, None].to(tl.int64) * E + o_e[None, :]
        tl.store(p_dvt, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_e[None, :])
    if FEATURE != FM_GIVEN:
        b_dk = dn * b_dx  # (BT, BK)
        if FEATURE == FM_SOFTMAX:
            # through diag = |dn k|^2 / 2
            b_dk -= (dn * dn) * b_rs[:, None] * load_rows(p_k, o_t, m_t, stride_kn, o_k, m_k).to(tl.float32)
        p_dkt = dk + i_bh.to(tl.int64) * S * D + o_t[:, None].to(tl.int64) * D + o_k[None, :]
        tl.store(p_dkt, b_dk.to(dk.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])


def _config(d: int, e: int, m: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options.  d = 0 for GIVEN (no projection).  BD covers all of d and
    BV all of e in the forward; the backward runs on value slices of at most EV columns
    (noncausal_bwd) and its kernels read d in BK-wide chunks, one BK-wide slice of dq / dk per
    program.  BM, BK and EV are what keep the register file from spilling (compile report,
    kernels/NOTES.md)."""
    BD = triton.next_power_of_2(max(d, 16))
    fp32 = dtype == torch.float32  # twice the bytes per tile element
    return dict(
        BT=64,
        BM=min(16 if fp32 else 32, triton.next_power_of_2(max(m, 16))),
        # dq / dk-dv keep the most tiles live: the smallest m tile, except for GIVEN feature tiles
        # (no projection tiles live), where sm_80's ptxas spills more at 16 than at 32
        BM_bwd=32 if d == 0 else 16,
        BD=BD,
        BK=min(BD, 32 if fp32 else 64),
        BV=triton.next_power_of_2(max(e, 16)),
        EV=32 if fp32 else 64,
        PREC=dot_precision(dtype),
        num_warps=8 if fp32 else 4,
        num_warps_bwd=8,
        num_stages=1 if fp32 else 2,  # a second stage's buffers cost registers there
    )


def _splits(blocks: int, programs: int, target: int = 264, min_blocks: int = 4) -> tuple[int, int]:
    """(blocks per split, splits) so that programs * splits ~ target (2 waves of 132 SMs)
    while each split keeps at least min_blocks blocks."""
    ns = max(1, min(triton.cdiv(target, programs), triton.cdiv(blocks, min_blocks)))
    per = triton.cdiv(blocks, ns)
    return per, triton.cdiv(blocks, per)


def _launch_opts(cfg: dict, bwd: bool = False) -> dict:
    """Launch keywords; the backward kernels take their own BM (they read whole states, so their
    m tiles need not match the forward's) and BK instead of BD."""
    opts = {key: cfg[key] for key in ("BT", "BM", "BV", "PREC", "num_stages")}
    opts["num_warps"] = cfg["num_warps_bwd" if bwd else "num_warps"]
    if bwd:
        opts.update(BM=cfg["BM_bwd"], BK=cfg["BK"])
    else:
        opts["BD"] = cfg["BD"]
    return opts


def _context(k, v, projection, k_max, k_scale, feature: int, m: int, d: int, cfg: dict):
    """Key states relative to the stabilizer M: H (b*h, m, e), z (b*h, m), vsum (b*h, e or 0),
    and M (b*h,) (SOFTMAX; k_max otherwise)."""
    b, h, s, _ = k.shape
    e = v.shape[-1]
    softmax = feature == SOFTMAX
    per, ns = _splits(triton.cdiv(s, cfg["BT"]), triton.cdiv(m, cfg["BM"]) * b * h)
    f32 = dict(device=k.device, dtype=torch.float32)
    h_part = torch.empty((ns, b * h, m, e), **f32)
    z_part = torch.empty((ns, b * h, m), **f32)
    vs_part = torch.empty((ns, b * h, e if softmax else 0), **f32)
    if softmax:
        k_stab, k_ref = k_max.amax(-1).reshape(-1), k_scale.amax(-1).reshape(-1)
    else:
        k_stab = k_ref = k_max
    grid = (triton.cdiv(m, cfg["BM"]), ns, b * h)
    _context_kernel[grid](
        k, v, k if projection is None else projection, k_max, k_scale, k_ref, h_part, z_part, vs_part,
        h, s, m, d, e, b * h, per,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        d**-0.25 if d else 1.0,
        FEATURE=feature, **_launch_opts(cfg),
    )
    states, sums, vsum = h_part.sum(0), z_part.sum(0), vs_part.sum(0)
    if softmax:
        scale = torch.exp(k_ref - k_stab)  # exp(R - M) <= 1: from reference R to stabilizer M
        states *= scale[:, None, None]
        sums *= scale[:, None]
    return states, sums, vsum, k_stab


def _dims(q: torch.Tensor, projection: torch.Tensor | None, feature: int) -> tuple[int, int]:
    """(m, d); d = 0 for GIVEN, where q holds the features."""
    if feature == GIVEN:
        return q.shape[-1], 0
    return projection.shape[0], projection.shape[1]


def noncausal_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, *, feature: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-causal FAVOR+ attention.  q (b, h, n, d), k (b, h, s, d), v (b, h, s, e), P (m, d);
    for GIVEN q (b, h, n, m), k (b, h, s, m) are the features and projection is None.

    Returns out (b, h, n, e) in q's dtype, fp32 q_max (b, h, n), k_max and k_scale (b, h, s)
    (SOFTMAX; (b, h, 0) otherwise) and fp32 rden = 1 / D (b, h, n)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    b, h, n, _ = q.shape
    s, e = k.shape[2], v.shape[-1]
    m, d = _dims(q, projection, feature)
    check_head_dims(q.dtype, d=d, e=e)
    cfg = _config(d, e, m, q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    if feature == SOFTMAX:
        k_max, k_scale = row_stats(k, projection)
        q_max = torch.empty((b, h, n), **f32)
    else:
        # distinct empty tensors: custom-op outputs must not alias each other
        k_max, k_scale, q_max = (torch.empty((b, h, 0), **f32) for _ in range(3))
    states, sums, vsum, _ = _context(k, v, projection, k_max, k_scale, feature, m, d, cfg)
    out = torch.empty((b, h, n, e), device=q.device, dtype=q.dtype)
    rden = torch.empty((b, h, n), **f32)
    grid = (triton.cdiv(n, cfg["BT"]), b * h)
    _output_kernel[grid](
        q, q if projection is None else projection, states, sums, vsum, out, q_max, rden,
        h, n, s, m, d, e,
        q.stride(0), q.stride(1), q.stride(2),
        d**-0.25 if d else 1.0,
        FEATURE=feature, **_launch_opts(cfg),
    )
    return out, q_max, k_max, k_scale, rden


def noncausal_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    projection: torch.Tensor | None, out: torch.Tensor, q_max: torch.Tensor, k_max: torch.Tensor,
    k_scale: torch.Tensor, rden: torch.Tensor, *, feature: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of noncausal_fwd: dq, dk, dv in the dtypes and shapes of q, k, v (w.r.t. the
    features for GIVEN).  The stats are noncausal_fwd's outputs (contiguous).

    Value dims wider than the config's EV run in slices (feature_map.backward_in_value_slices)."""
    assert grad_out.stride(-1) == 1 and out.stride(-1) == 1
    e = v.shape[-1]
    m, d = _dims(q, projection, feature)
    stats = (q_max, k_max, k_scale, rden)
    return backward_in_value_slices(
        lambda g, v_s, out_s, grad_dtype: _noncausal_bwd_slice(
            g, q, k, v_s, projection, out_s, stats, feature, grad_dtype),
        grad_out, v, out, _config(d, e, m, q.dtype)["EV"], q.dtype, k.dtype,
    )


def _noncausal_bwd_slice(grad_out, q, k, v, projection, out, stats, feature: int, grad_dtype: torch.dtype):
    """noncausal_bwd for value dims up to EV; dq, dk in grad_dtype, dv in v's dtype."""
    q_max, k_max, k_scale, rden = stats
    b, h, n, _ = q.shape
    s, e = k.shape[2], v.shape[-1]
    m, d = _dims(q, projection, feature)
    cfg = _config(d, e, m, q.dtype)
    p = q if projection is None else projection
    dn = d**-0.25 if d else 1.0
    states, sums, vsum, k_stab = _context(k, v, projection, k_max, k_scale, feature, m, d, cfg)
    nk = 1 if feature == GIVEN else triton.cdiv(d, cfg["BK"])  # BK-wide chunks of d, one dq / dk slice each

    per, ns = _splits(triton.cdiv(n, cfg["BT"]), b * h)
    f32 = dict(device=q.device, dtype=torch.float32)
    dh_part = torch.empty((ns, b * h, m, e), **f32)
    dz_part = torch.empty((ns, b * h, m), **f32)
    dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
    _dq_kernel[(ns * nk, b * h)](
        q, grad_out, out, p, q_max, rden, states, sums, vsum, dq, dh_part, dz_part,
        h, n, s, m, d, e, b * h, per,
        q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        dn,
        FEATURE=feature, NK=nk, **_launch_opts(cfg, bwd=True),
    )
    dk = torch.empty(k.shape, device=k.device, dtype=grad_dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _dkv_kernel[(triton.cdiv(s, cfg["BT"]) * nk, b * h)](
        k, v, p, k_max, k_scale, k_stab, dh_part.sum(0), dz_part.sum(0), dk, dv,
        h, s, m, d, e,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dn,
        FEATURE=feature, NK=nk, **_launch_opts(cfg, bwd=True),
    )
    return dq, dk, dv
