"""Pure-PyTorch FAVOR+ attention with a hand-written backward: the CPU path, and the math of
kernels/NOTES.md (ratio-free features, per-row stats, keys factored as U * exp(row_scale - M),
states relative to a running reference, eps parts handled exactly) in plain tensor ops.

Work is done in row chunks batched over (b, h): the (b, h, n, m) features of the whole sequence
never exist at once, and only the contract's tensors are saved for backward (plus the non-causal
context or the causal chunk states, O(m e) per chunk), which recomputes features chunk by
chunk. States are (m, e + 1): values plus a ones column, so the numerator and the denominator
come out of the same matmul. Non-causal chunks are
sized by FEATURE_TILE. Causal attention does the masked intra-chunk part as (CHUNK, CHUNK)
matmuls and carries the state across chunks; whole chunks are batched into blocks (one product
of each kind per block, the chunk states summed in a short loop of small adds); the forward
saves the state before each chunk, and the backward makes one reverse sweep over the blocks.
With one key stabilizer per head (1.1.4's global max, or none: relu and given features) the
keys' exp(row_scale - M) factors fold into their features and the state is a plain prefix sum
(_fwd_blocks_per_head); with the prefix stabilizer (M per query row) the (t, t) pairs carry
the factors and the state moves with a running reference (_fwd_blocks_per_row).
Where the time goes: bench/RESULTS.md, "Profile of the PyTorch path".

Shapes: q (b, h, n, d), k (b, h, s, d), v (b, h, s, e), projection (m, d); for GIVEN, q and k
are the features (b, h, n, m), (b, h, s, m) and projection is None. fp16/bf16 compute in fp32;
fp64 computes in fp64, and its stats and rden are then fp64 too (one precision end to end).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .feature_maps import KERNEL_MAPS
from .kernels import CAUSAL_EPS, causal_coef, head_scale
from .validation import in_transform

LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)
# Rows per causal chunk: the intra-chunk (t, t) work grows with it; the per-chunk overhead and the
# saved states (one (m, e+1) per chunk) shrink with it.  64 rows: 1.39x the minimal FLOPs of
# fwd+bwd instead of 1.78x at 128, measured 5-15% faster on 1 and 2 threads (bench/RESULTS.md).
CHUNK = 64
# Non-causal chunks have no (t, t) part: their rows are as many as make one (b, h, t, m) feature
# tile of about FEATURE_TILE elements (2 MB in fp32, cache-resident between the passes over it),
# a multiple of 64 rows: 256 at b h = 8, m = 266, where the (b h t, d) @ (d, m) products ran at
# 1.4x the rate of 896-row chunks (issue 15).
FEATURE_TILE = 2**19
# The largest exponent _exp2_below_one lets through.  Not 0: the row max's own exponent is 0 up to
# that rounding (1e-5 at |dash| ~ 100 in fp32), and clamping it would zero its derivative where
# autograd runs this path (torch.func); 2^-4 is clamped only past |dash| ~ 2^19 (fp32), where the
# exponent's own rounding is as large.
EXP2_SLACK = 2.0**-4


class ChunkFeatures:
    """The feature map of one call (a kernel code, performer_triton.feature_maps.KERNEL_MAPS)
    on chunks of rows, in the compute dtype. Features are `base + eps`:
    SOFTMAX base = exp(dash - shift), shift = row max + |dn x|^2 / 2 for queries (base = q~ - eps)
    and row max for keys (base = U); RELU base = relu(dash); GIVEN base = the input rows."""

    def __init__(self, feature: int, projection: Tensor | None, d: int, dtype: torch.dtype,
                 causal_eps: float = CAUSAL_EPS):
        fmap = KERNEL_MAPS[feature]
        self.softmax = fmap.stabilized
        self.given = not fmap.fused
        dn = head_scale(d)
        # (m, d): dn folded into the projection once instead of scaling every chunk of x
        self.proj = None if self.given else projection.to(dtype) * dn
        # (m, d + 1): [dn P | 1], so the backward's one matmul also yields the row sums of du
        self.proj_sum = None if self.given else with_ones(self.proj)
        # SOFTMAX dashes in log2 units (exp2 costs 0.55x exp per element on this CPU): log2(e) is
        # folded into the projection, the shifts are scaled to match, statistics stay natural
        self.log2 = LOG2E if self.softmax else 1.0
        self.proj_dash = None if self.given else self.proj * self.log2
        self.dn2 = dn * dn
        self.eps = fmap.eps
        m = 0 if projection is None else projection.shape[0]
        self.causal_coef = causal_coef(feature, m, causal_eps)  # c_i = causal_coef * sum_f q~_if

    def dash(self, x: Tensor) -> Tensor:
        """(dn x) @ P^T (times log2(e) for SOFTMAX); GIVEN features pass through.
        (b, h, t, d) -> (b, h, t, m)."""
        if self.given:
            return x
        # one (b h t, d) @ (d, m) product: matmul would take a sliced x as b h small products
        return (x.reshape(-1, x.shape[-1]) @ self.proj_dash.mT).view(*x.shape[:-1], self.proj.shape[0])

    def row_max(self, dash: Tensor) -> Tensor:
        """max_f (dn x) . P_f of each row (natural units) from its dash, detached (a stabilizer:
        as 1.1.4's, it passes no gradient, also when favor_fwd runs under autograd).  -> (b, h, t)."""
        row = dash.detach().amax(-1)
        return row if self.log2 == 1.0 else row.mul_(LN2)

    def key_stats(self, x: Tensor, dash: Tensor) -> tuple[Tensor, Tensor]:
        """Keys' k_max = row_max(dash) and row_scale = k_max - |dn x|^2 / 2 (SOFTMAX).
        x (b, h, t, d), dash (b, h, t, m) -> ((b, h, t), (b, h, t))."""
        k_max = self.row_max(dash)
        return k_max, k_max - self.half_sq_norm(x)

    def half_sq_norm(self, x: Tensor) -> Tensor:
        """|dn x|^2 / 2.  (b, h, t, d) -> (b, h, t)."""
        return x.square().sum(-1) * (self.dn2 * 0.5)

    def query_base(self, x: Tensor, dash: Tensor, q_max: Tensor) -> Tensor:
        """q~ - eps.  x (b, h, t, d), dash (b, h, t, m) (overwritten), q_max (b, h, t) -> (b, h, t, m)."""
        if self.softmax:
            return _exp2_below_one(dash, (q_max + self.half_sq_norm(x)).mul_(LOG2E))
        return self._generalized(dash)

    def key_units(self, x: Tensor, k_max: Tensor, dash: Tensor | None = None) -> Tensor:
        """Key features minus eps before the exp(row_scale - M) factor (U for SOFTMAX).
        x (b, h, t, d), k_max (b, h, t), dash of x if already computed (overwritten) -> (b, h, t, m)."""
        dash = self.dash(x) if dash is None else dash
        if self.softmax:
            return _exp2_below_one(dash, k_max * LOG2E)
        return self._generalized(dash)

    def keys(self, x: Tensor, ref: Tensor, dash: Tensor | None = None) -> Tensor:
        """Key features minus eps relative to the reference R (b, h): U exp(row_scale - R)
        = exp(dash - |dn x|^2 / 2 - R) for SOFTMAX in one exponential (every entry <= 1 when
        R >= every row_scale), the base of the other maps (their row_scale and R are 0).
        x (b, h, t, d), dash of x if already computed (overwritten) -> (b, h, t, m)."""
        dash = self.dash(x) if dash is None else dash
        if self.softmax:
            return _exp2_below_one(dash, (self.half_sq_norm(x) + ref[..., None]).mul_(LOG2E))
        return self._generalized(dash)

    def _generalized(self, dash: Tensor) -> Tensor:
        return dash if self.given else dash.clamp_min_(0.0)

    def vjp(self, x: Tensor, base: Tensor, dbase: Tensor) -> Tensor:
        """Gradient w.r.t. rows x from the gradient w.r.t. their base (overwritten).  -> (b, h, t, d)."""
        if self.given:
            return dbase
        if not self.softmax:  # by selection: an inf gradient at a dead unit adds nothing
            return _where_positive(base, dbase) @ self.proj
        # through exp, du = dbase base is the gradient w.r.t. dash - diag; dash and diag both
        # depend on x: dx = dn du @ P - dn^2 rowsum(du) x, both from one matmul with [dn P | 1]
        du_p = dbase.mul_(base) @ self.proj_sum  # (b, h, t, d + 1)
        return torch.addcmul(du_p[..., :-1], du_p[..., -1:], x, value=-self.dn2)


def _where_positive(base: Tensor, x: Tensor) -> Tensor:
    """x where base > 0, else +0 (x overwritten), selected on the bits: an inf or NaN of x where
    base is not positive adds nothing, as with torch.where, whose kernel takes a branch per
    element (~4x slower on the random masks of relu features); torch.where itself where autograd
    records (the backward of KeysState and ReadContext under create_graph).  base, x (...) -> (...)."""
    if torch.is_grad_enabled() and (x.requires_grad or base.requires_grad):  # a backward under create_graph
        return torch.where(base > 0, x, 0.0)
    ints = torch.int32 if x.dtype == torch.float32 else torch.int64  # (the compute dtypes)
    keep = (base > 0).to(ints).neg_()  # all bits set where kept
    return x.view(ints).bitwise_and_(keep).view(x.dtype)


def _exp2_below_one(dash: Tensor, shift: Tensor) -> Tensor:
    """exp2(dash - shift), the exponent clamped at EXP2_SLACK: every SOFTMAX exponent is <= 0
    exactly (shift >= the row's max of dash), but a shift made from stats in natural units is up
    to a few ulps of |dash| short of it, which past |dash| ~ 2^30 in fp32 (keys of norm ~1e10)
    is beyond exp2's range: inf, then NaN.  dash (b, h, t, m) (overwritten), shift (b, h, t) -> (b, h, t, m)."""
    return dash.sub_(shift[..., None]).clamp_max_(EXP2_SLACK).exp2_()


def autocast_off(fn):
    """Run fn with autocast off on the device of its first tensor argument: the compute dtype
    is chosen by the code (fp32 for fp16/bf16 inputs), and an enclosing torch.autocast would
    recast every product to 16 bits (and mix dtypes in the in-place ones)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if not torch.amp.is_autocast_available(device):  # (meta tensors: no autocast to turn off)
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What inputs of dtype compute and keep their states in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, rows: int) -> list[slice]:
    """Slices of `rows` rows (the last one shorter) covering n."""
    return [slice(t0, min(t0 + rows, n)) for t0 in range(0, n, rows)]


def _by_chunk(x: Tensor, t: int) -> Tensor:
    """The rows of a block as its chunks of t rows.  (b, h, nc t, ...) -> (b, h, nc, t, ...)."""
    return x.unflatten(2, (-1, t))


def _blocks(n: int, bh: int, m: int) -> list[tuple[slice, int]]:
    """Causal blocks: whole CHUNK-row chunks, as many per block as _wide_rows allows (one product
    per kind for all of them), then the rest of the rows as one shorter chunk.
    -> (rows of the block, rows per chunk) pairs."""
    full = n // CHUNK * CHUNK
    rows = max(CHUNK, _wide_rows(bh, m) // CHUNK * CHUNK)
    blocks = [(sl, CHUNK) for sl in _chunks(full, rows)]
    return blocks + ([(slice(full, n), n - full)] if full < n else [])


def _wide_rows(bh: int, m: int) -> int:
    """Rows per non-causal chunk (FEATURE_TILE) for b h heads of m features."""
    return max(64, round(FEATURE_TILE / max(1, bh * m) / 64) * 64)


def with_ones(x: Tensor) -> Tensor:
    """Append a ones column, so a matmul with it also yields row sums.  (b, h, t, e) -> (b, h, t, e+1)."""
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def _bmm(a: Tensor, b: Tensor, acc: Tensor | None = None) -> Tensor:
    """(acc +) a @ b over the leading dims of a (b, h or b, h, G), via one baddbmm when
    accumulating; acc may broadcast, and is overwritten (the caller's temporary: no copy of it)
    when it has the output's shape and is contiguous.  a (..., t, k), b (..., k, c) -> (..., t, c)."""
    if acc is None:
        return a @ b
    lead = a.shape[:-2]
    shape = (*lead, a.shape[-2], b.shape[-1])
    a, b = a.flatten(0, -3), b.expand(*lead, *b.shape[-2:]).flatten(0, -3)
    if acc.shape == shape and acc.is_contiguous() and not in_transform():
        acc.flatten(0, -3).baddbmm_(a, b)  # (a view: acc is contiguous; vmap has no batching rule for it)
        return acc
    return torch.baddbmm(acc.expand(shape).flatten(0, -3), a, b).view(shape)


def _key_stabilizer(k_max: Tensor, before: Tensor, prefix: bool) -> Tensor:
    """The key stabilizer M (SOFTMAX; the other maps have none: 0) of keys with row maxima k_max
    (b, h, t) after a state's stabilizer before (b, h; -inf: no state): prefix, each row's running
    max (b, h, t); else one max over every key (1.1.4's, non-causal too) (b, h).  The forward
    and the backward both take M from here."""
    if prefix:
        return torch.maximum(torch.cummax(k_max, -1).values, before[..., None])
    return torch.maximum(k_max.amax(-1), before)


def _intra_factor(row_scale: Tensor, stab: Tensor) -> Tensor:
    """F_ij = exp(row_scale_j - M_i), <= 1 for j <= i (row_scale_j <= M_i there); the pairs j > i,
    clamped to exp(0) here (finite values and gradients), are cut by _visible.
    row_scale, stab (b, h, t) -> (b, h, t, t)."""
    return (row_scale[..., None, :] - stab[..., :, None]).clamp_max_(0.0).exp_()


def _visible_only(pairs: Tensor) -> Tensor:
    """pairs (..., t, t) with the entries above the diagonal (keys after the query) 0, by
    selection (tril_: 10x faster than a broadcast masked_fill_); overwritten, but under torch.func
    (vmap has no batching rule for tril_)."""
    return pairs.tril() if in_transform() else pairs.tril_()


def _visible(pairs: Tensor, factor: Tensor) -> Tensor:
    """pairs_ij F_ij on visible pairs (j <= i) and 0 elsewhere, by selection: a NaN or inf key
    or value at a later position never reaches an earlier output (0 * NaN = NaN).
    pairs (b, h, t, t) (overwritten), factor (b, h, t, t) -> (b, h, t, t)."""
    return _visible_only(pairs.mul_(factor))


def add_keys(hz: Tensor, ref: Tensor, units: Tensor, row_scale: Tensor, vo: Tensor) -> tuple[Tensor, Tensor]:
    """The one update of the causal state (chunked path and decoder): add keys to
    hz = sum_j exp(row_scale_j - R) units_j [v_j, 1]^T, moving the reference R to the running max
    of row_scale (both exp factors <= 1).  A key with row_scale -inf adds nothing; before any key
    R stays -inf and hz zero.  hz (b, h, m, e+1), ref (b, h), units (b, h, t, m),
    row_scale (b, h, t), vo (b, h, t, e+1) -> (hz, ref)."""
    return merge_referenced(hz, ref, *_chunk_states(units, row_scale, vo))


def _chunk_states(units: Tensor, row_scale: Tensor, vo: Tensor) -> tuple[Tensor, Tensor]:
    """Each chunk's own state: sum_j exp(row_scale_j - r) units_j [v_j, 1]^T relative to its
    max r of row_scale (0 for the products while -inf: no key).  units (..., t, m),
    row_scale (..., t), vo (..., t, e+1) -> ((..., m, e+1), r (...))."""
    local, base = _key_reference(row_scale)
    return units.mT @ (vo * (row_scale - base[..., None]).exp_()[..., None]), local  # (scaling the narrower side)


def finite_base(ref: Tensor) -> Tensor:
    """What exp factors are taken against for a reference ref (a running max): ref itself, 0
    where it is -inf (no key yet: nothing to scale, and -inf - -inf would be NaN)."""
    return ref.masked_fill(torch.isinf(ref), 0.0)


def _key_reference(row_scale: Tensor) -> tuple[Tensor, Tensor]:
    """The reference of keys of row_scale (..., t): their max r, and the finite base their exp
    factors are taken against (r; 0 while r is -inf: no key), detached: a state's reference is a
    constant of its derivative, as in the backward.  -> (r, base), each (...)."""
    local = row_scale.detach().amax(-1)
    return local, finite_base(local)


def merge_referenced(hz: Tensor, ref: Tensor, kv: Tensor, kv_ref: Tensor) -> tuple[Tensor, Tensor]:
    """hz relative to ref plus a chunk state kv relative to kv_ref, relative to the larger
    reference (both factors <= 1; the finite base 0 while neither has a key).  -> (hz, ref)."""
    new_ref = torch.maximum(ref, kv_ref)
    base = finite_base(new_ref)[..., None, None]
    hz = hz * (ref[..., None, None] - base).exp_()
    factor = (kv_ref[..., None, None] - base).exp_()
    return (torch.addcmul(hz, kv, factor) if in_transform() else hz.addcmul_(kv, factor)), new_ref


def _scan_states(hz: Tensor, ref: Tensor, kv: Tensor, kv_ref: Tensor, hz_before: Tensor,
                 ref_before: Tensor) -> tuple[Tensor, Tensor]:
    """The state before each of G chunks, written into hz_before (b, h, G, m, e+1) and
    ref_before (b, h, G), from the state before the first, hz (b, h, m, e+1) and ref (b, h), and
    the chunks' own states kv (b, h, G, m, e+1), kv_ref (b, h, G).  -> the state after the last.
    (Copies, not out= arguments: favor_fwd also runs under autograd, for create_graph.)"""
    for c in range(kv.shape[2]):
        hz_before[:, :, c], ref_before[:, :, c] = hz, ref
        hz, ref = merge_referenced(hz, ref, kv[:, :, c], kv_ref[:, :, c])
    return hz, ref


def _chunk_count(n: int) -> int:
    """Causal chunks of n rows (_blocks): whole CHUNK-row chunks and a shorter last one."""
    return -(-n // CHUNK)


def _finite_values(v: Tensor):
    """Causal values as the chunks see them: [v_j, 1] with inf and NaN entries of v replaced by
    0, per block of rows, and the running sum of what was replaced, which each output adds back
    (None when v is all finite: one reduction decides, no pass of (s, e) temporaries).
    v (b, h, s, e) -> (rows slice -> (b, h, t, e+1), poison (b, h, s, e) or None)."""
    # a non-finite entry makes the sum non-finite (inf or NaN); under vmap (torch.func) a value
    # cannot steer Python: the general form, the same numbers
    if not in_transform() and torch.isfinite(v.sum()):
        return (lambda sl: with_ones(v[..., sl, :])), None
    finite = finite_or_zero(v)
    return (lambda sl: with_ones(finite[..., sl, :])), (v - finite).cumsum(-2)


def finite_or_zero(x: Tensor) -> Tensor:
    """x with inf and NaN entries replaced by 0 (x - x is 0 exactly where x is finite)."""
    return torch.where(x - x == 0, x, 0.0)


def _grad_aug(grad_out: Tensor, out: Tensor, rden: Tensor) -> Tensor:
    """[dN, dD] with dN_i = g_i rden_i, dD_i = -(g_i . out_i) rden_i.  -> (b, h, n, e+1).
    An output a future inf / NaN value made non-finite adds nothing where its gradient is 0."""
    go = torch.where(grad_out == 0, 0.0, grad_out * out).sum(-1, keepdim=True)
    return torch.cat([grad_out, -go], dim=-1) * rden[..., None]


def empty_state(b: int, h: int, m: int, e: int, dtype: torch.dtype,
                device: torch.device | str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The causal state before any key (performer_triton.attention_state's fields): hz (b, h, m,
    e+1) and v_sum (b, h, e+1) zero, ref and stab (b, h) -inf (no keys: R = M = -inf)."""
    kw = dict(dtype=dtype, device=device)
    return (torch.zeros(b, h, m, e + 1, **kw), torch.zeros(b, h, e + 1, **kw), torch.full((b, h), float("-inf"), **kw),
            torch.full((b, h), float("-inf"), **kw))


def _initial(initial, q: Tensor, m: int, e: int, dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(hz, v_sum (b, h, 1, e+1), ref, stab) in the compute dtype from a causal state
    (performer_triton.attention_state), or the empty state; q's dtype is the compute dtype."""
    hz, v_sum, ref, stab = empty_state(*q.shape[:2], m, e, q.dtype, q.device) if initial is None else (
        t.to(dtype) for t in initial)
    return hz, v_sum[..., None, :], ref, stab


def saved_like(q: Tensor, v: Tensor, projection: Tensor | None, causal: bool) -> list[Tensor]:
    """Empty tensors shaped as what favor_fwd (without final) returns for its backward, in the
    compute dtype: non-causal, the context (b, h, m, e+1); causal, the state before each chunk
    (b, h, chunks, m, e+1) and its reference (b, h, chunks)."""
    (b, h, n), e = q.shape[:3], v.shape[-1]
    m = q.shape[-1] if projection is None else projection.shape[0]
    dtype = compute_dtype(q.dtype)
    if causal:
        chunks = _chunk_count(n)
        return [q.new_empty((b, h, chunks, m, e + 1), dtype=dtype), q.new_empty((b, h, chunks), dtype=dtype)]
    return [q.new_empty((b, h, m, e + 1), dtype=dtype)]


class KeysState(torch.autograd.Function):
    """The causal state (performer_triton.attention_state) after keys k (b, h, s, d), or their
    features for GIVEN, and values v (b, h, s, e) from the empty state, without queries:
    hz (b, h, m, e+1), v_sum (b, h, e+1), ref, stab (b, h), in the compute dtype.  Chunks of keys
    added with add_keys; the backward recomputes each chunk's keys relative to the final
    reference, so nothing of size (s, m) is kept.  apply(k, v, projection, feature)."""

    @staticmethod
    @autocast_off
    def forward(ctx, k: Tensor, v: Tensor, projection: Tensor | None, feature: int):
        dtype = compute_dtype(k.dtype)
        fm = ChunkFeatures(feature, projection, k.shape[-1], dtype)
        (b, h, s), e = k.shape[:3], v.shape[-1]
        m = k.shape[-1] if fm.given else fm.proj.shape[0]
        hz, _, ref, stab = empty_state(b, h, m, e, dtype, k.device)
        for sl in _chunks(s, _wide_rows(b * h, m)):
            kc, vo = k[..., sl, :].to(dtype), with_ones(v[..., sl, :].to(dtype))
            dash = fm.dash(kc)
            if fm.softmax:
                k_max, row_scale = fm.key_stats(kc, dash)
                stab = torch.maximum(stab, k_max.amax(-1))
            else:  # 0: the reference of the maps without a stabilizer once a key is in
                k_max = row_scale = kc.new_zeros(kc.shape[:-1])
            hz, ref = add_keys(hz, ref, fm.key_units(kc, k_max, dash), row_scale, vo)
        v_sum = with_ones(v.to(dtype)).sum(-2)
        ctx.save_for_backward(k, v, projection, ref)
        ctx.feature = feature
        ctx.mark_non_differentiable(ref, stab)
        return hz, v_sum, ref, stab

    @staticmethod
    @autocast_off
    def backward(ctx, d_hz: Tensor | None, d_v_sum: Tensor | None, _ref, _stab):
        k, v, projection, ref = ctx.saved_tensors
        dtype = ref.dtype
        fm = ChunkFeatures(ctx.feature, projection, k.shape[-1], dtype)
        (b, h, s), e = k.shape[:3], v.shape[-1]
        m = k.shape[-1] if fm.given else fm.proj.shape[0]
        d_hz = k.new_zeros((b, h, m, e + 1), dtype=dtype) if d_hz is None else d_hz.to(dtype)
        d_v = k.new_zeros((b, h, 1, e), dtype=dtype) if d_v_sum is None else d_v_sum[:, :, None, :e].to(dtype)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        base = finite_base(ref)  # (no key: no chunk either)
        for sl in _chunks(s, _wide_rows(b * h, m)):
            kc, vc = k[..., sl, :].to(dtype), v[..., sl, :].to(dtype)
            keys = fm.keys(kc, base)  # (b, h, t, m): the keys' terms of hz, each <= 1
            dv[..., sl, :] = keys @ d_hz[..., :e] + d_v
            dk[..., sl, :] = fm.vjp(kc, keys, with_ones(vc) @ d_hz.mT)
        return dk, dv, None, None


def key_context(hz: Tensor, ref: Tensor, stab: Tensor, v_sum: Tensor, eps: float) -> Tensor:
    """sum_j k~_j(M) [v_j, 1] = exp(R - M) H(R) + eps [sum_j v_j, s]: the non-causal context of keys
    held as a state (hz (b, h, m, e+1) relative to R = ref, v_sum (b, h, e+1)) for the key
    stabilizer M = stab (b, h).  -> (b, h, m, e+1)."""
    return torch.addcmul(eps * v_sum[..., None, :], hz, (ref - stab).exp()[..., None, None])


def reciprocal_or_zero(den: Tensor) -> Tensor:
    """1 / D, and 0 where D = 0 (no key, or query features all zero: output 0 and no gradient);
    the unused branch divides by 1, so no inf meets a zero gradient under autograd."""
    zero = den == 0
    return torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, den))


def _read(base: Tensor, context: Tensor, eps_nd: Tensor, out: Tensor, rden: Tensor) -> None:
    """Queries q~ = base + eps (b, h, t, m) reading a context (b, h, m, e+1), the eps part
    eps_nd = eps colsum(context) folded into the product: out (b, h, t, e) = N / D and
    rden (b, h, t) = 1 / D written in place.  D = 0 only when there is no key (GIVEN zero
    features): output 0."""
    nd = _bmm(base, context, eps_nd)  # (b, h, t, e+1) = [N, D]
    _normalized(nd, nd[..., -1], out, rden)


def _normalized(nd: Tensor, den: Tensor, out: Tensor, rden: Tensor) -> None:
    """out = N / D and rden = 1 / D (0 where D = 0) written into the rows' views out (b, h, t, e)
    and rden (b, h, t), from nd = [N, .] (b, h, t, e+1) and the denominator den (b, h, t)."""
    r = reciprocal_or_zero(den)  # (not read back from rden: under autograd, later rows change it)
    out.copy_(nd[..., :out.shape[-1]] * r[..., None])
    rden.copy_(r)


def _query_base(fm: ChunkFeatures, x: Tensor) -> Tensor:
    """q~ - eps of queries x (b, h, t, d) with their own row maxima.  -> (b, h, t, m)."""
    dash = fm.dash(x)
    return fm.query_base(x, dash, fm.row_max(dash) if fm.softmax else None)


class ReadContext(torch.autograd.Function):
    """Non-causal attention of queries q (b, h, n, d), or their features for GIVEN, on a given
    context C (b, h, m, e+1) = sum over keys of k~_j [v_j, 1] (ratio-free key features):
    out_i = q~_i C[:, :e] / q~_i C[:, e] -> (b, h, n, e) in q's dtype.  Chunks of queries; the
    backward recomputes their features, so nothing of size (n, m) is kept (saved: q, C, out and
    1 / q~ C[:, e]).  The query stabilizer is detached, as in 1.1.4.  apply(q, context,
    projection, feature)."""

    @staticmethod
    @autocast_off
    def forward(ctx, q: Tensor, context: Tensor, projection: Tensor | None, feature: int) -> Tensor:
        dtype = compute_dtype(q.dtype)
        fm = ChunkFeatures(feature, projection, q.shape[-1], dtype)
        context = context.to(dtype)
        (b, h, n), e = q.shape[:3], context.shape[-1] - 1
        out, rden = q.new_empty((b, h, n, e), dtype=dtype), q.new_empty((b, h, n), dtype=dtype)
        eps_nd = context.sum(-2, keepdim=True) * fm.eps  # (b, h, 1, e+1): the eps part of every q~
        for sl in _chunks(n, _wide_rows(b * h, context.shape[-2])):
            _read(_query_base(fm, q[..., sl, :].to(dtype)), context, eps_nd, out[..., sl, :], rden[..., sl])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, context, projection, out, rden)
        ctx.feature = feature
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: Tensor):
        q, context, projection, out, rden = ctx.saved_tensors
        dtype = context.dtype
        fm = ChunkFeatures(ctx.feature, projection, q.shape[-1], dtype)
        b, h, n = q.shape[:3]
        dq, d_context = torch.empty_like(q), torch.zeros_like(context)
        for sl in _chunks(n, _wide_rows(b * h, context.shape[-2])):
            x = q[..., sl, :].to(dtype)
            base = _query_base(fm, x)
            grad = _grad_aug(grad_out[..., sl, :].to(dtype), out[..., sl, :].to(dtype), rden[..., sl])  # [dN, dD]
            d_context += base.mT @ grad + fm.eps * grad.sum(-2, keepdim=True)  # (the eps part of q~ folded)
            dq[..., sl, :] = fm.vjp(x, base, grad @ context.mT)
        return dq, d_context, None, None


