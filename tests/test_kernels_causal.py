"""Causal FAVOR+ Triton kernels (kernels/causal.py) against the float64 reference.

Under the interpreter (no GPU) every program runs on CPU: shapes are small, blocks large.
"""
import math

import pytest
import torch
from conftest import DEVICE
from kernel_cases import (
    BUDGET, GIVEN_CASES, check_row_stats, dtype_cases, given_case, inputs, large_inputs_case, meta_launches,
    packed_case, packed_inputs, packed_run, rel_err, strided_case, unaligned_case,
)
from kernel_cases import check as kernel_check
from kernel_cases import reference as kernel_reference

from performer_triton import reference as R
from performer_triton.kernels import GIVEN, MAX_HEAD_DIM, RELU, SOFTMAX, launchers
from performer_triton.kernels import causal as C
from performer_triton.kernels import feature_map as FM


def check(q, k, v, proj, g, *, feature, prefix, budget, limits=None):
    """Causal forward and backward against the float64 reference (see kernel_cases.check)."""
    _, out, stats = kernel_check(q, k, v, proj, g, causal=True, feature=feature, prefix=prefix,
                                 budget=budget, limits=limits)
    return out, stats[-2]  # rden


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
@dtype_cases(
    # fp32 n70_d80_e96_m50: the output kernel reads q, k in chunks (BK_out < BD)
    float32=("n37_d24_e32_m100", "n1_d16_m44", "n130_d32_e24_m70", "n70_d64_e40_m50", "n70_d80_e96_m50"),
    float16=("n257_d64_m266", "n130_d56_e24_m70", "n70_d80_e96_m50"),
    # bf16 n257_d64_m266: three chunks of 128 rows (causal._config's for bf16 heads up to 64), the last of 1
    bfloat16=("n37_d48_m100", "n100_d8_e40_m44", "n37_d128_e72_m60", "n257_d64_m266"),
)
def test_softmax(dtype, shape, prefix):
    q, k, v, proj, g = inputs(*SHAPES[shape], dtype)
    check(q, k, v, proj, g, feature=SOFTMAX, prefix=prefix, budget=BUDGET[dtype], limits=single_position(shape, dtype))


def single_position(shape, dtype=None):
    """At n = 1, out_0 = v_0 D'/(D' + c) with c the causal eps term: dq, dk are the residue of
    g.v - g.out, ill-conditioned in out (the float32 reference itself is 1.4e-5 off for SOFTMAX;
    for RELU c/D ~ 1e-6 is below fp32 resolution, so only finiteness is checked). In fp32 the
    g.v of the kernels is a TF32 dot, 1e-3 of |g||v| off: larger than the residue, so fp32 checks
    finiteness there too."""
    if SHAPES[shape][2] != 1:
        return None
    if dtype == torch.float32:
        return dict(dq=math.inf, dk=math.inf)
    return dict(dq=5e-5, dk=5e-5)


@dtype_cases(
    float32=("n130_d32_e24_m70", "n1_d16_m44", "n37_d128_e72_m60"),
    float16=("n37_d48_m100", "n70_d80_e96_m50"),
    bfloat16=("n130_d56_e24_m70", "n100_d8_e40_m44"),
)
def test_relu(dtype, shape):
    q, k, v, proj, g = inputs(*SHAPES[shape], dtype)
    limits = single_position(shape) and dict(dq=math.inf, dk=math.inf)
    check(q, k, v, proj, g, feature=RELU, prefix=True, budget=BUDGET[dtype], limits=limits)


@GIVEN_CASES
def test_given(dtype, feature_map, e):
    given_case(dtype, feature_map, e, causal=True, s=None)


