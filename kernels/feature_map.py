"""What the attention kernels share: the feature-map tile helpers, the per-row stats kernel and
the launchers' host-side helpers.

Feature maps (the FEATURE constexpr of every attention kernel; codes in kernels/__init__.py):
  SOFTMAX  positive random features, 1.1.4's softmax_kernel (ratio kept out of the tiles)
  RELU     generalized attention with ReLU: relu((dn x) @ P^T) + GENERALIZED_EPS
  GIVEN    features precomputed by the caller, read as (rows, m) tiles

Naming in kernels/ (fla style): b_ tiles, each with a shape comment where it is made; p_ pointers;
o_ offsets and m_ masks (o_t / m_t rows, o_m / m_m features, o_d / m_d all of d, o_k / m_k a
BK-wide chunk of d, o_v / m_v value columns); i_ program and loop indices; BT, BM, BD, BK, BV the
block sizes of rows, features, d, d chunks and value columns; NT, NK, NM counts of blocks.
o_row = (b*h index) * rows (+ a packed sequence's first row) is the base of a program's (b*h, rows)
stat vectors; i_nh a program's sequence row (b*h, or sequence*h of a pack: NOTES "Packed sequences").

Tile helpers, bottom up: addresses (bh_base; the packs' sequence_rows, sequence_span, row_block,
block_program, chunk_program), loads and stores (block_range, column_slice,
load_rows, load_fused_rows, finite_or_zero, grad_dot_out, store_rows); dash and diag tiles (dash_tile, dash_rows,
half_sq_norm, half_sq_norm_rows, diag_rows); feature tiles (key_units, relu_features,
feature_tiles, then features / features_chunked, which also read GIVEN tiles); their gradients
(feature_grad, input_grad_tile, store_input_grad). kernels/NOTES.md has the
factorisation they implement.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import GENERALIZED_EPS, GIVEN, RELU, SOFTMAX, SOFTMAX_EPS, extension_unsupported, head_scale, unsupported

# Constexpr copies of kernels/__init__.py's values: the only kind of global a @triton.jit body
# may read (compiled Triton rejects plain ints and floats; the interpreter does not notice).
FM_SOFTMAX = tl.constexpr(SOFTMAX)
FM_RELU = tl.constexpr(RELU)
FM_GIVEN = tl.constexpr(GIVEN)
FM_SOFTMAX_EPS = tl.constexpr(SOFTMAX_EPS)
FM_GENERALIZED_EPS = tl.constexpr(GENERALIZED_EPS)

# input_precision of every tl.dot with fp32 operands (the PRECISION constexpr of every kernel):
# TF32 on tensor cores. 16-bit inputs meet fp32 operands only in unbounded states and gradients,
# where TF32's precision matches the inputs' own. fp32 inputs get TF32 throughout (~1e-3
# relative, what torch.set_float32_matmul_precision("high") gives cuBLAS): fp32-exact "ieee"
# dots and 3xTF32 need two to three times the registers and spill in every configuration
# (kernels/NOTES.md, "Precision policy"), so performer_triton.functional keeps fp32 on the
# PyTorch path unless TF32 is allowed.
PRECISION = "tf32"


# ----------------------------------------------------------------------------- addresses


@triton.jit
def bh_base(x, i_bh, H, stride_b, stride_h):
    """Pointer to the (b, h) slice i_bh = b H + h of a (b, h, ...) tensor x."""
    i_b, i_h = i_bh // H, i_bh % H
    return x + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h


@triton.jit
def sequence_rows(cu_seqlens, i_nh, H, N, VARLEN: tl.constexpr):
    """Where the sequence of program row i_nh lies (i_nh = b H + h, or with VARLEN sequence H + h
    of a packed batch (1, h, N, .) cut by the offsets cu_seqlens (NS + 1,)): i_bh, the (b, h)
    slice of the inputs and of the (b, h, N) vectors; bos (int64), its first row there; T, its
    length (N without VARLEN)."""
    if VARLEN:
        i_bh = i_nh % H
        bos = tl.load(cu_seqlens + i_nh // H).to(tl.int64)
        T = (tl.load(cu_seqlens + i_nh // H + 1) - bos).to(tl.int32)
    else:
        i_bh, T = i_nh, N
        bos = tl.full([], 0, tl.int64)
    return i_bh, bos, T


@triton.jit
def sequence_span(cu_seqlens, chunk_first, i_nh, H, N, NT, NS, BT: tl.constexpr, VARLEN: tl.constexpr):
    """sequence_rows, and the sequence's chunks of BT rows: NC of them (at least 1, so that every
    sequence owns its chunk slots), o_st the base of its chunk states (NT slots per (b, h) slice,
    chunk_first (NS + 1,) each sequence's first: chunk_table) and o_cs of its chunk vectors
    (NC + 1 each: NT + NS per slice).  -> (i_bh, bos, T, NC, o_st, o_cs)."""
    i_bh, bos, T = sequence_rows(cu_seqlens, i_nh, H, N, VARLEN)
    if VARLEN:
        i_n = i_nh // H
        c_0 = tl.load(chunk_first + i_n).to(tl.int64)
        NC = tl.maximum(tl.cdiv(T, BT), 1)
        o_st = i_bh.to(tl.int64) * NT + c_0
        o_cs = i_bh.to(tl.int64) * (NT + NS) + c_0 + i_n
    else:
        NC = NT
        o_st = i_nh.to(tl.int64) * NT
        o_cs = i_nh.to(tl.int64) * (NT + 1)
    return i_bh, bos, T, NC, o_st, o_cs


@triton.jit
def row_block(BT: tl.constexpr, N):
    """(i_bh, i_t) of a per-row kernel on grid (b*h cdiv(N, BT),): (b, h) and block of BT rows
    from one axis, which takes 2^31 - 1 programs (axis 1 stops at 65535 blocks)."""
    NB = tl.cdiv(N, BT)
    i_p = tl.program_id(0)
    return i_p // NB, i_p % NB


@triton.jit
def block_program(VARLEN: tl.constexpr):
    """(i_h, i_g) of a block program: its (b, h) row and block index on grid (b*h, blocks); a
    pack's grid is (block slots, h), its many slots on axis 0 (up to 2^31 - 1; axis 1 stops at
    65535 blocks: 4.2M rows in blocks of 64, 8.4M in the causal chunks of 128)."""
    if VARLEN:
        i_h, i_g = tl.program_id(1), tl.program_id(0)
    else:
        i_h, i_g = tl.program_id(0), tl.program_id(1)
    return i_h, i_g


def block_grid(rows: int, blocks: int, packed: bool) -> tuple[int, int]:
    """The launch grid of block_program: (rows, blocks), a pack's (blocks, rows).  Grid axis 1
    takes at most 65535 programs: beyond, a clear error rather than a failed launch."""
    grid = (blocks, rows) if packed else (rows, blocks)
    if grid[1] > 65535:
        what = f"{rows} heads" if packed else f"{blocks} blocks of rows (a sequence of more than 65535 chunks)"
        raise ValueError(f"{what}: more than the 65535 programs a launch grid takes on axis 1; "
                         + ("" if packed else "a pack of one sequence (cu_seqlens=[0, n]) puts its blocks on axis 0"))
    return grid


@triton.jit
def chunk_program(chunk_seq, chunk_first, i_h, i_g, H, VARLEN: tl.constexpr):
    """(i_nh, i_c, i_n) of the chunk program (i_h, i_g): its sequence row for sequence_span, its
    chunk there and its sequence (0 without VARLEN).  VARLEN: i_h is the head and i_g a chunk
    slot of the packed batch, chunk_seq (slots,) its sequence (NS past the last one: the program
    has nothing to do)."""
    if VARLEN:
        i_n = tl.load(chunk_seq + i_g)
        i_c = i_g - tl.load(chunk_first + i_n)
        i_nh = i_n * H + i_h
    else:
        i_nh, i_c, i_n = i_h, i_g, 0
    return i_nh, i_c, i_n


@triton.jit
def block_range(i, B: tl.constexpr, N):
    """Offsets (B,) of block i of size B along a dimension of length N, and their mask."""
    o = i * B + tl.arange(0, B)
    return o, o < N


@triton.jit
def aligned(x, AL: tl.constexpr):
    """The int argument x, which the launcher found a multiple of AL (alignment), with that
    divisibility visible to the compiler. Triton specialises int arguments only on divisibility
    by 16: a head dim or row stride of 40 or 24 left every row load unvectorised and outside the
    asynchronous copies, which spilled up to 650 B per thread (kernels/NOTES.md "Alignment").
    Kernels take two: AL for d and the q, k rows, AV for e and the v, grad_out, out rows, so
    that one side's small alignment does not hide the other's divisibility by 16."""
    if AL > 1 and AL < 16:
        x = x // AL * AL
    return x


@triton.jit
def column_slice(i_tk, NK, D, BK: tl.constexpr):
    """Program i_t NK + i_k of a (blocks * NK) grid -> (i_t, i_k, o_k (BK,), m_k): its block and
    its BK-wide column slice of dq / dk."""
    i_t, i_k = i_tk // NK, i_tk % NK
    o_k, m_k = block_range(i_k, BK, D)
    return i_t, i_k, o_k, m_k


@triton.jit
def load_rows(p_base, o_t, m_t, stride_t, o_c, m_c):
    """Load a (rows, cols) tile with unit column stride; masked entries are 0."""
    p = p_base + o_t[:, None].to(tl.int64) * stride_t + o_c[None, :]
    return tl.load(p, mask=m_t[:, None] & m_c[None, :], other=0.0)


@triton.jit
def load_vector(p_base, i, B: tl.constexpr, N):
    """Block i (B,) of a length-N fp32 vector at p_base, 0 past its end. Loops load the next
    block one iteration ahead: a small vector that its own iteration reads is a synchronous
    load, which Triton's pipeliner leaves in the loop (compile report: "pipelined")."""
    o, m = block_range(i, B, N)
    return tl.load(p_base + o, mask=m, other=0.0)


