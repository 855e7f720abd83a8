"""torch.func transforms and forward-mode AD through the public entry points: vmap, grad, jacrev,
jacfwd, jvp, per-sample gradients of a whole model, torch.autograd.forward_ad and the legacy
batched backward of torch.autograd.functional.jacobian(vectorize=True).  1.1.4's einsums take
them all; a custom op takes none (and forward AD through it gave zero tangents silently), so under
a transform the ops run the PyTorch path as plain operations (performer_triton.ops.transformed).
Checked against performer-pytorch 1.1.4 and against the untransformed calls, in float64."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import performer_pytorch as original
import performer_triton
from performer_triton import AttentionState, favor_attention
from performer_triton.performer_pytorch import FastAttention
from conftest import HAS_TRITON

warnings.filterwarnings("ignore", message="unable to import cuda code")
F64 = dict(dtype=torch.float64)


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, **F64) for shape in shapes]


def both(causal: bool, **kw):
    """1.1.4's FastAttention and ours with the same projection (same seed)."""
    modules = []
    for lib in (original, performer_triton):
        torch.manual_seed(0)
        modules.append(lib.FastAttention(8, nb_features=12, causal=causal, **kw).double())
    return modules


def close(a, b, budget=1e-10):
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() <= budget * a.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_mode_derivatives_equal_performer_pytorch(causal):
    """jvp, jacfwd and torch.autograd.forward_ad give 1.1.4's tangents (the custom op alone gave
    zeros without an error)."""
    ours_theirs = both(causal)
    q, k, v, dq, dk, dv = tensors(*[(2, 2, 7, 8)] * 6)
    tangents = []
    for fa in ours_theirs:
        _, t = jvp(fa, (q, k, v), (dq, dk, dv))
        jac = jacfwd(lambda x: fa(x, k, v))(q)
        with fwAD.dual_level():
            dual = fa(fwAD.make_dual(q, dq), k, v)
            t_ad = fwAD.unpack_dual(dual).tangent
        tangents.append((t, jac, t_ad))
    for theirs, ours in zip(*tangents):
        assert theirs.abs().max() > 0.1
        close(theirs, ours)


@pytest.mark.parametrize("causal", [False, True])
def test_jacrev_and_batched_jacobians_equal_performer_pytorch(causal):
    """jacrev (vmap over the backward), hessian-vector style jacobians of the gradient and the
    legacy batched backward (jacobian(vectorize=True), autograd.grad(is_grads_batched=True))."""
    ours_theirs = both(causal)
    q, k, v = tensors((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 3), seed=1)
    results = []
    for fa in ours_theirs:
        f = lambda q_, k_, v_: fa(q_, k_, v_)
        rev = jacrev(f, argnums=(0, 1, 2))(q, k, v)
        vec = torch.autograd.functional.jacobian(f, (q, k, v), vectorize=True)
        x = q.clone().requires_grad_()
        out = fa(x, k, v)
        basis = torch.eye(out.numel(), **F64).reshape(-1, *out.shape)[:6]
        (rows,) = torch.autograd.grad(out, x, basis, is_grads_batched=True)
        hess = jacrev(grad(lambda q_: fa(q_, k, v).square().sum()))(q)
        results.append((*rev, *vec, rows, hess))
    for theirs, ours in zip(*results):
        close(theirs, ours)


