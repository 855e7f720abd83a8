"""FastAttention called the way public programs call performer-pytorch 1.1.4, compared with 1.1.4
itself (same seed, same projection): second-order gradients (force fields trained on -dE/dx),
(batch, heads) broadcast between q, k and v (one-hot values shared by the heads to read attention
maps out), a one-column projection (dim_heads=1) on wider heads, no_projection on any head width,
and kernel_fn modules that are nn.ReLU by type but compute something else."""
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 1.1.4 imports distutils
    import performer_pytorch as original

import performer_triton as ours


def both(seed: int = 0, **kwargs):
    """(1.1.4's, ours) FastAttention built from the same seed, in float64."""
    made = []
    for lib in (original, ours):
        torch.manual_seed(seed)
        made.append(lib.FastAttention(**kwargs).double())
    torch.testing.assert_close(made[0].projection_matrix, made[1].projection_matrix, rtol=0, atol=0)
    return made


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("generalized", [False, True])
def test_second_order_gradients_match_1_1_4(causal, generalized):
    """NeuralForceField's pattern: energy from attention over positions, forces by autograd.grad
    with create_graph, a loss on the forces trained by backward (q = x @ w, k = v = x)."""
    results = []
    for attn in both(dim_heads=16, nb_features=16, causal=causal, generalized_attention=generalized):
        x = randn(1, 2, 7, 16).requires_grad_()
        w = randn(16, 16, seed=2).requires_grad_()
        energy = attn(x @ w, x, x).pow(2).sum()
        (forces,) = torch.autograd.grad(energy, x, create_graph=True)
        forces.pow(2).sum().backward()
        results.append((forces.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes", [((2, 4), (2, 4), (2, 1)), ((2, 4), (1, 4), (1, 4)), ((1, 4), (2, 1), (2, 4))],
                         ids=["v-one-head", "kv-one-batch", "mixed"])
def test_batch_and_heads_broadcast_as_in_1_1_4(causal, shapes):
    (bq, hq), (bk, hk), (bv, hv) = shapes
    outs, grads = [], []
    for attn in both(dim_heads=6, nb_features=20, causal=causal):
        q, k = randn(bq, hq, 9, 6).requires_grad_(), randn(bk, hk, 9, 6, seed=2).requires_grad_()
        v = randn(bv, hv, 9, 5, seed=3).requires_grad_()
        out = attn(q, k, v)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append((q.grad, k.grad, v.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_broadcast_shapes_that_do_not_broadcast_still_raise():
    attn = ours.FastAttention(dim_heads=6, nb_features=20)
    with pytest.raises(ValueError, match=r"\(batch, heads\)"):
        attn(torch.randn(2, 4, 9, 6), torch.randn(3, 4, 9, 6), torch.randn(2, 4, 9, 6))


@pytest.mark.parametrize("generalized", [False, True])
def test_one_column_projection_on_wider_heads(generalized):
    """dim_heads=1 with heads of 6: 1.1.4's einsum broadcasts the (m, 1) projection over d."""
    outs = [attn(randn(2, 3, 8, 6), randn(2, 3, 8, 6, seed=2), randn(2, 3, 8, 4, seed=3))
            for attn in both(dim_heads=1, nb_features=10, generalized_attention=generalized)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_no_projection_takes_any_head_width(causal):
    outs = [attn(randn(2, 4, 10, 16), randn(2, 4, 10, 16, seed=2), randn(2, 4, 10, 16, seed=3))
            for attn in both(dim_heads=64, no_projection=True, causal=causal)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


class _AbsReLU(nn.ReLU):
    def forward(self, x):
        return x.abs()


def _hooked_relu() -> nn.ReLU:
    relu = nn.ReLU()
    relu.register_forward_hook(lambda module, args, out: out * 2 + 1)
    return relu


def _own_forward_relu() -> nn.ReLU:
    relu = nn.ReLU()
    relu.forward = torch.sigmoid
    return relu


def _backward_hooked_relu() -> nn.ReLU:
    relu = nn.ReLU()
    relu.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 2,))
    return relu


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("make", [_AbsReLU, _hooked_relu, _own_forward_relu, _backward_hooked_relu, nn.ReLU],
                         ids=["subclass", "hooked", "own-forward", "backward-hook", "plain"])
def test_relu_kernel_fn_runs_fused_only_when_it_is_relu(causal, make):
    kernel_fn = make()
    outs, grads = [], []
    for attn in both(dim_heads=8, nb_features=12, causal=causal, generalized_attention=True, kernel_fn=kernel_fn):
        q = randn(2, 2, 9, 8).requires_grad_()
        outs.append(attn(q, randn(2, 2, 9, 8, seed=2), randn(2, 2, 9, 8, seed=3)))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), q)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    fused = ours.feature_maps.resolve(kernel_fn).name == "relu"
    assert fused == (make is nn.ReLU)


def test_causal_linear_fn_as_in_1_1_4():
    """1.1.4's causal FastAttention holds its causal attention on features as causal_linear_fn
    (None when not causal); a function put in its place is called on the features."""
    calls = []

    def counted(q, k, v):
        calls.append(q.shape)
        return original.performer_pytorch.causal_linear_attention_noncuda(q, k, v)

    q, k, v = randn(2, 2, 9, 8), randn(2, 2, 9, 8, seed=2), randn(2, 2, 9, 8, seed=3)
    outs = []
    for attn in both(dim_heads=8, nb_features=12, causal=True):
        assert callable(attn.causal_linear_fn)
        attn.causal_linear_fn = counted
        outs.append(attn(q, k, v))
    assert len(calls) == 2
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    assert ours.FastAttention(dim_heads=8, nb_features=12).causal_linear_fn is None


@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_as_in_1_1_4(v_dtype):
    """Rotary code hands attention fp32 q, k and a 16-bit v: 1.1.4's causal path promotes (an fp32
    output), its non-causal einsums raise RuntimeError, which our error (a TypeError) still is."""
    q, k = randn(2, 2, 9, 8).float(), randn(2, 2, 9, 8, seed=2).float()
    v = randn(2, 2, 9, 8, seed=3).to(v_dtype)
    outs = []
    for lib in (original, ours):
        torch.manual_seed(0)
        outs.append(lib.FastAttention(dim_heads=8, nb_features=12, causal=True)(q, k, v))
    assert outs[1].dtype == outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for lib in (original, ours):
        with pytest.raises(RuntimeError):
            lib.FastAttention(dim_heads=8, nb_features=12)(q, k, v)
    with pytest.raises(TypeError, match="must share one dtype"):
        ours.FastAttention(dim_heads=8, nb_features=12)(q, k, v)