@triton.jit
def load_fused_rows(p_base, o_t, m_t, stride_t, o_d, m_d, BT: tl.constexpr, BD: tl.constexpr, FEATURE: tl.constexpr):
    """Rows of q, k or P as a resident (BT, BD) tile for the feature maps the kernels compute;
    zeros (unused) for GIVEN, which has no projection and loads its features per m tile."""
    if FEATURE == FM_GIVEN:
        b_x = tl.zeros([BT, BD], dtype=p_base.dtype.element_ty)  # (BT, BD)
    else:
        b_x = load_rows(p_base, o_t, m_t, stride_t, o_d, m_d)  # (BT, BD)
    return b_x


@triton.jit
def finite_or_zero(b_x):
    """b_x with inf and NaN entries replaced by 0 (b_x - b_x is 0 exactly where b_x is finite)."""
    return tl.where(b_x - b_x == 0, b_x, 0.0)


@triton.jit
def reciprocal_or_zero(b_d):
    """1 / D, and 0 where D = 0 (no key, or query features all zero: output 0, no gradient);
    the unused branch divides by 1.  b_d fp32, any shape."""
    m_d = b_d != 0.0
    return tl.where(m_d, 1.0 / tl.where(m_d, b_d, 1.0), 0.0)


@triton.jit
def grad_dot_out(b_g, b_o):
    """Row sums of g * out (BT,): an output a future inf / NaN value made non-finite adds
    nothing where its gradient is 0.  b_g, b_o (BT, BV) fp32."""
    return tl.sum(tl.where(b_g == 0, 0.0, b_g * b_o), axis=1)