def test_strided_inputs():
    strided_case(causal=True, prefix=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_unaligned_row_strides(dtype):
    unaligned_case(dtype, causal=True, prefix=True)


@pytest.mark.parametrize("dtype,feature,prefix", [
    (torch.bfloat16, SOFTMAX, False), (torch.bfloat16, SOFTMAX, True), (torch.float16, RELU, True),
], ids=["bfloat16-softmax-global", "bfloat16-softmax-prefix", "float16-relu"])
def test_packed_sequences(dtype, feature, prefix):
    packed_case(dtype, causal=True, feature=feature, prefix=prefix)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packs_the_kernels_do_not_take_are_refused(causal):
    """Packs run on the kernels for 16-bit heads up to 64 (kernels.extension_unsupported): the
    launchers refuse the others, and a pack of a batch other than 1, with a clear error."""
    fwd = launchers(causal)[0]
    q, k, v, proj, _, cu = packed_inputs(torch.float16, lengths=(3, 4))
    with pytest.raises(ValueError, match="packed sequences for float16 and bfloat16 inputs, got torch.float32"):
        fwd(q.float(), k.float(), v.float(), proj.float(), feature=SOFTMAX, cu_seqlens=cu)
    wide = torch.zeros(1, 2, 7, 80, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 64, got 80"):
        fwd(q, k, wide, proj, feature=SOFTMAX, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"\(1, h, total, \.\)"):
        fwd(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), proj, feature=SOFTMAX,
            cu_seqlens=cu)


def test_packed_offsets_are_clamped():
    """Offsets the caller did not check (the API checks them in eager mode only) address nothing
    outside the tensors: clamped into [0, n] and made non-decreasing."""
    q, k, v, proj, g, _ = packed_inputs(torch.bfloat16, lengths=(20, 10))
    bad = torch.tensor([0, 500, 3, 30], dtype=torch.int32, device=DEVICE)
    good = torch.tensor([0, 30, 30, 30], dtype=torch.int32, device=DEVICE)
    runs = [packed_run(q, k, v, proj, g, cu, causal=True, feature=SOFTMAX, prefix=True) for cu in (bad, good)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# each stabilizer once, each 16-bit dtype once (the four pairs cost 45 s of CI in the interpreter)
@pytest.mark.parametrize("dtype, prefix", [(torch.float16, False), (torch.bfloat16, True)],
                         ids=["float16-global", "bfloat16-prefix"])
def test_large_inputs(dtype, prefix):
    """Features are ~ 1e-4 + exp(-|x|^2 dn^2 / 2) ~ 1e-4 + 1e-16, attention is nearly uniform,
    and the true dq (~1e-22) is the residue of a cancellation of terms 1e8 larger: ill-conditioned
    in any precision (the float32 reference is 2.5e9 off); dk must be accurate in bf16."""
    large_inputs_case(dtype, causal=True, prefix=prefix)


def test_rden_and_stats():
    """rden = ratio^2 / (q' . (sum_{j<=i} k'_j + 1e-6)) and the saved per-row stats."""
    q, k, v, proj, _ = inputs(1, 2, 70, 32, 32, 100, torch.float32, seed=7)
    out, q_max, k_max, k_scale, rden, states = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=False)
    qf, kf = R.feature_maps(q.double(), k.double(), proj.double(), causal=True)
    den = torch.einsum("bhnm,bhnm->bhn", qf, kf.cumsum(dim=2) + R.CAUSAL_EPS) / 100**-1.0
    assert rel_err(rden, 1.0 / den) < BUDGET[torch.float32]  # the score and state dots run in TF32
    check_row_stats(q, k, proj, q_max, k_max, k_scale)
    # saved for the backward: H (b*h, NT, m, e), z, vsum, c_ref, c_stab; c_stab[NT] is the key max
    h_state, z_state, v_state, c_ref, c_stab = states
    assert h_state.shape == (2, 2, 100, 32) and z_state.shape == (2, 2, 100) and c_stab.shape == (2, 3)
    assert torch.equal(c_stab[:, -1], k_max.amax(-1).flatten())
    assert torch.allclose(v_state[:, 1], v[0, :, :64].sum(1), atol=1e-5)
    for feature in (RELU, GIVEN):
        x = q if feature == RELU else q.abs()
        stats = C.causal_fwd(x, x, v, proj if feature == RELU else None, feature=feature, prefix=True)[1:4]
        assert all(s.shape == (1, 2, 0) and s.dtype == torch.float32 for s in stats)


@pytest.mark.parametrize("prefix", [False, True])
def test_saved_states_are_the_prefix_sums_before_every_chunk(prefix):
    """The chunk pass and the scan (every chunk's own state, then the running sum) against float64:
    H_c = sum_{j < c BT} U_j exp(k_scale_j - R_c) v_j^T with R_c = max_{j < c BT} k_scale_j, z_c
    likewise, the value sums, c_ref and c_stab, with keys scaled per chunk so that the reference
    moves up and stays (a chunk whose own reference is below the running one): 5 chunks, the last
    one short."""
    q, k, v, proj, _ = inputs(1, 2, 300, 16, 24, 40, torch.float32, seed=5)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0], device=k.device).repeat_interleave(64)[:300]
    k = (k * scale[:, None]).contiguous()
    out, q_max, k_max, k_scale, rden, states = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=prefix)
    h_state, z_state, v_state, c_ref, c_stab = (t.double().cpu() for t in states)
    dn = 16**-0.25
    k64, v64, p64 = k.double().cpu()[0], v.double().cpu()[0], proj.double().cpu()
    dash = (dn * k64) @ p64.T  # (h, n, m)
    kmax = dash.amax(-1)
    kscale = kmax - (dn * k64).square().sum(-1) / 2
    units = torch.exp(dash - kmax[..., None])
    # before any key: zero sums, references -inf
    assert not (h_state[:, 0].any() or z_state[:, 0].any() or v_state[:, 0].any())
    assert (c_ref[:, 0] == -math.inf).all() and (c_stab[:, 0] == -math.inf).all()
    for c in range(1, 5):
        j = c * 64
        ref = kscale[:, :j].amax(-1)
        assert torch.allclose(c_ref[:, c], ref, rtol=1e-6) and torch.allclose(c_stab[:, c], kmax[:, :j].amax(-1))
        w = units[:, :j] * torch.exp(kscale[:, :j] - ref[:, None])[..., None]  # (h, j, m), <= 1
        assert rel_err(h_state[:, c], w.mT @ v64[:, :j]) < 2e-3 and rel_err(z_state[:, c], w.sum(1)) < 2e-3, c
        assert torch.allclose(v_state[:, c], v64[:, :j].sum(1), atol=1e-4)
    assert torch.allclose(c_stab[:, 5], kmax.amax(-1), rtol=1e-6)  # every key's max
    assert torch.allclose(c_ref[:, 5], kscale.amax(-1), rtol=1e-6)  # the reference after every key