@autocast_off
def favor_fwd(
    q: Tensor, k: Tensor, v: Tensor, projection: Tensor | None, *, causal: bool, feature: int, prefix: bool,
    causal_eps: float = CAUSAL_EPS, initial: tuple | None = None, final: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """FAVOR+ forward.  -> out (b, h, n, e) in q's dtype; q_max (b, h, n), k_max, k_scale (b, h, s)
    for SOFTMAX, else (b, h, 0); rden (b, h, n) = 1 / D_i. Stats and rden in the compute dtype.
    The last output is what the backward reads besides them (`saved_like`): non-causal, the
    context (b, h, m, e+1); causal, the state before each chunk and its reference (O(n m e / CHUNK):
    the backward walks no keys to rebuild them), then with final, the state after the last key
    (hz, v_sum, ref, stab). Causal only: initial, the state before the first key (callers pass
    prefix with it for SOFTMAX).  Causal calls have a query at every key's position (n = s: the
    public entry points place absent ones, functional._after), and prefix is SOFTMAX's only."""
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fm = ChunkFeatures(feature, projection, q.shape[-1], dtype, causal_eps)
    (b, h, n), s, e = q.shape[:-1], k.shape[-2], v.shape[-1]
    if causal and n != s or prefix and not (causal and fm.softmax):
        raise ValueError(f"favor_fwd: causal calls take a query per key (n = {n}, s = {s}) and the prefix "
                         f"stabilizer softmax features only (causal={causal}, prefix={prefix}, feature={feature})")
    stats = fm.softmax
    q_max = q.new_empty((b, h, n if stats else 0))
    # filled block by block with the keys, but for the causal global stabilizer: M is needed
    # from the first block on, so its keys make a pass of their own first
    k_max, k_scale = k.new_empty((b, h, s if stats else 0)), k.new_empty((b, h, s if stats else 0))
    if stats and causal and not prefix:
        for sl in _chunks(s, _wide_rows(b * h, fm.proj.shape[0])):
            k_max[..., sl], k_scale[..., sl] = fm.key_stats(k[..., sl, :], fm.dash(k[..., sl, :]))
    out = q.new_empty((b, h, n, e))
    rden = q.new_empty((b, h, n))
    m = q.shape[-1] if fm.given else fm.proj.shape[0]
    # sum_j exp(u_j - ref) [v_j, 1], [sum of v, count] before the first key, R, M
    hz, v_before, ref, stab0 = _initial(initial, q, m, e, dtype)

    if not causal:
        rows = _wide_rows(b * h, m)
        for sl in _chunks(s, rows):  # one projection of each key chunk: its stats, then its keys
            kc, dash = k[..., sl, :], fm.dash(k[..., sl, :])
            if stats:
                k_max[..., sl], k_scale[..., sl] = fm.key_stats(kc, dash)
            local, base = _key_reference(k_scale[..., sl] if stats else kc.new_zeros(kc.shape[:-1]))
            hz, ref = merge_referenced(hz, ref, fm.keys(kc, base, dash).mT @ with_ones(v[..., sl, :]), local)
        stab = _key_stabilizer(k_max, stab0, False) if stats else q.new_zeros((b, h))
        v_sum = torch.cat([v.sum(-2), v.new_full((b, h, 1), s)], -1)  # (b, h, e+1): [sum of v, count]
        context = key_context(hz, ref, stab, v_sum, fm.eps)  # saved for the backward
        eps_nd = context.sum(-2, keepdim=True).mul_(fm.eps)  # (b, h, 1, e+1): the eps part of every q~
        for sl in _chunks(n, rows):
            qc, dash = q[..., sl, :], fm.dash(q[..., sl, :])
            if stats:
                q_max[..., sl] = fm.row_max(dash)
            _read(fm.query_base(qc, dash, q_max[..., sl]), context, eps_nd, out[..., sl, :], rden[..., sl])
        return out.to(in_dtype), q_max, k_max, k_scale, rden, [context]

    # An inf or NaN value reaches the outputs from its own position on only (a (t, t) matmul
    # would spread it to earlier rows as 0 * inf): the chunks see finite values, and each
    # output adds the running sum of the non-finite ones.
    values, poison = _finite_values(v)
    saved = saved_like(q, v, projection, causal)  # the state before each chunk, and its R
    if prefix:  # M_i: the running max of k_max from the state's M0 on, found block by block
        hz, ref, v_before, stab = _fwd_blocks_per_row(fm, q, k, values, stab0, hz, ref, v_before, q_max, k_max,
                                                      k_scale, out, rden, saved)
    else:  # one M per head (0 without stats)
        stab = _key_stabilizer(k_max, stab0, False) if stats else q.new_zeros((b, h))
        hz, ref, v_before = _fwd_blocks_per_head(fm, q, k, values, stab, hz, ref, v_before, q_max, out, rden, saved)
    if final:  # M after the last key: the newest query's (prefix) stabilizer
        # contiguous (the op's fake says so) and none of them an input (custom ops may not alias)
        saved += [hz.contiguous(), v_before[..., 0, :].contiguous(), ref.contiguous(),
                  (stab if stats else stab0).clone(memory_format=torch.contiguous_format)]
    if poison is not None:
        out.add_(poison)
    return out.to(in_dtype), q_max, k_max, k_scale, rden, saved


def _write_rows(fm: ChunkFeatures, nd: Tensor, q_sum: Tensor, sl: slice, out: Tensor, rden: Tensor) -> None:
    """out = N / D and rden = 1 / D of the rows sl from nd = [N, D] (b, h, t, e+1) and the query
    sums q_sum (b, h, t), the causal eps part of D (c_i = causal_coef * sum_f q~_if) added here."""
    _normalized(nd, nd[..., -1] + fm.causal_coef * q_sum, out[..., sl, :], rden[..., sl])


def _pair_weights(fm: ChunkFeatures, base: Tensor, keys: Tensor, q_sum: Tensor) -> Tensor:
    """q~_i . k~_j on visible pairs (j <= i) of each chunk, 0 elsewhere (by selection), the keys'
    factors already in their features: (q~_i - eps) . (k~_j - eps) + eps sum_f (k~_jf - eps)
    + eps sum_f q~_if, the eps terms as the product's accumulator.
    base, keys (b, h, nc, t, m), q_sum (b, h, nc, t) -> (b, h, nc, t, t)."""
    acc = torch.add(keys.sum(-1)[..., None, :], q_sum[..., :, None]).mul_(fm.eps)
    return _visible_only(_bmm(base, keys.mT, acc))


def _prefix_over_chunks(before: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """Running sums over chunks: before (b, h, ...) plus the chunks' own sums own (b, h, nc, ...).
    -> (the sum before each chunk (b, h, nc, ...), the sum after the last (b, h, ...))."""
    sums = [before]
    for c in range(own.shape[2]):
        sums.append(sums[-1] + own[:, :, c])
    return torch.stack(sums[:-1], 2), sums[-1]


def _suffix_over_chunks(after: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """Running sums over chunks from the last: after (b, h, ...), the sum over what follows the
    block, plus the chunks' own sums own (b, h, nc, ...).  -> (the sum over what follows each chunk
    (b, h, nc, ...), the sum over the block and what follows it (b, h, ...))."""
    sums = [after]
    for c in reversed(range(own.shape[2])):
        sums.append(sums[-1] + own[:, :, c])
    return torch.stack(sums[-2::-1], 2), sums[-1]


def _fwd_blocks_per_head(fm: ChunkFeatures, q: Tensor, k: Tensor, values, stab: Tensor, hz: Tensor, ref: Tensor,
                         v_before: Tensor, q_max: Tensor, out: Tensor, rden: Tensor, saved: list[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The causal blocks when the key stabilizer is one number per head, stab = M (b, h) (1.1.4's
    global max; 0 for the maps without one): every key's factor exp(row_scale_j - M) <= 1 folds
    into its features, k~ - eps = exp(dash - |dn k|^2 / 2 - M) as 1.1.4 makes them, and the state
    is a plain prefix sum of k~ [v, 1]^T relative to M, with no running reference to move.
    Writes q_max, out, rden and the state before each chunk (saved, its reference M); hz, ref: the
    state before the first key (relative to ref; -inf: empty).  -> (hz, M, v_before) after the last."""
    (b, h, n), m = q.shape[:3], saved[0].shape[-2]
    eps = fm.eps
    hz = hz * (ref - stab).exp().masked_fill_(torch.isinf(ref), 0.0)[..., None, None]  # relative to M
    saved[1].copy_(stab[..., None].expand_as(saved[1]))
    for sl, t in _blocks(n, b * h, m):
        qc = q[..., sl, :]
        dash = fm.dash(qc)
        if fm.softmax:
            q_max[..., sl] = fm.row_max(dash)
        base = _by_chunk(fm.query_base(qc, dash, q_max[..., sl]), t)  # q~ - eps   (b, h, nc, t, m)
        keys = _by_chunk(fm.keys(k[..., sl, :], stab), t)  # k~ - eps   (b, h, nc, t, m)
        vc = _by_chunk(values(sl), t)  # (b, h, nc, t, e+1)
        q_sum = base.sum(-1).add_(m * eps)  # sum_f q~_if   (b, h, nc, t)
        scores = _pair_weights(fm, base, keys, q_sum)  # (b, h, nc, t, t)
        # the state before each chunk, and [sum v, count] before each chunk   (b, h, nc, m | 1, e+1)
        chunks = slice(sl.start // CHUNK, sl.start // CHUNK + vc.shape[2])
        hz_before, hz = _prefix_over_chunks(hz, keys.mT @ vc)
        saved[0][:, :, chunks] = hz_before
        v_chunks, v_before = _prefix_over_chunks(v_before, vc.sum(-2, keepdim=True))
        # inter: (q~ - eps) @ H + eps colsum(H) + eps sum(q~_i) [sum v, count] before the chunk
        nd = _bmm(base, hz_before, torch.addcmul(hz_before.sum(-2, keepdim=True), q_sum[..., None], v_chunks).mul_(eps))
        nd = _bmm(scores, vc, nd).flatten(2, 3)  # + intra
        _write_rows(fm, nd, q_sum.flatten(2, 3), sl, out, rden)
    return hz, stab, v_before


def _fwd_blocks_per_row(fm: ChunkFeatures, q: Tensor, k: Tensor, values, stab: Tensor, hz: Tensor, ref: Tensor,
                        v_before: Tensor, q_max: Tensor, k_max: Tensor, k_scale: Tensor, out: Tensor, rden: Tensor,
                        saved: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The causal blocks with a stabilizer per query row (the prefix one, SOFTMAX): M_i, the max
    of stab (b, h) (the state's; -inf: none) and of k_max up to row i, found block by block with
    the keys' stats; keys as U_j with the factors exp(row_scale_j - M_i) on the (t, t) pairs, and
    the state moved to the running max R of row_scale (both factors <= 1: no future key changes a
    past output).  Writes k_max and k_scale too; the other arguments as _fwd_blocks_per_head's.
    -> (hz, R, v_before, M) after the last key."""
    (b, h, n), m = q.shape[:3], saved[0].shape[-2]
    for sl, t in _blocks(n, b * h, m):
        qc, kc = q[..., sl, :], k[..., sl, :]
        dash = fm.dash(qc)
        q_max[..., sl] = fm.row_max(dash)
        base = _by_chunk(fm.query_base(qc, dash, q_max[..., sl]), t)  # q~ - eps   (b, h, nc, t, m)
        dash = fm.dash(kc)
        # (the block's own tensors feed the products: under autograd, later blocks write the buffers)
        k_max[..., sl], k_scale[..., sl] = kmax, row_scale = fm.key_stats(kc, dash)  # (b, h, t) each
        stab_rows = _key_stabilizer(kmax, stab, True)  # M_i   (b, h, t)
        stab = stab_rows[..., -1]
        units = _by_chunk(fm.key_units(kc, kmax, dash), t)  # (b, h, nc, t, m)
        vo = values(sl)  # (b, h, nc t, e+1)
        vc = _by_chunk(vo, t)
        m_i, rs = _by_chunk(stab_rows, t), _by_chunk(row_scale, t)
        q_sum = base.sum(-1).add_(m * fm.eps)  # sum_f q~_if   (b, h, nc, t)
        # q~_i . U_j = (q~_i - eps) . U_j + eps sum_f U_jf, the eps terms folded into the products
        pairs = _bmm(base, units.mT, units.sum(-1).mul_(fm.eps)[..., None, :])
        scores = _visible(pairs, _intra_factor(rs, m_i))  # (b, h, nc, t, t)
        v_upto = vo.cumsum(-2).add_(v_before)  # (b, h, nc t, e+1): [sum v, count] over keys j <= i
        # the state before each chunk (H(R) relative to its R), from the chunks' own states
        chunks = slice(sl.start // CHUNK, sl.start // CHUNK + vc.shape[2])
        kv, kv_ref = _chunk_states(units, rs, vc)
        # (block-local, then saved: under autograd the products must not read a tensor that later blocks write)
        hz_before, ref_before = torch.empty_like(kv), torch.empty_like(kv_ref)
        hz, ref = _scan_states(hz, ref, kv, kv_ref, hz_before, ref_before)
        saved[0][:, :, chunks], saved[1][:, :, chunks] = hz_before, ref_before
        # inter: exp(R - M_i) q~ @ H(R); eps part of every visible key: eps sum(q~_i) v_upto_i
        nd = _bmm(base, hz_before, hz_before.sum(-2, keepdim=True).mul_(fm.eps))
        nd.mul_((ref_before[..., None] - m_i).exp_()[..., None])
        nd = _bmm(scores, vc, torch.addcmul(nd, q_sum[..., None], _by_chunk(v_upto, t), value=fm.eps)).flatten(2, 3)
        _write_rows(fm, nd, q_sum.flatten(2, 3), sl, out, rden)
        v_before = v_upto[..., -1:, :]
    return hz, ref, v_before, stab


@autocast_off
def favor_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor | None, out: Tensor,
    q_max: Tensor, k_max: Tensor, k_scale: Tensor, rden: Tensor, *, causal: bool, feature: int, prefix: bool,
    causal_eps: float = CAUSAL_EPS, saved: list[Tensor] | None = None, initial: tuple | None = None,
    final: tuple | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """FAVOR+ backward from favor_fwd's outputs (stabilizers detached).  -> dq, dk, dv in the
    dtypes of q, k, v (for GIVEN, dq and dk are gradients w.r.t. the features) and the gradients
    of the initial state's hz and v_sum ([] without one).  saved: the forward's last output
    (non-causal); final: (state, d hz, d v_sum), the forward's final state and the gradients it
    received (None when it had none)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    q_max, k_max, k_scale, rden = q_max.to(dtype), k_max.to(dtype), k_scale.to(dtype), rden.to(dtype)
    fm = ChunkFeatures(feature, projection, q.shape[-1], dtype, causal_eps)
    (b, h, n), s, e = q.shape[:-1], k.shape[-2], v.shape[-1]

    def grad(sl: slice) -> Tensor:  # [dN, dD] of the rows sl   (b, h, t, e+1)
        return _grad_aug(grad_out[..., sl, :].to(dtype), out[..., sl, :].to(dtype), rden[..., sl])

    m = q.shape[-1] if fm.given else fm.proj.shape[0]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the fake
    _, v_before, _, stab0 = _initial(initial, q, m, e, dtype)  # [sum v, count] before the first key, M0
    # the forward's M: (b, h, n) for the prefix stabilizer, else (b, h)
    stab = _key_stabilizer(k_max, stab0, prefix and causal) if fm.softmax else q.new_zeros((b, h))

    def query_base(sl: slice) -> Tensor:  # q~ - eps (b, h, t, m)
        return fm.query_base(q[..., sl, :], fm.dash(q[..., sl, :]), q_max[..., sl])

    def done(d_initial: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), d_initial or []

    if not causal:
        rows = _wide_rows(b * h, m)
        (context,) = saved  # the forward's sum_j k~_j [v_j, 1]   (b, h, m, e+1)
        # sum_i q~_i [dN_i, dD_i] = sum_i (q~_i - eps) [dN_i, dD_i] + eps sum_i [dN_i, dD_i]   (m, e+1)
        dhz, g_sum = q.new_zeros((b, h, m, e + 1)), q.new_zeros((b, h, 1, e + 1))
        for sl in _chunks(n, rows):
            base, g = query_base(sl), grad(sl)
            dhz = _bmm(base.mT, g, dhz)
            g_sum += g.sum(-2, keepdim=True)
            dq[..., sl, :] = fm.vjp(q[..., sl, :], base, g @ context.mT)
        dhz.add_(g_sum, alpha=fm.eps)
        eps_dv = dhz[..., :e].sum(-2, keepdim=True).mul_(fm.eps)  # (b, h, 1, e): the eps part of every k~
        for sl in _chunks(s, rows):
            kc = k[..., sl, :]
            keys = fm.keys(kc, stab)  # k~ - eps = U exp(row_scale - M)
            # dv_j = k~_j @ dH;  dk~_j = dH @ v_j + dz
            dv[..., sl, :] = _bmm(keys, dhz[..., :e], eps_dv)
            dk[..., sl, :] = fm.vjp(kc, keys, with_ones(v[..., sl, :]) @ dhz.mT)
        return done()  # (no state: causal only)

    values = _finite_values(v)[0]  # as the forward's chunks saw them

    blocks = _blocks(n, b * h, m)
    hz_chunks, ref_chunks = saved[:2]  # the forward's state before each chunk, and its R
    v_befores = []  # [sum of v, count] before each block
    for sl, _ in blocks:
        v_befores.append(v_before)
        v_before = v_before + values(sl).sum(-2, keepdim=True)

    if prefix:
        return done(_bwd_blocks_per_row(fm, grad, q, k, values, q_max, k_max, k_scale, stab, stab0, hz_chunks,
                                        ref_chunks, blocks, v_befores, initial, final, dq, dk, dv))
    return done(_bwd_blocks_per_head(fm, grad, q, k, values, q_max, stab, hz_chunks, blocks, v_befores,
                                     initial, final, dq, dk, dv))


def _bwd_blocks_per_head(fm: ChunkFeatures, grad, q: Tensor, k: Tensor, values, q_max: Tensor, stab: Tensor,
                         hz_chunks: Tensor, blocks: list[tuple[slice, int]], v_befores: list[Tensor],
                         initial: tuple | None, final: tuple | None, dq: Tensor, dk: Tensor, dv: Tensor
                         ) -> list[Tensor]:
    """favor_bwd's reverse sweep over the blocks of _fwd_blocks_per_head (one stabilizer per head,
    stab = M (b, h)): every gradient of a block from one computation of its features, with the
    forward's state before each chunk (hz_chunks, relative to M) for the queries and the gradient
    of the state after each chunk (later queries' q~ [dN, dD]^T, plus the final state's) for the
    keys and values.  grad(sl): [dN, dD] of rows sl; v_befores: [sum v, count] before each block.
    Writes dq, dk, dv (in the compute dtype).  -> [d hz0, d v_sum0] ([] without an initial state)."""
    (b, h), e, m = q.shape[:2], dv.shape[-1], hz_chunks.shape[-2]
    eps, dtype = fm.eps, hz_chunks.dtype
    dhz = q.new_zeros((b, h, m, e + 1))  # the gradient of the state after the block (relative to M)
    later = q.new_zeros((b, h, 1, e + 1))  # sum_{i after the block} sum(q~_i) [dN_i, dD_i]: of [sum v, count]
    d_vs_f = None
    if final is not None:  # the final state is the state after the last key, relative to M
        _, d_hz_f, d_vs_f = final
        if d_hz_f is not None:
            dhz += d_hz_f.to(dtype)
        d_vs_f = None if d_vs_f is None else d_vs_f.to(dtype)[..., None, None, :e]
    for sl, t in reversed(blocks):
        v_before = v_befores.pop()
        qc, kc = q[..., sl, :], k[..., sl, :]
        base = _by_chunk(fm.query_base(qc, fm.dash(qc), q_max[..., sl]), t)  # q~ - eps   (b, h, nc, t, m)
        keys = _by_chunk(fm.keys(kc, stab), t)  # k~ - eps   (b, h, nc, t, m)
        g, vc = _by_chunk(grad(sl), t), _by_chunk(values(sl), t)  # [dN, dD], [v, 1]   (b, h, nc, t, e+1)
        chunks = slice(sl.start // CHUNK, sl.start // CHUNK + vc.shape[2])
        # (b, h, nc, m, e+1) in one block of memory: its transpose feeds the products without a copy
        hz_before = hz_chunks[:, :, chunks].contiguous()
        v_chunks = _prefix_over_chunks(v_before, vc.sum(-2, keepdim=True))[0]  # [sum v, count] before each chunk
        q_sum = base.sum(-1).add_(m * eps)  # sum_f q~_if   (b, h, nc, t)
        dw = _visible_only(g @ vc.mT)  # dN_i . v_j + dD_i on visible pairs   (b, h, nc, t, t)

        # dq~_i = H [dN, dD]_i + sum_j dw_ij k~_j + eps [dN, dD]_i . [sum v, count] before the chunk; c_i: coef dD_i
        dqt = _bmm(dw, keys, g @ hz_before.mT)
        dqt += (((g * v_chunks).sum(-1) + dw.sum(-1)).mul_(eps) + fm.causal_coef * g[..., e])[..., None]
        dq[..., sl, :] = fm.vjp(qc, base.flatten(2, 3), dqt.flatten(2, 3))

        # dk~_j = dH_after [v_j, 1] + sum_{i in chunk} dw_ij q~_i: the state's gradient after each
        # chunk, sum over later queries of q~_i [dN, dD]_i^T = (q~ - eps)^T g + eps colsum(g)
        folds = _bmm(base.mT, g, g.sum(-2, keepdim=True).mul_(eps))  # (b, h, nc, m, e+1)
        after, dhz = _suffix_over_chunks(dhz, folds)
        du = _bmm(dw.mT, base, vc @ after.mT).add_(dw.sum(-2).mul_(eps)[..., None])
        dk[..., sl, :] = fm.vjp(kc, keys.flatten(2, 3), du.flatten(2, 3))

        # dv_j = sum_{i >= j in chunk} (q~_i . k~_j) dN_i + (k~_j - eps) @ dH_after + eps sum_{i after
        # the chunk} sum(q~_i) dN_i (the [sum v, count] of later queries)
        later_c, later = _suffix_over_chunks(later, (g * q_sum[..., None]).sum(-2, keepdim=True))
        acc = later_c[..., :e] * eps if d_vs_f is None else torch.add(d_vs_f, later_c[..., :e], alpha=eps)
        inter = _bmm(keys, after[..., :e], acc)
        dv[..., sl, :] = _bmm(_pair_weights(fm, base, keys, q_sum).mT, g[..., :e], inter).flatten(2, 3)
    if initial is None:
        return []
    # the forward read hz0 as hz0 exp(R0 - M) (an empty state, R0 = -inf: none) and [sum v, count]
    # before every key as v_sum0
    ref0 = initial[2].to(dtype)
    empty = torch.isinf(ref0)[..., None, None]
    d_hz0 = (dhz * (ref0 - stab).exp()[..., None, None]).masked_fill_(empty, 0.0)
    d_vs0 = later[..., 0, :] * eps
    if final is not None and final[2] is not None:
        d_vs0 += final[2].to(dtype)
    return [d_hz0.to(initial[0].dtype), d_vs0.to(initial[1].dtype)]


def _bwd_blocks_per_row(fm: ChunkFeatures, grad, q: Tensor, k: Tensor, values, q_max: Tensor, k_max: Tensor,
                        row_scale: Tensor, stab: Tensor, stab0: Tensor, hz_chunks: Tensor, ref_chunks: Tensor,
                        blocks: list[tuple[slice, int]], v_befores: list[Tensor], initial: tuple | None,
                        final: tuple | None, dq: Tensor, dk: Tensor, dv: Tensor) -> list[Tensor]:
    """favor_bwd's reverse sweep over the blocks of _fwd_blocks_per_row (the prefix stabilizer,
    stab = M_i (b, h, n); stab0 the initial state's): every gradient of a block from one
    computation of its features, with the forward's states before its chunks (hz_chunks relative
    to ref_chunks) for the queries and the states of later queries for the keys and values.
    Arguments and result as _bwd_blocks_per_head's."""
    (b, h), e, m = q.shape[:2], dv.shape[-1], hz_chunks.shape[-2]
    dtype = hz_chunks.dtype
    dhz = q.new_zeros((b, h, m, e + 1))  # sum_{i after the block} exp(M_end - M_i) q~_i [dN_i, dD_i]   (m, e+1)
    later = q.new_zeros((b, h, 1, e))  # sum_{i after the block} sum(q~_i) dN_i
    later_d = q.new_zeros((b, h))  # sum_i sum(q~_i) dD_i: the key count's gradient
    # the final state's gradients reach every key with its own factor exp(row_scale_j - R_final)
    # <= 1 (folding them into dhz would need exp(M_end - R_final), unbounded)
    d_hz_f = d_vs_f = None
    if final is not None:
        (_, _, ref_f, _), d_hz_f, d_vs_f = final
        ref_f = ref_f.to(dtype)
        d_hz_f = torch.zeros_like(dhz) if d_hz_f is None else d_hz_f.to(dtype)
        d_vs_f = q.new_zeros((b, h, e + 1)) if d_vs_f is None else d_vs_f.to(dtype)
    for sl, t in reversed(blocks):
        v_before = v_befores.pop()
        qc, kc = q[..., sl, :], k[..., sl, :]
        base = _by_chunk(fm.query_base(qc, fm.dash(qc), q_max[..., sl]), t)  # q~ - eps   (b, h, nc, t, m)
        units = _by_chunk(fm.key_units(kc, k_max[..., sl]), t)  # (b, h, nc, t, m)
        g_rows, vo = grad(sl), values(sl)  # (b, h, nc t, e+1)
        g, vc = _by_chunk(g_rows, t), _by_chunk(vo, t)
        chunks = slice(sl.start // CHUNK, sl.start // CHUNK + vc.shape[2])
        # (b, h, nc, m, e+1) in one block of memory: its transpose feeds the products without a copy
        hz_before, ref_before = hz_chunks[:, :, chunks].contiguous(), ref_chunks[:, :, chunks]
        m_i, rs = _by_chunk(stab[..., sl], t), _by_chunk(row_scale[..., sl], t)
        factor = _intra_factor(rs, m_i)  # (b, h, nc, t, t)
        dwf = _visible(g @ vc.mT, factor)  # dw_ij F_ij = (dN_i . v_j + dD_i) F_ij
        q_sum = base.sum(-1).add_(m * fm.eps)  # sum_f q~_if   (b, h, nc, t)

        # dq~_i: inter exp(R - M_i) [dN, dD]_i @ H^T; intra sum_j dw_ij F_ij U_j; eps part of
        # every visible key eps sum_{j<=i} dw_ij; c_i: coef dD_i
        v_upto = _by_chunk(vo.cumsum(-2).add_(v_before), t)  # (b, h, nc, t, e+1)
        dqt = _bmm(g, hz_before.mT).mul_((ref_before[..., None] - m_i).exp_()[..., None])
        dqt = _bmm(dwf, units, dqt)
        dqt += (torch.mul((g * v_upto).sum(-1), fm.eps) + fm.causal_coef * g[..., e])[..., None]
        dq[..., sl, :] = fm.vjp(qc, base.flatten(2, 3), dqt.flatten(2, 3))

        # sum over the queries after each chunk, relative to the chunk's last M: fold the later
        # chunks' queries in one by one, each relative to the M before it (the initial state's
        # before the first chunk; the maps without one: 0), with g_s = exp(M_prev - M_i) [dN, dD]_i:
        # sum_i q~_i g_s_i = (q~ - eps)^T g_s + eps sum_i g_s_i
        m_end = m_i[..., -1]  # (b, h, nc)
        first = stab[..., sl.start - 1] if sl.start > 0 else stab0
        m_prev = torch.cat([first[..., None], m_end[..., :-1]], -1)  # (b, h, nc)
        g_s = g * (m_prev[..., None] - m_i).exp_()[..., None]
        folds = _bmm(base.mT, g_s, g_s.sum(-2, keepdim=True).mul_(fm.eps))  # (b, h, nc, m, e+1)
        dhz_after = []
        for c in reversed(range(m_end.shape[-1])):
            dhz_after.append(dhz)
            dhz = torch.addcmul(folds[:, :, c], dhz, (m_prev[..., c] - m_end[..., c]).exp_()[..., None, None])
        dhz_after = torch.stack(dhz_after[::-1], 2)  # (b, h, nc, m, e+1)

        # dU_j = sum_{i in chunk} dw_ij F_ij q~_i + exp(row_scale_j - M_end) (dH @ v_j + dz)
        key_scale = (rs - m_end[..., None]).exp_()[..., None]  # (b, h, nc, t, 1)
        du = (vc @ dhz_after.mT).mul_(key_scale)
        if d_hz_f is not None:
            key_f = (rs - ref_f[..., None, None]).exp_()[..., None]  # (b, h, nc, t, 1)
            du += (vc @ d_hz_f[:, :, None].mT).mul_(key_f)
        du = _bmm(dwf.mT, base, du).add_(dwf.sum(-2).mul_(fm.eps)[..., None])
        dk[..., sl, :] = fm.vjp(kc, units.flatten(2, 3), du.flatten(2, 3))

        # dv_j = sum_{i in chunk} W_ij dN_i + (U_j exp(row_scale_j - M_end)) @ dH + eps sum_{i>=j} sum(q~_i) dN_i
        pairs = _bmm(base, units.mT, units.sum(-1).mul_(fm.eps)[..., None, :])  # q~_i . U_j
        weights = _visible(pairs, factor)  # exp part of w_ij
        q_dn = q_sum.flatten(2, 3)[..., None] * g_rows[..., :e]  # (b, h, nc t, e)
        q_dn_from = q_dn.flip(-2).cumsum(-2).flip(-2).add_(later)  # sum over i >= j
        # (diag(f) U) @ X as diag(f) (U @ X): the exp factors scale the (t, e) products, not U
        inter = torch.addcmul(_by_chunk(q_dn_from, t) * fm.eps, key_scale, units @ dhz_after[..., :e])
        if d_hz_f is not None:
            inter.addcmul_(key_f, units @ d_hz_f[:, :, None, :, :e]).add_(d_vs_f[:, :, None, None, :e])
        dv[..., sl, :] = _bmm(weights.mT, g[..., :e], inter).flatten(2, 3)
        later = q_dn_from[..., :1, :]
        later_d += (q_sum * g[..., e]).sum((-2, -1))
    if initial is None:
        return []
    # out_i depends on the initial hz through exp(R0 - M_i) q~_i . hz0 and the final state on it
    # through exp(R0 - R_final) hz0; an empty state (R0 = -inf) has none
    ref0 = initial[2].to(dtype)
    empty = torch.isinf(ref0)[..., None, None]
    d_hz0 = dhz * (ref0 - stab0).masked_fill(empty[..., 0, 0], 0.0).exp_()[..., None, None]
    d_vs0 = torch.cat([later[..., 0, :], later_d[..., None]], dim=-1).mul_(fm.eps)
    if d_hz_f is not None:
        d_hz0 += d_hz_f * (ref0 - ref_f).masked_fill(empty[..., 0, 0], 0.0).exp_()[..., None, None]
        d_vs0 += d_vs_f
    d_hz0 = d_hz0.masked_fill(empty, 0.0)
    return [d_hz0.to(initial[0].dtype), d_vs0.to(initial[1].dtype)]
