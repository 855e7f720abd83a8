"""Non-causal FAVOR+ Triton kernels (kernels/noncausal.py) and the row-stats kernel against the
float64 reference.  Under the interpreter (no GPU) shapes are small and blocks large."""
import math

import pytest
import torch
from kernel_cases import (
    BUDGET, GIVEN_CASES, dtype_cases, given_case, inputs,
    large_inputs_case, meta_launches, packed_case, rel_err, strided_case, unaligned_case,
)
from kernel_cases import check as kernel_check

from conftest import DEVICE
from performer_triton import reference as R
from performer_triton.feature_maps import half_sq_norm, project
from performer_triton.kernels import RELU, SOFTMAX
from performer_triton.kernels import noncausal as NC
from performer_triton.kernels.feature_map import row_stats
from performer_triton.projection import gaussian_orthogonal_random_matrix


def check(q, k, v, proj, g, *, feature, budget, limits=None):
    _, out, stats = kernel_check(q, k, v, proj, g, causal=False, feature=feature, budget=budget, limits=limits)
    return out, stats


# (b, h, n, s, d, e, m): n != s (cross attention), n or s = 1, partial blocks, m not a multiple of BM
SHAPES = {
    "n37_s37_d48_m100": (1, 2, 37, 37, 48, 48, 100),
    "n1_s70_d16_m44": (2, 1, 1, 70, 16, 16, 44),
    "n70_s1_d16_m44": (1, 2, 70, 1, 16, 24, 44),
    "n257_s130_d64_m266": (1, 1, 257, 130, 64, 64, 266),
    "n100_s300_d8_e40_m44": (1, 1, 100, 300, 8, 40, 44),
    "n65_s65_d56_e24_m70": (1, 1, 65, 65, 56, 24, 70),
    "n37_s50_d24_e32_m100": (1, 2, 37, 50, 24, 32, 100),
    "n65_s65_d32_e24_m70": (1, 1, 65, 65, 32, 24, 70),
    # wide heads: d in BK-wide chunks (2 for 16-bit, 2-3 for fp32), e in EV-wide backward slices
    "n70_s90_d80_e96_m50": (1, 1, 70, 90, 80, 96, 50),
    "n37_s37_d128_e72_m60": (1, 1, 37, 37, 128, 72, 60),
    "n65_s40_d64_e40_m50": (1, 1, 65, 40, 64, 40, 50),
}


def shaped(name, dtype, **kw):
    b, h, n, s, d, e, m = SHAPES[name]
    return inputs(b, h, n, d, e, m, dtype, s=s, **kw)


def one_key(name):
    """With a single key every query outputs v_0: dq, dk are exactly 0 and the computed ones are
    rounding residue, so only finiteness is checked for them."""
    return dict(dq=math.inf, dk=math.inf) if SHAPES[name][3] == 1 else None


@dtype_cases(
    float32=("n37_s50_d24_e32_m100", "n1_s70_d16_m44", "n70_s1_d16_m44", "n65_s65_d32_e24_m70",
             "n65_s40_d64_e40_m50", "n70_s90_d80_e96_m50"),
    float16=("n65_s65_d56_e24_m70", "n257_s130_d64_m266", "n70_s90_d80_e96_m50"),
    bfloat16=("n37_s37_d48_m100", "n100_s300_d8_e40_m44", "n37_s37_d128_e72_m60"),
)
def test_softmax(dtype, shape):
    check(*shaped(shape, dtype), feature=SOFTMAX, budget=BUDGET[dtype], limits=one_key(shape))


@dtype_cases(
    float32=("n65_s65_d32_e24_m70", "n1_s70_d16_m44"),
    float16=("n37_s37_d48_m100", "n70_s90_d80_e96_m50"),
    bfloat16=("n65_s65_d56_e24_m70", "n100_s300_d8_e40_m44"),
)
def test_relu(dtype, shape):
    check(*shaped(shape, dtype), feature=RELU, budget=BUDGET[dtype])


@GIVEN_CASES
def test_given(dtype, feature_map, e):
    given_case(dtype, feature_map, e, causal=False, s=90)


