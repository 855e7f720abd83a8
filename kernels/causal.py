"""Fused causal FAVOR+ attention: chunked forward and backward Triton kernels.

Implements the launcher contract of kernels/NOTES.md for causal attention (n == s) with the
"global" key stabilizer (1.1.4: one max over all keys per (b, h)) or the leak-free "prefix" one
(query i uses the max over keys j <= i). Features are recomputed on (rows, BM) tiles from q, k
and P (kernels/feature_map.py) and never written to global memory.

Per (b, h) the sequence is cut into NT chunks of BT positions:
  _chunk_state_kernel  grid (b*h, NT, m tiles): every chunk's own key state at once (the
                   features of its keys), referenced to its own max of k_scale.
  _state_scan_kernel   grid (b*h, m tiles): sequential over chunks, rescales and adds them into
                   the key state H_c (bf16 for 16-bit inputs), z_c and the value sum before
                   every chunk, referenced to R_c, and the chunk vectors c_ref, c_stab (the
                   stabilizers).  The walk's steps compute nothing but the sums: features in
                   every step made each one wait ~4 us (H200, kernels/NOTES.md).
  _output_kernel   grid (b*h, NT): out = inter (q~ @ H_c) + intra (masked score tile @ v).
                   The key states are returned for the backward, which reads them again.
  _dd_kernel       grid (b*h, NT): dD = -rden (g . out) per row, the backward's one read of out.
  _chunk_dstate_kernel  grid (b*h, NT, m tiles): every chunk's own reverse state at once (the
                   features of its queries).
  _dstate_scan_kernel   grid (b*h, m tiles): reverse scan over chunks, writes dH_c, dz_c
                   (referenced to M at the chunk's last row) and partial eps sums of the later
                   queries.
  _bwd_qk_kernel   grid (b*h, NT NK), launched twice: dq (KEYS False; inter via the forward
                   states) and dk (KEYS True; inter via the reverse states) of one chunk, intra
                   via the (BT, BT) tile.
  _bwd_v_kernel    grid (b*h, NT): dv of one chunk (likewise).
Splitting the backward three ways keeps each kernel's live tiles within the register file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import (CAUSAL_EPS, GENERALIZED_EPS, GIVEN, RELU, SOFTMAX, SOFTMAX_EPS, causal_coef, extension_unsupported,
               feature_eps)
from .feature_map import (
    FM_GIVEN, FM_SOFTMAX, aligned, alignment, backward_in_value_slices, bh_base, block_config, block_grid,
    block_program, block_range, cdiv, check_inputs, check_unit_stride, chunk_program, chunk_slots, column_slice,
    diag_rows, dot, empty_stats, feature_dims, features, features_chunked, finite_or_zero, grad_dot_out,
    half_sq_norm, half_sq_norm_rows, head_scale, host_cache, input_grad_tile, launch, launch_options,
    load_fused_rows, load_rows, load_vector, merged_reference, packing_args, reciprocal_or_zero, row_block, row_stats,
    sequence_span, state_dot, store_input_grad, store_rows, store_state, tf32_nearest
)

__all__ = ["causal_fwd", "causal_bwd", "causal_fwd_state", "causal_bwd_state"]


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def stab_before(c_stab, o_cs, i_c, NT, PREFIX: tl.constexpr):
    """The key stabilizer carried into chunk i_c: the max of k_max over the keys before it
    (PREFIX; chunk NT: over every key) or over every key (global)."""
    if PREFIX:
        s_in = tl.load(c_stab + o_cs + i_c)
    else:
        s_in = tl.load(c_stab + o_cs + NT)
    return s_in


@triton.jit
def row_stabilizer(b_kmax, m_t, s_in, PREFIX: tl.constexpr):
    """M_i (BT,) of a chunk's rows from stab_before s_in: s_in itself (global) or the running max
    of the chunk's k_max (BT,) from s_in on (PREFIX: keys j <= i).  +inf on padded rows, which
    gives them 0 weights."""
    if PREFIX:
        b_stab = tl.maximum(tl.associative_scan(tl.where(m_t, b_kmax, float("-inf")), 0, _max2), s_in)  # (BT,)
    else:
        b_stab = tl.zeros_like(b_kmax) + s_in  # (BT,)
    return tl.where(m_t, b_stab, float("inf"))


@triton.jit
def _chunk_key_state(p_k, p_v, p, b_p, b_kmax, b_kscale, r_ref, o_t, m_t, D, stride_kn, stride_vn, o_d, m_d,
                     o_m, m_m, o_v, m_v, dn, FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                     BD: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, PRECISION: tl.constexpr):
    """What the keys of rows o_t (mask m_t; k_scale -inf there) add to a key state referenced to
    r_ref (>= their k_scale): F^T v (BM, BV), sum_j F_j (BM,) and sum_j v_j (BV,), fp32,
    F = U exp(k_scale - r_ref) <= 1 (0 where k_scale is -inf, also where r_ref is: a chunk
    without rows adds 0, not NaN).
    BK == BD: k as a resident (BT, BD) tile against the resident projection tile b_p; BK < BD
    (fp32 heads wider than 64) k and P in BK-wide chunks (NOTES "Wide heads")."""
    if BK == BD:
        b_k = load_fused_rows(p_k, o_t, m_t, stride_kn, o_d, m_d, BT, BD, FEATURE)  # (BT, BD)
        b_kf, _ = features(p_k, b_k, b_p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, dn, FEATURE, False,
                           PRECISION)  # (BT, BM)
    else:
        b_kf, _ = features_chunked(p_k, p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, D, dn,
                                   FEATURE, False, BT, BM, BK, NK, PRECISION)  # (BT, BM)
    # (BT,) <= 0; -inf on masked rows and where k_scale is -inf (|k|^2 past fp32's range): a chunk
    # of only such keys has r_ref = -inf too, and -inf - -inf would be NaN (a NaN key stays NaN)
    b_e = tl.where(b_kscale == float("-inf"), float("-inf"), b_kscale - r_ref)
    b_kk = b_kf * tl.exp(b_e)[:, None]  # (BT, BM), entries <= 1 (SOFTMAX)
    b_v = load_rows(p_v, o_t, m_t, stride_vn, o_v, m_v)  # (BT, BV)
    b_hc = dot(tl.trans(b_kk.to(b_v.dtype)), b_v, None, PRECISION)  # (BM, BV)
    return b_hc, tl.sum(b_kk, axis=0), tl.sum(b_v.to(tl.float32), axis=0)


@triton.jit
def _chunk_state_kernel(
    k, v, p, k_max, k_scale, c_rloc, c_sloc,
    h_own, z_state, v_state, hz_f, vs_f, cu_seqlens, chunk_first, chunk_seq,
    H, N, M, D, E, NT, NS,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    NK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, STATE: tl.constexpr,
    AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """One chunk's own key state, for one m tile, every chunk at once (grid: block_grid's
    (b*h, chunks) or a pack's (chunk slots, h), then m tiles): H = sum_j U_j exp(k_scale_j - r) v_j^T,
    z the same with v = 1 and vsum = sum_j v_j over the chunk's keys, referenced to r = the max of
    their k_scale.  Stored where _state_scan_kernel turns them into the states before every
    chunk: in the slot of the state after the chunk (o_st + c + 1) of h_own (the saved states'
    buffer, or an fp32 one: _key_states), the last chunk's (needed with
    STATE only: the final state) in hz_f (b*h, M, E + 1) = [H | z] and vs_f (b*h, E + 1).  The
    first m tile writes r and the chunk's max of k_max into the scratch vectors c_rloc, c_sloc
    (b*h, NT + NS) at the chunk vectors' index c + 1 (o_cs), the last chunk's too."""
    i_h, i_g = block_program(VARLEN)
    i_m = tl.program_id(2)
    i_nh, i_c, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    D, E, stride_kb = aligned(D, AL), aligned(E, AV), aligned(stride_kb, AL)
    stride_kh, stride_kn, stride_vb = aligned(stride_kh, AL), aligned(stride_kn, AL), aligned(stride_vb, AV)
    stride_vh, stride_vn = aligned(stride_vh, AV), aligned(stride_vn, AV)
    o_t, m_t = block_range(i_c, BT, T)  # (BT,) this chunk's keys
    o_row = i_bh.to(tl.int64) * N + bos  # base of the sequence's (b*h, n) stat vectors
    # k_max 0 on padded rows (finite features), k_scale -inf there (0 weights)
    b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kscale = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
    r_loc = tl.max(b_kscale, axis=0)  # -inf for a chunk without rows (an empty packed sequence)
    m_first = i_m == 0
    tl.store(c_rloc + o_cs + i_c + 1, r_loc, mask=m_first)
    tl.store(c_sloc + o_cs + i_c + 1, tl.max(tl.where(m_t, b_kmax, float("-inf")), axis=0), mask=m_first)
    if i_c < NC - 1 + STATE:  # the last chunk's keys enter no stored state but the final one
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        o_d, m_d = block_range(0, BD, D)  # (BD,)
        o_v, m_v = block_range(0, BV, E)  # (BV,)
        m_vs = o_v < tl.where(m_first, E, 0)  # (BV,) the value sum: the first m tile's
        m_hv = m_m[:, None] & m_v[None, :]  # (BM, BV)
        p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
        p_v = bh_base(v, i_bh, H, stride_vb, stride_vh) + bos * stride_vn
        if BK == BD:
            b_p = load_fused_rows(p, o_m, m_m, D, o_d, m_d, BM, BD, FEATURE)  # (BM, BD)
        else:
            b_p = tl.zeros([BM, BK], dtype=p.dtype.element_ty)  # (BM, BK) unused: P read in chunks
        b_h, b_z, b_vs = _chunk_key_state(p_k, p_v, p, b_p, b_kmax, b_kscale, r_loc, o_t, m_t, D, stride_kn,
                                          stride_vn, o_d, m_d, o_m, m_m, o_v, m_v, dn, FEATURE, BT, BM, BD, BK,
                                          NK, PRECISION)  # (BM, BV), (BM,), (BV,)
        if i_c + 1 < NC:
            o_s = o_st + i_c + 1
            tl.store(h_own + o_s * M * E + o_m[:, None] * E + o_v[None, :], b_h.to(h_own.dtype.element_ty),
                     mask=m_hv)
            tl.store(z_state + o_s * M + o_m, b_z, mask=m_m)
            tl.store(v_state + o_s * E + o_v, b_vs, mask=m_vs)
        else:
            p_hf = hz_f + i_nh.to(tl.int64) * M * (E + 1) + o_m * (E + 1)  # (BM,) this tile's rows of [H | z]
            tl.store(p_hf[:, None] + o_v[None, :], b_h, mask=m_hv)
            tl.store(p_hf + E, b_z, mask=m_m)
            tl.store(vs_f + i_nh.to(tl.int64) * (E + 1) + o_v, b_vs, mask=m_vs)


@triton.jit
def _own_state(p_ho, z_state, v_state, c_rloc, c_sloc, o_st, o_cs, i_c, NC, M, E, o_m, m_m, o_v, m_vs):
    """What _chunk_state_kernel left for _state_scan_kernel at index i_c (>= 1): chunk i_c - 1's
    own state in slot i_c: (BM, BV) in h_own's dtype, (BM,) and (BV,) fp32 (0 from i_c = NC on:
    no slot), and its r and max of k_max (the chunk vectors' index i_c, NC + 1 of them: -inf past
    them)."""
    m_s = o_m * 0 + i_c < NC  # (BM,) vector masks: the interpreter rejects a scalar one broadcast to a tile
    m_sv = o_v * 0 + i_c < NC  # (BV,)
    o_s = o_st + i_c
    # in h_state's dtype: converted where it is used (converted here, the load's wait would be here too)
    b_hc = tl.load(p_ho + o_s * M * E, mask=(m_m & m_s)[:, None] & m_sv[None, :], other=0.0)
    b_zc = tl.load(z_state + o_s * M + o_m, mask=m_m & m_s, other=0.0)  # (BM,)
    b_vc = tl.load(v_state + o_s * E + o_v, mask=m_vs & m_sv, other=0.0)  # (BV,)
    r_loc = tl.load(c_rloc + o_cs + i_c, mask=i_c <= NC, other=float("-inf"))
    s_loc = tl.load(c_sloc + o_cs + i_c, mask=i_c <= NC, other=float("-inf"))
    return b_hc, b_zc, b_vc, r_loc, s_loc


@triton.jit
def _state_scan_kernel(
    c_rloc, c_sloc, c_ref, c_stab, h_own, h_state, z_state, v_state,
    hz0, vs0, ref0, stab0, hz_f, vs_f, ref_f, stab_f, cu_seqlens, chunk_first,
    H, N, M, E, NT, NS,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    STATE: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """State before every chunk c from the chunks' own (_chunk_state_kernel's), for one m tile:
    H_c = sum_{j < c BT} U_j exp(k_scale_j - R_c) v_j^T (stored in h_state's dtype; the chunks'
    own in h_own's slot c: h_state itself, over which it is written, or an fp32 buffer), z_c the
    same with v = 1 and vsum_c = sum_{j < c BT} v_j (fp32),
    R_c = max_{j < c BT} k_scale_j, and the chunk vectors (b*h, NT + 1) c_ref[c] = R_c and
    c_stab[c] = max_{j < c BT} k_max_j, c_stab[NT] = the max over every key (-inf before any),
    c_ref[NT] = R after every key (the first m tile).  A step rescales and adds (m tile, e)
    tiles that no step computes: the loads run ahead of the chain.

    STATE (NOTES "Attention state"): the scan starts from the state hz0 (b*h, M, E + 1) = [H | z],
    vs0 (b*h, E + 1) = [value sum | count], ref0, stab0 (b*h,) instead of no keys, and writes the
    state after the last chunk to hz_f, vs_f, ref_f, stab_f (fp32, same layout; hz_f and vs_f
    held the last chunk's own).
    VARLEN (NOTES "Packed sequences"): program row i_nh scans the NC chunks of sequence i_nh // H
    of a pack (feature_map.sequence_span: its state slots and chunk vectors)."""
    i_nh, i_m = tl.program_id(0), tl.program_id(1)
    E = aligned(E, AV)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    m_first = i_m == 0  # the value sum and the chunk vectors are written by the first m tile
    m_vs = o_v < tl.where(m_first, E, 0)  # (BV,)
    m_hv = m_m[:, None] & m_v[None, :]  # (BM, BV)
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    p_hs = h_state + o_m[:, None] * E + o_v[None, :]  # (BM, BV) this tile of chunk 0's state
    p_ho = h_own + o_m[:, None] * E + o_v[None, :]  # (BM, BV) the same in the chunks' own (h_state or fp32)
    if STATE:
        p_h0 = hz0 + i_nh.to(tl.int64) * M * (E + 1) + o_m * (E + 1)  # (BM,) this tile's rows of [H | z]
        b_h = tl.load(p_h0[:, None] + o_v[None, :], mask=m_hv, other=0.0).to(tl.float32)  # (BM, BV)
        b_z = tl.load(p_h0 + E, mask=m_m, other=0.0).to(tl.float32)  # (BM,)
        b_vs = tl.load(vs0 + i_nh.to(tl.int64) * (E + 1) + o_v, mask=m_v, other=0.0).to(tl.float32)  # (BV,)
        r_run = tl.load(ref0 + i_nh).to(tl.float32)  # R_0: the state's reference
        s_run = tl.load(stab0 + i_nh).to(tl.float32)  # its max of k_max
    else:
        b_h = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
        b_z = tl.zeros([BM], dtype=tl.float32)  # (BM,)
        b_vs = tl.zeros([BV], dtype=tl.float32)  # (BV,)
        r_run = tl.full([], float("-inf"), dtype=tl.float32)  # R_0: no keys yet
        s_run = tl.full([], float("-inf"), dtype=tl.float32)  # max of k_max over the keys so far
    store_state(p_hs + o_st * M * E, b_h, m_hv, PRECISION)
    tl.store(z_state + o_st * M + o_m, b_z, mask=m_m)
    tl.store(v_state + o_st * E + o_v, b_vs, mask=m_vs)
    tl.store(c_ref + o_cs, r_run, mask=m_first)
    tl.store(c_stab + o_cs, s_run, mask=m_first)
    # two steps ahead (slots 1 and 2 first): a step's loads have two steps to arrive, and loads
    # that feed no dot are otherwise synchronous
    b_hc, b_zc, b_vc, r_loc, s_loc = _own_state(p_ho, z_state, v_state, c_rloc, c_sloc, o_st, o_cs, 1, NC, M, E,
                                                o_m, m_m, o_v, m_vs)
    b_hn, b_zn, b_vn, r_next, s_next = _own_state(p_ho, z_state, v_state, c_rloc, c_sloc, o_st, o_cs, 2, NC, M,
                                                  E, o_m, m_m, o_v, m_vs)
    for i_c in range(1, NC):  # the state after chunk i_c - 1, over that chunk's own in slot i_c
        r_new, f_run, f_loc = merged_reference(r_run, r_loc)  # running maxima: every factor is <= 1
        b_h = b_h * f_run + b_hc.to(tl.float32) * f_loc
        b_z = b_z * f_run + b_zc * f_loc
        b_vs += b_vc
        s_run = tl.maximum(s_run, s_loc)
        r_run = r_new
        b_hc, b_zc, b_vc, r_loc, s_loc = b_hn, b_zn, b_vn, r_next, s_next
        b_hn, b_zn, b_vn, r_next, s_next = _own_state(p_ho, z_state, v_state, c_rloc, c_sloc, o_st, o_cs, i_c + 2,
                                                      NC, M, E, o_m, m_m, o_v, m_vs)
        o_s = o_st + i_c
        store_state(p_hs + o_s * M * E, b_h, m_hv, PRECISION)
        tl.store(z_state + o_s * M + o_m, b_z, mask=m_m)
        tl.store(v_state + o_s * E + o_v, b_vs, mask=m_vs)
        tl.store(c_ref + o_cs + i_c, r_run, mask=m_first)
        tl.store(c_stab + o_cs + i_c, s_run, mask=m_first)
    # the last chunk's keys (r_loc, s_loc: index NC): the global max, the reference after every
    # key, with STATE the final state
    r_new, f_run, f_loc = merged_reference(r_run, r_loc)
    s_run = tl.maximum(s_run, s_loc)
    tl.store(c_ref + o_cs + NC, r_new, mask=m_first)
    tl.store(c_stab + o_cs + NC, s_run, mask=m_first)
    if STATE:
        p_hf = hz_f + i_nh.to(tl.int64) * M * (E + 1) + o_m * (E + 1)  # (BM,) this tile's rows of [H | z]
        b_hc = tl.load(p_hf[:, None] + o_v[None, :], mask=m_hv, other=0.0)  # (BM, BV) the last chunk's own
        b_zc = tl.load(p_hf + E, mask=m_m, other=0.0)  # (BM,)
        tl.store(p_hf[:, None] + o_v[None, :], b_h * f_run + b_hc * f_loc, mask=m_hv)
        tl.store(p_hf + E, b_z * f_run + b_zc * f_loc, mask=m_m)
        p_vf = vs_f + i_nh.to(tl.int64) * (E + 1)
        b_vs += tl.load(p_vf + o_v, mask=m_vs, other=0.0)
        tl.store(p_vf + o_v, b_vs, mask=m_vs)
        n_before = tl.load(vs0 + i_nh.to(tl.int64) * (E + 1) + E).to(tl.float32)  # the state's key count
        tl.store(p_vf + E, n_before + T, mask=m_first)
        tl.store(ref_f + i_nh, r_new, mask=m_first)
        if FEATURE != FM_SOFTMAX:  # no stabilizer: M stays as the state had it (the decoder's -inf)
            s_run = tl.load(stab0 + i_nh).to(tl.float32)
        tl.store(stab_f + i_nh, s_run, mask=m_first)


@triton.jit
def _output_kernel(
    q, k, v, p, q_max, k_max, k_scale, c_ref, c_stab,
    h_state, z_state, v_state, out, rden, vs0, cu_seqlens, chunk_first, chunk_seq,
    H, N, M, D, E, NT, NS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    dn, k_eps, c_eps,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    NK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, PREFIX: tl.constexpr, STATE: tl.constexpr,
    AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """out_i = N_i / D_i for the BT queries of one chunk (NOTES "Causal forward"), and rden = 1 / D.
    BK == BD keeps the chunk's (BT, BD) q and k tiles in registers; BK < BD (fp32 heads wider
    than 64, where those tiles spill) reads them in BK-wide chunks per m tile (NOTES "Wide heads").
    STATE: the keys before the call count vs0[b*h, E] in the eps part (the state scan started
    from their sums)."""
    i_h, i_g = block_program(VARLEN)
    i_nh, i_c, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_qn, stride_kb = aligned(stride_qh, AL), aligned(stride_qn, AL), aligned(stride_kb, AL)
    stride_kh, stride_kn, stride_vb = aligned(stride_kh, AL), aligned(stride_kn, AL), aligned(stride_vb, AV)
    stride_vh, stride_vn = aligned(stride_vh, AV), aligned(stride_vn, AV)
    o_t, m_t = block_range(i_c, BT, T)  # (BT,) queries and keys of this chunk
    o_d, m_d = block_range(0, BD, D)  # (BD,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
    p_v = bh_base(v, i_bh, H, stride_vb, stride_vh) + bos * stride_vn
    o_row = i_bh.to(tl.int64) * N + bos  # base of the sequence's (b*h, n) stat vectors
    o_s = o_st + i_c  # this chunk's state
    if BK == BD:
        b_q = load_fused_rows(p_q, o_t, m_t, stride_qn, o_d, m_d, BT, BD, FEATURE)  # (BT, BD)
        b_k = load_fused_rows(p_k, o_t, m_t, stride_kn, o_d, m_d, BT, BD, FEATURE)  # (BT, BD)
        b_diag = half_sq_norm(b_q, dn)  # (BT,)
    else:
        b_diag = half_sq_norm_rows(p_q, o_t, m_t, stride_qn, D, dn, BT, BK, NK)  # (BT,)
    b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kscale = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
    b_stab = row_stabilizer(b_kmax, m_t, stab_before(c_stab, o_cs, i_c, NC, PREFIX), PREFIX)  # (BT,) M_i
    r_c = tl.load(c_ref + o_cs + i_c)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)  # (BT, BT) q~ . U
    b_n = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV) q~ @ H_c
    b_d = tl.zeros([BT], dtype=tl.float32)  # (BT,) q~ . z_c
    b_sq = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f q~
    b_z_next = load_vector(z_state + o_s * M, 0, BM, M)  # (BM,) prefetched one m tile ahead
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        if BK == BD:
            b_p = load_fused_rows(p, o_m, m_m, D, o_d, m_d, BM, BD, FEATURE)  # (BM, BD)
            b_qf, _ = features(p_q, b_q, b_p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, dn, FEATURE, True,
                               PRECISION)  # (BT, BM)
            b_kf, _ = features(p_k, b_k, b_p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, dn, FEATURE, False,
                               PRECISION)  # (BT, BM)
        else:
            b_qf, _ = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                                       FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM)
            b_kf, _ = features_chunked(p_k, p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, D, dn,
                                       FEATURE, False, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        b_s += dot(b_qf.to(v.dtype.element_ty), tl.trans(b_kf.to(v.dtype.element_ty)), None, PRECISION)
        if FEATURE == FM_GIVEN:  # triton 3.6 fails to compile the sum of a loaded fp32 dot operand
            b_sq += tl.sum(tl.where(m_m[None, :], b_qf, 0.0), axis=1)
        else:
            b_sq += tl.sum(b_qf, axis=1)
        b_h = load_rows(h_state + o_s * M * E, o_m, m_m, E, o_v, m_v).to(tl.float32)  # (BM, BV)
        b_z = b_z_next  # (BM,)
        b_z_next = load_vector(z_state + o_s * M, i_m + 1, BM, M)
        b_n += tl.dot(tf32_nearest(b_qf, PRECISION), b_h, input_precision=PRECISION)  # h stored rounded
        b_d += tl.sum(b_qf * b_z[None, :], axis=1)
    # inter-chunk: the state is referenced to r_c <= M_i; the eps part is a plain prefix sum
    b_a = tl.exp(r_c - b_stab)  # (BT,) <= 1
    b_vs = tl.load(v_state + o_s * E + o_v, mask=m_v, other=0.0)  # (BV,)
    b_n = b_a[:, None] * b_n + (k_eps * b_sq)[:, None] * b_vs[None, :]
    if STATE:
        n_before = tl.load(vs0 + i_nh.to(tl.int64) * (E + 1) + E).to(tl.float32)  # keys before the call
    else:
        n_before = 0.0
    b_d = b_a * b_d + k_eps * b_sq * (i_c * BT + n_before)
    # intra-chunk: W_ij = (q~_i . U_j) exp(k_scale_j - M_i) + eps sum(q~_i) for j <= i
    m_s = o_t[:, None] >= o_t[None, :]  # (BT, BT)
    b_f = tl.exp(tl.where(m_s, b_kscale[None, :] - b_stab[:, None], float("-inf")))  # (BT, BT) <= 1
    # selection, not b_f = 0: a NaN key later in the chunk must not reach earlier queries
    b_w = tl.where(m_s, b_s * b_f + (k_eps * b_sq)[:, None], 0.0)  # (BT, BT)
    b_d += tl.sum(b_w, axis=1) + c_eps * b_sq
    # the value tile only now: live across the m loop it cost fp32 heads 32 registers per thread
    b_v = load_rows(p_v, o_t, m_t, stride_vn, o_v, m_v)  # (BT, BV)
    # W / rowmax is in [0, 1] (>= eps for SOFTMAX): safe for a 16-bit tl.dot, no subnormals
    b_wmax = tl.max(b_w, axis=1)  # (BT,)
    b_wmax = tl.where(b_wmax > 0.0, b_wmax, 1.0)
    b_w = (b_w / b_wmax[:, None]).to(b_v.dtype)  # (BT, BT)
    # a non-finite value reaches rows from its own on: the dot takes finite values (0 * inf
    # would reach earlier rows), the running sum of the others is added (0 if there are none)
    b_vc = finite_or_zero(b_v)  # (BT, BV)
    b_n += b_wmax[:, None] * dot(b_w, b_vc, None, PRECISION)
    if tl.sum((b_v != b_vc).to(tl.int32)) > 0:  # rare: the scan's registers only on this branch
        b_n += tl.cumsum((b_v - b_vc).to(tl.float32), axis=0)
    b_rden = reciprocal_or_zero(b_d)  # (BT,) fp32; D = 0: GIVEN query features all zero, output 0
    store_rows(out, b_n * b_rden[:, None], o_row, o_t, m_t, o_v, m_v, E)
    tl.store(rden + o_row + o_t, b_rden, mask=m_t)


@triton.jit
def _dd_kernel(
    g, out, rden, dd,
    H, N, E,
    stride_gb, stride_gh, stride_gn, stride_ob, stride_oh, stride_on,
    BT: tl.constexpr, BV: tl.constexpr, AV: tl.constexpr,
):
    """dD_i = -rden_i (g_i . out_i) (b*h, n) fp32 for one chunk: what every backward kernel needs
    of out, read once here instead of by each of them.  Grid (b*h cdiv(n, BT),): row_block."""
    i_bh, i_c = row_block(BT, N)
    E, stride_gb, stride_gh = aligned(E, AV), aligned(stride_gb, AV), aligned(stride_gh, AV)
    stride_gn, stride_ob, stride_oh = aligned(stride_gn, AV), aligned(stride_ob, AV), aligned(stride_oh, AV)
    stride_on = aligned(stride_on, AV)
    o_t, m_t = block_range(i_c, BT, N)  # (BT,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    o_row = i_bh.to(tl.int64) * N
    b_g = load_rows(bh_base(g, i_bh, H, stride_gb, stride_gh), o_t, m_t, stride_gn, o_v, m_v).to(tl.float32)  # (BT, BV)
    b_o = load_rows(bh_base(out, i_bh, H, stride_ob, stride_oh), o_t, m_t, stride_on, o_v, m_v).to(tl.float32)  # (BT, BV)
    b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    tl.store(dd + o_row + o_t, -grad_dot_out(b_g, b_o) * b_rden, mask=m_t)


@triton.jit
def _chunk_dd(dd, o_row, i_c, BT: tl.constexpr, N):
    """dD (BT,) of chunk i_c's rows (0 past N and for i_c < 0)."""
    o_t, m_t = block_range(i_c, BT, N)  # (BT,)
    return tl.load(dd + o_row + o_t, mask=m_t & (o_t >= 0), other=0.0)


@triton.jit
def _chunk_query_state(p_q, p, p_g, b_dd, rden, q_max, k_max, o_row, i_c, c_min, e_ref, N, D, dn,
                       stride_qn, stride_gn, o_m, m_m, o_v, m_v, FEATURE: tl.constexpr,
                       BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
                       PRECISION: tl.constexpr, PREFIX: tl.constexpr):
    """What chunk i_c's queries (none if i_c < c_min) add to a reverse state referenced to e_ref, the
    stabilizer at the end of chunk i_c - 1 (<= their M_i): sum_i exp(e_ref - M_i) q~_i dN_i^T
    (BM, BV), the same with dD_i (BM,) (b_dd (BT,) the chunk's dD, loaded by the caller), and sum_i
    (sum_{f in tile} q~_if) dN_i (BV,), fp32."""
    o_t, m_t = block_range(i_c, BT, N)  # (BT,)
    m_t = m_t & (o_t * 0 + i_c >= c_min)  # a vector mask: the interpreter rejects a scalar one here
    b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_stab = row_stabilizer(b_kmax, m_t, e_ref, PREFIX)  # (BT,) +inf on masked rows: no weight
    b_diag = diag_rows(p_q, o_t, m_t, stride_qn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
    # q and P in BK-wide chunks: a resident (BT, d) q tile spills at d = 128 (sm_90)
    b_qf, _ = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                               FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM)
    b_g = load_rows(p_g, o_t, m_t, stride_gn, o_v, m_v).to(tl.float32)  # (BT, BV)
    b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_dn = b_g * b_rden[:, None]  # (BT, BV) dN
    b_dd = tl.where(m_t, b_dd, 0.0)  # (BT,) dD
    b_qq = b_qf * tl.exp(e_ref - b_stab)[:, None]  # (BT, BM), factor <= 1 (M non-decreasing)
    b_dhc = dot(tl.trans(b_qq), b_dn, None, PRECISION)  # (BM, BV)
    return b_dhc, tl.sum(b_qq * b_dd[:, None], axis=0), tl.sum(tl.sum(b_qf, axis=1)[:, None] * b_dn, axis=0)


@triton.jit
def _chunk_dstate_kernel(
    q, p, g, dd, rden, q_max, k_max, c_stab,
    dh_own, dz_state, dns_state, dhz0, dvs0, cu_seqlens, chunk_first, chunk_seq,
    H, N, M, D, E, NT, NS,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
    dn,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, PREFIX: tl.constexpr, STATE: tl.constexpr,
    AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """One chunk's own reverse state, for one m tile, every chunk at once (grid: block_grid's
    (b*h, chunks) or a pack's (chunk slots, h), then m tiles): sum_i exp(M0_c - M_i) q~_i dN_i^T
    over the chunk's queries, referenced to M0_c = stab_before the chunk, the same with dD_i, and
    sum_i (sum_{f in tile} q~_if) dN_i (_chunk_query_state).  Stored where _dstate_scan_kernel
    turns them into the reverse states: in the slot of the first state they enter (chunk c's in
    slot c - 1 of dh_own: the reverse states' buffer, or an fp32 one); chunk 0's (STATE only: the
    state before the call) in dhz0 (b*h, M, E + 1) = [dH | dz] and dvs0 (b*h, NM, E)."""
    i_h, i_g = block_program(VARLEN)
    i_m = tl.program_id(2)
    i_nh, i_c, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    if i_c < 1 - STATE:  # chunk 0's queries enter no stored state but the one before the call
        return
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_qn, stride_gb = aligned(stride_qh, AL), aligned(stride_qn, AL), aligned(stride_gb, AV)
    stride_gh, stride_gn = aligned(stride_gh, AV), aligned(stride_gn, AV)
    NM = tl.cdiv(M, BM)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_g = bh_base(g, i_bh, H, stride_gb, stride_gh) + bos * stride_gn
    o_row = i_bh.to(tl.int64) * N + bos  # base of the sequence's (b*h, n) stat vectors
    b_dh, b_dz, b_dns = _chunk_query_state(
        p_q, p, p_g, _chunk_dd(dd, o_row, i_c, BT, T), rden, q_max, k_max, o_row, i_c, 0,
        stab_before(c_stab, o_cs, i_c, NC, PREFIX), T, D, dn, stride_qn, stride_gn, o_m, m_m, o_v, m_v,
        FEATURE, BT, BM, BK, NK, PRECISION, PREFIX)  # (BM, BV), (BM,), (BV,)
    if i_c > 0:
        o_s = o_st + i_c - 1
        tl.store(dh_own + o_s * M * E + o_m[:, None] * E + o_v[None, :], b_dh.to(dh_own.dtype.element_ty),
                 mask=m_m[:, None] & m_v[None, :])
        tl.store(dz_state + o_s * M + o_m, b_dz, mask=m_m)
        tl.store(dns_state + (o_s * NM + i_m) * E + o_v, b_dns, mask=m_v)
    else:
        o_hz = i_nh.to(tl.int64) * M * (E + 1) + o_m * (E + 1)  # (BM,) this tile's rows of [dH | dz]
        tl.store(dhz0 + o_hz[:, None] + o_v[None, :], b_dh, mask=m_m[:, None] & m_v[None, :])
        tl.store(dhz0 + o_hz + E, b_dz, mask=m_m)
        tl.store(dvs0 + (i_nh.to(tl.int64) * NM + i_m) * E + o_v, b_dns, mask=m_v)


@triton.jit
def _own_dstate(p_do, dz_state, p_dns, c_stab, o_st, o_cs, i_c, NC, M, E, NM, o_m, m_m, o_v, m_v,
                PREFIX: tl.constexpr):
    """What _chunk_dstate_kernel left for _dstate_scan_kernel in slot i_c (>= -2): chunk i_c + 1's
    own reverse state, (BM, BV) in dh_own's dtype, (BM,) and (BV,) fp32 (0 below slot 0), and
    the reference of the state of slot i_c, M at the end of chunk i_c (stab_before chunk i_c + 1;
    slot -1: the state before the call's, stab_before chunk 0)."""
    m_s = o_m * 0 + i_c >= 0  # (BM,) vector masks: the interpreter rejects a scalar one broadcast to a tile
    m_sv = o_v * 0 + i_c >= 0  # (BV,)
    o_s = o_st + i_c
    # in dh_own's dtype: converted where it is used (converted here, the load's wait would be here too)
    b_dhc = tl.load(p_do + o_s * M * E, mask=(m_m & m_s)[:, None] & (m_v & m_sv)[None, :], other=0.0)
    b_dzc = tl.load(dz_state + o_s * M + o_m, mask=m_m & m_s, other=0.0)  # (BM,)
    b_dnsc = tl.load(p_dns + o_s * NM * E, mask=m_v & m_sv, other=0.0)  # (BV,)
    return b_dhc, b_dzc, b_dnsc, stab_before(c_stab, o_cs, tl.maximum(i_c + 1, 0), NC, PREFIX)


@triton.jit
def _dstate_scan_kernel(
    c_ref, c_stab, dh_own, dh_state, dz_state, dns_state, gh_f, gz_f, dhz0, dvs0, cu_seqlens, chunk_first,
    H, N, M, E, NT, NS,
    BT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, PREFIX: tl.constexpr,
    STATE: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """Reverse states for every chunk c from the chunks' own (_chunk_dstate_kernel's), for one m
    tile, over the queries after chunk c: dH_c = sum_i exp(Mend_c - M_i) q~_i dN_i^T (stored in
    dh_state's dtype; chunk c + 1's own in dh_own's slot c), dz_c = the same with dD_i, Mend_c = M at
    the chunk's last position (stab_before chunk c + 1); dns_c = sum_i (sum_{f in tile} q~_if) dN_i
    (partial over m tiles).  A step rescales and adds tiles that no step computes, their loads
    issued two steps ahead.

    STATE (a forward from a state, NOTES "Attention state"): the scan goes on over chunk 0's
    queries (their own in dhz0, dvs0) to the state before the call, and writes the initial state's
    gradients: dhz0 (b*h, M, E + 1) = exp(R0 - M0) [dH, dz]_-1 + exp(R0 - R_f) [gh_f, gz_f] (0 for
    an empty state, R0 = -inf; gh_f (b*h, M, E), gz_f (b*h, M) the final state's H and z
    gradients, R0 = c_ref[0], R_f = c_ref[NC]) and dvs0 (b*h, NM, E) this m tile's sum_i sq_i dN_i
    over every query (the launcher sums the tiles and scales by the eps)."""
    i_nh, i_m = tl.program_id(0), tl.program_id(1)
    E = aligned(E, AV)
    NM = tl.cdiv(M, BM)
    o_m, m_m = block_range(i_m, BM, M)  # (BM,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    m_hv = m_m[:, None] & m_v[None, :]  # (BM, BV)
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    p_dh = dh_state + o_m[:, None] * E + o_v[None, :]  # (BM, BV) this tile of chunk 0's state
    p_do = dh_own + o_m[:, None] * E + o_v[None, :]  # (BM, BV) the same in the chunks' own
    p_dns = dns_state + i_m * E + o_v  # (BV,) this tile's row of chunk 0's partial sums
    b_dh = tl.zeros([BM, BV], dtype=tl.float32)  # (BM, BV)
    b_dz = tl.zeros([BM], dtype=tl.float32)  # (BM,)
    b_dns = tl.zeros([BV], dtype=tl.float32)  # (BV,)
    o_s = o_st + NC - 1  # no queries after the last chunk
    store_state(p_dh + o_s * M * E, b_dh, m_hv, PRECISION)
    tl.store(dz_state + o_s * M + o_m, b_dz, mask=m_m)
    tl.store(p_dns + o_s * NM * E, b_dns, mask=m_v)
    e_prev = stab_before(c_stab, o_cs, NC, NC, PREFIX)  # M at the last key
    # two steps ahead (slots NC - 2 and NC - 3 first), as _state_scan_kernel
    b_dhc, b_dzc, b_dnsc, e_c = _own_dstate(p_do, dz_state, p_dns, c_stab, o_st, o_cs, NC - 2, NC, M, E, NM,
                                            o_m, m_m, o_v, m_v, PREFIX)
    b_dhn, b_dzn, b_dnsn, e_n = _own_dstate(p_do, dz_state, p_dns, c_stab, o_st, o_cs, NC - 3, NC, M, E, NM,
                                            o_m, m_m, o_v, m_v, PREFIX)
    for i_p in range(0, NC - 1):
        i_c = NC - 2 - i_p  # the state after chunk i_c, over chunk i_c + 1's own in slot i_c
        f_prev = merged_reference(e_c, e_prev)[1]  # exp(Mend_c - Mend_c+1) <= 1 (1 for the global stabilizer)
        b_dh = b_dh * f_prev + b_dhc.to(tl.float32)
        b_dz = b_dz * f_prev + b_dzc
        b_dns += b_dnsc
        e_prev = e_c
        b_dhc, b_dzc, b_dnsc, e_c = b_dhn, b_dzn, b_dnsn, e_n
        b_dhn, b_dzn, b_dnsn, e_n = _own_dstate(p_do, dz_state, p_dns, c_stab, o_st, o_cs, i_c - 2, NC, M, E, NM,
                                                o_m, m_m, o_v, m_v, PREFIX)
        o_s = o_st + i_c
        store_state(p_dh + o_s * M * E, b_dh, m_hv, PRECISION)
        tl.store(dz_state + o_s * M + o_m, b_dz, mask=m_m)
        tl.store(p_dns + o_s * NM * E, b_dns, mask=m_v)
    if STATE:  # e_c: M0 (stab_before chunk 0), the reference of the state before the call
        o_hz = i_nh.to(tl.int64) * M * (E + 1) + o_m * (E + 1)  # (BM,) this tile's rows of [dH | dz]
        p_dvs = dvs0 + (i_nh.to(tl.int64) * NM + i_m) * E + o_v  # (BV,)
        f_prev = merged_reference(e_c, e_prev)[1]
        b_dh = b_dh * f_prev + tl.load(dhz0 + o_hz[:, None] + o_v[None, :], mask=m_hv, other=0.0)  # + chunk 0's own
        b_dz = b_dz * f_prev + tl.load(dhz0 + o_hz + E, mask=m_m, other=0.0)
        b_dns += tl.load(p_dvs, mask=m_v, other=0.0)
        r_0 = tl.load(c_ref + o_cs)  # R0
        empty = r_0 == float("-inf")  # a state without keys: no gradient reaches it
        # the queries' part: 0 for a packed sequence without any (its relu stabilizer is -inf)
        f_0 = tl.where(empty | (T == 0), 0.0, tl.exp(r_0 - e_c))  # <= 1
        f_f = tl.where(empty, 0.0, tl.exp(r_0 - tl.load(c_ref + o_cs + NC)))  # exp(R0 - R_f) <= 1
        # the state tensors are per (b, h), or per (sequence, h) of a pack: row i_nh
        b_gh = load_rows(gh_f + i_nh.to(tl.int64) * M * E, o_m, m_m, E, o_v, m_v)  # (BM, BV)
        b_gz = tl.load(gz_f + i_nh.to(tl.int64) * M + o_m, mask=m_m, other=0.0)  # (BM,)
        tl.store(dhz0 + o_hz[:, None] + o_v[None, :], f_0 * b_dh + f_f * b_gh, mask=m_hv)
        tl.store(dhz0 + o_hz + E, f_0 * b_dz + f_f * b_gz, mask=m_m)
        tl.store(p_dvs, b_dns, mask=m_v)


@triton.jit
def _chunk_grads(
    p_v, p_g, dd, rden, k_scale, b_stab, o_row, o_t, m_t, o_v, m_v,
    stride_vn, stride_gn, PRECISION: tl.constexpr, KEY_ROWS: tl.constexpr,
):
    """What both backward kernels need of one chunk (NOTES "Backward"): v and g (BT, BV) in their
    dtype (dN = rden g is applied after the products: the 16-bit tiles keep half the registers),
    rden, dD (BT,), dw F (BT, BT): dw_ij = dN_i . v_j + dD_i times the intra factor
    F_ij = exp(k_scale_j - M_i) on visible pairs, 0 elsewhere, and sum_j dw_ij (BT,) per query.

    The pair tiles are (query i, key j), or (key j, query i) with KEY_ROWS, so that the key-side
    products need no transposed fp32 operand (which sm_80 builds through local memory)."""
    b_v = finite_or_zero(load_rows(p_v, o_t, m_t, stride_vn, o_v, m_v))  # (BT, BV) as the forward's intra dot
    b_g = load_rows(p_g, o_t, m_t, stride_gn, o_v, m_v)  # (BT, BV) input dtype
    b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_dd = tl.load(dd + o_row + o_t, mask=m_t, other=0.0)  # (BT,) dD (_dd_kernel)
    m_s, b_f = _pair_factor(k_scale, b_stab, o_row, o_t, m_t, KEY_ROWS)  # (BT, BT) x2
    # dw_ij = rden_i g_i . v_j + dD_i on visible pairs
    if KEY_ROWS:
        b_dw = dot(b_v, tl.trans(b_g), None, PRECISION)  # (BT, BT)
        b_dw = tl.where(m_s, b_rden[None, :] * b_dw + b_dd[None, :], 0.0)
        b_dws = tl.sum(b_dw, axis=0)  # (BT,)
    else:
        b_dw = dot(b_g, tl.trans(b_v), None, PRECISION)  # (BT, BT)
        b_dw = tl.where(m_s, b_rden[:, None] * b_dw + b_dd[:, None], 0.0)
        b_dws = tl.sum(b_dw, axis=1)  # (BT,)
    return b_v, b_g, b_rden, b_dd, _pair_operand(b_dw * b_f, b_v, PRECISION), b_dws


@triton.jit
def _pair_operand(b_x, b_v, PRECISION: tl.constexpr):
    """A tile that enters the backward's pair dots (dw F, and the features it multiplies):
    bf16 for bf16 inputs, as the forward's score tiles (16-bit operands: half the registers of
    the (BT, BT) tile), else fp32 rounded to TF32 (fp16 would overflow on an unbounded dw).
    b_v: the chunk's value tile, whose dtype is the inputs'."""
    if b_v.dtype == tl.bfloat16:
        b_x = b_x.to(tl.bfloat16)
    else:
        b_x = tf32_nearest(b_x, PRECISION)
    return b_x


@triton.jit
def _pair_factor(k_scale, b_stab, o_row, o_t, m_t, KEY_ROWS: tl.constexpr):
    """Visible-pair mask (BT, BT) and intra factor F (BT, BT) = exp(k_scale_j - M_i) on it (<= 1),
    0 elsewhere; rows are queries i, or keys j with KEY_ROWS.  b_stab (BT,) the chunk's M_i."""
    b_kscale = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
    if KEY_ROWS:
        m_s = (o_t[:, None] <= o_t[None, :]) & m_t[None, :]  # (BT, BT) rows j, columns i
        b_f = tl.exp(tl.where(m_s, b_kscale[:, None] - b_stab[None, :], float("-inf")))  # (BT, BT)
    else:
        m_s = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]  # (BT, BT) rows i, columns j
        b_f = tl.exp(tl.where(m_s, b_kscale[None, :] - b_stab[:, None], float("-inf")))  # (BT, BT)
    return m_s, b_f


@triton.jit
def _bwd_qk_kernel(
    q, k, v, p, g, dd, rden, q_max, k_max, k_scale, c_ref, c_stab,
    h_state, z_state, v_state, dx, vs0, gh_f, gz_f, cu_seqlens, chunk_first, chunk_seq,
    H, N, M, D, E, NT, NS, SE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    dn, k_eps, c_eps,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, PREFIX: tl.constexpr, KEYS: tl.constexpr,
    STATE: tl.constexpr, AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """dq (KEYS False) or dk (KEYS True) of one chunk's rows (NOTES "Backward"): the inter part
    through the forward states H_c, z_c, vsum_c (queries) or the reverse states dH_c, dz_c of the
    later queries (keys; passed as h_state, z_state), the intra part through the (BT, BT) tile.
    SE: the row stride of h_state and v_state (the forward's value width when a backward value
    slice reads the saved states' columns).
    Program (i_c NK + i_k) writes columns [i_k BK, i_k BK + BK) of dx (b*h, n, D) contiguous;
    GIVEN: all of dx (b*h, n, M) (NK = 1).
    STATE (a forward from a state): queries count the state's vs0[b*h, E] keys in the eps part;
    keys take the final state's H and z gradients gh_f (b*h, M, E), gz_f (b*h, M) with
    exp(k_scale_j - R_f) <= 1."""
    i_h, i_ck = block_program(VARLEN)
    i_g, i_k, o_k, m_k = column_slice(i_ck, NK, D, BK)  # (BK,) this program's columns of dx
    i_nh, i_c, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    D, E, SE = aligned(D, AL), aligned(E, AV), aligned(SE, AV)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, AL), aligned(stride_qh, AL), aligned(stride_qn, AL)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, AL), aligned(stride_kh, AL), aligned(stride_kn, AL)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, AV), aligned(stride_vh, AV), aligned(stride_vn, AV)
    stride_gb, stride_gh, stride_gn = aligned(stride_gb, AV), aligned(stride_gh, AV), aligned(stride_gn, AV)
    o_t, m_t = block_range(i_c, BT, T)  # (BT,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
    p_v = bh_base(v, i_bh, H, stride_vb, stride_vh) + bos * stride_vn
    p_g = bh_base(g, i_bh, H, stride_gb, stride_gh) + bos * stride_gn
    o_row = i_bh.to(tl.int64) * N + bos  # base of the sequence's (b*h, n) stat vectors
    o_s = o_st + i_c
    b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_stab = row_stabilizer(b_kmax, m_t, stab_before(c_stab, o_cs, i_c, NC, PREFIX), PREFIX)  # (BT,) M_i
    # b_dwf (BT, BT): rows i, columns j (queries) or rows j, columns i (keys)
    b_v, b_g, b_rden, b_dd, b_dwf, b_dws = _chunk_grads(
        p_v, p_g, dd, rden, k_scale, b_stab, o_row, o_t, m_t, o_v, m_v, stride_vn, stride_gn, PRECISION, KEYS)
    b_diag = diag_rows(p_q, o_t, m_t, stride_qn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
    if KEYS:
        b_kscale = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
        b_a = tl.exp(b_kscale - stab_before(c_stab, o_cs, i_c + 1, NC, PREFIX))  # (BT,) inter factor of the keys, <= 1
        if STATE:
            # (BT,) the final state's factor exp(k_scale_j - R_f) <= 1 (0 on padded rows)
            b_af = tl.where(m_t, tl.exp(b_kscale - tl.load(c_ref + o_cs + NC)), 0.0)
            p_gh = gh_f + i_nh.to(tl.int64) * M * E  # this head's (sequence's) H gradient (M, E)
            p_gz = gz_f + i_nh.to(tl.int64) * M  # and its z gradient (M,)
    else:
        b_a = tl.exp(tl.load(c_ref + o_cs + i_c) - b_stab)  # (BT,) inter factor of the queries
        b_vs = finite_or_zero(tl.load(v_state + o_s * SE + o_v, mask=m_v, other=0.0))  # (BV,)
        # constant-over-features part of dq~: eps of k~ (inter and intra) and the causal eps
        if STATE:
            n_before = i_c * BT + tl.load(vs0 + i_nh.to(tl.int64) * (E + 1) + E).to(tl.float32)  # keys before
        else:
            n_before = i_c * BT
        b_gvs = b_rden * tl.sum(b_g.to(tl.float32) * b_vs[None, :], axis=1)  # (BT,) dN . vsum_c
        b_c = k_eps * (b_gvs + b_dd * n_before + b_dws) + c_eps * b_dd  # (BT,)
        # dN @ H^T: a 16-bit g times states of its dtype is one exact dot, rden applied to the
        # product (the 16-bit tile holds half the registers of dN); otherwise dN in fp32, rounded
        # to TF32 once (fp16 g with bf16 states converted per m tile spilled 12-20 B, d = 128)
        if b_g.dtype == h_state.dtype.element_ty and b_g.dtype != tl.float32:
            b_dn = b_g  # (BT, BV)
        else:
            b_dn = tf32_nearest(b_g.to(tl.float32) * b_rden[:, None], PRECISION)  # (BT, BV) dN
    b_dx = tl.zeros([BT, BK], dtype=tl.float32)  # (BT, BK) du @ P[:, o_k]
    b_rs = tl.zeros([BT], dtype=tl.float32)  # (BT,) rowsum du
    b_z_next = load_vector(z_state + o_s * M, 0, BM, M)  # (BM,) prefetched one m tile ahead
    if KEYS and STATE:
        b_gz_next = load_vector(p_gz, 0, BM, M)  # (BM,) as b_z_next
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_qf, b_qaux = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                                        FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM) x2
        b_kf, b_kaux = features_chunked(p_k, p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, D, dn,
                                        FEATURE, False, BT, BM, BK, NK, PRECISION)  # (BT, BM) x2
        # the state, transposed: H_c^T (queries) or dH_c^T (keys), loaded so
        # (a non-finite value poisons the forward states of later chunks only; their rows'
        # gradients are 0 or the outputs' own inf / NaN)
        b_ht = finite_or_zero(load_rows(h_state + o_s * M * SE, o_v, m_v, 1, o_m * SE, m_m))  # (BV, BM) as stored
        b_z = b_z_next  # (BM,)
        b_z_next = load_vector(z_state + o_s * M, i_m + 1, BM, M)
        if KEYS:
            # dk~ = a (v @ dH^T + dz) + (dw F)^T @ q~
            b_df = state_dot(b_v, b_ht, PRECISION) + b_z[None, :]  # (BT, BM)
            b_df = b_a[:, None] * b_df
            if STATE:  # + exp(k_scale_j - R_f) (v @ dH_f^T + dz_f)
                b_gt = load_rows(p_gh, o_v, m_v, 1, o_m * E, m_m)  # (BV, BM) dH_f^T
                b_gz = b_gz_next  # (BM,)
                b_gz_next = load_vector(p_gz, i_m + 1, BM, M)
                # (dH_f, the caller's, enters truncated: rounding it here spilled 8-16 B in packs)
                b_gf = state_dot(b_v, b_gt, PRECISION) + b_gz[None, :]  # (BT, BM)
                b_df += b_af[:, None] * b_gf
            if b_v.dtype == tl.bfloat16:
                b_qp = _pair_operand(b_qf, b_v, PRECISION)  # (BT, BM)
            else:  # (fp32 q~ enters truncated: rounding it here spilled 16-24 B in fp16 packs from a state)
                b_qp = b_qf
            b_df = tl.dot(b_dwf, b_qp, b_df, input_precision=PRECISION)  # accumulates in place
            b_aux = b_kaux
        else:
            # dq~ = a (dN @ H^T + dD z) + (dw F) @ U + const
            b_df = state_dot(b_dn, b_ht, PRECISION)  # (BT, BM)
            if b_dn.dtype != tl.float32:  # g itself: rden after the product
                b_df = b_rden[:, None] * b_df
            b_df += b_dd[:, None] * b_z[None, :]
            b_df = tl.dot(b_dwf, _pair_operand(b_kf, b_v, PRECISION), b_a[:, None] * b_df + b_c[:, None],
                          input_precision=PRECISION)
            b_aux = b_qaux
        b_dx, b_rs = input_grad_tile(dx, b_df, b_aux, b_dx, b_rs, p, o_row, o_t, m_t, o_m, m_m, M, o_k, m_k, D,
                                     FEATURE, PRECISION)
    if FEATURE != FM_GIVEN:
        if KEYS:
            p_x, stride_xn = p_k, stride_kn
        else:
            p_x, stride_xn = p_q, stride_qn
        store_input_grad(dx, p_x, b_dx, b_rs, o_row, o_t, m_t, stride_xn, o_k, m_k, D, dn, FEATURE)