@pytest.mark.parametrize("dtype, prefix", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32-global", "bfloat16-prefix"])
def test_a_chunk_of_keys_whose_squared_norm_overflows(dtype, prefix):
    """A whole chunk of keys of norm ~1e20 after ordinary ones: |dn k|^2 overflows fp32, their
    k_scale is -inf (weight 0; float64 underflows them to 0 too), so the chunk's own reference is
    -inf as well: its state must be 0, not -inf - -inf = NaN in every later state.  Outputs and
    gradients finite; out and dv as float64's."""
    q, k, v, proj, g = inputs(1, 1, 192, 16, 16, 32, dtype, seed=1)
    k = k.clone()
    k[:, :, 64:128] = 1e20 * torch.sign(k[:, :, 64:128].float()).to(dtype)
    fwd, bwd, _ = launchers(True)
    out, *stats = fwd(q, k, v, proj, feature=SOFTMAX, prefix=prefix)
    grads = bwd(g, q, k, v, proj, out, *stats, feature=SOFTMAX, prefix=prefix)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    ref = kernel_reference(q, k, v, proj, g, causal=True, feature=SOFTMAX, prefix=prefix)
    assert rel_err(out, ref[0]) < BUDGET[dtype] and rel_err(grads[2], ref[3]) < BUDGET[dtype]


@pytest.mark.parametrize("prefix", [False, True])
def test_backward_reads_the_saved_states(prefix):
    """The backward takes the forward's key states (no second walk over the keys): with them it
    matches the reference (check); with a changed state its query gradients change."""
    q, k, v, proj, g = inputs(1, 1, 130, 16, 16, 20, torch.float32, seed=3)
    out, *stats, states = C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=prefix)
    dq = C.causal_bwd(g, q, k, v, proj, out, *stats, states, feature=SOFTMAX, prefix=prefix)[0]
    states[0].mul_(2.0)
    dq2 = C.causal_bwd(g, q, k, v, proj, out, *stats, states, feature=SOFTMAX, prefix=prefix)[0]
    assert torch.equal(dq[:, :, :64], dq2[:, :, :64]) and not torch.allclose(dq[:, :, 64:], dq2[:, :, 64:])


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