@pytest.mark.parametrize("feature_map", ["softmax", "relu", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_vmap_over_any_input_equals_the_calls_one_by_one(causal, feature_map):
    """vmap over q, k, v or all of them (the others shared) equals a loop of plain calls, which
    keeps the inputs' NaN-free numbers exactly; with a key_padding_mask too."""
    b, h, n, d, e = 2, 2, 9, 6, 5
    q, k, v = tensors((3, b, h, n, d), (3, b, h, n, d), (3, b, h, n, e), seed=2)
    P = tensors((10, d), seed=3)[0]
    keep = torch.ones(3, b, n, dtype=torch.bool)
    keep[1, 0, 6:] = False
    keep[2, 1, ::2] = False

    def f(q_, k_, v_, keep_=None):
        return favor_attention(q_, k_, v_, P, causal=causal, feature_map=feature_map, key_padding_mask=keep_)

    for dims in ((0, None, None), (None, 0, None), (None, None, 0), (0, 0, 0)):
        args = [t if dim == 0 else t[0] for t, dim in zip((q, k, v), dims)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batched = vmap(f, in_dims=dims)(*args)
        # every op with a batching rule (in-place ones had none: a loop over the batch, and a warning)
        assert not [w for w in caught if "performance drop" in str(w.message)]
        for i in range(3):
            one = f(*(t[i] if dim == 0 else t for t, dim in zip(args, dims)))
            close(one, batched[i], 1e-12)
    batched = vmap(f)(q, k, v, keep)
    for i in range(3):
        close(f(q[i], k[i], v[i], keep[i]), batched[i], 1e-12)


def test_per_sample_gradients_of_a_model_equal_performer_pytorch():
    """vmap(grad) over a whole PerformerLM in eval mode with a padded mask and local heads (the
    per-sample gradients of DP-SGD): 1.1.4's numbers and the loop of ordinary backwards (token ids
    are not range-checked under vmap, which cannot read them: as under torch.compile)."""
    x = torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    per_sample = []
    for lib in (original, performer_triton):
        torch.manual_seed(0)
        model = lib.PerformerLM(num_tokens=20, max_seq_len=16, dim=16, depth=2, heads=2, dim_head=8, causal=True,
                                nb_features=12, local_attn_heads=1).double().eval()
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xi, mi):
            logits = functional_call(model, (p, buffers), (xi[None],), dict(mask=mi[None]))
            return torch.nn.functional.cross_entropy(logits[0, :-1], xi[1:])

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, mask)
        per_sample.append(grads)
        if lib is performer_triton:
            for i in range(3):
                model.zero_grad()
                loss(dict(model.named_parameters()), x[i], mask[i]).backward()
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        close(p.grad, grads[name][i], 1e-12)
    theirs, ours = per_sample
    assert theirs.keys() == ours.keys()
    for name in theirs:
        close(theirs[name], ours[name])


@pytest.mark.parametrize("feature_map", ["relu", "softmax"])
def test_forward_mode_through_a_state(feature_map):
    """Attention from a state under jvp: relu features (no stabilizer) against finite differences;
    softmax with the prefix stabilizer (a constant of the derivative, as 1.1.4's detached max)
    against reverse mode, <u, J t> = <J^T u, t>, whose backward runs on the op."""
    q, k, v = tensors((1, 2, 9, 6), (1, 2, 9, 6), (1, 2, 9, 4), seed=5)
    P = tensors((8, 6), seed=6)[0]
    kw = dict(causal=True, feature_map=feature_map, key_stabilizer="prefix" if feature_map == "softmax" else "global")
    _, s0 = favor_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], P, output_final_state=True, **kw)

    def f(q1, k1, hz0):
        out, s1 = favor_attention(q1, k1, v[:, :, 5:], P, initial_state=AttentionState(hz0, s0.v_sum, s0.ref, s0.stab),
                                  output_final_state=True, **kw)
        return out, s1.hz

    primals = (q[:, :, 5:], k[:, :, 5:], s0.hz)
    tangents = tuple(tensors(*(t.shape for t in primals), seed=7))
    _, (t_out, t_hz) = jvp(f, primals, tangents)
    if feature_map == "relu":
        eps = 1e-6
        plus = f(*(p + eps * t for p, t in zip(primals, tangents)))
        minus = f(*(p - eps * t for p, t in zip(primals, tangents)))
        for tangent, a, b_ in ((t_out, plus[0], minus[0]), (t_hz, plus[1], minus[1])):
            close((a - b_) / (2 * eps), tangent, 1e-6)
        return
    leaves = tuple(p.clone().requires_grad_() for p in primals)
    out, hz = f(*leaves)
    u_out, u_hz = tensors(out.shape, hz.shape, seed=8)
    grads = torch.autograd.grad((out, hz), leaves, (u_out, u_hz))
    forward = (u_out * t_out).sum() + (u_hz * t_hz).sum()
    reverse = sum((g * t).sum() for g, t in zip(grads, tangents))
    assert abs(forward - reverse) <= 1e-10 * abs(reverse)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_triton_backend_under_a_transform_says_why_it_cannot_run():
    q, k, v, P = (t.float() for t in tensors(*[(1, 2, 5, 8)] * 3, (12, 8)))
    with pytest.raises(ValueError, match="torch.func transforms"):
        vmap(lambda x: favor_attention(x, k, v, P, backend="triton"))(q[None])