@triton.jit
def store_rows(x, b_x, o_row, o_t, m_t, o_c, m_c, C):
    """Store a (BT, cols) tile into rows o_t, columns o_c of x (b*h, rows, C) contiguous, in
    x's dtype; o_row = (b*h index) * rows."""
    p_x = x + (o_row + o_t[:, None]) * C + o_c[None, :]
    tl.store(p_x, b_x.to(x.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


# ----------------------------------------------------------------------------- TF32 operands


@triton.jit
def tf32_nearest(x, PRECISION: tl.constexpr):
    """x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero) when it is an
    fp32 operand of a "tf32" dot; other tiles unchanged.  The tensor cores read fp32 operands by
    dropping their low 13 bits (Triton emits no cvt.rna): truncation toward zero, whose bias adds
    up over attention's long sums; rounded operands cut the worst fp32 errors ~3x (NOTES
    "Precision policy").  Idempotent: a rounded value passes unchanged."""
    if PRECISION == "tf32":
        if x.dtype == tl.float32:
            x = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b (acc None: a fresh fp32 accumulator) with fp32 operands rounded to TF32
    (tf32_nearest).  A state tile that goes from its async copy straight into a dot is stored
    rounded instead (store_state) and enters tl.dot directly: rounding it here would take it
    through registers."""
    return tl.dot(tf32_nearest(a, PRECISION), tf32_nearest(b, PRECISION), acc, input_precision=PRECISION)


@triton.jit
def state_dot(a, b_s, PRECISION: tl.constexpr):
    """a @ b_s, fp32 result, for an input-dtype tile a and a state tile b_s as stored: one 16-bit
    dot where both are the same 16-bit dtype (exact products), else fp32 copies in TF32 (16-bit
    values are exact in TF32, an fp32 a is rounded, an fp32 state was stored rounded)."""
    if a.dtype == b_s.dtype and a.dtype != tl.float32:
        return tl.dot(a, b_s)
    return tl.dot(tf32_nearest(a.to(tl.float32), PRECISION), b_s.to(tl.float32), input_precision=PRECISION)


@triton.jit
def merged_reference(r_a, r_b):
    """Two sums of exp(row_scale_j - r) terms, referenced to r_a and r_b, moved to one reference:
    R = max(r_a, r_b) and the factors exp(r_a - R), exp(r_b - R) <= 1, taken against 0 while R is
    -inf (no key in either: both sums are 0, and -inf - -inf would be NaN).  The one state merge
    of the kernels (torch_backend.merge_referenced in PyTorch).  -> (R, factor a, factor b)."""
    r_new = tl.maximum(r_a, r_b)
    base = tl.where(r_new == float("-inf"), 0.0, r_new)
    return r_new, tl.exp(r_a - base), tl.exp(r_b - base)


@triton.jit
def store_state(p, b_h, mask, PRECISION: tl.constexpr):
    """Store an fp32 state tile that later kernels read as a dot operand: TF32-rounded when p is
    fp32 (a 16-bit state is exact in TF32 already; rounding it first would round twice)."""
    if p.dtype.element_ty == tl.float32:
        b_h = tf32_nearest(b_h, PRECISION)
    tl.store(p, b_h.to(p.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- dash and diag


@triton.jit
def _dash_dot(b_x, b_p, b_acc, WIDTH: tl.constexpr, PRECISION: tl.constexpr):
    """b_acc + b_x @ b_p^T: b_x (BT, K), b_p (BM, K), b_acc (BT, BM) fp32, a K-wide part of a
    WIDTH-wide (padded) head.  The dash feeds exp (softmax features) and the ReLU gates, where
    TF32's ~1e-3 relative error becomes 1e-3 in every feature and flips gates near 0 (fp32
    gradients off by 2-5e-3, ReLU by ~5e-2): with TF32 dots the dash of heads up to 64 wide runs
    in 3xTF32 (split operands, ~fp32 accuracy), in every kernel alike. Wider fp32 heads keep
    TF32 in every kernel: the split halves of their resident 128-wide forward tiles spill
    100-340 B, and a forward and a backward that computed the features differently would
    differentiate features other than those that made the outputs. 16-bit tiles multiply
    exactly on tensor cores whatever PRECISION says."""
    if PRECISION == "tf32" and WIDTH <= 64:
        b_acc = tl.dot(b_x, tl.trans(b_p), b_acc, input_precision="tf32x3")
    else:
        # plain TF32 (operands truncated, not tf32_nearest): its error reaches the outputs through
        # exp and the ReLU gates, not through long sums, and rounded operands moved a ReLU gate of
        # the fp32 d = 128 test case (dk 2e-2 off)
        b_acc = tl.dot(b_x, tl.trans(b_p), b_acc, input_precision=PRECISION)
    return b_acc


@triton.jit
def dash_tile(b_x, b_p, dn, PRECISION: tl.constexpr):
    """(dn x) @ P^T with an fp32 accumulator.  b_x (BT, BD), b_p (BM, BD) -> (BT, BM) fp32."""
    b_dash = tl.zeros([b_x.shape[0], b_p.shape[0]], dtype=tl.float32)  # (BT, BM)
    return _dash_dot(b_x, b_p, b_dash, b_x.shape[1], PRECISION) * dn


@triton.jit
def _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK: tl.constexpr, WIDTH: tl.constexpr,
                PRECISION: tl.constexpr):
    """b_dash (BT, BM) += x[:, chunk i_k] @ P[:, chunk i_k]^T."""
    o_k, m_k = block_range(i_k, BK, D)  # (BK,)
    b_x = load_rows(p_x, o_t, m_t, stride_t, o_k, m_k)  # (BT, BK)
    b_p = load_rows(p, o_m, m_m, D, o_k, m_k)  # (BM, BK)
    return _dash_dot(b_x, b_p, b_dash, WIDTH, PRECISION)


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
            b_dash = _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK, NK * BK, PRECISION)
    else:
        for i_k in range(NK):
            b_dash = _dash_chunk(b_dash, p_x, o_t, m_t, stride_t, p, o_m, m_m, D, i_k, BK, NK * BK, PRECISION)
    return b_dash * dn


@triton.jit
def _sq_chunk(b_s, p_x, o_t, m_t, stride_t, D, i_k, BK: tl.constexpr):
    """b_s (BT,) += row sums of x[:, chunk i_k]^2 in fp32."""
    o_k, m_k = block_range(i_k, BK, D)  # (BK,)
    b_x = load_rows(p_x, o_t, m_t, stride_t, o_k, m_k).to(tl.float32)  # (BT, BK)
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
    b_xf = b_x.to(tl.float32)  # (BT, BD)
    return tl.sum(b_xf * b_xf, axis=1) * (dn * dn * 0.5)


@triton.jit
def diag_rows(p_x, o_t, m_t, stride_t, D, dn,
              FEATURE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr):
    """The query diag |dn q|^2 / 2 (BT,) that SOFTMAX query features need, read in BK-wide
    chunks (half_sq_norm_rows); zeros (unused) for RELU and GIVEN."""
    if FEATURE == FM_SOFTMAX:
        b_diag = half_sq_norm_rows(p_x, o_t, m_t, stride_t, D, dn, BT, BK, NK)  # (BT,)
    else:
        b_diag = tl.zeros([BT], dtype=tl.float32)  # (BT,)
    return b_diag


# ----------------------------------------------------------------------------- feature tiles


@triton.jit
def key_units(b_dash, b_max, m_f):
    """U = exp(dash - row_max) in (0, 1], 0 on padded features.  The exponent is clamped at 0:
    row_max comes from another kernel's dash (_row_stats_kernel), which past |dash| ~ 2^30 in fp32
    (keys of norm ~1e10) can exceed this one's by more than exp's range: inf, then NaN.  A NaN
    dash stays NaN (min drops it by default: a NaN row read as units of 1, finite garbage).
    b_dash (BT, BM) fp32, b_max (BT,), m_f (BM,) -> (BT, BM) fp32."""
    b_e = tl.minimum(b_dash - b_max[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)  # (BT, BM)
    return tl.where(m_f[None, :], tl.exp(b_e), 0.0)


@triton.jit
def relu_features(b_dash, m_f):
    """relu(dash) + GENERALIZED_EPS, 0 on padded features; NaN stays NaN, as torch's relu (max
    drops it by default).  (BT, BM) fp32 -> (BT, BM) fp32."""
    b_r = tl.maximum(b_dash, 0.0, propagate_nan=tl.PropagateNan.ALL)  # (BT, BM)
    return tl.where(m_f[None, :], b_r + FM_GENERALIZED_EPS, 0.0)


@triton.jit
def feature_tiles(b_dash, b_diag, b_max, m_m, FEATURE: tl.constexpr, IS_QUERY: tl.constexpr):
    """Ratio-free feature tile (BT, BM) fp32 from dash (BT, BM), and what its derivative needs.

    SOFTMAX queries: q~ = exp(dash - diag - row_max) + SOFTMAX_EPS and the exponential alone
    (q~ - eps in fp32 would lose it when |q| is large); SOFTMAX keys: the units
    U = exp(dash - row_max), twice; RELU: relu(dash) + GENERALIZED_EPS and dash.  Padded
    features are 0.
    """
    if FEATURE == FM_RELU:
        b_f = relu_features(b_dash, m_m)  # (BT, BM)
        b_aux = b_dash
    elif IS_QUERY:
        b_aux = key_units(b_dash, b_max + b_diag, m_m)  # (BT, BM) exp(dash - diag - row_max)
        b_f = tl.where(m_m[None, :], b_aux + FM_SOFTMAX_EPS, 0.0)  # (BT, BM)
    else:
        b_f = key_units(b_dash, b_max, m_m)  # (BT, BM)
        b_aux = b_f
    return b_f, b_aux


@triton.jit
def features(p_x, b_x, b_p, b_diag, b_max, o_t, m_t, stride_t, o_m, m_m, dn,
             FEATURE: tl.constexpr, IS_QUERY: tl.constexpr, PRECISION: tl.constexpr):
    """feature_tiles of the resident (BT, BD) rows b_x and (BM, BD) projection b_p; GIVEN
    loads the caller's features (twice).  -> two (BT, BM) fp32 tiles."""
    if FEATURE == FM_GIVEN:
        b_f = load_rows(p_x, o_t, m_t, stride_t, o_m, m_m).to(tl.float32)  # (BT, BM)
        b_aux = b_f
    else:
        b_f, b_aux = feature_tiles(dash_tile(b_x, b_p, dn, PRECISION), b_diag, b_max, m_m, FEATURE, IS_QUERY)
    return b_f, b_aux


