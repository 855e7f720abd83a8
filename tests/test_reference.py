"""The float64 reference against performer-pytorch 1.1.4 itself, and the leak-free mode."""
import contextlib
import io

import pytest
import torch

performer_pytorch = pytest.importorskip("performer_pytorch")
from performer_pytorch import performer_pytorch as pp  # noqa: E402

from performer_triton import FastAttention, gaussian_orthogonal_random_matrix, reference  # noqa: E402


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def original_fast_attention(*args, **kwargs):
    """1.1.4's FastAttention; its causal constructor prints a fallback notice we silence."""
    with contextlib.redirect_stdout(io.StringIO()):
        return pp.FastAttention(*args, **kwargs).double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["softmax", "relu", "none"])
@pytest.mark.parametrize("n,d,m", [(1, 16, 44), (37, 48, 100), (257, 64, 266)])
def test_reference_matches_performer_pytorch(causal, mode, n, d, m):
    torch.manual_seed(n + d)
    q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64) for _ in range(3))
    fa = original_fast_attention(
        d, m, causal=causal, generalized_attention=mode == "relu", no_projection=mode == "none"
    )
    expected = fa(q, k, v)
    ours = reference.favor_attention(q, k, v, fa.projection_matrix, causal=causal, feature_map=mode)
    assert rel(ours, expected) <= 1e-12


def test_reference_custom_kernel_fn_matches():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float64) for _ in range(3))
    fa = original_fast_attention(16, 40, generalized_attention=True, kernel_fn=torch.nn.Softplus())
    expected = fa(q, k, v)
    ours = reference.favor_attention(q, k, v, fa.projection_matrix, feature_map=torch.nn.Softplus())
    assert rel(ours, expected) <= 1e-12


@pytest.mark.parametrize("m,d,scaling", [(266, 64, 0), (44, 16, 1), (10, 16, 0)])
def test_projection_same_seed_same_matrix(m, d, scaling):
    torch.manual_seed(123)
    expected = pp.gaussian_orthogonal_random_matrix(m, d, scaling=scaling)
    torch.manual_seed(123)
    ours = gaussian_orthogonal_random_matrix(m, d, scaling=scaling)
    assert torch.equal(ours, expected)


def test_projection_generator_is_private_stream():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    a = gaussian_orthogonal_random_matrix(40, 16, generator=g1)
    torch.manual_seed(1)  # the global RNG must not matter
    b = gaussian_orthogonal_random_matrix(40, 16, generator=g2)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    expected = pp.gaussian_orthogonal_random_matrix(40, 16)
    torch.manual_seed(5)
    assert torch.equal(gaussian_orthogonal_random_matrix(40, 16, generator=torch.default_generator), expected)


def test_projection_bad_arguments():
    with pytest.raises(ValueError, match="scaling"):
        gaussian_orthogonal_random_matrix(10, 4, scaling=2)
    with pytest.raises(ValueError, match="nb_rows"):
        gaussian_orthogonal_random_matrix(0, 4)


def test_rejected_scaling_moves_the_global_rng_as_original():
    """1.1.4 draws the orthogonal blocks before it rejects the scaling: a program that catches
    the error goes on with the same random stream."""
    streams = []
    for make in (pp.FastAttention, FastAttention):
        torch.manual_seed(0)
        with pytest.raises(ValueError, match="scaling"):
            make(16, ortho_scaling=2)
        streams.append(torch.get_rng_state())
    assert torch.equal(*streams)


def test_prefix_equals_original_on_truncated_sequences():
    """Prefix mode: out_i equals 1.1.4's causal output at the last position of the sequence
    truncated after i (whose key stabilizer is the max over positions <= i)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 37, 16, dtype=torch.float64) for _ in range(3))
    k[:, :, 20] *= 4  # a late key with a large max: the global stabilizer would move
    fa = original_fast_attention(16, 44, causal=True)
    ours = reference.favor_attention(q, k, v, fa.projection_matrix, causal=True, key_stabilizer="prefix")
    for i in (0, 5, 19, 20, 36):
        expected = fa(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])[:, :, -1]
        assert rel(ours[:, :, i], expected) <= 1e-12


def test_leak_prefix_vs_global():
    """Scaling the keys after position i by 3: prefix outputs <= i unchanged, global ones move
    (1.1.4's leak, lucidrains/performer-pytorch#82)."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(3))
    P = gaussian_orthogonal_random_matrix(44, 16).double()
    i = 30
    k2 = k.clone()
    k2[:, :, i + 1 :] *= 3
    for stabilizer, should_change in (("prefix", False), ("global", True)):
        a = reference.favor_attention(q, k, v, P, causal=True, key_stabilizer=stabilizer)[:, :, : i + 1]
        b = reference.favor_attention(q, k2, v, P, causal=True, key_stabilizer=stabilizer)[:, :, : i + 1]
        change = (a - b).abs().max().item()
        if should_change:
            assert change > 1e-3
        else:
            assert change <= 1e-13


def test_masked_reference_equals_unpadded():
    torch.manual_seed(5)
    P = gaussian_orthogonal_random_matrix(44, 16).double()
    q, k, v = (torch.randn(2, 2, 20, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False
    for mode in ("softmax", "relu", "none"):
        out = reference.favor_attention(q, k, v, P, feature_map=mode, key_padding_mask=mask)
        alone = reference.favor_attention(q[1:], k[1:, :, :13], v[1:, :, :13], P, feature_map=mode)
        assert rel(out[1:], alone) <= 1e-12


def test_oracle_gradients_are_finite_where_a_row_has_no_keys():
    """A batch row whose keys are all padded (or zero key features): output 0 and zero query
    gradients, as the library gives, not 0 * inf = NaN from the unselected 1 / 0."""
    q, k, v = (torch.randn(2, 1, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               .requires_grad_() for i in range(3))
    P = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0] = False
    out = reference.favor_attention(q, k, v, P, causal=False, key_padding_mask=keep)
    dq, = torch.autograd.grad(out.square().sum() + out.sum(), q)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.isfinite(dq).all()
    qf = torch.rand(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    out = reference.linear_attention(qf, torch.zeros(1, 1, 4, 3, dtype=torch.float64),
                                     torch.randn(1, 1, 4, 2, dtype=torch.float64))
    assert torch.equal(torch.autograd.grad(out.sum(), qf)[0], torch.zeros_like(qf))