def test_fastattention_keeps_the_transform_route_out_of_plain_calls():
    """Plain calls still take the custom op (saved O(m e) states, not autograd's intermediates):
    transformed() is False outside transforms and forward AD, True inside."""
    from performer_triton.ops import transformed

    assert not transformed()
    seen = []
    vmap(lambda x: (seen.append(transformed()), x)[1])(torch.zeros(2))
    with fwAD.dual_level():
        seen.append(transformed())
    assert seen == [True, True] and not transformed()
    fa = FastAttention(8, nb_features=12)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    assert "performer_triton_favor_fwd" in fa(q, q, q).grad_fn.name()


def test_a_state_whose_final_part_needs_no_gradient_takes_create_graph_and_batched_grads():
    """Only q needs a gradient, and the final state (which no q reaches) is in the loss: the
    plain-operation backward differentiates the outputs that need it only."""
    q, k, v = tensors((1, 2, 9, 6), (1, 2, 9, 6), (1, 2, 9, 6), seed=9)
    P = tensors((8, 6), seed=10)[0]
    x = q.clone().requires_grad_()

    def call():
        return favor_attention(x, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)

    out, s1 = call()
    (first,) = torch.autograd.grad(out.square().sum() + s1.hz.sum(), x)
    out, s1 = call()
    (second,) = torch.autograd.grad(out.square().sum() + s1.hz.sum(), x, create_graph=True)
    close(first, second, 1e-12)
    out, s1 = call()
    cotangents = (torch.randn(3, *out.shape, **F64), torch.ones(3, *s1.hz.shape, **F64))
    (rows,) = torch.autograd.grad((out, s1.hz), x, cotangents, is_grads_batched=True)
    out, s1 = call()
    (row,) = torch.autograd.grad((out, s1.hz), x, (cotangents[0][1], cotangents[1][1]))
    close(row, rows[1], 1e-12)


def test_the_ops_batching_rules_loop_over_the_batch():
    """vmap of the custom ops themselves (torch.compile of vmap keeps them): one call per entry."""
    from performer_triton import ops
    from performer_triton.feature_maps import resolve

    q, k, v = tensors((3, 1, 2, 70, 8), (1, 2, 70, 8), (1, 2, 70, 8), seed=11)
    P = tensors((12, 8), seed=12)[0]
    code = resolve("softmax").code
    for causal in (False, True):
        batched = vmap(lambda x: ops.favor_fwd(x, k, v, P, causal, code, False, False))(q)
        for i in range(3):
            one = ops.favor_fwd(q[i], k, v, P, causal, code, False, False)
            for a, b in zip((*one[:5], *one[5]), (*batched[:5], *batched[5])):
                assert torch.equal(a, b[i])


def test_a_batched_key_mask_with_the_prefix_stabilizer_says_why_it_cannot_run():
    q, k, v = tensors(*[(1, 2, 6, 8)] * 3)
    P = tensors((12, 8))[0]
    keep = torch.ones(3, 1, 6, dtype=torch.bool)
    keep[1, 0, 4:] = False
    with pytest.raises(NotImplementedError, match="loop over the batch"):
        vmap(lambda m: favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", key_padding_mask=m))(keep)


def test_grad_jvp_and_vjp_take_the_prefix_stabilizer_with_a_key_mask():
    """Unbatched transforms read the mask on the host as eager code does (only vmap's batched mask
    cannot steer Python): torch.func.grad / vjp / jvp equal autograd's gradients (review R34: a
    check on any active transform refused them)."""
    q, k, v = tensors(*[(2, 2, 6, 8)] * 3)
    P = tensors((12, 8))[0]
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    keep[1, 1] = False  # (a hole: the compacting path)

    def loss(q_):
        return favor_attention(q_, k, v, P, causal=True, key_stabilizer="prefix", key_padding_mask=keep).square().sum()

    leaf = q.clone().requires_grad_()
    expected = torch.autograd.grad(loss(leaf), leaf)[0]
    assert torch.allclose(grad(loss)(q), expected, rtol=1e-12, atol=1e-12)
    _, pullback = torch.func.vjp(loss, q)
    assert torch.allclose(pullback(torch.tensor(1.0, dtype=q.dtype))[0], expected, rtol=1e-12, atol=1e-12)
    tangent = tensors((2, 2, 6, 8), seed=5)[0]
    _, directional = jvp(loss, (q,), (tangent,))
    assert torch.allclose(directional, (expected * tangent).sum(), rtol=1e-10, atol=1e-12)