@triton.jit
def features_chunked(p_x, p, b_diag, b_max, o_t, m_t, stride_t, o_m, m_m, D, dn,
                     FEATURE: tl.constexpr, IS_QUERY: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, NK: tl.constexpr, PRECISION: tl.constexpr):
    """features with x and P read in BK-wide chunks (dash_rows) instead of resident tiles."""
    if FEATURE == FM_GIVEN:
        b_f = load_rows(p_x, o_t, m_t, stride_t, o_m, m_m).to(tl.float32)  # (BT, BM)
        b_aux = b_f
    else:
        b_dash = dash_rows(p_x, o_t, m_t, stride_t, p, o_m, m_m, D, dn, BT, BM, BK, NK, PRECISION)  # (BT, BM)
        b_f, b_aux = feature_tiles(b_dash, b_diag, b_max, m_m, FEATURE, IS_QUERY)
    return b_f, b_aux


# ----------------------------------------------------------------------------- gradients


@triton.jit
def feature_grad(b_df, b_aux, m_m, FEATURE: tl.constexpr):
    """Chain a (BT, BM) feature gradient back to what P multiplies (or to GIVEN features).

    SOFTMAX: times the exponential (queries) or the unit (keys: b_df excludes it); RELU: mask
    dash > 0; GIVEN: unchanged. Padded features are 0.
    """
    if FEATURE == FM_SOFTMAX:
        b_du = b_df * b_aux  # (BT, BM)
    elif FEATURE == FM_RELU:
        b_du = tl.where(b_aux > 0.0, b_df, 0.0)  # (BT, BM)
    else:
        b_du = b_df
    return tl.where(m_m[None, :], b_du, 0.0)