@triton.jit
def _bwd_v_kernel(
    q, k, p, g, dd, rden, q_max, k_max, k_scale, c_ref, c_stab, dh_state, dns_state, dv, gh_f, dvs_f, dcount,
    cu_seqlens, chunk_first, chunk_seq,
    H, N, M, D, E, NT, NS, NMD,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_gb, stride_gh, stride_gn,
    dn, k_eps,
    FEATURE: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, PREFIX: tl.constexpr, STATE: tl.constexpr,
    AL: tl.constexpr, AV: tl.constexpr, VARLEN: tl.constexpr,
):
    """dv of one chunk's keys (NOTES "Backward"): inter (U kfac) @ dH_c + eps dns_c, intra
    W^T @ dN with the forward's (BT, BT) weights W.  dv is (b*h, n, E) contiguous.
    STATE (a forward from a state): + (U exp(k_scale - R_f)) @ gh_f + dvs_f[:E], the final
    state's gradients gh_f (b*h, M, E) and dvs_f (b*h, E + 1); and the chunk's part of the state's
    key-count gradient, dcount (b*h, NT) = sum_i sq_i dD_i over its queries (sq_i = sum_f q~_if,
    which W needs anyway; the launcher sums each sequence's chunks and scales by the eps).  Packed
    (VARLEN): the state tensors have a row per (sequence, head)."""
    i_h, i_g = block_program(VARLEN)
    i_nh, i_c, i_n = chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN)
    if i_n >= NS:  # a chunk slot past the packed batch's last sequence
        return
    i_bh, bos, T, NC, o_st, o_cs = sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT, VARLEN)
    D, E, stride_qb = aligned(D, AL), aligned(E, AV), aligned(stride_qb, AL)
    stride_qh, stride_qn, stride_kb = aligned(stride_qh, AL), aligned(stride_qn, AL), aligned(stride_kb, AL)
    stride_kh, stride_kn, stride_gb = aligned(stride_kh, AL), aligned(stride_kn, AL), aligned(stride_gb, AV)
    stride_gh, stride_gn = aligned(stride_gh, AV), aligned(stride_gn, AV)
    o_t, m_t = block_range(i_c, BT, T)  # (BT,)
    o_v, m_v = block_range(0, BV, E)  # (BV,)
    o_row = i_bh.to(tl.int64) * N + bos  # base of the sequence's (b*h, n) stat vectors
    o_s = o_st + i_c
    p_q = bh_base(q, i_bh, H, stride_qb, stride_qh) + bos * stride_qn
    p_k = bh_base(k, i_bh, H, stride_kb, stride_kh) + bos * stride_kn
    p_g = bh_base(g, i_bh, H, stride_gb, stride_gh) + bos * stride_gn
    b_diag = diag_rows(p_q, o_t, m_t, stride_qn, D, dn, FEATURE, BT, BK, NK)  # (BT,)
    b_qmax = tl.load(q_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kmax = tl.load(k_max + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_kscale = tl.load(k_scale + o_row + o_t, mask=m_t, other=float("-inf"))  # (BT,)
    b_kfac = tl.exp(b_kscale - stab_before(c_stab, o_cs, i_c + 1, NC, PREFIX))  # (BT,) inter factor of the keys, <= 1
    b_stab = row_stabilizer(b_kmax, m_t, stab_before(c_stab, o_cs, i_c, NC, PREFIX), PREFIX)  # (BT,) M_i
    if STATE:
        b_af = tl.where(m_t, tl.exp(b_kscale - tl.load(c_ref + o_cs + NC)), 0.0)  # (BT,) exp(k_scale_j - R_f)
        p_gh = gh_f + i_nh.to(tl.int64) * M * E  # this head's (sequence's) H gradient (M, E)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)  # (BT, BT) U_j . q~_i (rows j)
    b_sq = tl.zeros([BT], dtype=tl.float32)  # (BT,) sum_f q~_i
    b_dns = tl.zeros([BV], dtype=tl.float32)  # (BV,) sum over later queries of sum(q~) dN
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # (BT, BV)
    NM = tl.cdiv(M, BM)
    # (NMD, E) partial eps sums of this chunk, one row per m tile of the reverse states (NMD <= NM:
    # its tiles are no narrower), summed one row per iteration, prefetched one ahead
    p_dns = dns_state + o_s * NMD * E
    b_dns_next = tl.load(p_dns + o_v, mask=m_v, other=0.0)  # (BV,)
    for i_m in range(0, NM):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_qf, _ = features_chunked(p_q, p, b_diag, b_qmax, o_t, m_t, stride_qn, o_m, m_m, D, dn,
                                   FEATURE, True, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        b_kf, _ = features_chunked(p_k, p, b_kmax, b_kmax, o_t, m_t, stride_kn, o_m, m_m, D, dn,
                                   FEATURE, False, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        b_s += dot(b_kf.to(p_q.dtype.element_ty), tl.trans(b_qf.to(p_q.dtype.element_ty)), None, PRECISION)
        b_sq += tl.sum(b_qf, axis=1)
        b_dh = load_rows(dh_state + o_s * M * E, o_m, m_m, E, o_v, m_v).to(tl.float32)  # (BM, BV)
        b_dns += b_dns_next
        o_dns = (i_m + 1) * E + o_v  # (BV,) the next row, none past the last
        b_dns_next = tl.load(p_dns + o_dns, mask=m_v & (o_dns < NMD * E), other=0.0)
        b_dv += tl.dot(tf32_nearest(b_kf * b_kfac[:, None], PRECISION), b_dh, input_precision=PRECISION)  # dh rounded
        if STATE:
            b_gh = load_rows(p_gh, o_m, m_m, E, o_v, m_v)  # (BM, BV) dH_f
            b_dv += dot(b_kf * b_af[:, None], b_gh, None, PRECISION)
    m_s, b_f = _pair_factor(k_scale, b_stab, o_row, o_t, m_t, True)  # (BT, BT) rows j
    b_w = tl.where(m_s, b_s * b_f + (k_eps * b_sq)[None, :], 0.0)  # (BT, BT) W^T: rows j, columns i
    b_rden = tl.load(rden + o_row + o_t, mask=m_t, other=0.0)  # (BT,)
    b_dn = load_rows(p_g, o_t, m_t, stride_gn, o_v, m_v).to(tl.float32) * b_rden[:, None]  # (BT, BV) dN
    b_dv += dot(b_w, b_dn, None, PRECISION) + k_eps * b_dns[None, :]
    if STATE:
        b_dv += tl.load(dvs_f + i_nh.to(tl.int64) * (E + 1) + o_v, mask=m_v, other=0.0)[None, :]
        b_dd = tl.load(dd + o_row + o_t, mask=m_t, other=0.0)  # (BT,) dD
        tl.store(dcount + o_s, tl.sum(b_sq * b_dd, axis=0))
    store_rows(dv, b_dv, o_row, o_t, m_t, o_v, m_v, E)


@host_cache
def _config(d: int, e: int, m: int, dtype: torch.dtype, *, packed: bool, long_chunks: bool) -> dict:
    """feature_map.block_config plus the causal kernels' own: the output kernel reads whole
    states with its own, smallest m tile (BM_out); it and the state kernel keep whole (BT, BD)
    q and k tiles in 16 bits; fp32 reads them in BK_out-wide chunks, NK_out of them (heads up to
    64: chunks of 16, whose 3xTF32 split halves are what fits; resident tiles spilled 300-900 B;
    wider: 32, chosen when the state walk took two chunks per step and spilled 100 B at 64); the backward
    kernels take m tiles of 16 (at 32 the gradient kernels spill once their loads are prefetched).
    long_chunks (the call's, _long_chunks): chunks (BT) of 128 rows, whose pair-tile kernels
    (output, gradients) run 8 warps, two warpgroups of 64 rows.  Otherwise 64-row chunks and 4
    warps where a warpgroup spans the BT = 64 rows of every dot (8 computed each dot twice:
    compile report, duplication); the forward kernels of 128-wide tiles
    (d or e > 64) keep 8, whose halved per-thread share of those tiles is what keeps them from
    spilling (100-460 B at 4 warps, every dtype).  d = 0 for GIVEN.
    packed (cu_seqlens): the key and reverse states take m tiles of 16: a packed sequence's
    length, chunk count and bases are values a program keeps (an unpacked one reads N, NT as
    arguments), and at 32 those registers spilled 4-32 B in the walks the chunk passes and scans
    replaced (16-bit, d = e = 64; NOTES "Packed sequences"; not re-swept since)."""
    cfg = block_config(d, e, m, dtype)
    if packed:
        cfg["BM"] = 16
    BD = cfg["BD"]
    BK_out = min(BD, 16 if BD <= 64 else 32) if dtype == torch.float32 else BD
    BM_bwd = 16
    wide = max(BD, cfg["BV"]) > 64
    if long_chunks:
        cfg["BT"] = 128
    return cfg | dict(
        long_chunks=long_chunks,
        BM_out=16,
        BK_out=BK_out,
        NK_out=1 if BK_out == BD else cdiv(d, BK_out),
        BM_bwd=BM_bwd,
        # the reverse states take the key states' m tile (16-bit 32: at 16 sm_80's mma.sync lays
        # its 4 warps along the 16 columns of the query-feature tile, duplication 2), except for
        # GIVEN features, whose (BT, 32) feature tiles of two chunks spilled 80 B (sm_90a) in the
        # reverse walk the chunk pass and scan replaced
        BM_dstate=BM_bwd if d == 0 or packed else cfg["BM"],
        # the (m, e) states of every chunk: bf16 for bf16 inputs (half the bytes of the largest
        # intermediates, rounded as the inputs are), fp32 for fp32 and for fp16 fused-map heads up
        # to 64 wide, packed or not (bf16 rounding cost fp16 2-5x of its accuracy, ~10x in a pack's
        # first rows after its initial state; wider heads and given features spill with fp32
        # states) (kernels/NOTES.md "State precision")
        state_dtype=torch.float32 if dtype == torch.float32 or (dtype == torch.float16 and 0 < d and max(d, e) <= 64)
        else torch.bfloat16,
        # the key states' chunk pass and scan: 4 warps, 8 for wide heads; the reverse states': 4
        num_warps=8 if wide else 4,
        num_warps_dstate=4,
        # the kernels with (BT, BT) pair tiles: 8 warps for chunks of 128 rows (two warpgroups of
        # 64 rows each: 4 warps would hold twice the registers per thread) and for wide heads
        num_warps_out=8 if wide or long_chunks else 4,
        num_warps_bwd=8 if long_chunks else 4,
    )


def _kernel_stats(
    q_max: torch.Tensor, k_max: torch.Tensor, k_scale: torch.Tensor, shape: tuple, device, feature: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (b, h, n) fp32 vectors the kernels read: (q_max, k_max, k_scale); zeros for RELU and
    GIVEN, which have no stabilizer (every exp factor is 1)."""
    if feature != SOFTMAX:
        zeros = torch.zeros(shape, device=device, dtype=torch.float32)
        return zeros, zeros, zeros
    return q_max, k_max, k_scale


def _eps(feature: int, m: int, causal_eps: float) -> tuple[float, float]:
    """(k_eps, c_eps): the eps inside ratio-free key features, and the causal denominator eps
    in ratio-free form (causal_eps / ratio for SOFTMAX)."""
    return (SOFTMAX_EPS if feature == SOFTMAX else 0.0), causal_coef(feature, m, causal_eps)


def saved_states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, *,
                 feature: int, prefix: bool, cu_seqlens: torch.Tensor | None = None,
                 state: bool = False) -> list[torch.Tensor]:
    """Empty buffers of the key states causal_fwd (causal_fwd_state: state) returns for the
    backward (its fake tensors too): H (b*h, NT, m, e) in the config's state dtype; z (b*h, NT,
    m), vsum (b*h, NT, e) and the chunk vectors c_ref, c_stab (b*h, NT + NS) in fp32 (NT chunk
    slots of the call's chunk size, NS sequences: feature_map.chunk_slots)."""
    b, h, n, _ = k.shape
    e = v.shape[-1]
    m = feature_dims(q, projection, feature)[0]
    cfg = _call_config(q, v, projection, feature, prefix, cu_seqlens is not None, state)
    nt, ns = chunk_slots(cu_seqlens, cfg["BT"], n)
    f32 = dict(device=k.device, dtype=torch.float32)
    states = [
        torch.empty((b * h, nt, m, e), device=k.device, dtype=cfg["state_dtype"]),
        torch.empty((b * h, nt, m), **f32),
        torch.empty((b * h, nt, e), **f32),
        torch.empty((b * h, nt + ns), **f32),
        torch.empty((b * h, nt + ns), **f32),
    ]
    if cu_seqlens is not None:
        # a pack's slots past its sequences' (at most NS: they use >= cdiv(n, BT)) are never
        # written: zeros, so that the op's outputs are a function of its inputs (opcheck)
        for t in states:
            t[:, -ns:].zero_()
    return states


def _long_chunks(d: int, e: int, dtype: torch.dtype, *, prefix: bool, state: bool) -> bool:
    """Whether a call (d = 0: GIVEN; e its whole value width; prefix the normalised one, softmax
    only; state: from or to an attention state) runs chunks of 128 rows: bf16 heads up to 64 wide
    with fused maps and the global stabilizer, from no state (the benchmark's and 1.1.4's
    default; packs too): half the chunk states of 64-row chunks (the state traffic of a causal
    call) and half the scan steps.  The rest keep 64-row chunks, each for what its compile showed
    at 128 (kernels/NOTES.md "Thirteenth pass"): fp16 and fp32 pair tiles are TF32
    (_pair_operand) and spill; the prefix stabilizer's per-row references spill 8-72 B (sm_90a),
    relu from a state 4 B, given features 72-76 B (sm_80)."""
    return dtype == torch.bfloat16 and 0 < d <= 64 and e <= 64 and not prefix and not state


def _call_config(q, v, projection, feature: int, prefix: bool, packed: bool, state: bool) -> dict:
    """_config of one call, its forward's and its backward's (a backward in value slices takes the
    call's chunks: _bwd_slice)."""
    m, d = feature_dims(q, projection, feature)
    long = _long_chunks(d, v.shape[-1], q.dtype, prefix=prefix and feature == SOFTMAX, state=state)
    return _config(d, v.shape[-1], m, q.dtype, packed=packed, long_chunks=long)


def _own_states(states: torch.Tensor, state: bool, dtype: torch.dtype) -> torch.Tensor:
    """Where the chunk passes leave every chunk's own (m, e) state for the scans: the states'
    buffer itself, which the scan then overwrites; with an initial or final state (state) of fp16
    inputs whose states are bf16 (wider heads, given features: _config), an fp32 buffer, so
    that the state the call returns (or its gradient) sums unrounded parts, as the walk's registers
    did (bf16 parts made an fp16 pack's final state ~20x less accurate: 3e-3 against float64, past
    fp16's own rounding; for bf16 inputs it is theirs, and the buffer would triple the states'
    memory for nothing)."""
    if not state or states.dtype != torch.bfloat16 or dtype != torch.float16:
        return states
    return torch.empty(states.shape, device=states.device, dtype=torch.float32)


def _key_states(q, k, v, projection, k_max, k_scale, *, feature: int, prefix: bool, m: int, d: int, cfg: dict,
                packing: tuple, initial=None, cu_seqlens=None):
    """Run _chunk_state_kernel and _state_scan_kernel into saved_states' buffers; from the state
    initial (hz, v_sum, ref, stab: performer_triton.attention_state) when given.  -> (saved
    states, the state after the last chunk in fp32, or [])."""
    b, h, n, _ = k.shape
    e = v.shape[-1]
    nt, ns, varlen, is_varlen = packing
    states = saved_states(q, k, v, projection, feature=feature, prefix=prefix, cu_seqlens=cu_seqlens,
                          state=initial is not None)
    h_state, z_state, v_state, c_ref, c_stab = states
    c_rloc, c_sloc = c_ref.new_empty((2, *c_ref.shape))  # each chunk's own r and max of k_max (one allocation)
    h_own = _own_states(h_state, initial is not None, k.dtype)
    final = []
    if initial is not None:
        final = [torch.empty(t.shape, device=k.device, dtype=torch.float32) for t in initial]
    state_args = (*initial, *final) if initial is not None else (c_ref,) * 8  # (unused without STATE)
    opts = launch_options(cfg, "state")
    launch(
        _chunk_state_kernel, (*block_grid(b * h, nt, is_varlen), cdiv(m, cfg["BM"])),
        k, v, k if projection is None else projection, k_max, k_scale, c_rloc, c_sloc,
        h_own, z_state, v_state, *state_args[4:6], *varlen,
        h, n, m, d, e, nt, ns,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        head_scale(d),
        FEATURE=feature, STATE=initial is not None, AL=alignment(d, k), AV=alignment(e, v),
        VARLEN=is_varlen, **opts | dict(BK=cfg["BK_out"], NK=cfg["NK_out"]),
    )
    launch(
        _state_scan_kernel, (b * h * ns, cdiv(m, cfg["BM"])),
        c_rloc, c_sloc, c_ref, c_stab, h_own, h_state, z_state, v_state, *state_args, *varlen[:2],
        h, n, m, e, nt, ns,
        FEATURE=feature, BT=cfg["BT"], BM=cfg["BM"], BV=cfg["BV"], PRECISION=opts["PRECISION"],
        STATE=initial is not None, AV=alignment(e), VARLEN=is_varlen,
        num_warps=opts["num_warps"], num_stages=opts["num_stages"],
    )
    return states, final


def causal_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, *, feature: int,
    prefix: bool = False, causal_eps: float = CAUSAL_EPS, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Causal FAVOR+ forward.  q, k (b, h, n, d) [GIVEN: features (b, h, n, m)], v (b, h, n, e),
    projection (m, d) or None (GIVEN).  prefix selects the leak-free key stabilizer; causal_eps
    is added to every key-feature prefix sum of the normaliser.

    Returns out (b, h, n, e) in q's dtype, q_max, k_max, k_scale (b, h, n) fp32 (SOFTMAX;
    (b, h, 0) otherwise), rden (b, h, n) fp32 = 1 / denominator (ratio-free form) and the key
    states (saved_states) for causal_bwd.
    cu_seqlens (NS + 1,) int32: q, k, v (1, h, n, .) hold NS packed sequences, each attending
    within itself with its own stabilizers (NOTES "Packed sequences").
    Launches: row_stats (SOFTMAX), _chunk_state_kernel, _state_scan_kernel, _output_kernel.
    """
    return _forward(q, k, v, projection, feature, prefix, causal_eps, None, cu_seqlens)[:6]


def causal_fwd_state(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, initial: list[torch.Tensor],
    *, feature: int, prefix: bool = False, causal_eps: float = CAUSAL_EPS, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """causal_fwd from the state initial = [hz (b, h, m, e + 1), v_sum (b, h, e + 1), ref, stab
    (b, h)] (performer_triton.attention_state; NOTES "Attention state").  Returns out, q_max,
    k_max, k_scale, rden, the key states as causal_fwd (for causal_bwd_state) and the state after
    the last key (fp32, initial's layout).  cu_seqlens: a pack as causal_fwd's, the states per
    sequence ((N, h, ...))."""
    reason = extension_unsupported("a state", q.dtype, feature, 0 if projection is None else q.shape[-1], v.shape[-1])
    if reason is not None:
        raise ValueError(f"causal_fwd_state: {reason}")
    hz0, v_sum0, ref0, stab0 = initial
    initial = [_relu_units(hz0, v_sum0, feature, 1.0), v_sum0, ref0, stab0]
    *outs, (hz, v_sum, ref, stab) = _forward(q, k, v, projection, feature, prefix, causal_eps, initial, cu_seqlens)
    return (*outs, [_relu_units(hz, v_sum, feature, -1.0), v_sum, ref, stab])


def _relu_units(hz: torch.Tensor, v_sum: torch.Tensor, feature: int, sign: float) -> torch.Tensor:
    """An AttentionState's hz in the kernels' form (sign 1) or back (-1).  The kernels' RELU key
    units carry the feature eps (relu + eps: no separate eps part, k_eps = 0), the state's do not
    (relu alone, the eps part in v_sum: the PyTorch path's and the decoder's form), so the
    kernels' hz = the state's + eps [sum v, count] in every feature row (R = 0: no factor).  The
    other maps: hz as it is."""
    if feature != RELU:
        return hz
    return torch.add(hz, v_sum[..., None, :].to(hz.dtype), alpha=sign * GENERALIZED_EPS)


def _forward(q, k, v, projection, feature: int, prefix: bool, causal_eps: float, initial, cu_seqlens):
    m, d = check_inputs(q, k, v, projection, feature, cu_seqlens)
    if initial is not None:
        initial = [t.contiguous() for t in initial]
    b, h, n, _ = q.shape
    e = v.shape[-1]
    assert k.shape[2] == n
    prefix = prefix and feature == SOFTMAX  # the other maps have no stabilizer
    cfg = _call_config(q, v, projection, feature, prefix, cu_seqlens is not None, initial is not None)
    if feature == SOFTMAX:
        saved = row_stats(q, k, projection)
    else:
        saved = empty_stats(b, h, q.device)
    q_max, k_max, k_scale = _kernel_stats(*saved, (b, h, n), q.device, feature)
    k_eps, c_eps = _eps(feature, m, causal_eps)
    packing = packing_args(cu_seqlens, cfg["BT"], n, k_scale)
    states, final = _key_states(q, k, v, projection, k_max, k_scale, feature=feature, prefix=prefix, m=m, d=d, cfg=cfg,
                                initial=initial, cu_seqlens=cu_seqlens, packing=packing)
    h_state, z_state, v_state, c_ref, c_stab = states
    out = torch.empty((b, h, n, e), device=q.device, dtype=q.dtype)
    rden = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    nt, ns, varlen, is_varlen = packing
    launch(
        _output_kernel, block_grid(b * h, nt, is_varlen),
        q, k, v, q if projection is None else projection, q_max, k_max, k_scale, c_ref, c_stab,
        h_state, z_state, v_state, out, rden, rden if initial is None else initial[1], *varlen,
        h, n, m, d, e, nt, ns,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        head_scale(d), k_eps, c_eps,
        FEATURE=feature, PREFIX=prefix, STATE=initial is not None, AL=alignment(d, q, k), AV=alignment(e, v),
        VARLEN=is_varlen, **launch_options(cfg, "out", BK=cfg["BK_out"], NK=cfg["NK_out"]),
    )
    return (out, *saved, rden, states, final)


def causal_bwd_state(
    grad_out: torch.Tensor, grad_hz: torch.Tensor | None, grad_v_sum: torch.Tensor | None, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None, out: torch.Tensor, q_max: torch.Tensor,
    k_max: torch.Tensor, k_scale: torch.Tensor, rden: torch.Tensor, states: list[torch.Tensor],
    initial: list[torch.Tensor], *, feature: int, prefix: bool = False, causal_eps: float = CAUSAL_EPS,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """causal_bwd of causal_fwd_state: grad_hz (b, h, m, e + 1), grad_v_sum (b, h, e + 1) the final
    state's gradients (None: it had none), states and initial as causal_fwd_state took and
    returned them.  -> dq, dk, dv as causal_bwd and the initial state's d hz, d v_sum (fp32; NOTES
    "Attention state").  Launches: causal_bwd's, plus small torch ops on state-sized tensors (the
    final state's gradient in contiguous pieces, the sums of the eps partials)."""
    check_unit_stride(grad_out=grad_out, out=out)
    b, h, n, _ = q.shape
    e = v.shape[-1]
    m, d = feature_dims(q, projection, feature)
    reason = extension_unsupported("a state", q.dtype, feature, d, e)
    if reason is not None:
        raise ValueError(f"causal_bwd_state: {reason}")
    f32 = dict(device=q.device, dtype=torch.float32)
    rows = initial[1].shape[0]  # b, or the pack's sequences
    grad_hz = torch.zeros((rows, h, m, e + 1), **f32) if grad_hz is None else grad_hz.float()
    grad_v_sum = torch.zeros((rows, h, e + 1), **f32) if grad_v_sum is None else grad_v_sum.float()
    grad_v_sum_k = grad_v_sum  # the kernels' final v_sum gradient
    if feature == RELU:  # the final hz = the kernels' - eps v_sum (_relu_units)
        grad_v_sum_k = grad_v_sum - GENERALIZED_EPS * grad_hz.sum(2)
    stats = _kernel_stats(q_max, k_max, k_scale, (b, h, n), q.device, feature)
    prefix = prefix and feature == SOFTMAX
    cfg = _call_config(q, v, projection, feature, prefix, cu_seqlens is not None, True)
    assert e <= cfg["EV"]  # one value slice (extension_unsupported: heads up to 64)
    packing = packing_args(cu_seqlens, cfg["BT"], n, rden)
    d_hz0 = torch.empty((rows, h, m, e + 1), **f32)
    d_vs0 = torch.empty((rows, h, cdiv(m, cfg["BM_dstate"]), e), **f32)  # per reverse-walk m tile
    d_count = torch.zeros((b * h, packing[0]), **f32)  # per chunk slot (a pack's unused ones stay 0)
    state = (initial[1].contiguous(), grad_hz[..., :e].contiguous(), grad_hz[..., e].contiguous(),
             grad_v_sum_k.contiguous(), d_hz0, d_vs0, d_count)
    dq, dk, dv = _bwd_slice(grad_out, q, k, v, projection, out, rden, stats, states, slice(0, e), feature, prefix,
                            causal_eps, q.dtype, packing, cfg["long_chunks"], state)
    if cu_seqlens is None:
        d_count = d_count.view(b, h, -1).sum(2, keepdim=True)
    else:  # each sequence's slots (chunk_seq: NS for the unused ones)
        d_count = d_count.new_zeros((h, packing[1] + 1)).index_add_(1, packing[2][2].long(), d_count)
        d_count = d_count[:, :-1].T[..., None]
    # v_sum0 reaches the outputs through the eps part of every query, sum_i sq_i [dN_i, dD_i] (the
    # kernel's partials; RELU: the kernels' q~ carry the eps, and every factor is 1), and the final
    # v_sum directly; an empty state's too (its eps part is added all the same)
    eps = feature_eps(feature)
    return dq, dk.to(k.dtype), dv, d_hz0, torch.add(grad_v_sum, torch.cat([d_vs0.sum(2), d_count], 2), alpha=eps)


def causal_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    projection: torch.Tensor | None, out: torch.Tensor, q_max: torch.Tensor, k_max: torch.Tensor,
    k_scale: torch.Tensor, rden: torch.Tensor, states: list[torch.Tensor], *, feature: int, prefix: bool = False,
    causal_eps: float = CAUSAL_EPS, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal FAVOR+ backward.  Takes causal_fwd's inputs and outputs (its key states saved, not
    recomputed) and grad_out (b, h, n, e); returns dq, dk (b, h, n, d) [GIVEN: w.r.t. the
    features] and dv (b, h, n, e) in the input dtypes.  Stabilizers are constants (detached, as
    1.1.4).  Launches: _dd_kernel, _chunk_dstate_kernel, _dstate_scan_kernel, _bwd_qk_kernel (dq, dk),
    _bwd_v_kernel.

    Value dims wider than the config's EV run in slices (feature_map.backward_in_value_slices)."""
    check_unit_stride(grad_out=grad_out, out=out)
    b, h, n, _ = q.shape
    stats = _kernel_stats(q_max, k_max, k_scale, (b, h, n), q.device, feature)
    prefix = prefix and feature == SOFTMAX
    cfg = _call_config(q, v, projection, feature, prefix, cu_seqlens is not None, False)
    packing = packing_args(cu_seqlens, cfg["BT"], n, rden)
    long = cfg["long_chunks"]
    return backward_in_value_slices(
        lambda g, v_s, out_s, cols, grad_dtype: _bwd_slice(g, q, k, v_s, projection, out_s, rden, stats, states,
                                                           cols, feature, prefix, causal_eps, grad_dtype, packing,
                                                           long),
        grad_out, v, out, cfg["EV"], q.dtype, k.dtype,
    )


def _bwd_slice(grad_out, q, k, v, projection, out, rden, stats, states, cols: slice, feature: int, prefix: bool,
               causal_eps: float, grad_dtype: torch.dtype, packing: tuple, long_chunks: bool, state=None):
    """causal_bwd for value dims up to EV (the columns cols of the forward's); dq, dk in
    grad_dtype, dv in v's dtype; packing as feature_map.packing_args gives it; long_chunks the
    call's (the forward's chunks, whatever the slice's width).  state: the STATE kernels' (v_sum0,
    d H_f, d z_f, d v_sum_f, d hz0, d v_sum0 and key-count partials) (causal_bwd_state)."""
    b, h, n, _ = q.shape
    e = v.shape[-1]
    m, d = feature_dims(q, projection, feature)
    cfg = _config(d, e, m, q.dtype, packed=packing[3], long_chunks=long_chunks)
    dn = head_scale(d)
    q_max, k_max, k_scale = stats
    k_eps, c_eps = _eps(feature, m, causal_eps)
    h_state, z_state, v_state, c_ref, c_stab = states
    h_state, v_state = h_state[..., cols], v_state[..., cols]  # views: the kernels take their row stride
    nt, ns, varlen, is_varlen = packing
    nm = cdiv(m, cfg["BM_dstate"])  # rows of the eps partials, one per reverse-walk m tile
    assert cfg["BM_dstate"] >= cfg["BM_bwd"]  # _bwd_v_kernel sums them one per own m tile
    f32 = dict(device=q.device, dtype=torch.float32)
    dh_state = torch.empty((b * h, nt, m, e), device=q.device, dtype=cfg["state_dtype"])
    dz_state = torch.empty((b * h, nt, m), **f32)
    dns_state = torch.empty((b * h, nt, nm, e), **f32)
    p = q if projection is None else projection
    nk = 1 if feature == GIVEN else cdiv(d, cfg["BK"])  # BK-wide chunks of d, one dq / dk slice each
    opts = launch_options(cfg, "bwd", FEATURE=feature, NK=nk, PREFIX=prefix, STATE=state is not None,
                          VARLEN=is_varlen)
    vs0, gh_f, gz_f, dvs_f, dhz0, dvs0, dcount = (rden,) * 7 if state is None else state  # (dummies without STATE)
    dd = torch.empty((b, h, n), **f32)
    launch(  # per row: packed sequences need nothing of their own
        _dd_kernel, (b * h * cdiv(n, cfg["BT"]),), grad_out, out, rden, dd,
        h, n, e,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BT=cfg["BT"], BV=cfg["BV"], AV=alignment(e, grad_out, out), num_warps=4,
    )
    dh_own = _own_states(dh_state, state is not None, q.dtype)
    launch(
        _chunk_dstate_kernel, (*block_grid(b * h, nt, is_varlen), nm), q, p, grad_out, dd, rden, q_max, k_max, c_stab,
        dh_own, dz_state, dns_state, dhz0, dvs0, *varlen,
        h, n, m, d, e, nt, ns,
        q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dn,
        **(opts | dict(BM=cfg["BM_dstate"], AL=alignment(d, q), AV=alignment(e, grad_out),
                       num_warps=cfg["num_warps_dstate"])),
    )
    launch(
        _dstate_scan_kernel, (b * h * ns, nm), c_ref, c_stab, dh_own, dh_state, dz_state, dns_state, gh_f, gz_f, dhz0,
        dvs0, *varlen[:2],
        h, n, m, e, nt, ns,
        BT=cfg["BT"], BM=cfg["BM_dstate"], BV=cfg["BV"], PRECISION=opts["PRECISION"], PREFIX=prefix,
        STATE=state is not None, AV=alignment(e), VARLEN=is_varlen, num_warps=cfg["num_warps_dstate"],
        num_stages=opts["num_stages"],
    )
    dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=grad_dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    for keys, (h_s, z_s, dx) in enumerate(((h_state, z_state, dq), (dh_state, dz_state, dk))):
        launch(
            _bwd_qk_kernel, block_grid(b * h, nt * nk, is_varlen),
            q, k, v, p, grad_out, dd, rden, q_max, k_max, k_scale, c_ref, c_stab,
            h_s, z_s, v_state, dx, vs0, gh_f, gz_f, *varlen,
            h, n, m, d, e, nt, ns, h_s.stride(-2), *strides,
            dn, k_eps, c_eps,
            KEYS=bool(keys), AL=alignment(d, q, k), AV=alignment(e, h_s.stride(-2), v, grad_out), **opts,
        )
    launch(
        _bwd_v_kernel, block_grid(b * h, nt, is_varlen),
        q, k, p, grad_out, dd, rden, q_max, k_max, k_scale, c_ref, c_stab, dh_state, dns_state, dv, gh_f, dvs_f,
        dcount,
        *varlen,
        h, n, m, d, e, nt, ns, nm,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dn, k_eps,
        AL=alignment(d, q, k), AV=alignment(e, grad_out), **opts,
    )
    return dq, dk, dv
