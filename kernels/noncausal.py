"""Fused non-causal FAVOR+ attention: Triton kernels and launchers, forward and backward.

Implements the launcher contract of kernels/NOTES.md for non-causal attention ("Non-causal
forward", "Backward"). Per (batch, head): q (n, d), k (s, d), v (s, e), P (m, d). Feature tiles
(rows, BM) are computed from q / k and P inside every kernel (kernels/feature_map.py; loaded as
tiles for GIVEN); q' and k' never reach global memory.

  _state_kernel    grid (b*h, m tiles, key splits): partial key states H, z and the value sum
                   of one split of key blocks (summed by _combine_kernel).
  _output_kernel   grid (b*h, query blocks): out = N / D; finds the query row max online.
  _dstate_kernel   grid (b*h, m tiles, query splits): partial reverse states dH, dz of one
                   split of query blocks (summed by _combine_kernel).
  _bwd_q_kernel    grid (b*h, query blocks NK): dq (one BK-wide column slice per program).
  _bwd_kv_kernel   grid (b*h, key blocks NK): dk (one column slice per program) and dv.
  _combine_kernel  grid (b*h, m tiles): sums the split partials (deterministic, no atomics), the
                   key states rescaled from each split's reference to the global stabilizer.
Launches: forward state -> combine -> output (the combined key states are saved for the
backward; the key maxima come from the state kernel's tiles, no row-stats pass over k); backward
dstate -> combine -> dq -> dk, dv. Every loop keeps its next loads in flight (no
read-modify-write of global buffers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CAUSAL_EPS, GIVEN, SOFTMAX, feature_map
from .feature_map import (
    FM_GIVEN, FM_RELU, FM_SOFTMAX, FM_SOFTMAX_EPS, aligned, alignment, backward_in_value_slices, bh_base,
    block_config, block_grid, block_program, block_range, cdiv, check_inputs, check_unit_stride, chunk_program,
    column_slice, dash_tile, diag_rows, dot, empty_stats, feature_dims, features, features_chunked, grad_dot_out,
    half_sq_norm, head_scale, host_cache, input_grad_tile, launch, launch_options, load_fused_rows, load_rows,
    load_vector, next_power_of_2, packing_args, reciprocal_or_zero, sequence_rows, store_input_grad, store_rows,
    store_state, tf32_nearest
)

__all__ = ["noncausal_fwd", "noncausal_bwd"]

# the widest value tile whose state dots read the transposed state (_state_tile)
MAX_BV_TRANSPOSED = tl.constexpr(64)


@triton.jit
def _state_kernel(
    k, v, p, h_part, z_part, vs_part, r_part, s_part, cu_seqlens,
    H, S, M, D, E, BH, NTS, NMT,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """Key state of one split of NTS key blocks for one m tile:
    h_part[i_s, i_bh] = sum_j F_j^T v_j (M, E), z_part = sum_j F_j (M,), vs_part = sum_j v_j (E,)
    with F = exp(dash - diag - R) (SOFTMAX), the features (RELU), k' itself (GIVEN).
    SOFTMAX: R = the split's max of dash - diag over this m tile, found online on the tiles
    (the partial sums rescaled when it grows; no per-row key statistics), written to
    r_part[i_s, i_bh, i_m] with the tile's max of dash (s_part); _combine_kernel brings the
    partials to the global stabilizer M = max of dash over every key and feature (1.1.4's).
    VARLEN: program row i_nh is sequence H + head of a pack (BH = NS H rows of partials)."""
    i_nh, i_m, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, S, VARLEN)
    D, E, stride_kb = aligned(D, AL), aligned(E, AV), aligned(stride_kb, AL)
    stride_kh, stride_kn, stride_vb = aligned(stride_kh, AL), aligned(stride_kn, AL), aligned(stride_vb, AV)
    stride_vh, stride_vn = aligned(stride_vh, AV), aligned(stride_vn, AV)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_d, m_d = block_range(0, BD, D)  # (BD,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
    p_v = bh_base(v, i_bh, H, stride_vb, stride_vh) + bos * stride_vn
    b_p = load_fused_rows(p, o_m, m_m, D, o_d, m_d, BM, BD, FEATURE)  # (BM, BD)
    b_h = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
    b_z = tl.zeros([BM], dtype=tl.float32)  # (BM,)
    b_vs = tl.zeros([BV], dtype=tl.float32)  # (BV,)
    r_run = tl.full([], float("-inf"), dtype=tl.float32)  # R so far
    s_run = tl.full([], float("-inf"), dtype=tl.float32)  # max of dash so far
    i_t0 = i_s * NTS
    for i_t in range(i_t0, tl.minimum(i_t0 + NTS, tl.cdiv(T, BT))):
        o_t, m_t = block_range(i_t, BT, T)  # (BT,)
        b_v = load_rows(p_v, o_t, m_t, stride_vn, o_v, m_v)  # (BT, BV)
        b_k = load_fused_rows(p_k, o_t, m_t, stride_kn, o_d, m_d, BT, BD, FEATURE)  # (BT, BD)
        if FEATURE == FM_SOFTMAX:
            m_tm = m_t[:, None] & m_m[None, :]  # (BT, BM)
            b_dash = tl.where(m_tm, dash_tile(b_k, b_p, dn, PRECISION), float("-inf"))  # (BT, BM)
            b_u = b_dash - half_sq_norm(b_k, dn)[:, None]  # (BT, BM) log k~, -inf on padding
            r_new = tl.maximum(r_run, tl.max(tl.max(b_u, axis=1), axis=0))
            s_run = tl.maximum(s_run, tl.max(tl.max(b_dash, axis=1), axis=0))
            b_alpha = tl.exp(r_run - r_new)  # <= 1 (0 on the first block)
            b_h *= b_alpha
            b_z *= b_alpha
            r_run = r_new
            b_kf = tl.exp(b_u - r_run)  # (BT, BM) <= 1, 0 on padding
        else:
            b_none = tl.zeros([BT], dtype=tl.float32)  # (BT,) no row statistics without a stabilizer
            b_kf, _ = features(p_k, b_k, b_p, b_none, b_none, o_t, m_t, stride_kn, o_m, m_m, dn, FEATURE, False,
                               PRECISION)  # (BT, BM)
        if FEATURE == FM_RELU:
            b_kf = tl.where(m_t[:, None], b_kf, 0.0)  # (BT, BM) padded rows: no features
        # F is bounded (SOFTMAX) or as large as the dtype's own dash (RELU, GIVEN): cast for tl.dot
        b_h += dot(tl.trans(b_kf.to(b_v.dtype)), b_v, None, PRECISION)
        b_z += tl.sum(b_kf, axis=0)
        if FEATURE == FM_SOFTMAX:
            b_vs += tl.sum(b_v.to(tl.float32), axis=0)
    o_part = i_s * BH + i_nh  # (split, b*h) slot of this program
    p_h = h_part + o_part.to(tl.int64) * M * E + o_m[:, None] * E + o_v[None, :]
    tl.store(p_h, b_h, mask=m_m[:, None] & m_v[None, :])
    tl.store(z_part + o_part.to(tl.int64) * M + o_m, b_z, mask=m_m)
    if FEATURE == FM_SOFTMAX:
        if i_m == 0:
            tl.store(vs_part + o_part.to(tl.int64) * E + o_v, b_vs, mask=m_v)
        tl.store(r_part + o_part.to(tl.int64) * NMT + i_m, r_run)
        tl.store(s_part + o_part.to(tl.int64) * NMT + i_m, s_run)


@triton.jit
def _split_refs(p_r, m_m, REFS: tl.constexpr):
    """(BM,) references of one split's partial rows (REFS; -inf on masked rows), else zeros."""
    if REFS:
        b_r = tl.load(p_r, mask=m_m, other=float("-inf"))  # (BM,)
    else:
        b_r = tl.where(m_m, 0.0, 0.0)  # (BM,)
    return b_r


@triton.jit
def _split_maxima(s_part, i_bh, i_s0, BH, NSPLIT, NMT, o_mt, m_mt, NSP: tl.constexpr):
    """(NSP, NMTP) maxima of dash of splits i_s0 .. i_s0 + NSP - 1 (s_part (NSPLIT, BH, NMT)) on the
    state kernel's m tiles o_mt, -inf past them."""
    o_s, m_s = block_range(0, NSP, NSPLIT - i_s0)  # (NSP,)
    return tl.load(s_part + ((o_s[:, None] + i_s0).to(tl.int64) * BH + i_bh) * NMT + o_mt[None, :],
                   mask=m_s[:, None] & m_mt[None, :], other=float("-inf"))


@triton.jit
def _combine_kernel(
    h_part, z_part, vs_part, r_part, s_part, h, ht, hs, z, vs, k_stab,
    BH, M, E, NSPLIT, NMT, MT,
    REFS: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, NSP: tl.constexpr, BMS: tl.constexpr,
    NMTP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Sum NSPLIT split partials (NSPLIT, BH, ...) of one b*h and m tile: h (BH, M, E) and its
    transpose ht (BH, E, MT) (row stride MT: M rounded up to 16, a multiple Triton specialises
    on; the padding written as zeros), this m tile's column sums of h, hs (BH, NMC, E) (NMC: the
    grid's m tiles; readers add them up: _column_sum), z (BH, M) and,
    REFS (the SOFTMAX key states), the value sum vs (BH, E) and the global stabilizer
    k_stab (BH,) = max of s_part (NSPLIT, BH, NMT) over the splits and the state kernel's NMT m
    tiles of BMS features (read NSP splits at a time), each partial row scaled by
    exp(r_part[split, b*h, its tile] - k_stab) <= 1.  Deterministic: a fixed order, no atomics."""
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    m_hv = m_m[:, None] & m_v[None, :]  # (BM, BV)
    p_r = r_part + i_bh.to(tl.int64) * NMT + o_m // BMS  # (BM,) split 0's reference of each row's tile
    r_stab = tl.full([], 0.0, dtype=tl.float32)
    if REFS:
        o_mt, m_mt = block_range(0, NMTP, NMT)  # (NMTP,) the state kernel's m tiles
        r_stab = tl.full([], float("-inf"), dtype=tl.float32)
        # NSP splits' maxima per load, the next NSP one step ahead (loads that feed no dot are
        # otherwise synchronous)
        b_s_next = _split_maxima(s_part, i_bh, 0, BH, NSPLIT, NMT, o_mt, m_mt, NSP)  # (NSP, NMTP)
        for i_s0 in range(0, NSPLIT, NSP):
            b_s = b_s_next
            b_s_next = _split_maxima(s_part, i_bh, i_s0 + NSP, BH, NSPLIT, NMT, o_mt, m_mt, NSP)
            r_stab = tl.maximum(r_stab, tl.max(tl.max(b_s, axis=1), axis=0))
        # no keys at all (an empty packed sequence): zero sums, not exp(-inf + inf)
        r_stab = tl.where(r_stab == float("-inf"), 0.0, r_stab)
    if REFS:
        m_vs = m_v & (o_v * 0 + i_m == 0)  # (BV,) the value sum: by the first m tile
    else:
        m_vs = o_v < 0  # (BV,) no value sum
    p_h = h_part + i_bh.to(tl.int64) * M * E + o_m[:, None] * E + o_v[None, :]  # (BM, BV) split 0
    p_z = z_part + i_bh.to(tl.int64) * M + o_m  # (BM,)
    p_vs = vs_part + i_bh.to(tl.int64) * E + o_v  # (BV,)
    b_h = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
    b_z = tl.zeros([BM], dtype=tl.float32)  # (BM,)
    b_vs = tl.zeros([BV], dtype=tl.float32)  # (BV,)
    # the next split's tiles one step ahead (loads that feed no dot are otherwise synchronous)
    b_h_next = tl.load(p_h, mask=m_hv, other=0.0)  # (BM, BV)
    b_z_next = tl.load(p_z, mask=m_m, other=0.0)  # (BM,)
    b_vs_next = tl.load(p_vs, mask=m_vs, other=0.0)  # (BV,)
    b_r_next = _split_refs(p_r, m_m, REFS)  # (BM,)
    for i_s in range(0, NSPLIT):
        if REFS:
            b_f = tl.exp(b_r_next - r_stab)  # (BM,) from the split's references to k_stab, <= 1
        else:
            b_f = tl.where(m_m, 1.0, 0.0)  # (BM,)
        b_h += b_f[:, None] * b_h_next
        b_z += b_f * b_z_next
        b_vs += b_vs_next
        # split i_s + 1, none past the last (vector masks: the interpreter rejects a scalar one
        # broadcast against a tile)
        m_mn = m_m & (o_m * 0 + i_s + 1 < NSPLIT)  # (BM,)
        m_vn = o_v * 0 + i_s + 1 < NSPLIT  # (BV,)
        o_next = (i_bh.to(tl.int64) * 0 + i_s + 1) * BH  # (split, b*h) slot offset of split i_s + 1, int64
        b_h_next = tl.load(p_h + o_next * M * E, mask=m_mn[:, None] & m_v[None, :] & m_vn[None, :],
                           other=0.0)
        b_z_next = tl.load(p_z + o_next * M, mask=m_mn, other=0.0)
        b_vs_next = tl.load(p_vs + o_next * E, mask=m_vs & m_vn, other=0.0)
        b_r_next = _split_refs(p_r + o_next * NMT, m_mn, REFS)
    # h and ht only enter dots: stored TF32-rounded (rows past M are zeros: masked loads and factors)
    store_state(h + i_bh.to(tl.int64) * M * E + o_m[:, None] * E + o_v[None, :], b_h, m_hv, PRECISION)
    store_state(ht + i_bh.to(tl.int64) * E * MT + o_v[None, :] * MT + o_m[:, None], b_h,
                (o_m < MT)[:, None] & m_v[None, :], PRECISION)
    tl.store(hs + (i_bh.to(tl.int64) * tl.num_programs(1) + i_m) * E + o_v, tl.sum(b_h, axis=0), mask=m_v)
    tl.store(z + i_bh.to(tl.int64) * M + o_m, b_z, mask=m_m)
    if REFS:
        tl.store(vs + i_bh.to(tl.int64) * E + o_v, b_vs, mask=m_vs)
        if i_m == 0:
            tl.store(k_stab + i_bh, r_stab)


@triton.jit
def _state_tile(p_h, p_ht, o_m, m_m, o_v, m_v, E, MT, BV: tl.constexpr):
    """(BM, BV) tile of an fp32 state (M, E) that enters a dot as its K = m operand: read from
    the transposed copy (E, MT) whose m rows are contiguous, the K-major operand a tf32 wgmma
    takes (from row-major (M, E) Triton copies it into that layout 4 bytes at a time: compile
    report "narrow"), for value tiles up to MAX_BV_TRANSPOSED wide; wider ones read the row-major
    state (the transposed tile of 128 columns spills 22-132 B on sm_80, whose mma.sync takes
    either major; NOTES "Non-causal forward")."""
    if BV <= MAX_BV_TRANSPOSED:
        b_h = load_rows(p_ht, o_m, m_m, 1, o_v * MT, m_v)  # (BM, BV)
    else:
        b_h = load_rows(p_h, o_m, m_m, E, o_v, m_v)  # (BM, BV)
    return b_h


@triton.jit
def _column_sum(hs, i_nh, NMC, E, o_v, m_v, NMCP: tl.constexpr):
    """(BV,) sum over its m rows of a combined state: the NMC (<= NMCP, a power of two) per-tile
    sums _combine_kernel wrote to hs (BH, NMC, E), one (NMCP, BV) load (a state tile entering a
    dot stays out of registers this way)."""
    o_c = tl.arange(0, NMCP)  # (NMCP,)
    p_hs = hs + i_nh.to(tl.int64) * NMC * E + o_c[:, None] * E + o_v[None, :]  # (NMCP, BV)
    return tl.sum(tl.load(p_hs, mask=(o_c < NMC)[:, None] & m_v[None, :], other=0.0), axis=0)


@triton.jit
def _output_kernel(
    q, p, h, ht, hs, z, vs, out, q_max, rden, cu_seqlens, chunk_first, chunk_seq,
    H, N, S, M, D, E, NS, MT, NMC,
    stride_qb, stride_qh, stride_qn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
    NMCP: tl.constexpr,
):
    """out = N / D for BT queries, the key state h (BH, M, E) and its transpose ht (BH, E, MT)
    (row stride MT; read for value tiles up to 64 wide, MAX_BV_TRANSPOSED), its column sums hs
    (BH, NMC, E) (_column_sum) and z (BH, M), relative to the stabilizer M.

    SOFTMAX finds the query row max online over the m tiles (flash-style rescaling of the
    exp part; the eps part of q~ is separated), so q needs no stats pass, and writes q_max.
    VARLEN: program (head, chunk slot) of a pack, the key states of its sequence's row."""
    i_h, i_g = block_program(VARLEN)
    i_nh, i_t, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, N, VARLEN)
    if VARLEN:  # a packed sequence's keys are its queries
        S = T
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_qn = aligned(stride_qh, AL), aligned(stride_qn, AL)
    o_t, m_t = block_range(i_t, BT, T)  # (BT,)
    o_d, m_d = block_range(0, BD, D)  # (BD,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_hb = h + i_nh.to(tl.int64) * M * E
    p_htb = ht + i_nh.to(tl.int64) * E * MT
    p_zb = z + i_nh.to(tl.int64) * M
    o_row = i_bh.to(tl.int64) * N + bos
    b_q = load_fused_rows(p_q, o_t, m_t, stride_qn, o_d, m_d, BT, BD, FEATURE)  # (BT, BD)
    b_acc = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV) sum_f F_f H_f
    b_den = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f F_f z_f
    b_r = tl.full([BT], float("-inf"), dtype=tl.float32)  # (BT,) running max of dash
    b_xs = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f exp(dash_f - b_r)
    b_zs = tl.zeros([BM], dtype=tl.float32)  # (BM,) sum over tiles of z
    b_z_next = load_vector(p_zb, 0, BM, M)  # (BM,) prefetched one m tile ahead
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_h = _state_tile(p_hb, p_htb, o_m, m_m, o_v, m_v, E, MT, BV)  # (BM, BV) fp32
        b_z = b_z_next  # (BM,)
        b_z_next = load_vector(p_zb, i_m + 1, BM, M)
        b_p = load_fused_rows(p, o_m, m_m, D, o_d, m_d, BM, BD, FEATURE)  # (BM, BD)
        if FEATURE == FM_SOFTMAX:
            b_dash = dash_tile(b_q, b_p, dn, PRECISION)  # (BT, BM)
            b_dash = tl.where(m_m[None, :], b_dash, float("-inf"))
            b_rn = tl.maximum(b_r, tl.max(b_dash, axis=1))  # (BT,)
            b_alpha = tl.exp(b_r - b_rn)  # (BT,) 0 on the first tile
            b_qf = tl.exp(b_dash - b_rn[:, None])  # (BT, BM) in [0, 1]
            b_acc *= b_alpha[:, None]
            b_den *= b_alpha
            b_xs = b_xs * b_alpha + tl.sum(b_qf, axis=1)
            b_r = b_rn
            b_zs += b_z
        else:
            b_qf, _ = features(p_q, b_q, b_p, b_r, b_r, o_t, m_t, stride_qn, o_m, m_m, dn, FEATURE, True,
                               PRECISION)  # (BT, BM)
        # h is an unbounded fp32 state: fp32 operands (input precision PRECISION)
        b_acc += tl.dot(tf32_nearest(b_qf, PRECISION), b_h, input_precision=PRECISION)  # h stored rounded
        b_den += tl.sum(b_qf * b_z[None, :], axis=1)
    if FEATURE == FM_SOFTMAX:
        # q~_f = exp(dash_f - b_r) * exp(-diag) + eps on the M real features
        b_ed = tl.exp(-half_sq_norm(b_q, dn))  # (BT,)
        b_vsum = tl.load(vs + i_nh.to(tl.int64) * E + o_v, mask=m_v, other=0.0)  # (BV,)
        b_qs = b_ed * b_xs + FM_SOFTMAX_EPS * M  # (BT,) sum_f q~_f
        b_hs = _column_sum(hs, i_nh, NMC, E, o_v, m_v, NMCP)  # (BV,) sum_f H_f
        b_num = (b_ed[:, None] * b_acc + FM_SOFTMAX_EPS * b_hs[None, :]
                 + FM_SOFTMAX_EPS * b_qs[:, None] * b_vsum[None, :])  # (BT, BV)
        b_den = b_ed * b_den + FM_SOFTMAX_EPS * tl.sum(b_zs, axis=0) + FM_SOFTMAX_EPS * S * b_qs
        tl.store(q_max + o_row + o_t, b_r, mask=m_t)
    else:
        b_num = b_acc
    # D = 0 on padded rows, and where every key was masked out (GIVEN zero features): output 0
    b_rden = reciprocal_or_zero(tl.where(m_t, b_den, 0.0))  # (BT,) fp32
    tl.store(rden + o_row + o_t, b_rden, mask=m_t)
    store_rows(out, b_num * b_rden[:, None], o_row, o_t, m_t, o_v, m_v, E)