@triton.jit
def input_grad_tile(dx, b_df, b_aux, b_dx, b_rs, p, o_row, o_t, m_t, o_m, m_m, M, o_k, m_k, D,
                    FEATURE: tl.constexpr, PRECISION: tl.constexpr):
    """One m tile of an input gradient from the feature gradient b_df (BT, BM) and its
    feature_tiles aux (feature_grad): GIVEN stores it into dx (b*h, rows, M); the maps the kernels
    compute accumulate b_dx (BT, BK) += du @ P[o_m, o_k] and b_rs (BT,) += rowsum(du) for
    store_input_grad.  -> (b_dx, b_rs)."""
    b_du = feature_grad(b_df, b_aux, m_m, FEATURE)  # (BT, BM)
    if FEATURE == FM_GIVEN:
        store_rows(dx, b_du, o_row, o_t, m_t, o_m, m_m, M)
    else:
        b_pk = load_rows(p, o_m, m_m, D, o_k, m_k)  # (BM, BK)
        # (a 16-bit P is exact in TF32: rounded only when it is fp32)
        b_dx += tl.dot(tf32_nearest(b_du, PRECISION), tf32_nearest(b_pk, PRECISION).to(tl.float32),
                       input_precision=PRECISION)
        b_rs += tl.sum(b_du, axis=1)
    return b_dx, b_rs


@triton.jit
def store_input_grad(dx, p_x, b_dx, b_rs, o_row, o_t, m_t, stride_t, o_k, m_k, D, dn, FEATURE: tl.constexpr):
    """dx[:, o_k] = dn (du @ P)[:, o_k] - dn^2 rowsum(du) x[:, o_k] (SOFTMAX: u = dash - diag;
    RELU: the first term only) into dx (b*h, rows, D) contiguous.
    b_dx (BT, BK) = (du @ P)[:, o_k], b_rs (BT,) = rowsum(du)."""
    b_dx = b_dx * dn
    if FEATURE == FM_SOFTMAX:
        # x read again here, not kept: an identical load before the m loop (diag_rows, the dash) is
        # merged with this one by the compiler, which then keeps x in fp32 registers through the
        # loop; the eviction hint makes the loads differ
        p_xk = p_x + o_t[:, None].to(tl.int64) * stride_t + o_k[None, :]  # (BT, BK)
        b_x = tl.load(p_xk, mask=m_t[:, None] & m_k[None, :], other=0.0, eviction_policy="evict_first")  # (BT, BK)
        b_dx -= (dn * dn) * b_rs[:, None] * b_x.to(tl.float32)
    store_rows(dx, b_dx, o_row, o_t, m_t, o_k, m_k, D)


# ----------------------------------------------------------------------------- row stats