def test_strided_inputs():
    strided_case(causal=False)


@pytest.mark.parametrize("dtype,feature", [(torch.bfloat16, SOFTMAX), (torch.float16, RELU)],
                         ids=["bfloat16-softmax", "float16-relu"])
def test_packed_sequences(dtype, feature):
    packed_case(dtype, causal=False, feature=feature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_unaligned_row_strides(dtype):
    unaligned_case(dtype, causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_large_inputs(dtype):
    """Here 1.1.4 overflows in fp16 (the global key max flattens most key features to ratio * eps
    and 1 / denominator is inf)."""
    large_inputs_case(dtype, causal=False)


def test_rden_and_stats():
    """rden = ratio^2 / (q' . sum_j k'_j) and the saved per-row stats."""
    q, k, v, proj, _ = inputs(1, 2, 70, 32, 32, 100, torch.float32, s=50, seed=7)
    out, q_max, k_max, k_scale, rden, states = NC.noncausal_fwd(q, k, v, proj, feature=SOFTMAX)
    qf, kf = R.feature_maps(q.double(), k.double(), proj.double(), causal=False)
    den = torch.einsum("bhnm,bhm->bhn", qf, kf.sum(dim=2)) / 100**-1.0
    assert rel_err(rden, 1.0 / den) < BUDGET[torch.float32]  # the score and state dots run in TF32
    # no per-row key statistics: the key maxima are taken on the state kernel's tiles
    assert q_max.shape == (1, 2, 70) and k_max.shape == k_scale.shape == (1, 2, 0)
    assert rel_err(q_max, project(q.double(), proj.double()).amax(-1)) < 1e-5
    # saved for the backward: H (b*h, m, e), H^T with rows padded to 112 (zeros), H's column sums
    # per m tile of the combine kernel, z relative to M, the value sum and M itself
    h, ht, hs, z, vsum, k_stab = states
    assert h.shape == (2, 100, 32) and z.shape == (2, 100) and vsum.shape == (2, 32)
    assert ht.shape == (2, 32, 112) and torch.equal(ht[..., :100], h.transpose(1, 2))
    assert torch.equal(ht[..., 100:], torch.zeros_like(ht[..., 100:]))
    # H enters only tf32 dots: stored rounded to TF32 (low 13 bits 0); the column sums are exact
    assert not (h.view(torch.int32) & 0x1FFF).any()
    # (each stored entry is within 2^-11 of the exact one summed in hs)
    assert ((hs.sum(1) - h.sum(1)).abs() <= 2.0**-11 * h.abs().sum(1) + 1e-7).all()
    # the stabilizer: 1.1.4's max of dash over every key and feature
    assert rel_err(k_stab, project(k.double(), proj.double()).flatten(-2).amax(-1).flatten()) < 1e-5
    assert torch.allclose(vsum, v[0].sum(1), atol=1e-5)
    g = torch.randn_like(out)
    dq = NC.noncausal_bwd(g, q, k, v, proj, out, q_max, k_max, k_scale, rden, states, feature=SOFTMAX)[0]
    h.mul_(2.0)  # the backward reads the saved states (no second walk over the keys)
    dq2 = NC.noncausal_bwd(g, q, k, v, proj, out, q_max, k_max, k_scale, rden, states, feature=SOFTMAX)[0]
    assert not torch.allclose(dq, dq2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_row_stats(dtype):
    """One launch for q and k: per-row max of (dn x) @ P^T over features (q_max, k_max), and
    k_max minus |dn k|^2 / 2; a None input gets (b, h, 0) stats."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 37, 48, generator=gen).to(DEVICE, dtype) for _ in range(2))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # strides other than q's
    proj = gaussian_orthogonal_random_matrix(100, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    dash_q, dash_k = project(q.double(), proj.double()), project(k.double(), proj.double())
    for q_in, k_in in ((q, k), (None, k), (q, None)):
        q_max, k_max, k_scale = row_stats(q_in, k_in, proj)
        if q_in is None:
            assert q_max.shape == (2, 3, 0)
        else:
            assert rel_err(q_max, dash_q.amax(-1)) < tol
        if k_in is None:
            assert k_max.shape == k_scale.shape == (2, 3, 0)
        else:
            assert rel_err(k_max, dash_k.amax(-1)) < tol
            assert rel_err(k_scale, dash_k.amax(-1) - half_sq_norm(k.double())) < tol


def test_split_reduction_is_deterministic_and_covers_every_key():
    """Long key sequences are split over programs (partial states summed by the launcher): the
    result equals the reference and is bitwise identical across runs."""
    q, k, v, proj, g = inputs(1, 1, 5, 16, 16, 20, torch.float32, s=64 * 9 + 3, seed=9)
    out, _ = check(q, k, v, proj, g, feature=SOFTMAX, budget=BUDGET[torch.float32])
    assert torch.equal(out, NC.noncausal_fwd(q, k, v, proj, feature=SOFTMAX)[0])


def test_one_block_splits_over_several_combine_loads(monkeypatch):
    """Splits of one block each (bench/gpu_profile.py's one-step variant: the configuration's split
    policy) and more splits than the combine kernel reads per load: forward and backward still
    equal the reference (every split's maximum is read, the partial last load masked)."""
    config, splits = NC._config, []
    monkeypatch.setattr(NC, "_config", lambda *a: config(*a) | dict(split_blocks=1, max_splits=1 << 20,
                                                                    split_programs=1 << 30))
    monkeypatch.setattr(NC, "COMBINE_SPLITS", 4)
    split_policy = NC._splits
    monkeypatch.setattr(NC, "_splits", lambda *a: splits.append(split_policy(*a)) or splits[-1])
    q, k, v, proj, g = inputs(1, 2, 64 * 5 + 7, 16, 16, 20, torch.float32, s=64 * 9 + 3, seed=11)
    k[:, 1, -1] *= 4  # the largest dash in the last split (read by the third, partial load)
    check(q, k, v, proj, g, feature=SOFTMAX, budget=BUDGET[torch.float32])
    assert splits == [(1, 10), (1, 6)]  # keys: 10 one-block splits (3 loads of 4); queries: 6
    # the stabilizer itself: 1.1.4's max of dash over every key and feature (the outputs hardly
    # depend on which maximum it is)
    k_stab = NC.noncausal_fwd(q, k, v, proj, feature=SOFTMAX)[5][5]
    dash = (k.double() * 16 ** -0.25) @ proj.double().T  # (b, h, s, m)
    assert torch.allclose(k_stab.double(), dash.amax(dim=(-1, -2)).flatten(), rtol=1e-5, atol=1e-5)


def test_meta_launches():
    """The launchers run on meta tensors (what the compile report captures): every kernel is
    reached, with the expected grids and constexprs; prefix (a causal stabilizer) is refused."""
    b, h, n, d, e, m = 2, 3, 200, 64, 64, 266
    launched = meta_launches(False, torch.bfloat16, b=b, h=h, n=n, d=d, e=e, m=m)
    assert [name for name, *_ in launched] == [
        "_state_kernel", "_combine_kernel", "_output_kernel",
        "_dstate_kernel", "_combine_kernel", "_bwd_q_kernel", "_bwd_kv_kernel",
    ]
    # no row-stats launch: the state kernel takes key maxima on its m tiles (64: 5 for m = 266),
    # the output kernel finds the query row max online
    assert launched[0][1][:2] == (b * h, 5) and launched[2][1] == (b * h, 4)
    assert [kw["REFS"] for name, _, kw in launched if name == "_combine_kernel"] == [True, False]
    assert launched[1][2]["BMS"] == 64 and launched[1][2]["NMTP"] == 8
    assert all(kw["FEATURE"] == SOFTMAX for name, _, kw in launched if name != "_combine_kernel")
    q, k, v, proj, _ = inputs(1, 1, 8, 16, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="causal attention only"):
        NC.noncausal_fwd(q, k, v, proj, feature=SOFTMAX, prefix=True)