@triton.jit
def _dstate_kernel(
    q, g, out, p, q_max, rden, dh_part, dz_part, cu_seqlens,
    H, N, M, D, E, BH, NTS,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn, stride_ob, stride_oh, stride_on,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """Reverse state of one split of NTS query blocks for one m tile:
    dh_part[i_s, i_bh] = sum_i q~_i dN_i^T (M, E), dz_part = sum_i q~_i dD_i (M,), accumulated in
    registers (the key-side gradients need them whole before any dk, dv).  VARLEN as
    _state_kernel."""
    i_nh, i_m, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, N, VARLEN)
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_qn, stride_gb = aligned(stride_qh, AL), aligned(stride_qn, AL), aligned(stride_gb, AV)
    stride_gh, stride_gn, stride_ob = aligned(stride_gh, AV), aligned(stride_gn, AV), aligned(stride_ob, AV)
    stride_oh, stride_on = aligned(stride_oh, AV), aligned(stride_on, AV)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_g = bh_base(g, i_bh, H, stride_gb, stride_gh) + bos * stride_gn
    p_o = bh_base(out, i_bh, H, stride_ob, stride_oh) + bos * stride_on
    o_row = i_bh.to(tl.int64) * N + bos
    b_dh = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
    b_dz = tl.zeros([BM], dtype=tl.float32)  # (BM,)
    i_t0 = i_s * NTS
    i_t1 = tl.minimum(i_t0 + NTS, tl.cdiv(T, BT))
    # the out tile feeds no dot, so the pipeliner would load it synchronously: prefetched by hand
    o_t, m_t = block_range(i_t0, BT, T)  # (BT,)
    b_o_next = load_rows(p_o, o_t, m_t, stride_on, o_v, m_v)  # (BT, BV)
    for i_t in range(i_t0, i_t1):
        o_t, m_t = block_range(i_t, BT, T)  # (BT,)
        b_g = load_rows(p_g, o_t, m_t, stride_gn, o_v, m_v).to(tl.float32)  # (BT, BV)
        b_o = b_o_next.to(tl.float32)  # (BT, BV)
        o_tn, m_tn = block_range(i_t + 1, BT, T)  # (BT,) the next block (read, unused, after the split)
        b_o_next = load_rows(p_o, o_tn, m_tn, stride_on, o_v, m_v)
        b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,) 0 kills padded rows
        b_dn = tf32_nearest(b_g * b_rden[:, None], PRECISION)  # (BT, BV) dL/dN, a dot operand only
        b_dd = -grad_dot_out(b_g, b_o) * b_rden  # (BT,) dL/dD
        b_diag = diag_rows(p_q, o_t, m_t, stride_qn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
        if FEATURE == FM_SOFTMAX:
            b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
        else:
            b_qmax = b_diag  # (BT,) unused
        b_qf, _ = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                                   FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        # (dN rounded where it is made: both rounded here spilled 108-220 B on sm_90a)
        b_dh += tl.dot(tl.trans(tf32_nearest(b_qf, PRECISION)), b_dn, input_precision=PRECISION)
        b_dz += tl.sum(b_qf * b_dd[:, None], axis=0)
    o_part = i_s * BH + i_nh  # (split, b*h) slot of this program
    p_dh = dh_part + o_part.to(tl.int64) * M * E + o_m[:, None] * E + o_v[None, :]
    tl.store(p_dh, b_dh, mask=m_m[:, None] & m_v[None, :])
    tl.store(dz_part + o_part.to(tl.int64) * M + o_m, b_dz, mask=m_m)


@triton.jit
def _bwd_q_kernel(
    q, g, out, p, q_max, rden, h, z, vs, dq, cu_seqlens, chunk_first, chunk_seq,
    H, N, S, M, D, E, NS, SE,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn, stride_ob, stride_oh, stride_on,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """dq columns [i_k BK, i_k BK + BK) for BT queries (program i_t NK + i_k), from the key state
    h (BH, M, E), z (BH, M) relative to the stabilizer and the value sum vs (BH, E); SE the row
    stride of h and vs (the forward's value width when a backward value slice reads its columns).
    q and P are read in BK-wide chunks (dash_rows): no (BT, d) tile stays live.  VARLEN as
    _output_kernel."""
    i_h, i_tk = block_program(VARLEN)
    i_g, i_k, o_k, m_k = column_slice(i_tk, NK, D, BK)  # (BK,) this program's columns of dq
    i_nh, i_t, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, N, VARLEN)
    if VARLEN:  # a packed sequence's keys are its queries
        S = T
    D, E, SE = aligned(D, AL), aligned(E, AV), aligned(SE, AV)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, AL), aligned(stride_qh, AL), aligned(stride_qn, AL)
    stride_gb, stride_gh, stride_gn = aligned(stride_gb, AV), aligned(stride_gh, AV), aligned(stride_gn, AV)
    stride_ob, stride_oh, stride_on = aligned(stride_ob, AV), aligned(stride_oh, AV), aligned(stride_on, AV)
    o_t, m_t = block_range(i_t, BT, T)  # (BT,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_g = bh_base(g, i_bh, H, stride_gb, stride_gh) + bos * stride_gn
    p_o = bh_base(out, i_bh, H, stride_ob, stride_oh) + bos * stride_on
    o_row = i_bh.to(tl.int64) * N + bos
    p_hb = h + i_nh.to(tl.int64) * M * SE
    p_zb = z + i_nh.to(tl.int64) * M
    b_g = load_rows(p_g, o_t, m_t, stride_gn, o_v, m_v).to(tl.float32)  # (BT, BV)
    b_o = load_rows(p_o, o_t, m_t, stride_on, o_v, m_v).to(tl.float32)  # (BT, BV)
    b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,) 0 kills padded rows
    b_dn = b_g * b_rden[:, None]  # (BT, BV) dL/dN
    b_dd = -grad_dot_out(b_g, b_o) * b_rden  # (BT,) dL/dD
    b_dx = tl.zeros([BT, BK], dtype=tl.float32)  # (BT, BK) du @ P[:, o_k]
    b_rs = tl.zeros([BT], dtype=tl.float32)  # (BT,) rowsum du
    b_diag = diag_rows(p_q, o_t, m_t, stride_qn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
    if FEATURE == FM_SOFTMAX:
        b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
        b_vs = tl.load(vs + i_nh.to(tl.int64) * SE + o_v, mask=m_v, other=0.0)  # (BV,)
        # the eps part of the key features: d/dq~_f of eps * sum_f q~_f (vsum . dN + s dD)
        b_deps = FM_SOFTMAX_EPS * (tl.sum(b_dn * b_vs[None, :], axis=1) + S * b_dd)  # (BT,)
    else:
        b_qmax = b_diag  # (BT,) unused
    b_z_next = load_vector(p_zb, 0, BM, M)  # (BM,) prefetched one m tile ahead
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        # H^T loaded transposed rather than permuted in registers (an fp32 operand)
        b_ht = load_rows(p_hb, o_v, m_v, 1, o_m * SE, m_m)  # (BV, BM) fp32
        b_z = b_z_next  # (BM,)
        b_z_next = load_vector(p_zb, i_m + 1, BM, M)
        # dL/dq~ = H dN + z dD (dN, H unbounded: fp32 operands)
        b_df = tl.dot(tf32_nearest(b_dn, PRECISION), b_ht, input_precision=PRECISION)  # (BT, BM) h stored rounded
        b_df += b_dd[:, None] * b_z[None, :]
        _, b_qaux = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                                     FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        if FEATURE == FM_SOFTMAX:
            b_df += b_deps[:, None]
        # chain through the features (the stabilizer is detached)
        b_dx, b_rs = input_grad_tile(dq, b_df, b_qaux, b_dx, b_rs, p, o_row, o_t, m_t, o_m, m_m, M, o_k, m_k, D,
                                     FEATURE, PRECISION)
    if FEATURE != FM_GIVEN:
        store_input_grad(dq, p_q, b_dx, b_rs, o_row, o_t, m_t, stride_qn, o_k, m_k, D, dn, FEATURE)


@triton.jit
def _bwd_kv_kernel(
    k, v, p, k_stab, dh, dht, dhs, dz, dk, dv, cu_seqlens, chunk_first, chunk_seq,
    H, S, M, D, E, NS, MT, NMC,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
    NMCP: tl.constexpr,
):
    """dk columns [i_k BK, i_k BK + BK) and (i_k = 0) dv for BT keys (program i_t NK + i_k),
    from dh = sum_i q~_i dN_i^T (BH, M, E), its transpose dht (BH, E, MT) (row stride MT), its
    column sums dhs (BH, NMC, E) and dz =
    sum_i q~_i dD_i (BH, M): each dot reads the layout whose rows run along its K.  SOFTMAX key
    features exp(dash - diag - M) from the stabilizer k_stab (BH,) alone: they stay fp32 here.
    VARLEN as _output_kernel."""
    i_h, i_tk = block_program(VARLEN)
    i_g, i_k, o_k, m_k = column_slice(i_tk, NK, D, BK)  # (BK,) this program's columns of dk
    i_nh, i_t, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, S, VARLEN)
    D, E, stride_kb = aligned(D, AL), aligned(E, AV), aligned(stride_kb, AL)
    stride_kh, stride_kn, stride_vb = aligned(stride_kh, AL), aligned(stride_kn, AL), aligned(stride_vb, AV)
    stride_vh, stride_vn = aligned(stride_vh, AV), aligned(stride_vn, AV)
    o_t, m_t = block_range(i_t, BT, T)  # (BT,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    o_row = i_bh.to(tl.int64) * S + bos
    p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
    p_v = bh_base(v, i_bh, H, stride_vb, stride_vh) + bos * stride_vn
    p_dhb = dh + i_nh.to(tl.int64) * M * E
    p_dhtb = dht + i_nh.to(tl.int64) * E * MT
    p_dzb = dz + i_nh.to(tl.int64) * M
    # dh is unbounded: v enters its tl.dot as fp32
    b_v = tf32_nearest(load_rows(p_v, o_t, m_t, stride_vn, o_v, m_v).to(tl.float32), PRECISION)  # (BT, BV)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV)
    b_dx = tl.zeros([BT, BK], dtype=tl.float32)  # (BT, BK) du @ P[:, o_k]
    b_rs = tl.zeros([BT], dtype=tl.float32)  # (BT,) rowsum du
    if FEATURE == FM_SOFTMAX:
        # diag + M per row, what key_units subtracts (+inf on padded rows: 0 features)
        b_diag = diag_rows(p_k, o_t, m_t, stride_kn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
        b_kmax = tl.where(m_t, b_diag + tl.load(k_stab + i_nh), float("inf"))  # (BT,)
    else:
        b_kmax = tl.zeros([BT], dtype=tl.float32)  # (BT,) unused
    b_dz_next = load_vector(p_dzb, 0, BM, M)  # (BM,) prefetched one m tile ahead
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_dh = _state_tile(p_dhb, p_dhtb, o_m, m_m, o_v, m_v, E, MT, BV)  # (BM, BV) fp32
        b_dz = b_dz_next  # (BM,)
        b_dz_next = load_vector(p_dzb, i_m + 1, BM, M)
        # dL/dF_jf = dh_f . v_j + dz_f for the (exp part of the) key features
        b_dht = load_rows(p_dhb, o_v, m_v, 1, o_m * E, m_m)  # (BV, BM) fp32, dh^T from dh (K = e rows)
        b_df = tl.dot(b_v, b_dht, input_precision=PRECISION) + b_dz[None, :]  # (BT, BM) (both rounded)
        b_kf, b_kaux = features_chunked(p_k, p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, D, dn,
                                        FEATURE, False, BT, BM, BK, NK, PRECISION)  # (BT, BM) x2
        b_dx, b_rs = input_grad_tile(dk, b_df, b_kaux, b_dx, b_rs, p, o_row, o_t, m_t, o_m, m_m, M, o_k, m_k, D,
                                     FEATURE, PRECISION)
        b_dv += tl.dot(tf32_nearest(b_kf, PRECISION), b_dh, input_precision=PRECISION)  # dh stored rounded
    if FEATURE == FM_SOFTMAX:
        # sum_f dh_f = sum_i sum(q~_i) dN_i
        b_dv += FM_SOFTMAX_EPS * _column_sum(dhs, i_nh, NMC, E, o_v, m_v, NMCP)[None, :]
    if i_k == 0:
        store_rows(dv, b_dv, o_row, o_t, m_t, o_v, m_v, E)
    if FEATURE != FM_GIVEN:
        store_input_grad(dk, p_k, b_dx, b_rs, o_row, o_t, m_t, stride_kn, o_k, m_k, D, dn, FEATURE)


@host_cache
def _config(d: int, e: int, m: int, dtype: torch.dtype) -> dict:
    """feature_map.block_config plus the non-causal kernels' own: the output kernel takes m tiles
    of at most 32; the gradient kernels keep the most tiles live and take the smallest
    m tile, except for GIVEN feature tiles (no projection tiles live), where sm_80's ptxas
    spills more at 16 than at 32; the reverse-state kernel takes the state kernel's BM (for
    16-bit 32: at 16 sm_80's mma.sync puts its 4 warps along the 16 columns of the query-feature
    tile, duplication 2), GIVEN 64 (16 and 32 spill 4-8 B there, at d = e = 16 and 128).  4 warps:
    one warpgroup spans the BT = 64 rows of every dot, where 8 warps computed each dot twice
    (compile report: duplication); the fp32 forward of 128-wide tiles keeps 8, whose halved
    per-thread share keeps it from spilling (76-296 B at 4 warps).
    d = 0 for GIVEN."""
    cfg = block_config(d, e, m, dtype)
    if dtype != torch.float32 and max(cfg["BD"], cfg["BV"]) <= 64:
        # 16-bit heads up to 64 wide: m tiles of 64 for the split and output kernels, half the
        # sequential steps of a split walk at 32 (and half the re-reads of its key blocks), for
        # 2 CTAs per SM instead of 3; 128-wide tiles spill at 64 (compile report)
        cfg["BM"] = min(64, max(16, next_power_of_2(m)))
    warps = 8 if dtype == torch.float32 and max(cfg["BD"], cfg["BV"]) > 64 else 4  # state and output kernels
    return cfg | dict(
        # m tiles of 64 in the output kernel spilled 350-650 B on sm_80 for 16-bit heads whose d
        # is not a multiple of 16 (d = 24, full sweep); its loop has no chain to shorten
        BM_out=min(cfg["BM"], 32),
        BM_bwd=32 if d == 0 else 16,
        BM_dstate=64 if d == 0 else cfg["BM"],
        BM_combine=32,
        num_warps=warps,
        num_warps_out=warps,
        num_warps_bwd=4,
        # the split walks: splits that fill about one wave at 4 CTAs per SM on 132 SMs, at most
        # 64 of them (their partials' memory), each of at least 4 blocks (a walk of fewer costs
        # more in partials than it saves); bench/gpu_profile.py times one-block splits against it
        split_programs=4 * 132,
        max_splits=64,
        split_blocks=4,
    )


COMBINE_SPLITS = 64  # the splits whose maxima the combine kernel reads per load


def _splits(blocks: int, programs: int, cfg: dict) -> tuple[int, int]:
    """(blocks per split, splits): the most splits that keep programs * splits within
    cfg["split_programs"], each with at least cfg["split_blocks"] blocks (at least one split, at
    most cfg["max_splits"])."""
    ns = max(1, min(cfg["split_programs"] // programs, cdiv(blocks, cfg["split_blocks"]), cfg["max_splits"]))
    per = cdiv(blocks, ns)
    return per, cdiv(blocks, per)


def _transposed_stride(m: int) -> int:
    """Row stride of a transposed state (e, m): m rounded up to 16 elements, so that every row
    starts 64-byte aligned and its copies move 16 bytes."""
    return cdiv(m, 16) * 16


def _sums(bh: int, m: int, e: int, refs: bool, cfg: dict, device) -> list[torch.Tensor]:
    """Empty fp32 combined sums: h (bh, m, e), its transpose ht (bh, e, _transposed_stride(m))
    (the padding columns zeroed by the combine kernel), the column sums of h per combine m tile hs
    (bh, tiles, e), z (bh, m), vs (bh, e or 0), k_stab (bh or 0,)."""
    f32 = dict(device=device, dtype=torch.float32)
    mt = _transposed_stride(m)
    return [torch.empty((bh, m, e), **f32), torch.empty((bh, e, mt), **f32),
            torch.empty((bh, cdiv(mt, cfg["BM_combine"]), e), **f32), torch.empty((bh, m), **f32),
            torch.empty((bh, e if refs else 0), **f32), torch.empty((bh if refs else 0,), **f32)]


def saved_states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, *,
                 feature: int, prefix: bool = False, cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Empty buffers of the key states noncausal_fwd returns for the backward (its fake tensors
    too): H (b*h, m, e), H^T (b*h, e, m rounded up to 16) and H's column sums per m tile, z (b*h,
    m) relative to the stabilizer M, the value sum (b*h, e) and M
    (b*h,) (SOFTMAX; (b*h, 0) and (0,) otherwise), fp32; b*h -> NS h rows for a pack of NS
    sequences (cu_seqlens).  prefix: unused (launchers' signature)."""
    m, d = feature_dims(q, projection, feature)
    cfg = _config(d, v.shape[-1], m, q.dtype)
    return _sums(_state_rows(k, cu_seqlens), m, v.shape[-1], feature == SOFTMAX, cfg, k.device)


def _state_rows(k: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Rows of the key states: one per (b, h), or per (sequence, h) of a pack."""
    b, h = k.shape[:2]
    return b * h * (1 if cu_seqlens is None else cu_seqlens.shape[0] - 1)


def _combine(h_part, z_part, vs_part, r_part, s_part, sums, *, refs: bool, cfg: dict, nmt: int = 1):
    """Run _combine_kernel on split partials (splits, b*h, m, e), (splits, b*h, m) [and, refs, the
    value sums (splits, b*h, e), references and dash maxima (splits, b*h, nmt) of the state kernel's nmt m
    tiles] into sums (_sums: h, ht, hs, z, vs, k_stab; returned)."""
    splits, bh, m, e = h_part.shape
    h, ht, hs, z, vs, k_stab = sums
    bm = cfg["BM_combine"]
    mt = ht.shape[-1]
    launch(
        _combine_kernel, (bh, hs.shape[1]), h_part, z_part, vs_part, r_part, s_part, h, ht, hs, z, vs, k_stab,
        bh, m, e, splits, nmt, mt,
        REFS=refs, BM=bm, BV=cfg["BV"], NSP=COMBINE_SPLITS, BMS=cfg["BM"], NMTP=next_power_of_2(nmt),
        PRECISION=feature_map.PRECISION, num_warps=4,
    )
    return sums


def _key_states(q, k, v, projection, *, feature: int, m: int, d: int, cfg: dict, cu_seqlens, offsets):
    """Key states relative to the stabilizer M: H (b*h, m, e), H^T, z (b*h, m), vsum (b*h, e or 0),
    and M (b*h,) (SOFTMAX; (0,) otherwise); a pack (offsets: its clamped cu_seqlens): one row
    per (sequence, h).  Launches _state_kernel and _combine_kernel."""
    h, s = k.shape[1], k.shape[2]
    e = v.shape[-1]
    softmax = feature == SOFTMAX
    bh = _state_rows(k, cu_seqlens)
    nmt = cdiv(m, cfg["BM"])
    # (a pack: the splits of its longest possible sequence; shorter ones leave theirs empty)
    per, splits = _splits(cdiv(s, cfg["BT"]), nmt * bh, cfg)
    f32 = dict(device=k.device, dtype=torch.float32)
    h_part = torch.empty((splits, bh, m, e), **f32)
    z_part = torch.empty((splits, bh, m), **f32)
    vs_part = torch.empty((splits, bh, e if softmax else 0), **f32)
    r_part = torch.empty((splits, bh, nmt) if softmax else (0,), **f32)
    s_part = torch.empty((splits, bh, nmt) if softmax else (0,), **f32)
    launch(
        _state_kernel, (bh, nmt, splits),
        k, v, k if projection is None else projection, h_part, z_part, vs_part, r_part, s_part, offsets,
        h, s, m, d, e, bh, per, nmt,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        head_scale(d),
        FEATURE=feature, AL=alignment(d, k), AV=alignment(e, v), VARLEN=cu_seqlens is not None,
        **launch_options(cfg, "state"),
    )
    sums = saved_states(q, k, v, projection, feature=feature, cu_seqlens=cu_seqlens)
    return _combine(h_part, z_part, vs_part, r_part, s_part, sums, refs=softmax, cfg=cfg, nmt=nmt)


def _no_prefix(prefix: bool) -> None:
    if prefix:
        raise ValueError("prefix (the leak-free key stabilizer) is for causal attention only")


def noncausal_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, *, feature: int,
    prefix: bool = False, causal_eps: float = CAUSAL_EPS, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Non-causal FAVOR+ attention.  q (b, h, n, d), k (b, h, s, d), v (b, h, s, e), P (m, d);
    for GIVEN q (b, h, n, m), k (b, h, s, m) are the features and projection is None.
    prefix must be False (it selects a causal stabilizer; the signature is causal_fwd's) and
    causal_eps is unused (the non-causal normaliser has no eps).

    Returns out (b, h, n, e) in q's dtype, fp32 q_max (b, h, n) (SOFTMAX; (b, h, 0) otherwise),
    k_max and k_scale (b, h, 0): the key maxima are taken on the state kernel's tiles, no per-row
    key statistics), fp32 rden = 1 / D (b, h, n) and the key states (saved_states) for
    noncausal_bwd.  cu_seqlens (NS + 1,) int32: q, k, v (1, h, n, .) hold NS packed sequences
    (n == s), each attending within itself with its own stabilizer (NOTES "Packed sequences").
    Launches: _state_kernel, _combine_kernel, _output_kernel."""
    _no_prefix(prefix)
    m, d = check_inputs(q, k, v, projection, feature, cu_seqlens)
    b, h, n, _ = q.shape
    e = v.shape[-1]
    cfg = _config(d, e, m, q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    q_max, k_max, k_scale = empty_stats(b, h, q.device)
    if feature == SOFTMAX:
        q_max = torch.empty((b, h, n), **f32)
    out = torch.empty((b, h, n, e), device=q.device, dtype=q.dtype)
    rden = torch.empty((b, h, n), **f32)
    nt, ns, varlen, is_varlen = packing_args(cu_seqlens, cfg["BT"], n, rden)
    saved = _key_states(q, k, v, projection, feature=feature, m=m, d=d, cfg=cfg, cu_seqlens=cu_seqlens,
                        offsets=varlen[0])
    states, states_t, col_sums, sums, vsum, _ = saved
    launch(
        _output_kernel, block_grid(b * h, nt, is_varlen),
        q, q if projection is None else projection, states, states_t, col_sums, sums, vsum, out, q_max, rden,
        *varlen,
        h, n, k.shape[2], m, d, e, ns, states_t.shape[-1], col_sums.shape[1],
        q.stride(0), q.stride(1), q.stride(2),
        head_scale(d),
        FEATURE=feature, AL=alignment(d, q), AV=alignment(e), VARLEN=is_varlen, NMCP=next_power_of_2(col_sums.shape[1]),
        **launch_options(cfg, "out"),
    )
    return out, q_max, k_max, k_scale, rden, saved


def noncausal_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    projection: torch.Tensor | None, out: torch.Tensor, q_max: torch.Tensor, k_max: torch.Tensor,
    k_scale: torch.Tensor, rden: torch.Tensor, states: list[torch.Tensor], *, feature: int, prefix: bool = False,
    causal_eps: float = CAUSAL_EPS, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of noncausal_fwd: dq, dk, dv in the dtypes and shapes of q, k, v (w.r.t. the
    features for GIVEN).  The stats and key states are noncausal_fwd's outputs (contiguous).
    Launches: _dstate_kernel, _combine_kernel, _bwd_q_kernel, _bwd_kv_kernel.

    Value dims wider than the config's EV run in slices (feature_map.backward_in_value_slices)."""
    _no_prefix(prefix)
    check_unit_stride(grad_out=grad_out, out=out)
    e = v.shape[-1]
    m, d = feature_dims(q, projection, feature)
    stats = (q_max, k_max, k_scale, rden)
    cfg = _config(d, e, m, q.dtype)
    packing = packing_args(cu_seqlens, cfg["BT"], q.shape[2], rden) + (_state_rows(k, cu_seqlens),)
    return backward_in_value_slices(
        lambda g, v_s, out_s, cols, grad_dtype: _bwd_slice(g, q, k, v_s, projection, out_s, stats, states, cols,
                                                           feature, grad_dtype, packing),
        grad_out, v, out, cfg["EV"], q.dtype, k.dtype,
    )


def _bwd_slice(grad_out, q, k, v, projection, out, stats, states, cols: slice, feature: int, grad_dtype: torch.dtype,
               packing: tuple):
    """noncausal_bwd for value dims up to EV (the columns cols of the forward's); dq, dk in
    grad_dtype, dv in v's dtype; packing: packing_args' and the key states' rows."""
    q_max, k_max, k_scale, rden = stats
    b, h, n, _ = q.shape
    s, e = k.shape[2], v.shape[-1]
    m, d = feature_dims(q, projection, feature)
    cfg = _config(d, e, m, q.dtype)
    dn = head_scale(d)
    states, _, _, sums, vsum, k_stab = states
    states, vsum = states[..., cols], vsum[..., cols]  # views: _bwd_q_kernel takes their row stride
    p = q if projection is None else projection
    nk = 1 if feature == GIVEN else cdiv(d, cfg["BK"])  # BK-wide chunks of d, one dq / dk slice each
    nt, ns, varlen, is_varlen, bh = packing
    opts = launch_options(cfg, "bwd", FEATURE=feature, NK=nk, VARLEN=is_varlen)
    al, av = alignment(d, q), alignment(e, grad_out, out)  # (the dq, dstate kernels'; dk, dv take k, v)
    nm = cdiv(m, cfg["BM_dstate"])
    per, splits = _splits(cdiv(n, cfg["BT"]), nm * bh, cfg)
    f32 = dict(device=q.device, dtype=torch.float32)
    dh_part = torch.empty((splits, bh, m, e), **f32)
    dz_part = torch.empty((splits, bh, m), **f32)
    strides = (q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
               out.stride(0), out.stride(1), out.stride(2))
    launch(
        _dstate_kernel, (bh, nm, splits), q, grad_out, out, p, q_max, rden, dh_part, dz_part, varlen[0],
        h, n, m, d, e, bh, per, *strides,
        dn,
        **(opts | dict(BM=cfg["BM_dstate"], AL=al, AV=av)),
    )
    reverse = _sums(bh, m, e, False, cfg, q.device)
    dh, dht, dhs, dz, _, _ = _combine(dh_part, dz_part, dz_part, dz_part, dz_part, reverse, refs=False, cfg=cfg)
    dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
    launch(
        _bwd_q_kernel, block_grid(b * h, nt * nk, is_varlen),
        q, grad_out, out, p, q_max, rden, states, sums, vsum, dq, *varlen,
        h, n, s, m, d, e, ns, states.stride(-2), *strides,
        dn,
        AL=al, AV=alignment(av, states.stride(-2)), **opts,
    )
    dk = torch.empty(k.shape, device=k.device, dtype=grad_dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    key_blocks = nt if is_varlen else cdiv(s, cfg["BT"])  # (a pack: s == n)
    launch(
        _bwd_kv_kernel, block_grid(b * h, key_blocks * nk, is_varlen),
        k, v, p, k_stab, dh, dht, dhs, dz, dk, dv, *varlen,
        h, s, m, d, e, ns, dht.shape[-1], dhs.shape[1],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dn,
        AL=alignment(d, k), AV=alignment(e, v), NMCP=next_power_of_2(dhs.shape[1]), **opts,
    )
    return dq, dk, dv