@triton.jit
def _row_max(p_x, o_t, m_t, stride_xn, p, M, D, dn,
             BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """Rows o_t of x as a (BT, BD) tile and their max of dash over the M features (BT,) fp32."""
    o_d, m_d = block_range(0, BD, D)  # (BD,)
    b_x = load_rows(p_x, o_t, m_t, stride_xn, o_d, m_d)  # (BT, BD)
    b_max = tl.full([BT], float("-inf"), dtype=tl.float32)  # (BT,)
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m, m_m = block_range(i_m, BM, M)  # (BM,)
        b_p = load_rows(p, o_m, m_m, D, o_d, m_d)  # (BM, BD)
        b_dash = dash_tile(b_x, b_p, dn, PRECISION)  # (BT, BM)
        b_dash = tl.where(m_m[None, :], b_dash, float("-inf"))
        b_max = tl.maximum(b_max, tl.max(b_dash, axis=1))
    return b_x, b_max


@triton.jit
def _row_stats_kernel(
    q, k, p, q_max, k_max, k_scale,
    H, N, M, D, X0,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    dn,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr, AL: tl.constexpr,
):
    """Program (i_bh NB + i_t, i_x): rows of q (i_x + X0 = 0: q_max) or of k (1: k_max, k_scale),
    NB = cdiv(N, BT) blocks per (b, h): (b, h) and block on axis 0, which takes 2^31 - 1
    programs (axis 1 stops at 65535 blocks, 4.2M rows)."""
    i_bh, i_t = row_block(BT, N)
    i_x = tl.program_id(1) + X0
    D, stride_qb, stride_qh = aligned(D, AL), aligned(stride_qb, AL), aligned(stride_qh, AL)
    stride_qn, stride_kb, stride_kh = aligned(stride_qn, AL), aligned(stride_kb, AL), aligned(stride_kh, AL)
    stride_kn = aligned(stride_kn, AL)
    o_t, m_t = block_range(i_t, BT, N)  # (BT,)
    o_row = i_bh.to(tl.int64) * N
    if i_x == 0:
        _, b_max = _row_max(bh_base(q, i_bh, H, stride_qb, stride_qh), o_t, m_t, stride_qn, p, M, D, dn,
                            BT, BM, BD, PRECISION)  # (BT,)
        tl.store(q_max + o_row + o_t, b_max, mask=m_t)
    else:
        b_x, b_max = _row_max(bh_base(k, i_bh, H, stride_kb, stride_kh), o_t, m_t, stride_kn, p, M, D, dn,
                              BT, BM, BD, PRECISION)  # (BT, BD), (BT,)
        tl.store(k_max + o_row + o_t, b_max, mask=m_t)
        tl.store(k_scale + o_row + o_t, b_max - half_sq_norm(b_x, dn), mask=m_t)


def row_stats(q: torch.Tensor | None, k: torch.Tensor | None, projection: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row max of dash = (dn x) @ P^T over features, in one launch for q and k: q_max, and
    k_max with k_scale = k_max - |dn k|^2 / 2.  A None input gets none (its stats are (b, h, 0)).

    q, k (b, h, n, d) with unit last strides (one n for both); projection (m, d) contiguous in
    their dtype.  Returns three fp32 tensors (q_max, k_max, k_scale), (b, h, n) each.
    """
    x = q if q is not None else k
    b, h, n, d = x.shape
    m = projection.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    q_max = torch.empty((b, h, n if q is not None else 0), **f32)
    k_max = torch.empty((b, h, n if k is not None else 0), **f32)
    k_scale = torch.empty_like(k_max)
    if n == 0 or b * h == 0:
        return q_max, k_max, k_scale
    q_, k_ = (q if q is not None else k), (k if k is not None else q)
    # fp32: m tiles of 32 (at 64 the 3xTF32 dash of a 64-wide head spilled 272 B on sm_80)
    BT, BM, BD = 64, 32 if x.dtype == torch.float32 else 64, max(16, next_power_of_2(d))
    grid = (b * h * cdiv(n, BT), (q is not None) + (k is not None))
    launch(
        _row_stats_kernel, grid, q_, k_, projection, q_max, k_max, k_scale,
        h, n, m, d, 0 if q is not None else 1,
        q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
        head_scale(d),
        BT=BT, BM=BM, BD=BD, PRECISION=PRECISION, AL=alignment(d, q_, k_),
        num_warps=4,
    )
    return q_max, k_max, k_scale


@triton.jit
def _dot_probe_kernel(p_x, p_y):
    o_t = tl.arange(0, 16)
    b_x = tl.load(p_x + o_t[:, None] * 16 + o_t[None, :])  # (16, 16) in the probed dtype
    tl.store(p_y + o_t[:, None] * 16 + o_t[None, :], tl.dot(b_x, b_x))  # (16, 16) fp32


def interpreter_dot_exact(dtype: torch.dtype) -> bool:
    """Whether Triton's interpreter multiplies dtype tiles right: a (16, 16) product of small
    integers (exact in every dtype) against torch's.  Its bf16 tl.dot multiplies raw bit
    patterns (triton-lang/triton#11584) unless patched, as the test suite patches it."""
    x = torch.arange(256, dtype=torch.float32).remainder_(7).sub_(3).view(16, 16)
    y = torch.full((16, 16), float("nan"))
    launch(_dot_probe_kernel, (1,), x.to(dtype), y)
    return torch.equal(y, x @ x)


# ----------------------------------------------------------------------------- launcher helpers

# Compiled kernels of earlier launches: (kernel, argument keys, options, device, knobs) ->
# (CompiledKernel, the values of the constexpr parameters after the positional arguments).
_LAUNCHED: dict = {}
_KNOBS = getattr(triton, "knobs", None)  # (triton >= 3.4; TRITON_DEBUG is in the key of its launches)


def _arg_key(x) -> object:
    """What Triton specialises a launch argument on, or finer: a tensor's dtype and whether its
    address is 16-byte aligned; an int's equality to 1, divisibility by 16 and integer type
    (i32, i64, u64); a float nothing (never specialised); anything else its type and value."""
    kind = type(x)
    if kind is int:
        return x == 1, x % 16 == 0, -(2**31) <= x < 2**31, x < 2**63
    if kind is float:
        return float
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    return kind, x


def launch(kernel, grid: tuple, *args, **options) -> None:
    """kernel[grid](*args, **options), args the non-constexpr parameters in order, options the
    constexprs and launch options.  Triton's own launch binds and specialises every argument
    again on every call (~30 us of host time per launch of ~35 arguments, as long as a small
    kernel runs: bench/test_host_overhead.py); a launch whose arguments specialise as an earlier
    one's (_arg_key, with the Triton settings of _knob_key) runs that launch's compiled kernel
    directly.  The interpreter's kernels (TRITON_INTERPRET=1), any launch without a GPU driver
    (the compile report's captures on meta tensors) and kernels with pre-run hooks or a custom
    compiler pipeline launch as usual."""
    constexprs = _constexpr_params(kernel.fn, len(args))
    key = (kernel, tuple(map(_arg_key, args)), tuple(options.items()))
    device = _current_device() if isinstance(kernel, JITFunction) else None
    if device is None or kernel.pre_run_hooks or _stages_hook():
        hash(key)  # (a key must hash: the interpreter tests check every launch's)
        kernel[grid](*args, **options)
        return
    key += (device, *_knob_key())
    hit = _LAUNCHED.get(key)
    if hit is not None:
        compiled, values = hit
        compiled[(*grid, 1, 1)[:3]](*args, *values)
        return
    compiled = kernel[grid](*args, **options)
    if isinstance(compiled, CompiledKernel):  # (None when a hook took the launch)
        _LAUNCHED[key] = compiled, tuple(options[name] if name in options else default for name, default in constexprs)


def _knob_key() -> tuple:
    """The Triton settings that JITFunction.run adds to the key of its compiled kernels."""
    if _KNOBS is None:
        return ()
    compilation = _KNOBS.compilation
    return (_KNOBS.runtime.debug, getattr(compilation, "instrumentation_mode", None),
            getattr(compilation, "fpsan_homomorphic_casts", None))


def _stages_hook() -> bool:
    """A custom compiler pipeline is set (its hash joins JITFunction.run's key: launch leaves it
    to Triton, as it leaves kernels with pre-run hooks)."""
    return _KNOBS is not None and getattr(_KNOBS.runtime, "add_stages_inspection_hook", None) is not None


def _current_device() -> int | None:
    """The device Triton launches on (its current one), None without a GPU driver."""
    try:
        return driver.active.get_current_device()
    except RuntimeError:  # "0 active drivers"
        return None


def _constexpr_params(fn, count: int) -> tuple[tuple[str, object], ...]:
    """(name, default) of the parameters of the kernel function fn after its first count, which
    must all be constexprs: a compiled kernel takes its arguments in order, so launch passes
    every other parameter positionally (checked on every launch, the interpreter's included)."""
    params = _PARAMS.get((fn, count))
    if params is None:
        code, defaults = fn.__code__, fn.__defaults__ or ()
        names = code.co_varnames[:code.co_argcount]
        default = dict(zip(names[len(names) - len(defaults):], defaults))
        rest = names[count:]
        keywords = [name for name in rest if fn.__annotations__.get(name) not in (tl.constexpr, "tl.constexpr")]
        if keywords:
            raise TypeError(f"launch({fn.__name__}): parameters {keywords} are not constexprs; pass them positionally")
        params = _PARAMS[(fn, count)] = tuple((name, default.get(name)) for name in rest)
    return params


_PARAMS: dict = {}  # _constexpr_params' answers


def chunk_slots(cu_seqlens: torch.Tensor | None, bt: int, n: int) -> tuple[int, int]:
    """(NT, NS): chunk slots per (b, h) slice of n rows cut into NS packed sequences by
    cu_seqlens (NS + 1,) offsets, NT = cdiv(n, bt) + NS >= the sum of every sequence's
    max(cdiv(T, bt), 1); without cu_seqlens (cdiv(n, bt), 1).  From shapes only."""
    if cu_seqlens is None:
        return cdiv(n, bt), 1
    ns = cu_seqlens.shape[0] - 1
    return cdiv(n, bt) + ns, ns


def chunk_table(cu_seqlens: torch.Tensor, bt: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets, chunk_first, chunk_seq) of a packed batch (chunk_slots): offsets (NS + 1,) int32
    cu_seqlens clamped into [0, n] and made non-decreasing (what the kernels read: offsets the
    caller did not check cannot address memory outside the tensors), chunk_first (NS + 1,) int32
    the first slot of each sequence (the last: the slots used), chunk_seq (NT,) int32 the
    sequence of each slot (NS past the used ones).  On the device with no host sync: the launch
    grids depend on shapes only (torch.compile, CUDA graphs)."""
    nt, ns = chunk_slots(cu_seqlens, bt, n)
    offsets = torch.cummax(cu_seqlens.to(torch.int64).clamp(0, n), 0).values
    lengths = offsets[1:] - offsets[:-1]
    counts = torch.clamp((lengths + bt - 1) // bt, min=1)
    chunk_first = torch.zeros((ns + 1,), device=cu_seqlens.device, dtype=torch.int64)
    chunk_first[1:] = torch.cumsum(counts, 0)
    slots = torch.arange(nt, device=cu_seqlens.device, dtype=torch.int64)
    chunk_seq = torch.searchsorted(chunk_first[1:], slots, right=True, out_int32=True)
    return offsets.to(torch.int32), chunk_first.to(torch.int32), chunk_seq


def packing_args(cu_seqlens: torch.Tensor | None, bt: int, n: int, dummy: torch.Tensor) -> tuple:
    """(nt, ns, (offsets, chunk_first, chunk_seq), VARLEN): the chunk slots per (b, h) slice, the
    sequences per slice, a launch's packing arguments (chunk_table; dummy pointers without
    cu_seqlens) and its constexpr."""
    nt, ns = chunk_slots(cu_seqlens, bt, n)
    if cu_seqlens is None:
        return nt, ns, (dummy,) * 3, False
    return nt, ns, chunk_table(cu_seqlens, bt, n), True


def check_head_dims(dtype: torch.dtype, **dims: int) -> None:
    """Launchers' guard: the kernels take kernels.DTYPES, and head dims up to MAX_HEAD_DIM (wider
    ones would compile to spilling kernels)."""
    reason = unsupported(dtype, **dims)
    if reason is not None:
        raise ValueError(reason)


def check_unit_stride(**tensors: torch.Tensor) -> None:
    """Launchers' guard: rows are read with a unit last stride (a ValueError, not an assert: it
    holds under python -O too)."""
    bad = [f"{name} with strides {tuple(t.stride())}" for name, t in tensors.items() if t.stride(-1) != 1]
    if bad:
        raise ValueError(f"the Triton kernels need a unit last stride, got {', '.join(bad)}")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None,
                 feature: int, cu_seqlens: torch.Tensor | None = None) -> tuple[int, int]:
    """The forward launchers' guard (kernels/NOTES.md "Launcher contract": unit last-dim strides,
    check_head_dims; a pack: batch 1, one length for q and k, the configurations
    extension_unsupported allows) -> (m, d) as feature_dims gives them."""
    check_unit_stride(q=q, k=k, v=v)
    m, d = feature_dims(q, projection, feature)
    check_head_dims(q.dtype, d=d, e=v.shape[-1])
    if cu_seqlens is not None:
        reason = extension_unsupported("packed sequences", q.dtype, feature, d, v.shape[-1])
        if reason is not None:
            raise ValueError(f"cu_seqlens: {reason}")
        if q.shape[0] != 1 or k.shape[2] != q.shape[2]:
            raise ValueError(f"cu_seqlens: q, k, v hold a pack as (1, h, total, .), got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
    return m, d


def empty_stats(b: int, h: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_max, k_max, k_scale) of the maps without stabilizer: (b, h, 0) fp32, three distinct
    tensors (custom-op outputs must not alias each other)."""
    return tuple(torch.empty((b, h, 0), device=device, dtype=torch.float32) for _ in range(3))