def test_meta_launches():
    """Launchers run on meta tensors (the compile report intercepts every launch): no host reads
    of tensor values; every kernel is reached, with the expected grids and constexprs; the
    stabilizer vectors come from the kernels (no torch reductions between launches)."""
    b, h, n, d, e, m = 2, 3, 200, 64, 64, 266
    for prefix in (False, True):
        launched = meta_launches(True, torch.bfloat16, b=b, h=h, n=n, d=d, e=e, m=m, prefix=prefix)
        assert [name for name, *_ in launched] == [
            "_row_stats_kernel", "_chunk_state_kernel", "_state_scan_kernel", "_output_kernel",
            "_dd_kernel", "_chunk_dstate_kernel", "_dstate_scan_kernel", "_bwd_qk_kernel", "_bwd_qk_kernel",
            "_bwd_v_kernel",
        ]
        assert launched[0][1] == (b * h * 4, 2)  # q and k rows in one launch, (b*h, block) on axis 0
        attention = launched[1:]
        cfg = C._config(d, e, m, torch.bfloat16, packed=False,
                        long_chunks=C._long_chunks(d, e, torch.bfloat16, prefix=prefix, state=False))
        bm, bm_d, nt = cfg["BM"], cfg["BM_dstate"], -(-n // cfg["BT"])
        assert nt == (4 if prefix else 2)  # bf16 heads up to 64, global stabilizer: chunks of 128 rows
        # every chunk's own state at once, then the scan over chunks, then the outputs
        assert attention[0][1] == (b * h, nt, -(-m // bm)) and attention[1][1] == (b * h, -(-m // bm))
        assert attention[2][1] == (b * h, nt)
        assert attention[4][1] == (b * h, nt, -(-m // bm_d)) and attention[5][1] == (b * h, -(-m // bm_d))
        # no features: dD of the rows, the reverse scan's sums
        attention = [x for x in attention if x[0] not in ("_dd_kernel", "_dstate_scan_kernel")]
        assert all(kw["FEATURE"] == SOFTMAX for *_, kw in attention)
        keys_only = ("_chunk_state_kernel", "_state_scan_kernel")  # the same states for either stabilizer
        assert all(kw["PREFIX"] == prefix for name, _, kw in attention if name not in keys_only)
        assert [kw["KEYS"] for name, _, kw in attention if name == "_bwd_qk_kernel"] == [False, True]
        assert not any(kw["VARLEN"] for *_, kw in attention)  # no pack: the unpacked addressing


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(("d", "e"), [(64, 64), (64, 40), (24, 64), (20, 64), (64, 33), (64, 34)])
def test_launches_declare_the_alignment_of_their_dims_and_strides(causal, d, e):
    """Every kernel that takes head dims and row strides gets AL (d and the q, k rows) and AV (e
    and the v, grad_out, out rows): their largest common power of two up to 16
    (feature_map.aligned); Triton alone knows only divisibility by 16."""
    launched = meta_launches(causal, torch.bfloat16, n=200, d=d, e=e)
    names = {name for name, *_ in launched}
    no_rows = {"_combine_kernel", "_dd_kernel", "_state_scan_kernel", "_dstate_scan_kernel"}  # no q, k rows
    assert names - {name for name, _, kw in launched if "AL" in kw} <= no_rows
    assert names - {name for name, _, kw in launched if "AV" in kw} <= {"_combine_kernel", "_row_stats_kernel"}
    declared = {16: 16, 8: 8, 4: 4, 2: 1, 1: 1}
    assert {kw["AL"] for _, _, kw in launched if "AL" in kw} == {declared[math.gcd(16, d)]}
    assert {kw["AV"] for _, _, kw in launched if "AV" in kw} == {declared[math.gcd(16, e)]}


def test_alignment_of_dims_and_tensors():
    from performer_triton.kernels.feature_map import alignment

    x = torch.empty(2, 3, 10, 40)
    assert alignment(64, 128, torch.empty(2, 3, 10, 64)) == 16
    assert alignment(64, x) == 8 and alignment(64, x[..., :24]) == 8
    assert alignment(x[:, :, ::3]) == 8  # row stride 120
    assert alignment(torch.empty(2, 3, 10, 43)[..., 1:-2]) == 1
    assert alignment(torch.empty(2, 3, 10, 266)) == 1  # 2 declares nothing
    assert alignment(0, 16) == 16  # GIVEN passes d = 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_launches_take_the_precision_constant(causal, monkeypatch):
    """Every launch, row stats included, passes feature_map.PRECISION as input_precision: the
    one place that decides how the fp32 dots run."""
    monkeypatch.setattr(FM, "PRECISION", "ieee")
    launched = meta_launches(causal, torch.float32)
    # (no dot, no PRECISION: the non-causal _combine_kernel adds split partials, the causal
    # _dd_kernel takes row sums of g * out)
    assert len(launched) > 4 and all(kw["PRECISION"] == "ieee" for name, _, kw in launched
                                     if name not in ("_combine_kernel", "_dd_kernel"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_head_dim_limit(causal, dtype):
    """Both launchers take d = e = MAX_HEAD_DIM and refuse one more, in every dtype they take;
    other dtypes are refused."""
    meta_launches(causal, dtype, d=MAX_HEAD_DIM, e=MAX_HEAD_DIM)
    with pytest.raises(ValueError, match=f"head dims up to {MAX_HEAD_DIM}, got d = {MAX_HEAD_DIM + 1}"):
        meta_launches(causal, dtype, d=MAX_HEAD_DIM + 1, e=16)
    with pytest.raises(ValueError, match=f"got e = {MAX_HEAD_DIM + 1}"):
        meta_launches(causal, dtype, d=16, e=MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32 inputs, got torch.float64"):
        meta_launches(causal, torch.float64, d=16, e=16)


def test_launchers_reject_head_dims_above_the_limit():
    """Beyond MAX_HEAD_DIM the compile report has not checked the kernels spill-free: the
    launchers refuse, and favor_attention(backend="triton") names the limit (auto uses the
    PyTorch path there)."""
    from performer_triton import favor_attention
    from performer_triton.kernels import noncausal as NC

    q, k, v, proj, _ = inputs(1, 1, 8, 160, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="the Triton kernels take head dims up to 128, got d = 160"):
        C.causal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=False)
    with pytest.raises(ValueError, match="e = 136"):
        NC.noncausal_fwd(*(t.half() for t in (q[..., :80], k[..., :80], torch.zeros(1, 1, 8, 136), proj[:, :80])),
                         feature=SOFTMAX)
    with pytest.raises(ValueError, match="head dims up to 128"):
        favor_attention(q, k, v, proj, backend="triton")
    # the launcher contract's unit last stride: a ValueError naming the tensor (an assert vanished under -O)
    wide = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match=r"need a unit last stride, got q with strides \(512, 512, 64, 2\)"):
        C.causal_fwd(wide[..., ::2], k[..., :32], v, proj[:, :32], feature=SOFTMAX, prefix=False)
    widest = [t[..., :128] for t in (q, k)]  # 128 is the widest: the kernels run it, within the fp32 (TF32) budget
    out = favor_attention(*widest, v, proj[:, :128], backend="triton")
    expected = R.favor_attention(*(t.double() for t in widest), v.double(), proj[:, :128].double())
    assert rel_err(out, expected) < BUDGET[torch.float32]


@pytest.mark.parametrize("prefix", [False, True], ids=["global", "prefix"])
def test_fp16_few_queries_after_many_keys(prefix):
    """fp16 queries reading a state of many keys (the KV-cache call, n << s): the chunk states are
    fp32 for unpacked fp16 heads up to 64 wide; stored in bf16 they put dq at 6.7e-3 (review G)."""
    from performer_triton import favor_attention

    g = torch.Generator().manual_seed(0)
    s, n, d, e, m = 600, 5, 40, 64, 33
    q, k, v = (torch.randn(1, 1, t, w, generator=g) for t, w in ((n, d), (s, d), (s, e)))
    proj = torch.randn(m, d, generator=g)
    grad = torch.randn(1, 1, n, e, generator=g)
    stab = "prefix" if prefix else "global"
    exact = [t.half().double().requires_grad_() for t in (q, k, v)]
    ref = R.favor_attention(*exact, proj.half().double(), causal=True, key_stabilizer=stab)
    ref_grads = torch.autograd.grad(ref, exact, grad.half().double())
    leaves = [t.half().to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = favor_attention(*leaves, proj.half().to(DEVICE), causal=True, key_stabilizer=stab, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad.half().to(DEVICE))
    errors = [rel_err(a.double().cpu(), b) for a, b in zip((out, *grads), (ref, *ref_grads))]
    assert max(errors) <= 1.5e-3, errors  # bf16 states: 2.5e-3 to 3.6e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map,where", [("softmax", "q"), ("softmax", "k"), ("relu", "q"), ("relu", "k")])
def test_an_unmasked_nan_reaches_the_rows_it_reaches_on_the_pytorch_path(causal, feature_map, where):
    """A NaN in q or k (no mask) is NaN where the PyTorch path's is and nowhere else (the kernels'
    clamps and relu took min / max, which drop NaN by default: a NaN row read as finite features);
    the other rows equal the clean call's.  The global stabilizer's max over the keys is the
    exception the README lists (the PyTorch path's takes the NaN, 1.1.4's too): prefix here."""
    from performer_triton import favor_attention, gaussian_orthogonal_random_matrix

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g).half().to(DEVICE) for _ in range(3))
    P = gaussian_orthogonal_random_matrix(20, 16, generator=g).half().to(DEVICE)
    kw = dict(causal=causal, feature_map=feature_map,
              key_stabilizer="prefix" if causal and feature_map == "softmax" else "global")
    clean = favor_attention(q, k, v, P, backend="triton", **kw)
    bad = {"q": q, "k": k}[where].clone()
    bad[0, 1, 5, 3] = float("nan")
    args = (bad, k, v) if where == "q" else (q, bad, v)
    ours = favor_attention(*args, P, backend="triton", **kw)
    theirs = favor_attention(*(t.float() for t in args), P.float(), backend="torch", **kw)
    nan_rows = torch.isnan(theirs).any(-1)
    assert nan_rows.any() and torch.equal(torch.isnan(ours).any(-1), nan_rows)
    assert torch.equal(ours[~nan_rows], clean[~nan_rows])