def feature_dims(q: torch.Tensor, projection: torch.Tensor | None, feature: int) -> tuple[int, int]:
    """(m, d): features per row and the q / k head dim; d = 0 for GIVEN, where q holds the features."""
    if feature == GIVEN:
        return q.shape[-1], 0
    return projection.shape[0], projection.shape[1]


def host_cache(fn):
    """A launcher's host-side config, computed once per plain int / bool / dtype arguments
    (every launcher asks per call; a copy each time, so callers may change theirs); other
    arguments (torch.compile's SymInts under dynamic shapes: unhashable) compute it afresh."""
    memo: dict = {}

    def config(*args, **kwargs):
        key = args + tuple(sorted(kwargs.items()))
        if not all(type(a) in (int, bool, torch.dtype) for a in args + tuple(kwargs.values())):
            return fn(*args, **kwargs)
        if key not in memo:
            memo[key] = fn(*args, **kwargs)
        return dict(memo[key])
    config.__doc__ = fn.__doc__
    return config


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code: triton.cdiv and triton.next_power_of_2 are
    constexpr functions in triton >= 3.5 that cost microseconds per host call (23 of them per
    causal fwd+bwd: ~0.2 ms of host time)."""
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1); see cdiv."""
    return 1 << max(0, x - 1).bit_length()


def block_config(d: int, e: int, m: int, dtype: torch.dtype) -> dict:
    """The block sizes and launch options both attention modes share (each launcher's _config
    adds its per-kernel ones).  d = 0 for GIVEN.

    BT rows per program (64: one warpgroup's wgmma M on Hopper; causal._config takes 128 for bf16
    heads up to 64 wide); BM features per m tile of the
    state kernel; BD all of d and BV all of e (one tile each, forward); BK the d chunk of the
    backward; EV the widest value slice of one backward pass (backward_in_value_slices). BM, BK
    and EV are what keep the register file from spilling (compile report, kernels/NOTES.md).
    """
    fp32 = dtype == torch.float32  # twice the bytes per tile element
    BD = max(16, next_power_of_2(d))
    return dict(
        BT=64,
        BM=min(16 if fp32 else 32, max(16, next_power_of_2(m))),
        BD=BD,
        BK=min(BD, 32 if fp32 else 64),
        BV=max(16, next_power_of_2(e)),
        EV=32 if fp32 else 64,
        # 16-bit: 3 stages keep the next tiles' loads in flight (at 2, Triton's pipeliner waits
        # for each iteration's own loads: compile report "pipelined"); fp32 tiles are twice the
        # size and a second stage's buffers cost registers
        num_stages=1 if fp32 else 3,
    )


# the m tile and warps of each kernel role, as _config names them
_ROLES = {"state": ("BM", "num_warps"), "out": ("BM_out", "num_warps_out"), "bwd": ("BM_bwd", "num_warps_bwd")}


def alignment(*xs) -> int:
    """AL (or AV) of a launch: the largest power of two up to 16 that divides every int in xs and
    every stride but the last (1) of every tensor in xs; the kernel declares exactly these
    (aligned). 2 counts as 1 (no declaration): two-element vectors spilled where scalar loads
    did not (fp32 GIVEN features of m = 266, causal output kernel, 36 B on sm_90a)."""
    al = 16
    for x in xs:
        for s in x.stride()[:-1] if isinstance(x, torch.Tensor) else (x,):
            while s % al:
                al //= 2
    return al if al >= 4 else 1


def launch_options(cfg: dict, role: str, **constexprs) -> dict:
    """The keyword arguments of one launch from a _config: BT, BV, PRECISION, num_stages, the
    role's m tile as BM and its num_warps, BD ("state": key states, "out": output) or BK
    ("bwd": reverse states and gradients), and constexprs."""
    bm, warps = _ROLES[role]
    opts = dict(BT=cfg["BT"], BM=cfg[bm], BV=cfg["BV"], PRECISION=PRECISION,  # read per launch, not cached
                num_warps=cfg[warps], num_stages=cfg["num_stages"])
    if role == "bwd":
        opts["BK"] = cfg["BK"]
    else:
        opts["BD"] = cfg["BD"]
    return opts | constexprs


def backward_in_value_slices(bwd_slice, grad_out, v, out, ev: int, q_dtype, k_dtype):
    """Run a backward on value columns: bwd_slice(grad_out, v, out, cols, grad_dtype) -> (dq, dk, dv),
    cols the slice of value columns (the saved states' columns to read).

    e up to ev runs once (dq, dk in q's / k's dtype). Wider e runs on cdiv(e, ev) even slices
    (one tile width, BV = ev): dq and dk are linear in (dN, dD) and dD = -rden (g . out) splits
    over value columns, so the slices' fp32 dq, dk add up exactly and their dv are its columns
    (NOTES "Wide heads")."""
    e = v.shape[-1]
    width = cdiv(e, cdiv(e, ev))
    if width == e:
        dq, dk, dv = bwd_slice(grad_out, v, out, slice(0, e), q_dtype)
        return dq.to(q_dtype), dk.to(k_dtype), dv
    dq = dk = None
    dv = []
    for e0 in range(0, e, width):
        cols = slice(e0, e0 + width)
        dq_s, dk_s, dv_s = bwd_slice(grad_out[..., cols], v[..., cols], out[..., cols], cols, torch.float32)
        dq = dq_s if dq is None else dq.add_(dq_s)
        dk = dk_s if dk is None else dk.add_(dk_s)
        dv.append(dv_s)
    return dq.to(q_dtype), dk.to(k_dtype), torch.cat(dv, dim=-1)
